"""BGP-4 messages (RFC 4271): encoding, decoding and the error checks of §6.

Decoding never trusts the peer: every failure raises `BGPError` carrying the
exact (code, subcode, data) the NOTIFICATION must carry, so the session only
has to send it. Only IPv4 unicast is spoken; the capabilities are 4-octet AS
numbers (RFC 6793, with AS4_PATH / AS4_AGGREGATOR towards and from 2-octet
speakers), multiprotocol IPv4 unicast (RFC 4760), route refresh (RFC 2918)
and graceful restart (RFC 4724: the capability, and End-of-RIB markers in
both of their shapes).

Addresses and prefixes are plain strings ("192.0.2.1", "10.0.0.0/26", host
bits always zero): the node agent programs kernel routes from them, and a
route reflector keeps thousands of them, so nothing heavier is used.
"""
import socket
import struct
from dataclasses import dataclass, field, replace

MARKER = b"\xff" * 16
HEADER_LEN = 19
MAX_MESSAGE_LEN = 4096
VERSION = 4
AS_TRANS = 23456            # stands for a 4-octet AS towards 2-octet speakers (RFC 6793)
AFI_IPV4, SAFI_UNICAST = 1, 1

# message types
OPEN, UPDATE, NOTIFICATION, KEEPALIVE, ROUTE_REFRESH = 1, 2, 3, 4, 5
MESSAGE_NAMES = {OPEN: "OPEN", UPDATE: "UPDATE", NOTIFICATION: "NOTIFICATION", KEEPALIVE: "KEEPALIVE",
                 ROUTE_REFRESH: "ROUTE-REFRESH"}

# NOTIFICATION error codes and subcodes (RFC 4271 §4.5, RFC 4486 Cease, RFC 6608 FSM)
HEADER_ERROR, OPEN_ERROR, UPDATE_ERROR, HOLD_TIMER_EXPIRED, FSM_ERROR, CEASE = 1, 2, 3, 4, 5, 6
CONNECTION_NOT_SYNCHRONIZED, BAD_MESSAGE_LENGTH, BAD_MESSAGE_TYPE = 1, 2, 3
(UNSUPPORTED_VERSION, BAD_PEER_AS, BAD_BGP_IDENTIFIER, UNSUPPORTED_OPTIONAL_PARAMETER,
 UNACCEPTABLE_HOLD_TIME, UNSUPPORTED_CAPABILITY) = 1, 2, 3, 4, 6, 7
(MALFORMED_ATTRIBUTE_LIST, UNRECOGNIZED_WELL_KNOWN, MISSING_WELL_KNOWN, ATTRIBUTE_FLAGS_ERROR,
 ATTRIBUTE_LENGTH_ERROR, INVALID_ORIGIN, INVALID_NEXT_HOP, OPTIONAL_ATTRIBUTE_ERROR,
 INVALID_NETWORK_FIELD, MALFORMED_AS_PATH) = 1, 2, 3, 4, 5, 6, 8, 9, 10, 11
FSM_IN_OPENSENT, FSM_IN_OPENCONFIRM, FSM_IN_ESTABLISHED = 1, 2, 3
(CEASE_MAX_PREFIXES, CEASE_ADMIN_SHUTDOWN, CEASE_PEER_DECONFIGURED, CEASE_ADMIN_RESET,
 CEASE_CONNECTION_REJECTED, CEASE_CONFIG_CHANGE, CEASE_COLLISION, CEASE_OUT_OF_RESOURCES) = range(1, 9)

ERROR_NAMES = {
    HEADER_ERROR: ("message header error", {1: "connection not synchronized", 2: "bad message length",
                                            3: "bad message type"}),
    OPEN_ERROR: ("OPEN message error", {1: "unsupported version number", 2: "bad peer AS",
                                        3: "bad BGP identifier", 4: "unsupported optional parameter",
                                        6: "unacceptable hold time", 7: "unsupported capability"}),
    UPDATE_ERROR: ("UPDATE message error", {1: "malformed attribute list", 2: "unrecognized well-known attribute",
                                            3: "missing well-known attribute", 4: "attribute flags error",
                                            5: "attribute length error", 6: "invalid ORIGIN attribute",
                                            8: "invalid NEXT_HOP attribute", 9: "optional attribute error",
                                            10: "invalid network field", 11: "malformed AS_PATH"}),
    HOLD_TIMER_EXPIRED: ("hold timer expired", {}),
    FSM_ERROR: ("finite state machine error", {1: "unexpected message in OpenSent",
                                               2: "unexpected message in OpenConfirm",
                                               3: "unexpected message in Established"}),
    CEASE: ("cease", {1: "maximum number of prefixes reached", 2: "administrative shutdown",
                      3: "peer de-configured", 4: "administrative reset", 5: "connection rejected",
                      6: "other configuration change", 7: "connection collision resolution",
                      8: "out of resources"}),
}

# path attribute flags and type codes
OPTIONAL, TRANSITIVE, PARTIAL, EXTENDED_LENGTH = 0x80, 0x40, 0x20, 0x10
ORIGIN, AS_PATH, NEXT_HOP, MED, LOCAL_PREF, ATOMIC_AGGREGATE, AGGREGATOR = 1, 2, 3, 4, 5, 6, 7
COMMUNITIES, ORIGINATOR_ID, CLUSTER_LIST, MP_REACH_NLRI, MP_UNREACH_NLRI = 8, 9, 10, 14, 15
EXTENDED_COMMUNITIES, AS4_PATH, AS4_AGGREGATOR, LARGE_COMMUNITIES = 16, 17, 18, 32
ORIGIN_IGP, ORIGIN_EGP, ORIGIN_INCOMPLETE = 0, 1, 2
AS_SET, AS_SEQUENCE, AS_CONFED_SEQUENCE, AS_CONFED_SET = 1, 2, 3, 4

