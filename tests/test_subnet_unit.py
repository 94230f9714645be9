"""Subnet leases and the network config without etcd: keys, values, choosing a
subnet, every way a config or a lease can be wrong, and the parts of
EtcdSubnetManager that need no server (endpoints, TLS arguments, watch events).
"""
import base64
import json
import subprocess
import sys

import pytest

from flanneld.config import ConfigError, parse
from flanneld.subnet import DEFAULT_PREFIX, Lease, LeaseError, choose_subnet, parse_lease, subnet_from_key, subnet_key
from podnet.net.ip import AF_INET, IP, parse_cidr, parse_ip

NET = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}


def cfg(**kw):
    raw = dict(NET)
    raw.update(kw)
    return parse(json.dumps(raw))


# ---- keys and values ------------------------------------------------------------

def test_subnet_keys_round_trip():
    subnet = parse_cidr("10.244.3.0/24")
    key = subnet_key(DEFAULT_PREFIX, subnet)
    assert key == "/coreos.com/network/subnets/10.244.3.0-24"
    assert subnet_from_key(key) == subnet
    assert subnet_key("/my/prefix/", subnet) == "/my/prefix/subnets/10.244.3.0-24"
    assert subnet_from_key("/x/subnets/10.244.3.7-24") == subnet           # masked


@pytest.mark.parametrize("key", ["/coreos.com/network/subnets/garbage", "/p/subnets/10.244.3.0",
                                 "/p/subnets/10.244.3.0-33", "/p/subnets/10.244.300.0-24", "/p/subnets/-24"])
def test_bad_subnet_keys(key):
    with pytest.raises(LeaseError, match="not a subnet key"):
        subnet_from_key(key)


def test_lease_value_is_flannels_json():
    lease = Lease(parse_cidr("10.244.3.0/24"), parse_ip("192.168.50.3"), "vxlan", {"VtepMAC": "c2:00:00:00:00:03"})
    assert lease.value() == '{"PublicIP":"192.168.50.3","BackendType":"vxlan","BackendData":{"VtepMAC":"c2:00:00:00:00:03"}}'
    assert Lease(lease.subnet, lease.public_ip, "host-gw").value() == '{"PublicIP":"192.168.50.3","BackendType":"host-gw"}'
    back = parse_lease(lease.key(), lease.value(), expiration=123)
    assert back == lease and back.expiration == 123
    assert back != Lease(lease.subnet, lease.public_ip, "vxlan", {"VtepMAC": "c2:00:00:00:00:04"})


@pytest.mark.parametrize("value, words", [
    ("{not json", "malformed lease"),
    ('{"BackendType": "vxlan"}', "PublicIP"),
    ('{"PublicIP": "300.1.1.1"}', "malformed lease"),
    ('{"PublicIP": 17}', "malformed lease"),
    ('{"PublicIP": "192.168.50.3", "BackendData": [1]}', "BackendData is not an object"),
    ('["PublicIP"]', "malformed lease"),
    (b"\xff\xfe", "malformed lease"),
])
def test_malformed_leases(value, words):
    with pytest.raises(LeaseError, match=words):
        parse_lease("/coreos.com/network/subnets/10.244.3.0-24", value)


def test_lease_needs_a_subnet_key():
    with pytest.raises(LeaseError, match="not a subnet key"):
        parse_lease("/coreos.com/network/config", '{"PublicIP": "192.168.50.3"}')


# ---- choosing a subnet -------------------------------------------------------------

def test_choose_subnet_skips_taken_ones():
    config = cfg(Network="10.5.0.0/28", SubnetLen=30)
    all_free = [str(IP(AF_INET, v)) for v in config.subnets()]
    assert all_free == ["10.5.0.4", "10.5.0.8", "10.5.0.12"]        # the first /30 is never leased
    def first(free):
        return free[0]
    assert str(choose_subnet(config, set(), pick=first)) == "10.5.0.4/30"
    taken = {parse_cidr("10.5.0.4/30"), parse_cidr("10.5.0.12/30")}
    assert str(choose_subnet(config, taken, pick=first)) == "10.5.0.8/30"
    assert choose_subnet(config, taken | {parse_cidr("10.5.0.8/30")}) is None
    # Random by default, but always a free one of the right size.
    for _ in range(20):
        got = choose_subnet(config, taken)
        assert str(got) == "10.5.0.8/30"


def test_choose_subnet_honours_min_and_max():
    config = cfg(SubnetMin="10.244.10.0", SubnetMax="10.244.12.0")
    picks = {str(choose_subnet(config, set())) for _ in range(60)}
    assert picks <= {"10.244.10.0/24", "10.244.11.0/24", "10.244.12.0/24"} and len(picks) >= 2
    # A subnet outside min/max in `taken` (an old lease) does not matter.
    taken = {parse_cidr("10.244.1.0/24"), parse_cidr("10.244.10.0/24"), parse_cidr("10.244.11.0/24")}
    assert str(choose_subnet(config, taken)) == "10.244.12.0/24"


# ---- the network config ---------------------------------------------------------------

def test_config_defaults():
    c = parse(json.dumps({"Network": "10.244.0.0/16"}))
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max), c.backend_type) == \
        (24, "10.244.1.0", "10.244.255.0", "udp")
    small = parse(b'{"Network": "10.5.0.0/23"}')
    assert small.subnet_len == 25 and str(small.subnet_min) == "10.5.0.128"
    assert parse({"Network": "10.244.7.9/16"}).network == parse_cidr("10.244.0.0/16")


