"""Malformed input to the installed plugin executables, without root.

Every case here fails before the plugin touches the kernel (or, for
host-local, before it touches its store), so it runs anywhere: the
executables from cni.executable.install are run as a runtime would run them
(environment + stdin), and must answer with a non-zero exit, the spec's error
JSON ({"cniVersion", "code", "msg"}) with the right code and a useful message,
and leave no IPAM store behind. netns_tests/test_cni_bad_input.py runs the
same kind of input, and the cases that need the kernel, inside a live node.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from cni import executable
from cni.types import LATEST, SUPPORTED_VERSIONS

NETWORK = "valnet"


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("cni-bin")
    executable.install(str(dest), sys.executable)
    return str(dest)


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "ipam")


def bridge_conf(data_dir, **changes):
    conf = {
        "cniVersion": "1.0.0", "name": NETWORK, "type": "bridge", "bridge": "cni0",
        "isGateway": True, "ipMasq": True,
        "ipam": {"type": "host-local", "subnet": "10.250.0.0/24", "dataDir": data_dir},
    }
    for key, value in changes.items():
        if value is None:
            conf.pop(key, None)
        else:
            conf[key] = value
    return conf


def ipam_conf(data_dir, **ipam):
    ipam.setdefault("type", "host-local")
    ipam["dataDir"] = data_dir
    return bridge_conf(data_dir, ipam=ipam)


def run(bin_dir, plugin, conf, command="ADD", container_id="c1", netns="/nonexistent/netns",
        ifname="eth0", cni_args=None, unset=()):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
           "CNI_PATH": bin_dir}
    if cni_args is not None:
        env["CNI_ARGS"] = cni_args
    for key in unset:
        env.pop(key)
    stdin = conf if isinstance(conf, str) else json.dumps(conf)
    # surrogateescape: a lone surrogate such as "\udcff" goes out as the raw byte 0xff.
    return subprocess.run([os.path.join(bin_dir, plugin)], input=stdin, env=env,
                          capture_output=True, text=True, errors="surrogateescape", timeout=30)


def error_of(proc):
    """The error JSON a failing plugin printed, checked for the spec's shape."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    err = json.loads(proc.stdout)
    assert {"cniVersion", "code", "msg"} <= set(err), err
    assert err["cniVersion"] in SUPPORTED_VERSIONS
    assert isinstance(err["code"], int) and isinstance(err["msg"], str) and err["msg"]
    return err


def without(conf, key):
    conf.pop(key)
    return conf


