"""The BGP message codec: round trips, RFC 6793 AS4 handling, and every RFC 4271 §6
error with the exact (code, subcode, data) its NOTIFICATION must carry.
Messages built by scapy's independent BGP implementation check interoperability
in both directions."""
import struct

import pytest

from calico_lite.bgp import messages as m
from calico_lite.bgp.messages import BGPError, PathAttributes

ATTRS = PathAttributes(origin=m.ORIGIN_IGP, as_path=((m.AS_SEQUENCE, (65001, 65002)),), next_hop="192.0.2.1",
                       med=5, local_pref=200)


def body(msg):
    return msg[m.HEADER_LEN:]


def update_body(attrs_blob, nlri=b"", withdrawn=b""):
    return struct.pack("!H", len(withdrawn)) + withdrawn + struct.pack("!H", len(attrs_blob)) + attrs_blob + nlri


def attr(flags, code, value):
    return struct.pack("!BBB", flags, code, len(value)) + value


ORIGIN_OK = attr(0x40, m.ORIGIN, b"\x00")
AS_PATH_OK = attr(0x40, m.AS_PATH, struct.pack("!BBI", m.AS_SEQUENCE, 1, 65001))
NEXT_HOP_OK = attr(0x40, m.NEXT_HOP, bytes([192, 0, 2, 1]))
NLRI = b"\x18\x0a\x01\x02"      # 10.1.2.0/24


def decode_error(blob, four_octet=True):
    with pytest.raises(BGPError) as info:
        m.decode_update(blob, four_octet)
    return info.value


def code_of(err):
    return err.code, err.subcode, err.data


# ---- prefixes -------------------------------------------------------------------------

def test_prefixes_are_canonical():
    assert m.normalize_prefix("10.1.2.0/24") == "10.1.2.0/24"
    assert m.encode_prefix("10.1.2.0/24") == NLRI
    assert m.encode_prefix("0.0.0.0/0") == b"\x00"
    assert m.encode_prefix("10.1.2.64/26") == b"\x1a\x0a\x01\x02\x40"
    # bits past the length are ignored on receipt (RFC 4271 §4.3)
    assert m.decode_prefixes(b"\x18\x0a\x01\x02" + b"\x1a\x0a\x01\x02\x7f", None) == ["10.1.2.0/24", "10.1.2.64/26"]
    for bad in ("10.1.2.1/24", "10.1.2.0/33", "10.1.2.0", "x/24", "10.1.2.0/-1", None):
        with pytest.raises(ValueError):
            m.normalize_prefix(bad)


# ---- OPEN ---------------------------------------------------------------------------

def test_open_round_trip_with_capabilities():
    msg = m.Open(asn=64512, hold_time=9, router_id="10.0.0.1").encode()
    decoded = m.decode(msg)
    assert (decoded.asn, decoded.hold_time, decoded.router_id) == (64512, 9, "10.0.0.1")
    assert decoded.four_octet_as and decoded.route_refresh and decoded.ipv4_unicast
    assert decoded.afi_safi == ((1, 1),)


def test_open_four_octet_as_uses_as_trans():
    msg = m.Open(asn=4200000001, hold_time=90, router_id="10.0.0.1").encode()
    assert struct.unpack_from("!H", msg, 20)[0] == m.AS_TRANS
    decoded = m.decode(msg)
    assert decoded.asn == 4200000001 and decoded.my_as_field == m.AS_TRANS
    m.check_open(decoded, 4200000001, "10.0.0.2", ibgp=False)


def test_open_without_capabilities_is_a_2_octet_ipv4_speaker():
    raw = struct.pack("!BHH4sB", 4, 65001, 90, bytes([10, 0, 0, 9]), 0)
    decoded = m.decode_open(raw)
    assert decoded.asn == 65001 and not decoded.four_octet_as and not decoded.route_refresh
    assert decoded.ipv4_unicast       # no multiprotocol capability means IPv4 unicast (RFC 4760)


def test_open_unknown_capabilities_are_kept_not_fatal():
    caps = bytes([71, 2, 0x00, 0x78]) + bytes([73, 3]) + b"abc" + struct.pack("!BBHBB", 1, 4, 2, 0, 1)
    raw = struct.pack("!BHH4sB", 4, 64512, 90, bytes([10, 0, 0, 9]), len(caps) + 2) + bytes([2, len(caps)]) + caps
    decoded = m.decode_open(raw)
    assert (71, b"\x00\x78") in decoded.unknown_capabilities and (73, b"abc") in decoded.unknown_capabilities
    assert decoded.afi_safi == ((2, 1),) and not decoded.ipv4_unicast      # IPv6 only


