"""ipam.allocator: range parsing and validation, defaults, round-robin order."""
import pytest

from cni import errors
from cni.errors import CNIError
from ipam.allocator import ip_string, parse_addr, parse_range_sets
from podnet.net.ip import AF_INET, AF_INET6, parse_ip


def sets(*range_sets, version="1.0.0", **ipam):
    if range_sets:
        ipam["ranges"] = [list(rs) for rs in range_sets]
    return parse_range_sets(ipam, ipam.pop("runtime", None), version)


def one(**rng):
    return sets([rng])[0]


def take(rs, n, used=None, last=None):
    """Allocate n addresses the way the plugin does; returns their strings."""
    used = set() if used is None else used
    out = []
    for _ in range(n):
        pick = next(rs.free(used, last), None)
        if pick is None:
            out.append(None)
            continue
        _, ip = pick
        used.add(ip.value)
        last = ip
        out.append(str(ip))
    return out


# -- defaults ----------------------------------------------------------------

def test_v4_defaults():
    rs = one(subnet="10.1.0.0/24")
    (r,) = rs.ranges
    assert (str(r.start), str(r.end), str(r.gateway)) == ("10.1.0.1", "10.1.0.254", "10.1.0.1")
    assert str(rs) == "10.1.0.1-10.1.0.254"
    assert rs.family == AF_INET
    assert take(rs, 3) == ["10.1.0.2", "10.1.0.3", "10.1.0.4"]   # .1 is the gateway


def test_v6_defaults_end_at_last_address():
    rs = one(subnet="fd00::/120")
    (r,) = rs.ranges
    assert (str(r.start), str(r.end), str(r.gateway)) == ("fd00::1", "fd00::ff", "fd00::1")
    assert rs.family == AF_INET6
    assert take(rs, 2) == ["fd00::2", "fd00::3"]


def test_v6_large_subnet_defaults():
    rs = one(subnet="fd00:1::/64")
    assert str(rs) == "fd00:1::1-fd00:1::ffff:ffff:ffff:ffff"
    assert take(rs, 1, last=parse_ip("fd00:1::ffff:ffff:ffff:fffe")) == ["fd00:1::ffff:ffff:ffff:ffff"]


def test_explicit_gateway_and_range():
    rs = one(subnet="10.1.0.0/24", rangeStart="10.1.0.10", rangeEnd="10.1.0.12", gateway="10.1.0.11")
    assert take(rs, 3) == ["10.1.0.10", "10.1.0.12", None]


def test_gateway_outside_the_range_is_not_skipped_inside_it():
    rs = one(subnet="10.1.0.0/24", gateway="10.1.0.254")
    assert take(rs, 2) == ["10.1.0.1", "10.1.0.2"]


# -- never the network, broadcast or gateway ---------------------------------

def test_skip_network_broadcast_and_gateway_even_in_explicit_range():
    rs = one(subnet="10.1.0.0/30", rangeStart="10.1.0.0", rangeEnd="10.1.0.3")
    assert take(rs, 2) == ["10.1.0.2", None]
    (r,) = rs.ranges
    assert r.reserved_reason(parse_ip("10.1.0.0")) == "the network address of 10.1.0.0/30"
    assert r.reserved_reason(parse_ip("10.1.0.1")) == "subnet's gateway"
    assert r.reserved_reason(parse_ip("10.1.0.3")) == "the broadcast address of 10.1.0.0/30"
    assert r.reserved_reason(parse_ip("10.1.0.2")) is None


def test_v6_last_address_is_allocatable_network_address_is_not():
    rs = one(subnet="fd00::/126", rangeStart="fd00::")
    assert take(rs, 3) == ["fd00::2", "fd00::3", None]


# -- round-robin -------------------------------------------------------------

def test_round_robin_continues_after_last_reserved():
    rs = one(subnet="10.1.0.0/24")
    # The next pick follows `last`, not the lowest free address (.2 is free here).
    assert take(rs, 1, last=parse_ip("10.1.0.7")) == ["10.1.0.8"]
    # Used addresses after `last` are skipped.
    used = {parse_ip("10.1.0.8").value, parse_ip("10.1.0.9").value}
    assert take(rs, 1, used=used, last=parse_ip("10.1.0.7")) == ["10.1.0.10"]


def test_last_reserved_outside_the_set_starts_at_range_start():
    rs = one(subnet="10.1.0.0/24", rangeStart="10.1.0.100")
    assert take(rs, 1, last=parse_ip("10.9.0.5")) == ["10.1.0.100"]
    assert take(rs, 1, last=parse_ip("10.1.0.50")) == ["10.1.0.100"]   # in subnet, not in range
    assert take(rs, 1, last=parse_ip("fd00::5")) == ["10.1.0.100"]


def test_wrap_around_within_one_range():
    rs = one(subnet="10.1.0.0/24", rangeEnd="10.1.0.5")
    used = {parse_ip("10.1.0.3").value}
    assert take(rs, 4, used=used, last=parse_ip("10.1.0.4")) == ["10.1.0.5", "10.1.0.2", "10.1.0.4", None]


