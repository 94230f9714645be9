"""rtnetlink on the standard library: links, addresses, routes, neighbours, FDB.

Why not pyroute2: importing it costs ~200 ms (its __init__ loads conntrack,
ndb, asyncio, multiprocessing), ten times a whole reference CNI ADD. The
messages a network agent needs are few and fixed, so they are encoded here
with `struct` over an AF_NETLINK socket from the C-level `_socket` module.

Every request asks for an ACK, so errors surface as NetlinkError carrying the
errno and, where the kernel gives one, its extended-ack message.

A dump the kernel marks NLM_F_DUMP_INTR (the table changed while it was being
read: the snapshot may miss or repeat entries) is read to its end and asked
again, up to DUMP_ATTEMPTS times with a short growing pause, then fails with
NetlinkDumpInterrupted: a sync must not diff against an inconsistent snapshot.
Every dump goes through Netlink.request, so rtnetlink, ctnetlink
(podnet.net.conntrack) and IPVS (podnet.net.ipvs) all get this.
"""
from __future__ import annotations

import _socket
import os
import struct

from podnet.net.ip import AF_INET, AF_INET6, IP, IPNet

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self

AF_UNSPEC = 0
AF_BRIDGE = 7
AF_NETLINK = 16
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11

# message types
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

# flags
F_REQUEST, F_MULTI, F_ACK = 0x1, 0x2, 0x4
F_DUMP_INTR = 0x10          # NLM_F_DUMP_INTR: the dump is inconsistent (the table changed meanwhile)
F_DUMP = 0x300
F_REPLACE, F_EXCL, F_CREATE, F_APPEND = 0x100, 0x200, 0x400, 0x800

IFF_UP = 0x1
IFF_PROMISC = 0x100

# link attributes
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK = 1, 3, 4, 5
IFLA_MASTER = 10
IFLA_TXQLEN = 13
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_AF_SPEC = 26
IFLA_NET_NS_FD = 28
IFLA_PROMISCUITY = 30
IFLA_LINK_NETNSID = 37
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 4, 5
VETH_INFO_PEER = 1
IFLA_BR_VLAN_FILTERING = 7
IFLA_BRPORT_MODE = 4          # hairpin
IFLA_BRIDGE_VLAN_INFO = 2
BRIDGE_VLAN_INFO_PVID, BRIDGE_VLAN_INFO_UNTAGGED = 0x2, 0x4
IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LINK = 1, 4, 3
IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT, IFLA_VXLAN_LOCAL6 = 7, 15, 17

OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")

# address attributes
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_BROADCAST, IFA_FLAGS = 1, 2, 3, 4, 8
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80
IFA_F_DADFAILED = 0x08

# route attributes and values
RTA_DST, RTA_SRC, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC = 1, 2, 4, 5, 6, 7
RTA_METRICS, RTA_TABLE = 8, 15
RTAX_MTU, RTAX_ADVMSS = 2, 8
RT_TABLE_MAIN = 254
RTPROT_KERNEL, RTPROT_BOOT, RTPROT_STATIC = 2, 3, 4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST, RT_SCOPE_NOWHERE = 0, 253, 254, 255
RTN_UNICAST, RTN_LOCAL, RTN_BLACKHOLE = 1, 2, 6
RTNH_F_ONLINK = 4

# policy routing rules (fib_rules.h): attributes, actions, flags
FRA_DST, FRA_SRC, FRA_IIFNAME, FRA_GOTO, FRA_PRIORITY, FRA_FWMARK = 1, 2, 3, 4, 6, 10
FRA_TABLE, FRA_FWMASK, FRA_OIFNAME = 15, 16, 17
FR_ACT_TO_TBL, FR_ACT_GOTO, FR_ACT_NOP = 1, 2, 3
FR_ACT_BLACKHOLE, FR_ACT_UNREACHABLE, FR_ACT_PROHIBIT = 6, 7, 8
FIB_RULE_INVERT = 0x2

# neighbour attributes and values
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
NTF_MASTER = 0x04

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_FIBRULE = struct.Struct("=BBBBBBBBI")      # family, dst_len, src_len, tos, table, res1, res2, action, flags
_RTA = struct.Struct("=HH")