def test_open_rfc9072_extended_parameters():
    caps = struct.pack("!BBI", 65, 4, 64512)
    params = bytes([2]) + struct.pack("!H", len(caps)) + caps
    raw = struct.pack("!BHH4sB", 4, 64512, 90, bytes([10, 0, 0, 9]), 255) + b"\xff" + struct.pack("!H", len(params)) \
        + params
    assert m.decode_open(raw).four_octet_as


def test_graceful_restart_capability_round_trip():
    gr = m.GracefulRestart(restart_time=90, restarting=True, families=((1, 1, True),))
    msg = m.Open(asn=64512, hold_time=9, router_id="10.0.0.1", graceful_restart=gr).encode()
    # code 64, length 6: R bit + 12-bit time, then AFI 1 / SAFI 1 / F bit
    assert bytes([64, 6, 0x80, 90, 0, 1, 1, 0x80]) in msg
    decoded = m.decode(msg)
    assert decoded.graceful_restart == gr and decoded.unknown_capabilities == ()
    assert gr.forwarding() is True and gr.covers() and not gr.covers(2, 1) and gr.forwarding(2, 1) is None
    # no R bit, no F bit, the longest restart time
    quiet = m.GracefulRestart(restart_time=4095, families=((1, 1, False),))
    assert quiet.encode() == bytes([0x0F, 0xFF, 0, 1, 1, 0])
    assert m.GracefulRestart.decode(quiet.encode()) == quiet
    with pytest.raises(ValueError):
        m.GracefulRestart(restart_time=4096)
    # no capability at all: None, as before
    assert m.decode(m.Open(asn=64512, hold_time=9, router_id="10.0.0.1").encode()).graceful_restart is None


def test_graceful_restart_capability_decoding_edge_cases():
    def with_cap(value):
        caps = bytes([64, len(value)]) + value
        raw = struct.pack("!BHH4sB", 4, 64512, 90, bytes([10, 0, 0, 9]), len(caps) + 2) + bytes([2, len(caps)]) + caps
        return m.decode_open(raw)
    # "aware" only (BIRD's default): no families, so nothing is kept across its restarts
    aware = with_cap(bytes([0x00, 0x78])).graceful_restart
    assert aware == m.GracefulRestart(restart_time=120, families=()) and not aware.covers()
    # reserved flag bits and the other family flag bits are ignored; the N bit (RFC 8538) is read
    odd = with_cap(bytes([0xF0 | 0x01, 0x2C, 0, 2, 1, 0x7F, 0, 1, 1, 0xFF])).graceful_restart
    assert odd.restart_time == 300 and odd.restarting and odd.notification
    assert odd.families == ((2, 1, False), (1, 1, True))
    # a length that is not 2 + 4n is not a capability we can read: kept as unknown, not fatal
    bad = with_cap(bytes([0, 120, 0, 1, 1]))
    assert bad.graceful_restart is None and bad.unknown_capabilities == ((64, bytes([0, 120, 0, 1, 1])),)


def test_end_of_rib_markers():
    # IPv4 unicast: the minimal UPDATE (23 bytes)
    eor = m.encode_end_of_rib()
    assert len(eor) == 23 and m.decode(eor) == m.Update(end_of_rib=(1, 1))
    assert m.Update(end_of_rib=(1, 1)).encode() == eor
    # other families: an UPDATE with only an empty MP_UNREACH_NLRI, as BIRD and GoBGP send it
    v6 = m.encode_end_of_rib(2, 1)
    assert body(v6) == update_body(attr(0x80, m.MP_UNREACH_NLRI, struct.pack("!HB", 2, 1)))
    assert m.decode(v6).end_of_rib == (2, 1)
    # ... which some speakers use for IPv4 too; with the extended-length flag as well
    assert m.decode_update(update_body(attr(0x80, m.MP_UNREACH_NLRI, b"\0\1\1"))).end_of_rib == (1, 1)
    extended = struct.pack("!BBH", 0x90, m.MP_UNREACH_NLRI, 3) + b"\0\1\1"
    assert m.decode_update(update_body(extended)).end_of_rib == (1, 1)
    # not markers: a withdrawal, an announcement, MP_UNREACH with prefixes, or beside other attributes
    assert m.decode(m.encode_update(["10.1.2.0/24"])).end_of_rib is None
    assert m.decode(m.encode_update((), ATTRS, ["10.1.2.0/24"])).end_of_rib is None
    with_prefix = attr(0x80, m.MP_UNREACH_NLRI, b"\0\1\1" + b"\x18\x0a\x01\x02")
    assert m.decode_update(update_body(with_prefix)) == m.Update(withdrawn=("10.1.2.0/24",))
    beside = attr(0x80, m.MP_UNREACH_NLRI, b"\0\1\1") + ORIGIN_OK
    assert m.decode_update(update_body(beside)).end_of_rib is None
    # an MP_UNREACH_NLRI with wrong flags is still an attribute flags error, not a marker
    assert code_of(decode_error(update_body(attr(0xC0, m.MP_UNREACH_NLRI, b"\0\1\1"))))[:2] == (3, 4)