@pytest.mark.parametrize("raw, words", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"Backend": {"Type": "vxlan"}}', "no Network"),
    ('{"Network": "10.244.0.0"}', "not a valid CIDR"),
    ('{"Network": "10.244.0.0/40"}', "not a valid CIDR"),
    ('{"Network": "bogus"}', "not a valid CIDR"),
    ('{"Network": 10}', "not a valid CIDR"),
    ('{"Network": "fd00::/48"}', "IPv4"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": 16}', "SubnetLen 16 must be longer"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": 8}', "SubnetLen 8 must be longer"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": 31}', "at most 30"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": "24"}', "must be a number"),
    ('{"Network": "10.244.0.0/16", "SubnetLen": true}', "must be a number"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.5"}', "SubnetMin 10.244.1.5 is not the start of a /24"),
    ('{"Network": "10.244.0.0/16", "SubnetMax": "10.244.3.128"}', "SubnetMax 10.244.3.128 is not the start"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "10.245.1.0"}', "inside 10.244.0.0/16"),
    ('{"Network": "10.244.0.0/16", "SubnetMax": "10.0.0.0"}', "inside 10.244.0.0/16"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "nonsense"}', "not an IPv4 address"),
    ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.3.0"}', "after SubnetMax"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "ipsec"}}', "unknown backend type 'ipsec'"),
    ('{"Network": "10.244.0.0/16", "Backend": "vxlan"}', "Backend must be an object"),
])
def test_bad_configs(raw, words):
    with pytest.raises(ConfigError, match=words):
        parse(raw)


# ---- EtcdSubnetManager without a server ------------------------------------------------

def test_endpoints_and_tls_arguments(tmp_path):
    from flanneld.subnet.etcd import EtcdSubnetManager
    sm = EtcdSubnetManager("http://10.0.0.1:2379, https://[fd00::1]:2380,http://etcd")
    assert [e[:3] for e in sm.endpoints] == [("http", "10.0.0.1", 2379), ("https", "fd00::1", 2380),
                                             ("http", "etcd", 2379)]
    assert sm.subnets_prefix == "/coreos.com/network/subnets/" and sm.config_key == "/coreos.com/network/config"
    assert EtcdSubnetManager(["http://h:1"], prefix="my/net/").config_key == "/my/net/config"
    for bad in ([], "", "10.0.0.1:2379", "ftp://h:1", "http://h:notaport"):
        with pytest.raises(ValueError):
            EtcdSubnetManager(bad)
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    with pytest.raises(ValueError, match="no endpoint is https"):
        EtcdSubnetManager(["http://h:1"], cafile=str(ca))
    with pytest.raises(ValueError, match="needs both"):
        EtcdSubnetManager(["https://h:1"], certfile=str(ca))
    with pytest.raises(ValueError, match="not readable"):
        EtcdSubnetManager(["https://h:1"], cafile=str(tmp_path / "missing.crt"))
    EtcdSubnetManager(["https://h:1"], cafile=str(ca), certfile=str(ca), keyfile=str(ca))


def test_renew_delay():
    from flanneld.subnet.etcd import EtcdSubnetManager
    sm = EtcdSubnetManager(["http://h:1"])
    assert sm.renew_margin == 3600
    lease = Lease(parse_cidr("10.244.3.0/24"), parse_ip("192.168.50.3"), "udp", expiration=1000 + 86400)
    assert sm.renew_delay(lease, now=1000) == 86400 - 3600
    sm.renew_margin = 5
    assert sm.renew_delay(lease, now=1000 + 86400 - 2) == 0
    lease.expiration = None
    assert sm.renew_delay(lease) == 0


def _kv(key, value=None):
    kv = {"key": base64.b64encode(key.encode()).decode(), "mod_revision": "7"}
    if value is not None:
        kv["value"] = base64.b64encode(value.encode()).decode()
    return kv


def test_watch_event_translation(caplog):
    from flanneld.subnet.etcd import EtcdSubnetManager
    sm = EtcdSubnetManager(["http://h:1"])
    key = "/coreos.com/network/subnets/10.244.3.0-24"
    put = sm._event({"kv": _kv(key, '{"PublicIP":"192.168.50.3","BackendType":"udp"}')})
    assert put == ("put", Lease(parse_cidr("10.244.3.0/24"), parse_ip("192.168.50.3"), "udp"))
    assert sm._event({"type": "DELETE", "kv": _kv(key)}) == ("delete", parse_cidr("10.244.3.0/24"))
    # A lease overwritten with garbage is no lease any more: like a delete, and logged.
    assert sm._event({"kv": _kv(key, "garbage")}) == ("delete", parse_cidr("10.244.3.0/24"))
    assert sm._event({"kv": _kv("/coreos.com/network/subnets/junk", "{}")}) is None
    assert "malformed lease" in caplog.text and "junk" in caplog.text




def test_importing_the_manager_does_not_load_the_client():
    # The daemon imports it at start; the CNI hot path never does (nor the client).
    code = ("import sys, flanneld.subnet.etcd, cni.plugins.flannel; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('etcd3gw', 'requests', 'urllib3')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
