"""The stock Kubernetes 10-flannel.conflist run by podnet's conflist executor
(`podnet cni add|del|check|gc|status`, as a runtime runs it: one process per
plugin, prevResult passed down, a libcni-format cache) on real kernels.

    {"name": "cbr0", "cniVersion": "0.3.1",
     "plugins": [{"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
                 {"type": "portmap", "capabilities": {"portMappings": true}}]}

with subnetFile, dataDir and the IPAM dataDir pointing into the lab's workdir
(flannel passes its netconf's "ipam" section through to host-local, so
{"ipam": {"dataDir": ...}} on the flannel entry keeps host-local out of
/var/lib/cni). Each test builds its own node namespaces on one underlay, and
the executor runs inside the node namespace.

The reference flannel CNI plugin is not packaged by Debian, so it cannot run
here: the flannel step itself is checked against the upstream algorithm in
tests/test_flannel_unit.py, and here our flannel plugin drives either our
delegates (bridge, host-local, portmap) or the reference ones from
/usr/lib/cni, side by side, with the same conflist. (CHECK runs against our
delegates only: the reference bridge 1.1.1 fails its own CHECK here, "Expected
Route {Dst:10.244.0.0/16 GW:<nil>} not found", because the kernel route to
the cluster network has the gateway host-local filled in.)
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_DELEGATES = ("bridge", "host-local", "portmap", "loopback")
SUBNET_ENV = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
              "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
PORTMAP_ARGS = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
TIMEOUT = 30
BRIDGE_MASQ_CHAIN = re.compile(r"^:CNI-[0-9a-f]{24} ", re.M)    # bridge's ipMasq chain

SERVER = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    c, a = s.accept()
    c.sendall(("hello from the pod to %s" % a[0]).encode())
    c.close()
"""

CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(s.recv(100).decode())
except OSError as e:
    print("ERR", type(e).__name__)
"""


class Site:
    """One node running the flannel conflist with one set of plugins."""

    def __init__(self, lab, underlay, role, bin_dir, version="1.0.0"):
        self.lab = lab
        self.role = role
        self.bin_dir = bin_dir
        self.node = lab.node(role, underlay)
        self.dir = os.path.join(lab.workdir, role)
        os.makedirs(self.dir)
        self.subnet_file = os.path.join(self.dir, "subnet.env")
        self.data_dir = os.path.join(self.dir, "flannel")
        self.ipam_dir = os.path.join(self.dir, "ipam")
        self.write_env(SUBNET_ENV)
        self.conflist = {
            "name": "cbr0", "cniVersion": version,
            "plugins": [
                {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True},
                 "subnetFile": self.subnet_file, "dataDir": self.data_dir,
                 "ipam": {"dataDir": self.ipam_dir}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        self.conflist_path = os.path.join(self.dir, "10-flannel.conflist")
        with open(self.conflist_path, "w") as f:
            json.dump(self.conflist, f)
        self.pods = {}

    def write_env(self, text):
        with open(self.subnet_file, "w") as f:
            f.write(text)

    def pod(self, cid):
        self.pods[cid] = self.lab.pod_netns("%s-%s" % (self.role, cid))
        return self.pods[cid]

    def cni(self, action, cid=None, *extra, check=True):
        """`podnet cni ACTION` inside the node; CompletedProcess (stdout: result or error JSON)."""
        argv = [sys.executable, "-m", "cli.main", "cni", action]
        if cid is not None:
            argv += [self.pods[cid].path, "--container-id", cid]
        argv += ["--conflist", self.conflist_path, "--cni-path", self.bin_dir, "--cache-dir", self.dir]
        out = self.node.run(argv + list(extra), check=False, timeout=TIMEOUT,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": ROOT})
        if check:
            assert out.returncode == 0, "%s %s %s: %s %s" % (self.role, action, cid, out.stdout, out.stderr)
        return out

    def add(self, cid, *extra):
        self.pod(cid)
        return json.loads(self.cni("add", cid, *extra).stdout)

    # -- what is there --

    def cache_file(self, cid):
        return os.path.join(self.dir, "results", "cbr0-%s-eth0" % cid)

    def saved_config(self, cid):
        return os.path.join(self.data_dir, cid)

    def allocations(self):
        """{address: container id} from host-local's store."""
        store = os.path.join(self.ipam_dir, "cbr0")
        out = {}
        for name in os.listdir(store) if os.path.isdir(store) else ():
            if re.match(r"^\d+\.\d+\.\d+\.\d+$", name):
                with open(os.path.join(store, name)) as f:
                    out[name] = f.read().split()[0]
        return out

    def veths(self):
        return sorted(n for n in self.node.link_names() if n.startswith("veth"))

    def nat(self):
        return self.node.run(["iptables-save", "-t", "nat"]).stdout

    def pod_state(self, cid):
        """(addresses, mtu, routes) of the pod's eth0, as the kernel has them."""
        pod = self.pods[cid]
        [link] = pod.ip_json("addr", "show", "eth0")
        addrs = sorted("%s/%d" % (a["local"], a["prefixlen"]) for a in link["addr_info"]
                       if a["family"] == "inet")
        routes = sorted((r["dst"], r.get("gateway", "")) for r in pod.ip_json("route", "show"))
        return addrs, link["mtu"], routes

    def bridge_state(self):
        [link] = self.node.ip_json("addr", "show", "cni0")
        return (sorted("%s/%d" % (a["local"], a["prefixlen"]) for a in link["addr_info"]
                       if a["family"] == "inet"), link["mtu"])