def open_error(raw):
    with pytest.raises(BGPError) as info:
        m.decode_open(raw)
    return info.value


def test_open_errors():
    rid = bytes([10, 0, 0, 9])
    assert code_of(open_error(struct.pack("!BHH4sB", 3, 64512, 90, rid, 0))) == (2, 1, b"\x00\x04")
    assert code_of(open_error(struct.pack("!BHH4sB", 4, 64512, 90, rid, 3) + b"\x01\x01\x00"))[:2] == (2, 4)
    assert open_error(struct.pack("!BHH4sB", 4, 64512, 90, rid, 5) + b"\x02\x02").code == 2   # length mismatch
    for hold in (1, 2):
        with pytest.raises(BGPError) as info:
            m.check_open(m.decode(m.Open(asn=64512, hold_time=hold, router_id="10.0.0.9").encode()),
                         64512, "10.0.0.1", ibgp=True)
        assert (info.value.code, info.value.subcode) == (2, 6)
    for hold in (0, 3):
        m.check_open(m.decode(m.Open(asn=64512, hold_time=hold, router_id="10.0.0.9").encode()), 64512, "10.0.0.1",
                     True)
    with pytest.raises(BGPError) as info:
        m.check_open(m.decode(m.Open(asn=64513, hold_time=9, router_id="10.0.0.9").encode()), 64512, "10.0.0.1", True)
    assert (info.value.code, info.value.subcode) == (2, 2)
    with pytest.raises(BGPError) as info:
        m.check_open(m.decode(m.Open(asn=64512, hold_time=9, router_id="0.0.0.0").encode()), 64512, "10.0.0.1", True)
    assert code_of(info.value) == (2, 3, b"\0\0\0\0")
    with pytest.raises(BGPError) as info:   # our own identifier on an iBGP session
        m.check_open(m.decode(m.Open(asn=64512, hold_time=9, router_id="10.0.0.1").encode()), 64512, "10.0.0.1", True)
    assert (info.value.code, info.value.subcode) == (2, 3)
    # between ASes the same identifier is allowed (RFC 6286)
    m.check_open(m.decode(m.Open(asn=65001, hold_time=9, router_id="10.0.0.1").encode()), 65001, "10.0.0.1", False)


# ---- the header -----------------------------------------------------------------------

@pytest.mark.parametrize("header, expected", [
    (b"\xfe" + b"\xff" * 15 + b"\x00\x13\x04", (1, 1, b"")),
    (b"\xff" * 16 + b"\x00\x12\x04", (1, 2, b"\x00\x12")),
    (b"\xff" * 16 + b"\x10\x01\x02", (1, 2, b"\x10\x01")),
    (b"\xff" * 16 + b"\x00\x13\x06", (1, 3, b"\x06")),
    (b"\xff" * 16 + b"\x00\x13\x00", (1, 3, b"\x00")),
    (b"\xff" * 16 + b"\x00\x14\x04", (1, 2, b"\x00\x14")),      # KEEPALIVE is exactly 19
    (b"\xff" * 16 + b"\x00\x1c\x01", (1, 2, b"\x00\x1c")),      # OPEN at least 29
    (b"\xff" * 16 + b"\x00\x16\x02", (1, 2, b"\x00\x16")),      # UPDATE at least 23
    (b"\xff" * 16 + b"\x00\x14\x03", (1, 2, b"\x00\x14")),      # NOTIFICATION at least 21
    (b"\xff" * 16 + b"\x00\x18\x05", (1, 2, b"\x00\x18")),      # ROUTE-REFRESH exactly 23
])
def test_header_errors(header, expected):
    with pytest.raises(BGPError) as info:
        m.parse_header(header)
    assert code_of(info.value) == expected


