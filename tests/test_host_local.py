"""host-local: the on-disk store, the plugin commands, the executable, and the
reference plugin side by side. No root needed; every store lives in tmp_path."""
import fcntl
import json
import os
import subprocess
import time

import pytest

from cni import errors, executable, skel
from cni.errors import CNIError
from cni.types import to_version
from ipam import host_local
from ipam.store import Store
from podnet.net.ip import parse_ip

PYTHON = "/usr/bin/python3"
REFERENCE = "/usr/lib/cni/host-local"
NET = "testnet"


def netconf(data_dir, version="1.0.0", name=NET, **ipam):
    ipam.setdefault("type", "host-local")
    ipam["dataDir"] = str(data_dir)
    return {"cniVersion": version, "name": name, "type": "bridge", "ipam": ipam}


def v4(data_dir, subnet="10.1.0.0/24", **kw):
    return netconf(data_dir, subnet=subnet, **kw)


def env_for(command, cid="c1", ifname="eth0", cni_args="", path="/nonexistent"):
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/dev/null",
           "CNI_IFNAME": ifname, "CNI_PATH": path}
    if cni_args:
        env["CNI_ARGS"] = cni_args
    return env


def call(command, conf, **kw):
    """Run one command in-process, as cni.invoke does for the bridge plugin."""
    args = skel.args_from_env(env_for(command, **kw), json.dumps(conf).encode())
    return host_local.COMMANDS[command](args)


def call_unparsed(command, conf, **kw):
    """As call(), with conf handed over as a dict past the JSON layer (which refuses
    lone surrogates in a document itself): what host-local checks on its own."""
    head = {"cniVersion": conf.get("cniVersion"), "name": conf.get("name")}
    args = skel.args_from_env(env_for(command, **kw), json.dumps(head).encode())
    args.conf = conf
    return host_local.COMMANDS[command](args)


def add(conf, cid="c1", **kw):
    return call("ADD", conf, cid=cid, **kw)


def addresses(result):
    return [ip["address"] for ip in result["ips"]]


def store_files(data_dir, name=NET):
    d = os.path.join(str(data_dir), name)
    out = {}
    for f in sorted(os.listdir(d)):
        if f != "lock":
            with open(os.path.join(d, f), "rb") as fh:
                out[f] = fh.read()
    return out


# == store ===================================================================

def test_store_file_format_is_byte_for_byte_the_reference(tmp_path):
    store = Store(NET, str(tmp_path))
    with store:
        assert store.reserve(parse_ip("10.1.0.2"), "cid", "eth0")
        assert not store.reserve(parse_ip("10.1.0.2"), "other", "eth0")
        assert store.reserve(parse_ip("fd00::2"), "cid", "eth0")
        store.set_last_reserved(0, parse_ip("10.1.0.2"))
        store.set_last_reserved(1, parse_ip("fd00::2"))
    d = tmp_path / NET
    assert (d / "10.1.0.2").read_bytes() == b"cid\r\neth0"
    assert (d / "fd00::2").read_bytes() == b"cid\r\neth0"
    assert (d / "last_reserved_ip.0").read_bytes() == b"10.1.0.2"
    assert (d / "last_reserved_ip.1").read_bytes() == b"fd00::2"
    assert (d / "lock").exists()
    assert oct((d / "10.1.0.2").stat().st_mode & 0o777) == "0o644"
    assert store.last_reserved(1) == parse_ip("fd00::2")
    assert store.last_reserved(7) is None


