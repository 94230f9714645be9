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
from podnet.net.ip import AF_INET, IP, IPNet, parse_cidr, parse_ip

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


def test_choose_subnet_memory_does_not_grow_with_the_network():
    """0.0.0.0/0 in /30s is 2^30 subnets: the choice must not list them (it drove
    flanneld to 3 GB and a MemoryError). 10.0.0.0/12 first: before the fix it costs
    ~10 MB here, so the test fails without ever trying the 2^30 case."""
    import tracemalloc
    for network, low in (("10.0.0.0/12", "10.0.0.4"), ("0.0.0.0/0", "0.0.0.4")):
        config = cfg(Network=network, SubnetLen=30)
        # the first subnet holds the network address: never leased by default; the last one is
        assert str(config.subnet_min) == low
        assert str(config.subnet_max) == ("10.15.255.252" if network.startswith("10") else "255.255.255.252")
        taken = {parse_cidr(low + "/30"), parse_cidr("10.0.0.8/30")}
        tracemalloc.start()
        try:
            got = choose_subnet(config, taken)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, "%s: %d bytes" % (network, peak)
        assert got.prefixlen == 30 and got not in taken and got.network.value % 4 == 0
        assert config.subnet_min.value <= got.network.value <= config.subnet_max.value


def test_choose_subnet_counts_an_overlapping_lease_as_taken():
    # As flannel (sn.Overlaps(l.Subnet)): a lease of another length still covers its addresses.
    config = cfg(Network="10.5.0.0/28", SubnetLen=30)          # candidates .4 .8 .12

    def first(free):
        return free[0]
    assert str(choose_subnet(config, {parse_cidr("10.5.0.0/29")}, pick=first)) == "10.5.0.8/30"
    assert str(choose_subnet(config, {parse_cidr("10.5.0.9/32")}, pick=first)) == "10.5.0.4/30"
    assert str(choose_subnet(config, {parse_cidr("10.5.0.4/32"), parse_cidr("10.5.0.8/31")},
                             pick=first)) == "10.5.0.12/30"
    assert choose_subnet(config, {parse_cidr("10.0.0.0/8")}) is None
    assert choose_subnet(config, {parse_cidr("10.5.0.4/30"), parse_cidr("10.5.0.8/29")}) is None
    # leases outside SubnetMin..SubnetMax (or the network) change nothing
    assert str(choose_subnet(config, {parse_cidr("10.5.0.0/30"), parse_cidr("10.6.0.0/16")},
                             pick=first)) == "10.5.0.4/30"


def test_choose_subnet_picks_among_the_first_100_free_like_flannel():
    # flannel's allocateSubnet: walk from SubnetMin, keep the first 100 free, pick one at random.
    config = cfg()
    taken = {parse_cidr("10.244.%d.0/24" % i) for i in range(1, 51)}
    offered = []

    def record(free):
        offered.append(list(free))
        return free[-1]
    assert str(choose_subnet(config, taken, pick=record)) == "10.244.150.0/24"
    (free,) = offered
    assert [str(IP(AF_INET, v)) for v in free] == ["10.244.%d.0" % i for i in range(51, 151)]
    few = cfg(SubnetMin="10.244.250.0")
    offered.clear()
    choose_subnet(few, {parse_cidr("10.244.252.0/24")}, pick=record)
    assert [str(IP(AF_INET, v)) for v in offered[0]] == ["10.244.250.0", "10.244.251.0", "10.244.253.0",
                                                         "10.244.254.0", "10.244.255.0"]


def test_free_subnets_matches_flannels_walk():
    """free_subnets against flannel's own loop (every candidate from SubnetMin, skip
    those overlapping a lease, stop at 100), on random small networks and leases."""
    import random

    from flanneld.subnet import free_subnets
    rng = random.Random(12)
    for _ in range(300):
        plen = rng.randint(16, 26)
        sublen = rng.randint(plen + 1, min(plen + 10, 30))
        raw = {"Network": "10.%d.0.0/%d" % (rng.randint(0, 255), plen), "SubnetLen": sublen}
        config = cfg(**raw)
        step = 1 << (32 - sublen)
        span = (config.subnet_max.value - config.subnet_min.value) // step
        if rng.random() < 0.5 and span:
            lo = config.subnet_min.value + rng.randint(0, span) * step
            config = cfg(SubnetMin=str(IP(AF_INET, lo)), **raw)
        taken = set()
        for _ in range(rng.randint(0, 60)):
            tlen = rng.randint(max(plen - 2, 8), 32)
            value = config.network.network.value + rng.randint(-(1 << (32 - plen)), 2 << (32 - plen))
            taken.add(IPNet(IP(AF_INET, value % (1 << 32)), tlen).masked())
        limit = rng.choice([1, 5, 100])
        walk = []
        v = config.subnet_min.value
        while v <= config.subnet_max.value and len(walk) < limit:
            if not any(IPNet(IP(AF_INET, v), sublen).overlaps(t) for t in taken):
                walk.append(v)
            v += step
        assert free_subnets(config, taken, limit) == walk, (raw, sorted(map(str, taken)))


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
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": 5}}', "unknown backend type 5"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": ["vxlan"]}}', "unknown backend type"),
    # backend options: refused with the rest of the config, not when the backend is built
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": "x"}}',
     "vxlan VNI must be a whole number from 0 to 9999999, not 'x'"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": -1}}', "vxlan VNI .* not -1"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 10000000}}', "vxlan VNI"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}',
     "vxlan Port must be a whole number from 0 to 65535, not 70000"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 8472.0}}', "vxlan Port"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Learning": "yes"}}',
     "vxlan Learning must be true or false, not 'yes'"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": 1}}', "DirectRouting must be true"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": "x"}}',
     "udp Port must be a whole number from 1 to 65535, not 'x'"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 0}}', "udp Port .* not 0"),
])
def test_bad_configs(raw, words):
    with pytest.raises(ConfigError, match=words):
        parse(raw)


def test_backend_options_absent_or_null_take_the_default():
    c = parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": null, "Port": 4789}}')
    assert c.option("VNI", 1) == 1 and c.option("Port", 0) == 4789 and c.option("Learning", False) is False
    assert c.backend == {"Type": "vxlan", "VNI": None, "Port": 4789}       # kept as written
    assert parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw", "VNI": "x"}}').backend_type == "host-gw"


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