def test_keepalive_notification_route_refresh():
    assert m.decode(m.Keepalive().encode()) == m.Keepalive()
    assert len(m.KEEPALIVE_BYTES) == 19
    n = m.decode(m.Notification(6, 2, b"\x03bye").encode())
    assert n == m.Notification(6, 2, b"\x03bye")
    assert "administrative shutdown (bye)" in n.describe()
    assert m.decode(m.RouteRefresh().encode()) == m.RouteRefresh(1, 1, 0)
    assert len(m.RouteRefresh().encode()) == 23


# ---- UPDATE round trips ---------------------------------------------------------------

def test_update_round_trip_all_attributes():
    attrs = PathAttributes(origin=m.ORIGIN_INCOMPLETE,
                           as_path=((m.AS_SEQUENCE, (65001, 4200000000)), (m.AS_SET, (1, 2))),
                           next_hop="192.0.2.1", med=7, local_pref=300, atomic_aggregate=True,
                           aggregator=(65001, "192.0.2.9"), originator_id="10.0.0.5",
                           cluster_list=("10.0.0.1", "10.0.0.2"), other=((0xE0, 99, b"xyz"),))
    msg = m.encode_update(["10.9.0.0/16"], attrs, ["10.1.2.0/24", "10.1.3.0/26"])
    decoded = m.decode(msg)
    assert decoded.withdrawn == ("10.9.0.0/16",)
    assert decoded.nlri == ("10.1.2.0/24", "10.1.3.0/26")
    assert decoded.attrs == attrs
    assert decoded.attrs.as_path_length == 3      # the AS_SET counts once


def test_update_withdraw_only_and_end_of_rib():
    decoded = m.decode(m.encode_update(["10.1.2.0/24"]))
    assert decoded.withdrawn == ("10.1.2.0/24",) and decoded.attrs is None and decoded.nlri == ()
    eor = m.decode(m.encode_update())
    assert eor == m.Update(end_of_rib=(1, 1)) and eor.announced() == [] and eor.withdrawn == ()


def test_two_octet_session_carries_as4_path_and_as4_aggregator():
    attrs = PathAttributes(as_path=((m.AS_SEQUENCE, (4200000000, 65001)),), next_hop="192.0.2.1",
                           aggregator=(4200000000, "192.0.2.9"))
    blob = attrs.encode(four_octet=False)
    msg = m.encode_update((), attrs, ["10.1.0.0/16"], four_octet=False)
    raw = body(msg)
    # the AS_PATH carries AS_TRANS in 2-octet numbers, AS4_PATH the truth
    assert struct.pack("!BBHH", m.AS_SEQUENCE, 2, m.AS_TRANS, 65001) in blob
    assert bytes([0xC0, m.AS4_PATH, 10]) + struct.pack("!BBII", m.AS_SEQUENCE, 2, 4200000000, 65001) in blob
    assert bytes([0xC0, m.AS4_AGGREGATOR, 8]) + struct.pack("!I", 4200000000) in blob
    decoded = m.decode_update(raw, four_octet=False)
    assert decoded.attrs.as_path == attrs.as_path
    assert decoded.attrs.aggregator == (4200000000, "192.0.2.9")
    # small AS numbers need no AS4_PATH at all
    assert bytes([0xC0, m.AS4_PATH]) not in ATTRS.encode(four_octet=False)


def test_as4_path_merge_keeps_what_2_octet_speakers_prepended():
    # 64999 (2-octet speaker) prepended itself after the path left 4-octet land
    as_path = ((m.AS_SEQUENCE, (64999, m.AS_TRANS, 65001)),)
    as4 = ((m.AS_SEQUENCE, (4200000000, 65001)),)
    assert m.merge_as4_path(as_path, as4) == ((m.AS_SEQUENCE, (64999, 4200000000, 65001)),)
    # an AS4_PATH longer than the AS_PATH is ignored
    assert m.merge_as4_path(((m.AS_SEQUENCE, (m.AS_TRANS,)),), as4) == ((m.AS_SEQUENCE, (m.AS_TRANS,)),)