def test_store_lock_is_an_exclusive_flock(tmp_path):
    store = Store(NET, str(tmp_path))
    store.lock()
    fd = os.open(str(tmp_path / NET / "lock"), os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        store.unlock()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # free now
    finally:
        os.close(fd)


def test_store_lock_blocks_another_process(tmp_path):
    store = Store(NET, str(tmp_path))
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    lock = str(tmp_path / NET / "lock")
    with store:
        assert subprocess.run([PYTHON, "-c", probe, lock], capture_output=True).returncode != 0
    assert subprocess.run([PYTHON, "-c", probe, lock], capture_output=True).returncode == 0


def test_store_release_by_id_and_legacy_files(tmp_path):
    store = Store(NET, str(tmp_path))
    d = tmp_path / NET
    with store:
        store.reserve(parse_ip("10.1.0.2"), "a", "eth0")
        store.reserve(parse_ip("10.1.0.3"), "a", "eth1")
        store.reserve(parse_ip("fd00::2"), "a", "eth0")
        store.set_last_reserved(0, parse_ip("10.1.0.3"))
        (d / "10.1.0.9").write_bytes(b"a\n")          # legacy: container ID only
        (d / "10.1.0.10").write_bytes(b"legacy")
        (d / "not-an-ip").write_bytes(b"a\r\neth0")
        os.mkdir(str(d / "10.1.0.11"))
        assert sorted(store.release_by_id("a", "eth0")) == ["10.1.0.2", "fd00::2"]
        # Exact matches exist for eth1, so the legacy file stays.
        assert store.release_by_id("a", "eth1") == ["10.1.0.3"]
        # Nothing left naming an interface: legacy files of the container go.
        assert store.release_by_id("a", "eth0") == ["10.1.0.9"]
        assert store.release_by_id("legacy", "eth5") == ["10.1.0.10"]
        assert store.release_by_id("nobody", "eth0") == []
    assert sorted(os.listdir(str(d))) == ["10.1.0.11", "last_reserved_ip.0", "lock", "not-an-ip"]


def test_store_allocations_reads_owners(tmp_path):
    store = Store(NET, str(tmp_path))
    with store:
        store.reserve(parse_ip("10.1.0.2"), "a", "eth0")
        (tmp_path / NET / "10.1.0.3").write_bytes(b"  b \r\n")
        got = sorted((a.name, a.container_id, a.ifname) for a in store.allocations())
    assert got == [("10.1.0.2", "a", "eth0"), ("10.1.0.3", "b", None)]


def test_store_gc(tmp_path):
    store = Store(NET, str(tmp_path))
    d = tmp_path / NET
    with store:
        store.reserve(parse_ip("10.0.0.1"), "keep", "eth0")
        store.reserve(parse_ip("10.0.0.2"), "keep", "eth1")     # same container, other interface
        store.reserve(parse_ip("10.0.0.3"), "gone", "eth0")
        store.set_last_reserved(0, parse_ip("10.0.0.3"))
        (d / "10.0.0.9").write_bytes(b"keep")                  # legacy, container still valid
        (d / "10.0.0.10").write_bytes(b"stale")                # legacy, container gone
        released = store.gc({("keep", "eth0")})
    assert sorted(released) == ["10.0.0.10", "10.0.0.2", "10.0.0.3"]
    assert sorted(os.listdir(str(d))) == ["10.0.0.1", "10.0.0.9", "last_reserved_ip.0", "lock"]
    with store:
        assert sorted(store.gc(set())) == ["10.0.0.1", "10.0.0.9"]
        assert store.reserve(parse_ip("10.0.0.1"), "new", "eth0")


def test_store_garbage_last_reserved_is_ignored(tmp_path):
    store = Store(NET, str(tmp_path))
    with store:
        pass
    (tmp_path / NET / "last_reserved_ip.0").write_bytes(b"10.1.0")
    assert store.last_reserved(0) is None


# == plugin commands, in-process ============================================

def test_add_result_shape(tmp_path):
    conf = v4(tmp_path, routes=[{"dst": "0.0.0.0/0"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.254"}])
    result = add(conf)
    assert result == {
        "interfaces": [],
        "ips": [{"address": "10.1.0.2/24", "gateway": "10.1.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.254"}],
        "dns": {},
    }
    assert to_version(result, "1.0.0") == {
        "cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24", "gateway": "10.1.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.254"}], "dns": {}}
    assert store_files(tmp_path) == {"10.1.0.2": b"c1\r\neth0", "last_reserved_ip.0": b"10.1.0.2"}


def test_add_round_robin_across_calls(tmp_path):
    conf = v4(tmp_path, subnet="10.1.0.0/29")
    assert [addresses(add(conf, cid="c%d" % i))[0] for i in range(3)] == \
        ["10.1.0.2/29", "10.1.0.3/29", "10.1.0.4/29"]
    call("DEL", conf, cid="c0")
    # .2 is free again, but round-robin goes on from .4 and wraps later.
    assert addresses(add(conf, cid="c3")) == ["10.1.0.5/29"]
    assert addresses(add(conf, cid="c4")) == ["10.1.0.6/29"]
    assert addresses(add(conf, cid="c5")) == ["10.1.0.2/29"]
    with pytest.raises(CNIError) as e:
        add(conf, cid="c6")
    assert e.value.code == errors.NO_ADDRESSES
    assert e.value.msg == ("failed to allocate for range 0: "
                           "no IP addresses available in range set: 10.1.0.1-10.1.0.6")


def test_add_is_idempotent(tmp_path):
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]])
    first = add(conf)
    assert add(conf) == first
    assert addresses(add(conf, ifname="eth1")) == ["10.1.0.3/24", "fd00::3/64"]   # another attachment
    assert sorted(store_files(tmp_path)) == ["10.1.0.2", "10.1.0.3", "fd00::2", "fd00::3",
                                             "last_reserved_ip.0", "last_reserved_ip.1"]


def test_add_idempotent_completes_a_half_allocation(tmp_path):
    # c1 holds only a v4 address (e.g. the v6 range set was added to the config later).
    add(v4(tmp_path))
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]])
    assert addresses(add(conf)) == ["10.1.0.2/24", "fd00::2/64"]


def test_add_rolls_back_earlier_range_sets_on_failure(tmp_path):
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.2.0.0/30"}]])
    add(conf, cid="a")                      # takes the only address of the second set
    with pytest.raises(CNIError) as e:
        add(conf, cid="b")
    assert e.value.code == errors.NO_ADDRESSES
    assert "failed to allocate for range 1" in e.value.msg
    assert sorted(store_files(tmp_path)) == ["10.1.0.2", "10.2.0.2",
                                             "last_reserved_ip.0", "last_reserved_ip.1"]


def test_requested_ip_from_cni_args(tmp_path):
    conf = v4(tmp_path)
    assert addresses(add(conf, cni_args="IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.1.0.9")) == ["10.1.0.9/24"]
    with pytest.raises(CNIError) as e:
        add(conf, cid="c2", cni_args="IP=10.1.0.9")
    assert e.value.code == errors.NO_ADDRESSES
    assert e.value.msg == ("failed to allocate for range 0: requested IP address 10.1.0.9 is not "
                           "available in range set 10.1.0.1-10.1.0.254")
    with pytest.raises(CNIError) as e:
        add(conf, cid="c3", cni_args="IP=bogus")
    assert e.value.code == errors.INVALID_ENV
    # Round-robin continues after a requested address, as in the reference.
    assert addresses(add(conf, cid="c4")) == ["10.1.0.10/24"]


def test_requested_ips_from_args_and_runtime_config(tmp_path):
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]])
    conf["args"] = {"cni": {"ips": ["fd00::50"]}}
    conf["runtimeConfig"] = {"ips": ["10.1.0.50/24"]}
    assert addresses(add(conf)) == ["10.1.0.50/24", "fd00::50/64"]


