"""podnet.net.ip, with the standard `ipaddress` module as the oracle.

What is accepted follows Go's net.ParseIP / net.ParseCIDR, because the same CNI
configs are parsed by Go (containerd, the reference plugins, kubelet):

* IPv4 is exactly four decimal octets; leading zeros ("01.2.3.4") are
  rejected (Go >= 1.17: ambiguous octal), as are hex, short forms ("1.2.3")
  and any whitespace.
* IPv6 zones ("fe80::1%eth0") are rejected: ParseCIDR refuses them too.
* The prefix length is ASCII decimal digits; leading zeros are accepted
  ("/024" is /24, Go's dtoi takes them), signs, spaces and non-ASCII digits
  ("/٢٤") are not, nor is anything above 32 / 128.
* Anything that is not a str (None, ints, bytes) is a ValueError, like any
  other bad input, so callers need one except clause.

Formatting is RFC 5952 (what Go and `ipaddress` print), with one documented
exception: IPv4-mapped addresses print in mixed notation, "::ffff:1.2.3.4"
(as Go's netip and Python >= 3.13 do; Python 3.11's ipaddress prints
"::ffff:102:304").
"""
import ipaddress
import random

import pytest

from podnet.net.ip import AF_INET, AF_INET6, IP, IPNet, parse_cidr, parse_ip, parse_net


def v4(text):
    return parse_ip(text)


def test_parse_ip_v4():
    ip = parse_ip("10.1.2.3")
    assert ip.family == AF_INET and ip.version == 4 and ip.bits == 32
    assert ip.value == (10 << 24) | (1 << 16) | (2 << 8) | 3
    assert str(ip) == "10.1.2.3"
    assert repr(ip) == "IP(10.1.2.3)"
    assert ip.packed() == bytes([10, 1, 2, 3])
    assert parse_ip("0.0.0.0").value == 0
    assert parse_ip("255.255.255.255").value == 2 ** 32 - 1


def test_parse_ip_v6():
    ip = parse_ip("FD00::A:1")
    assert ip.family == AF_INET6 and ip.version == 6 and ip.bits == 128
    assert str(ip) == "fd00::a:1"               # lower case, RFC 5952
    assert ip.packed() == ipaddress.IPv6Address("fd00::a:1").packed
    assert parse_ip("::").value == 0
    assert str(parse_ip("::1")) == "::1"
    assert str(parse_ip("2001:db8:0:0:1:0:0:1")) == "2001:db8::1:0:0:1"   # longest run
    assert str(parse_ip("2001:db8:0:1:1:1:1:1")) == "2001:db8:0:1:1:1:1:1"  # no :: for one 0
    assert str(parse_ip("1:2:3:4:5:6:1.2.3.4")) == "1:2:3:4:5:6:102:304"


def test_ipv4_mapped_and_compatible_formatting():
    # Mapped: mixed notation (RFC 5952 section 5, Go netip).
    assert str(parse_ip("::ffff:1.2.3.4")) == "::ffff:1.2.3.4"
    assert parse_ip("::ffff:1.2.3.4").family == AF_INET6
    # Regression: glibc's inet_ntop printed the deprecated IPv4-compatible form
    # "::1.2.3.4" for ::/96; Go and ipaddress print hex.
    assert str(parse_ip("::1.2.3.4")) == "::102:304"
    assert str(IP(AF_INET6, 0x10000)) == "::1:0"
    assert str(IP(AF_INET6, 0xFFFFFFFF)) == "::ffff:ffff"
    assert str(IP(AF_INET6, 0xFFFF)) == "::ffff"
    assert str(IP(AF_INET6, 1 << 32)) == "::1:0:0"


@pytest.mark.parametrize("text", [
    "", "1.2.3", "1.2.3.4.5", "1.2.3.", ".1.2.3", "256.1.1.1", "1.2.3.256", "-1.2.3.4",
    "01.2.3.4", "1.2.3.04", "1.2.3.00", "0x1.2.3.4", "1.2.3.4 ", " 1.2.3.4", "1.2.3.4\n",
    "1. 2.3.4", "1.2.3.4/24", "١.2.3.4", "a.b.c.d", "1.2.3.4\x00",
    ":", ":::", "1::2::3", "1:2:3:4:5:6:7:8:9", "12345::", "g::1", "::1 ", "fe80::1%eth0",
    "::ffff:1.2.3", "[::1]", "localhost",
])
def test_parse_ip_rejects(text):
    with pytest.raises(ValueError):
        parse_ip(text)


@pytest.mark.parametrize("value", [None, 167772161, b"10.0.0.1", 1.0, ["10.0.0.1"]])
def test_parse_ip_rejects_non_strings(value):
    with pytest.raises(ValueError):
        parse_ip(value)