def test_as4_attributes_ignored_when_aggregator_is_not_as_trans_or_session_is_4_octet():
    as_path = attr(0x40, m.AS_PATH, struct.pack("!BBHH", m.AS_SEQUENCE, 2, m.AS_TRANS, 65001))
    agg = attr(0xC0, m.AGGREGATOR, struct.pack("!H", 65005) + bytes([192, 0, 2, 9]))
    as4 = attr(0xC0, m.AS4_PATH, struct.pack("!BBII", m.AS_SEQUENCE, 2, 4200000000, 65001))
    decoded = m.decode_update(update_body(ORIGIN_OK + as_path + NEXT_HOP_OK + agg + as4, NLRI), four_octet=False)
    assert decoded.attrs.as_path == ((m.AS_SEQUENCE, (m.AS_TRANS, 65001)),)
    as_path4 = attr(0x40, m.AS_PATH, struct.pack("!BBI", m.AS_SEQUENCE, 1, 65010))
    decoded = m.decode_update(update_body(ORIGIN_OK + as_path4 + NEXT_HOP_OK + as4, NLRI), four_octet=True)
    assert decoded.attrs.as_path == ((m.AS_SEQUENCE, (65010,)),) and decoded.attrs.other == ()


def test_unknown_optional_attributes():
    transitive = attr(0xC0, 200, b"hello")
    non_transitive = attr(0x80, 201, b"gone")
    decoded = m.decode_update(update_body(ORIGIN_OK + AS_PATH_OK + NEXT_HOP_OK + transitive + non_transitive, NLRI))
    assert decoded.attrs.other == ((0xE0, 200, b"hello"),)      # Partial bit set, passed on
    assert b"\xe0\xc8\x05hello" in decoded.attrs.encode()
    # communities are known: passed on as they came
    communities = attr(0xC0, m.COMMUNITIES, b"\xfd\xe8\x00\x01")
    decoded = m.decode_update(update_body(ORIGIN_OK + AS_PATH_OK + NEXT_HOP_OK + communities, NLRI))
    assert decoded.attrs.other == ((0xC0, m.COMMUNITIES, b"\xfd\xe8\x00\x01"),)


def test_extended_length_attributes():
    big = (0xC0, 222, bytes(300))
    attrs = ATTRS.replace(other=(big,))
    decoded = m.decode(m.encode_update((), attrs, ["10.0.0.0/8"]))
    assert decoded.attrs.other == ((0xE0, 222, bytes(300)),)
    ext_origin = struct.pack("!BBH", 0x50, m.ORIGIN, 1) + b"\x02"      # extended length on a short attribute is legal
    decoded = m.decode_update(update_body(ext_origin + AS_PATH_OK + NEXT_HOP_OK, NLRI))
    assert decoded.attrs.origin == 2


def test_mp_reach_and_unreach_ipv4_unicast():
    reach = attr(0x80, m.MP_REACH_NLRI, struct.pack("!HBB", 1, 1, 4) + bytes([192, 0, 2, 7]) + b"\x00" + NLRI)
    decoded = m.decode_update(update_body(ORIGIN_OK + AS_PATH_OK + reach))
    assert decoded.nlri == ("10.1.2.0/24",) and decoded.attrs.next_hop == "192.0.2.7"
    # NLRI field and MP_REACH_NLRI with different next hops: each keeps its own
    decoded = m.decode_update(update_body(ORIGIN_OK + AS_PATH_OK + NEXT_HOP_OK + reach, b"\x08\x0b"))
    assert dict(decoded.announced()) == {"11.0.0.0/8": ATTRS.replace(as_path=((2, (65001,)),), med=None,
                                                                      local_pref=None),
                                         "10.1.2.0/24": ATTRS.replace(as_path=((2, (65001,)),), med=None,
                                                                      local_pref=None, next_hop="192.0.2.7")}
    unreach = attr(0x80, m.MP_UNREACH_NLRI, struct.pack("!HB", 1, 1) + NLRI)
    assert m.decode_update(update_body(unreach)).withdrawn == ("10.1.2.0/24",)
    ipv6 = attr(0x80, m.MP_REACH_NLRI, struct.pack("!HBB", 2, 1, 16) + bytes(16) + b"\x00" + b"\x40" + bytes(8))
    assert m.decode_update(update_body(ORIGIN_OK + AS_PATH_OK + ipv6)).nlri == ()      # not ours: ignored


# ---- UPDATE errors ----------------------------------------------------------------------

def test_length_fields_too_large():
    assert code_of(decode_error(b"\x00\x05\x00\x00")) == (3, 1, b"")
    assert code_of(decode_error(b"\x00\x00\x00\x09" + ORIGIN_OK)) == (3, 1, b"")