def test_requested_ip_errors(tmp_path):
    conf = v4(tmp_path)
    cases = [
        ("IP=10.1.0.1", errors.INVALID_NETCONF, "requested ip 10.1.0.1 is subnet's gateway"),
        ("IP=10.2.0.1", errors.INVALID_NETCONF, "failed to allocate all requested IPs: 10.2.0.1"),
        ("IP=10.1.0.255", errors.INVALID_NETCONF, "failed to allocate all requested IPs: 10.1.0.255"),
    ]
    for cni_args, code, msg in cases:
        with pytest.raises(CNIError) as e:
            add(conf, cni_args=cni_args)
        assert (e.value.code, msg in e.value.msg) == (code, True), e.value
    explicit = v4(tmp_path, name="n2", rangeStart="10.1.0.0", rangeEnd="10.1.0.255")
    with pytest.raises(CNIError) as e:
        add(explicit, cni_args="IP=10.1.0.255")
    assert "requested ip 10.1.0.255 is the broadcast address of 10.1.0.0/24" in e.value.msg
    two = dict(conf, runtimeConfig={"ips": ["10.1.0.7", "10.1.0.8"]})
    with pytest.raises(CNIError) as e:
        add(two)
    assert e.value.msg == "failed to allocate all requested IPs: 10.1.0.8"
    assert list(store_files(tmp_path)) == ["last_reserved_ip.0"]   # no address half-made
    bad = dict(conf, runtimeConfig={"ips": ["nope"]})
    with pytest.raises(CNIError) as e:
        add(bad)
    assert (e.value.code, e.value.msg) == (errors.INVALID_NETCONF,
                                           "cannot understand ip: invalid IP address: nope")


def test_requested_ip_conflicting_with_held_address(tmp_path):
    conf = v4(tmp_path)
    add(conf)
    assert addresses(add(conf, cni_args="IP=10.1.0.2")) == ["10.1.0.2/24"]
    with pytest.raises(CNIError) as e:
        add(conf, cni_args="IP=10.1.0.3")
    assert "conflicts with 10.1.0.2" in e.value.msg


def test_resolv_conf(tmp_path):
    rc = tmp_path / "resolv.conf"
    rc.write_text("# comment\n; other\nnameserver 1.1.1.1\nnameserver fd00::53\n"
                  "domain example.com\nsearch a.example b.example\noptions ndots:5 edns0\nbogus\n")
    result = add(v4(tmp_path, resolvConf=str(rc)))
    assert result["dns"] == {"nameservers": ["1.1.1.1", "fd00::53"], "domain": "example.com",
                             "search": ["a.example", "b.example"], "options": ["ndots:5", "edns0"]}
    with pytest.raises(CNIError) as e:
        add(v4(tmp_path, resolvConf=str(tmp_path / "missing")), cid="c2")
    assert e.value.code == errors.IO_FAILURE


@pytest.mark.parametrize("conf,message", [
    ({"cniVersion": "1.0.0", "name": NET}, "IPAM config missing 'ipam' key"),
    ({"cniVersion": "1.0.0", "name": NET, "ipam": []}, "ipam must be an object"),
    ({"cniVersion": "1.0.0", "name": NET, "ipam": {"subnet": "10.1.0.0/24", "routes": [{"dst": "x"}]}},
     "invalid CIDR address: x"),
    ({"cniVersion": "1.0.0", "name": NET,
      "ipam": {"subnet": "10.1.0.0/24", "routes": [{"dst": "10.0.0.0/8", "gw": "y"}]}},
     "invalid IP address: y"),
    ({"cniVersion": "1.0.0", "name": NET, "ipam": {"subnet": "10.1.0.0/24", "dataDir": 5}},
     "ipam.dataDir must be a string"),
])
def test_invalid_config(conf, message):
    with pytest.raises(CNIError) as e:
        call("ADD", conf)
    assert e.value.code == errors.INVALID_NETCONF
    assert message in e.value.msg


def test_del_is_idempotent_and_does_not_create_the_store(tmp_path):
    conf = v4(tmp_path / "data")
    assert call("DEL", conf) is None
    assert not (tmp_path / "data").exists()
    add(conf)
    add(conf, cid="c2")
    call("DEL", conf)
    call("DEL", conf)
    assert sorted(store_files(tmp_path / "data")) == ["10.1.0.3", "last_reserved_ip.0"]


def test_check(tmp_path):
    conf = v4(tmp_path)
    with pytest.raises(CNIError) as e:
        call("CHECK", conf)
    assert (e.value.code, e.value.msg) == (104, "host-local: Failed to find address added by container c1")
    add(conf)
    assert call("CHECK", conf) is None
    with pytest.raises(CNIError) as e:
        call("CHECK", conf, ifname="eth1")
    assert e.value.code == errors.NOT_AS_ADDED


def test_gc(tmp_path):
    conf = netconf(tmp_path, version="1.1.0", ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]])
    for cid in ("a", "b", "c"):
        add(conf, cid=cid)
    gc = dict(conf)
    gc["cni.dev/valid-attachments"] = [{"containerID": "b", "ifname": "eth0"},
                                       {"containerID": "a", "ifname": "eth9"}]
    call("GC", gc)
    assert sorted(store_files(tmp_path)) == ["10.1.0.3", "fd00::3",
                                             "last_reserved_ip.0", "last_reserved_ip.1"]
    gc["cni.dev/valid-attachments"] = "nope"
    with pytest.raises(CNIError) as e:
        call("GC", gc)
    assert e.value.code == errors.INVALID_NETCONF
    gc["cni.dev/valid-attachments"] = []
    call("GC", gc)
    assert sorted(store_files(tmp_path)) == ["last_reserved_ip.0", "last_reserved_ip.1"]