WELL_KNOWN = TRANSITIVE                 # the (Optional, Transitive) bits each kind must carry
OPTIONAL_NON_TRANSITIVE = OPTIONAL
OPTIONAL_TRANSITIVE = OPTIONAL | TRANSITIVE
ATTRIBUTE_KINDS = {
    ORIGIN: WELL_KNOWN, AS_PATH: WELL_KNOWN, NEXT_HOP: WELL_KNOWN, LOCAL_PREF: WELL_KNOWN,
    ATOMIC_AGGREGATE: WELL_KNOWN,
    MED: OPTIONAL_NON_TRANSITIVE, ORIGINATOR_ID: OPTIONAL_NON_TRANSITIVE, CLUSTER_LIST: OPTIONAL_NON_TRANSITIVE,
    MP_REACH_NLRI: OPTIONAL_NON_TRANSITIVE, MP_UNREACH_NLRI: OPTIONAL_NON_TRANSITIVE,
    AGGREGATOR: OPTIONAL_TRANSITIVE, AS4_PATH: OPTIONAL_TRANSITIVE, AS4_AGGREGATOR: OPTIONAL_TRANSITIVE,
    COMMUNITIES: OPTIONAL_TRANSITIVE, EXTENDED_COMMUNITIES: OPTIONAL_TRANSITIVE,
    LARGE_COMMUNITIES: OPTIONAL_TRANSITIVE,
}
# Known, carried through unchanged (no Partial bit added), and only checked for their unit size.
PASSTHROUGH_UNITS = {COMMUNITIES: 4, EXTENDED_COMMUNITIES: 8, LARGE_COMMUNITIES: 12}

# capability codes (RFC 5492 registry)
CAP_MULTIPROTOCOL, CAP_ROUTE_REFRESH, CAP_GRACEFUL_RESTART, CAP_FOUR_OCTET_AS = 1, 2, 64, 65
# graceful restart (RFC 4724 §3): the 4 flag bits above the 12-bit restart time, and the
# per-family flags octet
GR_RESTART_STATE, GR_NOTIFICATION = 0x8000, 0x4000      # R bit; N bit (RFC 8538, decoded only)
GR_FORWARDING = 0x80                                    # F bit
MAX_RESTART_TIME = 0xFFF
OPT_PARAM_CAPABILITIES = 2

# Smallest (or, for fixed-size ones, exact) length of each message type, header included.
_MIN_LENGTH = {OPEN: 29, UPDATE: 23, NOTIFICATION: 21, KEEPALIVE: 19, ROUTE_REFRESH: 23}
_FIXED_LENGTH = {KEEPALIVE, ROUTE_REFRESH}

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!16sHB")
_OPEN = struct.Struct("!BHH4sB")


class BGPError(Exception):
    """A protocol error, and the NOTIFICATION that reports it.

    `withdraw` is set for UPDATE errors RFC 7606 lets a speaker handle by
    "treat-as-withdraw": the prefixes of the faulty message, when its framing
    was intact enough to find them. The session uses it only if configured to.
    """

    def __init__(self, code, subcode=0, data=b"", reason=""):
        self.code, self.subcode, self.data = code, subcode, bytes(data)
        self.reason = reason
        self.withdraw = None
        super().__init__(self.describe())

    def describe(self):
        text = error_name(self.code, self.subcode)
        return "%s: %s" % (text, self.reason) if self.reason else text

    def notification(self):
        return Notification(self.code, self.subcode, self.data)


def error_name(code, subcode):
    name, subs = ERROR_NAMES.get(code, ("error code %d" % code, {}))
    if subcode in subs:
        return "%s / %s" % (name, subs[subcode])
    return "%s / subcode %d" % (name, subcode) if subcode else name


# ---- addresses and prefixes ----------------------------------------------------------

def ip_to_bytes(address):
    """4 bytes of a dotted-quad IPv4 address; ValueError for anything else."""
    try:
        packed = socket.inet_pton(socket.AF_INET, address)
    except (OSError, TypeError):
        raise ValueError("not an IPv4 address: %r" % (address,)) from None
    return packed


def ip_from_bytes(raw):
    return socket.inet_ntop(socket.AF_INET, raw)


def ip_key(address):
    """Sort key giving numeric order of dotted quads (for router ids and peer addresses)."""
    return ip_to_bytes(address)


def parse_prefix(text):
    """'10.0.0.0/26' -> (network as int, length); ValueError if malformed or host bits are set."""
    if not isinstance(text, str) or text.count("/") != 1:
        raise ValueError("not an IPv4 prefix: %r" % (text,))
    address, _, length = text.partition("/")
    if not length.isdigit() or not 0 <= int(length) <= 32:
        raise ValueError("bad prefix length in %r" % text)
    plen = int(length)
    value = int.from_bytes(ip_to_bytes(address), "big")
    if value & ~_mask(plen) & 0xFFFFFFFF:
        raise ValueError("%r has host bits set" % text)
    return value, plen


def normalize_prefix(text):
    """The canonical spelling of a prefix (validates it)."""
    value, plen = parse_prefix(text)
    return "%s/%d" % (ip_from_bytes(value.to_bytes(4, "big")), plen)


def _mask(plen):
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF


def encode_prefix(text):
    value, plen = parse_prefix(text)
    return bytes([plen]) + value.to_bytes(4, "big")[:(plen + 7) >> 3]


def decode_prefixes(data, error):
    """The prefixes of an NLRI / withdrawn-routes field; `error()` makes the BGPError to raise.

    Bits beyond the prefix length are ignored (RFC 4271 §4.3), so the
    prefixes come out canonical.
    """
    out = []
    i, end = 0, len(data)
    while i < end:
        plen = data[i]
        if plen > 32:
            raise error("prefix length %d > 32" % plen)
        nbytes = (plen + 7) >> 3
        if i + 1 + nbytes > end:
            raise error("prefix truncated")
        value = int.from_bytes(data[i + 1:i + 1 + nbytes].ljust(4, b"\0"), "big") & _mask(plen)
        out.append("%s/%d" % (ip_from_bytes(value.to_bytes(4, "big")), plen))
        i += 1 + nbytes
    return out


def valid_next_hop(raw):
    """A next hop a host can forward to: not 0/8, multicast, class E or broadcast.

    (Loopback is allowed: speakers on one host, as in tests, use it.)"""
    first = raw[0]
    return first != 0 and first < 224