def test_attribute_framing_errors():
    assert code_of(decode_error(update_body(ORIGIN_OK + b"\x40\x02"))) == (3, 1, b"")           # header cut
    assert code_of(decode_error(update_body(ORIGIN_OK + b"\x50\x02\x00"))) == (3, 1, b"")       # ext header cut
    assert code_of(decode_error(update_body(ORIGIN_OK + b"\x40\x02\x09\x02\x01"))) == (3, 1, b"")  # overrun
    assert code_of(decode_error(update_body(ORIGIN_OK + ORIGIN_OK + AS_PATH_OK + NEXT_HOP_OK, NLRI))) == (3, 1, b"")


def test_unrecognized_well_known():
    unknown = attr(0x40, 99, b"ab")
    assert code_of(decode_error(update_body(ORIGIN_OK + AS_PATH_OK + NEXT_HOP_OK + unknown, NLRI))) == (3, 2, unknown)


@pytest.mark.parametrize("missing, code", [(ORIGIN_OK, 1), (AS_PATH_OK, 2), (NEXT_HOP_OK, 3)])
def test_missing_well_known(missing, code):
    attrs = (ORIGIN_OK + AS_PATH_OK + NEXT_HOP_OK).replace(missing, b"")
    assert code_of(decode_error(update_body(attrs, NLRI))) == (3, 3, bytes([code]))
    # nothing is missing in a message that announces nothing
    assert m.decode_update(update_body(attrs)).attrs is None


@pytest.mark.parametrize("bad", [
    attr(0xC0, m.ORIGIN, b"\x00"),          # well-known marked optional
    attr(0x00, m.AS_PATH, b""),             # well-known not transitive
    attr(0x60, m.NEXT_HOP, b"\xc0\x00\x02\x01"),   # Partial on a well-known
    attr(0xC0, m.MED, b"\0\0\0\1"),         # optional non-transitive marked transitive
    attr(0x80, m.LOCAL_PREF, b"\0\0\0\1"),      # well-known marked optional
    attr(0x40, m.ORIGINATOR_ID, b"\1\2\3\4"),  # optional marked well-known
    attr(0xA0, m.CLUSTER_LIST, b"\1\2\3\4"),  # Partial on optional non-transitive
    attr(0x40, m.AGGREGATOR, b"\0" * 8),    # optional transitive marked well-known
])
def test_attribute_flags_errors(bad):
    others = b"".join(a for a in (ORIGIN_OK, AS_PATH_OK, NEXT_HOP_OK) if a[1] != bad[1])
    assert code_of(decode_error(update_body(others + bad, NLRI))) == (3, 4, bad)


@pytest.mark.parametrize("bad", [
    attr(0x40, m.ORIGIN, b"\x00\x00"),
    attr(0x40, m.NEXT_HOP, b"\xc0\x00\x02\x01\x00"),
    attr(0x80, m.MED, b"\0\0\1"),
    attr(0x40, m.LOCAL_PREF, b"\0\1"),
    attr(0x40, m.ATOMIC_AGGREGATE, b"\0"),
    attr(0xC0, m.AGGREGATOR, b"\0" * 7),
    attr(0x80, m.ORIGINATOR_ID, b"\1\2\3"),
    attr(0x80, m.CLUSTER_LIST, b"\1\2\3\4\5\6"),
    attr(0x80, m.CLUSTER_LIST, b""),
])
def test_attribute_length_errors(bad):
    others = b"".join(a for a in (ORIGIN_OK, AS_PATH_OK, NEXT_HOP_OK) if a[1] != bad[1])
    assert code_of(decode_error(update_body(others + bad, NLRI))) == (3, 5, bad)


def test_aggregator_length_depends_on_the_session():
    six = attr(0xC0, m.AGGREGATOR, struct.pack("!H", 65001) + bytes([192, 0, 2, 9]))
    as_path2 = attr(0x40, m.AS_PATH, struct.pack("!BBH", m.AS_SEQUENCE, 1, 65001))
    assert m.decode_update(update_body(ORIGIN_OK + as_path2 + NEXT_HOP_OK + six, NLRI), four_octet=False) \
        .attrs.aggregator == (65001, "192.0.2.9")
    assert code_of(decode_error(update_body(ORIGIN_OK + AS_PATH_OK + NEXT_HOP_OK + six, NLRI))) == (3, 5, six)


