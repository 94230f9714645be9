"""kube_proxy.nftables: rendering the kube-proxy table (pure), and the proxier's transactions
with a recorded fake `nft` (no root, nothing run).

Chain-name vectors are the ones in kube-proxy's own nftables proxier tests
(ns1/svc1 port p80 -> service-ULMVA6XW-ns1/svc1/tcp/p80)."""
import json

import pytest

from kube_proxy import nftables as nk
from kube_proxy import server
from kube_proxy.model import Endpoint, ServicePort, ServicePortName
from kube_proxy.proxier import Config
from kube_proxy.tracker import ChangeTracker
from lab import manifests as k8s

NAME = ServicePortName("ns1", "svc1", "p80", "TCP")
CFG = Config(cluster_cidr=("10.244.0.0/16",))
SVC = "service-ULMVA6XW-ns1/svc1/tcp/p80"
LOCAL = "local-ULMVA6XW-ns1/svc1/tcp/p80"
EXT = "external-ULMVA6XW-ns1/svc1/tcp/p80"
FW = "firewall-ULMVA6XW-ns1/svc1/tcp/p80"


def port(**kw):
    base = dict(name=NAME, type="ClusterIP", cluster_ip="172.30.0.41", port=80, protocol="TCP", target_port=80)
    base.update(kw)
    return ServicePort(**base)


def ep(ip, local=False, ready=True, serving=None, terminating=False, port=80):
    return Endpoint(ip, port, ready, ready if serving is None else serving, terminating, local)


def epc(ip, port=80, name=NAME):
    return nk.endpoint_chain(name, Endpoint(ip, port))


def elements(r, set_name=None):
    return {(s, k): (v, c) for s, k, v, c in r.elements if set_name is None or s == set_name}


# ---- names ----

def test_chain_names_are_kube_proxys():
    assert nk.service_chain(NAME) == SVC
    assert epc("10.180.0.1") == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert nk.service_chain(ServicePortName("ns2", "svc2", "p80", "TCP")) == "service-42NFTM6N-ns2/svc2/tcp/p80"
    assert (nk.local_chain(NAME), nk.external_chain(NAME), nk.firewall_chain(NAME)) == (LOCAL, EXT, FW)
    assert nk.affinity_set(NAME, Endpoint("10.180.0.1", 80)) == "affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    # IPv6 colons are not allowed in names: dots instead
    assert nk.endpoint_chain(NAME, Endpoint("fd00::1", 80)).endswith("/p80__fd00..1/80")
    assert nk.is_port_chain(SVC) and not nk.is_port_chain("services") and not nk.is_port_chain("nat-prerouting")


# ---- one service port ----

def test_cluster_ip_three_endpoints():
    r = nk.render_service_port(port(), (ep("10.180.0.1"), ep("10.180.0.2"), ep("10.180.0.3")), CFG)
    e1, e2, e3 = epc("10.180.0.1"), epc("10.180.0.2"), epc("10.180.0.3")
    assert r.chains[SVC] == (
        "ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
        "numgen random mod 3 == 0 goto " + e1,
        "numgen random mod 2 == 0 goto " + e2,
        "goto " + e3)
    assert r.chains[e1] == ("ip saddr 10.180.0.1 jump mark-for-masquerade", "meta l4proto tcp dnat to 10.180.0.1:80")
    assert set(r.chains) == {SVC, e1, e2, e3}
    assert elements(r) == {("cluster-ips", "172.30.0.41"): (None, None),
                           ("service-ips", "172.30.0.41 . tcp . 80"): ("goto " + SVC, None)}
    assert r.affinity == () and r.rules == 10


def test_each_endpoint_is_picked_with_probability_one_in_n():
    """numgen mod (N-i) == 0 at step i: P(i) = 1/N for every i (as iptables' statistic rules)."""
    from fractions import Fraction
    for n in (1, 2, 3, 5, 8):
        r = nk.render_service_port(port(), tuple(ep("10.180.0.%d" % i) for i in range(1, n + 1)), CFG)
        rules = [x for x in r.chains[SVC] if "goto" in x]
        left, probs = Fraction(1), []
        for rule in rules:
            mod = int(rule.split("mod ")[1].split()[0]) if "numgen" in rule else 1
            probs.append(left / mod)
            left -= left / mod
        assert probs == [Fraction(1, n)] * n and left == 0