def normalise(result):
    """A result without what differs on every run: MACs, veth names, netns paths."""
    out = json.loads(json.dumps(result))
    for iface in out.get("interfaces", []):
        iface["mac"] = "<mac>" if iface.get("mac") else None
        if iface["name"].startswith("veth"):
            iface["name"] = "<veth>"
        if "sandbox" in iface:
            iface["sandbox"] = "<netns>"
    return out


@pytest.fixture(scope="module")
def bins(cni_bin, ref_bin, tmp_path_factory):
    """(ours, reference delegates): our flannel in both; in the second, symlinks
    to the reference bridge, host-local, portmap and loopback."""
    ref = str(tmp_path_factory.mktemp("ref-delegates"))
    os.symlink(os.path.join(cni_bin, "flannel"), os.path.join(ref, "flannel"))
    for name in REF_DELEGATES:
        os.symlink(os.path.join(ref_bin, name), os.path.join(ref, name))
    return {"ours": cni_bin, "reference": ref}


@pytest.fixture
def net(lab):
    return lab.underlay()


def assert_clean(site, cid):
    """Nothing of `cid` left: pod interface, veth, allocation, saved config, cache, DNAT chain."""
    assert "eth0" not in site.pods[cid].link_names()
    assert site.veths() == []
    assert cid not in site.allocations().values()
    assert not os.path.exists(site.saved_config(cid))
    assert not os.path.exists(site.cache_file(cid))
    assert "CNI-DN-" not in site.nat()


# ---- the stock conflist -------------------------------------------------------------

@pytest.mark.parametrize("version", ["0.3.1", "1.0.0"])
def test_stock_flannel_conflist(lab, net, bins, version):
    site = Site(lab, net, "node1", bins["ours"], version)
    result = site.add("pod1", "--cap-args", json.dumps(PORTMAP_ARGS))
    assert result["cniVersion"] == version

    addrs, mtu, routes = site.pod_state("pod1")
    [addr] = addrs
    assert re.match(r"^10\.244\.1\.\d+/24$", addr) and addr != "10.244.1.1/24"
    assert mtu == 1450
    assert ("10.244.0.0/16", "10.244.1.1") in routes and ("default", "10.244.1.1") in routes
    assert site.bridge_state() == (["10.244.1.1/24"], 1450)
    assert not BRIDGE_MASQ_CHAIN.search(site.nat())      # ipMasq false: flanneld masquerades
    assert "--to-destination %s:80" % addr.split("/")[0] in site.nat()

    with open(site.saved_config("pod1")) as f:
        saved = json.load(f)
    assert saved["type"] == "bridge" and saved["ipMasq"] is False and saved["mtu"] == 1450
    assert saved["ipam"]["dataDir"] == site.ipam_dir and saved["cniVersion"] == version
    with open(site.cache_file("pod1")) as f:
        cache = json.load(f)
    assert cache["kind"] == "cniCacheV1" and cache["containerId"] == "pod1"
    assert cache["networkName"] == "cbr0" and cache["ifName"] == "eth0"
    assert cache["capabilityArgs"] == PORTMAP_ARGS and cache["result"] == result

    check = site.cni("check", "pod1", check=False)
    if version == "0.3.1":
        assert check.returncode == 1 and json.loads(check.stdout)["code"] == 1   # no CHECK before 0.4.0
    else:
        assert check.returncode == 0, check.stdout

    site.cni("del", "pod1", "--cap-args", json.dumps(PORTMAP_ARGS))
    assert_clean(site, "pod1")
    site.cni("del", "pod1", "--cap-args", json.dumps(PORTMAP_ARGS))    # a repeated DEL is fine