def test_invalid_origin():
    bad = attr(0x40, m.ORIGIN, b"\x03")
    assert code_of(decode_error(update_body(bad + AS_PATH_OK + NEXT_HOP_OK, NLRI))) == (3, 6, bad)


@pytest.mark.parametrize("address", [[0, 0, 0, 0], [224, 0, 0, 1], [255, 255, 255, 255], [0, 1, 2, 3]])
def test_invalid_next_hop(address):
    bad = attr(0x40, m.NEXT_HOP, bytes(address))
    assert code_of(decode_error(update_body(ORIGIN_OK + AS_PATH_OK + bad, NLRI))) == (3, 8, bad)


@pytest.mark.parametrize("value", [
    struct.pack("!BBI", 5, 1, 65001),             # segment type 5
    struct.pack("!BB", m.AS_SEQUENCE, 0),          # empty segment
    struct.pack("!BBI", m.AS_SEQUENCE, 2, 65001),  # count overruns
    struct.pack("!BBIB", m.AS_SEQUENCE, 1, 65001, 2),  # trailing half header
])
def test_malformed_as_path(value):
    bad = attr(0x40, m.AS_PATH, value)
    assert code_of(decode_error(update_body(ORIGIN_OK + bad + NEXT_HOP_OK, NLRI))) == (3, 11, b"")


@pytest.mark.parametrize("nlri", [b"\x21\x0a\x00\x00\x00\x00", b"\x18\x0a\x01", b"\x20"])
def test_invalid_network_field(nlri):
    assert code_of(decode_error(update_body(ORIGIN_OK + AS_PATH_OK + NEXT_HOP_OK, nlri))) == (3, 10, b"")
    assert code_of(decode_error(update_body(b"", withdrawn=nlri))) == (3, 10, b"")


def test_mp_reach_errors_are_optional_attribute_errors():
    short = attr(0x80, m.MP_REACH_NLRI, b"\x00\x01\x01")
    assert code_of(decode_error(update_body(ORIGIN_OK + AS_PATH_OK + short))) == (3, 9, short)
    nh16 = attr(0x80, m.MP_REACH_NLRI, struct.pack("!HBB", 1, 1, 16) + bytes(16) + b"\x00" + NLRI)
    assert code_of(decode_error(update_body(ORIGIN_OK + AS_PATH_OK + nh16))) == (3, 9, nh16)
    bad_nlri = attr(0x80, m.MP_REACH_NLRI, struct.pack("!HBB", 1, 1, 4) + bytes([192, 0, 2, 7]) + b"\x00\x21")
    assert code_of(decode_error(update_body(ORIGIN_OK + AS_PATH_OK + bad_nlri))) == (3, 9, bad_nlri)
    unreach = attr(0x80, m.MP_UNREACH_NLRI, b"\x00\x01")
    assert code_of(decode_error(update_body(unreach))) == (3, 9, unreach)


def test_treat_as_withdraw_information():
    bad = attr(0x40, m.ORIGIN, b"\x07")
    err = decode_error(update_body(bad + AS_PATH_OK + NEXT_HOP_OK, NLRI, withdrawn=b"\x08\x0b"))
    assert err.withdraw == ("11.0.0.0/8", "10.1.2.0/24")
    # MP_REACH_NLRI prefixes in the same message: not safely found, so the session must be reset
    reach = attr(0x80, m.MP_REACH_NLRI, struct.pack("!HBB", 1, 1, 4) + bytes([192, 0, 2, 7]) + b"\x00" + NLRI)
    assert decode_error(update_body(bad + AS_PATH_OK + reach)).withdraw is None
    # a framing error leaves nothing to withdraw safely: the session must be reset
    assert decode_error(update_body(ORIGIN_OK + b"\x40\x02\x09", NLRI)).withdraw is None
    assert decode_error(update_body(bad + AS_PATH_OK + NEXT_HOP_OK, b"\x21")).withdraw is None