def test_no_endpoints_rejects_and_has_no_chains():
    r = nk.render_service_port(port(type="NodePort", node_port=3001, external_ips=("192.168.99.11",)),
                               (ep("10.180.0.1", ready=False),), CFG)
    assert r.chains == {}
    assert elements(r) == {
        ("cluster-ips", "172.30.0.41"): (None, None),
        ("no-endpoint-services", "172.30.0.41 . tcp . 80"): ("goto reject-chain", "ns1/svc1:p80"),
        ("no-endpoint-services", "192.168.99.11 . tcp . 80"): ("goto reject-chain", "ns1/svc1:p80"),
        ("no-endpoint-nodeports", "tcp . 3001"): ("goto reject-chain", "ns1/svc1:p80")}


def test_terminating_endpoints_are_used_when_none_ready():
    r = nk.render_service_port(port(), (ep("10.180.0.1", ready=False, serving=True, terminating=True),
                                        ep("10.180.0.2", ready=False, serving=False, terminating=True)), CFG)
    assert r.chains[SVC][-1] == "goto " + epc("10.180.0.1") and epc("10.180.0.2") not in r.chains


def test_nodeport_and_external_ips_go_through_the_external_chain():
    r = nk.render_service_port(port(type="NodePort", node_port=3001, external_ips=("192.168.99.11",)),
                               (ep("10.180.0.1"),), CFG)
    assert r.chains[EXT] == ("jump mark-for-masquerade", "goto " + SVC)
    assert elements(r, "service-ips")[("service-ips", "192.168.99.11 . tcp . 80")] == ("goto " + EXT, None)
    assert elements(r, "service-nodeports") == {("service-nodeports", "tcp . 3001"): ("goto " + EXT, None)}


def test_external_policy_local():
    sp = port(type="LoadBalancer", node_port=3001, load_balancer_ips=("1.2.3.4",), external_policy_local=True)
    r = nk.render_service_port(sp, (ep("10.180.0.1", local=True), ep("10.180.0.2")), CFG)
    assert r.chains[EXT] == ("ip saddr 10.244.0.0/16 goto " + SVC,
                             "fib saddr type local jump mark-for-masquerade",
                             "fib saddr type local goto " + SVC,
                             "goto " + LOCAL)
    assert r.chains[LOCAL] == ("goto " + epc("10.180.0.1"),)
    assert r.chains[SVC][1:] == ("numgen random mod 2 == 0 goto " + epc("10.180.0.1"), "goto " + epc("10.180.0.2"))
    assert not elements(r, "no-endpoint-services") and not elements(r, "no-endpoint-nodeports")
    # no local endpoint: external traffic that is not short-circuited is dropped
    r = nk.render_service_port(sp, (ep("10.180.0.2"),), CFG)
    assert r.chains[EXT][-1] == "fib saddr type local goto " + SVC and LOCAL not in r.chains
    assert elements(r, "no-endpoint-nodeports") == {("no-endpoint-nodeports", "tcp . 3001"): ("drop", "ns1/svc1:p80")}
    assert elements(r, "no-endpoint-services") == {
        ("no-endpoint-services", "1.2.3.4 . tcp . 80"): ("drop", "ns1/svc1:p80")}
    assert elements(r, "service-ips")[("service-ips", "1.2.3.4 . tcp . 80")] == ("goto " + EXT, None)


def test_both_policies_local_still_have_the_cluster_chain_for_short_circuits():
    """kube-proxy: an externally reachable port uses Cluster endpoints even when both policies
    are Local, because the external chain's short-circuit rules jump there."""
    sp = port(type="NodePort", node_port=3001, internal_policy_local=True, external_policy_local=True)
    r = nk.render_service_port(sp, (ep("10.180.0.1", local=True), ep("10.180.0.2")), CFG)
    jumped = {rule.split()[-1] for rules in r.chains.values() for rule in rules if " goto " in " " + rule}
    assert jumped <= set(r.chains), jumped - set(r.chains)
    assert SVC in r.chains and LOCAL in r.chains
    assert elements(r, "service-ips")[("service-ips", "172.30.0.41 . tcp . 80")] == ("goto " + LOCAL, None)
    assert r.chains[LOCAL][0].endswith("jump mark-for-masquerade")      # the ClusterIP masquerade rule


