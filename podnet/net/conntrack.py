"""Conntrack entries through ctnetlink (NETLINK_NETFILTER), standard library only.

Only what the CNI plugins and kube_proxy need: delete the entries of one
protocol whose original destination port is one of a few ports, as the
reference portmap does (netlink.ConntrackDeleteFilter), or whose original
destination / reply source match a filter (kube-proxy's clearing of UDP flows
to a removed endpoint), so that a UDP "connection" tracked before a mapping
changed does not keep sending packets to the old place.
No `conntrack` tool is needed. The table is dumped once and filtered here;
each match is deleted by its original tuple and zone. A dump walks the whole
host-wide hash table (~10 ms for 256k buckets, whatever the namespace
holds), so it is skipped when the namespace tracks no connection at all.
"""
from __future__ import annotations

import struct

from podnet.net.ip import AF_INET, AF_INET6, inet_ntop
from podnet.net.netlink import F_DUMP, Netlink, attr, parse_attrs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_ZONE = 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NLA_F_NESTED = 0x8000
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}

_NFGEN = struct.Struct("=BBH")      # family, version (0), res_id (big endian, 0)
_ENOENT = 2


class Flow:
    """One conntrack entry: the original direction, and the reply's source (the
    DNAT target, for a flow that went through a Service). A plain class: this
    module is on portmap's DEL path, where typing/collections cost start-up time."""
    __slots__ = ("family", "proto", "src", "dst", "sport", "dport", "reply_src", "reply_sport", "key")
    family: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    reply_src: str
    reply_sport: int
    key: bytes

    def __init__(self, family: int, proto: int, src: str, dst: str, sport: int, dport: int,
                 reply_src: str, reply_sport: int, key: bytes) -> None:
        self.family, self.proto, self.src, self.dst = family, proto, src, dst
        self.sport, self.dport, self.reply_src, self.reply_sport = sport, dport, reply_src, reply_sport
        self.key = key          # CTA_TUPLE_ORIG (+ CTA_ZONE): what names the entry for deletion

    def __repr__(self) -> str:
        return "Flow(%d %s:%d -> %s:%d, reply from %s:%d)" % (
            self.proto, self.src, self.sport, self.dst, self.dport, self.reply_src, self.reply_sport)