# ---- path attributes -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PathAttributes:
    """The path attributes of a route, immutable and hashable (shared between routes and peers).

    as_path is a tuple of (segment type, tuple of AS numbers), always with the
    true 4-octet numbers (AS4_PATH is merged in on decode). `other` holds
    optional transitive attributes passed on as (flags, type code, value).
    """
    origin: int = ORIGIN_IGP
    as_path: tuple = ()
    next_hop: str | None = None
    med: int | None = None
    local_pref: int | None = None
    atomic_aggregate: bool = False
    aggregator: tuple | None = None   # (AS number, address)
    originator_id: str | None = None
    cluster_list: tuple = ()
    other: tuple = field(default=())

    def replace(self, **changes):
        return replace(self, **changes)

    @property
    def as_path_length(self):
        """Length for best-path selection: an AS_SET counts one, confederation segments none (RFC 5065)."""
        n = 0
        for kind, asns in self.as_path:
            if kind == AS_SEQUENCE:
                n += len(asns)
            elif kind == AS_SET:
                n += 1
        return n

    @property
    def neighbour_as(self):
        """The AS the route entered ours from (first AS of a leading AS_SEQUENCE), or None if local."""
        if self.as_path and self.as_path[0][0] == AS_SEQUENCE:
            return self.as_path[0][1][0]
        return None

    def as_numbers(self):
        return [asn for _, asns in self.as_path for asn in asns]

    def prepend(self, asn):
        """The AS path with `asn` in front (a new segment when the first is no sequence or full)."""
        path = self.as_path
        if path and path[0][0] == AS_SEQUENCE and len(path[0][1]) < 255:
            return ((AS_SEQUENCE, (asn,) + path[0][1]),) + path[1:]
        return ((AS_SEQUENCE, (asn,)),) + path

    def encode(self, four_octet=True):
        """The path attributes field, in type-code order (RFC 4271 §5); towards a 2-octet
        speaker with AS_TRANS and AS4_PATH / AS4_AGGREGATOR as RFC 6793 says."""
        parts = [(ORIGIN, WELL_KNOWN, bytes([self.origin]))]
        if four_octet:
            parts.append((AS_PATH, WELL_KNOWN, _encode_as_path(self.as_path, 4)))
        else:
            parts.append((AS_PATH, WELL_KNOWN, _encode_as_path(self.as_path, 2)))
            if any(asn > 0xFFFF for asn in self.as_numbers()):
                real = [s for s in self.as_path if s[0] in (AS_SET, AS_SEQUENCE)]
                parts.append((AS4_PATH, OPTIONAL_TRANSITIVE, _encode_as_path(real, 4)))
        if self.next_hop is not None:
            parts.append((NEXT_HOP, WELL_KNOWN, ip_to_bytes(self.next_hop)))
        if self.med is not None:
            parts.append((MED, OPTIONAL, _U32.pack(self.med)))
        if self.local_pref is not None:
            parts.append((LOCAL_PREF, WELL_KNOWN, _U32.pack(self.local_pref)))
        if self.atomic_aggregate:
            parts.append((ATOMIC_AGGREGATE, WELL_KNOWN, b""))
        if self.aggregator is not None:
            asn, address = self.aggregator
            if four_octet:
                parts.append((AGGREGATOR, OPTIONAL_TRANSITIVE, _U32.pack(asn) + ip_to_bytes(address)))
            else:
                small = asn if asn <= 0xFFFF else AS_TRANS
                parts.append((AGGREGATOR, OPTIONAL_TRANSITIVE, _U16.pack(small) + ip_to_bytes(address)))
                if asn > 0xFFFF:
                    parts.append((AS4_AGGREGATOR, OPTIONAL_TRANSITIVE, _U32.pack(asn) + ip_to_bytes(address)))
        if self.originator_id is not None:
            parts.append((ORIGINATOR_ID, OPTIONAL, ip_to_bytes(self.originator_id)))
        if self.cluster_list:
            parts.append((CLUSTER_LIST, OPTIONAL, b"".join(ip_to_bytes(c) for c in self.cluster_list)))
        parts.extend((code, flags, value) for flags, code, value in self.other)
        parts.sort(key=lambda part: part[0])
        return b"".join(_attr(flags, code, value) for code, flags, value in parts)


def _attr(flags, code, value):
    flags &= OPTIONAL | TRANSITIVE | PARTIAL
    if len(value) > 255:
        return struct.pack("!BBH", flags | EXTENDED_LENGTH, code, len(value)) + value
    return struct.pack("!BBB", flags, code, len(value)) + value


def _encode_as_path(segments, size):
    out = []
    for kind, asns in segments:
        if size == 2:
            asns = [a if a <= 0xFFFF else AS_TRANS for a in asns]
        for i in range(0, len(asns), 255):        # a segment holds at most 255 numbers
            chunk = asns[i:i + 255]
            out.append(struct.pack("!BB%d%s" % (len(chunk), "I" if size == 4 else "H"), kind, len(chunk), *chunk))
    return b"".join(out)


def _decode_as_path(value, size):
    """Segments of an AS_PATH / AS4_PATH value; ValueError if malformed (RFC 4271 §6.3, RFC 7606 §7.2)."""
    segments = []
    i, end = 0, len(value)
    unit = "I" if size == 4 else "H"
    while i < end:
        if end - i < 2:
            raise ValueError("segment header truncated")
        kind, count = value[i], value[i + 1]
        if kind not in (AS_SET, AS_SEQUENCE, AS_CONFED_SEQUENCE, AS_CONFED_SET):
            raise ValueError("segment type %d" % kind)
        if count == 0:
            raise ValueError("empty segment")
        stop = i + 2 + count * size
        if stop > end:
            raise ValueError("segment overruns the attribute")
        segments.append((kind, struct.unpack_from("!%d%s" % (count, unit), value, i + 2)))
        i = stop
    return tuple(segments)


def _path_count(segments):
    return sum(len(asns) if kind == AS_SEQUENCE else 1 for kind, asns in segments
               if kind in (AS_SET, AS_SEQUENCE))


def merge_as4_path(as_path, as4_path):
    """The real path from a 2-octet speaker's AS_PATH and AS4_PATH (RFC 6793 §4.2.3)."""
    extra = _path_count(as_path) - _path_count(as4_path)
    if extra < 0:
        return as_path          # AS4_PATH is longer: it is ignored
    head = []
    for kind, asns in as_path:
        if extra <= 0:
            break
        if kind in (AS_CONFED_SEQUENCE, AS_CONFED_SET):
            head.append((kind, asns))
        elif kind == AS_SET:
            head.append((kind, asns))
            extra -= 1
        else:
            take = asns[:extra]
            head.append((kind, take))
            extra -= len(take)
    merged = list(head)
    for kind, asns in as4_path:
        if merged and kind == AS_SEQUENCE and merged[-1][0] == AS_SEQUENCE and len(merged[-1][1]) + len(asns) <= 255:
            merged[-1] = (AS_SEQUENCE, merged[-1][1] + asns)
        else:
            merged.append((kind, asns))
    return tuple(merged)


