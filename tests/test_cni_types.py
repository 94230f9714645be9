"""cni.types: rendering the internal (1.1.0) result for every spec version and back.

The expected shapes are those of libcni's types/020, types/040 (0.3.0, 0.3.1,
0.4.0), types/100 (1.0.0) and the 1.1.0 additions: `version` in ips up to
0.4.0, none from 1.0.0; interface mtu/socketPath/pciID and route
mtu/advmss/priority/table/scope only in 1.1.0; 0.1.0/0.2.0 have one ip4 and
one ip6 block with the routes of their family; "dns" is always printed.
"""
import copy

import pytest

from cni import errors
from cni.errors import CNIError
from cni.types import LATEST, SUPPORTED_VERSIONS, check_supported, empty_result, from_version, to_version, version_tuple

V020 = ("0.1.0", "0.2.0")
V040 = ("0.3.0", "0.3.1", "0.4.0")


def internal():
    """A full internal result: bridge + veth + container interface, v4 and v6."""
    return {
        "interfaces": [
            {"name": "cni0", "mac": "0a:58:0a:f4:01:01", "mtu": 1450},
            {"name": "veth1234", "mac": "ee:ee:ee:00:00:01", "mtu": 1450},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": "/var/run/netns/pod",
             "mtu": 1450, "socketPath": "/run/vhost.sock", "pciID": "0000:00:1f.6"},
        ],
        "ips": [
            {"interface": 2, "address": "10.244.1.7/24", "gateway": "10.244.1.1"},
            {"interface": 2, "address": "fd00:1::7/64", "gateway": "fd00:1::1"},
        ],
        "routes": [
            {"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1400, "advmss": 1360,
             "priority": 100, "table": 0, "scope": 0},
            {"dst": "10.96.0.0/12"},
            {"dst": "::/0", "gw": "fd00:1::1", "table": 254},
        ],
        "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
                "search": ["default.svc.cluster.local"], "options": ["ndots:5"]},
    }


def test_supported_versions():
    assert SUPPORTED_VERSIONS == ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
    assert LATEST == "1.1.0"
    for v in SUPPORTED_VERSIONS:
        check_supported(v)
    assert empty_result() == {"interfaces": [], "ips": [], "routes": [], "dns": {}}


@pytest.mark.parametrize("bad", ["0.5.0", "2.0.0", "1.0", "", None, "v1.0.0"])
def test_check_supported_rejects(bad):
    with pytest.raises(CNIError) as e:
        check_supported(bad)
    assert e.value.code == errors.INCOMPATIBLE_VERSION
    for v in SUPPORTED_VERSIONS:
        assert '"%s"' % v in e.value.msg


@pytest.mark.parametrize("bad", ["1.0", "1.0.0.0", "a.b.c", "", None, 1, "1..0"])
def test_version_tuple_rejects(bad):
    with pytest.raises(CNIError) as e:
        version_tuple(bad)
    assert e.value.code == errors.INCOMPATIBLE_VERSION


def test_version_tuple_orders_numerically():
    assert version_tuple("0.10.0") > version_tuple("0.4.0")
    assert version_tuple("1.1.0") == (1, 1, 0)


def test_to_110_keeps_everything():
    out = to_version(internal(), "1.1.0")
    assert out == {"cniVersion": "1.1.0", **internal()}
    assert list(out) == ["cniVersion", "interfaces", "ips", "routes", "dns"]


def test_to_100_drops_11_fields_and_version():
    out = to_version(internal(), "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert out["interfaces"] == [
        {"name": "cni0", "mac": "0a:58:0a:f4:01:01"},
        {"name": "veth1234", "mac": "ee:ee:ee:00:00:01"},
        {"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": "/var/run/netns/pod"},
    ]
    assert out["ips"] == [
        {"interface": 2, "address": "10.244.1.7/24", "gateway": "10.244.1.1"},
        {"interface": 2, "address": "fd00:1::7/64", "gateway": "fd00:1::1"},
    ]
    assert out["routes"] == [
        {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "10.96.0.0/12"},
        {"dst": "::/0", "gw": "fd00:1::1"},
    ]
    assert out["dns"] == internal()["dns"]


@pytest.mark.parametrize("version", V040)
def test_to_040_family_ips_carry_version(version):
    out = to_version(internal(), version)
    assert out["cniVersion"] == version
    assert out["ips"] == [
        {"version": "4", "interface": 2, "address": "10.244.1.7/24", "gateway": "10.244.1.1"},
        {"version": "6", "interface": 2, "address": "fd00:1::7/64", "gateway": "fd00:1::1"},
    ]
    assert list(out["ips"][0]) == ["version", "interface", "address", "gateway"]  # Go's order
    assert out["interfaces"] == to_version(internal(), "1.0.0")["interfaces"]
    assert out["routes"] == to_version(internal(), "1.0.0")["routes"]
    assert out["dns"] == internal()["dns"]