def test_pack_updates_respects_the_message_size():
    prefixes = ["10.%d.%d.0/24" % (i // 256, i % 256) for i in range(3000)]
    msgs = m.pack_updates(prefixes[:2000], {ATTRS: prefixes[2000:]})
    assert all(len(x) <= m.MAX_MESSAGE_LEN for x in msgs) and len(msgs) == 3   # 8000 + 4000 bytes of prefixes
    withdrawn, announced = [], []
    for x in msgs:
        u = m.decode(x)
        withdrawn += u.withdrawn
        announced += u.nlri
        assert u.attrs in (None, ATTRS)
    assert withdrawn == prefixes[:2000] and announced == prefixes[2000:]


# ---- interoperability with scapy's encoder and decoder -------------------------------------

scapy_bgp = pytest.importorskip("scapy.contrib.bgp")


def test_scapy_reads_our_messages():
    from scapy.contrib.bgp import BGPHeader, BGPOpen, BGPUpdate
    msg = m.Open(asn=64512, hold_time=9, router_id="10.0.0.1").encode()
    pkt = BGPHeader(msg)
    assert pkt.type == 1 and pkt.len == len(msg)
    assert pkt[BGPOpen].bgp_id == "10.0.0.1" and pkt[BGPOpen].hold_time == 9
    upd = BGPHeader(m.encode_update((), ATTRS, ["10.1.2.0/24"]))
    u = upd[BGPUpdate]
    assert [n.prefix for n in u.nlri] == ["10.1.2.0/24"]
    assert {a.type_code for a in u.path_attr} == {1, 2, 3, 4, 5}


def test_graceful_restart_against_scapy():
    from scapy.contrib.bgp import BGPCapGracefulRestart, BGPHeader, BGPOpen, BGPOptParam, BGPUpdate
    gr = m.GracefulRestart(restart_time=120, restarting=True, families=((1, 1, True),))
    msg = m.Open(asn=64512, hold_time=9, router_id="10.0.0.1", graceful_restart=gr).encode()
    # (scapy reads one capability per optional parameter; we send them all in one, as RFC 5492 allows)
    at = msg.index(bytes([64, 6]))
    cap = BGPCapGracefulRestart(msg[at:at + 8])
    assert cap.restart_time == 120 and cap.restart_flags == 0x8
    assert [(e.afi, e.safi, e.flags) for e in cap.entries] == [(1, 1, 0x80)]
    theirs = BGPHeader(type=1) / BGPOpen(my_as=64512, hold_time=30, bgp_id="10.0.0.7", opt_params=[
        BGPOptParam(param_type=2, param_value=BGPCapGracefulRestart(
            restart_flags=0x8, restart_time=300, entries=[BGPCapGracefulRestart.GRTuple(afi=1, safi=1, flags=0x80)]))])
    assert m.decode(bytes(theirs)).graceful_restart == m.GracefulRestart(300, True, ((1, 1, True),))
    # scapy's empty UPDATE is our End-of-RIB, and ours is 23 bytes of it
    assert m.decode(bytes(BGPHeader(type=2) / BGPUpdate())).end_of_rib == (1, 1)
    assert BGPHeader(m.encode_end_of_rib()).len == 23


def test_we_read_scapys_messages():
    from scapy.contrib.bgp import (
        BGPCapFourBytesASN,
        BGPHeader,
        BGPNLRI_IPv4,
        BGPOpen,
        BGPOptParam,
        BGPPAAS4BytesPath,
        BGPPANextHop,
        BGPPAOrigin,
        BGPPathAttr,
        BGPUpdate,
    )
    opn = BGPHeader(type=1) / BGPOpen(my_as=64512, hold_time=30, bgp_id="10.0.0.7", opt_params=[
        BGPOptParam(param_type=2, param_value=BGPCapFourBytesASN(asn=64512))])
    decoded = m.decode(bytes(opn))
    assert decoded.asn == 64512 and decoded.four_octet_as and decoded.router_id == "10.0.0.7"
    path = BGPPAAS4BytesPath(segments=[BGPPAAS4BytesPath.ASPathSegment(segment_type=2, segment_value=[65001, 65002])])
    upd = BGPHeader(type=2) / BGPUpdate(path_attr=[
        BGPPathAttr(type_flags=0x40, type_code=1, attribute=BGPPAOrigin(origin=0)),
        BGPPathAttr(type_flags=0x40, type_code=2, attribute=path),
        BGPPathAttr(type_flags=0x40, type_code=3, attribute=BGPPANextHop(next_hop="192.0.2.1")),
    ], nlri=[BGPNLRI_IPv4(prefix="10.1.2.0/24")])
    decoded = m.decode(bytes(upd))
    assert decoded.nlri == ("10.1.2.0/24",)
    assert decoded.attrs.as_path == ((2, (65001, 65002)),) and decoded.attrs.next_hop == "192.0.2.1"
