"""diagnose.snapshot's scoped rule read (what `podnet trace` reads instead of every rule) against
the full read of the same namespace: the chains asked for, and those their rules jump to, hold
exactly the lines iptables-save and `nft list ruleset` show for them."""
import subprocess

from diagnose import snapshot
from diagnose.snapshot import RuleScope
from diagnose.trace import iptables_table
from podnet.net.netns import entered

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
:DEEPER - [0:0]
:UNRELATED - [0:0]
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -j ACCEPT
-A FLANNEL-FWD -j DEEPER
-A DEEPER -d 10.244.0.0/16 -j ACCEPT
-A UNRELATED -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-A - [0:0]
:KUBE-SEP-A1 - [0:0]
:KUBE-SVC-B - [0:0]
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.2/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-B
-A KUBE-SVC-A -j KUBE-SEP-A1
-A KUBE-SEP-A1 -p tcp -m tcp -j DNAT --to-destination 10.244.2.2:8080
-A KUBE-SVC-B -j RETURN
COMMIT
"""
NFT = """table ip kube-proxy {
  chain service-a {
    goto endpoint-a1
  }
  chain endpoint-a1 {
    meta l4proto tcp dnat to 10.244.2.2:8080
  }
  chain service-b {
    return
  }
  map service-ips {
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = { 10.96.0.1 . tcp . 80 : goto service-a }
  }
}
table inet firewall {
  chain forward {
    type filter hook forward priority 0; policy drop;
  }
}
"""


def test_scoped_read_matches_the_full_read(lab):
    ns = lab.namespace("scope")
    with entered(ns.path):
        subprocess.run(["iptables-restore"], input=RULES.encode(), check=True)
        subprocess.run(["nft", "-f", "-"], input=NFT.encode(), check=True)
        full = snapshot.take()
        scope = RuleScope(iptables=(("filter", "FORWARD", True), ("nat", "KUBE-SERVICES", False),
                                    ("nat", "KUBE-SVC-A", True), ("nat", "KUBE-NOT-THERE", True)),
                          nft=(("map", "ip", "kube-proxy", "service-ips", False),
                               ("chain", "ip", "kube-proxy", "service-a", True),
                               ("map", "ip6", "kube-proxy", "service-ips", False),
                               ("chain", "ip6", "kube-proxy", "service-a", True)),
                          nft_chain_families=("inet",), ipvs=False)
        part = snapshot.take(scope=scope)
    for table, chains in (("filter", {"FORWARD", "FLANNEL-FWD", "DEEPER"}),
                          ("nat", {"KUBE-SERVICES", "KUBE-SVC-A", "KUBE-SEP-A1"})):
        policies, rules = iptables_table(part.iptables_save, table)
        full_policies, full_rules = iptables_table(full.iptables_save, table)
        assert set(policies) == chains
        assert all(policies[c] == full_policies[c] for c in chains)
        assert sorted(r.text for r in rules) == sorted(r.text for r in full_rules if r.chain in chains)
    assert sorted(part.nft_tables()) == [("inet", "firewall"), ("ip", "kube-proxy")]
    names = {(c["table"], c["name"]) for c in part.nft_chains()}
    assert names == {("kube-proxy", "service-a"), ("kube-proxy", "endpoint-a1"), ("firewall", "forward")}
    assert part.nft_forward_drop_chains() == full.nft_forward_drop_chains() == ["inet firewall forward"]
    (m,) = part.nft_sets("ip", "kube-proxy")
    (full_map,) = full.nft_sets("ip", "kube-proxy")
    assert m == full_map
    wanted = [r for r in full.nft_rules("ip", "kube-proxy") if r["chain"] in ("service-a", "endpoint-a1")]
    assert sorted(map(str, part.nft_rules("ip", "kube-proxy"))) == sorted(map(str, wanted))



def test_full_read_holds_nft_ruleset_except_iptables_nfts_rules(lab):
    """The full read lists the chains, then each table other than iptables-nft's own: the same
    objects `nft -j list ruleset` holds for those, and iptables-nft's chains without their rules."""
    import json
    ns = lab.namespace("full")
    with entered(ns.path):
        subprocess.run(["iptables-restore"], input=RULES.encode(), check=True)
        subprocess.run(["nft", "-f", "-"], input=NFT.encode(), check=True)
        full = snapshot.take()
        listed = json.loads(subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True,
                                           check=True).stdout)["nftables"]

    def table_of(obj):
        body = next(iter(obj.values()))
        return (body.get("family"), body.get("table", body.get("name")))
    ours = [o for o in listed if "metainfo" not in o and table_of(o) in {("ip", "kube-proxy"), ("inet", "firewall")}]
    assert sorted(map(json.dumps, ours)) == sorted(json.dumps(o) for o in full.nft_ruleset
                                                   if table_of(o) in {("ip", "kube-proxy"), ("inet", "firewall")})
    assert not full.nft_rules("ip", "filter") and not full.nft_rules("ip", "nat")
    assert {c["name"] for c in full.nft_chains() if c["table"] == "filter"} >= {"FORWARD", "FLANNEL-FWD"}
    assert ("ip", "filter") in full.nft_tables()
    assert full.nft_forward_drop_chains() == ["inet firewall forward"]