# ---- messages ------------------------------------------------------------------------

def _header(msg_type, body_len):
    return _HEADER.pack(MARKER, HEADER_LEN + body_len, msg_type)


@dataclass(frozen=True, slots=True)
class GracefulRestart:
    """The Graceful Restart capability (RFC 4724 §3).

    restart_time: seconds the sender expects to need to re-establish the
    session after a restart (0..4095); restarting: the R bit (the sender has
    just restarted: do not wait for its End-of-RIB before sending to it);
    families: ((afi, safi, forwarding), ...), where forwarding is the F bit:
    the sender kept its forwarding state for that family across the restart.
    A capability without families says "I understand End-of-RIB" and nothing more.
    notification: the N bit of RFC 8538 (decoded, never set by us).
    """
    restart_time: int = 120
    restarting: bool = False
    families: tuple = ((AFI_IPV4, SAFI_UNICAST, False),)
    notification: bool = False

    def __post_init__(self):
        if not 0 <= self.restart_time <= MAX_RESTART_TIME:
            raise ValueError("restart time must be 0..%d seconds, not %r" % (MAX_RESTART_TIME, self.restart_time))

    def forwarding(self, afi=AFI_IPV4, safi=SAFI_UNICAST):
        """None if the family is not listed, else whether its F bit is set."""
        for f_afi, f_safi, fwd in self.families:
            if (f_afi, f_safi) == (afi, safi):
                return bool(fwd)
        return None

    def covers(self, afi=AFI_IPV4, safi=SAFI_UNICAST):
        """Whether the family is listed (the receiver keeps its routes across a restart)."""
        return self.forwarding(afi, safi) is not None

    def encode(self):
        """The capability value (without code and length)."""
        head = self.restart_time | (GR_RESTART_STATE if self.restarting else 0) \
            | (GR_NOTIFICATION if self.notification else 0)
        return _U16.pack(head) + b"".join(struct.pack("!HBB", afi, safi, GR_FORWARDING if fwd else 0)
                                          for afi, safi, fwd in self.families)

    @classmethod
    def decode(cls, value):
        """From a capability value; None if its length is not 2 + 4n (then it is kept as unknown)."""
        if len(value) < 2 or (len(value) - 2) % 4:
            return None
        head = _U16.unpack_from(value)[0]
        families = tuple((afi, safi, bool(flags & GR_FORWARDING))
                         for afi, safi, flags in struct.iter_unpack("!HBB", value[2:]))
        # the reserved flag bits are ignored on receipt (RFC 4724 §3)
        return cls(restart_time=head & MAX_RESTART_TIME, restarting=bool(head & GR_RESTART_STATE),
                   families=families, notification=bool(head & GR_NOTIFICATION))


@dataclass(frozen=True, slots=True)
class Open:
    """An OPEN; `asn` is the speaker's real AS (from the 4-octet capability when present)."""
    asn: int
    hold_time: int
    router_id: str
    four_octet_as: bool = True
    route_refresh: bool = True
    afi_safi: tuple = ((AFI_IPV4, SAFI_UNICAST),)   # empty: no multiprotocol capability sent
    unknown_capabilities: tuple = ()                 # (code, value) we did not understand
    version: int = VERSION
    my_as_field: int | None = None                   # the 2-octet field as received
    graceful_restart: GracefulRestart | None = None     # RFC 4724 capability, None: not advertised

    @property
    def ipv4_unicast(self):
        """Whether the sender does IPv4 unicast: it says so, or sends no multiprotocol capability at all."""
        return not self.afi_safi or (AFI_IPV4, SAFI_UNICAST) in self.afi_safi

    def encode(self):
        caps = []
        for afi, safi in self.afi_safi:
            caps.append(struct.pack("!BBHBB", CAP_MULTIPROTOCOL, 4, afi, 0, safi))
        if self.route_refresh:
            caps.append(bytes([CAP_ROUTE_REFRESH, 0]))
        if self.graceful_restart is not None:
            value = self.graceful_restart.encode()
            caps.append(bytes([CAP_GRACEFUL_RESTART, len(value)]) + value)
        if self.four_octet_as:
            caps.append(struct.pack("!BBI", CAP_FOUR_OCTET_AS, 4, self.asn))
        for code, value in self.unknown_capabilities:
            caps.append(bytes([code, len(value)]) + value)
        capabilities = b"".join(caps)
        params = bytes([OPT_PARAM_CAPABILITIES, len(capabilities)]) + capabilities if capabilities else b""
        my_as = self.asn if self.asn <= 0xFFFF else AS_TRANS
        body = _OPEN.pack(self.version, my_as, self.hold_time, ip_to_bytes(self.router_id), len(params)) + params
        return _header(OPEN, len(body)) + body


@dataclass(frozen=True, slots=True)
class Update:
    """An UPDATE, IPv4 unicast only. `attrs` applies to `nlri`; MP_REACH_NLRI
    prefixes are merged into `nlri` when they share its next hop, else kept in
    `mp_nlri` with `mp_next_hop` (RFC 4760 lets them differ).

    end_of_rib is the (afi, safi) of an End-of-RIB marker (RFC 4724 §2): for
    IPv4 unicast an UPDATE with nothing in it, for any family an UPDATE
    holding only an empty MP_UNREACH_NLRI of that family; None for any other
    UPDATE. (An empty MP_UNREACH_NLRI of a family we do not speak decodes to
    an empty Update with that family here, never to an IPv4 marker.)"""
    withdrawn: tuple = ()
    attrs: PathAttributes | None = None
    nlri: tuple = ()
    mp_nlri: tuple = ()
    mp_next_hop: str | None = None
    end_of_rib: tuple | None = None

    def announced(self):
        """[(prefix, attributes)] this message announces, next hops resolved."""
        out = [(p, self.attrs) for p in self.nlri]
        if self.mp_nlri:
            mp_attrs = self.attrs.replace(next_hop=self.mp_next_hop)
            out.extend((p, mp_attrs) for p in self.mp_nlri)
        return out

    def encode(self, four_octet=True):
        if self.end_of_rib is not None:
            return encode_end_of_rib(*self.end_of_rib)
        return encode_update(self.withdrawn, self.attrs, self.nlri, four_octet)