def test_gc_and_status_need_spec_1_1(tmp_path):
    with pytest.raises(CNIError) as e:
        call("GC", v4(tmp_path))
    assert e.value.code == errors.INCOMPATIBLE_VERSION


def test_status(tmp_path):
    assert call("STATUS", v4(tmp_path / "fresh", version="1.1.0")) is None
    assert (tmp_path / "fresh" / NET / "lock").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CNIError) as e:
        call("STATUS", v4(blocker, version="1.1.0"))
    assert e.value.code == errors.LIMITED_CONNECTIVITY


# == the executable ==========================================================

@pytest.fixture
def plugin(tmp_path):
    return executable.install(str(tmp_path / "bin"), PYTHON, ["host-local"])[0]


def run(binary, command, conf, cid="c1", ifname="eth0", cni_args=""):
    env = dict(os.environ)
    env.update(env_for(command, cid, ifname, cni_args, path=os.path.dirname(binary)))
    proc = subprocess.run([binary], input=json.dumps(conf).encode(), env=env, capture_output=True)
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out


def test_executable_add_del_check(plugin, tmp_path):
    conf = netconf(tmp_path / "d", ranges=[[{"subnet": "10.22.0.0/16"}]], routes=[{"dst": "0.0.0.0/0"}])
    assert run(plugin, "ADD", conf) == (0, {
        "cniVersion": "1.0.0", "ips": [{"address": "10.22.0.2/16", "gateway": "10.22.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {}})
    assert run(plugin, "CHECK", conf) == (0, None)
    assert run(plugin, "DEL", conf) == (0, None)
    assert run(plugin, "CHECK", conf) == (1, {      # the reference's message; its 999 is our 104
        "cniVersion": "1.0.0", "code": errors.NOT_AS_ADDED,
        "msg": "host-local: Failed to find address added by container c1"})


def test_executable_errors(plugin, tmp_path):
    rc, out = run(plugin, "ADD", v4(tmp_path, subnet="10.1.0.0/31"))
    assert rc == 1
    assert out == {"cniVersion": "1.0.0", "code": errors.INVALID_NETCONF,
                   "msg": "invalid range set 0: Network 10.1.0.0/31 too small to allocate from"}
    conf = v4(tmp_path, subnet="10.1.0.0/30", version="0.4.0")
    assert run(plugin, "ADD", conf)[0] == 0
    rc, out = run(plugin, "ADD", conf, cid="c2")
    assert (rc, out["cniVersion"], out["code"]) == (1, "0.4.0", errors.NO_ADDRESSES)


def test_executable_old_versions(plugin, tmp_path):
    conf = netconf(tmp_path, version="0.2.0", ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]])
    assert run(plugin, "ADD", conf) == (0, {
        "cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.2/24", "gateway": "10.1.0.1"},
        "ip6": {"ip": "fd00::2/64", "gateway": "fd00::1"}, "dns": {}})


def race(binaries, conf, count):
    """Start `count` ADDs at once (cycling through `binaries`); (address or None, output) each."""
    stdin = json.dumps(conf).encode()
    procs = []
    for i in range(count):
        binary = binaries[i % len(binaries)]
        env = dict(os.environ)
        env.update(env_for("ADD", cid="race%d" % i, path=os.path.dirname(binary)))
        procs.append(subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env))
    out = []
    for p in procs:
        stdout, _ = p.communicate(stdin)
        result = json.loads(stdout)
        out.append((result["ips"][0]["address"] if p.returncode == 0 else None, result))
    return out


def test_concurrent_adds_get_distinct_addresses(plugin, tmp_path):
    # 55 containers race for 50 addresses (10.1.0.2 - 10.1.0.51).
    results = race([plugin], v4(tmp_path, rangeEnd="10.1.0.51"), 55)
    got = [addr for addr, _ in results if addr]
    failed = [out for addr, out in results if not addr]
    assert len(got) == 50 and len(set(got)) == 50
    assert {f["code"] for f in failed} == {errors.NO_ADDRESSES} and len(failed) == 5
    files = store_files(tmp_path)
    assert len({files[a.split("/")[0]] for a in got}) == 50      # 50 different owners


@pytest.mark.skipif(not os.access(REFERENCE, os.X_OK), reason="reference host-local not installed")
def test_concurrent_adds_mixed_with_the_reference(plugin, tmp_path):
    # Both plugins flock the same lock file, so they exclude each other too.
    results = race([plugin, REFERENCE], v4(tmp_path), 50)
    got = [addr for addr, _ in results]
    assert None not in got and len(set(got)) == 50
    assert len(store_files(tmp_path)) == 51                      # + last_reserved_ip.0


# == side by side with the reference plugin ==================================

needs_reference = pytest.mark.skipif(not os.access(REFERENCE, os.X_OK),
                                     reason="reference host-local not installed")

SIDE_BY_SIDE = {
    "v4": dict(subnet="10.22.0.0/16", routes=[{"dst": "0.0.0.0/0"}]),
    "v6": dict(subnet="fd00:10::/64", routes=[{"dst": "::/0"}]),
    "dual": dict(ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/120", "rangeEnd": "fd00::10"}]],
                 routes=[{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}]),
    "start-end": dict(ranges=[[{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.100",
                                "rangeEnd": "10.1.0.102", "gateway": "10.1.0.101"}]]),
    "multi-range": dict(ranges=[[{"subnet": "10.1.0.0/30"}, {"subnet": "10.2.0.0/29", "rangeStart": "10.2.0.5"}]]),
    "legacy+ranges": dict(subnet="10.3.0.0/24", rangeStart="10.3.0.7",
                          ranges=[[{"subnet": "10.4.0.0/24"}]]),
}