# Attempts at a dump the kernel keeps marking interrupted (containernetworking's
# netlinksafe allows 5), with a pause of 1, 2, 4, 8 ms between them.
DUMP_ATTEMPTS = 5
_EINTR = 4


class NetlinkError(OSError):
    pass


class NetlinkDumpInterrupted(NetlinkError):
    """A dump stayed inconsistent (NLM_F_DUMP_INTR) on every one of DUMP_ATTEMPTS tries."""


# ---- attribute encoding -------------------------------------------------

def attr(kind: int, data: bytes | str) -> bytes:
    """One rtattr: header, payload, padding to 4 bytes."""
    if isinstance(data, str):
        data = data.encode() + b"\0"
    length = 4 + len(data)
    return _RTA.pack(length, kind) + data + b"\0" * (-length & 3)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind, b"".join(attrs))


def u8(kind: int, v: int) -> bytes:
    return attr(kind, struct.pack("=B", v))


def u32(kind: int, v: int) -> bytes:
    return attr(kind, struct.pack("=I", v))


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """rtattrs -> {type: payload}; nested payloads are parsed on demand."""
    out: dict[int, bytes] = {}
    end = len(data)
    while offset + 4 <= end:
        length, kind = _RTA.unpack_from(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4: offset + length]
        offset += (length + 3) & ~3
    return out


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError("invalid MAC address %r" % mac)
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError("invalid MAC address %r" % mac) from None


def mac_str(raw: bytes) -> str:
    return ":".join("%02x" % b for b in raw)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


# ---- objects read back from the kernel ---------------------------------------

class Link:
    __slots__ = ("index", "name", "kind", "slave_kind", "mtu", "mac", "flags", "master",
                 "operstate", "peer_index", "link_netnsid", "promiscuity", "info_data", "txqlen")
    index: int
    name: str
    kind: str
    slave_kind: str
    mtu: int
    mac: str
    flags: int
    master: int
    operstate: str
    peer_index: int
    link_netnsid: int | None
    promiscuity: int
    info_data: dict[int, bytes]     # IFLA_INFO_DATA, parsed one level
    txqlen: int

    def __init__(self, index: int, attrs: dict[int, bytes], flags: int) -> None:
        self.index = index
        self.flags = flags
        self.name = _cstr(attrs[IFLA_IFNAME]) if IFLA_IFNAME in attrs else ""
        self.mtu = struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0
        self.txqlen = struct.unpack("=I", attrs[IFLA_TXQLEN])[0] if IFLA_TXQLEN in attrs else 0
        self.mac = mac_str(attrs[IFLA_ADDRESS]) if IFLA_ADDRESS in attrs else ""
        self.master = struct.unpack("=I", attrs[IFLA_MASTER])[0] if IFLA_MASTER in attrs else 0
        self.peer_index = struct.unpack("=I", attrs[IFLA_LINK])[0] if IFLA_LINK in attrs else 0
        self.link_netnsid = (struct.unpack("=i", attrs[IFLA_LINK_NETNSID])[0]
                             if IFLA_LINK_NETNSID in attrs else None)
        self.promiscuity = (struct.unpack("=I", attrs[IFLA_PROMISCUITY])[0]
                            if IFLA_PROMISCUITY in attrs else 0)
        state = attrs.get(IFLA_OPERSTATE, b"\0")[0]
        self.operstate = OPERSTATES[state] if state < len(OPERSTATES) else "unknown"
        self.kind = self.slave_kind = ""
        self.info_data = {}
        if IFLA_LINKINFO in attrs:
            info = parse_attrs(attrs[IFLA_LINKINFO])
            if IFLA_INFO_KIND in info:
                self.kind = _cstr(info[IFLA_INFO_KIND])
            if IFLA_INFO_SLAVE_KIND in info:
                self.slave_kind = _cstr(info[IFLA_INFO_SLAVE_KIND])
            if IFLA_INFO_DATA in info:
                self.info_data = parse_attrs(info[IFLA_INFO_DATA])

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def promisc(self) -> bool:
        return bool(self.flags & IFF_PROMISC)

    def __repr__(self) -> str:
        return "Link(%d, %r, kind=%r)" % (self.index, self.name, self.kind)