def encode_end_of_rib(afi=AFI_IPV4, safi=SAFI_UNICAST):
    """The End-of-RIB marker of a family (RFC 4724 §2)."""
    if (afi, safi) == (AFI_IPV4, SAFI_UNICAST):
        return encode_update()
    mp_unreach = _attr(OPTIONAL, MP_UNREACH_NLRI, struct.pack("!HB", afi, safi))
    return encode_update(encoded_attrs=mp_unreach)


def encode_update(withdrawn=(), attrs=None, nlri=(), four_octet=True, encoded_attrs=None):
    """One UPDATE; `encoded_attrs` may carry attrs.encode(...) already made (shared by many peers)."""
    wd = b"".join(encode_prefix(p) for p in withdrawn)
    if encoded_attrs is None:
        encoded_attrs = attrs.encode(four_octet) if attrs is not None and nlri else b""
    nl = b"".join(encode_prefix(p) for p in nlri)
    body = _U16.pack(len(wd)) + wd + _U16.pack(len(encoded_attrs)) + encoded_attrs + nl
    if HEADER_LEN + len(body) > MAX_MESSAGE_LEN:
        raise ValueError("UPDATE of %d bytes exceeds %d" % (HEADER_LEN + len(body), MAX_MESSAGE_LEN))
    return _header(UPDATE, len(body)) + body


def pack_updates(withdrawn, announcements, four_octet=True, encoded=None):
    """As few UPDATE messages as carry `withdrawn` (prefixes) and `announcements`
    ({PathAttributes: [prefixes]}), each within 4096 bytes. `encoded` caches
    attrs.encode() results across calls (keyed by (attrs, four_octet))."""
    messages = []
    room = MAX_MESSAGE_LEN - HEADER_LEN - 4
    batch, used = [], 0
    for prefix in withdrawn:
        size = 1 + ((parse_prefix(prefix)[1] + 7) >> 3)
        if used + size > room:
            messages.append(encode_update(batch, four_octet=four_octet))
            batch, used = [], 0
        batch.append(prefix)
        used += size
    if batch:
        messages.append(encode_update(batch, four_octet=four_octet))
    for attrs, prefixes in announcements.items():
        key = (attrs, four_octet)
        blob = encoded.get(key) if encoded is not None else None
        if blob is None:
            blob = attrs.encode(four_octet)
            if encoded is not None:
                encoded[key] = blob
        space = room - len(blob)
        batch, used = [], 0
        for prefix in prefixes:
            size = 1 + ((parse_prefix(prefix)[1] + 7) >> 3)
            if used + size > space:
                messages.append(encode_update((), attrs, batch, four_octet, blob))
                batch, used = [], 0
            batch.append(prefix)
            used += size
        if batch:
            messages.append(encode_update((), attrs, batch, four_octet, blob))
    return messages


@dataclass(frozen=True, slots=True)
class Notification:
    code: int
    subcode: int = 0
    data: bytes = b""

    def describe(self):
        text = error_name(self.code, self.subcode)
        if self.code == CEASE and self.subcode in (CEASE_ADMIN_SHUTDOWN, CEASE_ADMIN_RESET) and self.data:
            # RFC 9003 shutdown communication: a length octet and UTF-8 text
            n = self.data[0]
            text += " (%s)" % self.data[1:1 + n].decode("utf-8", "replace")
        elif self.data:
            text += " [data %s]" % self.data[:32].hex()
        return text

    def encode(self):
        body = bytes([self.code, self.subcode]) + self.data
        return _header(NOTIFICATION, len(body)) + body


@dataclass(frozen=True, slots=True)
class Keepalive:
    def encode(self):
        return KEEPALIVE_BYTES


KEEPALIVE_BYTES = _header(KEEPALIVE, 0)


@dataclass(frozen=True, slots=True)
class RouteRefresh:
    afi: int = AFI_IPV4
    safi: int = SAFI_UNICAST
    subtype: int = 0            # RFC 7313: 0 request, 1 begin, 2 end of route refresh

    def encode(self):
        return _header(ROUTE_REFRESH, 4) + struct.pack("!HBB", self.afi, self.subtype, self.safi)


# ---- decoding ------------------------------------------------------------------------

def parse_header(header):
    """(length, type) of a 19-byte header; BGPError per RFC 4271 §6.1."""
    marker, length, msg_type = _HEADER.unpack(header)
    if marker != MARKER:
        raise BGPError(HEADER_ERROR, CONNECTION_NOT_SYNCHRONIZED, reason="marker is not all ones")
    if length < HEADER_LEN or length > MAX_MESSAGE_LEN:
        raise BGPError(HEADER_ERROR, BAD_MESSAGE_LENGTH, header[16:18], "length %d" % length)
    if msg_type not in _MIN_LENGTH:
        raise BGPError(HEADER_ERROR, BAD_MESSAGE_TYPE, bytes([msg_type]), "type %d" % msg_type)
    expected = _MIN_LENGTH[msg_type]
    if length < expected or (msg_type in _FIXED_LENGTH and length != expected):
        raise BGPError(HEADER_ERROR, BAD_MESSAGE_LENGTH, header[16:18],
                       "%s of length %d" % (MESSAGE_NAMES[msg_type], length))
    return length, msg_type


def decode_body(msg_type, body, four_octet=True):
    """The message of type `msg_type` whose body (after the header) is `body`."""
    if msg_type == UPDATE:
        return decode_update(body, four_octet)
    if msg_type == KEEPALIVE:
        return Keepalive()
    if msg_type == OPEN:
        return decode_open(body)
    if msg_type == NOTIFICATION:
        return Notification(body[0], body[1], bytes(body[2:]))
    if msg_type == ROUTE_REFRESH:
        afi, subtype, safi = struct.unpack("!HBB", body)
        return RouteRefresh(afi, safi, subtype)
    raise BGPError(HEADER_ERROR, BAD_MESSAGE_TYPE, bytes([msg_type]))


