"""`podnet trace --live`'s pure half: nft monitor's trace lines grouped by packet, each node's decisive
verdict, agreement with the walk across nodes, and the kernel drop reasons read from the
skb:kfree_skb format file and trace_pipe lines (diagnose/live.py, diagnose/dropwatch.py). No root."""
import argparse

import pytest

from diagnose import dropwatch, live, trace
from diagnose.trace import FAIL, Hop, Trace

# the shape of this kernel's events/skb/kfree_skb/format, its reason list cut short and renumbered
# (NOT_SPECIFIED is 2 on 6.18): the numbers must come from the file
FORMAT = """name: kfree_skb
ID: 2310
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->rx_sk, REC->protocol, \
REC->location, __print_symbolic(REC->reason, { 5, "NOT_SPECIFIED" }, { 6, "NO_SOCKET" }, { 19, "IP_RPFILTER" }, \
{ 0x20, "NETFILTER_DROP" }, { 99, "MAX" })
"""

PIPE = ("          <idle>-0       [003] ..s2.  1234.567890: kfree_skb: skbaddr=00000000a1b2c3d4 "
        "rx_sk=0000000000000000 protocol=2048 location=ip_rcv_finish_core+0x260/0x4c0 reason: IP_RPFILTER")


def test_format_reasons_and_filter_come_from_the_file():
    fmt = dropwatch.parse_format(FORMAT)
    assert {"protocol", "reason", "location"} <= fmt.fields
    assert fmt.reasons == {5: "NOT_SPECIFIED", 6: "NO_SOCKET", 19: "IP_RPFILTER", 32: "NETFILTER_DROP", 99: "MAX"}
    assert dropwatch.filter_expression(fmt) == "protocol == 2048 && reason != 5"
    # an older kernel's event without a protocol field: filter on what exists
    old = dropwatch.parse_format(FORMAT.replace("unsigned short protocol;", "unsigned short proto;"))
    assert dropwatch.filter_expression(old) == "reason != 5"


def test_pipe_lines_decode_reason_and_location():
    fmt = dropwatch.parse_format(FORMAT)
    assert dropwatch.parse_pipe_line(PIPE, fmt) == ("IP_RPFILTER", "ip_rcv_finish_core+0x260")
    numeric = PIPE.replace("reason: IP_RPFILTER", "reason: 32")
    assert dropwatch.parse_pipe_line(numeric, fmt) == ("NETFILTER_DROP", "ip_rcv_finish_core+0x260")
    assert dropwatch.parse_pipe_line("# tracer: nop", fmt) is None


def test_drop_summary_counts_and_says_host_wide():
    drops = dropwatch.count([("IP_RPFILTER", "ip_rcv_finish_core+0x260")] * 3 + [("NO_SOCKET", "tcp_v4_rcv+0x99")])
    assert drops[0] == {"reason": "IP_RPFILTER", "location": "ip_rcv_finish_core+0x260", "count": 3}
    text = dropwatch.summary({"available": True, "drops": drops})
    assert text.startswith("kernel drops during the probe (host-wide")
    assert "3 x IP_RPFILTER at ip_rcv_finish_core+0x260, 1 x NO_SOCKET at tcp_v4_rcv+0x99" in text
    assert dropwatch.summary({"available": True, "drops": []}).endswith("none")
    assert dropwatch.summary(dropwatch.unavailable("not root")) == "drop reasons not available: not root"


def _line(tid, table, chain, what):
    family, _, name = table.partition(" ")
    return "trace id %s %s %s %s %s" % (tid, family, name, chain, what)


SYN = "ip saddr 10.244.1.2 ip daddr 10.244.2.2 ip ttl 64 ip id 4242 ip protocol tcp tcp dport 8080 tcp flags == syn"
ACK = "ip saddr 10.244.1.2 ip daddr 10.244.2.2 ip ttl 64 ip id 4243 ip protocol tcp tcp dport 8080 tcp flags == ack"
# node2's view of a SYN dropped by ingress policy, as nft monitor prints it: the SYN changes trace
# id between hooks, its retransmit reuses the first id
NODE2 = [
    _line("aa", "inet podnet-trace-77", "pre", 'packet: iif "flannel.1" ' + SYN),
    _line("aa", "inet podnet-trace-77", "pre", "rule ip saddr 10.244.1.2 meta nftrace set 1 (verdict continue)"),
    _line("aa", "inet podnet-trace-77", "pre", "policy accept"),
    _line("bb", "inet podnet-network-policy", "forward-ingress", 'packet: iif "flannel.1" oif "cni0" ' + SYN),
    _line("bb", "inet podnet-network-policy", "forward-ingress", "jump ingress-ns-default (verdict jump ingress-ns-default)"),
    _line("bb", "inet podnet-network-policy", "ingress-ns-default", 'rule counter name "ingress-drops" drop (verdict drop)'),
    _line("aa", "inet podnet-trace-77", "pre", 'packet: iif "flannel.1" ' + ACK),
    _line("aa", "inet podnet-trace-77", "pre", "policy accept"),
]


