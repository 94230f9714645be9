"""The flannel plugin's own logic and the conflist executor, no root needed.

- parse_subnet_env / load_subnet_env: what flanneld writes, and what it must
  not (each bad file is refused with the right code and a message naming it).
- delegate_config against the upstream flannel CNI plugin's algorithm
  (flannel-io/cni-plugin, flannel.go + flannel_linux.go). `upstream_delegate`
  below restates that algorithm from its description, independently of our
  code, and the matrix test compares the two; a few literal configs pin the
  common cases down in plain sight.
- The flannel commands (ADD/DEL/CHECK/GC/STATUS) with a fake delegate.
- cni.conflist: load validation, plugin_config injection, and add/delete/
  check/gc/status with fake plugins.

The fake plugins are shell scripts in tmp_path that record their stdin and
CNI_* environment and print a canned result or error, standing in for bridge,
portmap and the like (a plugin that is not one of podnet's executables is run
as a process, never in-process).
"""
import base64
import os
import stat
import subprocess

import pytest

from cni import conflist, errors, skel
from cni.errors import CNIError
from cni.fastjson import dumps, loads
from cni.plugins import flannel
from cni.plugins.flannel import delegate_config, load_subnet_env, parse_subnet_env
from cni.types import from_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENV4 = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
ENV6 = ("FLANNEL_IPV6_NETWORK=fd00:244::/56\nFLANNEL_IPV6_SUBNET=fd00:244:0:1::1/64\n"
        "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n")
ENV_DUAL = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
            "FLANNEL_IPV6_NETWORK=fd00:244::/56\nFLANNEL_IPV6_SUBNET=fd00:244:0:1::1/64\n"
            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


def strs(nets):
    return [str(n) for n in nets]


# ---- parse_subnet_env: good files ------------------------------------------------

def test_ipv4_subnet_env():
    env = parse_subnet_env(ENV4)
    assert strs(env.networks) == ["10.244.0.0/16"]
    assert strs(env.subnets) == ["10.244.1.1/24"]      # host bits kept; masked when used
    assert (env.mtu, env.ipmasq) == (1450, True)


def test_ipv6_only_subnet_env():
    env = parse_subnet_env(ENV6)
    assert strs(env.networks) == ["fd00:244::/56"]
    assert strs(env.subnets) == ["fd00:244:0:1::1/64"]
    assert (env.mtu, env.ipmasq) == (1400, False)


def test_dual_stack_subnet_env_lists_ipv4_first():
    env = parse_subnet_env(ENV_DUAL)
    assert strs(env.networks) == ["10.244.0.0/16", "fd00:244::/56"]
    assert strs(env.subnets) == ["10.244.1.1/24", "fd00:244:0:1::1/64"]