def test_parse_cidr_keeps_host_bits():
    net = parse_cidr("10.1.2.3/24")
    assert net.ip == parse_ip("10.1.2.3") and net.prefixlen == 24
    assert str(net) == "10.1.2.3/24" and repr(net) == "IPNet(10.1.2.3/24)"
    assert net.family == AF_INET and net.version == 4
    assert parse_net("10.1.2.3/24") == parse_cidr("10.1.2.0/24")
    assert str(parse_net("fd00::1:2/112")) == "fd00::1:0/112"
    assert str(parse_cidr("::1/128")) == "::1/128"
    assert str(parse_cidr("0.0.0.0/0")) == "0.0.0.0/0"


@pytest.mark.parametrize("text,expect", [
    ("1.2.3.4/024", "1.2.3.4/24"),       # Go's dtoi accepts leading zeros
    ("1.2.3.4/0024", "1.2.3.4/24"),
    ("1.2.3.4/00", "1.2.3.4/0"),
    ("::1/0128", "::1/128"),
])
def test_parse_cidr_leading_zeros_in_prefix(text, expect):
    assert str(parse_cidr(text)) == expect


@pytest.mark.parametrize("text", [
    "1.2.3.4", "1.2.3.4/", "/24", "/", "1.2.3/24", "1.2.3.4/33", "1.2.3.4/-1", "1.2.3.4/+24",
    "1.2.3.4/ 24", "1.2.3.4/24 ", " 1.2.3.4/24", "1.2.3.4/24/", "1.2.3.4/2 4", "1.2.3.4/0x18",
    "1.2.3.4/٢٤", "1.2.3.4/²", "1.2.3.4/1e1", "1.2.3.4/255.255.255.0", "01.2.3.4/24",
    "::1/129", "::1/1280", "fe80::1%eth0/64", "::/", "10.0.0.0/24\n",
])
def test_parse_cidr_rejects(text):
    with pytest.raises(ValueError):
        parse_cidr(text)
    with pytest.raises(ValueError):
        parse_net(text)


@pytest.mark.parametrize("value", [None, 24, b"10.0.0.0/8", ("10.0.0.0", 8)])
def test_parse_cidr_rejects_non_strings(value):
    with pytest.raises(ValueError):
        parse_cidr(value)


def test_network_broadcast_netmask():
    net = parse_cidr("10.1.2.3/22")
    assert str(net.network) == "10.1.0.0"
    assert str(net.broadcast) == "10.1.3.255"
    assert str(net.netmask) == "255.255.252.0"
    assert net.hostmask == 1023
    assert net.size() == 1024
    assert str(net.masked()) == "10.1.0.0/22"
    assert net.masked().masked() == net.masked()
    host = parse_cidr("10.1.2.3/32")
    assert host.network == host.broadcast == host.ip and host.size() == 1
    assert str(host.netmask) == "255.255.255.255"
    everything = parse_cidr("10.1.2.3/0")
    assert str(everything.network) == "0.0.0.0" and str(everything.netmask) == "0.0.0.0"
    assert everything.size() == 2 ** 32
    six = parse_cidr("fd00::1:2/64")
    assert str(six.network) == "fd00::" and str(six.broadcast) == "fd00::ffff:ffff:ffff:ffff"
    assert str(six.netmask) == "ffff:ffff:ffff:ffff::"
    assert parse_cidr("::/0").size() == 2 ** 128


def test_contains_and_overlaps():
    net = parse_net("10.1.0.0/16")
    assert net.contains(v4("10.1.0.0")) and net.contains(v4("10.1.255.255"))
    assert not net.contains(v4("10.2.0.0")) and not net.contains(v4("10.0.255.255"))
    assert not net.contains(parse_ip("::a01:0"))          # other family, same bits
    assert parse_cidr("10.1.2.3/16").contains(v4("10.1.9.9"))   # host bits ignored
    assert net.overlaps(parse_net("10.1.5.0/24"))
    assert parse_net("10.1.5.0/24").overlaps(net)
    assert net.overlaps(parse_net("10.0.0.0/8")) and net.overlaps(net)
    assert not net.overlaps(parse_net("10.2.0.0/16"))
    assert not parse_net("0.0.0.0/0").overlaps(parse_net("::/0"))
    assert parse_net("fd00::/8").overlaps(parse_net("fd12::/64"))


def test_arithmetic_and_range_errors():
    assert str(v4("10.0.0.255") + 1) == "10.0.1.0"
    assert str(v4("10.0.1.0") - 1) == "10.0.0.255"
    assert v4("10.0.0.5") + 0 == v4("10.0.0.5")
    assert str(v4("10.0.0.5") + -5) == "10.0.0.0"
    assert str(v4("255.255.255.254") + 1) == "255.255.255.255"
    with pytest.raises(ValueError):
        v4("255.255.255.255") + 1
    with pytest.raises(ValueError):
        v4("0.0.0.0") - 1
    with pytest.raises(ValueError):
        v4("0.0.0.0") + 2 ** 32
    assert str(parse_ip("fd00::ffff") + 1) == "fd00::1:0"
    assert str(parse_ip("::") + (2 ** 128 - 1)) == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    with pytest.raises(ValueError):
        parse_ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") + 1
    with pytest.raises(ValueError):
        parse_ip("::") - 1