@pytest.mark.parametrize("version", V020)
def test_to_020_shape(version):
    out = to_version(internal(), version)
    assert out == {
        "cniVersion": version,
        "ip4": {"ip": "10.244.1.7/24", "gateway": "10.244.1.1",
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "10.96.0.0/12"}]},
        "ip6": {"ip": "fd00:1::7/64", "gateway": "fd00:1::1",
                "routes": [{"dst": "::/0", "gw": "fd00:1::1"}]},
        "dns": internal()["dns"],
    }


@pytest.mark.parametrize("version", V020)
def test_to_020_single_family(version):
    result = {"ips": [{"interface": 0, "address": "10.0.0.2/24"}],
              "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}]}
    # A route of a family without an address has nowhere to go (as libcni).
    assert to_version(result, version) == {
        "cniVersion": version, "ip4": {"ip": "10.0.0.2/24", "routes": [{"dst": "0.0.0.0/0"}]},
        "dns": {}}


@pytest.mark.parametrize("version", V020)
@pytest.mark.parametrize("addresses", [["10.0.0.2/24", "10.0.0.3/24"],
                                       ["fd00::2/64", "10.0.0.2/24", "fd00::3/64"]])
def test_to_020_two_addresses_of_a_family_is_an_error(version, addresses):
    result = {"ips": [{"address": a} for a in addresses]}
    with pytest.raises(CNIError) as e:
        to_version(result, version)
    assert e.value.code == errors.INCOMPATIBLE_VERSION
    assert version in e.value.msg


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_dns_always_present_and_empty_lists_omitted(version):
    for result in (empty_result(), {}, {"ips": [], "dns": None}):
        assert to_version(result, version) == {"cniVersion": version, "dns": {}}


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_to_version_does_not_modify_its_input(version):
    result = internal()
    if version in V020:
        del result["ips"][1]["interface"]
    before = copy.deepcopy(result)
    to_version(result, version)
    assert result == before


def test_zero_interface_index_and_zero_table_are_kept():
    result = {"ips": [{"interface": 0, "address": "10.0.0.2/24"}],
              "routes": [{"dst": "10.1.0.0/16", "table": 0, "scope": 0, "mtu": 0}]}
    out = to_version(result, "1.1.0")
    assert out["ips"] == [{"interface": 0, "address": "10.0.0.2/24"}]
    # table and scope are *int in libcni: 0 is a value; mtu is omitempty but 0 is harmless.
    assert out["routes"][0]["table"] == 0 and out["routes"][0]["scope"] == 0
    assert "interface" not in to_version({"ips": [{"address": "10.0.0.2/24"}]}, "1.0.0")["ips"][0]


def test_empty_interface_fields_are_omitted():
    out = to_version({"interfaces": [{"name": "eth0", "mac": "", "sandbox": None, "mtu": 0}]},
                     "1.1.0")
    assert out["interfaces"] == [{"name": "eth0"}]


# --- from_version ------------------------------------------------------------------

def _without_11(result):
    out = copy.deepcopy(result)
    for iface in out["interfaces"]:
        for k in ("mtu", "socketPath", "pciID"):
            iface.pop(k, None)
    for route in out["routes"]:
        for k in ("mtu", "advmss", "priority", "table", "scope"):
            route.pop(k, None)
    return out


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_round_trip(version):
    rendered = to_version(internal(), version)
    back = from_version(rendered, version)
    if version == "1.1.0":
        assert back == internal()
    elif version in V020:
        expect = _without_11(internal())
        expect["interfaces"] = []
        for ip in expect["ips"]:
            del ip["interface"]
        assert back == expect
    else:
        assert back == _without_11(internal())
    # And rendering again gives the same document.
    assert to_version(back, version) == rendered


@pytest.mark.parametrize("version", V040)
def test_from_040_drops_version_field(version):
    raw = {"cniVersion": version, "ips": [{"version": "4", "address": "10.0.0.2/24"}]}
    assert from_version(raw, version)["ips"] == [{"address": "10.0.0.2/24"}]


@pytest.mark.parametrize("version", V020)
def test_from_020(version):
    raw = {"cniVersion": version,
           "ip4": {"ip": "10.0.0.2/24", "gateway": "10.0.0.1",
                   "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}]},
           "ip6": {"ip": "fd00::2/64"},
           "dns": {"nameservers": ["10.0.0.53"]}}
    assert from_version(raw, version) == {
        "interfaces": [],
        "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}, {"address": "fd00::2/64"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
        "dns": {"nameservers": ["10.0.0.53"]},
    }
    assert from_version({"cniVersion": version, "ip4": None}, version) == empty_result()


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_from_version_minimal_and_no_aliasing(version):
    assert from_version({"cniVersion": version}, version) == empty_result()
    raw = to_version(internal(), version)
    back = from_version(raw, version)
    back["dns"]["nameservers"] = back["dns"].get("nameservers", []) + ["x"]
    for ip in back["ips"]:
        ip["address"] = "changed"
    assert raw == to_version(internal(), version)


MALFORMED_NEW = [
    [],
    "result",
    None,
    {"ips": {"address": "10.0.0.2/24"}},
    {"ips": ["10.0.0.2/24"]},
    {"ips": [{"gateway": "10.0.0.1"}]},
    {"ips": [{"address": 167772162}]},
    {"ips": [{"address": None}]},
    {"ips": [{"address": "10.0.0.2/24", "interface": "0"}]},
    {"ips": [{"address": "10.0.0.2/24", "interface": True}]},
    {"ips": [{"address": "10.0.0.2/24", "gateway": 5}]},
    {"interfaces": {"name": "eth0"}},
    {"interfaces": ["eth0"]},
    {"interfaces": [5]},
    {"routes": "0.0.0.0/0"},
    {"routes": ["0.0.0.0/0"]},
    {"routes": [{"gw": "10.0.0.1"}]},
    {"routes": [{"dst": 0}]},
    {"dns": ["10.0.0.53"]},
    {"dns": "10.0.0.53"},
    # Regression (issue 12, defect 13): accepted, then a plugin using the value failed
    # with 999 (bridge CHECK parses gw and address) or echoed it into its result.
    {"ips": [{"address": "10.0.0.2"}]},                    # not a CIDR
    {"ips": [{"address": "garbage/24"}]},
    {"ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0"}]},
    {"routes": [{"dst": "0.0.0.0/0", "gw": 5}]},
    {"routes": [{"dst": "0.0.0.0/0", "gw": "x"}]},
    {"routes": [{"dst": "0.0.0.0"}]},
    {"routes": [{"dst": "0.0.0.0/0", "mtu": "1500"}]},
    {"routes": [{"dst": "0.0.0.0/0", "table": True}]},
    {"interfaces": [{"name": 5}]},
    {"interfaces": [{"name": "eth0", "mac": ["aa"]}]},
    {"interfaces": [{"name": "eth0", "sandbox": {}}]},
    {"interfaces": [{"name": "eth0", "mtu": "1500"}]},
    {"dns": {"nameservers": "10.0.0.53"}},
    {"dns": {"search": [1]}},
    {"dns": {"domain": ["a"]}},
]