def test_internal_policy_local_without_local_endpoints_drops_cluster_ip_traffic():
    r = nk.render_service_port(port(internal_policy_local=True), (ep("10.180.0.2"),), CFG)
    assert r.chains == {}
    assert elements(r, "no-endpoint-services") == {
        ("no-endpoint-services", "172.30.0.41 . tcp . 80"): ("drop", "ns1/svc1:p80")}


def test_session_affinity_uses_per_endpoint_sets():
    r = nk.render_service_port(port(session_affinity_timeout=10800), (ep("10.180.0.1"), ep("10.180.0.2")), CFG)
    a1, a2 = nk.affinity_set(NAME, ep("10.180.0.1")), nk.affinity_set(NAME, ep("10.180.0.2"))
    assert r.affinity == (a1, a2)
    assert r.chains[SVC][1:3] == ("ip saddr @%s goto %s" % (a1, epc("10.180.0.1")),
                                  "ip saddr @%s goto %s" % (a2, epc("10.180.0.2")))
    assert r.chains[epc("10.180.0.1")][1] == "update @%s { ip saddr timeout 10800s }" % a1


def test_load_balancer_source_ranges():
    sp = port(type="LoadBalancer", node_port=3001, load_balancer_ips=("1.2.3.4",),
              load_balancer_source_ranges=("203.0.113.0/24", "192.168.0.0/16"))
    r = nk.render_service_port(sp, (ep("10.180.0.1"),), Config(cluster_cidr=("10.244.0.0/16",),
                                                               node_ip="192.168.1.5"))
    assert r.chains[FW] == ("ip saddr 203.0.113.0/24 return", "ip saddr 192.168.0.0/16 return",
                            "ip saddr 1.2.3.4 return", "drop")      # the node is allowed: so is the VIP itself
    assert elements(r, "firewall-ips") == {("firewall-ips", "1.2.3.4 . tcp . 80"): ("goto " + FW, "ns1/svc1:p80")}
    # without endpoints the firewall still applies (before the reject)
    r = nk.render_service_port(sp, (), CFG)
    assert r.chains[FW][-1] == "drop" and ("firewall-ips", "1.2.3.4 . tcp . 80") in elements(r)


def test_masquerade_all_and_several_cluster_cidrs():
    r = nk.render_service_port(port(), (ep("10.180.0.1"),), Config(masquerade_all=True))
    assert r.chains[SVC][0] == "ip daddr 172.30.0.41 tcp dport 80 jump mark-for-masquerade"
    r = nk.render_service_port(port(), (ep("10.180.0.1"),), Config())
    assert r.chains[SVC] == ("goto " + epc("10.180.0.1"),)             # no local detector: no masquerade
    cfg = Config(cluster_cidr=("10.244.0.0/16", "10.245.0.0/16", "fd00::/64"))
    r = nk.render_service_port(port(), (ep("10.180.0.1"),), cfg)
    assert r.chains[SVC][0] == "ip daddr 172.30.0.41 tcp dport 80 ip saddr != @pod-cidrs jump mark-for-masquerade"
    assert nk.fixed_elements(cfg) == {"pod-cidrs": ["10.244.0.0/16", "10.245.0.0/16"]}
    assert "flags interval" in nk.set_declarations(cfg)["pod-cidrs"]


def test_udp_and_sctp():
    sp = port(protocol="UDP", name=ServicePortName("ns1", "svc1", "dns", "UDP"), port=53)
    r = nk.render_service_port(sp, (Endpoint("10.180.0.1", 5353),), CFG)
    chain = nk.endpoint_chain(sp.name, Endpoint("10.180.0.1", 5353))
    assert chain.endswith("-ns1/svc1/udp/dns__10.180.0.1/5353")
    assert r.chains[chain][-1] == "meta l4proto udp dnat to 10.180.0.1:5353"
    assert ("service-ips", "172.30.0.41 . udp . 53") in elements(r)