def test_equality_hash_order_immutability():
    a, b = v4("10.0.0.1"), v4("10.0.0.1")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != parse_ip("::a00:1")                   # same integer, other family
    assert a != "10.0.0.1" and a != a.value
    assert v4("10.0.0.1") < v4("10.0.0.2") <= v4("10.0.0.2")
    assert v4("255.255.255.255") < parse_ip("::")     # IPv4 sorts before IPv6
    assert sorted([v4("10.0.0.10"), v4("10.0.0.9"), v4("9.0.0.0")]) == \
        [v4("9.0.0.0"), v4("10.0.0.9"), v4("10.0.0.10")]
    with pytest.raises(AttributeError):
        a.value = 5
    n1, n2 = parse_cidr("10.0.0.1/24"), parse_cidr("10.0.0.1/24")
    assert n1 == n2 and hash(n1) == hash(n2)
    assert n1 != parse_cidr("10.0.0.1/25") and n1 != parse_cidr("10.0.0.0/24")
    with pytest.raises(AttributeError):
        n1.prefixlen = 8


@pytest.mark.parametrize("plen", [-1, 33, 129])
def test_ipnet_prefix_range(plen):
    with pytest.raises(ValueError):
        IPNet(v4("10.0.0.0"), plen)
    IPNet(parse_ip("::"), 128)


# --- ipaddress as the oracle on random values -------------------------------------

def _random_v6(rng):
    """Random addresses, biased towards runs of zero groups and the special ranges."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.getrandbits(128)
    if kind == 1:
        groups = [rng.choice([0, 0, 0, rng.getrandbits(16)]) for _ in range(8)]
        return int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
    if kind == 2:
        return rng.getrandbits(rng.randrange(1, 33))          # ::/96 (IPv4-compatible)
    if kind == 3:
        return rng.getrandbits(rng.randrange(33, 64))
    return (rng.getrandbits(16) << 112) | rng.getrandbits(16)


def _oracle_v6(value):
    text = str(ipaddress.IPv6Address(value))
    if value >> 32 == 0xFFFF:          # the documented exception: IPv4-mapped
        text = "::ffff:" + str(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    return text


def test_random_v6_format_and_parse_match_ipaddress():
    rng = random.Random(5952)
    for _ in range(5000):
        value = _random_v6(rng)
        ip = IP(AF_INET6, value)
        assert str(ip) == _oracle_v6(value), hex(value)
        assert parse_ip(str(ip)) == ip
        exploded = ipaddress.IPv6Address(value).exploded
        assert parse_ip(exploded) == ip
        assert parse_ip(exploded.upper()) == ip


def test_mapped_range_matches_ipaddress_up_to_notation():
    rng = random.Random(4)
    for _ in range(200):
        value = (0xFFFF << 32) | rng.getrandbits(32)
        ip = IP(AF_INET6, value)
        assert parse_ip(str(ip)) == ip
        assert ipaddress.IPv6Address(str(ip)) == ipaddress.IPv6Address(value)


def test_random_v4_match_ipaddress():
    rng = random.Random(791)
    for _ in range(5000):
        value = rng.getrandbits(32)
        ip = IP(AF_INET, value)
        assert str(ip) == str(ipaddress.IPv4Address(value))
        assert parse_ip(str(ip)).value == value


def _oracle_ip(family, value):
    return ipaddress.IPv4Address(value) if family == AF_INET else ipaddress.IPv6Address(value)


@pytest.mark.parametrize("family,bits", [(AF_INET, 32), (AF_INET6, 128)])
def test_random_prefixes_match_ipaddress(family, bits):
    rng = random.Random(bits)
    for _ in range(2000):
        value, plen = rng.getrandbits(bits), rng.randrange(bits + 1)
        text = "%s/%d" % (IP(family, value), plen)
        net = parse_cidr(text)
        assert net.ip.value == value and net.prefixlen == plen
        oracle = ipaddress.ip_interface("%s/%d" % (_oracle_ip(family, value), plen)).network
        assert net.network.value == int(oracle.network_address)
        assert net.broadcast.value == int(oracle.broadcast_address)
        assert net.netmask.value == int(oracle.netmask)
        assert net.size() == oracle.num_addresses
        assert parse_net(text).ip.value == int(oracle.network_address)
        probe = rng.getrandbits(bits)
        assert net.contains(IP(family, probe)) == (_oracle_ip(family, probe) in oracle)
        other_value, other_plen = rng.getrandbits(bits), rng.randrange(bits + 1)
        other = IPNet(IP(family, other_value), other_plen)
        oracle_other = ipaddress.ip_interface(
            "%s/%d" % (_oracle_ip(family, other_value), other_plen)).network
        assert net.overlaps(other) == oracle.overlaps(oracle_other)
        assert net.overlaps(IPNet(net.network, bits))