def _tuple(raw: bytes, family: int) -> tuple[str, str, int, int, int]:
    """(src ip, dst ip, proto number, src port, dst port) of one CTA_TUPLE_* attribute."""
    parts = parse_attrs(raw)
    ips = parse_attrs(parts.get(CTA_TUPLE_IP, b""))
    src_key, dst_key = (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == AF_INET else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    src = inet_ntop(family, ips[src_key]) if src_key in ips else ""
    dst = inet_ntop(family, ips[dst_key]) if dst_key in ips else ""
    proto = parse_attrs(parts.get(CTA_TUPLE_PROTO, b""))
    num = proto.get(CTA_PROTO_NUM, b"\0")[0]
    sport = struct.unpack("!H", proto[CTA_PROTO_SRC_PORT])[0] if CTA_PROTO_SRC_PORT in proto else 0
    dport = struct.unpack("!H", proto[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in proto else 0
    return src, dst, num, sport, dport


class Conntrack(Netlink):
    """One ctnetlink socket in the current network namespace."""

    def __init__(self) -> None:
        super().__init__(protocol=NETLINK_NETFILTER)

    def _request(self, msg: int, flags: int, family: int, body: bytes = b"") -> list[tuple[int, bytes]]:
        """One ctnetlink request; answers as [(nfgen family, payload after nfgenmsg)]."""
        mtype = (NFNL_SUBSYS_CTNETLINK << 8) | msg
        answers = self.request(mtype, flags, _NFGEN.pack(family, 0, 0) + body)
        return [(p[0], p[_NFGEN.size:]) for _, p in answers]

    def entries(self, family: int = 0) -> list[tuple[int, bytes, bytes, int, int, int]]:
        """[(family, orig tuple attribute, zone attribute or b"", proto, src port, dst port)]
        of one family, or of all with family 0 (one pass over the table)."""
        out = []
        for fam, payload in self._request(IPCTNL_MSG_CT_GET, F_DUMP, family):
            attrs = parse_attrs(payload)
            orig = attrs.get(CTA_TUPLE_ORIG)
            if orig is None:
                continue
            proto = parse_attrs(parse_attrs(orig).get(CTA_TUPLE_PROTO, b""))
            num = proto.get(CTA_PROTO_NUM, b"\0")[0]
            sport = struct.unpack("!H", proto[CTA_PROTO_SRC_PORT])[0] if CTA_PROTO_SRC_PORT in proto else 0
            dport = struct.unpack("!H", proto[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in proto else 0
            zone = attr(CTA_ZONE, attrs[CTA_ZONE]) if CTA_ZONE in attrs else b""
            out.append((fam, attr(CTA_TUPLE_ORIG | NLA_F_NESTED, orig), zone, num, sport, dport))
        return out

    def flows(self, family: int = 0) -> list[Flow]:
        """Every entry as a Flow (one pass over the table)."""
        out = []
        for fam, payload in self._request(IPCTNL_MSG_CT_GET, F_DUMP, family):
            attrs = parse_attrs(payload)
            orig, reply = attrs.get(CTA_TUPLE_ORIG), attrs.get(CTA_TUPLE_REPLY)
            if orig is None or reply is None:
                continue
            src, dst, num, sport, dport = _tuple(orig, fam)
            rsrc, _, _, rsport, _ = _tuple(reply, fam)
            zone = attr(CTA_ZONE, attrs[CTA_ZONE]) if CTA_ZONE in attrs else b""
            out.append(Flow(fam, num, src, dst, sport, dport, rsrc, rsport,
                            attr(CTA_TUPLE_ORIG | NLA_F_NESTED, orig) + zone))
        return out

    def delete_flows(self, predicate: Callable[[Flow], bool], family: int = 0) -> int:
        """Delete every entry for which predicate(Flow) is true; returns how many."""
        deleted = 0
        for flow in self.flows(family):
            if predicate(flow):
                deleted += self._delete(flow.family, flow.key)
        return deleted

    def _delete(self, family: int, key: bytes) -> int:
        try:
            self._request(IPCTNL_MSG_CT_DELETE, 0, family, key)
            return 1
        except OSError as e:
            if e.errno != _ENOENT:     # gone meanwhile (timed out, or another DEL)
                raise
            return 0

    def delete_by_dst_port(self, protocol: str | int, ports: Iterable[int],
                           families: tuple[int, ...] = (AF_INET, AF_INET6)) -> int:
        """Delete entries of `protocol` (name or number) whose original destination
        port is in `ports`; returns how many were deleted."""
        proto = PROTOCOLS.get(protocol, protocol) if isinstance(protocol, str) else protocol
        wanted = set(ports)
        deleted = 0
        # The dump walks the whole (host-wide) hash table whatever it filters,
        # ~10 ms with 256k buckets: one pass serves both families.
        for fam, orig, zone, num, _, dport in self.entries(families[0] if len(families) == 1 else 0):
            if num != proto or dport not in wanted or fam not in families:
                continue
            deleted += self._delete(fam, orig + zone)
        return deleted


def count() -> int | None:
    """Entries tracked in the current network namespace (None if unknown)."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def delete_by_dst_port(protocol: str | int, ports: Collection[int],
                       families: Iterable[int] = (AF_INET, AF_INET6)) -> int:
    """Delete matching entries in the current network namespace; returns the count."""
    if not ports or count() == 0:
        return 0
    with Conntrack() as ct:
        return ct.delete_by_dst_port(protocol, ports, tuple(families))


def delete_flows(predicate: Callable[[Flow], bool], family: int = 0) -> int:
    """Delete the entries predicate(Flow) selects in the current network namespace; returns the count."""
    if count() == 0:
        return 0
    with Conntrack() as ct:
        return ct.delete_flows(predicate, family)