# id -> (plugin, function(data_dir) -> kwargs for run, expected code, msg regex)
CASES = {
    "bad-json": ("bridge", lambda d: dict(conf="{not json"), 6, r"error decoding network config"),
    "truncated-json": ("bridge", lambda d: dict(conf='{"cniVersion": "1.0.0", "name": '), 6,
                       r"decoding"),
    "json-not-an-object": ("bridge", lambda d: dict(conf="42"), 6, r"not a JSON object"),
    "empty-stdin": ("bridge", lambda d: dict(conf=""), 6, r"unexpected end of JSON input"),
    "not-utf8": ("bridge", lambda d: dict(conf="\udcff"), 6, r"decoding"),
    "cniVersion-not-a-string": ("bridge", lambda d: dict(conf=bridge_conf(d, cniVersion=[1])), 6,
                                r"cniVersion must be a string"),
    "unknown-cniVersion": ("bridge", lambda d: dict(conf=bridge_conf(d, cniVersion="9.9.9")), 1,
                           r'incompatible CNI versions; config is "9\.9\.9"'),
    "missing-cniVersion-with-CHECK": (
        "bridge", lambda d: dict(conf=without(bridge_conf(d), "cniVersion"), command="CHECK"), 1,
        r"0\.1\.0 does not allow CHECK"),
    "null-cniVersion-is-missing": (
        "bridge", lambda d: dict(conf=dict(bridge_conf(d), cniVersion=None),
                                 command="CHECK"), 1, r"0\.1\.0 does not allow CHECK"),
    "CHECK-with-0.3.1": ("bridge", lambda d: dict(conf=bridge_conf(d, cniVersion="0.3.1"),
                                                  command="CHECK"), 1, r"0\.3\.1 does not allow CHECK"),
    "GC-with-1.0.0": ("bridge", lambda d: dict(conf=bridge_conf(d), command="GC"), 1,
                      r"1\.0\.0 does not allow GC"),
    "STATUS-with-0.4.0": ("bridge", lambda d: dict(conf=bridge_conf(d, cniVersion="0.4.0"),
                                                   command="STATUS"), 1, r"does not allow STATUS"),
    "missing-CNI_COMMAND": ("bridge", lambda d: dict(conf=bridge_conf(d), unset=["CNI_COMMAND"]), 4,
                            r"\[CNI_COMMAND\] missing"),
    "unknown-CNI_COMMAND": ("bridge", lambda d: dict(conf=bridge_conf(d), command="add"), 4,
                            r"unknown CNI_COMMAND: add"),
    "missing-CNI_NETNS": ("bridge", lambda d: dict(conf=bridge_conf(d), unset=["CNI_NETNS"]), 4,
                          r"\[CNI_NETNS\] missing"),
    "missing-CNI_PATH-and-CNI_IFNAME": (
        "bridge", lambda d: dict(conf=bridge_conf(d), unset=["CNI_PATH", "CNI_IFNAME"]), 4,
        r"\[CNI_IFNAME,CNI_PATH\] missing"),
    "CNI_NETNS-missing-file": ("bridge", lambda d: dict(conf=bridge_conf(d)), 3,
                               r"failed to open netns '/nonexistent/netns': no such file"),
    "CNI_NETNS-regular-file": ("bridge", lambda d: dict(conf=bridge_conf(d), netns=__file__), 4,
                               r"is not a network namespace"),
    "missing-CNI_CONTAINERID": ("bridge", lambda d: dict(conf=bridge_conf(d),
                                                         unset=["CNI_CONTAINERID"]), 4,
                                r"\[CNI_CONTAINERID\] missing"),
    "invalid-container-id": ("bridge", lambda d: dict(conf=bridge_conf(d), container_id="-x;rm"), 4,
                             r"invalid characters in containerID"),
    "ifname-too-long": ("bridge", lambda d: dict(conf=bridge_conf(d), ifname="x" * 16), 4,
                        r"interface name is too long"),
    "ifname-with-slash": ("bridge", lambda d: dict(conf=bridge_conf(d), ifname="a/b"), 4,
                          r"contains /"),
    "ifname-with-space": ("bridge", lambda d: dict(conf=bridge_conf(d), ifname="a b"), 4,
                          r"whitespace"),
    "missing-network-name": ("bridge", lambda d: dict(conf=bridge_conf(d, name=None)), 7,
                             r"missing network name"),
    "invalid-network-name": ("bridge", lambda d: dict(conf=bridge_conf(d, name="../etc")), 7,
                             r"invalid characters found in network name"),
    "network-name-not-a-string": ("bridge", lambda d: dict(conf=bridge_conf(d, name=7)), 7,
                                  r"network name"),
    "mtu-is-a-string": ("bridge", lambda d: dict(conf=bridge_conf(d, mtu="1500")), 7,
                        r"mtu must be a number"),
    "mtu-negative": ("bridge", lambda d: dict(conf=bridge_conf(d, mtu=-1)), 7, r"invalid MTU -1"),
    "isGateway-is-a-string": ("bridge", lambda d: dict(conf=bridge_conf(d, isGateway="yes")), 7,
                              r"isGateway must be a boolean"),
    "bridge-name-too-long": ("bridge", lambda d: dict(conf=bridge_conf(d, bridge="b" * 16)), 7,
                             r"invalid bridge name"),
    "vlan-5000": ("bridge", lambda d: dict(conf=bridge_conf(d, vlan=5000)), 7,
                  r"invalid VLAN ID 5000"),
    "vlan-and-vlanTrunk": ("bridge", lambda d: dict(conf=bridge_conf(d, vlan=10,
                                                                     vlanTrunk=[{"id": 20}])), 7,
                           r"vlan and vlanTrunk"),
    "hairpin-and-promisc": ("bridge", lambda d: dict(conf=bridge_conf(d, hairpinMode=True,
                                                                      promiscMode=True)), 7,
                            r"hairpin mode and promiscuous mode"),
    "malformed-CNI_ARGS": ("bridge", lambda d: dict(conf=bridge_conf(d), cni_args="K8S_POD_NAME"), 4,
                           r"invalid CNI_ARGS pair 'K8S_POD_NAME'"),
    "invalid-MAC-in-runtimeConfig": (
        "bridge", lambda d: dict(conf=bridge_conf(d, runtimeConfig={"mac": "not-a-mac"})), 7,
        r"invalid MAC address 'not-a-mac'"),
    "loopback-missing-netns": ("loopback", lambda d: dict(conf={"cniVersion": "1.0.0", "name": "lo",
                                                                 "type": "loopback"}, ifname="lo"),
                               3, r"no such file"),
    # host-local alone touches only its store, so its config errors need no root.
    "ipam-bad-subnet": ("host-local", lambda d: dict(conf=ipam_conf(d, subnet="10.250.0.0/33")), 7,
                        r"invalid CIDR address: 10\.250\.0\.0/33"),
    "ipam-subnet-host-bits": ("host-local", lambda d: dict(conf=ipam_conf(d, subnet="10.250.0.1/24")),
                              7, r"host bits set"),
    "ipam-rangeStart-outside-subnet": (
        "host-local", lambda d: dict(conf=ipam_conf(d, subnet="10.250.0.0/24",
                                                    rangeStart="10.251.0.1")), 7,
        r"RangeStart 10\.251\.0\.1 not in network"),
    "ipam-gateway-outside-subnet": (
        "host-local", lambda d: dict(conf=ipam_conf(d, subnet="10.250.0.0/24", gateway="10.0.0.1")),
        7, r"gateway 10\.0\.0\.1 not in network"),
    "ipam-overlapping-range-sets": (
        "host-local", lambda d: dict(conf=ipam_conf(d, ranges=[[{"subnet": "10.250.0.0/16"}],
                                                               [{"subnet": "10.250.7.0/24"}]])), 7,
        r"overlap"),
    "ipam-no-ranges": ("host-local", lambda d: dict(conf=ipam_conf(d)), 7, r"no IP ranges"),
    "ipam-bad-requested-ip": ("host-local", lambda d: dict(conf=ipam_conf(d, subnet="10.250.0.0/24"),
                                                           cni_args="IP=10.250.0.x"), 4,
                              r'IP=10\.250\.0\.x'),
    "ipam-missing-cniVersion-two-ipv4-range-sets": (
        "host-local", lambda d: dict(conf=without(ipam_conf(d, ranges=[[{"subnet": "10.1.0.0/24"}],
                                                                       [{"subnet": "10.2.0.0/24"}]]),
                                                  "cniVersion")), 7,
        r"0\.1\.0 does not support more than 1 address per family"),
}