def decode(data, four_octet=True):
    """One whole message (header included), e.g. for tests; its length must match the header's."""
    if len(data) < HEADER_LEN:
        raise BGPError(HEADER_ERROR, BAD_MESSAGE_LENGTH, b"", "shorter than a header")
    length, msg_type = parse_header(bytes(data[:HEADER_LEN]))
    if length != len(data):
        raise BGPError(HEADER_ERROR, BAD_MESSAGE_LENGTH, data[16:18], "header says %d, got %d" % (length, len(data)))
    return decode_body(msg_type, bytes(data[HEADER_LEN:]), four_octet)


def decode_open(body):
    """An Open from its body: structure only. check_open() judges the values against a peer's config."""
    version, my_as, hold, rid, params_len = _OPEN.unpack_from(body)
    if version != VERSION:
        # the data is the highest version we support (RFC 4271 §6.2)
        raise BGPError(OPEN_ERROR, UNSUPPORTED_VERSION, _U16.pack(VERSION), "version %d" % version)
    i, end, long_params = _OPEN.size, len(body), False
    if params_len == 255 and end > i and body[i] == 255:
        # RFC 9072 extended optional parameters: a 2-octet total and 2-octet lengths
        if end < i + 3:
            raise BGPError(OPEN_ERROR, 0, reason="extended parameters length truncated")
        params_len, i, long_params = _U16.unpack_from(body, i + 1)[0], i + 3, True
    if i + params_len != end:
        raise BGPError(OPEN_ERROR, 0, reason="optional parameters length %d does not match the message" % params_len)
    four_octet_as, route_refresh, afi_safi, unknown, graceful = None, False, [], [], None
    while i < end:
        hdr = 3 if long_params else 2
        if end - i < hdr:
            raise BGPError(OPEN_ERROR, 0, reason="optional parameter truncated")
        ptype = body[i]
        plen = _U16.unpack_from(body, i + 1)[0] if long_params else body[i + 1]
        value = body[i + hdr:i + hdr + plen]
        if len(value) != plen:
            raise BGPError(OPEN_ERROR, 0, reason="optional parameter overruns the message")
        i += hdr + plen
        if ptype != OPT_PARAM_CAPABILITIES:
            raise BGPError(OPEN_ERROR, UNSUPPORTED_OPTIONAL_PARAMETER, reason="parameter type %d" % ptype)
        j = 0
        while j < plen:
            if plen - j < 2 or j + 2 + value[j + 1] > plen:
                raise BGPError(OPEN_ERROR, 0, reason="capability truncated")
            code, clen = value[j], value[j + 1]
            cap = value[j + 2:j + 2 + clen]
            j += 2 + clen
            if code == CAP_MULTIPROTOCOL and clen == 4:
                afi, _, safi = struct.unpack("!HBB", cap)
                afi_safi.append((afi, safi))
            elif code == CAP_ROUTE_REFRESH and clen == 0:
                route_refresh = True
            elif code == CAP_FOUR_OCTET_AS and clen == 4:
                four_octet_as = _U32.unpack(cap)[0]
            elif code == CAP_GRACEFUL_RESTART and graceful is None and (gr := GracefulRestart.decode(cap)):
                graceful = gr
            else:
                # Unknown capabilities (or known ones in a shape we do not use) are not fatal (RFC 5492 §5).
                unknown.append((code, bytes(cap)))
    asn = four_octet_as if four_octet_as is not None else my_as
    return Open(asn=asn, hold_time=hold, router_id=ip_from_bytes(rid), four_octet_as=four_octet_as is not None,
                route_refresh=route_refresh, afi_safi=tuple(afi_safi), unknown_capabilities=tuple(unknown),
                version=version, my_as_field=my_as, graceful_restart=graceful)


def check_open(message, expected_as, local_router_id, ibgp):
    """Judge a peer's OPEN against what we expect of it (RFC 4271 §6.2, RFC 6286, RFC 6793)."""
    if message.hold_time in (1, 2):
        raise BGPError(OPEN_ERROR, UNACCEPTABLE_HOLD_TIME, reason="hold time %d" % message.hold_time)
    if message.asn != expected_as or (message.asn <= 0xFFFF and message.my_as_field not in (None, message.asn)):
        raise BGPError(OPEN_ERROR, BAD_PEER_AS, reason="peer says AS %d, expected %d" % (message.asn, expected_as))
    if message.router_id == "0.0.0.0" or (ibgp and message.router_id == local_router_id):
        raise BGPError(OPEN_ERROR, BAD_BGP_IDENTIFIER, ip_to_bytes(message.router_id),
                       "router id %s" % message.router_id)


def _withdrawable(code, subcode, data=b"", reason=""):
    err = BGPError(code, subcode, data, reason)
    err.withdraw = ()       # filled in by decode_update once the prefixes are known
    return err


def _end_of_rib_family(body):
    """(afi, safi) if the UPDATE body is an End-of-RIB marker (RFC 4724 §2), else None.

    IPv4 unicast: no withdrawn routes, no attributes, no NLRI. Any family: no
    withdrawn routes and no NLRI, and one attribute, a well-formed MP_UNREACH_NLRI
    (optional, non-transitive; plain or extended length) holding only its AFI and SAFI."""
    if body == b"\0\0\0\0":
        return AFI_IPV4, SAFI_UNICAST
    if len(body) not in (10, 11) or body[:2] != b"\0\0" or _U16.unpack_from(body, 2)[0] != len(body) - 4:
        return None
    flags, code = body[4], body[5]
    if code != MP_UNREACH_NLRI or flags & (OPTIONAL | TRANSITIVE | PARTIAL) != OPTIONAL_NON_TRANSITIVE:
        return None
    extended = bool(flags & EXTENDED_LENGTH)
    if len(body) != (11 if extended else 10):
        return None
    length = _U16.unpack_from(body, 6)[0] if extended else body[6]
    if length != 3:
        return None
    afi, safi = struct.unpack_from("!HB", body, len(body) - 3)
    return afi, safi