def test_ipv6():
    cfg = Config(cluster_cidr=("fd00:10:244::/64",), family=6)
    sp = port(cluster_ip="fd00:10:96::1", type="NodePort", node_port=3001)
    r = nk.render_service_port(sp, (Endpoint("fd00:10:244::5", 8080),), cfg)
    e = nk.endpoint_chain(NAME, Endpoint("fd00:10:244::5", 8080))
    assert r.chains[SVC][0] == ("ip6 daddr fd00:10:96::1 tcp dport 80 ip6 saddr != fd00:10:244::/64 "
                                "jump mark-for-masquerade")
    assert r.chains[e] == ("ip6 saddr fd00:10:244::5 jump mark-for-masquerade",
                           "meta l4proto tcp dnat to [fd00:10:244::5]:8080")
    fixed = nk.fixed_chains(cfg)
    assert fixed["services"][1] == ("fib daddr type local ip6 daddr != ::1 meta l4proto . th dport "
                                    "vmap @service-nodeports")
    assert nk.set_declarations(cfg)["service-ips"].startswith("type ipv6_addr . inet_proto . inet_service")
    text = nk.full_sync_text(cfg, {NAME: r}, nk.Elements().rebuild({NAME: r}))
    assert text.startswith("add table ip6 kube-proxy") and "table ip " not in text


# ---- the fixed part ----

def test_fixed_chains():
    fixed = nk.fixed_chains(CFG)
    assert fixed["nat-prerouting"] == ("jump services",) and fixed["nat-postrouting"] == ("jump masquerading",)
    assert fixed["services"] == ("ip daddr . meta l4proto . th dport vmap @service-ips",
                                 "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport "
                                 "vmap @service-nodeports")
    assert fixed["masquerading"] == ("meta mark & 0x4000 == 0 return", "meta mark set meta mark ^ 0x4000",
                                     "masquerade fully-random")
    assert fixed["filter-forward"] == ("ct state new jump service-endpoints-check",
                                       "ct state new jump cluster-ips-check")
    cfg = Config(nodeport_addresses=("192.168.50.2", "127.0.0.1"))
    fixed = nk.fixed_chains(cfg)
    assert fixed["services"][1] == "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    assert fixed["nodeport-endpoints-check"] == ("ip daddr @nodeport-ips meta l4proto . th dport "
                                                 "vmap @no-endpoint-nodeports",)
    assert nk.fixed_elements(cfg) == {"nodeport-ips": ["192.168.50.2"]}     # never localhost


# ---- shared elements ----

def test_elements_are_claimed_by_ports_and_conflicts_resolve_by_name():
    a, b = ServicePortName("ns", "a", "http"), ServicePortName("ns", "a", "https")
    els = nk.Elements()
    touched = els.claim(a, [("cluster-ips", "10.96.0.1", None, None), ("service-ips", "k1", "goto x", None)])
    touched |= els.claim(b, [("cluster-ips", "10.96.0.1", None, None), ("service-ips", "k1", "goto y", None)])
    deletes, adds = els.diff(touched)
    assert deletes == [] and adds == [("cluster-ips", "10.96.0.1", None, None), ("service-ips", "k1", "goto x", None)]
    # the first claimant goes: the shared ClusterIP stays, the conflicting key changes hands
    touched = els.claim(a, [("cluster-ips", "10.96.0.1", None, None), ("service-ips", "k1", "goto x", None)],
                        add=False)
    assert els.diff(touched) == ([("service-ips", "k1")], [("service-ips", "k1", "goto y", None)])
    touched = els.claim(b, [("cluster-ips", "10.96.0.1", None, None), ("service-ips", "k1", "goto y", None)],
                        add=False)
    assert els.diff(touched) == ([("cluster-ips", "10.96.0.1"), ("service-ips", "k1")], [])
    assert els.kernel == {} and els.claims == {}


# ---- transactions ----