@pytest.mark.parametrize("version", ["0.3.1", "1.0.0"])
def test_same_as_with_the_reference_delegates(lab, net, bins, version):
    sites = {impl: Site(lab, net, impl[:3], bins[impl], version) for impl in ("ours", "reference")}
    results = {impl: s.add("p", "--cap-args", json.dumps(PORTMAP_ARGS)) for impl, s in sites.items()}
    assert normalise(results["ours"]) == normalise(results["reference"])
    ours, ref = sites["ours"], sites["reference"]
    assert ours.pod_state("p") == ref.pod_state("p")
    assert ours.bridge_state() == ref.bridge_state()
    with open(ours.saved_config("p")) as f, open(ref.saved_config("p")) as g:
        a, b = json.load(f), json.load(g)
    a["ipam"].pop("dataDir"), b["ipam"].pop("dataDir")
    assert a == b
    for s in sites.values():
        assert not BRIDGE_MASQ_CHAIN.search(s.nat())
        s.cni("del", "p", "--cap-args", json.dumps(PORTMAP_ARGS))
        assert_clean(s, "p")


# ---- port mappings through the executor ------------------------------------------------

@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_port_mapping_reaches_portmap_and_del_removes_it(lab, net, bins, impl):
    site = Site(lab, net, "node1", bins[impl])
    outside = lab.node("outside", net)
    result = site.add("web", "--cap-args", json.dumps(PORTMAP_ARGS))
    pod_ip = result["ips"][0]["address"].split("/")[0]
    server = site.pods["web"].popen([sys.executable, "-c", textwrap.dedent(SERVER), "80"],
                                    stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"

    def knock():
        return outside.run([sys.executable, "-c", textwrap.dedent(CLIENT), site.node.underlay_ip, "8080"],
                           timeout=TIMEOUT).stdout.strip()

    # The pod answers on nodeIP:8080 and sees the outside host itself (no masquerade).
    assert knock() == "hello from the pod to %s" % outside.underlay_ip
    assert "--to-destination %s:80" % pod_ip in site.nat()

    site.cni("del", "web", "--cap-args", json.dumps(PORTMAP_ARGS))     # portmap first, with prevResult
    assert_clean(site, "web")
    assert knock() == "ERR ConnectionRefusedError"


# ---- subnet.env missing or broken ------------------------------------------------------

def test_del_works_after_subnet_env_is_gone(lab, net, bins):
    site = Site(lab, net, "node1", bins["ours"])
    site.add("pod1", "--cap-args", json.dumps(PORTMAP_ARGS))
    os.unlink(site.subnet_file)
    site.cni("del", "pod1")         # no --cap-args: the cached ones reach portmap
    assert_clean(site, "pod1")


@pytest.mark.parametrize("env_text,code", [
    (None, 11),
    ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=lots\nFLANNEL_IPMASQ=true\n", 7),
    ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", 7),
], ids=["missing", "bad-mtu", "no-subnet"])
def test_add_without_a_usable_subnet_env_leaves_nothing(lab, net, bins, env_text, code):
    site = Site(lab, net, "node1", bins["ours"])
    if env_text is None:
        os.unlink(site.subnet_file)
    else:
        site.write_env(env_text)
    site.pod("pod1")
    out = site.cni("add", "pod1", "--cap-args", json.dumps(PORTMAP_ARGS), check=False)
    err = json.loads(out.stdout)
    assert out.returncode == 1 and err["code"] == code and site.subnet_file in err["msg"]
    assert site.pods["pod1"].link_names() == {"lo"}
    assert site.node.link_names() == {"lo", "eth0"}     # not even cni0
    assert not os.path.exists(site.data_dir) and not os.path.exists(site.ipam_dir)
    assert not os.path.exists(site.cache_file("pod1"))
    assert "CNI-" not in site.nat()


@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_failed_delegate_add_leaves_nothing(lab, net, bins, impl):
    """A /30 lease has one pod address: the second pod's IPAM fails. The reference
    bridge leaves its veth behind then; flannel's DEL after the failed ADD removes it."""
    site = Site(lab, net, "node1", bins[impl])
    site.write_env(SUBNET_ENV.replace("10.244.1.1/24", "10.244.1.1/30"))
    site.add("first")
    site.pod("second")
    out = site.cni("add", "second", check=False)
    assert out.returncode == 1 and "failed to delegate add" in json.loads(out.stdout)["msg"]
    assert site.pods["second"].link_names() == {"lo"}
    assert len(site.veths()) == 1
    assert list(site.allocations().values()) == ["first"]
    assert os.listdir(site.data_dir) == ["first"]
    assert not os.path.exists(site.cache_file("second"))


# ---- GC and STATUS (spec 1.1.0: our delegates; the reference 1.1.1 predates it) ----------

def test_gc_and_status(lab, net, bins):
    site = Site(lab, net, "node1", bins["ours"], version="1.1.0")
    for cid in ("keep", "stale", "lost"):
        site.add(cid)
    os.unlink(site.cache_file("lost"))      # a runtime that lost its cache: plugin GC must do it
    assert len(site.allocations()) == 3

    site.cni("gc", None, "--valid", "keep/eth0")
    assert list(site.allocations().values()) == ["keep"]
    assert os.listdir(site.data_dir) == ["keep"]
    assert os.listdir(os.path.join(site.dir, "results")) == ["cbr0-keep-eth0"]
    # "stale" was DELeted through its cache entry (veth and all); "lost" only GCed
    assert "eth0" not in site.pods["stale"].link_names()
    assert "eth0" in site.pods["lost"].link_names() and "eth0" in site.pods["keep"].link_names()
    assert site.cni("check", "keep").returncode == 0

    assert site.cni("status").returncode == 0
    os.unlink(site.subnet_file)
    out = site.cni("status", check=False)
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 50


# ---- a delegate that rejects its config (issue 12) ---------------------------------------

@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_delegate_rejecting_its_config_leaves_a_pod_that_can_be_deleted(lab, net, bins, impl):
    """host-local refuses the flannel entry's ipam.routes on ADD and on DEL alike: the
    failed ADD keeps no saved delegate config (its DEL fails as its ADD did), so the
    runtime's DEL, and every DEL after it, succeeds."""
    site = Site(lab, net, "node1", bins[impl])
    site.conflist["plugins"][0]["ipam"]["routes"] = [{"dst": "not-a-cidr"}]
    with open(site.conflist_path, "w") as f:
        json.dump(site.conflist, f)
    site.pod("p")
    out = site.cni("add", "p", check=False)
    err = json.loads(out.stdout)
    assert out.returncode == 1 and "failed to delegate add" in err["msg"], err
    if impl == "ours":
        assert err["code"] == 7
    assert not os.path.exists(site.saved_config("p"))
    for _ in range(2):
        site.cni("del", "p")
    assert_clean(site, "p")


def test_status_reports_an_exhausted_lease(lab, net, bins):
    """issue 12: a /30 lease holds one pod; with it taken, ADD fails with 100 and
    STATUS (flannel -> bridge -> host-local) says 50 instead of success."""
    site = Site(lab, net, "node1", bins["ours"], version="1.1.0")
    site.write_env(SUBNET_ENV.replace("10.244.1.1/24", "10.244.1.1/30"))
    assert site.cni("status").returncode == 0
    site.add("only")
    out = site.cni("status", check=False)
    err = json.loads(out.stdout)
    assert out.returncode == 1 and err["code"] == 50 and "no IP addresses available" in err["msg"], err
    site.pod("more")
    assert json.loads(site.cni("add", "more", check=False).stdout)["code"] == 100
    site.cni("del", "only")
    assert site.cni("status").returncode == 0