def decode_update(body, four_octet=True):
    """An Update from its body, validated per RFC 4271 §6.3 (and RFC 4760, RFC 6793)."""
    family = _end_of_rib_family(body)
    if family is not None:
        return Update(end_of_rib=family)
    end = len(body)
    withdrawn_len = _U16.unpack_from(body, 0)[0]
    if 2 + withdrawn_len + 2 > end:
        raise BGPError(UPDATE_ERROR, MALFORMED_ATTRIBUTE_LIST, reason="withdrawn routes length %d" % withdrawn_len)
    attrs_len = _U16.unpack_from(body, 2 + withdrawn_len)[0]
    attrs_start = 4 + withdrawn_len
    if attrs_start + attrs_len > end:
        raise BGPError(UPDATE_ERROR, MALFORMED_ATTRIBUTE_LIST, reason="total path attribute length %d" % attrs_len)

    def bad_field(reason):
        return BGPError(UPDATE_ERROR, INVALID_NETWORK_FIELD, reason=reason)

    nlri_field = body[attrs_start + attrs_len:]
    try:
        attrs, mp_reach, mp_unreach = _decode_attributes(body[attrs_start:attrs_start + attrs_len], four_octet,
                                                         has_nlri=bool(nlri_field))
    except BGPError as err:
        if err.withdraw is not None and _carries_mp_nlri(body[attrs_start:attrs_start + attrs_len]):
            err.withdraw = None     # its MP_REACH prefixes cannot be trusted to be found: reset instead
        if err.withdraw is not None:
            try:
                err.withdraw = tuple(decode_prefixes(body[2:2 + withdrawn_len], bad_field)
                                     + decode_prefixes(nlri_field, bad_field))
            except BGPError:
                err.withdraw = None     # the prefixes cannot be found: the session must be reset
        raise
    withdrawn = decode_prefixes(body[2:2 + withdrawn_len], bad_field)
    nlri = decode_prefixes(nlri_field, bad_field)
    mp_nlri, mp_next_hop = (), None
    if mp_unreach:
        withdrawn.extend(mp_unreach)
    if mp_reach is not None:
        mp_next_hop, prefixes = mp_reach
        if attrs.next_hop is None or attrs.next_hop == mp_next_hop:
            if attrs.next_hop is None:
                attrs = attrs.replace(next_hop=mp_next_hop)
            nlri.extend(prefixes)
        else:
            mp_nlri = tuple(prefixes)
    if not nlri and not mp_nlri:
        attrs = None            # a withdrawal (or End-of-RIB): attributes mean nothing without prefixes
    return Update(tuple(withdrawn), attrs, tuple(nlri), mp_nlri, mp_next_hop if mp_nlri else None)


def _carries_mp_nlri(blob):
    """Whether a path attributes field holds MP_REACH_NLRI or MP_UNREACH_NLRI (True if its framing is broken)."""
    i, end = 0, len(blob)
    while i < end:
        if end - i < 3 or (blob[i] & EXTENDED_LENGTH and end - i < 4):
            return True
        code = blob[i + 1]
        if code in (MP_REACH_NLRI, MP_UNREACH_NLRI):
            return True
        i += 4 + _U16.unpack_from(blob, i + 2)[0] if blob[i] & EXTENDED_LENGTH else 3 + blob[i + 2]
    return i != end


def _decode_attributes(blob, four_octet, has_nlri):
    """(PathAttributes, (mp next hop, prefixes) or None, [mp withdrawn]) of a path attributes field."""
    values = {}
    other = []
    mp_reach = mp_unreach = None
    i, end = 0, len(blob)
    while i < end:
        if end - i < 3:
            raise BGPError(UPDATE_ERROR, MALFORMED_ATTRIBUTE_LIST, reason="attribute header truncated")
        flags, code = blob[i], blob[i + 1]
        if flags & EXTENDED_LENGTH:
            if end - i < 4:
                raise BGPError(UPDATE_ERROR, MALFORMED_ATTRIBUTE_LIST, reason="attribute header truncated")
            length, header = _U16.unpack_from(blob, i + 2)[0], 4
        else:
            length, header = blob[i + 2], 3
        stop = i + header + length
        if stop > end:
            raise BGPError(UPDATE_ERROR, MALFORMED_ATTRIBUTE_LIST,
                           reason="attribute %d overruns the attributes field" % code)
        raw, value = blob[i:stop], blob[i + header:stop]
        i = stop
        if code in values or (code == MP_REACH_NLRI and mp_reach is not None) \
                or (code == MP_UNREACH_NLRI and mp_unreach is not None):
            raise BGPError(UPDATE_ERROR, MALFORMED_ATTRIBUTE_LIST, reason="attribute %d repeated" % code)
        kind = ATTRIBUTE_KINDS.get(code)
        if kind is None:
            values[code] = None
            if not flags & OPTIONAL:
                raise BGPError(UPDATE_ERROR, UNRECOGNIZED_WELL_KNOWN, raw, "well-known attribute %d" % code)
            if flags & TRANSITIVE:
                # passed on, marked as having crossed a speaker that did not understand it
                other.append((flags & (OPTIONAL | TRANSITIVE) | PARTIAL, code, bytes(value)))
            continue                                    # optional non-transitive: quietly dropped
        if flags & (OPTIONAL | TRANSITIVE) != kind or (flags & PARTIAL and kind != OPTIONAL_TRANSITIVE):
            raise _withdrawable(UPDATE_ERROR, ATTRIBUTE_FLAGS_ERROR, raw,
                                "flags 0x%02x on attribute %d" % (flags, code))
        if code == MP_REACH_NLRI:
            mp_reach = _decode_mp_reach(value, raw)
            values[code] = None
            continue
        if code == MP_UNREACH_NLRI:
            mp_unreach = _decode_mp_unreach(value, raw)
            values[code] = None
            continue
        if code in PASSTHROUGH_UNITS:
            if length % PASSTHROUGH_UNITS[code]:
                raise _withdrawable(UPDATE_ERROR, OPTIONAL_ATTRIBUTE_ERROR, raw,
                                    "attribute %d length %d" % (code, length))
            values[code] = None
            other.append((flags & (OPTIONAL | TRANSITIVE | PARTIAL), code, bytes(value)))
            continue
        values[code] = _decode_known(code, flags, value, raw, four_octet)

    attrs = PathAttributes(
        origin=values.get(ORIGIN) or ORIGIN_IGP,
        as_path=values.get(AS_PATH) or (),
        next_hop=values.get(NEXT_HOP),
        med=values.get(MED),
        local_pref=values.get(LOCAL_PREF),
        atomic_aggregate=ATOMIC_AGGREGATE in values,
        aggregator=values.get(AGGREGATOR),
        originator_id=values.get(ORIGINATOR_ID),
        cluster_list=values.get(CLUSTER_LIST) or (),
        other=tuple(sorted(other, key=lambda a: a[1])),
    )
    if not four_octet:
        attrs = _merge_as4(attrs, values.get(AS4_PATH), values.get(AS4_AGGREGATOR))
    if has_nlri or (mp_reach is not None and mp_reach[1]):
        for code in (ORIGIN, AS_PATH) + ((NEXT_HOP,) if has_nlri else ()):
            if code not in values:
                raise _withdrawable(UPDATE_ERROR, MISSING_WELL_KNOWN, bytes([code]), "attribute %d missing" % code)
    return attrs, mp_reach, mp_unreach