def test_full_sync_text():
    r = nk.render_service_port(port(), (ep("10.180.0.1"),), CFG)
    ports = {NAME: r}
    text = nk.full_sync_text(CFG, ports, nk.Elements().rebuild(ports),
                             kernel_chains={"services": None, "old-x/y": None},
                             kernel_sets={"cluster-ips", "affinity-old"}, recreate=["nat-output"])
    lines = text.splitlines()
    assert lines[:2] == ['add table ip kube-proxy { comment "rules for kube-proxy"; }', "flush table ip kube-proxy"]
    assert "flush map ip kube-proxy service-ips" in lines and "flush set ip kube-proxy cluster-ips" in lines
    assert "delete chain ip kube-proxy nat-output" in lines
    assert lines[-2:] == ["delete chain ip kube-proxy old-x/y", "delete set ip kube-proxy affinity-old"]
    body = text[text.index("table ip kube-proxy {"):]
    # chains come before the rules that jump to them: endpoints, then services, base chains last
    assert body.index("chain " + epc("10.180.0.1")) < body.index("chain " + SVC) < body.index("chain services") \
        < body.index("chain nat-prerouting")
    assert "\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\tjump services\n" \
        in body
    assert '\tset cluster-ips { type ipv4_addr; comment "ClusterIPs of Services"; elements = { 172.30.0.41 } }' in body
    assert "elements = { 172.30.0.41 . tcp . 80 : goto %s }" % SVC in body


def test_partial_sync_text_order():
    change = nk.Change(create={"endpoint-new": ("a",)}, rewrite={"service-x": ("goto endpoint-new",)},
                       stale={"endpoint-old"}, affinity={"affinity-new"}, deletes=[("service-ips", "k")],
                       adds=[("service-ips", "k", "goto service-x", None), ("cluster-ips", "10.96.0.1", None, None)])
    text = nk.partial_sync_text(CFG, change, delete_chains={"endpoint-old"})
    assert text.splitlines() == [
        "add set ip kube-proxy affinity-new { type ipv4_addr; flags dynamic,timeout; }",
        "add chain ip kube-proxy endpoint-new",
        "add chain ip kube-proxy endpoint-new { a; }",
        "flush chain ip kube-proxy service-x",
        "add chain ip kube-proxy service-x { goto endpoint-new; }",
        "flush chain ip kube-proxy endpoint-old",
        "delete element ip kube-proxy service-ips { k }",
        'add set ip kube-proxy cluster-ips { type ipv4_addr; comment "ClusterIPs of Services"; '
        'elements = { 10.96.0.1 } }',
        'add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict; '
        'comment "ClusterIP, external IP and LoadBalancer IP dispatch"; elements = { k : goto service-x } }',
        "delete chain ip kube-proxy endpoint-old"]


# ---- the proxier, with a recorded nft ----

HTTP = {"name": "http", "port": 80, "targetPort": 8080}
HTTP_EP = {"name": "http", "port": 8080}


class FakeNft:
    """Records transactions; lists what a test put in `chains` / `sets`."""

    def __init__(self, fail=False):
        self.applied, self.listed, self.fail = [], [], fail
        self.chains, self.sets = {}, []

    def apply(self, text):
        if self.fail:
            raise RuntimeError("nft -f failed: /dev/stdin:3:1-5: Error: boom")
        self.applied.append(text)

    def list_json(self, *what, terse=False):
        self.listed.append(what)
        assert what in (("sets", "ip"), ("maps", "ip")) and terse
        kind = what[0][:-1]
        return [{kind: {"family": "ip", "table": t, "name": n}} for t, n in self.sets
                if (n in nk.MAPS) == (kind == "map")]

    def list_text(self, *what):
        """`nft list chains ip` as nft prints it."""
        self.listed.append(what)
        assert what == ("chains", "ip")
        out = []
        for table in sorted({t for t, _ in self.chains}):
            out.append("table ip %s {" % table)
            for (t, name), spec in self.chains.items():
                if t == table:
                    out.append("\tchain %s {" % name)
                    if spec:
                        out.append("\t\ttype %s hook %s priority %s; policy accept;" % spec)
                    out.append("\t}")
            out.append("}")
        return "\n".join(out) + "\n"

    def commands(self, i=-1):
        return self.applied[i].splitlines()