class Addr:
    __slots__ = ("index", "net", "flags", "scope", "label")
    index: int
    net: IPNet
    flags: int
    scope: int
    label: str

    def __init__(self, index: int, net: IPNet, flags: int, scope: int, label: str) -> None:
        self.index = index
        self.net = net          # IPNet: address with its prefix length
        self.flags = flags
        self.scope = scope
        self.label = label

    def __repr__(self) -> str:
        return "Addr(%d, %s)" % (self.index, self.net)


class Route:
    __slots__ = ("family", "dst", "gateway", "oif", "table", "protocol", "scope", "type",
                 "priority", "flags", "prefsrc", "mtu", "advmss")
    family: int
    dst: IPNet
    gateway: IP | None
    oif: int
    table: int
    protocol: int
    scope: int
    type: int
    priority: int
    flags: int
    prefsrc: IP | None
    mtu: int
    advmss: int

    def __init__(self, **kw: object) -> None:
        for name in self.__slots__:
            setattr(self, name, kw.get(name))

    def __repr__(self) -> str:
        return "Route(%s via %s dev %s table %s)" % (self.dst, self.gateway, self.oif, self.table)


class Neigh:
    __slots__ = ("family", "index", "dst", "lladdr", "state", "flags", "master")
    family: int
    index: int
    dst: IP | None
    lladdr: str | None
    state: int
    flags: int
    master: int | None

    def __init__(self, **kw: object) -> None:
        for name in self.__slots__:
            setattr(self, name, kw.get(name))

    def __repr__(self) -> str:
        return "Neigh(%s %s dev %s)" % (self.dst, self.lladdr, self.index)


class Rule:
    """One policy routing rule (`ip rule`): which packets (src, dst, iif, oif, fwmark/mask),
    and what then (action: look up `table`, goto, blackhole, unreachable, prohibit)."""
    __slots__ = ("family", "priority", "table", "action", "src", "dst", "iifname", "oifname",
                 "fwmark", "fwmask", "invert", "goto")
    family: int
    priority: int
    table: int
    action: int
    src: IPNet | None
    dst: IPNet | None
    iifname: str
    oifname: str
    fwmark: int
    fwmask: int
    invert: bool
    goto: int

    def __init__(self, **kw: object) -> None:
        for name in self.__slots__:
            setattr(self, name, kw.get(name))

    def __repr__(self) -> str:
        return "Rule(%s from %s to %s lookup %s)" % (self.priority, self.src, self.dst, self.table)


def _rule(payload: bytes) -> Rule:
    fam, dst_len, src_len, _, tbl, _, _, action, flags = _FIBRULE.unpack_from(payload)
    a = parse_attrs(payload, _FIBRULE.size)

    def u32_of(kind: int, default: int = 0) -> int:
        return struct.unpack("=I", a[kind][:4])[0] if kind in a else default
    return Rule(
        family=fam, priority=u32_of(FRA_PRIORITY), table=u32_of(FRA_TABLE, tbl), action=action,
        src=IPNet(_ip_from(fam, a[FRA_SRC]), src_len) if FRA_SRC in a else None,
        dst=IPNet(_ip_from(fam, a[FRA_DST]), dst_len) if FRA_DST in a else None,
        iifname=_cstr(a[FRA_IIFNAME]) if FRA_IIFNAME in a else "",
        oifname=_cstr(a[FRA_OIFNAME]) if FRA_OIFNAME in a else "",
        fwmark=u32_of(FRA_FWMARK), fwmask=u32_of(FRA_FWMASK, 0xFFFFFFFF if FRA_FWMARK in a else 0),
        invert=bool(flags & FIB_RULE_INVERT), goto=u32_of(FRA_GOTO))


def _ip_from(family: int, raw: bytes) -> IP:
    return IP(family, int.from_bytes(raw, "big"))


