"""`podnet trace --live`: send one real connection attempt and watch what nftables does with it.

A table of the probe's own (`inet podnet-trace-<pid>`, removed afterwards, even on failure) marks
the probe's packets with `meta nftrace set 1` at prerouting and output, before conntrack and
kube-proxy's DNAT; `nft monitor trace`, run bounded for the probe's window, reports every base
chain and rule the marked packets meet on this node. The probe is a TCP connect (or a UDP datagram
awaiting an answer) from the source pod's network namespace. The result says how the probe ended
(connected, refused: it reached a host that answered, timeout, unreachable), the last verdict
nftables gave it here, and whether that agrees with the symbolic walk.

Only this node's hooks are traced: the remote node's half would need the same table there.
Kernel drop reasons (the skb:kfree_skb tracepoint) need tracefs, which a node's network
namespace does not give; a timeout without an nftables drop says "dropped beyond nftables".
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from typing import Any

from podnet.net import nft
from podnet.proc import TimeoutExpired, run

TRACE_WINDOW = 3.0          # seconds `nft monitor trace` listens
CONNECT_TIMEOUT = 1.5
_EVENT = re.compile(r"^trace id (\w+) (\w+) (\S+) (\S+) (.*)$")


def table_name() -> str:
    return "podnet-trace-%d" % os.getpid()


def marking_rules(src: str, dst: str, protocol: str, port: int) -> str:
    """The probe's table: packets of this 5-tuple (either direction) get nftrace."""
    family = "ip6" if ":" in src else "ip"
    l4 = protocol.lower()
    fwd = "%s saddr %s %s daddr %s %s dport %d" % (family, src, family, dst, l4, port)
    back = "%s saddr %s %s daddr %s %s sport %d" % (family, dst, family, src, l4, port)
    chains = []
    for name, hook in (("pre", "prerouting"), ("out", "output")):
        chains.append("  chain %s {\n    type filter hook %s priority -350; policy accept;\n"
                      "    %s meta nftrace set 1\n    %s meta nftrace set 1\n  }\n" % (name, hook, fwd, back))
    return "table inet %s {\n%s}\n" % (table_name(), "".join(chains))


def parse_events(text: str) -> list[dict[str, str]]:
    """`nft monitor trace` lines -> [{id, family, table, chain, what}] (packet lines dropped)."""
    out = []
    for line in text.splitlines():
        found = _EVENT.match(line.strip())
        if found and not found.group(5).startswith("packet:"):
            out.append({"id": found.group(1), "family": found.group(2), "table": found.group(3),
                        "chain": found.group(4), "what": found.group(5)})
    return out


def last_verdict(events: list[dict[str, str]], own_table: str) -> dict[str, str] | None:
    """The first traced packet's deciding event: a drop or reject wherever it came, else its last verdict."""
    if not events:
        return None
    first = events[0]["id"]
    mine = [e for e in events if e["id"] == first and e["table"] != own_table]
    for event in mine:
        if "drop" in event["what"] or "reject" in event["what"]:
            return event
    return mine[-1] if mine else None


def _probe(netns: str, dst: str, port: int, protocol: str) -> str:
    from podnet.net.netns import entered
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    kind = socket.SOCK_DGRAM if protocol == "UDP" else socket.SOCK_STREAM
    ctx: Any = entered(netns) if netns else _Here()
    with ctx:
        sock = socket.socket(family, kind)
    with sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            if kind == socket.SOCK_DGRAM:
                sock.sendto(b"podnet-trace\n", (dst, port))
                sock.recv(512)
                return "answered"
            sock.connect((dst, port))
            return "connected"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        except OSError as e:
            return "unreachable (%s)" % (e.strerror or e)


class _Here:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def probe(netns: str, src: str, dst: str, port: int, protocol: str) -> dict[str, Any]:
    """One traced probe from `netns` (the source pod's; "" for this namespace) to dst:port."""
    nft.apply(marking_rules(src, dst, protocol, port))
    monitor: dict[str, Any] = {}

    def listen() -> None:
        try:
            done = run(["nft", "monitor", "trace"], timeout=TRACE_WINDOW)
            monitor["text"] = done.stdout.decode(errors="replace")
        except TimeoutExpired as e:       # the normal end: it listens until stopped
            monitor["text"] = e.stdout.decode(errors="replace")
        except (OSError, TimeoutError) as e:
            monitor["error"] = str(e)
    thread = threading.Thread(target=listen, name="nft-monitor-trace", daemon=True)
    try:
        thread.start()
        time.sleep(0.4)         # let nft subscribe before the first packet
        outcome = _probe(netns, dst, port, protocol)
        thread.join(TRACE_WINDOW + 10)
    finally:
        nft.apply("delete table inet %s\n" % table_name())
    events = parse_events(monitor.get("text", ""))
    return {"outcome": outcome, "events": events, "error": monitor.get("error")}


def agrees(verdict: str, outcome: str) -> bool:
    delivered = outcome in ("connected", "refused", "answered")
    return delivered == (verdict == "delivered") or (verdict == "rejected" and outcome.startswith(("refused",
                                                                                                    "unreachable")))


def confirm(verdict: str, src: str, target: str, port: int, protocol: str, netns: str) -> dict[str, Any]:
    """Probe what the walk followed (src -> target:port as the source sends it) and compare with
    its verdict; a dict for Trace.live."""
    if not target or not port:
        return {"summary": "not probed: no destination address and port", "agrees": None, "events": []}
    try:
        result = probe(netns, src, target, port, protocol)
    except (nft.NftError, OSError) as e:
        return {"summary": "not probed: %s" % e, "agrees": None, "events": []}
    decisive = last_verdict(result["events"], table_name())
    where = "%s %s %s: %s" % (decisive["family"], decisive["table"], decisive["chain"], decisive["what"]) \
        if decisive else "no nftables event seen on this node"
    ok = agrees(verdict, result["outcome"])
    summary = "probe %s -> %s:%d/%s %s; last nftables verdict here: %s; %s" % (
        src, target, port, protocol, result["outcome"], where,
        "agrees with the walk" if ok else "DIFFERS from the walk (%s)" % verdict)
    first = result["events"][0]["id"] if result["events"] else ""
    lines = ["%s %s %s %s" % (e["family"], e["table"], e["chain"], e["what"]) for e in result["events"]
             if e["id"] == first]
    return {"summary": summary, "outcome": result["outcome"], "agrees": ok, "decisive": decisive,
            "events": lines, "error": result["error"]}
