"""NFLOG: packets the kernel logs to a netlink group (nftables' `log group N`), read through
nfnetlink_log on the standard library's AF_NETLINK socket.

One listener binds one group in the network namespace the socket was opened in
(nfnetlink_log instances are per namespace and per group; a group has at most one
listener there: a second bind is EBUSY). It asks for the packet's first
`copy_range` bytes (enough for the IP header and the ports) and a queue threshold
of 1, so every logged packet is sent at once rather than after the kernel's
default one-second flush. What arrives is parsed into a `LoggedPacket`: the log
prefix the rule gave, the addresses, the protocol, the ports (ICMP: type and
code), the interfaces.

Reads are bounded: `receive(timeout)` waits at most `timeout` seconds on the socket
and returns what is there. When the listener falls behind, the kernel drops
messages and the socket reports ENOBUFS; that is counted (`overruns`), not raised:
a log of drops may lose lines, the daemon reading it must not stop. The rate of
what is logged is the ruleset's business (a `limit rate` before the `log`).
"""
from __future__ import annotations

import errno
import select
import struct
from dataclasses import dataclass

from podnet.net.ip import AF_INET, AF_INET6, inet_ntop
from podnet.net.netlink import Netlink, attr, parse_attrs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
PACKET_MSG = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
CONFIG_MSG = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG

# configuration attributes and commands (linux/netfilter/nfnetlink_log.h)
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2

# packet attributes
NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 4, 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

_NLMSG_HDR = struct.Struct("=IHHII")     # length, type, flags, seq, portid
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_PACKET_HDR = struct.Struct("!HBx")      # hw_protocol, hook, pad

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6, IPPROTO_SCTP = 1, 6, 17, 58, 132
PROTOCOL_NAMES = {IPPROTO_ICMP: "ICMP", IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_ICMPV6: "ICMPv6",
                  IPPROTO_SCTP: "SCTP"}
_PORTED = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)
_ICMPS = (IPPROTO_ICMP, IPPROTO_ICMPV6)
# IPv6 extension headers walked to reach the transport header (hop-by-hop, routing, destination
# options); a fragment header (44) is read for its offset; anything else ends the walk.
_IPV6_EXTENSIONS = (0, 43, 60)
_IPV6_FRAGMENT = 44

DEFAULT_COPY_RANGE = 128        # bytes of each packet: IPv4/IPv6 header, options, transport ports
RECEIVE_BUFFER = 1 << 20


@dataclass(frozen=True, slots=True)
class Packet:
    """What the first bytes of an IP packet say: family (4 or 6), protocol number, addresses,
    ports (0 when it has none, or is a later fragment); ICMP packets carry their type and code
    in sport and dport."""
    family: int
    protocol: int
    src: str
    dst: str
    sport: int = 0
    dport: int = 0

    @property
    def protocol_name(self) -> str:
        return PROTOCOL_NAMES.get(self.protocol, str(self.protocol))


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    """One packet the kernel logged: the rule's prefix, the hook it was logged at, the in and
    out interface indexes (0: none), the mark, and the parsed packet (None when its bytes are
    not an IP packet this module reads)."""
    prefix: str
    hook: int
    indev: int
    outdev: int
    mark: int
    packet: Packet | None
    length: int                 # bytes of the packet copied to us


def parse_ip(data: bytes) -> Packet | None:
    """The addresses, protocol and ports of a raw IPv4 or IPv6 packet; None when too short or
    not IP."""
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20:
            return None
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20:
            return None
        proto = data[9]
        fragment_offset = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
        src, dst = inet_ntop(AF_INET, data[12:16]), inet_ntop(AF_INET, data[16:20])
        return _transport(4, proto, src, dst, data, ihl, fragment_offset == 0)
    if version == 6:
        if len(data) < 40:
            return None
        proto, offset, first = data[6], 40, True
        src, dst = inet_ntop(AF_INET6, data[8:24]), inet_ntop(AF_INET6, data[24:40])
        for _ in range(8):                 # bounded: a chain of headers cannot loop us
            if proto in _IPV6_EXTENSIONS and offset + 2 <= len(data):
                proto, offset = data[offset], offset + (data[offset + 1] + 1) * 8
            elif proto == _IPV6_FRAGMENT and offset + 8 <= len(data):
                first = struct.unpack_from("!H", data, offset + 2)[0] & 0xFFF8 == 0
                proto, offset = data[offset], offset + 8
            else:
                break
        return _transport(6, proto, src, dst, data, offset, first)
    return None


