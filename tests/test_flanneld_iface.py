"""flanneld.iface: flannel's rules for the interface and address, as pure functions over plain data.

The kernel's side (the same rules on a node with three interfaces) is in
netns_tests/test_flanneld_kube_cluster.py."""
import logging

import pytest

from flanneld.iface import (
    IFA_F_DEPRECATED,
    IFA_F_PERMANENT,
    IFA_F_SECONDARY,
    Addr,
    Iface,
    NoInterface,
    Route,
    by_regex,
    choose,
    usable_addrs,
)
from podnet.net.ip import parse_ip


def addr(text, flags=IFA_F_PERMANENT):
    ip, _, plen = text.partition("/")
    return Addr(parse_ip(ip), int(plen or 32), flags)


LO = Iface(1, "lo", 65536, (addr("127.0.0.1/8"),))
ETH0 = Iface(2, "eth0", 1500, (addr("192.168.50.2/24"),))
ETH1 = Iface(3, "eth1", 9000, (addr("10.20.0.2/24"),))
ETH2 = Iface(4, "eth2", 1400, (addr("172.30.0.2/24"), addr("172.30.0.3/24", IFA_F_PERMANENT | IFA_F_SECONDARY)))
IFACES = [LO, ETH0, ETH1, ETH2]
DEFAULT = [Route(24, 2), Route(0, 2), Route(16, 4)]


def no_route(ip):
    raise OSError(101, "Network is unreachable")


def pick(ifaces=IFACES, routes=DEFAULT, route_get=no_route, **kw):
    ext = choose(ifaces, routes, route_get, **kw)
    return ext.name, str(ext.ip), ext.prefixlen, ext.mtu


def test_default_route_interface_and_its_first_address():
    assert pick() == ("eth0", "192.168.50.2", 24, 1500)


def test_no_default_route_is_an_error_not_a_guess():
    with pytest.raises(NoInterface, match="unable to find a default route"):
        pick(routes=[Route(24, 2)])
    with pytest.raises(NoInterface, match="could not determine its interface"):
        pick(routes=[Route(0, 0)])          # a multipath default route has no single oif


def test_public_ip_alone_is_looked_up_among_the_interfaces():
    """flannel: with no --iface*, --public-ip names the interface that holds it."""
    assert pick(public_ip="10.20.0.2") == ("eth1", "10.20.0.2", 24, 9000)
    with pytest.raises(NoInterface, match="no interface has the address 203.0.113.1"):
        pick(public_ip="203.0.113.1")


def test_iface_by_name_or_ip_first_match_wins_and_misses_are_logged(caplog):
    assert pick(names=["eth1"])[:2] == ("eth1", "10.20.0.2")
    assert pick(names=["172.30.0.3"])[:2] == ("eth2", "172.30.0.3")      # the very address, secondary or not
    with caplog.at_level(logging.INFO, logger="flanneld.iface"):
        assert pick(names=["eth7", "10.9.9.9", "eth2"])[:2] == ("eth2", "172.30.0.2")
    assert "could not find a valid interface matching eth7: no interface is named eth7" in caplog.text
    assert "matching 10.9.9.9: no interface has the address 10.9.9.9" in caplog.text


def test_public_ip_overrides_the_address_but_not_the_interface():
    assert pick(names=["eth2"], public_ip="203.0.113.7") == ("eth2", "203.0.113.7", 24, 1400)
    with pytest.raises(NoInterface, match="invalid public IP"):
        pick(names=["eth2"], public_ip="nonsense")


def test_regex_matches_addresses_before_names_in_index_order():
    # "2" is in eth0's address: the address loop runs first, over interfaces by index
    assert by_regex(IFACES, "2")[0].name == "eth0"
    assert pick(regexes=[r"^10\.20\."])[:2] == ("eth1", "10.20.0.2")
    assert pick(regexes=[r"\.3$"])[:2] == ("eth2", "172.30.0.3")          # a later address of the interface
    assert pick(regexes=["^eth2$"])[:2] == ("eth2", "172.30.0.2")         # by name: its first usable address
    assert pick(regexes=["^lo"], names=["eth1"])[:2] == ("eth1", "10.20.0.2")   # --iface before --iface-regex
    # unanchored, as Go's MatchString: "th1" finds eth1
    assert pick(regexes=["th1"])[:2] == ("eth1", "10.20.0.2")


def test_regex_that_matches_nothing_names_what_exists():
    with pytest.raises(NoInterface) as e:
        pick(regexes=["^wlan"])
    assert "could not match pattern ^wlan" in str(e.value) and "eth1:[10.20.0.2]" in str(e.value)
    with pytest.raises(NoInterface, match="could not compile"):
        pick(regexes=["("])


def test_loopback_has_no_usable_address():
    with pytest.raises(NoInterface, match="failed to find an IPv4 address for interface lo"):
        pick(regexes=["^lo$"])


def test_can_reach_uses_the_route_lookups_interface_and_source():
    calls = []

    def route_get(ip):
        calls.append(str(ip))
        return 4, parse_ip("172.30.0.3")
    assert pick(can_reach="10.99.1.1", route_get=route_get)[:3] == ("eth2", "172.30.0.3", 24)
    assert calls == ["10.99.1.1"]
    # no preferred source: the interface's first usable address
    assert pick(can_reach="10.99.1.1", route_get=lambda ip: (3, None))[:2] == ("eth1", "10.20.0.2")
    # tried last: a matching --iface wins without a lookup
    calls.clear()
    assert pick(names=["eth0"], can_reach="10.99.1.1", route_get=route_get)[0] == "eth0" and calls == []


def test_can_reach_failures():
    with pytest.raises(NoInterface, match="can-reach 10.99.1.1: .*unreachable"):
        pick(can_reach="10.99.1.1")
    with pytest.raises(NoInterface, match="not an IP address"):
        pick(can_reach="somewhere")
    with pytest.raises(NoInterface, match="leaves through no interface"):
        pick(can_reach="10.99.1.1", route_get=lambda ip: (0, None))     # a blackhole


def test_nothing_matches_lists_every_miss():
    with pytest.raises(NoInterface) as e:
        pick(names=["eth9"], regexes=["^wlan"], can_reach="10.1.1.1")
    text = str(e.value)
    assert "--iface eth9" in text and "--iface-regex ^wlan" in text and "--iface-can-reach 10.1.1.1" in text


def test_usable_address_order_and_filter():
    """Global before link-local, permanent before dynamic, primary before secondary;
    loopback, multicast, 0.0.0.0, broadcast and deprecated addresses never."""
    iface = Iface(5, "ens1", 1500, (
        addr("169.254.3.3/16"), addr("10.0.0.9/24", 0), addr("127.0.0.2/8"), addr("224.0.0.5/32"),
        addr("10.0.1.1/24", IFA_F_PERMANENT | IFA_F_DEPRECATED), addr("10.0.2.2/24", IFA_F_PERMANENT | IFA_F_SECONDARY),
        addr("10.0.3.3/24"), addr("0.0.0.0/32"), addr("255.255.255.255/32"), addr("240.0.0.1/8")))
    assert [str(a.ip) for a in usable_addrs(iface)] == ["10.0.3.3", "240.0.0.1", "10.0.2.2", "10.0.0.9",
                                                         "169.254.3.3"]


def test_mtu_zero_is_refused():
    with pytest.raises(NoInterface, match="MTU"):
        pick(ifaces=[Iface(2, "eth0", 0, (addr("192.168.50.2/24"),))], routes=[Route(0, 2)])
