"""The calico CNI plugin without root: names, config parsing, the blocks file, and
the IPAM config it delegates (the datapath: netns_tests/test_calico_cni.py)."""
import hashlib
import json
import subprocess
import sys

import pytest

from cni import errors, executable
from cni.errors import CNIError
from cni.plugins import calico
from cni.skel import args_from_env


def make_args(conf, command="ADD", cid="ctr1", ifname="eth0"):
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/x",
           "CNI_IFNAME": ifname, "CNI_PATH": "/opt/cni/bin"}
    return args_from_env(env, json.dumps(conf).encode())


def conf(**kw):
    c = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
         "ipam": {"type": "host-local", "subnet": "useNodeBlock", "dataDir": "/tmp/x"}}
    c.update(kw)
    return c


def test_host_veth_name_is_calicos_scheme():
    name = calico.host_veth_name("abc123", "eth0")
    assert name == "cali" + hashlib.sha1(b"abc123.eth0").hexdigest()[:11]
    assert len(name) == 15
    assert calico.host_veth_name("abc123", "net1") != name


def test_registered():
    assert executable.PLUGINS["calico"] == "cni.plugins.calico"


def test_defaults():
    c = calico.NetConf(make_args(conf()))
    assert (c.mtu, c.blocks_file, c.ipam_type, c.use_node_block, c.dns) == \
        (0, "/run/calico-lite/blocks", "host-local", True, {})
    c = calico.NetConf(make_args(conf(mtu=1480, nodeBlocksFile="/b", dns={"nameservers": ["10.96.0.10"]})))
    assert (c.mtu, c.blocks_file, c.dns) == (1480, "/b", {"nameservers": ["10.96.0.10"]})


def test_node_block_detection():
    hl = lambda **ipam: calico.NetConf(make_args(conf(ipam=dict(type="host-local", **ipam))))  # noqa: E731
    assert hl().use_node_block                                   # host-local without a range
    assert hl(subnet="useNodeBlock").use_node_block
    assert not hl(subnet="10.65.0.0/26").use_node_block
    assert not hl(ranges=[[{"subnet": "10.65.0.0/26"}]]).use_node_block
    other = calico.NetConf(make_args(conf(ipam={"type": "dhcp"})))
    assert not other.use_node_block


@pytest.mark.parametrize("c, words", [
    (conf(mtu="1480"), "mtu must be a number"),
    (conf(mtu=True), "mtu must be a number"),
    (conf(mtu=40), "invalid MTU"),
    (conf(mtu=70000), "invalid MTU"),
    (conf(ipam=None), "ipam.type is missing"),
    (conf(ipam={}), "ipam.type is missing"),
    (conf(ipam=[]), "ipam must be a object"),
    (conf(ipam={"type": 5}), "type must be a string"),
    (conf(nodeBlocksFile=3), "nodeBlocksFile must be a string"),
    (conf(dns="x"), "dns must be a object"),
    (conf(ipam={"type": "host-local", "subnet": "useNodeBlock", "ranges": [[{"subnet": "10.0.0.0/24"}]]}),
     "cannot be used together"),
])
def test_bad_config(c, words):
    with pytest.raises(CNIError) as e:
        calico.NetConf(make_args(c))
    assert e.value.code == errors.INVALID_NETCONF and words in e.value.msg


def test_parse_blocks():
    text = "# the node's blocks\n10.65.0.64/26\n\n10.65.1.0/26  # a second one\n10.65.0.64/26\nfd00:65::/122\n"
    assert [str(b) for b in calico.parse_blocks(text)] == ["10.65.0.64/26", "10.65.1.0/26", "fd00:65::/122"]
    assert calico.parse_blocks("") == []
    for bad, words in (("10.65.0.0", "not a CIDR"), ("10.65.0.1/26", "host bits"), ("10.65.0.0/31", "too small")):
        with pytest.raises(CNIError, match=words):
            calico.parse_blocks(bad)


def test_load_blocks_missing_or_empty_is_try_again_later(tmp_path):
    with pytest.raises(CNIError) as e:
        calico.load_blocks(str(tmp_path / "nope"))
    assert e.value.code == errors.TRY_AGAIN_LATER and "calico-lite agent" in e.value.msg
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(CNIError) as e:
        calico.load_blocks(str(tmp_path / "empty"))
    assert e.value.code == errors.TRY_AGAIN_LATER


def test_ipam_netconf_fills_the_range_set_from_the_blocks(tmp_path):
    f = tmp_path / "blocks"
    f.write_text("10.65.0.64/26\n10.65.1.0/26\nfd00:65::/122\n")
    args = make_args(conf(nodeBlocksFile=str(f), ipam={"type": "host-local", "subnet": "useNodeBlock",
                                                       "dataDir": "/d", "routes": [{"dst": "0.0.0.0/0"}]}))
    out = calico.ipam_netconf(calico.NetConf(args), args, need_blocks=True)
    assert out["ipam"] == {"type": "host-local", "dataDir": "/d", "routes": [{"dst": "0.0.0.0/0"}],
                           "ranges": [[{"subnet": "10.65.0.64/26"}, {"subnet": "10.65.1.0/26"}],
                                      [{"subnet": "fd00:65::/122"}]]}
    assert out["name"] == "k8s-pod-network" and out["type"] == "calico"
    # the caller's config is not modified
    assert args.conf["ipam"]["subnet"] == "useNodeBlock"


def test_ipam_netconf_without_blocks(tmp_path):
    args = make_args(conf(nodeBlocksFile=str(tmp_path / "nope")))
    c = calico.NetConf(args)
    with pytest.raises(CNIError) as e:
        calico.ipam_netconf(c, args, need_blocks=True)
    assert e.value.code == errors.TRY_AGAIN_LATER
    # DEL/CHECK/GC: host-local ignores the ranges then, a placeholder keeps its parser happy
    out = calico.ipam_netconf(c, args, need_blocks=False)
    assert out["ipam"]["ranges"] == [[{"subnet": "169.254.1.0/30"}]]


def test_explicit_ipam_is_passed_on_unchanged():
    args = make_args(conf(ipam={"type": "host-local", "ranges": [[{"subnet": "10.65.0.0/26"}]]}))
    assert calico.ipam_netconf(calico.NetConf(args), args, need_blocks=True) is None


def test_status_without_blocks_is_limited_connectivity(tmp_path):
    args = make_args(conf(cniVersion="1.1.0", nodeBlocksFile=str(tmp_path / "nope")), command="STATUS")
    with pytest.raises(CNIError) as e:
        calico.cmd_status(args)
    assert e.value.code == errors.LIMITED_CONNECTIVITY


def test_gateway6_is_the_eui64_link_local_of_the_host_mac():
    mac = bytes(int(x, 16) for x in calico.HOST_MAC.split(":"))
    eui = bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:]
    words = [eui[i:i + 2].hex().lstrip("0") or "0" for i in range(0, 8, 2)]
    assert calico.GATEWAY6 == "fe80::" + ":".join(words)


def test_hot_path_imports_stay_light():
    """ADD's imports: no hashlib (OpenSSL), no json, no ipaddress, no daemon code."""
    code = ("import sys; from cni.plugins import calico; calico.host_veth_name('a', 'eth0');"
            "import cni.invoke, cni.types;"
            "bad = [m for m in ('hashlib', '_hashlib', 'json', 'ipaddress', 'etcd3gw', 'jinja2', 'calico_lite',"
            " 'subprocess', 'pyroute2') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; sys.path.insert(0, %r);" % executable.ROOT
                          + code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