def _decode_known(code, flags, value, raw, four_octet):
    """The value of one recognised attribute (flags already checked)."""
    length = len(value)
    if code == ORIGIN:
        if length != 1:
            raise _withdrawable(UPDATE_ERROR, ATTRIBUTE_LENGTH_ERROR, raw, "ORIGIN length %d" % length)
        if value[0] > ORIGIN_INCOMPLETE:
            raise _withdrawable(UPDATE_ERROR, INVALID_ORIGIN, raw, "ORIGIN %d" % value[0])
        return value[0]
    if code == AS_PATH:
        try:
            return _decode_as_path(value, 4 if four_octet else 2)
        except ValueError as e:
            raise _withdrawable(UPDATE_ERROR, MALFORMED_AS_PATH, reason=str(e)) from None
    if code == NEXT_HOP:
        if length != 4:
            raise _withdrawable(UPDATE_ERROR, ATTRIBUTE_LENGTH_ERROR, raw, "NEXT_HOP length %d" % length)
        if not valid_next_hop(value):
            raise _withdrawable(UPDATE_ERROR, INVALID_NEXT_HOP, raw, "NEXT_HOP %s" % ip_from_bytes(value))
        return ip_from_bytes(value)
    if code in (MED, LOCAL_PREF):
        if length != 4:
            raise _withdrawable(UPDATE_ERROR, ATTRIBUTE_LENGTH_ERROR, raw, "attribute %d length %d" % (code, length))
        return _U32.unpack(value)[0]
    if code == ATOMIC_AGGREGATE:
        if length != 0:
            raise _withdrawable(UPDATE_ERROR, ATTRIBUTE_LENGTH_ERROR, raw, "ATOMIC_AGGREGATE length %d" % length)
        return True
    if code == AGGREGATOR:
        size = 8 if four_octet else 6
        if length != size:
            raise _withdrawable(UPDATE_ERROR, ATTRIBUTE_LENGTH_ERROR, raw, "AGGREGATOR length %d" % length)
        asn = _U32.unpack_from(value)[0] if four_octet else _U16.unpack_from(value)[0]
        return asn, ip_from_bytes(value[size - 4:])
    if code == ORIGINATOR_ID:
        if length != 4:
            raise _withdrawable(UPDATE_ERROR, ATTRIBUTE_LENGTH_ERROR, raw, "ORIGINATOR_ID length %d" % length)
        return ip_from_bytes(value)
    if code == CLUSTER_LIST:
        if length == 0 or length % 4:
            raise _withdrawable(UPDATE_ERROR, ATTRIBUTE_LENGTH_ERROR, raw, "CLUSTER_LIST length %d" % length)
        return tuple(ip_from_bytes(value[k:k + 4]) for k in range(0, length, 4))
    if code == AS4_PATH:
        # Malformed AS4_PATH is ignored rather than fatal (RFC 6793 §6); confederation segments do not belong.
        try:
            segments = _decode_as_path(value, 4)
        except ValueError:
            return None
        return tuple(s for s in segments if s[0] in (AS_SET, AS_SEQUENCE)) or None
    if code == AS4_AGGREGATOR:
        if length != 8:
            return None
        return _U32.unpack_from(value)[0], ip_from_bytes(value[4:])
    raise AssertionError("no decoder for attribute %d" % code)


def _merge_as4(attrs, as4_path, as4_aggregator):
    """Recover 4-octet numbers a 2-octet speaker carried in AS4_* (RFC 6793 §4.2.3)."""
    if attrs.aggregator is not None and attrs.aggregator[0] != AS_TRANS:
        return attrs        # a 2-octet speaker aggregated after the path left 4-octet land: AS4_* are stale
    changes = {}
    if as4_aggregator is not None and attrs.aggregator is not None:
        changes["aggregator"] = as4_aggregator
    if as4_path:
        changes["as_path"] = merge_as4_path(attrs.as_path, as4_path)
    return attrs.replace(**changes) if changes else attrs


def _decode_mp_reach(value, raw):
    if len(value) < 5:
        raise BGPError(UPDATE_ERROR, OPTIONAL_ATTRIBUTE_ERROR, raw, "MP_REACH_NLRI truncated")
    afi, safi, nh_len = struct.unpack_from("!HBB", value)
    if (afi, safi) != (AFI_IPV4, SAFI_UNICAST):
        return None                 # an address family we did not offer: ignored (RFC 4760 §7)
    if nh_len != 4 or len(value) < 5 + nh_len:
        raise BGPError(UPDATE_ERROR, OPTIONAL_ATTRIBUTE_ERROR, raw, "MP_REACH_NLRI next hop length %d" % nh_len)
    nh = value[4:8]
    if not valid_next_hop(nh):
        raise BGPError(UPDATE_ERROR, INVALID_NEXT_HOP, raw, "MP_REACH_NLRI next hop %s" % ip_from_bytes(nh))

    def bad(reason):
        return BGPError(UPDATE_ERROR, OPTIONAL_ATTRIBUTE_ERROR, raw, "MP_REACH_NLRI " + reason)
    # one reserved octet (formerly SNPAs) sits between the next hop and the NLRI
    return ip_from_bytes(nh), decode_prefixes(value[4 + nh_len + 1:], bad)


def _decode_mp_unreach(value, raw):
    if len(value) < 3:
        raise BGPError(UPDATE_ERROR, OPTIONAL_ATTRIBUTE_ERROR, raw, "MP_UNREACH_NLRI truncated")
    afi, safi = struct.unpack_from("!HB", value)
    if (afi, safi) != (AFI_IPV4, SAFI_UNICAST):
        return None

    def bad(reason):
        return BGPError(UPDATE_ERROR, OPTIONAL_ATTRIBUTE_ERROR, raw, "MP_UNREACH_NLRI " + reason)
    return decode_prefixes(value[3:], bad)
