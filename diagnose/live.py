"""`podnet trace --live`: send one real connection attempt and watch what each node does with it.

A table of the probe's own (`inet podnet-trace-<pid>`, removed afterwards, even on failure) marks
the probe's packets with `meta nftrace set 1` at prerouting and output, before conntrack and
kube-proxy's DNAT; the kernel's trace events for them (every base chain and rule the marked
packets meet on this node) are read straight from netlink (podnet/net/nftrace.py), subscribed
before the table exists: `nft monitor trace` would first load the whole ruleset, which beside
iptables-nft's rules of 10,000 Services takes longer than a minute. The probe is a TCP
connect (or a UDP datagram awaiting an answer) from the source pod's network namespace.

The other nodes' halves: for each node given with `--remote-exec NODE=COMMAND` (a command prefix
that runs `podnet` there), `podnet trace --watch SRC DST PORT/PROTO --seconds N` is started on
that node first; it installs the same marking table there (its own pid in the name), prints a
"listening" line once it is subscribed, listens N seconds, removes
its table (also on failure, SIGTERM or SIGHUP) and prints the events as JSON. A remote node sees
the packet after decapsulation, and after the source node's DNAT: it marks the inner 5-tuple, from
the source pod to the endpoint the symbolic walk followed (Trace.endpoint), not a ClusterIP.
(A NodePort reached through another node, or any path that SNATs, is not matched there.)

The kernel's drop reasons (skb:kfree_skb, diagnose/dropwatch.py) are read during the same window,
by the probe and by each remote watch: host-wide, in a private mount namespace.

The result (Trace.live) says how the probe ended (connected, refused: it reached a host that
answered, timeout, unreachable), each traced node's path and decisive nftables verdict, the
kernel drops, and whether that agrees with the walk: a walk that stops at a NetworkPolicy on a
node traced here wants the drop in that node's podnet-network-policy table; a walk that stops
outside nftables (rp_filter, a route, a neighbour) wants no nftables drop anywhere.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import threading
import time
from typing import Any, Protocol

from diagnose import dropwatch
from diagnose.dropwatch import Streamed, json_object
from podnet.net import nft
from podnet.proc import run


class Walked(Protocol):
    """What confirm() reads of a diagnose.trace.Trace (named by shape: trace.py imports this module)."""
    src_ip: str
    sent_to: str
    sent_port: int
    protocol: str
    verdict: str
    endpoint: tuple[str, int] | None
    hops: list[Any]

    @property
    def failed(self) -> Any: ...

TRACE_WINDOW = 3.0          # seconds a remote watch listens: it is listening before the probe starts
CONNECT_TIMEOUT = 1.5
SETTLE = 0.3                # after the probe, for the last trace events to come in
RULE_TEXT_TIMEOUT = 10.0    # one chain's listing, for the rules trace events name
REMOTE_START_WAIT = 30.0    # until a remote watch says "listening" (kubectl exec is slow to start)
WATCH_MAX = 120.0
PROBE_TABLE_PREFIX = "podnet-trace-"
POLICY_TABLE = "podnet-network-policy"      # network_policy/nftables.py's TABLE
_EVENT = re.compile(r"^trace id (\w+) (\w+) (\S+) (\S+) (.*)$")
_OIF = re.compile(r'\boif "([^"]+)"')
_IIF = re.compile(r'\biif "([^"]+)"')
_IPID = re.compile(r"\bip id (\d+)")
_SADDR = re.compile(r"\bip6? saddr (\S+)")
_DECIDES = re.compile(r"\(verdict (drop|reject)\b|^policy drop\b")
# where the walk stops outside nftables, what the kernel's reason for it would be
KERNEL_REASONS = {"rp_filter": ("IP_RPFILTER",), "route": ("IP_INNOROUTES", "IP_OUTNOROUTES"),
                  "neighbour": ("NEIGH_FAILED", "NEIGH_QUEUEFULL", "NEIGH_DEAD", "NEIGH_CREATEFAIL"),
                  "mtu": ("PKT_TOO_BIG",), "forward": ("NETFILTER_DROP",),
                  "egress-policy": ("NETFILTER_DROP",), "ingress-policy": ("NETFILTER_DROP",)}
# the walk's steps that nftables (or iptables-nft) carries out: a drop seen there is expected
NFT_STEPS = ("egress-policy", "ingress-policy", "forward", "service", "kube-proxy-rules")


def table_name() -> str:
    return PROBE_TABLE_PREFIX + str(os.getpid())


# ---- pure: rules, events, verdicts, agreement ---------------------------------------------------

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


def trace_lines(text: str) -> list[str]:
    """The `trace id ...` lines of `nft monitor` output (its ruleset lines left out)."""
    return [line.strip() for line in text.splitlines() if line.strip().startswith("trace id ")]


def _packet_key(trace_id: str, header: str) -> str:
    """Which packet a `packet:` line shows: its source and IPv4 id, which stay the same through
    the node's hooks and NAT (trace ids do not: the kernel derives them from the skb's address,
    flow hash and input device, so one packet may change id and the next may reuse it)."""
    ipid, saddr = _IPID.search(header), _SADDR.search(header)
    return "%s id %s" % (saddr.group(1) if saddr else "?", ipid.group(1)) if ipid else "trace " + trace_id


def parse_events(text: str) -> list[dict[str, str]]:
    """`nft monitor trace` lines -> [{id, family, table, chain, what, packet}]: the packet lines
    are folded into `packet` (which packet each event belongs to), `iif` and `oif`."""
    out = []
    current: dict[str, tuple[str, str, str]] = {}       # trace id -> (packet, iif, oif)
    for line in text.splitlines():
        found = _EVENT.match(line.strip())
        if not found:
            continue
        trace_id, family, table, chain, what = found.groups()
        if what.startswith("packet:"):
            got_in, got_out = _IIF.search(what), _OIF.search(what)
            current[trace_id] = (_packet_key(trace_id, what), got_in.group(1) if got_in else "",
                                 got_out.group(1) if got_out else "")
            continue
        packet, iif, oif = current.get(trace_id, ("trace " + trace_id, "", ""))
        out.append({"id": trace_id, "family": family, "table": table, "chain": chain, "what": what.strip(),
                    "packet": packet, "iif": iif, "oif": oif})
    return out


def first_packet(events: list[dict[str, str]]) -> list[dict[str, str]]:
    """The events of the first traced packet (the probe's first, a SYN for TCP)."""
    if not events:
        return []
    first = events[0].get("packet") or events[0]["id"]
    return [e for e in events if (e.get("packet") or e["id"]) == first]


def _own(table: str, own_table: str) -> bool:
    return table == own_table or table.startswith(PROBE_TABLE_PREFIX)


def is_drop(event: dict[str, str] | None) -> bool:
    return event is not None and bool(_DECIDES.search(event["what"]))


def last_verdict(events: list[dict[str, str]], own_table: str = "") -> dict[str, str] | None:
    """The first traced packet's deciding event: a drop or reject wherever it came, else its last
    verdict; the probe tables' own events (any podnet-trace-*) do not decide."""
    mine = [e for e in first_packet(events) if not _own(e["table"], own_table)]
    for event in mine:
        if is_drop(event):
            return event
    return mine[-1] if mine else None


def devices(events: list[dict[str, str]]) -> tuple[str, str]:
    """(the first iif, the last oif) the first traced packet was seen with: where it came in by
    and the last device it was headed for."""
    mine = first_packet(events)
    iif = next((e["iif"] for e in mine if e.get("iif")), "")
    oif = next((e["oif"] for e in reversed(mine) if e.get("oif")), "")
    return iif, oif


def describe(event: dict[str, str] | None) -> str:
    if event is None:
        return "no nftables event seen"
    return "%s in %s %s %s: %s" % ("drop" if is_drop(event) else "last verdict", event["family"], event["table"],
                                    event["chain"], event["what"])


def node_path(node: str, role: str, lines: list[str], own_table: str = "", marked: str = "",
              drops: dict[str, Any] | None = None, error: str = "") -> dict[str, Any]:
    """One node's part of Trace.live: the first traced packet's events there, its decisive
    verdict, the devices it came in by and left towards, the kernel drops seen there."""
    events = parse_events("\n".join(lines))
    decisive = last_verdict(events, own_table)
    iif, oif = devices(events)
    return {"node": node, "role": role, "marked": marked, "seen": bool(events), "decisive": decisive,
            "dropped": is_drop(decisive), "where": "not traced: " + error if error else describe(decisive) if (
                decisive or not events) else "seen only by the probe's own chains (in by %s)" % (iif or "?"),
            "iif": iif, "oif": oif, "error": error,
            "events": ["%s %s %s %s" % (e["family"], e["table"], e["chain"], e["what"]) for e in first_packet(events)],
            "drops": drops or dropwatch.unavailable("not watched")}


def delivered(outcome: str) -> bool:
    return outcome in ("connected", "refused", "answered")


def agrees(verdict: str, outcome: str) -> bool:
    """The probe's outcome alone against the walk's verdict."""
    return delivered(outcome) == (verdict == "delivered") or (
        verdict == "rejected" and outcome.startswith(("refused", "unreachable")))


def judge(verdict: str, failed_step: str, failed_node: str, outcome: str,
          nodes: list[dict[str, Any]]) -> tuple[bool, str]:
    """Whether the probe and the traced nodes agree with the walk; why not, when they do not.
    The outcome must fit the verdict; then the nodes traced: a walk that delivers wants no
    nftables drop; one stopped by a NetworkPolicy on a traced node wants that node's drop in
    podnet-network-policy; one stopped outside nftables wants no nftables drop at all."""
    if not agrees(verdict, outcome):
        return False, "the walk says %s, the probe %s" % (verdict, outcome)
    traced = [n for n in nodes if not n.get("error")]
    dropped = [n for n in traced if n.get("dropped")]
    where = "; ".join("%s: %s" % (n["node"], n["where"]) for n in dropped)
    if verdict == "delivered":
        return (False, "nftables dropped the first packet (%s)" % where) if dropped else (True, "")
    if failed_step in ("egress-policy", "ingress-policy"):
        at = next((n for n in traced if n["node"] == failed_node), None)
        if at is not None:
            decisive = at.get("decisive") or {}
            if not at.get("dropped") or decisive.get("table") != POLICY_TABLE:
                return False, "the walk stops at %s on %s, but there %s" % (failed_step, failed_node, at["where"])
    if dropped and failed_step not in NFT_STEPS:
        return False, "the walk stops at %s on %s, but nftables dropped it (%s)" % (failed_step, failed_node, where)
    if dropped and failed_node and all(n["node"] != failed_node for n in dropped):
        return False, "the walk stops on %s, but nftables dropped it elsewhere (%s)" % (failed_node, where)
    return True, ""


def kernel_confirms(failed_step: str, reports: list[dict[str, Any]]) -> bool | None:
    """Whether a kernel drop reason seen during the window fits where the walk stops (None: the
    step has no reason of its own, or no report was available)."""
    wanted = KERNEL_REASONS.get(failed_step)
    available = [r for r in reports if r.get("available")]
    if not wanted or not available:
        return None
    return any(set(wanted) & dropwatch.reasons_seen(r) for r in available)


def drop_lines(nodes: list[dict[str, Any]]) -> list[str]:
    """Each node's drop summary, once per kernel (the nodes of one lab share the host's)."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for n in nodes:
        report = n.get("drops") or {}
        kernel = report.get("boot_id", "")
        if kernel and kernel in seen:
            out.append("%s: same kernel as %s" % (n["node"], seen[kernel]))
            continue
        if kernel:
            seen[kernel] = n["node"]
        out.append("%s: %s" % (n["node"], dropwatch.summary(report)))
    return out


def summarize(src: str, target: str, port: int, protocol: str, outcome: str, nodes: list[dict[str, Any]],
              ok: bool, why: str, verdict: str, notes: list[str]) -> str:
    parts = ["probe %s -> %s:%d/%s %s" % (src, target, port, protocol, outcome)]
    for n in nodes:
        extra = " (marked %s)" % n["marked"] if n.get("marked") and n["role"] != "source" else ""
        towards = ", towards %s" % n["oif"] if n.get("oif") and not n.get("dropped") else ""
        parts.append("%s%s: %s%s" % (n["node"], extra, n["where"], towards))
    parts += notes
    parts += drop_lines(nodes)
    parts.append("agrees with the walk" if ok else "DIFFERS from the walk (%s): %s" % (verdict, why))
    return "; ".join(parts)


def parse_remote_exec(items: list[str]) -> dict[str, list[str]]:
    """NODE=COMMAND (repeatable) -> {node: argv prefix}; ValueError on a malformed one."""
    out = {}
    for item in items:
        node, eq, command = item.partition("=")
        argv = shlex.split(command)
        if not eq or not node or not argv:
            raise ValueError("--remote-exec %r: want NODE=COMMAND, e.g. node2='ip netns exec node2 podnet'" % item)
        out[node] = argv
    return out


def watch_argv(prefix: list[str], node: str, src: str, dst: str, port: int, protocol: str, seconds: float) -> list[str]:
    return prefix + ["trace", "--watch", src, dst, "%d/%s" % (port, protocol), "--seconds", "%g" % seconds,
                     "--hostname-override", node]


def parse_watch_port(text: str) -> tuple[int, str]:
    """PORT/PROTO of --watch -> (port, protocol)."""
    port, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if not port.isdigit() or not 0 < int(port) < 65536 or proto not in ("TCP", "UDP", "SCTP"):
        raise ValueError("--watch: %r is not PORT/PROTO (e.g. 8080/tcp)" % text)
    return int(port), proto


# ---- impure: the monitor, the probe, the remote watches --------------------------------------

class TraceMonitor:
    """This node's marking table and a netlink listener of nftables' trace events (podnet/net/
    nftrace.py: subscribed the moment it exists, where `nft monitor trace` first loads the whole
    ruleset, longer than a minute beside 10,000 Services' iptables rules); both gone on leaving,
    whatever happened. `lines()` gives the events as `nft monitor trace` prints them."""

    def __init__(self, src: str, dst: str, protocol: str, port: int) -> None:
        self.table = table_name()
        self.rules = marking_rules(src, dst, protocol, port)
        self.listener: Any = None
        self.events: list[Any] = []
        self.stopping = threading.Event()
        self.reader: threading.Thread | None = None

    def __enter__(self) -> TraceMonitor:
        from podnet.net.nftrace import TraceListener
        self.listener = TraceListener()         # before the table: no marked packet goes unheard
        try:
            nft.apply(self.rules)
        except BaseException:
            self.listener.close()
            raise
        self.reader = threading.Thread(target=self._read, name="nftrace", daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        while not self.stopping.is_set():
            try:
                self.events += self.listener.read(0.2)
            except OSError:
                return

    def lines(self) -> list[str]:
        """The trace lines so far (the listener is stopped)."""
        self._stop()
        return format_events(self.events, _link_names(), _rule_texts(self.events))

    def _stop(self) -> None:
        self.stopping.set()
        if self.reader is not None:
            self.reader.join(2.0)

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self.listener is not None:
            self.listener.close()
        nft.apply("delete table inet %s\n" % self.table)


def format_events(events: list[Any], links: dict[int, str], rules: dict[tuple[str, str, str, int], str]
                  ) -> list[str]:
    """nftrace TraceEvents -> the lines `nft monitor trace` would print for them: a `packet:`
    line where the event carries the packet's header, then the rule (its text when known) with
    its verdict, or the chain's policy."""
    out = []
    for e in events:
        head = "trace id %08x %s %s %s" % (e.id, e.family, e.table, e.chain)
        ipv4 = e.ipv4()
        if ipv4 is not None:
            words = []
            if e.iif:
                words.append('iif "%s"' % links.get(e.iif, e.iif))
            if e.oif:
                words.append('oif "%s"' % links.get(e.oif, e.oif))
            words.append("ip saddr %s ip daddr %s ip id %d" % ipv4)
            out.append("%s packet: %s" % (head, " ".join(words)))
        verdict = e.verdict + (" " + e.target if e.target else "")
        if e.type == "policy":
            out.append("%s policy %s" % (head, e.verdict))
        elif e.type == "rule":
            text = rules.get((e.family, e.table, e.chain, e.handle), "handle %d" % e.handle)
            out.append("%s rule %s (verdict %s)" % (head, text, verdict))
        else:
            out.append("%s verdict %s" % (head, verdict or e.type))
    return out


def _link_names() -> dict[int, str]:
    from podnet.net.netlink import Netlink
    try:
        with Netlink() as nl:
            return {link.index: link.name for link in nl.links()}
    except OSError:
        return {}


_HANDLE = re.compile(r"^\s*(.*?)\s*# handle (\d+)\s*$")


def _rule_texts(events: list[Any]) -> dict[tuple[str, str, str, int], str]:
    """The text of each rule the events name: one `nft -a list chain` per chain (a few ms, even
    on a node whose full ruleset takes a minute to list)."""
    out: dict[tuple[str, str, str, int], str] = {}
    for family, table, chain in sorted({(e.family, e.table, e.chain) for e in events if e.type == "rule"}):
        try:
            done = run([nft.NFT, "-a", "list", "chain", family, table, chain], timeout=RULE_TEXT_TIMEOUT)
        except (OSError, TimeoutError):
            continue
        if done.returncode != 0:
            continue            # the chain is gone (our own table, already deleted): handles only
        text = done.stdout.decode(errors="replace")
        for line in text.splitlines():
            found = _HANDLE.match(line)
            if found and not line.strip().startswith(("type ", "chain ", "table ")):
                out[(family, table, chain, int(found.group(2)))] = found.group(1)
    return out


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


class RemoteWatch:
    """`podnet trace --watch` on another node, through its command prefix."""

    def __init__(self, node: str, prefix: list[str], src: str, dst: str, port: int, protocol: str,
                 seconds: float = TRACE_WINDOW) -> None:
        self.node = node
        self.marked = "%s -> %s:%d/%s" % (src, dst, port, protocol)
        self.argv = watch_argv(prefix, node, src, dst, port, protocol, seconds)
        self.seconds = seconds
        self.child: Streamed | None = None
        self.error = ""
        self.table = ""
        self.lines: list[str] = []

    def launch(self) -> None:
        try:
            self.child = Streamed(self.argv)
        except OSError as e:
            self.error = "cannot run %s: %s" % (self.argv[0], e)

    def listening(self, wait: float = REMOTE_START_WAIT) -> bool:
        if self.child is None:
            return False
        line = self.child.wait_for(lambda x: x.startswith("{"), wait)
        state = json_object(line or "")
        if state.get("event") == "listening":
            self.table = str(state.get("table", ""))
            return True
        if state.get("event") == "done":
            self.lines.append(line or "")
        self.error = str(state.get("error") or "") or "no \"listening\" from %s within %g s%s" % (
            shlex.join(self.argv[:6]), wait, ": " + self.child.stderr[-300:] if self.child.stderr else "")
        self.child.stop()
        return False

    def result(self) -> dict[str, Any]:
        """Its events (waiting out its window, bounded) as a node_path()."""
        done: dict[str, Any] = {}
        if self.child is not None and not self.error:
            self.lines += self.child.rest(self.seconds + 15.0)
            code = self.child.stop()
            done = next((json_object(x) for x in reversed(self.lines) if x.startswith("{")), {})
            if done.get("event") != "done":
                self.error = "the watch on %s ended without its events (exit %s)%s" % (
                    self.node, code, ": " + self.child.stderr[-300:] if self.child.stderr else "")
            elif done.get("error"):
                self.error = str(done["error"])
        return node_path(self.node, "remote", [str(x) for x in done.get("trace", [])], self.table, self.marked,
                         done.get("drops"), self.error)


def probe(netns: str, src: str, dst: str, port: int, protocol: str, node: str = "",
          remotes: list[RemoteWatch] | None = None) -> dict[str, Any]:
    """One traced probe from `netns` (the source pod's; "" for this namespace) to dst:port: this
    node's watchers first, then the remote watches, each waited for until it listens (their
    windows start then); {outcome, nodes: [node_path()...], error}."""
    remotes = remotes or []
    drops = dropwatch.DropWatch(WATCH_MAX)
    outcome = "not probed"
    lines: list[str] = []
    error = ""
    try:
        drops.start()
        with TraceMonitor(src, dst, protocol, port) as monitor:
            for remote in remotes:
                remote.launch()
            for remote in remotes:
                remote.listening()
            outcome = _probe(netns, dst, port, protocol)
            time.sleep(SETTLE)
            lines = monitor.lines()
    except (nft.NftError, OSError, TimeoutError) as e:
        error = str(e)
    finally:
        report = drops.stop()
        for remote in remotes:
            if error and not remote.error:   # no probe went out: not worth waiting out their windows
                if remote.child is not None:
                    remote.child.stop()
                remote.error = "not watched: the probe failed on this node (%s)" % error
    local = node_path(node or "this node", "source", lines, table_name(), "", report, error)
    return {"outcome": outcome, "nodes": [local] + [r.result() for r in remotes], "error": error or None}


def confirm(trace: Walked, netns: str, local_node: str = "", remote_exec: dict[str, list[str]] | None = None
            ) -> dict[str, Any]:
    """Probe what the walk followed (src -> target:port as the source sends it; each remote node
    watching for the endpoint the walk reached) and compare with its verdict; a dict for Trace.live."""
    target, port, protocol, src = trace.sent_to, trace.sent_port, trace.protocol, trace.src_ip
    if not target or not port:
        return {"summary": "not probed: no destination address and port", "agrees": None, "events": [], "nodes": []}
    end_ip, end_port = trace.endpoint or (target, port)
    remote_exec = remote_exec or {}
    remotes = [RemoteWatch(n, argv, src, end_ip, end_port, protocol) for n, argv in remote_exec.items()
               if n != local_node]
    result = probe(netns, src, target, port, protocol, local_node, remotes)
    nodes = result["nodes"]
    if result["error"] and result["outcome"] == "not probed":
        return {"summary": "not probed: %s" % result["error"], "agrees": None, "events": [], "nodes": nodes}
    failed = trace.failed
    step, at = (failed.step, failed.node) if failed else ("", "")
    ok, why = judge(trace.verdict, step, at, result["outcome"], nodes)
    on_path = [h.node for h in trace.hops if h.node and h.node != local_node]
    notes = ["%s not watched (give --remote-exec %s=COMMAND)" % (n, n)
             for n in dict.fromkeys(on_path) if n not in remote_exec]
    confirms = kernel_confirms(step, [n["drops"] for n in nodes])
    if confirms is not None and trace.verdict != "delivered":
        notes.append("kernel drop reasons %s %s" % ("fit" if confirms else "show none of", "/".join(
            KERNEL_REASONS[step])))
    local = nodes[0]
    return {"summary": summarize(src, target, port, protocol, result["outcome"], nodes, ok, why, trace.verdict,
                                 notes),
            "outcome": result["outcome"], "agrees": ok, "why": why, "decisive": local["decisive"],
            "kernel_confirms": confirms, "nodes": nodes,
            "events": ["%s: %s" % (n["node"], e) for n in nodes for e in n["events"]],
            "drops": drop_lines(nodes), "error": result["error"]}


# ---- the remote half: `podnet trace --watch` -----------------------------------------------------

def watch(src: str, dst: str, port: int, protocol: str, seconds: float, node: str, out: Any = print) -> int:
    """On a node the probe crosses: mark src -> dst:port (and its replies), say "listening" once
    subscribed, listen `seconds` (bounded), remove the table, print the events; JSON lines."""
    seconds = min(max(seconds, 0.5), WATCH_MAX)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    drops = dropwatch.DropWatch(seconds + 10.0)
    lines: list[str] = []
    error = ""
    table = table_name()
    try:
        drops_state = drops.start()
        with TraceMonitor(src, dst, protocol, port) as monitor:
            out(json.dumps({"event": "listening", "node": node, "table": table, "drops": drops_state}), flush=True)
            time.sleep(seconds)
            lines = monitor.lines()
    except (nft.NftError, OSError, TimeoutError) as e:
        error = str(e)
    finally:
        report = drops.stop()
    out(json.dumps({"event": "done", "node": node, "table": table, "trace": lines, "drops": report,
                    "error": error}), flush=True)
    return 1 if error else 0