@needs_reference
@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
@pytest.mark.parametrize("name", sorted(SIDE_BY_SIDE))
def test_same_results_as_reference(plugin, tmp_path, name, version):
    """Same sequence of ADD/DEL on empty stores: same output, same files."""
    steps = [("ADD", "c1"), ("ADD", "c2"), ("ADD", "c3"), ("DEL", "c1"), ("ADD", "c4"),
             ("ADD", "c5"), ("ADD", "c6"), ("ADD", "c7")]
    stores = {}
    outputs = {}
    for who, binary in (("ref", REFERENCE), ("ours", plugin)):
        conf = netconf(tmp_path / who, version=version, **SIDE_BY_SIDE[name])
        outputs[who] = [run(binary, cmd, conf, cid=cid) for cmd, cid in steps]
        stores[who] = store_files(tmp_path / who)
    for (cmd, cid), ref, ours in zip(steps, outputs["ref"], outputs["ours"]):
        if ref[0] != 0:     # both fail when exhausted; codes differ (999 vs 100), texts match
            assert ours[0] == 1 and ours[1]["msg"] == ref[1]["msg"], (cmd, cid)
        else:
            assert ours == ref, (cmd, cid)
    assert stores["ours"] == stores["ref"]


@needs_reference
@pytest.mark.parametrize("conf_ipam,message", [
    (dict(subnet="10.1.0.0/31"), "invalid range set 0: Network 10.1.0.0/31 too small to allocate from"),
    (dict(subnet="10.1.0.5/24"), "invalid range set 0: Network has host bits set"),
    (dict(ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/25"}]]), "range set 0 overlaps with 1"),
    (dict(ranges=[[{"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"}]]), "invalid range set 0: mixed address families"),
    (dict(ranges=[]), "no IP ranges specified"),
])
def test_same_errors_as_reference(plugin, tmp_path, conf_ipam, message):
    conf = netconf(tmp_path, **conf_ipam)
    ref_rc, ref = run(REFERENCE, "ADD", conf)
    rc, ours = run(plugin, "ADD", conf)
    assert (ref_rc, rc) == (1, 1)
    assert message in ref["msg"] and message in ours["msg"]
    assert ours["code"] == errors.INVALID_NETCONF


@needs_reference
def test_reads_a_store_written_by_the_reference(plugin, tmp_path):
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]])
    ref_rc, ref = run(REFERENCE, "ADD", conf, cid="r1")
    run(REFERENCE, "ADD", conf, cid="r2")
    assert ref_rc == 0
    # Our ADD for the same attachment hands back the reference's addresses...
    assert run(plugin, "ADD", conf, cid="r1") == (0, ref)
    assert run(plugin, "CHECK", conf, cid="r2") == (0, None)
    # ...a new one continues the reference's round-robin...
    assert run(plugin, "ADD", conf, cid="o1")[1]["ips"] == [
        {"address": "10.1.0.4/24", "gateway": "10.1.0.1"}, {"address": "fd00::4/64", "gateway": "fd00::1"}]
    # ...our DEL releases what the reference allocated, and the reference sees it.
    assert run(plugin, "DEL", conf, cid="r1") == (0, None)
    assert "10.1.0.2" not in store_files(tmp_path)
    assert run(REFERENCE, "CHECK", conf, cid="r1")[0] == 1
    # And the other way round: the reference reads and releases ours.
    assert run(REFERENCE, "CHECK", conf, cid="o1") == (0, None)
    assert run(REFERENCE, "ADD", conf, cid="r3")[1]["ips"][0]["address"] == "10.1.0.5/24"
    assert run(REFERENCE, "DEL", conf, cid="o1") == (0, None)
    assert sorted(store_files(tmp_path)) == ["10.1.0.3", "10.1.0.5", "fd00::3", "fd00::5",
                                             "last_reserved_ip.0", "last_reserved_ip.1"]


@needs_reference
def test_legacy_file_released_like_the_reference(plugin, tmp_path):
    for who, binary in (("ref", REFERENCE), ("ours", plugin)):
        c = v4(tmp_path / who)
        d = tmp_path / who / NET
        d.mkdir(parents=True)
        (d / "10.1.0.7").write_bytes(b"old\n")
        assert run(binary, "CHECK", c, cid="old") == (0, None)
        assert run(binary, "DEL", c, cid="old") == (0, None)
        assert not (d / "10.1.0.7").exists()



# == issue 12: failures and crashes leave no allocation ======================

def test_failed_last_reserved_write_leaves_no_allocation(tmp_path):
    # Writing last_reserved_ip.0 fails after the address file was made: the
    # ADD fails (I/O, code 5) and releases the address it had reserved.
    d = tmp_path / NET
    d.mkdir()
    (d / "last_reserved_ip.0").mkdir()
    with pytest.raises(CNIError) as e:
        add(v4(tmp_path))
    assert e.value.code == errors.IO_FAILURE
    assert sorted(os.listdir(str(d))) == ["last_reserved_ip.0", "lock"]


