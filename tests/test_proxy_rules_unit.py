"""diagnose/proxy_rules.py on snapshots written as data, one per kube-proxy mode, each holding
what that mode's own render functions make of the same Services (no root, no kernel):

  iptables   kube_proxy.iptables.render() as iptables-save text
  nftables   tests/proxy_rules_nft.json: kube_proxy.nftables' full sync loaded into a scratch
             network namespace by the real nft, and `nft -j list ruleset` (with the text of
             `nft list ruleset`) taken there. Regenerate it (root) after the renderer changes:
                 .venv/bin/python tests/test_proxy_rules_unit.py regenerate
  ipvs       kube_proxy.ipvs.render_port()'s virtual servers, as the snapshot reads them

Then trace's kube-proxy-rules hop and doctor's kube-proxy findings in each mode.
"""
import json
import os
import subprocess
import sys

import pytest
from test_trace_unit import C, world

from diagnose import proxy_rules as pr
from diagnose.doctor import NodeInputs, diagnose
from diagnose.snapshot import IpvsRealServer, IpvsVirtualServer, Snapshot, read_ipvs
from diagnose.trace import NodeState, walk
from kube_proxy import iptables as kipt
from kube_proxy import ipvs as kipvs
from kube_proxy import nftables as knft
from kube_proxy.model import build_state, categorize_endpoints
from kube_proxy.proxier import Config
from lab import manifests as k8s
from podnet.kube.endpointslices import Endpoint, ServicePortName

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy_rules_nft.json")
NODE, NODE_IP = "node1", "192.168.50.1"
CONFIG = Config(cluster_cidr=("10.244.0.0/16",))
HTTP = {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}
WEB = ServicePortName("default", "web", "", "TCP")         # tests/test_trace_unit.py's Service: 10.96.0.20:80 -> C
HTTP_PORT = ServicePortName("default", "http", "http", "TCP")
LOC = ServicePortName("default", "loc", "", "TCP")
AFF = ServicePortName("default", "aff", "", "UDP")


def objects(http_endpoints=(("10.244.1.5", NODE), ("10.244.2.5", "node2")), drop=()):
    services = [k8s.service("web", "10.96.0.20", [{"port": 80, "targetPort": 8080}]),
                k8s.service("http", "10.96.0.10", [HTTP], type="NodePort", external_traffic_policy="Local"),
                k8s.service("loc", "10.96.0.11", [{"port": 80, "targetPort": 8080}], internal_traffic_policy="Local"),
                k8s.service("aff", "10.96.0.12", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                            session_affinity_timeout=60),
                k8s.service("none", "10.96.0.13", [{"port": 80, "targetPort": 8080}])]
    slices = [k8s.endpoint_slice("web", [(C, "node2")], [{"port": 8080}]),
              k8s.endpoint_slice("http", list(http_endpoints), [{"name": "http", "port": 8080}]),
              k8s.endpoint_slice("loc", [("10.244.1.6", NODE), ("10.244.2.6", "node2")], [{"port": 8080}]),
              k8s.endpoint_slice("aff", [("10.244.2.7", "node2")], [{"port": 5353, "protocol": "UDP"}])]
    return {"Service": [s for s in services if s["metadata"]["name"] not in drop], "EndpointSlice": slices}


def state(**kw):
    objs = objects(**kw)
    return build_state(objs["Service"], objs["EndpointSlice"], hostname=NODE)


# ---- each mode's rules, from its own renderer ------------------------------------------------------

def iptables_save(st):
    """kube_proxy.iptables.render() as iptables-save prints it."""
    out = []
    for table, chains in kipt.render(st, CONFIG).items():
        out += ["*" + table] + [":%s - [0:0]" % c for c in chains]
        out += [rule for rules in chains.values() for rule in rules] + ["COMMIT"]
    return "\n".join(out) + "\n"


def dnat_rule(sep):
    """The DNAT rule kube_proxy.iptables renders in endpoint chain `sep`."""
    return next(r for r in kipt.render(state(), CONFIG)["nat"][sep] if "-j DNAT" in r)


def nft_text(st):
    ports = {n: knft.render_service_port(sp, st.endpoints_for(n), CONFIG) for n, sp in st.service_ports.items()}
    return knft.full_sync_text(CONFIG, ports, knft.Elements().rebuild(ports))


