"""podnet/net/nftrace.py against the real kernel: the trace events of a marked packet, read from
netlink, name the table, chain, rule handle and verdict `nft -a list` shows for them."""
import subprocess

from diagnose.live import _rule_texts, format_events
from podnet.net.netns import entered
from podnet.net.nftrace import TraceListener

RULES = """table inet t {
  chain out {
    type filter hook output priority -350; policy accept;
    ip daddr 127.0.0.1 meta nftrace set 1
  }
  chain f {
    type filter hook output priority 0; policy accept;
    ip daddr 127.0.0.1 icmp type echo-request counter drop
  }
}
"""


def test_a_dropped_ping_traced_from_netlink(lab):
    ns = lab.namespace("nftrace")
    ns.ip("link", "set", "lo", "up")
    with entered(ns.path):
        subprocess.run(["nft", "-f", "-"], input=RULES.encode(), check=True)
        with TraceListener() as listener:
            subprocess.run(["ping", "-c1", "-W1", "127.0.0.1"], capture_output=True)
            events = listener.read(1.0)
        texts = _rule_texts(events)
    drop = next(e for e in events if e.chain == "f")
    assert (drop.family, drop.table, drop.type, drop.verdict) == ("inet", "t", "rule", "drop")
    assert drop.ipv4()[:2] == ("127.0.0.1", "127.0.0.1") and drop.oif == 1
    assert texts[("inet", "t", "f", drop.handle)].startswith("ip daddr 127.0.0.1 icmp type echo-request counter")
    assert {(e.type, e.verdict) for e in events if e.chain == "out"} == {("rule", "continue"), ("policy", "accept")}
    lines = format_events(events, {1: "lo"}, texts)
    assert any(line.endswith("(verdict drop)") and " inet t f rule ip daddr 127.0.0.1 " in line for line in lines)
    assert any(' packet: oif "lo" ip saddr 127.0.0.1 ip daddr 127.0.0.1 ip id ' in line for line in lines)