def test_failed_last_reserved_write_rolls_back_every_range_set(tmp_path, monkeypatch):
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]])
    real = Store.set_last_reserved

    def failing(self, range_index, ip):
        if range_index == 1:
            raise OSError(28, "No space left on device")
        return real(self, range_index, ip)

    monkeypatch.setattr(Store, "set_last_reserved", failing)
    with pytest.raises(CNIError) as e:
        add(conf)
    assert e.value.code == errors.IO_FAILURE and "No space left on device" in e.value.msg
    assert [f for f in store_files(tmp_path) if not f.startswith("last_reserved_ip.")] == []
    monkeypatch.undo()
    assert addresses(add(conf)) == ["10.1.0.3/24", "fd00::2/64"]   # round-robin after .2


def _age(path, seconds=3600):
    old = os.stat(str(path)).st_mtime - seconds
    os.utime(str(path), (old, old))


def test_empty_address_file_is_taken_until_stale_then_reclaimed(tmp_path):
    # The state a kill -9 between O_EXCL create and write leaves (older podnet,
    # the reference): an address file with no owner, which no DEL can match.
    conf = v4(tmp_path, subnet="10.1.0.0/29")
    d = tmp_path / NET
    d.mkdir()
    (d / "10.1.0.2").write_bytes(b"")
    (d / "10.1.0.3").write_bytes(b" \r\n")
    # Fresh: taken (a writer might still be at it), untouched by DEL.
    assert addresses(add(conf, cid="a")) == ["10.1.0.4/29"]
    call("DEL", conf, cid="zombie")
    assert (d / "10.1.0.2").exists() and (d / "10.1.0.3").exists()
    # Stale: any ADD, DEL or GC under the lock removes it.
    _age(d / "10.1.0.2")
    call("DEL", conf, cid="zombie")
    assert not (d / "10.1.0.2").exists() and (d / "10.1.0.3").exists()
    _age(d / "10.1.0.3")
    assert addresses(add(conf, cid="b")) == ["10.1.0.5/29"]
    assert not (d / "10.1.0.3").exists()
    assert [addresses(add(conf, cid=c))[0] for c in ("c", "d", "e")] == \
        ["10.1.0.6/29", "10.1.0.2/29", "10.1.0.3/29"]


def test_gc_reclaims_stale_empty_files_and_keeps_fresh_ones(tmp_path):
    conf = v4(tmp_path, version="1.1.0")
    add(conf, cid="a")
    d = tmp_path / NET
    (d / "10.1.0.7").write_bytes(b"")
    (d / "10.1.0.8").write_bytes(b"")
    _age(d / "10.1.0.8")
    call("GC", dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}))
    assert sorted(store_files(tmp_path)) == ["10.1.0.2", "10.1.0.7", "last_reserved_ip.0"]


def test_reservation_is_atomic_and_leftover_temp_files_are_swept(tmp_path):
    store = Store(NET, str(tmp_path))
    d = tmp_path / NET
    with store:
        assert store.reserve(parse_ip("10.1.0.2"), "c1", "eth0")
    assert sorted(os.listdir(str(d))) == ["10.1.0.2", "lock"]
    # What a writer killed between writing its temp file and linking it (or
    # after linking, before unlinking) leaves: swept by the next locked listing.
    (d / ".podnet-tmp.99999").write_bytes(b"c9\r\neth0")
    os.link(str(d / "10.1.0.2"), str(d / ".podnet-tmp.99998"))
    with store:
        assert [a.name for a in store.allocations()] == ["10.1.0.2"]
    assert sorted(os.listdir(str(d))) == ["10.1.0.2", "lock"]
    assert (d / "10.1.0.2").read_bytes() == b"c1\r\neth0"


# == issue 12: wrong types are refused, not taken as "unset" =================

@pytest.fixture
def default_data_dir(tmp_path, monkeypatch):
    """The store's default (/var/lib/cni/networks) moved into tmp_path, to see it stay untouched."""
    d = tmp_path / "default-data-dir"
    monkeypatch.setattr("ipam.store.DEFAULT_DATA_DIR", str(d))
    return d


@pytest.mark.parametrize("key", ["dataDir", "resolvConf"])
@pytest.mark.parametrize("value", [False, True, 0, 1, 1.5, [], ["/tmp/x"], {}, {"path": "/tmp/x"}],
                         ids=["false", "true", "0", "1", "1.5", "[]", "list", "{}", "object"])
def test_path_of_the_wrong_type_is_invalid_config(tmp_path, default_data_dir, key, value):
    conf = v4(tmp_path)
    conf["ipam"][key] = value
    for command in ("ADD", "DEL", "STATUS"):
        c = dict(conf, cniVersion="1.1.0")
        with pytest.raises(CNIError) as e:
            call(command, c)
        assert e.value.code == errors.INVALID_NETCONF, (command, e.value)
        assert "ipam.%s must be a string" % key in e.value.msg
    assert not default_data_dir.exists()
    assert not (tmp_path / NET).exists()


@pytest.mark.parametrize("value", [None, ""])
def test_null_or_empty_data_dir_means_the_default(default_data_dir, value):
    conf = {"cniVersion": "1.0.0", "name": NET, "ipam": {"type": "host-local", "subnet": "10.1.0.0/24",
                                                         "dataDir": value, "resolvConf": value}}
    assert addresses(add(conf)) == ["10.1.0.2/24"]
    assert sorted(os.listdir(str(default_data_dir / NET))) == ["10.1.0.2", "last_reserved_ip.0", "lock"]


@pytest.mark.parametrize("key", ["dataDir", "resolvConf"])
def test_path_with_a_nul_byte_is_invalid_config(tmp_path, key):
    conf = v4(tmp_path)
    conf["ipam"][key] = str(tmp_path) + "\x00x"
    with pytest.raises(CNIError) as e:
        add(conf)
    assert e.value.code == errors.INVALID_NETCONF and "NUL" in e.value.msg
    assert not (tmp_path / NET).exists()