def _route(payload: bytes, table: int | None = None) -> Route | None:
    """One RTM_NEWROUTE payload -> Route; None if it is not in `table` (None: any table)."""
    fam, dst_len, _, _, tbl, proto, scope, rtype, flags = _RTMSG.unpack_from(payload)
    a = parse_attrs(payload, _RTMSG.size)
    if RTA_TABLE in a:
        tbl = struct.unpack("=I", a[RTA_TABLE])[0]
    if table is not None and tbl != table:
        return None
    dst = IPNet(_ip_from(fam, a[RTA_DST]) if RTA_DST in a else IP(fam, 0), dst_len)
    metrics = parse_attrs(a[RTA_METRICS]) if RTA_METRICS in a else {}
    return Route(
        family=fam, dst=dst, table=tbl, protocol=proto, scope=scope, type=rtype, flags=flags,
        gateway=_ip_from(fam, a[RTA_GATEWAY]) if RTA_GATEWAY in a else None,
        oif=struct.unpack("=I", a[RTA_OIF])[0] if RTA_OIF in a else 0,
        priority=struct.unpack("=I", a[RTA_PRIORITY])[0] if RTA_PRIORITY in a else 0,
        prefsrc=_ip_from(fam, a[RTA_PREFSRC]) if RTA_PREFSRC in a else None,
        mtu=struct.unpack("=I", metrics[RTAX_MTU])[0] if RTAX_MTU in metrics else 0,
        advmss=struct.unpack("=I", metrics[RTAX_ADVMSS])[0] if RTAX_ADVMSS in metrics else 0,
    )


# ---- the socket ---------------------------------------------------------