def tracker_with(services):
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    t.replace("Service", [k8s.service(n, ip, [HTTP]) for n, ip, _ in services])
    t.replace("EndpointSlice", [k8s.endpoint_slice(n, [(e, "node1") for e in eps], [HTTP_EP])
                                for n, _, eps in services])
    return t


def new_proxier(fake):
    return nk.NftablesProxier(Config(cluster_cidr=("10.244.0.0/16",)), apply=fake.apply, list_json=fake.list_json,
                              list_text=fake.list_text)


def chain_of(service, ip):
    return nk.endpoint_chain(ServicePortName("default", service, "http"), Endpoint(ip, 8080))


def test_mode_is_registered():
    assert "nftables" in server.MODES
    assert isinstance(server.make_proxier("nftables", Config()), nk.NftablesProxier)


def test_first_sync_is_full_and_deletes_our_stale_chains_only():
    fake = FakeNft()
    fake.chains = {("kube-proxy", "endpoint-OLD-default/gone/tcp/http__10.1.1.1/80"): None,
                   ("kube-proxy", "nat-prerouting"): ("nat", "prerouting", "dstnat"),
                   ("kube-proxy", "filter-prerouting"): ("filter", "prerouting", "dstnat - 10"),
                   ("kube-proxy", "nat-output"): ("nat", "output", "0"),
                   ("nat", "KUBE-SERVICES"): None, ("other", "mine"): None}
    fake.sets = [("kube-proxy", "affinity-OLD"), ("filter", "blocklist"), ("kube-proxy", "service-ips"),
                 ("kube-proxy", "cluster-ips")]
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2", "10.244.2.2"])])
    p = new_proxier(fake)
    result = p.sync(t.take())
    assert result.full and result.rules == {"kube-proxy": p.rules} and p.rules > 0
    assert fake.listed == [("chains", "ip"), ("sets", "ip"), ("maps", "ip")]
    text = fake.applied[0]
    assert "delete chain ip kube-proxy endpoint-OLD-default/gone/tcp/http__10.1.1.1/80" in text
    assert "delete set ip kube-proxy affinity-OLD" in text
    assert "delete chain ip kube-proxy nat-output" in text                 # its priority changed
    # the shared sets and maps are declared anew (their content is rewritten anyway)
    assert text.index("delete map ip kube-proxy service-ips") < text.index("add map ip kube-proxy service-ips")
    assert "delete set ip kube-proxy cluster-ips" in text and "delete map ip kube-proxy firewall-ips" not in text
    assert "delete chain ip kube-proxy nat-prerouting" not in text
    assert "delete chain ip kube-proxy filter-prerouting" not in text
    assert "KUBE-SERVICES" not in text and "mine" not in text and "blocklist" not in text
    commands = [line for line in text.splitlines() if line.startswith(("add", "flush", "delete", "table"))]
    assert all(" ip kube-proxy" in c or c == "table ip kube-proxy {" for c in commands), commands
    assert result.chains_written == p.chain_count + 1


def test_endpoint_change_is_a_partial_sync_of_that_service_only():
    fake = FakeNft()
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2", "10.244.2.2"]), ("db", "10.96.0.11", ["10.244.1.9"])])
    p = new_proxier(fake)
    p.sync(t.take())
    rules = p.rules
    t.update_slice(k8s.endpoint_slice("web", [("10.244.1.2", "node1"), ("10.244.3.3", "node1")], [HTTP_EP]))
    result = p.sync(t.take())
    assert not result.full and result.changed == 1
    web = nk.service_chain(ServicePortName("default", "web", "http"))
    assert fake.commands() == [
        "add chain ip kube-proxy " + chain_of("web", "10.244.3.3"),
        "add chain ip kube-proxy %s { ip saddr 10.244.3.3 jump mark-for-masquerade; "
        "meta l4proto tcp dnat to 10.244.3.3:8080; }" % chain_of("web", "10.244.3.3"),
        "flush chain ip kube-proxy " + web,
        "add chain ip kube-proxy %s { ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump "
        "mark-for-masquerade; numgen random mod 2 == 0 goto %s; goto %s; }"
        % (web, chain_of("web", "10.244.1.2"), chain_of("web", "10.244.3.3")),
        "flush chain ip kube-proxy " + chain_of("web", "10.244.2.2"),
        "delete chain ip kube-proxy " + chain_of("web", "10.244.2.2")]       # a small table: deleted at once
    assert p.rules == rules and result.rules == {"kube-proxy": rules}
    assert len(fake.listed) == 3                                         # partial syncs read nothing