MALFORMED_020 = [
    {"ip4": "10.0.0.2/24"},
    {"ip4": {"gateway": "10.0.0.1"}},
    {"ip4": {"ip": 5}},
    {"ip6": ["fd00::2/64"]},
    {"ip4": {"ip": "10.0.0.2/24", "routes": {"dst": "0.0.0.0/0"}}},
    {"ip4": {"ip": "10.0.0.2/24", "routes": ["0.0.0.0/0"]}},
    {"ip4": {"ip": "10.0.0.2/24", "routes": [{"gw": "10.0.0.1"}]}},
    {"ip4": {"ip": "10.0.0.2/24", "gateway": 1}},
    {"dns": 1},
    {"ip4": {"ip": "10.0.0.2"}},
    {"ip4": {"ip": "10.0.0.2/24", "gateway": "10.0.0.300"}},
    {"ip4": {"ip": "10.0.0.2/24", "routes": [{"dst": "0.0.0.0/0", "gw": 7}]}},
    {"ip4": {"ip": "10.0.0.2/24"}, "dns": {"nameservers": [1]}},
]


@pytest.mark.parametrize("version", ("0.3.1", "0.4.0", "1.0.0", "1.1.0"))
@pytest.mark.parametrize("raw", MALFORMED_NEW, ids=[repr(r)[:40] for r in MALFORMED_NEW])
def test_malformed_prev_result_is_decoding_failure(raw, version):
    with pytest.raises(CNIError) as e:
        from_version(raw, version)
    assert e.value.code == errors.DECODING_FAILURE


@pytest.mark.parametrize("version", V020)
@pytest.mark.parametrize("raw", MALFORMED_020, ids=[repr(r)[:40] for r in MALFORMED_020])
def test_malformed_020_prev_result_is_decoding_failure(raw, version):
    with pytest.raises(CNIError) as e:
        from_version(raw, version)
    assert e.value.code == errors.DECODING_FAILURE


@pytest.mark.parametrize("version", ["0.5.0", "2.0.0", "1.0", "", None])
def test_from_unsupported_version(version):
    """A delegate's result in a version we do not know is not guessed at."""
    with pytest.raises(CNIError) as e:
        from_version({"cniVersion": version, "ips": []}, version)
    assert e.value.code == errors.INCOMPATIBLE_VERSION


def test_cnierror_to_dict_and_str():
    e = CNIError(7, "bad config", "field x")
    assert e.to_dict("1.0.0") == {"cniVersion": "1.0.0", "code": 7, "msg": "bad config",
                                  "details": "field x"}
    assert str(e) == "bad config; field x"
    assert CNIError(7, "bad").to_dict("0.4.0") == {"cniVersion": "0.4.0", "code": 7, "msg": "bad"}
    assert str(CNIError(7, "bad")) == "bad" and "CNIError(7" in repr(e)