def test_events_are_grouped_by_packet_not_by_trace_id():
    events = live.parse_events("\n".join(NODE2 + ["add chain inet podnet-trace-77 ready0"]))
    first = live.first_packet(events)
    assert [e["chain"] for e in first] == ["pre", "pre", "forward-ingress", "ingress-ns-default"]
    decisive = live.last_verdict(events)
    assert decisive["table"] == "podnet-network-policy" and live.is_drop(decisive)
    assert live.devices(events) == ("flannel.1", "cni0")


def test_last_verdict_skips_the_probe_tables_and_keeps_the_last_one():
    lines = [_line("aa", "inet podnet-trace-1", "pre", 'packet: iif "cni0" ' + SYN),
             _line("aa", "inet podnet-trace-1", "pre", "policy accept"),
             _line("aa", "ip nat", "POSTROUTING", "policy accept")]
    events = live.parse_events("\n".join(lines))
    assert live.last_verdict(events)["chain"] == "POSTROUTING"
    only_ours = live.parse_events("\n".join(lines[:2]))
    assert live.last_verdict(only_ours) is None
    path = live.node_path("node2", "remote", lines[:2], "podnet-trace-1")
    assert path["seen"] and path["where"] == "seen only by the probe's own chains (in by cni0)"
    assert live.node_path("node2", "remote", [])["where"] == "no nftables event seen"


def _node(name, lines=(), error=""):
    return live.node_path(name, "source" if name == "node1" else "remote", list(lines), "", "", None, error)


DELIVERED_NODE2 = [_line("cc", "inet podnet-network-policy", "forward-ingress", 'packet: iif "flannel.1" oif "cni0" ' + SYN),
                   _line("cc", "inet podnet-network-policy", "forward-ingress", "policy accept")]
NODE1 = [_line("dd", "ip nat", "POSTROUTING", 'packet: iif "cni0" oif "flannel.1" ' + SYN),
         _line("dd", "ip nat", "POSTROUTING", "policy accept")]


@pytest.mark.parametrize("verdict, step, at, outcome, node2, ok", [
    ("delivered", "", "", "connected", DELIVERED_NODE2, True),
    ("delivered", "", "", "timeout", DELIVERED_NODE2, False),
    ("delivered", "", "", "connected", NODE2, False),                      # a drop the walk does not know
    ("dropped", "ingress-policy", "node2", "timeout", NODE2, True),        # node2's policy table dropped it
    ("dropped", "ingress-policy", "node2", "timeout", DELIVERED_NODE2, False),
    ("dropped", "rp_filter", "node2", "timeout", NODE2[:3], True),         # seen at prerouting, then gone
    ("dropped", "rp_filter", "node2", "timeout", NODE2, False),            # nftables dropped it, not rp_filter
    ("dropped", "egress-policy", "node1", "timeout", NODE2, False),        # dropped on another node
    ("rejected", "service", "node1", "refused", [], True),
])
def test_agreement_uses_every_node(verdict, step, at, outcome, node2, ok):
    got, why = live.judge(verdict, step, at, outcome, [_node("node1", NODE1), _node("node2", node2)])
    assert got is ok, why
    assert bool(why) is not ok


def test_an_untraced_node_falls_back_to_the_outcome():
    nodes = [_node("node1", NODE1), _node("node2", error="no \"listening\" within 30 s")]
    assert live.judge("dropped", "ingress-policy", "node2", "timeout", nodes) == (True, "")
    assert nodes[1]["where"].startswith("not traced: ")