def test_wrap_around_across_ranges_of_a_set():
    rs = sets([{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.11"},
               {"subnet": "10.2.0.0/24", "rangeStart": "10.2.0.20", "rangeEnd": "10.2.0.21"}])[0]
    assert take(rs, 5, last=parse_ip("10.1.0.11")) == [
        "10.2.0.20", "10.2.0.21", "10.1.0.10", "10.1.0.11", None]
    # From the end of the last range back to the first.
    assert take(rs, 1, last=parse_ip("10.2.0.21")) == ["10.1.0.10"]


def test_ordered_visits_every_address_once_and_last_at_the_end():
    rs = sets([{"subnet": "10.1.0.0/29"}, {"subnet": "10.2.0.0/29"}])[0]
    last = parse_ip("10.1.0.3")
    order = [v for _, v in rs.ordered(last)]
    assert len(order) == len(set(order)) == 12
    assert order[0] == last.value + 1 and order[-1] == last.value


def test_exhausted_range_set():
    rs = one(subnet="10.1.0.0/29")
    got = take(rs, 6)
    assert got[:5] == ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
    assert got[5] is None


# -- range sets --------------------------------------------------------------

def test_two_range_sets_v4_and_v6():
    v4, v6 = sets([{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}])
    assert (v4.family, v6.family) == (AF_INET, AF_INET6)
    assert take(v4, 1) == ["10.1.0.2"] and take(v6, 1) == ["fd00::2"]
    assert v4.contains(parse_ip("10.1.0.9")) and not v4.contains(parse_ip("fd00::9"))
    assert v6.range_for(parse_ip("fd00::9")).gateway == parse_ip("fd00::1")


def test_legacy_range_comes_first_and_runtime_ranges_before_it():
    got = sets([{"subnet": "10.1.0.0/24"}], subnet="10.2.0.0/24", rangeStart="10.2.0.5",
               runtime=[[{"subnet": "10.3.0.0/24"}]])
    assert [str(rs) for rs in got] == ["10.3.0.1-10.3.0.254", "10.2.0.5-10.2.0.254",
                                       "10.1.0.1-10.1.0.254"]


def test_split_subnet_into_two_ranges_of_one_set():
    rs = sets([{"subnet": "10.1.0.0/24", "rangeEnd": "10.1.0.10"},
               {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.11"}])[0]
    assert len(rs.ranges) == 2


def test_contains_is_range_not_subnet_membership():
    rs = one(subnet="10.1.0.0/24", rangeStart="10.1.0.100")
    assert rs.contains(parse_ip("10.1.0.100"))
    assert not rs.contains(parse_ip("10.1.0.99"))


def test_parse_addr_canonicalises_v4_mapped():
    assert parse_addr("::ffff:10.1.0.5") == parse_ip("10.1.0.5")
    with pytest.raises(ValueError, match="invalid IP address: nope"):
        parse_addr("nope")


# -- validation --------------------------------------------------------------

BAD = [
    ({"subnet": "bogus"}, "invalid range set 0: invalid CIDR address: bogus"),
    ({"subnet": "10.1.0.0"}, "invalid CIDR address: 10.1.0.0"),
    ({"subnet": "10.1.0.0/33"}, "invalid CIDR address: 10.1.0.0/33"),
    ({"subnet": 5}, "invalid CIDR address: 5"),
    ({"subnet": "10.1.0.5/24"},
     "Network has host bits set. For a subnet mask of length 24 the network address is 10.1.0.0"),
    ({"subnet": "10.1.0.0/31"}, "Network 10.1.0.0/31 too small to allocate from"),
    ({"subnet": "fd00::/127"}, "Network fd00::/127 too small to allocate from"),
    ({"subnet": "10.1.0.0/24", "gateway": "10.2.0.5"}, "gateway 10.2.0.5 not in network 10.1.0.0/24"),
    ({"subnet": "10.1.0.0/24", "gateway": "x"}, "invalid IP address: x"),
    ({"subnet": "10.1.0.0/24", "rangeStart": "10.1.1.5"},
     "RangeStart 10.1.1.5 not in network 10.1.0.0/24"),
    ({"subnet": "10.1.0.0/24", "rangeStart": "fd00::1"}, "RangeStart fd00::1 not in network 10.1.0.0/24"),
    ({"subnet": "10.1.0.0/24", "rangeEnd": "10.1.1.0"}, "RangeEnd 10.1.1.0 not in network 10.1.0.0/24"),
    ({"subnet": "10.1.0.0/24", "rangeStart": "bogus"}, "invalid IP address: bogus"),
    ({"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.50", "rangeEnd": "10.1.0.10"},
     "RangeStart 10.1.0.50 is after RangeEnd 10.1.0.10"),
    ({"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"}]]},
     "invalid range set 0: mixed address families"),
    ({"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/25"}]]}, "range set 0 overlaps with 1"),
    ({"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}], [{"subnet": "fd00::/120"}]]},
     "range set 1 overlaps with 2"),
    ({"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "10.1.0.0/25"}]]},
     "invalid range set 0: subnets 10.1.0.1-10.1.0.254 and 10.1.0.1-10.1.0.126 overlap"),
    ({"ranges": [[{"subnet": "10.1.0.0/24", "rangeEnd": "10.1.0.10"},
                  {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10"}]]}, "overlap"),
    ({"ranges": [[]]}, "invalid range set 0: empty range set"),
    ({"ranges": []}, "no IP ranges specified"),
    ({}, "no IP ranges specified"),
    ({"ranges": {}}, "ipam.ranges must be a list of range sets"),
    ({"ranges": [{"subnet": "10.1.0.0/24"}]}, "a range set must be a list of ranges"),
    ({"ranges": [["10.1.0.0/24"]]}, "a range must be an object"),
    ({"ranges": [[{}]]}, "invalid range set 0: range has no subnet"),
    ({"ranges": [[{"subnet": "10.1.0.0/24"}]], "subnet": "10.1.0.0/16"}, "range set 0 overlaps with 1"),
]


@pytest.mark.parametrize("ipam,message", BAD, ids=[m[:40] for _, m in BAD])
def test_invalid_ranges(ipam, message):
    with pytest.raises(CNIError) as e:
        parse_range_sets(dict(ipam), None, "1.0.0")
    assert e.value.code == errors.INVALID_NETCONF
    assert message in e.value.msg


def test_old_spec_allows_one_address_per_family():
    two_v4 = {"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.2.0.0/24"}]]}
    with pytest.raises(CNIError) as e:
        parse_range_sets(two_v4, None, "0.2.0")
    assert e.value.code == errors.INVALID_NETCONF
    assert "CNI version 0.2.0 does not support more than 1 address per family" in e.value.msg
    assert len(parse_range_sets(two_v4, None, "0.3.0")) == 2
    v4_v6 = {"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]]}
    assert len(parse_range_sets(v4_v6, None, "0.2.0")) == 2


def test_bad_runtime_ip_ranges():
    with pytest.raises(CNIError) as e:
        parse_range_sets({}, {"subnet": "10.1.0.0/24"}, "1.0.0")
    assert e.value.code == errors.INVALID_NETCONF


@pytest.mark.parametrize("text,go", [
    ("10.1.0.2", "10.1.0.2"), ("fd00::2", "fd00::2"), ("::", "::"), ("::1", "::1"),
    ("::1:0", "::1:0"),                  # inet_ntop: ::0.1.0.0 (the reference names the file ::1:0)
    ("::102:304", "::102:304"), ("::ffff:1.2.3.4", "1.2.3.4"),
    ("1:0:0:1:0:0:0:1", "1:0:0:1::1"), ("1:0:0:0:1:0:0:1", "1::1:0:0:1"),
    ("0:0:1:0:0:0:1:2", "0:0:1::1:2"), ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"), ("1::", "1::"),
])
def test_ip_string_matches_go(text, go):
    assert ip_string(parse_ip(text)) == go


# -- what is left to hand out (STATUS), and ranges no pod can use ----------------

def test_available_counts_without_walking_the_range():
    rs = sets([{"subnet": "10.1.0.0/29"}, {"subnet": "10.2.0.0/30", "rangeStart": "10.2.0.0",
                                           "rangeEnd": "10.2.0.3"}])[0]
    # 10.1.0.2-.6 (gateway .1 skipped) + 10.2.0.2 (network, gateway, broadcast skipped)
    assert rs.available(set()) == 6
    used = {parse_ip(a).value for a in ("10.1.0.2", "10.1.0.1", "10.2.0.2", "10.9.9.9")}
    assert rs.available(used) == 4          # the gateway and 10.9.9.9 do not count
    huge = one(subnet="fd00::/64")
    assert huge.available({parse_ip("fd00::2").value}) == (1 << 64) - 3   # no network, gateway, one used


def test_unusable_ranges_only_refused_for_allocation():
    ipam = {"subnet": "fe80::/64"}
    assert len(parse_range_sets(dict(ipam), None, "1.0.0")) == 1
    with pytest.raises(CNIError) as e:
        parse_range_sets(dict(ipam), None, "1.0.0", for_allocation=True)
    assert e.value.code == errors.INVALID_NETCONF and "fe80::/10" in e.value.msg
    with pytest.raises(CNIError) as e:
        parse_range_sets({"subnet": "::ffff:10.1.0.0/120"}, None, "1.0.0", for_allocation=True)
    assert "for IPv4 write 10.1.0.0/24" in e.value.msg
    for fine in ("10.0.0.0/8", "169.253.0.0/16", "169.255.0.0/16", "223.255.255.0/24", "240.0.0.0/24",
                 "fd00::/8", "fe00::/9", "fec0::/10", "2001:db8::/32", "::ffff:0:0:0/96"):
        assert parse_range_sets({"subnet": fine}, None, "1.0.0", for_allocation=True), fine