def ipvs_table(st):
    """kube_proxy.ipvs.render_port()'s virtual servers as the snapshot holds them (Snapshot.ipvs)."""
    out = []
    for name, sp in sorted(st.service_ports.items()):
        for vs in kipvs.render_port(sp, st.endpoints_for(name), CONFIG, node_ips=(NODE_IP,)).servers:
            out.append({"protocol": vs.protocol, "address": vs.address, "port": vs.port, "scheduler": vs.scheduler,
                        "flags": 1 if vs.timeout else 0, "timeout": vs.timeout,
                        "real_servers": [{"address": ip, "port": port} for ip, port in sorted(vs.dests)]})
    return out


def fixture():
    with open(FIXTURE) as f:
        return json.load(f)


def regenerate():
    """Load the nftables mode's full sync into a scratch network namespace (unshare -n: the
    root namespace is never touched) and keep what nft lists there."""
    text = nft_text(state())
    script = "nft -f - && nft -j list ruleset && echo '----' && nft list ruleset"
    out = subprocess.run(["unshare", "-n", "sh", "-c", script], input=text, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    listed, _, printed = out.partition("\n----\n")
    ruleset = [o for o in json.loads(listed)["nftables"] if "metainfo" not in o]
    version = subprocess.run(["nft", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    with open(FIXTURE, "w") as f:        # one object (one line of text) a line: diffs stay readable
        f.write('{"nft_version": %s,\n"text": [\n%s],\n"ruleset": [\n%s]}\n' % (
            json.dumps(version), ",\n".join(json.dumps(line) for line in printed.splitlines()),
            ",\n".join(json.dumps(o, sort_keys=True) for o in ruleset)))


BASE = {"links": [{"index": 1, "name": "lo", "kind": "", "mtu": 65536, "mac": "", "up": True, "operstate": "unknown"}]}


def snapshot(mode, st=None):
    st = st or state()
    if mode == pr.IPTABLES:
        return Snapshot.from_dict(dict(BASE, iptables_save=iptables_save(st)))
    if mode == pr.NFTABLES:
        return Snapshot.from_dict(dict(BASE, nft_ruleset=fixture()["ruleset"]))
    return Snapshot.from_dict(dict(BASE, ipvs=ipvs_table(st)))


# ---- the nftables fixture is what nft prints, and the text printed from it is nft's --------------

def test_nft_fixture_is_the_renderers_and_every_rule_prints_as_nft_prints_it():
    data = fixture()
    chains = {o["chain"]["name"] for o in data["ruleset"] if "chain" in o}
    st = state()
    for name, sp in st.service_ports.items():
        wanted = set(knft.render_service_port(sp, st.endpoints_for(name), CONFIG).chains)
        assert wanted <= chains, name            # regenerate the fixture if the renderer changed
    lines = {line.strip() for line in data["text"]}
    rules = [o["rule"] for o in data["ruleset"] if "rule" in o]
    assert len(rules) > 40
    for rule in rules:
        assert pr.nft_rule_text(rule) in lines, rule


# ---- what each mode sends each port to ------------------------------------------------------------

@pytest.mark.parametrize("mode", pr.MODES)
def test_each_mode_sends_every_port_to_its_endpoints(mode):
    snap, st = snapshot(mode), state()
    assert pr.active_modes(snap) == (mode,)
    for name, sp in st.service_ports.items():
        rules = pr.service_rules(snap, name, sp)
        cats = categorize_endpoints(sp, st.endpoints_for(name))
        if not cats.has_any:                # default/none: kube-proxy rejects it, no chain sends anywhere
            assert all(not d.targets for d in rules.dispatches), rules
            continue
        assert rules.mode == mode and rules.holds, rules
        assert rules.entry, rules
        for dispatch, eps in pr.wanted(rules, sp, cats):
            assert dispatch.present and set(dispatch.addrs()) == {ep.addr for ep in eps}, (name, dispatch)
    web = pr.service_rules(snap, WEB, st.service_ports[WEB])
    target = web.cluster.targets[0]
    assert target.addr == C + ":8080"
    if mode == pr.IPTABLES:
        assert web.cluster.name == kipt.service_chain(WEB) and web.entry_to == web.cluster.name
        assert web.entry.startswith("-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp ")
        assert target.chain == kipt.endpoint_chain(WEB, Endpoint(C, 8080))
        assert target.rule == dnat_rule(target.chain)
    elif mode == pr.NFTABLES:
        assert web.cluster.name == knft.service_chain(WEB)
        assert web.entry == "add element ip kube-proxy service-ips { 10.96.0.20 . tcp . 80 : goto %s }" % web.cluster.name
        assert target.chain == knft.endpoint_chain(WEB, Endpoint(C, 8080))
        assert target.rule == "add rule ip kube-proxy %s meta l4proto tcp dnat to %s:8080" % (target.chain, C)
    else:
        assert web.cluster.name == "TCP 10.96.0.20:80" and web.entry == "ipvsadm -A -t 10.96.0.20:80 -s rr"
        assert target.rule == "ipvsadm -a -t 10.96.0.20:80 -r %s:8080 -m -w 1" % C


@pytest.mark.parametrize("mode", pr.MODES)
def test_the_local_policy_chains_hold_the_local_endpoints(mode):
    snap, st = snapshot(mode), state()
    loc = pr.service_rules(snap, LOC, st.service_ports[LOC])          # internalTrafficPolicy Local
    assert set(loc.path(local_policy=True).addrs()) == {"10.244.1.6:8080"}
    http = pr.service_rules(snap, HTTP_PORT, st.service_ports[HTTP_PORT])   # externalTrafficPolicy Local
    both = {"10.244.1.5:8080", "10.244.2.5:8080"}
    assert set(http.path(local_policy=False).addrs()) == both       # ClusterIP traffic: Cluster
    nodeport = http.path(local_policy=True, frontend=(NODE_IP, 30080))
    assert set(nodeport.addrs()) == {"10.244.1.5:8080"}
    if mode == pr.IPVS:
        assert loc.local is not None and loc.cluster is None and nodeport.name == "TCP 192.168.50.1:30080"
        assert nodeport.policy == pr.LOCAL
    else:
        names = (kipt if mode == pr.IPTABLES else knft)
        assert (loc.local.name, nodeport.name) == (names.local_chain(LOC), names.local_chain(HTTP_PORT))
    aff = pr.service_rules(snap, AFF, st.service_ports[AFF])          # affinity rules jump to the endpoint too
    assert [t.addr for t in aff.cluster.targets] == ["10.244.2.7:5353"]
    if mode == pr.IPVS:
        assert aff.entry == "ipvsadm -A -u 10.96.0.12:53 -s rr -p 60"


def test_no_rules_is_mode_none_and_ipv6_ports_read_their_own_tables():
    st = state()
    empty = Snapshot.from_dict(BASE)
    assert pr.active_modes(empty) == () and not pr.rules_read(empty)
    assert pr.service_rules(empty, WEB, st.service_ports[WEB]).mode == pr.NONE
    v6 = build_state([k8s.service("six", "fd00:96::20", [{"port": 80, "targetPort": 8080}])],
                     [dict(k8s.endpoint_slice("six", [("fd00:244::5", "node2")], [{"port": 8080}]), addressType="IPv6")], family=6, hostname=NODE)
    saved6 = "\n".join(["*nat"] + [r for rules in kipt.render(v6, Config(family=6))["nat"].values() for r in rules]
                       + ["COMMIT"]) + "\n"
    snap = Snapshot.from_dict(dict(BASE, ip6tables_save=saved6, iptables_save=iptables_save(st)))
    (name, sp), = v6.service_ports.items()
    rules = pr.service_rules(snap, name, sp)
    assert rules.mode == pr.IPTABLES and set(rules.cluster.addrs()) == {"[fd00:244::5]:8080"}
    assert rules.entry.startswith("-A KUBE-SERVICES -d fd00:96::20/128 -p tcp")


def test_many_lookups_and_the_whole_table_agree():
    """The first lookups search the text, later ones (and doctor) use the table split once."""
    st = state()
    snap = snapshot(pr.IPTABLES, st)
    ports = {n: sp for n, sp in st.service_ports.items() if n.name != "none"}     # (no rules: a search of all)
    searched = {n: pr.service_rules(snap, n, sp) for n, sp in ports.items()}
    assert pr._index(snap).iptables(4)._declared is None
    pr.active_modes(snap)                               # splits the table
    assert pr._index(snap).iptables(4)._declared is not None
    assert {n: pr.service_rules(snap, n, sp) for n, sp in ports.items()} == searched


def test_rules_written_by_hand_are_followed_where_the_kernel_goes():
    """A ClusterIP rule jumping to a chain kube-proxy would not name, and endpoint chains alone
    found by their comment (tests/test_trace_unit.py's and bench/trace_scale.py's snapshots)."""
    st = state()
    sp = st.service_ports[WEB]
    saved = ("*nat\n-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment \"default/web cluster IP\" -m tcp "
             "--dport 80 -j KUBE-SVC-OTHER\n-A KUBE-SVC-OTHER -j KUBE-SEP-1\n"
             "-A KUBE-SEP-1 -p tcp -m tcp -j DNAT --to-destination 10.244.2.9:8080\nCOMMIT\n")
    rules = pr.service_rules(Snapshot.from_dict(dict(BASE, iptables_save=saved)), WEB, sp)
    assert (rules.cluster.name, list(rules.cluster.addrs())) == ("KUBE-SVC-OTHER", ["10.244.2.9:8080"])
    saved = "*nat\n-A KUBE-SEP-X -p tcp -m comment --comment default/web -m tcp -j DNAT --to-destination 10.244.2.9:8080\nCOMMIT\n"
    rules = pr.service_rules(Snapshot.from_dict(dict(BASE, iptables_save=saved)), WEB, sp)
    assert list(rules.cluster.addrs()) == ["10.244.2.9:8080"] and "KUBE-SEP-X" in rules.cluster.targets[0].rule


# ---- doctor in each mode -----------------------------------------------------------------------------

def kube_findings(snap, objs):
    found = diagnose(NodeInputs(snapshot=snap, node_name=NODE, objects=objs))
    return [f for f in found if f.code.startswith("kube-proxy-")]


RULE_OF = {pr.IPTABLES: "-j DNAT --to-destination 10.244.2.5:8080",
           pr.NFTABLES: "meta l4proto tcp dnat to 10.244.2.5:8080",
           pr.IPVS: "ipvsadm -a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 1"}


@pytest.mark.parametrize("mode", pr.MODES)
def test_doctor_names_the_modes_stale_and_missing_rules(mode):
    snap = snapshot(mode)
    assert kube_findings(snap, objects()) == []
    # 10.244.2.5 left the EndpointSlice while kube-proxy was down: its rules still send there
    stale = kube_findings(snap, objects(http_endpoints=[("10.244.1.5", NODE)]))
    assert [f.code for f in stale] == ["kube-proxy-stale-endpoint"], stale
    assert stale[0].object == "Service default/http port http"
    assert "10.244.2.5:8080" in stale[0].what and RULE_OF[mode] in stale[0].what and mode in stale[0].what
    # a new endpoint the rules do not know yet
    missing = kube_findings(snap, objects(http_endpoints=[("10.244.1.5", NODE), ("10.244.2.5", "node2"),
                                                          ("10.244.2.9", "node2")]))
    assert {f.code for f in missing} == {"kube-proxy-endpoint-missing"} and "10.244.2.9:8080" in missing[0].what
    # a Service deleted while kube-proxy was down: its chain / virtual server is left
    gone = kube_findings(snap, objects(drop=("aff",)))
    assert [f.code for f in gone] == ["kube-proxy-stale-service"], gone
    assert {pr.IPTABLES: kipt.service_chain(AFF), pr.NFTABLES: knft.service_chain(AFF),
            pr.IPVS: "UDP 10.96.0.12:53"}[mode] in gone[0].what


def test_doctor_ipvs_draining_real_server_is_not_stale():
    table = ipvs_table(state())
    for vs in table:
        if vs["address"] == "10.96.0.10":
            vs["real_servers"].append({"address": "10.244.2.99", "port": 8080, "weight": 0, "active": 3})
    assert kube_findings(Snapshot.from_dict(dict(BASE, ipvs=table)), objects()) == []


# ---- trace in each mode: tests/test_trace_unit.py's two nodes, node1's rules in one mode ---------------

def mode_world(mode):
    view, snaps = world()
    st = build_state(view.services, view.slices, hostname=NODE)
    node1 = snaps["node1"]
    node1["iptables_save"] = "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
    if mode == pr.IPTABLES:
        node1["iptables_save"] += iptables_save(st)
    elif mode == pr.NFTABLES:
        node1["nft_ruleset"] = fixture()["ruleset"]         # holds default/web as world() has it
    else:
        node1["ipvs"] = ipvs_table(st)
    return view, {n: NodeState(n, Snapshot.from_dict(s)) for n, s in snaps.items()}


@pytest.mark.parametrize("mode", pr.MODES)
def test_trace_follows_the_modes_rules_and_names_a_stale_one(mode):
    view, states = mode_world(mode)
    trace = walk(view, states, "default/a", "svc/default/web:80", "node1")
    assert trace.verdict == "delivered", trace.lines()
    hop = next(h for h in trace.hops if h.step == "kube-proxy-rules")
    assert hop.status == "ok" and hop.what.startswith("%s mode: " % mode), hop
    assert hop.rule.startswith({pr.IPTABLES: "-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp ",
                                pr.NFTABLES: "add element ip kube-proxy service-ips { 10.96.0.20 . tcp . 80 : goto ",
                                pr.IPVS: "ipvsadm -A -t 10.96.0.20:80 -s rr"}[mode]), hop
    # the endpoint moved to pod b (node1) while kube-proxy was down: the rules still send to c
    view.slices = [k8s.endpoint_slice("web", [("10.244.1.3", "node1")], [{"port": 8080}])]
    hop = walk(view, states, "default/a", "svc/default/web:80", "node1").failed
    assert hop.step == "kube-proxy-rules" and C + ":8080" in hop.what and mode in hop.what, hop
    assert hop.rule == {pr.IPTABLES: dnat_rule(kipt.endpoint_chain(WEB, Endpoint(C, 8080))),
                        pr.NFTABLES: "add rule ip kube-proxy %s meta l4proto tcp dnat to %s:8080" % (
                            knft.endpoint_chain(WEB, Endpoint(C, 8080)), C),
                        pr.IPVS: "ipvsadm -a -t 10.96.0.20:80 -r %s:8080 -m -w 1" % C}[mode]


def test_trace_without_any_kube_proxy_rules_says_so():
    view, snaps = world()
    snaps["node1"]["iptables_save"] = "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
    states = {n: NodeState(n, Snapshot.from_dict(s)) for n, s in snaps.items()}
    hop = walk(view, states, "default/a", "svc/default/web:80", "node1").failed
    assert hop.step == "kube-proxy-rules" and "no kube-proxy rules for default/web in any mode" in hop.what, hop


# ---- the snapshot's IPVS part ---------------------------------------------------------------------------

def test_snapshot_ipvs_round_trips_as_data():
    snap = Snapshot(ipvs=(IpvsVirtualServer("TCP", "10.96.0.10", 80, "rr", 1, 60,
                                            (IpvsRealServer("10.244.1.5", 8080, 1, 0, 2, 1),)),))
    assert Snapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap


@pytest.mark.skipif(os.path.exists("/proc/net/ip_vs"), reason="this kernel has ip_vs")
def test_a_kernel_without_ip_vs_has_no_virtual_servers_and_that_is_no_error():
    errors = []
    assert read_ipvs(errors) == () and errors == []


if __name__ == "__main__" and sys.argv[1:] == ["regenerate"]:
    regenerate()
    print("wrote", FIXTURE)


def test_trace_ipvs_local_policy_without_local_endpoints_uses_the_cluster_endpoints():
    """kube-proxy's IPVS mode (ours too: kube_proxy.ipvs.render_port) sends a NodePort of an
    externalTrafficPolicy Local Service with no local endpoint to the cluster's endpoints, where
    the iptables and nftables modes drop it."""
    for mode in (pr.IPVS, pr.IPTABLES):
        view, _ = world()
        view.services = [k8s.service("web", "10.96.0.20", [{"port": 80, "targetPort": 8080, "nodePort": 30080}],
                                     type="NodePort", external_traffic_policy="Local")]
        st = build_state(view.services, view.slices, hostname=NODE)
        _, snaps = world()
        snaps["node1"]["iptables_save"] = "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
        if mode == pr.IPVS:
            snaps["node1"]["ipvs"] = ipvs_table(st)
        else:
            snaps["node1"]["iptables_save"] += iptables_save(st)
        states = {n: NodeState(n, Snapshot.from_dict(s)) for n, s in snaps.items()}
        trace = walk(view, states, "default/a", "%s:30080" % NODE_IP, "node1")
        if mode == pr.IPVS:
            assert trace.verdict == "delivered" and trace.ipvs_node == "node1", trace.lines()
        else:
            assert trace.failed.step == "service" and "no local endpoint" in trace.failed.what, trace.lines()