def test_in_a_large_table_stale_chains_wait_for_a_transaction_that_deletes_anyway(monkeypatch):
    monkeypatch.setattr(nk, "DEFER_CHAINS", 0)
    fake = FakeNft()
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2", "10.244.2.2"]), ("db", "10.96.0.11", ["10.244.1.9"])])
    p = new_proxier(fake)
    p.sync(t.take())
    t.update_slice(k8s.endpoint_slice("web", [("10.244.1.2", "node1"), ("10.244.3.3", "node1")], [HTTP_EP]))
    p.sync(t.take())
    gone = chain_of("web", "10.244.2.2")
    # only nft's cheap forms: no add rule, add element or delete (each would make nft dump every chain)
    assert not [c for c in fake.commands() if c.startswith(("delete", "add rule", "add element"))], fake.commands()
    assert "flush chain ip kube-proxy " + gone in fake.commands() and p.stale_chains == {gone}
    # the endpoint comes back before the chain was deleted: it is rewritten, not created
    t.update_slice(k8s.endpoint_slice("web", [("10.244.1.2", "node1"), ("10.244.2.2", "node1"),
                                              ("10.244.3.3", "node1")], [HTTP_EP]))
    p.sync(t.take())
    assert "flush chain ip kube-proxy " + gone in fake.commands() and not p.stale_chains
    assert "add chain ip kube-proxy " + gone not in fake.commands()
    t.update_slice(k8s.endpoint_slice("web", [("10.244.1.2", "node1")], [HTTP_EP]))
    p.sync(t.take())
    assert len(p.stale_chains) == 2
    # removing a Service deletes map elements (nft dumps its cache anyway): the stale chains go too
    t.delete_service(("default", "db"))
    p.sync(t.take())
    cmds = fake.commands()
    assert "delete element ip kube-proxy service-ips { 10.96.0.11 . tcp . 80 }" in cmds
    assert "delete element ip kube-proxy cluster-ips { 10.96.0.11 }" in cmds
    assert {c for c in cmds if c.startswith("delete chain")} == {
        "delete chain ip kube-proxy " + c for c in {gone, chain_of("web", "10.244.3.3"), chain_of("db", "10.244.1.9"),
                                                     nk.service_chain(ServicePortName("default", "db", "http"))}}
    assert cmds.index("delete element ip kube-proxy service-ips { 10.96.0.11 . tcp . 80 }") < \
        cmds.index("delete chain ip kube-proxy " + chain_of("db", "10.244.1.9"))
    assert not p.stale_chains


def test_service_losing_its_endpoints_moves_to_the_reject_map():
    fake = FakeNft()
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2"])])
    p = new_proxier(fake)
    p.sync(t.take())
    t.update_slice(k8s.endpoint_slice("web", [], [HTTP_EP]))
    p.sync(t.take())
    cmds = fake.commands()
    assert "delete element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80 }" in cmds
    assert any(c.startswith("add map ip kube-proxy no-endpoint-services ") and
               'elements = { 10.96.0.10 . tcp . 80 comment "default/web:http" : goto reject-chain }' in c
               for c in cmds), cmds
    assert not any("cluster-ips" in c for c in cmds)           # unchanged: still a ClusterIP


def test_nothing_changed_writes_nothing():
    fake = FakeNft()
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2"])])
    p = new_proxier(fake)
    p.sync(t.take())
    result = p.sync(t.take())
    assert len(fake.applied) == 1 and not result.full and result.restore_bytes == 0