def test_comma_separated_networks_deduplicated_like_upstream():
    env = parse_subnet_env("FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16,10.244.7.7/16\n"
                           "FLANNEL_IPV6_NETWORK=fd00:244::/56,fd00:245::/56,fd00:244::/56\n"
                           "FLANNEL_SUBNET=10.245.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    # 10.244.7.7/16 is 10.244.0.0/16 again: upstream compares masked networks.
    assert strs(env.networks) == ["10.244.0.0/16", "10.245.0.0/16", "fd00:244::/56", "fd00:245::/56"]
    assert strs(env.subnets) == ["10.245.3.1/24"]


def test_quotes_comments_blank_lines_and_spaces():
    text = ('# written by flanneld\n\n'
            'FLANNEL_NETWORK="10.244.0.0/16"\n'
            '  FLANNEL_SUBNET = 10.244.1.1/24  \n'
            '   # indented comment\n'
            'FLANNEL_MTU="1450"\n'
            'FLANNEL_IPMASQ=TRUE\n'
            'FLANNEL_SOMETHING_NEW=whatever\n')
    env = parse_subnet_env(text)
    assert strs(env.networks) == ["10.244.0.0/16"] and strs(env.subnets) == ["10.244.1.1/24"]
    assert (env.mtu, env.ipmasq) == (1450, True)


def test_ipmasq_false_and_crlf():
    env = parse_subnet_env(ENV4.replace("true", "False").replace("\n", "\r\n"))
    assert env.ipmasq is False and env.mtu == 1450


def test_load_subnet_env_reads_the_file(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text(ENV_DUAL)
    env = load_subnet_env(str(path))
    assert strs(env.networks) == ["10.244.0.0/16", "fd00:244::/56"]


# ---- subnet.env: bad files ------------------------------------------------------------

BAD_ENVS = [
    # (id, text, code, words the message must contain)
    ("empty", "", 7, ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ", "missing"]),
    ("no-mtu-no-ipmasq", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n", 7,
     ["missing", "FLANNEL_MTU", "FLANNEL_IPMASQ"]),
    ("no-network", "FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", 7,
     ["missing", "FLANNEL_NETWORK"]),
    ("no-subnet", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", 7,
     ["missing", "FLANNEL_SUBNET"]),
    ("network-not-cidr", ENV4.replace("10.244.0.0/16", "10.244.0.0"), 7, ["FLANNEL_NETWORK", "CIDR"]),
    ("second-network-bad", ENV4.replace("10.244.0.0/16", "10.244.0.0/16,10.300.0.0/16"), 7,
     ["FLANNEL_NETWORK", "10.300.0.0/16"]),
    ("subnet-bad-address", ENV4.replace("10.244.1.1/24", "10.244.1.256/24"), 7, ["FLANNEL_SUBNET"]),
    ("subnet-bad-prefix", ENV4.replace("10.244.1.1/24", "10.244.1.1/33"), 7, ["FLANNEL_SUBNET"]),
    ("ipv6-subnet-bad", ENV6.replace("fd00:244:0:1::1/64", "fd00:::1/64"), 7, ["FLANNEL_IPV6_SUBNET"]),
    ("mtu-word", ENV4.replace("1450", "big"), 7, ["FLANNEL_MTU", "big"]),
    ("mtu-zero", ENV4.replace("1450", "0"), 7, ["FLANNEL_MTU"]),
    ("mtu-negative", ENV4.replace("1450", "-1450"), 7, ["FLANNEL_MTU"]),
    ("mtu-too-big", ENV4.replace("1450", "70000"), 7, ["FLANNEL_MTU"]),
    ("mtu-empty", ENV4.replace("1450", ""), 7, ["FLANNEL_MTU"]),
    ("ipmasq-not-bool", ENV4.replace("true", "yes"), 7, ["FLANNEL_IPMASQ", "yes"]),
    ("ipmasq-empty", ENV4.replace("true", ""), 7, ["FLANNEL_IPMASQ"]),
    ("subnet-outside-network", ENV4.replace("10.244.1.1/24", "10.245.1.1/24"), 7, ["10.245.1.1/24", "outside"]),
    ("subnet-wider-than-network", ENV4.replace("10.244.1.1/24", "10.244.1.1/8"), 7, ["outside"]),
    ("subnet-family-without-network", ENV4 + "FLANNEL_IPV6_SUBNET=fd00:244:0:1::1/64\n", 7,
     ["fd00:244:0:1::1/64", "outside"]),
    ("garbage-line", ENV4 + "this is not an assignment\n", 7, ["line 5", "KEY=VALUE"]),
]


@pytest.mark.parametrize("text,code,words", [c[1:] for c in BAD_ENVS], ids=[c[0] for c in BAD_ENVS])
def test_bad_subnet_env(tmp_path, text, code, words):
    path = tmp_path / "subnet.env"
    path.write_text(text)
    with pytest.raises(CNIError) as e:
        load_subnet_env(str(path))
    assert e.value.code == code
    for word in words + [str(path)]:
        assert word in e.value.msg, (word, e.value.msg)


def test_missing_subnet_env_is_try_again_later(tmp_path):
    path = str(tmp_path / "no" / "subnet.env")
    with pytest.raises(CNIError) as e:
        load_subnet_env(path)
    assert e.value.code == errors.TRY_AGAIN_LATER == 11
    assert path in e.value.msg and "flanneld" in e.value.msg


def test_unreadable_subnet_env_is_io_failure(tmp_path):
    with pytest.raises(CNIError) as e:
        load_subnet_env(str(tmp_path))      # a directory
    assert e.value.code == errors.IO_FAILURE


# ---- delegate_config: the upstream algorithm ------------------------------------------

def upstream_delegate(netconf, nws, sn, ip6nws, ip6sn, mtu, ipmasq):
    """The delegate config the upstream flannel CNI plugin builds (our restatement).

    `nws`/`ip6nws` are the masked cluster networks, `sn`/`ip6sn` the masked node
    subnets (Go's net.ParseCIDR returns the network), strings or None.
    """
    d = dict(netconf.get("delegate") or {})
    d["name"] = netconf["name"]
    if "type" not in d:
        d["type"] = "bridge"
    if "ipMasq" not in d:
        d["ipMasq"] = not ipmasq            # flanneld masquerades, or the bridge must
    if "mtu" not in d:
        d["mtu"] = mtu
    if d["type"] == "bridge" and "isGateway" not in d:
        d["isGateway"] = True
    if netconf.get("cniVersion"):
        d["cniVersion"] = netconf["cniVersion"]
    ipam = dict(netconf.get("ipam") or {})
    if "type" not in ipam:
        ipam["type"] = "host-local"
    ipam["ranges"] = [[{"subnet": s}] for s in (sn, ip6sn) if s]
    ipam["routes"] = list(ipam.get("routes") or []) + [{"dst": n} for n in nws + ip6nws]
    d["ipam"] = ipam
    if netconf.get("runtimeConfig") is not None:
        d["runtimeConfig"] = netconf["runtimeConfig"]
    return d


ENV_CASES = {
    "v4": (ENV4, (["10.244.0.0/16"], "10.244.1.0/24", [], None, 1450, True)),
    "v6": (ENV6, ([], None, ["fd00:244::/56"], "fd00:244:0:1::/64", 1400, False)),
    "dual": (ENV_DUAL, (["10.244.0.0/16"], "10.244.1.0/24", ["fd00:244::/56"], "fd00:244:0:1::/64", 1450, True)),
    "multi": ("FLANNEL_NETWORK=10.244.0.0/16,10.96.0.0/12\nFLANNEL_SUBNET=10.244.9.5/24\n"
              "FLANNEL_MTU=8950\nFLANNEL_IPMASQ=false\n",
              (["10.244.0.0/16", "10.96.0.0/12"], "10.244.9.0/24", [], None, 8950, False)),
}

NETCONFS = {
    "stock-k8s": {"name": "cbr0", "cniVersion": "0.3.1", "type": "flannel",
                  "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
    "no-delegate": {"name": "cbr0", "cniVersion": "1.0.0", "type": "flannel"},
    "null-delegate": {"name": "cbr0", "cniVersion": "1.0.0", "type": "flannel", "delegate": None},
    "no-version": {"name": "n", "type": "flannel", "delegate": {"cniVersion": "0.4.0"}},
    "delegate-overrides": {"name": "n", "cniVersion": "1.0.0", "type": "flannel",
                           "delegate": {"ipMasq": True, "mtu": 1300, "isGateway": False,
                                        "bridge": "kube0", "cniVersion": "0.3.0"}},
    "ipvlan": {"name": "n", "cniVersion": "1.0.0", "type": "flannel",
               "delegate": {"type": "ipvlan", "master": "eth0"}},
    "user-ipam": {"name": "n", "cniVersion": "1.0.0", "type": "flannel",
                  "ipam": {"dataDir": "/tmp/x", "routes": [{"dst": "192.168.0.0/16", "gw": "10.244.1.254"}],
                           "ranges": [[{"subnet": "1.2.3.0/24"}]]}},
    "other-ipam": {"name": "n", "cniVersion": "1.0.0", "type": "flannel", "ipam": {"type": "whereabouts"}},
    "runtime-config": {"name": "n", "cniVersion": "1.0.0", "type": "flannel",
                       "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80,
                                                           "protocol": "tcp"}]}},
}


@pytest.mark.parametrize("env_name", ENV_CASES)
@pytest.mark.parametrize("conf_name", NETCONFS)
def test_delegate_config_matches_the_upstream_algorithm(env_name, conf_name):
    text, lease = ENV_CASES[env_name]
    conf = NETCONFS[conf_name]
    before = dumps(conf)
    got = delegate_config(conf, parse_subnet_env(text))
    assert got == upstream_delegate(conf, *lease)
    assert dumps(conf) == before, "delegate_config changed its input"
    loads(dumps(got))   # serialisable as is


def test_stock_kubernetes_delegate_literally():
    got = delegate_config(NETCONFS["stock-k8s"], parse_subnet_env(ENV4))
    assert got == {
        "hairpinMode": True, "isDefaultGateway": True,       # passed through
        "name": "cbr0", "type": "bridge", "cniVersion": "0.3.1",
        "ipMasq": False,                                      # flanneld masquerades
        "mtu": 1450, "isGateway": True,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                 "routes": [{"dst": "10.244.0.0/16"}]},
    }


def test_ipmasq_follows_flanneld_unless_the_delegate_says():
    off = parse_subnet_env(ENV4.replace("true", "false"))
    assert delegate_config({"name": "n"}, off)["ipMasq"] is True
    assert delegate_config({"name": "n", "delegate": {"ipMasq": False}}, off)["ipMasq"] is False
    on = parse_subnet_env(ENV4)
    assert delegate_config({"name": "n", "delegate": {"ipMasq": True}}, on)["ipMasq"] is True