# == issue 12: STATUS sees an exhausted range ================================

def test_status_fails_with_50_when_a_range_set_is_exhausted(tmp_path):
    conf = netconf(tmp_path, version="1.1.0",
                   ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.2.0.0/29", "rangeEnd": "10.2.0.3"}]])
    assert call("STATUS", conf) is None
    add(conf, cid="a")
    assert call("STATUS", conf) is None
    add(conf, cid="b")                          # takes 10.2.0.3, the last of the second set
    with pytest.raises(CNIError) as e:
        add(conf, cid="c")
    assert e.value.code == errors.NO_ADDRESSES
    with pytest.raises(CNIError) as e:
        call("STATUS", conf)
    assert e.value.code == errors.LIMITED_CONNECTIVITY == 50
    assert "no IP addresses available in range set 1: 10.2.0.1-10.2.0.3" in e.value.msg
    call("DEL", conf, cid="a")
    assert call("STATUS", conf) is None


def test_status_counts_only_addresses_the_ranges_can_hand_out(tmp_path):
    # Two ranges in one set; the first full, the second with room: available.
    conf = netconf(tmp_path, version="1.1.0",
                   ranges=[[{"subnet": "10.1.0.0/30"}, {"subnet": "10.3.0.0/29"}]])
    d = tmp_path / NET
    add(conf, cid="a")                                   # 10.1.0.2, the only one of the first range
    assert call("STATUS", conf) is None
    for i in range(2, 7):                                # fill the second range by hand
        (d / ("10.3.0.%d" % i)).write_bytes(b"x\r\neth0")
    # Files outside every range (an older config's) and odd names do not count.
    (d / "10.9.0.5").write_bytes(b"old\r\neth0")
    (d / "10.3.0.1").write_bytes(b"gateway?\r\neth0")    # the gateway: never handed out anyway
    (d / "fd00::5").write_bytes(b"v6\r\neth0")
    with pytest.raises(CNIError) as e:
        call("STATUS", conf)
    assert e.value.code == 50
    os.unlink(str(d / "10.3.0.4"))
    assert call("STATUS", conf) is None


def test_status_of_a_full_range_with_a_stale_empty_file_is_available(tmp_path):
    conf = v4(tmp_path, version="1.1.0", subnet="10.1.0.0/30")   # one address: 10.1.0.2
    d = tmp_path / NET
    d.mkdir()
    (d / "10.1.0.2").write_bytes(b"")
    with pytest.raises(CNIError) as e:
        call("STATUS", conf)
    assert e.value.code == 50
    _age(d / "10.1.0.2")
    assert call("STATUS", conf) is None             # the next ADD reclaims it
    assert addresses(add(conf)) == ["10.1.0.2/30"]


def test_status_of_a_huge_range_is_instant(tmp_path):
    conf = netconf(tmp_path, version="1.1.0", ranges=[[{"subnet": "fd00::/64"}], [{"subnet": "10.0.0.0/8"}]])
    add(conf)
    t = time.monotonic()
    assert call("STATUS", conf) is None
    assert time.monotonic() - t < 0.5     # walking 10.0.0.0/8 alone would take seconds


# == issue 12: ranges no pod can use =========================================

UNUSABLE = [
    ("fe80::/64", "link-local"),
    ("fe80::/9", "link-local"),                 # overlaps fe80::/10
    ("febf:ffff::/32", "link-local"),
    ("169.254.0.0/16", "link-local"),
    ("169.254.1.0/24", "link-local"),
    ("224.0.0.0/24", "multicast"),
    ("239.1.0.0/16", "multicast"),
    ("ff02::/64", "multicast"),
    ("127.0.0.0/8", "loopback"),
    ("::ffff:10.1.0.0/120", "IPv4-mapped"),
    ("::ffff:0.0.0.0/96", "IPv4-mapped"),
    ("::/0", "link-local"),
    ("0.0.0.0/0", "link-local"),
]


@pytest.mark.parametrize("subnet,why", UNUSABLE, ids=[s for s, _ in UNUSABLE])
def test_add_refuses_ranges_no_pod_can_use(tmp_path, subnet, why):
    for conf in (netconf(tmp_path, subnet=subnet), netconf(tmp_path, ranges=[[{"subnet": subnet}]]),
                 netconf(tmp_path, ranges=[[{"subnet": "10.5.0.0/24"}], [{"subnet": "fd05::/64"}],
                                           [{"subnet": subnet}]])):
        with pytest.raises(CNIError) as e:
            add(conf)
        assert e.value.code == errors.INVALID_NETCONF, e.value
        assert why in e.value.msg, e.value.msg
        with pytest.raises(CNIError) as e:
            call("STATUS", dict(conf, cniVersion="1.1.0"))
        assert e.value.code == errors.INVALID_NETCONF
    assert not (tmp_path / NET).exists()


def test_add_refuses_a_range_whose_start_end_reach_into_an_unusable_block(tmp_path):
    conf = netconf(tmp_path, ranges=[[{"subnet": "169.0.0.0/8", "rangeStart": "169.254.0.1",
                                       "rangeEnd": "169.254.0.9"}]])
    with pytest.raises(CNIError) as e:
        add(conf)
    assert e.value.code == errors.INVALID_NETCONF and "link-local" in e.value.msg
    ok = netconf(tmp_path, ranges=[[{"subnet": "169.0.0.0/8", "rangeEnd": "169.253.255.254"}]])
    assert addresses(add(ok)) == ["169.0.0.2/8"]


def test_del_check_gc_still_work_on_ranges_add_now_refuses(tmp_path):
    # A pod allocated from fe80::/64 by an older version (or the reference) can
    # still be deleted; calico's DEL placeholder range (169.254.1.0/30) works.
    for subnet, ip in (("fe80::/64", "fe80::2"), ("169.254.1.0/30", "169.254.1.2")):
        conf = netconf(tmp_path, version="1.1.0", subnet=subnet)
        d = tmp_path / NET
        d.mkdir(exist_ok=True)
        (d / ip).write_bytes(b"old\r\neth0")
        assert call("CHECK", conf, cid="old") is None
        assert call("DEL", conf, cid="old") is None
        assert not (d / ip).exists()
        (d / ip).write_bytes(b"old\r\neth0")
        call("GC", dict(conf, **{"cni.dev/valid-attachments": []}))
        assert not (d / ip).exists()


def test_ipv4_mapped_addresses_inside_ipv4_ranges_are_fine(tmp_path):
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/24", "rangeStart": "::ffff:10.1.0.10",
                                       "gateway": "::ffff:10.1.0.1"}]])
    assert add(conf)["ips"] == [{"address": "10.1.0.10/24", "gateway": "10.1.0.1"}]