class Netlink:
    """One rtnetlink socket, bound to the network namespace it was opened in.

    `Netlink(netns=path)` opens it inside another namespace (entering and
    leaving it at once); the socket then keeps talking to that namespace.
    """

    def __init__(self, netns: str | int | None = None, protocol: int = NETLINK_ROUTE) -> None:
        if netns is not None:
            from podnet.net.netns import entered
            with entered(netns):
                self.sock = self._open(protocol)
        else:
            self.sock = self._open(protocol)
        self.seq = int.from_bytes(os.urandom(2), "little")
        # Kernel dump batches stay well under this (NLMSG_GOODSIZE, at most 32 KiB).
        self._buf = bytearray(1 << 18)

    @staticmethod
    def _open(protocol: int) -> _socket.socket:
        sock = _socket.socket(AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, protocol)
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        except OSError:
            pass
        sock.bind((0, 0))
        return sock

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # One request, all its answers. Dumps return [(type, payload)], others [].
    def request(self, msgtype: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        dump = flags & F_DUMP == F_DUMP
        for attempt in range(DUMP_ATTEMPTS):
            out, interrupted = self._exchange(msgtype, flags, body, dump)
            if not interrupted:
                return out
            if attempt + 1 < DUMP_ATTEMPTS:
                import time
                time.sleep(0.001 * (1 << attempt))
        raise NetlinkDumpInterrupted(
            _EINTR, "netlink dump (message type %d) interrupted %d times: the kernel's table changed while "
                    "it was being read, every time; not using an inconsistent snapshot" % (msgtype, DUMP_ATTEMPTS))

    def _exchange(self, msgtype: int, flags: int, body: bytes, dump: bool) -> tuple[list[tuple[int, bytes]], bool]:
        """Send one request and read its answers to the end: (answers, whether the
        kernel marked any of them NLM_F_DUMP_INTR)."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        seq = self.seq
        flags |= F_REQUEST | F_ACK
        self.sock.send(_HDR.pack(_HDR.size + len(body), msgtype, flags, seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        interrupted = False
        while True:
            n = self.sock.recv_into(self._buf)
            data = bytes(self._buf[:n])
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, mflags, mseq, _ = _HDR.unpack_from(data, offset)
                if length < 16:
                    break
                payload = data[offset + 16: offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mflags & F_DUMP_INTR and dump:
                    interrupted = True      # keep reading: the rest of this dump must be drained
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err:
                        raise NetlinkError(err, os.strerror(err) + _extack(payload, mflags))
                    if not dump:
                        return out, False
                    continue
                if mtype == NLMSG_DONE:
                    return out, interrupted
                out.append((mtype, payload))

    # ---- links ----
    def links(self) -> list[Link]:
        return [self._link(p) for _, p in self.request(RTM_GETLINK, F_DUMP, _IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0))]

    def link(self, name: str | None = None, index: int = 0) -> Link | None:
        """The link with that name or index, or None."""
        if name is not None and not 0 < len(name.encode()) < 16:
            return None   # no such link can exist (IFNAMSIZ)
        body = _IFINFO.pack(AF_UNSPEC, 0, index, 0, 0)
        if name is not None:
            body += attr(IFLA_IFNAME, name)
        try:
            answers = self._get(RTM_GETLINK, body)
        except NetlinkError as e:
            if e.errno in (19, 22):   # ENODEV; EINVAL for a name too long
                return None
            raise
        return self._link(answers[0][1]) if answers else None

    def _get(self, msgtype: int, body: bytes) -> list[tuple[int, bytes]]:
        # A non-dump GET answers with the object then (because we ask) an ACK.
        return self.request(msgtype, 0, body)

    @staticmethod
    def _link(payload: bytes) -> Link:
        _, _, index, flags, _ = _IFINFO.unpack_from(payload)
        return Link(index, parse_attrs(payload, _IFINFO.size), flags)

    def _newlink(self, flags: int, index: int = 0, ifflags: int = 0, change: int = 0, attrs: bytes = b"",
                 family: int = AF_UNSPEC) -> None:
        self.request(RTM_NEWLINK, flags, _IFINFO.pack(family, 0, index, ifflags, change) + attrs)

    def add_bridge(self, name: str, mtu: int = 0, vlan_filtering: bool = False) -> None:
        """Create a bridge; raises NetlinkError(EEXIST) if the name is taken."""
        data = u8(IFLA_BR_VLAN_FILTERING, 1) if vlan_filtering else b""
        info = attr(IFLA_INFO_KIND, b"bridge") + (nested(IFLA_INFO_DATA, data) if data else b"")
        attrs = attr(IFLA_IFNAME, name) + nested(IFLA_LINKINFO, info)
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        self._newlink(F_CREATE | F_EXCL, attrs=attrs)

    def add_dummy(self, name: str, mtu: int = 0) -> None:
        """Create a dummy device (kube-proxy's kube-ipvs0 holds Service IPs on one, kept down);
        raises NetlinkError(EEXIST) if the name is taken, EOPNOTSUPP if the kernel has no dummy."""
        attrs = attr(IFLA_IFNAME, name) + nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"dummy"))
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        self._newlink(F_CREATE | F_EXCL, attrs=attrs)

    def add_veth(self, name: str, peer_name: str, peer_netns_fd: int | None = None, mtu: int = 0,
                 peer_mac: str | None = None) -> None:
        """Create a veth pair here; the peer goes straight into peer_netns_fd if given."""
        peer = attr(IFLA_IFNAME, peer_name)
        if peer_netns_fd is not None:
            peer += u32(IFLA_NET_NS_FD, peer_netns_fd)
        if mtu:
            peer += u32(IFLA_MTU, mtu)
        if peer_mac:
            peer += attr(IFLA_ADDRESS, mac_bytes(peer_mac))
        peer_info = nested(VETH_INFO_PEER, _IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0) + peer)
        info = attr(IFLA_INFO_KIND, b"veth") + nested(IFLA_INFO_DATA, peer_info)
        attrs = attr(IFLA_IFNAME, name) + nested(IFLA_LINKINFO, info)
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        self._newlink(F_CREATE | F_EXCL, attrs=attrs)

    def add_vxlan(self, name: str, vni: int, local: IP | None = None, port: int = 8472, dev_index: int = 0,
                  learning: bool = False, mtu: int = 0, mac: str | None = None) -> None:
        data = u32(IFLA_VXLAN_ID, vni) + attr(IFLA_VXLAN_PORT, struct.pack("!H", port)) \
            + u8(IFLA_VXLAN_LEARNING, 1 if learning else 0)
        if local is not None:
            # An IPv6 local needs its own attribute (it also makes the VTEP IPv6);
            # in IFLA_VXLAN_LOCAL the kernel would read the first 4 bytes as IPv4.
            data += attr(IFLA_VXLAN_LOCAL6 if local.family == AF_INET6 else IFLA_VXLAN_LOCAL,
                         local.packed())
        if dev_index:
            data += u32(IFLA_VXLAN_LINK, dev_index)
        info = attr(IFLA_INFO_KIND, b"vxlan") + nested(IFLA_INFO_DATA, data)
        attrs = attr(IFLA_IFNAME, name) + nested(IFLA_LINKINFO, info)
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        if mac:
            attrs += attr(IFLA_ADDRESS, mac_bytes(mac))
        self._newlink(F_CREATE | F_EXCL, attrs=attrs)

    def add_ipip(self, name: str, mtu: int = 0) -> None:
        """Create an IPIP link with no fixed endpoints (what the kernel's fallback tunl0 is:
        the next hop of each route through it is the remote end); raises NetlinkError(EEXIST)
        if the name is taken, EOPNOTSUPP if the kernel has no ipip."""
        attrs = attr(IFLA_IFNAME, name) + nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"ipip"))
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        self._newlink(F_CREATE | F_EXCL, attrs=attrs)

    def set_link(self, index: int, up: bool | None = None, master: int | None = None, mtu: int | None = None,
                 mac: str | None = None, netns_fd: int | None = None, name: str | None = None,
                 promisc: bool | None = None, txqlen: int | None = None) -> None:
        ifflags = change = 0
        if up is not None:
            change |= IFF_UP
            ifflags |= IFF_UP if up else 0
        if promisc is not None:
            change |= IFF_PROMISC
            ifflags |= IFF_PROMISC if promisc else 0
        attrs = b""
        if master is not None:
            attrs += u32(IFLA_MASTER, master)
        if mtu:
            attrs += u32(IFLA_MTU, mtu)
        if mac:
            attrs += attr(IFLA_ADDRESS, mac_bytes(mac))
        if netns_fd is not None:
            attrs += u32(IFLA_NET_NS_FD, netns_fd)
        if name:
            attrs += attr(IFLA_IFNAME, name)
        if txqlen is not None:
            attrs += u32(IFLA_TXQLEN, txqlen)
        self._newlink(0, index=index, ifflags=ifflags, change=change, attrs=attrs)

    def set_bridge_port(self, index: int, hairpin: bool) -> None:
        data = u8(IFLA_BRPORT_MODE, 1 if hairpin else 0)
        info = attr(IFLA_INFO_SLAVE_KIND, b"bridge") + nested(IFLA_INFO_SLAVE_DATA, data)
        self._newlink(0, index=index, attrs=nested(IFLA_LINKINFO, info))

    def bridge_vlan_add(self, index: int, vid: int, pvid: bool = False, untagged: bool = False) -> None:
        flags = (BRIDGE_VLAN_INFO_PVID if pvid else 0) | (BRIDGE_VLAN_INFO_UNTAGGED if untagged else 0)
        spec = nested(IFLA_AF_SPEC, attr(IFLA_BRIDGE_VLAN_INFO, struct.pack("=HH", flags, vid)))
        self.request(RTM_SETLINK, 0, _IFINFO.pack(AF_BRIDGE, 0, index, 0, 0) + spec)

    def bridge_vlan_del(self, index: int, vid: int) -> None:
        spec = nested(IFLA_AF_SPEC, attr(IFLA_BRIDGE_VLAN_INFO, struct.pack("=HH", 0, vid)))
        self.request(RTM_DELLINK, 0, _IFINFO.pack(AF_BRIDGE, 0, index, 0, 0) + spec)

    def del_link(self, index: int) -> None:
        self.request(RTM_DELLINK, 0, _IFINFO.pack(AF_UNSPEC, 0, index, 0, 0))

    # ---- addresses ----
    def addrs(self, index: int | None = None, family: int = AF_UNSPEC) -> list[Addr]:
        out = []
        for _, p in self.request(RTM_GETADDR, F_DUMP, _IFADDR.pack(family, 0, 0, 0, 0)):
            fam, plen, flags, scope, idx = _IFADDR.unpack_from(p)
            if index is not None and idx != index:
                continue
            a = parse_attrs(p, _IFADDR.size)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if raw is None:
                continue
            if IFA_FLAGS in a:
                flags = struct.unpack("=I", a[IFA_FLAGS])[0]
            label = _cstr(a[IFA_LABEL]) if IFA_LABEL in a else ""
            out.append(Addr(idx, IPNet(_ip_from(fam, raw), plen), flags, scope, label))
        return out

    def add_addr(self, index: int, net: IPNet, nodad: bool = False, replace: bool = False,
                 noprefixroute: bool = False) -> None:
        """Add net (an IPNet, e.g. 10.1.0.2/24) to a link; IPv4 gets its broadcast."""
        flags = (IFA_F_NODAD if nodad else 0) | (0x200 if noprefixroute else 0)
        body = _IFADDR.pack(net.family, net.prefixlen, flags & 0xFF, 0, index)
        raw = net.ip.packed()
        body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
        if net.family == AF_INET and net.prefixlen < 31:
            body += attr(IFA_BROADCAST, net.broadcast.packed())
        if flags > 0xFF:
            body += u32(IFA_FLAGS, flags)
        self.request(RTM_NEWADDR, F_CREATE | (F_REPLACE if replace else F_EXCL), body)

    def del_addr(self, index: int, net: IPNet) -> None:
        body = _IFADDR.pack(net.family, net.prefixlen, 0, 0, index) + attr(IFA_LOCAL, net.ip.packed())
        self.request(RTM_DELADDR, 0, body)

    # ---- routes ----
    def routes(self, family: int = AF_INET, table: int | None = RT_TABLE_MAIN) -> list[Route]:
        """The routes of one family (AF_UNSPEC: all) in `table` (None: every table)."""
        out = []
        for _, p in self.request(RTM_GETROUTE, F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            route = _route(p, table)
            if route is not None:
                out.append(route)
        return out

    def rules(self, family: int = AF_INET) -> list[Rule]:
        """The policy routing rules of one family, in the kernel's (priority) order."""
        return [_rule(p) for _, p in self.request(RTM_GETRULE, F_DUMP, _FIBRULE.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))]

    def route_get(self, dst: IP) -> Route | None:
        """The route the kernel picks for a packet to dst (`ip route get`): its oif is
        the link it leaves through (0 if none, e.g. a blackhole), its dst dst/32 (or /128).
        NetlinkError if the kernel has no route (ENETUNREACH)."""
        body = _RTMSG.pack(dst.family, dst.bits, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, dst.packed())
        for _, payload in self._get(RTM_GETROUTE, body):
            return _route(payload)
        return None

    def _route_msg(self, dst: IPNet, gateway: IP | None, oif: int, table: int, protocol: int,
                   scope: int | None, onlink: bool, priority: int, mtu: int, advmss: int,
                   prefsrc: IP | None, rtype: int = RTN_UNICAST) -> bytes:
        dst = dst.masked()
        if scope is None:
            scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
        body = _RTMSG.pack(dst.family, dst.prefixlen, 0, 0, table if table < 256 else 252,
                           protocol, scope, rtype, RTNH_F_ONLINK if onlink else 0)
        if dst.prefixlen:
            body += attr(RTA_DST, dst.ip.packed())
        if table >= 256:
            body += u32(RTA_TABLE, table)
        if gateway is not None:
            body += attr(RTA_GATEWAY, gateway.packed())
        if oif:
            body += u32(RTA_OIF, oif)
        if priority:
            body += u32(RTA_PRIORITY, priority)
        if prefsrc is not None:
            body += attr(RTA_PREFSRC, prefsrc.packed())
        metrics = (u32(RTAX_MTU, mtu) if mtu else b"") + (u32(RTAX_ADVMSS, advmss) if advmss else b"")
        if metrics:
            body += attr(RTA_METRICS, metrics)
        return body

    def add_route(self, dst: IPNet, gateway: IP | None = None, oif: int = 0, table: int = RT_TABLE_MAIN,
                  protocol: int = RTPROT_BOOT, scope: int | None = None, onlink: bool = False, priority: int = 0,
                  mtu: int = 0, advmss: int = 0, prefsrc: IP | None = None, replace: bool = False,
                  append: bool = False, rtype: int = RTN_UNICAST) -> None:
        """Add (or with replace=True, add-or-update) a route; dst is an IPNet.

        rtype: RTN_UNICAST, or e.g. RTN_BLACKHOLE (6) for a route without a
        next hop (give scope=RT_SCOPE_UNIVERSE, as `ip route add blackhole` does).
        """
        body = self._route_msg(dst, gateway, oif, table, protocol, scope, onlink, priority,
                               mtu, advmss, prefsrc, rtype)
        flags = F_CREATE | (F_REPLACE if replace else (F_APPEND if append else F_EXCL))
        self.request(RTM_NEWROUTE, flags, body)

    def del_route(self, dst: IPNet, gateway: IP | None = None, oif: int = 0, table: int = RT_TABLE_MAIN,
                  priority: int = 0, protocol: int = 0) -> None:
        # Scope RT_SCOPE_NOWHERE matches any scope (as `ip route del`); with 0
        # (universe) the kernel would only delete routes via a gateway, and a
        # link-scope route (no gateway) would answer ESRCH. protocol 0 matches
        # any; another value deletes only a route installed with it.
        body = self._route_msg(dst, gateway, oif, table, protocol, RT_SCOPE_NOWHERE, False, priority,
                               0, 0, None, rtype=0)
        self.request(RTM_DELROUTE, 0, body)

    # ---- neighbours and FDB ----
    def neighbours(self, family: int = AF_INET, index: int | None = None) -> list[Neigh]:
        out = []
        for _, p in self.request(RTM_GETNEIGH, F_DUMP, _NDMSG.pack(family, 0, 0, 0, 0)):
            fam, idx, state, flags, _ = _NDMSG.unpack_from(p)
            if index is not None and idx != index:
                continue
            a = parse_attrs(p, _NDMSG.size)
            dst = None
            if NDA_DST in a:
                raw = a[NDA_DST]
                dst = _ip_from(AF_INET if len(raw) == 4 else AF_INET6, raw)
            out.append(Neigh(family=fam, index=idx, state=state, flags=flags, dst=dst,
                             lladdr=mac_str(a[NDA_LLADDR]) if NDA_LLADDR in a else None))
        return out

    def set_neighbour(self, index: int, dst: IP, lladdr: str, state: int = NUD_PERMANENT) -> None:
        """Add or replace a neighbour (ARP/NDP) entry: dst IP -> lladdr on link index."""
        body = _NDMSG.pack(dst.family, index, state, 0, 0)
        body += attr(NDA_DST, dst.packed()) + attr(NDA_LLADDR, mac_bytes(lladdr))
        self.request(RTM_NEWNEIGH, F_CREATE | F_REPLACE, body)

    def del_neighbour(self, index: int, dst: IP) -> None:
        body = _NDMSG.pack(dst.family, index, 0, 0, 0) + attr(NDA_DST, dst.packed())
        self.request(RTM_DELNEIGH, 0, body)

    def fdb(self, index: int | None = None) -> list[Neigh]:
        """Bridge/VXLAN FDB entries (`bridge fdb show`), of one link if index is given.

        Neigh objects with family AF_BRIDGE: lladdr the MAC, dst the remote VTEP
        IP of a VXLAN entry (None for a bridge port's), state and flags
        (NTF_SELF: the device's own table) as the kernel reports them.
        """
        return self.neighbours(family=AF_BRIDGE, index=index)

    def set_fdb(self, index: int, lladdr: str, dst: IP) -> None:
        """Add or replace a VXLAN FDB entry: MAC -> remote VTEP IP (bridge fdb ... self).

        The all-zeros MAC (where broadcast and unknown traffic is flooded) and
        multicast MACs hold a list of VTEPs that the kernel refuses to replace
        (EOPNOTSUPP): for them `dst` is added to the list (`bridge fdb append`),
        idempotently; del_fdb with that dst removes it again.
        """
        raw = mac_bytes(lladdr)
        flood = raw == b"\0" * 6 or raw[0] & 1
        body = _NDMSG.pack(AF_BRIDGE, index, NUD_PERMANENT, NTF_SELF, 0)
        body += attr(NDA_LLADDR, raw) + attr(NDA_DST, dst.packed())
        self.request(RTM_NEWNEIGH, F_CREATE | (F_APPEND if flood else F_REPLACE), body)

    def del_fdb(self, index: int, lladdr: str, dst: IP | None = None) -> None:
        body = _NDMSG.pack(AF_BRIDGE, index, 0, NTF_SELF, 0) + attr(NDA_LLADDR, mac_bytes(lladdr))
        if dst is not None:
            body += attr(NDA_DST, dst.packed())
        self.request(RTM_DELNEIGH, 0, body)


def _extack(payload: bytes, flags: int) -> str:
    # NLM_F_CAPPED (0x100): the original request is not echoed; TLVs follow the header.
    NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
    if not flags & NLM_F_ACK_TLVS:
        return ""
    offset = 4 + 16
    if not flags & NLM_F_CAPPED and len(payload) >= 20:
        offset = 4 + struct.unpack_from("=I", payload, 4)[0]
    attrs = parse_attrs(payload, (offset + 3) & ~3)
    msg = attrs.get(1)
    return (": " + _cstr(msg)) if msg else ""