def test_user_ipam_routes_come_first_and_ranges_are_replaced():
    conf = NETCONFS["user-ipam"]
    got = delegate_config(conf, parse_subnet_env(ENV_DUAL))["ipam"]
    assert got == {"type": "host-local", "dataDir": "/tmp/x",
                   "ranges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:244:0:1::/64"}]],
                   "routes": [{"dst": "192.168.0.0/16", "gw": "10.244.1.254"},
                              {"dst": "10.244.0.0/16"}, {"dst": "fd00:244::/56"}]}
    assert conf["ipam"]["routes"] == [{"dst": "192.168.0.0/16", "gw": "10.244.1.254"}]


BAD_NETCONFS = [
    ("delegate-not-object", {"delegate": ["bridge"]}, "delegate must be an object"),
    ("delegate-type-not-string", {"delegate": {"type": 5}}, "(string) 'type'"),
    ("delegate-has-name", {"delegate": {"name": "other"}}, "must not have 'name'"),
    ("delegate-has-ipam", {"delegate": {"ipam": {"type": "static"}}}, "must not have 'ipam'"),
    ("ipam-not-object", {"ipam": "host-local"}, "ipam must be an object"),
    ("ipam-routes-not-list", {"ipam": {"routes": {"dst": "0.0.0.0/0"}}}, "ipam.routes"),
    ("ipam-route-not-object", {"ipam": {"routes": ["0.0.0.0/0"]}}, "ipam.routes"),
]


@pytest.mark.parametrize("extra,words", [c[1:] for c in BAD_NETCONFS], ids=[c[0] for c in BAD_NETCONFS])
def test_bad_netconf_is_invalid_config(extra, words):
    conf = dict({"name": "cbr0", "cniVersion": "1.0.0", "type": "flannel"}, **extra)
    with pytest.raises(CNIError) as e:
        delegate_config(conf, parse_subnet_env(ENV4))
    assert e.value.code == errors.INVALID_NETCONF and words in e.value.msg


# ---- fake plugins ------------------------------------------------------------------------

FAKE = r"""#!/bin/sh
# A stand-in CNI plugin: records stdin and CNI_* and answers as told.
name=${0##*/}
d=$FAKE_CNI_DIR
n=$(ls "$d/log" | wc -l)
f=$(printf '%s/log/%04d-%s-%s' "$d" "$n" "$name" "$CNI_COMMAND")
cat > "$f.stdin"
printf '%s\n' "CNI_COMMAND=$CNI_COMMAND" "CNI_CONTAINERID=$CNI_CONTAINERID" "CNI_NETNS=$CNI_NETNS" \
    "CNI_IFNAME=$CNI_IFNAME" "CNI_ARGS=$CNI_ARGS" "CNI_PATH=$CNI_PATH" > "$f.env"
if [ -e "$d/fail-$name-$CNI_COMMAND" ]; then cat "$d/fail-$name-$CNI_COMMAND"; exit 1; fi
if [ "$CNI_COMMAND" = ADD ]; then cat "$d/result-$name"; fi
exit 0
"""