# == issue 12 (defect 4): strings that are not Unicode text ==================

SURROGATE = "\ud800"


def _surrogate_cases():
    base = {"type": "host-local", "subnet": "10.1.0.0/24"}
    return {
        "ipam.type": dict(base, type="host-" + SURROGATE),
        "subnet": dict(base, subnet="10.1.0.0/24" + SURROGATE),
        "ranges.subnet": {"type": "host-local", "ranges": [[{"subnet": SURROGATE}]]},
        "rangeStart": dict(base, rangeStart=SURROGATE),
        "gateway": dict(base, gateway="10.1.0." + SURROGATE),
        "routes.dst": dict(base, routes=[{"dst": SURROGATE + "/8"}]),
        "routes.gw": dict(base, routes=[{"dst": "10.0.0.0/8", "gw": SURROGATE}]),
        "routes.table": dict(base, routes=[{"dst": "10.0.0.0/8", "table": SURROGATE}]),
        "resolvConf": dict(base, resolvConf="/etc/" + SURROGATE),
        "key": dict(base, **{SURROGATE: 1}),
    }


@pytest.mark.parametrize("case", sorted(_surrogate_cases()))
def test_lone_surrogates_are_invalid_config_with_a_printable_message(tmp_path, case):
    ipam = _surrogate_cases()[case]
    ipam["dataDir"] = str(tmp_path)
    conf = {"cniVersion": "1.1.0", "name": NET, "ipam": ipam}
    for command in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
        with pytest.raises(CNIError) as e:
            call_unparsed(command, conf)
        assert e.value.code == errors.INVALID_NETCONF, (command, e.value)
        json.dumps(e.value.to_dict("1.1.0"), ensure_ascii=False).encode()   # printable as is
        assert "\\ud800" in e.value.msg and "not valid Unicode" in e.value.msg
    assert not (tmp_path / NET).exists()


@pytest.mark.parametrize("where", ["dataDir", "runtimeConfig.ips", "args.cni.ips", "runtimeConfig.ipRanges"])
def test_lone_surrogates_elsewhere(tmp_path, default_data_dir, where):
    conf = v4(tmp_path)
    if where == "dataDir":
        conf["ipam"]["dataDir"] = str(tmp_path) + SURROGATE
    elif where == "runtimeConfig.ips":
        conf["runtimeConfig"] = {"ips": ["10.1.0.5" + SURROGATE]}
    elif where == "args.cni.ips":
        conf["args"] = {"cni": {"ips": [SURROGATE]}}
    else:
        conf["runtimeConfig"] = {"ipRanges": [[{"subnet": SURROGATE}]]}
    with pytest.raises(CNIError) as e:
        call_unparsed("ADD", conf)
    assert e.value.code == errors.INVALID_NETCONF, e.value
    assert "\\ud800" in e.value.msg and where.split(".")[-1] in e.value.msg
    json.dumps(e.value.to_dict("1.0.0"), ensure_ascii=False).encode()
    assert os.listdir(str(tmp_path)) == [] and not default_data_dir.exists()


def test_executable_answers_bad_text_with_error_json(plugin, tmp_path):
    for ipam in (dict(subnet="10.1.0.0/24", dataDir=str(tmp_path / "d") + SURROGATE),
                 dict(subnet="10.1.0.0/24", dataDir=str(tmp_path / "d") + "\x00"),
                 dict(subnet="10.1.0.0/24", dataDir=str(tmp_path / "d"), resolvConf="/etc/\x00"),
                 dict(subnet=SURROGATE, dataDir=str(tmp_path / "d")),
                 dict(subnet="10.1.0.0/24", dataDir=str(tmp_path / "d"),
                      routes=[{"dst": "10.0.0.0/8", "scope": SURROGATE}])):
        conf = {"cniVersion": "1.0.0", "name": NET, "ipam": dict(ipam, type="host-local")}
        env = dict(os.environ, **env_for("ADD", path=os.path.dirname(plugin)))
        proc = subprocess.run([plugin], input=json.dumps(conf).encode(), env=env, capture_output=True)
        assert proc.returncode == 1
        assert b"Traceback" not in proc.stderr, proc.stderr.decode()
        out = json.loads(proc.stdout)
        # 7 from host-local's own checks (NUL, surrogates); 6 where the JSON layer
        # refuses the document first (lone surrogates).
        assert out["code"] in (errors.INVALID_NETCONF, errors.DECODING_FAILURE), out
        assert os.listdir(str(tmp_path)) == ["bin"]