def _transport(family: int, proto: int, src: str, dst: str, data: bytes, offset: int, first: bool) -> Packet:
    if first and proto in _PORTED and offset + 4 <= len(data):
        sport, dport = struct.unpack_from("!HH", data, offset)
        return Packet(family, proto, src, dst, sport, dport)
    if first and proto in _ICMPS and offset + 2 <= len(data):
        return Packet(family, proto, src, dst, data[offset], data[offset + 1])
    return Packet(family, proto, src, dst)


def parse_packet_message(payload: bytes) -> LoggedPacket | None:
    """One NFULNL_MSG_PACKET message's payload (after the netlink header: nfgenmsg, then
    attributes) -> LoggedPacket; None when it is too short to be one."""
    if len(payload) < 4:
        return None
    attrs = parse_attrs(payload, 4)
    hook = 0
    if NFULA_PACKET_HDR in attrs and len(attrs[NFULA_PACKET_HDR]) >= _PACKET_HDR.size:
        hook = _PACKET_HDR.unpack_from(attrs[NFULA_PACKET_HDR])[1]
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace")
    data = attrs.get(NFULA_PAYLOAD, b"")
    return LoggedPacket(prefix=prefix, hook=hook, indev=_be32(attrs.get(NFULA_IFINDEX_INDEV)),
                        outdev=_be32(attrs.get(NFULA_IFINDEX_OUTDEV)), mark=_be32(attrs.get(NFULA_MARK)),
                        packet=parse_ip(data), length=len(data))


def _be32(raw: bytes | None) -> int:
    return struct.unpack("!I", raw[:4])[0] if raw and len(raw) >= 4 else 0


def parse_messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The netlink messages in one datagram: (type, flags, payload after the header)."""
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length, mtype, flags, _, _ = _NLMSG_HDR.unpack_from(data, offset)
        if length < _NLMSG_HDR.size or offset + length > len(data):
            return
        yield mtype, flags, data[offset + _NLMSG_HDR.size: offset + length]
        offset += (length + 3) & ~3


def config_body(group: int, *attrs: bytes) -> bytes:
    """An NFULNL_MSG_CONFIG body for `group`: nfgenmsg (AF_UNSPEC, version 0, res_id = the group,
    big endian), then the attributes."""
    return struct.pack("=BB", 0, 0) + struct.pack("!H", group) + b"".join(attrs)


class NflogListener:
    """One NFLOG group, bound in the current network namespace (or `netns`, a path or fd).

    Raises OSError from the constructor when the kernel refuses: EBUSY (another listener has
    the group), EPERM (no CAP_NET_ADMIN), EPROTONOSUPPORT (no nfnetlink_log)."""

    def __init__(self, group: int, copy_range: int = DEFAULT_COPY_RANGE, netns: str | int | None = None) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError("NFLOG group %d is not 0..65535" % group)
        self.group = group
        self.overruns = 0       # times the kernel dropped messages because we read too slowly
        self._netlink = Netlink(netns=netns, protocol=NETLINK_NETFILTER)
        self.sock = self._netlink.sock
        try:
            try:
                self.sock.setsockopt(1, 8, RECEIVE_BUFFER)      # SOL_SOCKET, SO_RCVBUF
            except OSError:
                pass
            self._netlink.request(CONFIG_MSG, 0, config_body(group, attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))))
            self._netlink.request(CONFIG_MSG, 0, config_body(
                group, attr(NFULA_CFG_MODE, struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET)),
                attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))))
        except BaseException:
            self._netlink.close()
            raise
        self._buf = bytearray(1 << 16)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, timeout: float, max_datagrams: int = 256) -> list[LoggedPacket]:
        """The packets logged so far, waiting at most `timeout` s for the first one and reading at
        most `max_datagrams` datagrams (a flood cannot keep one call going)."""
        out: list[LoggedPacket] = []
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return out
        for _ in range(max_datagrams):
            try:
                n = self.sock.recv_into(self._buf, 0, 0x40)    # MSG_DONTWAIT
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            for mtype, _, payload in parse_messages(bytes(self._buf[:n])):
                if mtype == PACKET_MSG:
                    packet = parse_packet_message(payload)
                    if packet is not None:
                        out.append(packet)
                # NLMSG_DONE ends a batch; acks and anything else carry nothing for us
        return out

    def close(self) -> None:
        """Unbind the group (so another listener may take it) and close the socket."""
        try:
            self._netlink.request(CONFIG_MSG, 0, config_body(self.group, attr(NFULA_CFG_CMD,
                                                                              bytes([NFULNL_CFG_CMD_UNBIND]))))
        except OSError:
            pass            # closing the socket unbinds it anyway
        finally:
            self._netlink.close()

    def __enter__(self) -> NflogListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