RESULT_040 = {"cniVersion": "0.4.0",
              "interfaces": [{"name": "cni0", "mac": "0a:58:0a:f4:01:01"},
                             {"name": "eth0", "mac": "0a:58:0a:f4:01:02", "sandbox": "/var/run/netns/p"}],
              "ips": [{"version": "4", "interface": 1, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
              "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}], "dns": {}}


class Fakes:
    def __init__(self, tmp_path, monkeypatch):
        self.dir = str(tmp_path / "fake")
        self.bin = os.path.join(self.dir, "bin")
        os.makedirs(os.path.join(self.dir, "log"))
        os.makedirs(self.bin)
        monkeypatch.setenv("FAKE_CNI_DIR", self.dir)

    def plugin(self, name, result=None):
        path = os.path.join(self.bin, name)
        with open(path, "w") as f:
            f.write(FAKE)
        os.chmod(path, 0o755)
        self.result(name, result or RESULT_040)

    def result(self, name, result):
        with open(os.path.join(self.dir, "result-" + name), "w") as f:
            f.write(dumps(result))

    def fail(self, name, command, code=7, msg="told to fail"):
        with open(os.path.join(self.dir, "fail-%s-%s" % (name, command)), "w") as f:
            f.write(dumps({"cniVersion": "1.0.0", "code": code, "msg": msg}))

    def calls(self):
        """[(plugin, command, stdin dict, env dict)] in call order."""
        log = os.path.join(self.dir, "log")
        out = []
        for name in sorted(n for n in os.listdir(log) if n.endswith(".stdin")):
            _, plugin_cmd = name[:-6].split("-", 1)
            plugin, command = plugin_cmd.rsplit("-", 1)
            with open(os.path.join(log, name), "rb") as f:
                stdin = loads(f.read())
            with open(os.path.join(log, name[:-6] + ".env")) as f:
                env = dict(line.rstrip("\n").split("=", 1) for line in f)
            out.append((plugin, command, stdin, env))
        return out

    def clear(self):
        log = os.path.join(self.dir, "log")
        for name in os.listdir(log):
            os.unlink(os.path.join(log, name))


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    return Fakes(tmp_path, monkeypatch)


# ---- the flannel commands, with a fake delegate ----------------------------------------

class Flannel:
    def __init__(self, tmp_path, fakes):
        self.fakes = fakes
        fakes.plugin("bridge")
        self.subnet_file = str(tmp_path / "subnet.env")
        self.data_dir = str(tmp_path / "flannel")
        self.write_env(ENV4)
        self.conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
                     "subnetFile": self.subnet_file, "dataDir": self.data_dir,
                     "delegate": {"hairpinMode": True, "isDefaultGateway": True},
                     "ipam": {"dataDir": str(tmp_path / "ipam")}}

    def write_env(self, text):
        with open(self.subnet_file, "w") as f:
            f.write(text)

    def saved(self, cid="c1"):
        path = os.path.join(self.data_dir, cid)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return loads(f.read())

    def run(self, command, cid="c1", conf=None, **extra):
        conf = dict(conf or self.conf, **extra)
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/p",
               "CNI_IFNAME": "eth0", "CNI_PATH": self.fakes.bin}
        return skel.call(flannel.COMMANDS, skel.args_from_env(env, dumps(conf).encode()))


@pytest.fixture
def fl(tmp_path, fakes):
    return Flannel(tmp_path, fakes)


def test_add_saves_the_delegate_config_and_runs_it(fl):
    result = fl.run("ADD")
    assert result == from_version(RESULT_040, "0.4.0")
    saved = fl.saved()
    assert saved == upstream_delegate(fl.conf, ["10.244.0.0/16"], "10.244.1.0/24", [], None, 1450, True)
    assert stat.S_IMODE(os.stat(os.path.join(fl.data_dir, "c1")).st_mode) == 0o600
    [(plugin, command, stdin, env)] = fl.fakes.calls()
    assert (plugin, command, stdin) == ("bridge", "ADD", saved)
    assert env["CNI_CONTAINERID"] == "c1" and env["CNI_IFNAME"] == "eth0" and env["CNI_PATH"] == fl.fakes.bin


def test_del_uses_the_saved_config_after_subnet_env_is_gone(fl):
    fl.run("ADD")
    saved = fl.saved()
    os.unlink(fl.subnet_file)
    fl.fakes.clear()
    assert fl.run("DEL") is None
    assert [(c[0], c[1], c[2]) for c in fl.fakes.calls()] == [("bridge", "DEL", saved)]
    assert fl.saved() is None


def test_del_without_saved_config_is_a_no_op(fl):
    assert fl.run("DEL", cid="never-added") is None
    assert fl.fakes.calls() == []


def test_failed_delegate_del_keeps_the_saved_config_for_a_retry(fl):
    fl.run("ADD")
    fl.fakes.fail("bridge", "DEL", code=101, msg="netlink said no")
    with pytest.raises(CNIError) as e:
        fl.run("DEL")
    assert e.value.code == 101 and fl.saved() is not None
    os.unlink(os.path.join(fl.fakes.dir, "fail-bridge-DEL"))
    fl.run("DEL")
    assert fl.saved() is None


def test_failed_delegate_add_is_undone(fl):
    fl.fakes.fail("bridge", "ADD", code=100, msg="no addresses")
    with pytest.raises(CNIError) as e:
        fl.run("ADD")
    assert e.value.code == 100 and "failed to delegate add" in e.value.msg
    calls = fl.fakes.calls()
    assert [(c[0], c[1]) for c in calls] == [("bridge", "ADD"), ("bridge", "DEL")]
    assert calls[0][2] == calls[1][2]           # DEL with the very config ADD got
    assert fl.saved() is None


def test_failed_delegate_add_whose_del_fails_keeps_the_config(fl):
    fl.fakes.fail("bridge", "ADD", code=100)
    fl.fakes.fail("bridge", "DEL", code=101)
    with pytest.raises(CNIError) as e:
        fl.run("ADD")
    assert e.value.code == 100
    assert fl.saved() is not None       # the runtime's DEL will use it


@pytest.mark.parametrize("text,code,words", [c[1:] for c in BAD_ENVS[:1] + BAD_ENVS[4:5] + BAD_ENVS[9:10]
                                             + BAD_ENVS[14:15] + BAD_ENVS[16:17] + BAD_ENVS[-1:]],
                         ids=["empty", "bad-cidr", "bad-mtu", "ipmasq", "outside", "garbage"])
def test_add_with_bad_subnet_env_touches_nothing(fl, text, code, words):
    fl.write_env(text)
    with pytest.raises(CNIError) as e:
        fl.run("ADD")
    assert e.value.code == code and fl.subnet_file in e.value.msg
    assert fl.fakes.calls() == [] and not os.path.exists(fl.data_dir)


def test_add_without_subnet_env_is_11_and_touches_nothing(fl):
    os.unlink(fl.subnet_file)
    with pytest.raises(CNIError) as e:
        fl.run("ADD")
    assert e.value.code == 11
    assert fl.fakes.calls() == [] and not os.path.exists(fl.data_dir)


def test_add_with_bad_delegate_touches_nothing(fl):
    with pytest.raises(CNIError) as e:
        fl.run("ADD", delegate={"name": "x"})
    assert e.value.code == 7
    assert fl.fakes.calls() == [] and not os.path.exists(fl.data_dir)


def test_check_sends_the_saved_config_with_prev_result(fl):
    fl.run("ADD")
    saved = fl.saved()
    fl.fakes.clear()
    prev = dict(RESULT_040, cniVersion="1.0.0")
    del prev["ips"][0]["version"]
    fl.run("CHECK", prevResult=prev)
    [(plugin, command, stdin, _)] = fl.fakes.calls()
    assert (plugin, command) == ("bridge", "CHECK")
    assert stdin == dict(saved, prevResult=prev)


def test_check_without_saved_config_fails(fl):
    with pytest.raises(CNIError) as e:
        fl.run("CHECK", cid="never-added")
    assert e.value.code == 7 and "never-added" in e.value.msg


def test_gc_drops_saved_configs_of_invalid_attachments_and_delegates(fl):
    conf = dict(fl.conf, cniVersion="1.1.0")
    for cid in ("keep", "drop1", "drop2"):
        fl.run("ADD", cid=cid, conf=conf)
    fl.fakes.clear()
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    fl.run("GC", conf=conf, **{"cni.dev/valid-attachments": valid})
    assert sorted(os.listdir(fl.data_dir)) == ["keep"]
    [(plugin, command, stdin, _)] = fl.fakes.calls()
    assert (plugin, command) == ("bridge", "GC")
    assert stdin["cni.dev/valid-attachments"] == valid
    assert stdin["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}]]


def test_gc_skips_what_it_cannot_remove_and_collects_the_rest(fl):
    # A directory in dataDir (not ours) used to stop GC with a traceback (IsADirectoryError).
    conf = dict(fl.conf, cniVersion="1.1.0")
    fl.run("ADD", cid="drop", conf=conf)
    os.mkdir(os.path.join(fl.data_dir, "somebodys-dir"))
    fl.fakes.clear()
    fl.run("GC", conf=conf, **{"cni.dev/valid-attachments": []})
    assert os.listdir(fl.data_dir) == ["somebodys-dir"]
    assert [(p, c) for p, c, _, _ in fl.fakes.calls()] == [("bridge", "GC")]


def test_gc_without_subnet_env_still_drops_stale_configs(fl):
    conf = dict(fl.conf, cniVersion="1.1.0")
    fl.run("ADD", cid="old", conf=conf)
    os.unlink(fl.subnet_file)
    fl.fakes.clear()
    fl.run("GC", conf=conf, **{"cni.dev/valid-attachments": []})
    assert os.listdir(fl.data_dir) == [] and fl.fakes.calls() == []


def test_flannel_status(fl):
    conf = dict(fl.conf, cniVersion="1.1.0")
    assert fl.run("STATUS", conf=conf) is None
    assert [(c[0], c[1]) for c in fl.fakes.calls()] == [("bridge", "STATUS")]
    os.unlink(fl.subnet_file)
    with pytest.raises(CNIError) as e:
        fl.run("STATUS", conf=conf)
    assert e.value.code == errors.LIMITED_CONNECTIVITY == 50 and "flannel is not ready" in e.value.msg


def test_the_plugin_module_imports_nothing_heavy():
    code = ("import sys; sys.path.insert(0, %r); before = set(sys.modules); "
            "import cni.plugins.flannel; "
            "heavy = {'json', 're', 'subprocess', 'ipaddress', 'socket', 'enum', 'argparse', 'hashlib'}; "
            "print(sorted(heavy & (set(sys.modules) - before)))" % ROOT)
    out = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- conflist.load -------------------------------------------------------------------------

LIST = {"cniVersion": "1.0.0", "name": "cbr0",
        "plugins": [{"type": "one", "x": 1}, {"type": "two", "capabilities": {"portMappings": True}}]}


def test_load_from_dict_bytes_and_file(tmp_path):
    data = dumps(LIST).encode()
    path = tmp_path / "10-x.conflist"
    path.write_bytes(data)
    for source in (LIST, data, str(path)):
        cl = conflist.load(source)
        assert (cl.name, cl.version, cl.plugins) == ("cbr0", "1.0.0", LIST["plugins"])
        assert not cl.disable_check and not cl.disable_gc
    assert conflist.load(str(path)).bytes == data      # cached verbatim, as libcni


def test_single_conf_is_wrapped():
    single = {"cniVersion": "0.4.0", "name": "solo", "type": "bridge", "bridge": "br9"}
    cl = conflist.load(single)
    assert (cl.name, cl.version, cl.plugins) == ("solo", "0.4.0", [single])


def test_disable_flags():
    cl = conflist.load(dict(LIST, disableCheck=True, disableGC=True))
    assert cl.disable_check and cl.disable_gc


BAD_LISTS = [
    ("no-name", {"cniVersion": "1.0.0", "plugins": [{"type": "a"}]}, 7, "no name"),
    ("empty-name", dict(LIST, name=""), 7, "no name"),
    ("name-not-string", dict(LIST, name=5), 7, "no name"),
    ("no-version", {"name": "n", "plugins": [{"type": "a"}]}, 7, "no cniVersion"),
    ("unknown-version", dict(LIST, cniVersion="9.9.9"), 1, "9.9.9"),
    ("bad-version", dict(LIST, cniVersion="one"), 1, "one"),
    ("no-plugins", {"cniVersion": "1.0.0", "name": "n"}, 7, "no plugins"),
    ("empty-plugins", dict(LIST, plugins=[]), 7, "no plugins"),
    ("plugins-not-list", dict(LIST, plugins={"type": "a"}), 7, "no plugins"),
    ("plugin-without-type", dict(LIST, plugins=[{"type": "a"}, {"x": 1}]), 7, "plugin 1"),
    ("plugin-empty-type", dict(LIST, plugins=[{"type": ""}]), 7, "plugin 0"),
    ("plugin-not-object", dict(LIST, plugins=["bridge"]), 7, "plugin 0"),
    ("single-without-name", {"cniVersion": "1.0.0", "type": "bridge"}, 7, "no name"),
]


@pytest.mark.parametrize("raw,code,words", [c[1:] for c in BAD_LISTS], ids=[c[0] for c in BAD_LISTS])
def test_bad_conflist(raw, code, words):
    with pytest.raises(CNIError) as e:
        conflist.load(raw)
    assert e.value.code == code and words in e.value.msg


@pytest.mark.parametrize("data,code", [(b"{not json", 6), (b"[1, 2]", 6), (b"", 6)])
def test_undecodable_conflist(data, code):
    with pytest.raises(CNIError) as e:
        conflist.load(data)
    assert e.value.code == code


def test_unreadable_conflist(tmp_path):
    with pytest.raises(CNIError) as e:
        conflist.load(str(tmp_path / "missing.conflist"))
    assert e.value.code == errors.IO_FAILURE and "missing.conflist" in e.value.msg


# ---- conflist.plugin_config ------------------------------------------------------------------

def rt_with(**caps):
    return conflist.RuntimeConf("c1", "/var/run/netns/p", capability_args=caps)


def test_name_and_version_injected_over_the_plugins_own():
    cl = conflist.load(LIST)
    conf = loads(conflist.plugin_config(cl, {"type": "one", "name": "other", "cniVersion": "0.3.0"}, None))
    assert conf == {"type": "one", "name": "cbr0", "cniVersion": "1.0.0"}


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_prev_result_in_the_list_version(version):
    cl = conflist.load(dict(LIST, cniVersion=version))
    prev = from_version(RESULT_040, "0.4.0")
    conf = loads(conflist.plugin_config(cl, LIST["plugins"][1], None, prev))
    pr = conf["prevResult"]
    assert pr["cniVersion"] == version
    assert pr["ips"][0]["address"] == "10.244.1.2/24"
    assert ("version" in pr["ips"][0]) == (version < "1.0.0")
    assert pr["interfaces"] == RESULT_040["interfaces"] and pr["routes"] == RESULT_040["routes"]


def test_runtime_config_only_for_declared_capabilities():
    cl = conflist.load(LIST)
    pm = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    rt = rt_with(portMappings=pm, bandwidth={"ingressRate": 1}, ips=["10.244.1.9/24"])
    plugin = {"type": "two", "capabilities": {"portMappings": True, "bandwidth": False}}
    conf = loads(conflist.plugin_config(cl, plugin, rt))
    assert conf["runtimeConfig"] == {"portMappings": pm}
    assert plugin == {"type": "two", "capabilities": {"portMappings": True, "bandwidth": False}}
    # no capabilities declared, or none of them given, or no runtime conf: no runtimeConfig
    assert "runtimeConfig" not in loads(conflist.plugin_config(cl, {"type": "one"}, rt))
    assert "runtimeConfig" not in loads(conflist.plugin_config(cl, plugin, rt_with(ips=["1.2.3.4/32"])))
    assert "runtimeConfig" not in loads(conflist.plugin_config(cl, plugin, None))


def test_extra_keys_merged():
    cl = conflist.load(dict(LIST, cniVersion="1.1.0"))
    extra = {"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}
    conf = loads(conflist.plugin_config(cl, {"type": "one"}, None, None, extra))
    assert conf["cni.dev/valid-attachments"] == extra["cni.dev/valid-attachments"]


# ---- conflist execution with fake plugins ------------------------------------------------------

RESULT_TWO = {"cniVersion": "1.0.0", "interfaces": RESULT_040["interfaces"],
              "ips": [{"interface": 1, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
              "routes": RESULT_040["routes"], "dns": {}}


@pytest.fixture
def chain(tmp_path, fakes):
    fakes.plugin("one", RESULT_040)       # answers in an older version than the list's
    fakes.plugin("two", RESULT_TWO)
    cache = str(tmp_path / "cache")
    pm = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    rt = conflist.RuntimeConf("c1", "/var/run/netns/p", "eth0", [("K8S_POD_NAME", "web")],
                              {"portMappings": pm, "ips": ["10.244.1.2/24"]}, cache)
    return fakes, rt, cache


def test_add_runs_in_order_with_prev_result_and_caches(chain):
    fakes, rt, cache = chain
    cl = conflist.load(dict(LIST))
    result = conflist.add(cl, rt, [fakes.bin])
    assert result == from_version(RESULT_TWO, "1.0.0")
    (p1, c1, in1, env1), (p2, c2, in2, env2) = fakes.calls()
    assert (p1, c1, p2, c2) == ("one", "ADD", "two", "ADD")
    assert in1 == {"type": "one", "x": 1, "name": "cbr0", "cniVersion": "1.0.0"}
    expected_prev = dict(RESULT_040, cniVersion="1.0.0", ips=[{"interface": 1, "address": "10.244.1.2/24",
                                                               "gateway": "10.244.1.1"}])
    assert in2["prevResult"] == expected_prev
    assert in2["runtimeConfig"] == {"portMappings": rt.capability_args["portMappings"]}
    assert env1 == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/p",
                    "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAME=web", "CNI_PATH": fakes.bin}
    path = os.path.join(cache, "results", "cbr0-c1-eth0")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        entry = loads(f.read())
    assert entry == {"kind": "cniCacheV1", "containerId": "c1", "config": base64.b64encode(cl.bytes).decode(),
                     "ifName": "eth0", "networkName": "cbr0", "netns": "/var/run/netns/p",
                     "cniArgs": [["K8S_POD_NAME", "web"]], "capabilityArgs": rt.capability_args,
                     "result": RESULT_TWO}
    assert conflist.cached_result(cl, rt) == result


def test_failed_add_is_reported_and_not_cached(chain):
    fakes, rt, cache = chain
    fakes.fail("two", "ADD", code=103, msg="port taken")
    with pytest.raises(CNIError) as e:
        conflist.add(conflist.load(LIST), rt, [fakes.bin])
    assert (e.value.code, e.value.msg) == (103, "port taken")
    assert not os.path.exists(os.path.join(cache, "results", "cbr0-c1-eth0"))


def test_missing_plugin(chain):
    fakes, rt, _ = chain
    with pytest.raises(CNIError) as e:
        conflist.add(conflist.load(dict(LIST, plugins=[{"type": "nope"}])), rt, [fakes.bin])
    assert e.value.code == errors.PLUGIN_NOT_FOUND and "nope" in e.value.msg


def test_delete_runs_in_reverse_with_the_cached_result(chain):
    fakes, rt, cache = chain
    cl = conflist.load(LIST)
    conflist.add(cl, rt, [fakes.bin])
    fakes.clear()
    conflist.delete(cl, rt, [fakes.bin])
    (p1, c1, in1, _), (p2, c2, in2, _) = fakes.calls()
    assert (p1, c1, p2, c2) == ("two", "DEL", "one", "DEL")
    assert in1["prevResult"] == in2["prevResult"] == RESULT_TWO
    assert in1["runtimeConfig"] == {"portMappings": rt.capability_args["portMappings"]}
    assert not os.path.exists(os.path.join(cache, "results", "cbr0-c1-eth0"))


def test_delete_before_0_4_0_has_no_prev_result(chain):
    fakes, rt, cache = chain
    cl = conflist.load(dict(LIST, cniVersion="0.3.1"))
    conflist.add(cl, rt, [fakes.bin])
    fakes.clear()
    conflist.delete(cl, rt, [fakes.bin])
    assert [c[1] for c in fakes.calls()] == ["DEL", "DEL"]
    assert all("prevResult" not in c[2] for c in fakes.calls())
    assert os.listdir(os.path.join(cache, "results")) == []


def test_delete_with_a_corrupt_cache_entry_still_deletes(chain):
    fakes, rt, cache = chain
    cl = conflist.load(LIST)
    os.makedirs(os.path.join(cache, "results"))
    with open(os.path.join(cache, "results", "cbr0-c1-eth0"), "w") as f:
        f.write("{half a file")
    conflist.delete(cl, rt, [fakes.bin])
    assert [(c[0], "prevResult" in c[2]) for c in fakes.calls()] == [("two", False), ("one", False)]
    assert os.listdir(os.path.join(cache, "results")) == []


def test_failed_delete_keeps_the_cache(chain):
    fakes, rt, cache = chain
    cl = conflist.load(LIST)
    conflist.add(cl, rt, [fakes.bin])
    fakes.fail("one", "DEL", code=101)
    with pytest.raises(CNIError):
        conflist.delete(cl, rt, [fakes.bin])
    assert os.path.exists(os.path.join(cache, "results", "cbr0-c1-eth0"))


def test_check(chain):
    fakes, rt, _ = chain
    cl = conflist.load(LIST)
    with pytest.raises(CNIError) as e:
        conflist.check(cl, rt, [fakes.bin])
    assert e.value.code == 7 and "no cached result" in e.value.msg
    conflist.add(cl, rt, [fakes.bin])
    fakes.clear()
    conflist.check(cl, rt, [fakes.bin])
    assert [(c[0], c[1], c[2]["prevResult"]) for c in fakes.calls()] == [
        ("one", "CHECK", RESULT_TWO), ("two", "CHECK", RESULT_TWO)]
    fakes.clear()
    conflist.check(conflist.load(dict(LIST, disableCheck=True)), rt, [fakes.bin])
    assert fakes.calls() == []
    with pytest.raises(CNIError) as e:
        conflist.check(conflist.load(dict(LIST, cniVersion="0.3.1")), rt, [fakes.bin])
    assert e.value.code == errors.INCOMPATIBLE_VERSION


def test_gc_deletes_stale_cached_attachments_then_sends_gc(chain):
    fakes, rt, cache = chain
    cl = conflist.load(dict(LIST, cniVersion="1.1.0"))
    conflist.add(cl, rt, [fakes.bin])
    keep = conflist.RuntimeConf("c2", "/var/run/netns/q", "eth0", cache_dir=cache)
    conflist.add(cl, keep, [fakes.bin])
    other = conflist.load(dict(LIST, name="othernet", cniVersion="1.1.0"))
    conflist.add(other, conflist.RuntimeConf("c3", "/var/run/netns/r", "eth0", cache_dir=cache), [fakes.bin])
    fakes.clear()
    conflist.gc(cl, [("c2", "eth0")], [fakes.bin], cache)
    calls = fakes.calls()
    assert [(c[0], c[1], c[3]["CNI_CONTAINERID"]) for c in calls] == [
        ("two", "DEL", "c1"), ("one", "DEL", "c1"), ("one", "GC", ""), ("two", "GC", "")]
    # the stale attachment's DEL gets what its ADD was given (netns, args, capabilities)
    assert calls[0][3]["CNI_NETNS"] == "/var/run/netns/p" and calls[0][3]["CNI_ARGS"] == "K8S_POD_NAME=web"
    assert calls[0][2]["runtimeConfig"] == {"portMappings": rt.capability_args["portMappings"]}
    assert calls[2][2]["cni.dev/valid-attachments"] == [{"containerID": "c2", "ifname": "eth0"}]
    assert sorted(os.listdir(os.path.join(cache, "results"))) == ["cbr0-c2-eth0", "othernet-c3-eth0"]


def test_gc_before_1_1_0_only_deletes_stale_attachments(chain):
    fakes, rt, cache = chain
    cl = conflist.load(LIST)
    conflist.add(cl, rt, [fakes.bin])
    fakes.clear()
    conflist.gc(cl, [], [fakes.bin], cache)
    assert [c[1] for c in fakes.calls()] == ["DEL", "DEL"]
    fakes.clear()
    conflist.gc(cl, [], [fakes.bin])                # no cache, old version: nothing to do
    assert fakes.calls() == []


def test_gc_keeps_going_and_reports_the_first_failure(chain):
    fakes, rt, cache = chain
    cl = conflist.load(dict(LIST, cniVersion="1.1.0"))
    fakes.fail("one", "GC", code=5, msg="disk on fire")
    with pytest.raises(CNIError) as e:
        conflist.gc(cl, [], [fakes.bin], cache)
    assert (e.value.code, e.value.msg) == (5, "disk on fire")
    assert [(c[0], c[1]) for c in fakes.calls()] == [("one", "GC"), ("two", "GC")]
    fakes.clear()
    conflist.gc(conflist.load(dict(LIST, cniVersion="1.1.0", disableGC=True)), [], [fakes.bin], cache)
    assert fakes.calls() == []


def test_conflist_status(chain):
    fakes, _, _ = chain
    conflist.status(conflist.load(LIST), [fakes.bin])           # 1.0.0: no STATUS
    assert fakes.calls() == []
    cl = conflist.load(dict(LIST, cniVersion="1.1.0"))
    conflist.status(cl, [fakes.bin])
    assert [(c[0], c[1]) for c in fakes.calls()] == [("one", "STATUS"), ("two", "STATUS")]
    fakes.clear()
    fakes.fail("one", "STATUS", code=50, msg="not ready")
    with pytest.raises(CNIError) as e:
        conflist.status(cl, [fakes.bin])
    assert e.value.code == 50 and [c[0] for c in fakes.calls()] == ["one"]


def test_cached_attachments_skips_what_libcni_skips(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    good = {"kind": "cniCacheV1", "containerId": "c1", "ifName": "eth0", "networkName": "n",
            "netns": "/var/run/netns/p", "cniArgs": [["A", "1"]], "capabilityArgs": {"x": 1}}
    (results / "n-c1-eth0").write_text(dumps(good))
    (results / "n-c2-eth0").write_text(dumps(dict(good, kind="old", containerId="c2")))
    (results / "n-c3-eth0").write_text(dumps(dict(good, containerId="c3", ifName="")))
    (results / "n-c4-eth0").write_text("{broken")
    (results / "m-c5-eth0").write_text(dumps(dict(good, containerId="c5", networkName="m")))
    got = conflist.cached_attachments(str(tmp_path), "n")
    assert [(r.container_id, r.ifname, r.netns, r.args, r.capability_args) for r in got] == [
        ("c1", "eth0", "/var/run/netns/p", [("A", "1")], {"x": 1})]
    assert [r.container_id for r in conflist.cached_attachments(str(tmp_path))] == ["c5", "c1"]  # file order
    assert conflist.cached_attachments(str(tmp_path / "nowhere")) == []


# ---- the CLI's argument handling ------------------------------------------------------------

def test_cli_del_defaults_to_the_cached_capability_args(chain, tmp_path, capsys):
    from cli import main as cli
    fakes, rt, cache = chain
    path = tmp_path / "l.conflist"
    path.write_text(dumps(LIST))
    pm = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    common = ["--conflist", str(path), "--cni-path", fakes.bin, "--cache-dir", cache, "--container-id", "c9"]
    assert cli.main(["cni", "add", "/var/run/netns/p"] + common + ["--cap-args", dumps({"portMappings": pm})]) == 0
    fakes.clear()
    assert cli.main(["cni", "del", "/var/run/netns/p"] + common) == 0
    assert [c[2].get("runtimeConfig") for c in fakes.calls()] == [{"portMappings": pm}, None]
    assert cli.main(["cni", "del", "/var/run/netns/p"] + common + ["--cap-args", "[1]"]) == 2
    capsys.readouterr()


def test_cli_reports_plugin_errors_as_cni_json(chain, tmp_path, capsys):
    from cli import main as cli
    fakes, _, cache = chain
    path = tmp_path / "l.conflist"
    path.write_text(dumps(LIST))
    fakes.fail("one", "ADD", code=11, msg="later")
    code = cli.main(["cni", "add", "/var/run/netns/p", "--conflist", str(path), "--cni-path", fakes.bin,
                     "--cache-dir", cache])
    assert code == 1
    assert loads(capsys.readouterr().out) == {"cniVersion": "1.0.0", "code": 11, "msg": "later"}


# ---- issue 12: a delegate that rejects its config cannot make a pod undeletable ----------

def test_del_drops_a_saved_config_the_delegate_rejects(fl):
    fl.run("ADD")
    fl.fakes.fail("bridge", "DEL", code=errors.INVALID_NETCONF, msg="bad config")
    fl.fakes.clear()
    assert fl.run("DEL") is None            # retrying with that config could never succeed
    assert [(c[0], c[1]) for c in fl.fakes.calls()] == [("bridge", "DEL")]
    assert fl.saved() is None
    fl.fakes.clear()
    assert fl.run("DEL") is None and fl.fakes.calls() == []


@pytest.mark.parametrize("code", [errors.INCOMPATIBLE_VERSION, errors.UNSUPPORTED_FIELD,
                                  errors.DECODING_FAILURE, errors.INVALID_NETCONF])
def test_failed_add_whose_delegate_rejects_its_config_leaves_nothing(fl, code):
    fl.fakes.fail("bridge", "ADD", code=code, msg="bad config")
    fl.fakes.fail("bridge", "DEL", code=code, msg="bad config")
    with pytest.raises(CNIError) as e:
        fl.run("ADD")
    assert e.value.code == code and "failed to delegate add" in e.value.msg
    assert fl.saved() is None and os.listdir(fl.data_dir) == []
    fl.fakes.clear()
    assert fl.run("DEL") is None and fl.fakes.calls() == []


def test_failed_add_whose_del_fails_the_same_way_leaves_nothing(fl):
    # The reference plugins answer 999 for everything: the same config failing
    # ADD and DEL with the same error is the config's fault.
    fl.fakes.fail("bridge", "ADD", code=999, msg='invalid CIDR address: not-a-cidr')
    fl.fakes.fail("bridge", "DEL", code=999, msg='invalid CIDR address: not-a-cidr')
    with pytest.raises(CNIError) as e:
        fl.run("ADD")
    assert e.value.code == 999 and fl.saved() is None


def test_add_with_a_delegate_not_in_cni_path_saves_nothing(fl):
    with pytest.raises(CNIError) as e:
        fl.run("ADD", delegate={"type": "no-such-plugin"})
    assert e.value.code == errors.PLUGIN_NOT_FOUND
    assert fl.fakes.calls() == [] and not os.path.exists(fl.data_dir)


def test_transient_del_failure_still_keeps_the_config(fl):
    fl.run("ADD")
    for code in (errors.IO_FAILURE, errors.TRY_AGAIN_LATER, errors.KERNEL, errors.INTERNAL):
        fl.fakes.fail("bridge", "DEL", code=code)
        with pytest.raises(CNIError) as e:
            fl.run("DEL")
        assert e.value.code == code and fl.saved() is not None


@pytest.mark.parametrize("content", [b"", b"{half", b"[1, 2]", b'{"type": 5}', b'{"no": "type"}',
                                     b"\xff\xfe", b'{"type": "\\ud800"}'])
def test_del_drops_an_unusable_saved_config(fl, content):
    os.makedirs(fl.data_dir)
    with open(os.path.join(fl.data_dir, "c1"), "wb") as f:
        f.write(content)
    assert fl.run("DEL") is None            # nothing that config could undo
    assert fl.fakes.calls() == [] and fl.saved() is None


def test_unreadable_saved_config_is_io_failure(fl):
    os.makedirs(os.path.join(fl.data_dir, "c1"))      # a directory where the file should be
    with pytest.raises(CNIError) as e:
        fl.run("DEL")
    assert e.value.code == errors.IO_FAILURE


# ---- issue 12: paths of the wrong type, and text that is not text --------------------------

@pytest.fixture
def flannel_defaults(tmp_path, monkeypatch):
    d = tmp_path / "defaults"
    monkeypatch.setattr(flannel, "DEFAULT_DATA_DIR", str(d / "data"))
    monkeypatch.setattr(flannel, "DEFAULT_SUBNET_FILE", str(d / "subnet.env"))
    return d


@pytest.mark.parametrize("key", ["subnetFile", "dataDir"])
@pytest.mark.parametrize("value", [False, True, 0, 1, [], ["x"], {}, {"a": "b"}],
                         ids=["false", "true", "0", "1", "[]", "list", "{}", "object"])
def test_flannel_path_of_the_wrong_type_is_invalid_config(fl, flannel_defaults, key, value):
    fl.write_env(ENV4)
    os.makedirs(str(flannel_defaults))
    with open(str(flannel_defaults / "subnet.env"), "w") as f:
        f.write(ENV4)
    for command in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
        conf = dict(fl.conf, cniVersion="1.1.0", **{key: value})
        with pytest.raises(CNIError) as e:
            fl.run(command, conf=conf)
        assert e.value.code == errors.INVALID_NETCONF, (command, e.value)
        assert "%s must be a string" % key in e.value.msg
    assert fl.fakes.calls() == [] and not os.path.exists(fl.data_dir)
    assert os.listdir(str(flannel_defaults)) == ["subnet.env"]


@pytest.mark.parametrize("key", ["subnetFile", "dataDir"])
def test_flannel_path_with_nul_is_invalid_config(fl, key):
    with pytest.raises(CNIError) as e:
        fl.run("ADD", **{key: "/tmp/x\x00y"})
    assert e.value.code == errors.INVALID_NETCONF and "NUL" in e.value.msg
    assert fl.fakes.calls() == [] and not os.path.exists(fl.data_dir)


def run_unparsed(fl, command, conf, cid="c1"):
    """As Flannel.run with conf handed over as a dict, past the JSON layer (which
    refuses lone surrogates in a document itself): what flannel checks on its own."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/p",
           "CNI_IFNAME": "eth0", "CNI_PATH": fl.fakes.bin}
    args = skel.args_from_env(env, dumps({"cniVersion": conf["cniVersion"], "name": conf["name"]}).encode())
    args.conf = conf
    return skel.call(flannel.COMMANDS, args)


SURROGATE = "\ud800"


@pytest.mark.parametrize("where", ["subnetFile", "dataDir", "delegate.type", "delegate.bridge",
                                   "ipam.type", "ipam.routes", "runtimeConfig", "key"])
def test_flannel_lone_surrogates_are_invalid_config(fl, where):
    conf = dict(fl.conf, cniVersion="1.1.0")
    if where in ("subnetFile", "dataDir"):
        conf[where] = conf[where] + SURROGATE
    elif where.startswith("delegate."):
        conf["delegate"] = dict(conf["delegate"], **{where.split(".")[1]: SURROGATE})
    elif where == "ipam.type":
        conf["ipam"] = dict(conf["ipam"], type=SURROGATE)
    elif where == "ipam.routes":
        conf["ipam"] = dict(conf["ipam"], routes=[{"dst": SURROGATE}])
    elif where == "runtimeConfig":
        conf["runtimeConfig"] = {"portMappings": [{"hostIP": SURROGATE}]}
    else:
        conf[SURROGATE] = 1
    for command in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
        with pytest.raises(CNIError) as e:
            run_unparsed(fl, command, conf)
        assert e.value.code == errors.INVALID_NETCONF, (command, e.value)
        assert "\\ud800" in e.value.msg and "not valid Unicode" in e.value.msg
        dumps(e.value.to_dict("1.1.0")).encode()            # printable as is
    assert fl.fakes.calls() == [] and not os.path.exists(fl.data_dir)


def test_a_container_id_too_long_to_name_a_file_is_a_bad_environment(fl):
    # The saved delegate config is dataDir/<container ID>: a 300-byte ID used to fail
    # with ENAMETOOLONG, a traceback and 999. Now 4 before anything is touched, and DEL
    # of such an ID (nothing can have been saved) succeeds.
    cid = "c" * 300
    with pytest.raises(CNIError) as e:
        fl.run("ADD", cid=cid)
    assert e.value.code == errors.INVALID_ENV and "too long" in e.value.msg
    assert fl.fakes.calls() == []
    assert fl.run("DEL", cid=cid) is None
    assert fl.fakes.calls() == []
    assert fl.run("ADD", cid="c" * 251) is not None       # the longest that fits (+ ".tmp")


def test_a_data_dir_no_file_system_can_hold_is_invalid_config(fl):
    # A dataDir with a 300-character component: ADD failed with ENAMETOOLONG, a traceback, 999.
    long_dir = os.path.join(fl.data_dir, "z" * 300)
    with pytest.raises(CNIError) as e:
        fl.run("ADD", dataDir=long_dir)
    assert e.value.code == errors.INVALID_NETCONF and "dataDir" in e.value.msg
    assert fl.fakes.calls() == []
    assert fl.run("DEL", dataDir=long_dir) is None
    conf = dict(fl.conf, cniVersion="1.1.0", dataDir=long_dir)
    fl.run("GC", conf=conf, **{"cni.dev/valid-attachments": []})