LONE = "\ud800"        # json.dumps writes it as the escape \ud800: valid JSON, not valid Unicode


def portmap_conf(**changes):
    conf = {"cniVersion": "1.0.0", "name": NETWORK, "type": "portmap",
            "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80}]},
            "prevResult": {"cniVersion": "1.0.0",
                           "interfaces": [{"name": "eth0", "sandbox": "/nonexistent/netns"}],
                           "ips": [{"interface": 0, "address": "10.250.0.2/24"}]}}
    conf.update(changes)
    return conf


def calico_conf(data_dir, **changes):
    conf = {"cniVersion": "1.0.0", "name": NETWORK, "type": "calico",
            "ipam": {"type": "host-local", "subnet": "useNodeBlock", "dataDir": data_dir}}
    conf.update(changes)
    return conf


def flannel_conf(data_dir, **changes):
    conf = {"cniVersion": "1.0.0", "name": NETWORK, "type": "flannel",
            "subnetFile": os.path.join(data_dir, "subnet.env"), "dataDir": data_dir}
    conf.update(changes)
    return conf


# Regression (issue 12, defect 4): each of these strings is echoed back somewhere (the
# error message, a result, a file) and crashed the output step with a traceback (no
# JSON at all) or answered 999. Now refused while parsing, before anything is touched.
UNENCODABLE = {
    "name": ("bridge", lambda d: bridge_conf(d, name="net" + LONE)),
    "cniVersion": ("bridge", lambda d: bridge_conf(d, cniVersion="1.0." + LONE)),
    "bridge": ("bridge", lambda d: bridge_conf(d, bridge="br" + LONE)),
    "ipam.type": ("bridge", lambda d: ipam_conf(d, type="host" + LONE, subnet="10.250.0.0/24")),
    "ipam.subnet": ("bridge", lambda d: ipam_conf(d, subnet="10.250.0.0/24" + LONE)),
    "ipam.routes": ("bridge", lambda d: ipam_conf(d, subnet="10.250.0.0/24",
                                                  routes=[{"dst": "0.0.0.0/0" + LONE}])),
    "ipam.dataDir": ("bridge", lambda d: dict(bridge_conf(d), ipam={"type": "host-local",
                                                                    "subnet": "10.250.0.0/24",
                                                                    "dataDir": d + LONE})),
    "a-key": ("bridge", lambda d: dict(bridge_conf(d), **{"x" + LONE: 1})),
    "host-local-subnet": ("host-local", lambda d: ipam_conf(d, subnet="10.250.0.0/24" + LONE)),
    "host-local-dataDir": ("host-local", lambda d: dict(ipam_conf(d, subnet="10.250.0.0/24"),
                                                        ipam={"type": "host-local",
                                                              "subnet": "10.250.0.0/24",
                                                              "dataDir": d + LONE})),
    "flannel-subnetFile": ("flannel", lambda d: flannel_conf(d, subnetFile="/run/x" + LONE)),
    "flannel-dataDir": ("flannel", lambda d: flannel_conf(d, dataDir=d + LONE)),
    "portmap-prevResult": ("portmap", lambda d: portmap_conf(prevResult=dict(
        portmap_conf()["prevResult"], dns={"domain": "x" + LONE}))),
    "portmap-mapping-hostIP": ("portmap", lambda d: portmap_conf(runtimeConfig={"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "hostIP": "10.0.0.1" + LONE}]})),
    "loopback-name": ("loopback", lambda d: {"cniVersion": "1.0.0", "name": "lo" + LONE,
                                             "type": "loopback"}),
    "calico-nodeBlocksFile": ("calico", lambda d: calico_conf(d, nodeBlocksFile="/run/b" + LONE)),
}


@pytest.mark.parametrize("case", list(UNENCODABLE))
@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_unencodable_strings_are_a_decoding_failure(bin_dir, data_dir, case, command):
    plugin, make = UNENCODABLE[case]
    proc = run(bin_dir, plugin, make(data_dir), command=command)
    err = error_of(proc)        # JSON on stdout, no traceback
    assert err["code"] == 6 and "lone surrogate" in err["msg"], err
    proc.stdout.encode("utf-8")
    assert not os.path.exists(data_dir)


# Regression (issue 12, defects 9 and 13): each answered 999 (a Python exception) or was
# accepted although the reference's typed decoding refuses it.
LOOSE = {
    "type-is-a-number": ("bridge", lambda d: bridge_conf(d, type=5), 7, r"type must be a string"),
    "portmap-type-is-a-list": ("portmap", lambda d: portmap_conf(type=["portmap"]), 7, r"type must be a string"),
    "loopback-type-is-an-object": ("loopback", lambda d: {"cniVersion": "1.0.0", "name": "lo",
                                                          "type": {}}, 7, r"type must be a string"),
    "host-local-type-is-a-bool": ("host-local", lambda d: dict(ipam_conf(d, subnet="10.250.0.0/24"),
                                                               type=True), 7, r"type must be a string"),
    "bridge-args-is-a-list": ("bridge", lambda d: bridge_conf(d, args=["cni"]), 7, r"args must be a object"),
    "bridge-args-cni-is-a-string": ("bridge", lambda d: bridge_conf(d, args={"cni": "mac"}), 7,
                                    r"args\.cni must be a object"),
    "bridge-args-mac-is-a-number": ("bridge", lambda d: bridge_conf(d, args={"cni": {"mac": 5}}), 7,
                                    r"mac must be a string"),
    "bridge-runtimeConfig-is-a-list": ("bridge", lambda d: bridge_conf(d, runtimeConfig=[]), 7,
                                       r"runtimeConfig must be a object"),
    "bridge-runtimeConfig-mac-is-a-list": ("bridge", lambda d: bridge_conf(d, runtimeConfig={"mac": []}), 7,
                                           r"mac must be a string"),
    "bridge-dns-nameservers-not-a-list": ("bridge", lambda d: bridge_conf(d, dns={"nameservers": "8.8.8.8"}),
                                          7, r"dns\.nameservers must be a list of strings"),
    "bridge-dns-domain-not-a-string": ("bridge", lambda d: bridge_conf(d, dns={"domain": 5}), 7,
                                       r"dns\.domain must be a string"),
    "bridge-name-with-nul": ("bridge", lambda d: bridge_conf(d, bridge="br\x000"), 7, r"invalid bridge name"),
    "calico-nodeBlocksFile-with-nul": ("calico", lambda d: calico_conf(d, nodeBlocksFile="/run/b\x00x"), 7,
                                       r"nodeBlocksFile must be a path"),
    "calico-CHECK-without-prevResult": ("calico", lambda d: dict(calico_conf(d), cniVersion="1.0.0"), 7,
                                        r"Required prevResult missing"),
    "calico-dns-search-not-strings": ("calico", lambda d: calico_conf(d, dns={"search": [1]}), 7,
                                      r"dns\.search must be a list of strings"),
}


@pytest.mark.parametrize("case", list(LOOSE))
def test_loosely_typed_config_is_refused(bin_dir, data_dir, case):
    plugin, make, code, pattern = LOOSE[case]
    err = error_of(run(bin_dir, plugin, make(data_dir), command="CHECK" if "CHECK" in case else "ADD"))
    assert err["code"] == code, err
    assert re.search(pattern, err["msg"] + " " + err.get("details", "")), err
    assert not os.path.exists(data_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input(bin_dir, data_dir, case):
    plugin, make, code, pattern = CASES[case]
    kwargs = make(data_dir)
    err = error_of(run(bin_dir, plugin, **kwargs))
    assert err["code"] == code, err
    assert re.search(pattern, err["msg"] + " " + err.get("details", "")), err
    declared = kwargs["conf"].get("cniVersion") if isinstance(kwargs["conf"], dict) else None
    if declared in SUPPORTED_VERSIONS:      # errors answer in the config's version
        assert err["cniVersion"] == declared
    assert not os.path.exists(data_dir)    # not even an empty store was made


@pytest.mark.parametrize("plugin", ["bridge", "host-local", "loopback"])
@pytest.mark.parametrize("stdin", ["", '{"cniVersion": "0.4.0"}', "{not json"])
def test_version_needs_no_config(bin_dir, plugin, stdin):
    proc = run(bin_dir, plugin, stdin, command="VERSION", unset=["CNI_CONTAINERID", "CNI_NETNS",
                                                                  "CNI_IFNAME", "CNI_PATH"])
    if stdin == "{not json":
        assert error_of(proc)["code"] == 6
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(proc.stdout)
    assert info["supportedVersions"] == list(SUPPORTED_VERSIONS)
    assert info["cniVersion"] == ("0.4.0" if stdin else LATEST)


def test_exhausted_range_in_host_local(bin_dir, data_dir):
    """Two addresses, three containers: the third ADD fails with code 100 and reserves nothing."""
    conf = ipam_conf(data_dir, subnet="10.252.0.0/29", rangeStart="10.252.0.2",
                     rangeEnd="10.252.0.3")
    for cid in ("c1", "c2"):
        proc = run(bin_dir, "host-local", conf, container_id=cid)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    err = error_of(run(bin_dir, "host-local", conf, container_id="c3"))
    assert err["code"] == 100
    assert "no IP addresses available in range set: 10.252.0.2-10.252.0.3" in err["msg"]
    store = os.path.join(data_dir, NETWORK)
    assert sorted(os.listdir(store)) == ["10.252.0.2", "10.252.0.3", "last_reserved_ip.0", "lock"]
    for cid in ("c1", "c2", "c3"):
        proc = run(bin_dir, "host-local", conf, command="DEL", container_id=cid)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(store)) == ["last_reserved_ip.0", "lock"]