def test_kernel_reasons_confirm_the_step_and_are_shown_once_per_kernel():
    rp = {"available": True, "drops": [{"reason": "IP_RPFILTER", "location": "ip_rcv_finish_core+0x260", "count": 2}],
          "boot_id": "k1"}
    assert live.kernel_confirms("rp_filter", [rp]) is True
    assert live.kernel_confirms("route", [rp]) is False
    assert live.kernel_confirms("rp_filter", [dropwatch.unavailable("not root")]) is None
    assert live.kernel_confirms("service", [rp]) is None
    nodes = [dict(_node("node1", NODE1), drops=rp), dict(_node("node2", NODE2), drops=dict(rp)),
             dict(_node("node3"), drops=dropwatch.unavailable("this kernel has no tracefs"))]
    lines = live.drop_lines(nodes)
    assert lines[0] == "node1: kernel drops during the probe (host-wide, not only the probe's): " \
                       "2 x IP_RPFILTER at ip_rcv_finish_core+0x260"
    assert lines[1:] == ["node2: same kernel as node1", "node3: drop reasons not available: this kernel has no tracefs"]


def test_remote_exec_and_watch_arguments():
    assert live.parse_remote_exec(["node2=ip netns exec lab-node2 python -m cli.main"]) == {
        "node2": ["ip", "netns", "exec", "lab-node2", "python", "-m", "cli.main"]}
    for bad in ("node2", "=podnet", "node2="):
        with pytest.raises(ValueError):
            live.parse_remote_exec([bad])
    assert live.parse_watch_port("8080/tcp") == (8080, "TCP") and live.parse_watch_port("53/udp") == (53, "UDP")
    for bad in ("http/tcp", "80/icmp", "0/tcp"):
        with pytest.raises(ValueError):
            live.parse_watch_port(bad)
    assert live.watch_argv(["podnet"], "node2", "10.0.0.1", "10.0.1.2", 8080, "TCP", 3.0) == [
        "podnet", "trace", "--watch", "10.0.0.1", "10.0.1.2", "8080/TCP", "--seconds", "3",
        "--hostname-override", "node2"]


def test_the_command_line_takes_watch_and_remote_exec():
    parser = argparse.ArgumentParser()
    trace.add_parser(parser.add_subparsers())
    opts = parser.parse_args(["trace", "--watch", "10.0.0.1", "10.0.1.2", "8080/tcp", "--seconds", "2"])
    assert opts.watch == ["10.0.0.1", "10.0.1.2", "8080/tcp"] and opts.seconds == 2.0
    opts = parser.parse_args(["trace", "default/a", "svc/default/web:80", "--live",
                              "--remote-exec", "node2=podnet", "--remote-exec", "node3=podnet"])
    assert opts.remote_exec == ["node2=podnet", "node3=podnet"] and opts.watch is None


def test_confirm_watches_the_endpoint_the_walk_followed(monkeypatch):
    t = Trace("default/a", "svc/default/web:80", "TCP", 80, src_ip="10.244.1.2", sent_to="10.96.0.20", sent_port=80)
    t.endpoint = ("10.244.2.2", 8080)
    t.add(Hop("node2", "ingress-policy", FAIL, "isolated", object="NetworkPolicy default/deny-c"))
    t.verdict = "dropped"
    seen = {}

    def fake_probe(netns, src, dst, port, protocol, node, remotes):
        seen.update(target=(dst, port), remotes=[r.argv for r in remotes])
        return {"outcome": "timeout", "error": None,
                "nodes": [_node("node1", NODE1), dict(_node("node2", NODE2), marked=remotes[0].marked)]}
    monkeypatch.setattr(live, "probe", fake_probe)
    result = live.confirm(t, "/run/netns/a", "node1", {"node1": ["podnet"], "node2": ["ssh", "node2", "podnet"]})
    assert seen["target"] == ("10.96.0.20", 80)         # the source sends to the ClusterIP
    assert seen["remotes"] == [["ssh", "node2", "podnet", "trace", "--watch", "10.244.1.2", "10.244.2.2", "8080/TCP",
                                "--seconds", "3", "--hostname-override", "node2"]]
    assert result["agrees"] is True and result["nodes"][1]["dropped"], result
    assert "node2 (marked 10.244.1.2 -> 10.244.2.2:8080/TCP): drop in inet podnet-network-policy" in result["summary"]
    assert result["events"][0].startswith("node1: ")


def test_confirm_names_nodes_on_the_path_it_cannot_watch(monkeypatch):
    t = Trace("default/a", "default/c:8080", "TCP", 8080, src_ip="10.244.1.2", sent_to="10.244.2.2", sent_port=8080)
    t.add(Hop("node1", "source", "info", "pod"))
    t.add(Hop("node2", "destination", "ok", "delivered"))
    monkeypatch.setattr(live, "probe", lambda *a: {"outcome": "connected", "error": None, "nodes": [_node("node1", NODE1)]})
    result = live.confirm(t, "", "node1", {})
    assert result["agrees"] is True
    assert "node2 not watched (give --remote-exec node2=COMMAND)" in result["summary"]
