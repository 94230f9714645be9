"""nftables trace events (`meta nftrace set 1`) read straight from netlink.

`nft monitor trace` loads the whole ruleset before it listens, so it can print each rule: beside
iptables-nft's nat table of 10,000 Services that takes longer than a minute and a probe waiting
for it gives up. The kernel sends each trace event to the NFNLGRP_NFTRACE multicast group of
NETLINK_NETFILTER whoever listens, with the table, chain and rule handle by name and number, so
this listener is subscribed the moment its socket is bound and needs no cache at all; the rule
text, when wanted, is one `nft -a list chain` of the chain an event names (a few ms at any scale).

Events are plain data (`TraceEvent`); `TraceListener` reads them, bounded, in the namespace it
was opened in.
"""
from __future__ import annotations

import select
import socket
import struct
from dataclasses import dataclass

from podnet.net.netlink import NLMSG_DONE, NLMSG_ERROR, SOL_NETLINK, Netlink, parse_attrs

NETLINK_NETFILTER = 12
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTRACE = 9
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_TRACE = 17

NFTA_TRACE_TABLE, NFTA_TRACE_CHAIN, NFTA_TRACE_RULE_HANDLE, NFTA_TRACE_TYPE = 1, 2, 3, 4
NFTA_TRACE_VERDICT, NFTA_TRACE_ID, NFTA_TRACE_NETWORK_HEADER = 5, 6, 8
NFTA_TRACE_IIF, NFTA_TRACE_OIF, NFTA_TRACE_MARK, NFTA_TRACE_NFPROTO, NFTA_TRACE_POLICY = 10, 12, 14, 15, 16
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
TRACE_TYPES = {1: "policy", 2: "return", 3: "rule"}
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
# netfilter verdicts (NF_*) and nftables' own (NFT_*, negative)
VERDICTS = {0: "drop", 1: "accept", 2: "stolen", 3: "queue", 4: "repeat", 5: "stop",
            -1: "continue", -2: "break", -3: "jump", -4: "goto", -5: "return"}
_NFGEN = struct.Struct("=BBH")
_HDR = struct.Struct("=IHHII")


@dataclass(frozen=True)
class TraceEvent:
    id: int
    family: str             # the table's: ip, ip6, inet, ...
    table: str
    chain: str
    type: str               # rule, policy, return
    handle: int = 0         # the rule's (type rule)
    verdict: str = ""       # accept, drop, continue, jump, goto, return, ...
    target: str = ""        # the chain of a jump or goto
    iif: int = 0
    oif: int = 0
    network_header: bytes = b""

    def ipv4(self) -> tuple[str, str, int] | None:
        """(saddr, daddr, IP id) of the IPv4 header the event carries, if any."""
        h = self.network_header
        if len(h) < 20 or h[0] >> 4 != 4:
            return None
        return socket.inet_ntoa(h[12:16]), socket.inet_ntoa(h[16:20]), struct.unpack("!H", h[4:6])[0]


def _be32(raw: bytes) -> int:
    return struct.unpack("!I", raw[:4])[0]


def parse_trace(payload: bytes) -> TraceEvent | None:
    """One NFT_MSG_TRACE payload (after the netlink header) -> a TraceEvent."""
    if len(payload) < _NFGEN.size:
        return None
    family = FAMILIES.get(payload[0], str(payload[0]))
    a = parse_attrs(payload, _NFGEN.size)
    if NFTA_TRACE_TABLE not in a or NFTA_TRACE_CHAIN not in a:
        return None
    verdict, target = "", ""
    if NFTA_TRACE_VERDICT in a:
        v = parse_attrs(a[NFTA_TRACE_VERDICT])
        if NFTA_VERDICT_CODE in v:
            code = struct.unpack("!i", v[NFTA_VERDICT_CODE][:4])[0]
            verdict = VERDICTS.get(code, str(code))
        if NFTA_VERDICT_CHAIN in v:
            target = v[NFTA_VERDICT_CHAIN].split(b"\0", 1)[0].decode()
    kind = TRACE_TYPES.get(_be32(a[NFTA_TRACE_TYPE]), "?") if NFTA_TRACE_TYPE in a else "?"
    if kind == "policy" and NFTA_TRACE_POLICY in a:
        verdict = VERDICTS.get(struct.unpack("!i", a[NFTA_TRACE_POLICY][:4])[0], "?")
    return TraceEvent(
        id=_be32(a[NFTA_TRACE_ID]) if NFTA_TRACE_ID in a else 0, family=family,
        table=a[NFTA_TRACE_TABLE].split(b"\0", 1)[0].decode(), chain=a[NFTA_TRACE_CHAIN].split(b"\0", 1)[0].decode(),
        type=kind, handle=struct.unpack("!Q", a[NFTA_TRACE_RULE_HANDLE][:8])[0] if NFTA_TRACE_RULE_HANDLE in a else 0,
        verdict=verdict, target=target,
        iif=_be32(a[NFTA_TRACE_IIF]) if NFTA_TRACE_IIF in a else 0,
        oif=_be32(a[NFTA_TRACE_OIF]) if NFTA_TRACE_OIF in a else 0,
        network_header=a.get(NFTA_TRACE_NETWORK_HEADER, b""))


def parse_messages(data: bytes) -> list[TraceEvent]:
    """A datagram of netlink messages -> the trace events in it."""
    out = []
    offset = 0
    while offset + _HDR.size <= len(data):
        length, msgtype, _, _, _ = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            break
        if msgtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE:
            event = parse_trace(data[offset + _HDR.size:offset + length])
            if event is not None:
                out.append(event)
        elif msgtype in (NLMSG_ERROR, NLMSG_DONE):
            pass
        offset += (length + 3) & ~3
    return out


class TraceListener(Netlink):
    """A NETLINK_NETFILTER socket subscribed to this namespace's nftables trace events from
    construction until close."""

    def __init__(self, netns: str | None = None) -> None:
        super().__init__(netns, protocol=NETLINK_NETFILTER)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTRACE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)

    def read(self, timeout: float) -> list[TraceEvent]:
        """The events that arrive within `timeout` seconds of the first wait (what is queued, at once)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        out: list[TraceEvent] = []
        wait_ms = int(timeout * 1000)
        while poller.poll(wait_ms):
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:         # ENOBUFS: events were lost under load; go on with the rest
                continue
            out += parse_messages(data)
            wait_ms = 0
        return out