def test_a_failed_transaction_makes_the_next_sync_full():
    fake = FakeNft()
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2"])])
    p = new_proxier(fake)
    p.sync(t.take())
    fake.fail = True
    t.update_slice(k8s.endpoint_slice("web", [("10.244.9.9", "node1")], [HTTP_EP]))
    with pytest.raises(RuntimeError):
        p.sync(t.take())
    fake.fail = False
    result = p.sync(t.take())                  # the tracker has nothing new: the proxier knows it must
    assert result.full and chain_of("web", "10.244.9.9") in fake.applied[-1]
    assert chain_of("web", "10.244.1.2") not in fake.applied[-1]


def test_partial_syncs_keep_the_state_a_full_sync_would_write():
    fake = FakeNft()
    services = [("s%d" % i, "10.96.0.%d" % (i + 1), ["10.244.%d.%d" % (i, j) for j in range(1, 4)]) for i in range(6)]
    t = tracker_with(services)
    p = new_proxier(fake)
    p.sync(t.take())
    t.update_slice(k8s.endpoint_slice("s1", [("10.244.1.1", "node1")], [HTTP_EP]))
    t.update_slice(k8s.endpoint_slice("s2", [], [HTTP_EP]))
    t.delete_service(("default", "s3"))
    t.update_service(k8s.service("new", "10.96.1.1", [HTTP], session_affinity_timeout=30))
    t.update_slice(k8s.endpoint_slice("new", [("10.244.9.1", "node1"), ("10.244.9.2", "node2")], [HTTP_EP]))
    p.sync(t.take())
    partial = (dict(p.ports), dict(p.elements.kernel), p.rules, p.chain_count)
    t.request_full_sync("check")
    p.sync(t.take())
    assert (p.ports, p.elements.kernel, p.rules, p.chain_count) == partial


def test_cleanup_deletes_both_tables_idempotently():
    fake = FakeNft()
    p = new_proxier(fake)
    p.cleanup()
    assert fake.applied == ["add table ip kube-proxy\ndelete table ip kube-proxy\n"
                            "add table ip6 kube-proxy\ndelete table ip6 kube-proxy\n"]
    assert not p.synced


def test_listings_are_parsed_for_our_table_only():
    text = ("table ip nat {\n\tchain POSTROUTING {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            "\t}\n}\ntable ip kube-proxy {\n\tchain filter-prerouting {\n\t\ttype filter hook prerouting priority "
            "dstnat - 10; policy accept;\n\t}\n\tchain nat-output {\n\t\ttype nat hook output priority -100; policy "
            "accept;\n\t}\n\tchain service-X-ns/a/tcp/b {\n\t}\n\tchain filter-output-post-dnat {\n\t\ttype filter "
            "hook output priority dstnat + 10; policy accept;\n\t}\n}\n")
    assert nk.parse_chains(text) == {"filter-prerouting": ("filter", "prerouting", -110),
                                     "nat-output": ("nat", "output", -100), "service-X-ns/a/tcp/b": None,
                                     "filter-output-post-dnat": ("filter", "output", -90)}
    assert nk.parse_chains(text, "ip6") == {}
    listing = json.loads('{"nftables": [{"metainfo": {}}, {"set": {"family": "ip", "table": "kube-proxy", '
                         '"name": "affinity-x"}}, {"set": {"family": "ip", "table": "filter", "name": "y"}}]}')
    assert nk.parse_sets(listing["nftables"][1:] + [{"map": {"table": "kube-proxy", "name": "service-ips"}}]) == {
        "affinity-x", "service-ips"}


def test_periodic_full_syncs_read_nothing_and_delete_what_they_know_is_stale(monkeypatch):
    monkeypatch.setattr(nk, "DEFER_CHAINS", 0)
    fake = FakeNft()
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2", "10.244.2.2"])])
    p = new_proxier(fake)
    p.sync(t.take())
    t.update_slice(k8s.endpoint_slice("web", [("10.244.1.2", "node1")], [HTTP_EP]))
    p.sync(t.take())
    assert p.stale_chains == {chain_of("web", "10.244.2.2")}
    t.request_full_sync("periodic")
    result = p.sync(t.take())
    assert result.full and len(fake.listed) == 3                 # only the first sync listed
    assert "delete chain ip kube-proxy " + chain_of("web", "10.244.2.2") in fake.commands()
    assert not p.stale_chains and result.chains_written == p.chain_count + 1
