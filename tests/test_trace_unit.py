"""`podnet trace`'s walk on snapshots written as data (no root): a flannel vxlan pair of nodes
as their kernels would hold it, each fault as an edit of that data, named by hop and object."""
import copy

from diagnose import live
from diagnose.snapshot import Snapshot
from diagnose.trace import ClusterView, FlannelLease, NodeState, forward_verdict, route_lookup, split_destination, walk
from lab import manifests as k8s

A, B, C = "10.244.1.2", "10.244.1.3", "10.244.2.2"
NODE1, NODE2 = "192.168.50.1", "192.168.50.2"
MAC1, MAC2 = "aa:aa:aa:aa:aa:01", "aa:aa:aa:aa:aa:02"


def node_snapshot(own, other, own_ip, other_ip, other_mac, pods):
    links = [{"index": 1, "name": "lo", "kind": "", "mtu": 65536, "mac": "", "up": True, "operstate": "unknown"},
             {"index": 2, "name": "eth0", "kind": "veth", "mtu": 1500, "mac": "", "up": True, "operstate": "up"},
             {"index": 3, "name": "flannel.1", "kind": "vxlan", "mtu": 1450, "mac": "", "up": True,
              "operstate": "unknown", "vxlan_vni": 1, "vxlan_dev": "eth0"},
             {"index": 4, "name": "cni0", "kind": "bridge", "mtu": 1450, "mac": "", "up": True, "operstate": "up"}]
    links += [{"index": 10 + i, "name": "veth%d" % i, "kind": "veth", "mtu": 1450, "mac": "", "up": True,
               "operstate": "up", "master": "cni0"} for i in range(len(pods))]
    route = {"family": 2, "table": 254, "type": "unicast", "protocol": 2, "scope": 253}
    routes = [dict(route, dst="%s.0/24" % own, dev="cni0"), dict(route, dst="192.168.50.0/24", dev="eth0"),
              dict(route, dst="%s.0/24" % other, dev="flannel.1", gateway="%s.0" % other, onlink=True, scope=0),
              {"family": 2, "table": 255, "type": "local", "protocol": 2, "dst": "%s/32" % own_ip, "dev": "eth0"}]
    return {"links": links, "routes": routes,
            "addrs": [{"dev": "eth0", "cidr": own_ip + "/24", "family": 2}],
            "neighbours": [{"dev": "flannel.1", "dst": "%s.0" % other, "lladdr": other_mac, "state": "permanent"}],
            "fdb": [{"dev": "flannel.1", "mac": other_mac, "dst": other_ip, "state": "permanent", "self_entry": True}],
            "sysctls": {"ip_forward": 1, "rp_filter": {"all": 0}},
            "iptables_save": "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n"
                             "-A KUBE-SEP-X -p tcp -m comment --comment default/web -m tcp -j DNAT "
                             "--to-destination %s:8080\nCOMMIT\n" % C}


def pod(name, ip, node):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                            "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "m"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def world(ready=True):
    view = ClusterView(pods=[pod("a", A, "node1"), pod("b", B, "node1"), pod("c", C, "node2")],
                       namespaces=[{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}],
                       services=[k8s.service("web", "10.96.0.20", [{"port": 80, "targetPort": 8080}])],
                       slices=[k8s.endpoint_slice("web", [(C, "node2", {"ready": ready})], [{"port": 8080}])],
                       leases=[FlannelLease("10.244.1.0/24", NODE1, "vxlan", MAC1),
                               FlannelLease("10.244.2.0/24", NODE2, "vxlan", MAC2)])
    snaps = {"node1": node_snapshot("10.244.1", "10.244.2", NODE1, NODE2, MAC2, ["a", "b"]),
             "node2": node_snapshot("10.244.2", "10.244.1", NODE2, NODE1, MAC1, ["c"])}
    return view, snaps


def run(view, snaps, src="default/a", dst="default/c:8080"):
    states = {n: NodeState(n, Snapshot.from_dict(s)) for n, s in snaps.items()}
    return walk(view, states, src, dst, "node1")


def test_split_destination():
    assert split_destination("svc/default/web:80/udp") == ("svc/default/web", "80", "UDP")
    assert split_destination("10.0.0.1:53") == ("10.0.0.1", "53", "TCP")
    assert split_destination("[fd00::1]:80/tcp") == ("fd00::1", "80", "TCP")
    assert split_destination("default/c") == ("default/c", "", "TCP")


def test_route_lookup_longest_prefix():
    snap = Snapshot.from_dict(node_snapshot("10.244.1", "10.244.2", NODE1, NODE2, MAC2, []))
    assert route_lookup(snap, C).dev == "flannel.1"
    assert route_lookup(snap, A).dev == "cni0"
    assert route_lookup(snap, "8.8.8.8") is None


def test_no_fault_delivered_across_nodes_same_node_and_service():
    view, snaps = world()
    for dst in ("default/c:8080", "default/b:8080", "svc/default/web:80"):
        trace = run(view, snaps, dst=dst)
        assert trace.verdict == "delivered", trace.lines()
        assert trace.failed is None
    steps = [h.step for h in run(view, snaps).hops]
    assert steps == ["source", "interface", "egress-policy", "rp_filter", "route", "neighbour", "fdb", "mtu",
                     "forward", "rp_filter", "interface", "forward", "ingress-policy", "destination"]


def test_each_datapath_fault_is_named():
    view, snaps = world()
    cases = {
        "neighbour": lambda s: s["node1"].update(neighbours=[]),
        "fdb": lambda s: s["node1"].update(fdb=[]),
        "route": lambda s: s["node1"]["routes"].pop(2),
        "mtu": lambda s: s["node1"]["links"][2].update(mtu=1000),
        "forward": lambda s: s["node1"].update(iptables_save="*filter\n:FORWARD DROP [0:0]\nCOMMIT\n"),
    }
    for step, fault in cases.items():
        broken = copy.deepcopy(snaps)
        fault(broken)
        hop = run(view, broken).failed
        assert hop is not None and hop.step == step, (step, run(view, broken).lines())
        if step in ("neighbour", "fdb", "route"):
            assert hop.object == "flannel lease 10.244.2.0/24 (node %s)" % NODE2
    broken = copy.deepcopy(snaps)
    broken["node2"]["sysctls"]["rp_filter"] = {"all": 1}
    broken["node2"]["routes"].append({"family": 2, "table": 254, "type": "unicast", "protocol": 4,
                                      "dst": A + "/32", "dev": "eth0"})
    hop = run(view, broken).failed
    assert (hop.step, hop.node) == ("rp_filter", "node2") and "flannel.1" in hop.what


def test_service_faults_are_named():
    view, snaps = world(ready=False)
    hop = run(view, snaps, dst="svc/default/web:80").failed
    assert hop.step == "service" and "no ready endpoints" in hop.what and hop.object.startswith("Service default/web")
    view, snaps = world()
    view.slices = [k8s.endpoint_slice("web", [(B, "node1")], [{"port": 8080}])]
    hop = run(view, snaps, dst="svc/default/web:80").failed
    assert hop.step == "kube-proxy-rules" and C + ":8080" in hop.what and "KUBE-SEP-X" in hop.rule


def test_policies_are_named():
    view, snaps = world()
    view.policies = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                      "metadata": {"name": "deny", "namespace": "default"},
                      "spec": {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Ingress"]}}]
    hop = run(view, snaps).failed
    assert (hop.step, hop.object) == ("ingress-policy", "NetworkPolicy default/deny")
    view.policies[0]["spec"] = {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]}
    hop = run(view, snaps).failed
    assert (hop.step, hop.object) == ("egress-policy", "NetworkPolicy default/deny")


def test_forward_verdict_follows_jumps():
    saved = ("*filter\n:FORWARD DROP [0:0]\n:FLANNEL-FWD - [0:0]\n-A FORWARD -m comment --comment x -j FLANNEL-FWD\n"
             "-A FLANNEL-FWD -s 10.244.0.0/16 -j ACCEPT\nCOMMIT\n")
    assert forward_verdict(saved, A, C, "cni0", "flannel.1", "TCP", 80)[0] == "ACCEPT"
    assert forward_verdict(saved, "10.9.0.1", "10.9.0.2", "eth0", "eth1", "TCP", 80) == (
        "DROP", "policy DROP of FORWARD")


def test_live_parsing():
    text = ("trace id 1 inet podnet-trace-7 pre packet: iif \"veth0\" ip saddr 10.244.1.2\n"
            "trace id 1 inet podnet-trace-7 pre rule ip saddr 10.244.1.2 meta nftrace set 1 (verdict continue)\n"
            "trace id 1 inet podnet-network-policy forward-egress rule drop (verdict drop)\n")
    events = live.parse_events(text)
    assert len(events) == 2
    assert live.last_verdict(events, "podnet-trace-7")["table"] == "podnet-network-policy"
    assert "meta nftrace set 1" in live.marking_rules(A, C, "TCP", 80)
    assert live.agrees("delivered", "refused") and not live.agrees("delivered", "timeout")
    assert live.agrees("dropped", "timeout")


DEFAULT_RULES = [{"family": 2, "priority": 0, "table": 255}, {"family": 2, "priority": 32766, "table": 254},
                 {"family": 2, "priority": 32767, "table": 253}]


def test_ip_rules_are_followed():
    """A rule sending the pods' traffic to another table decides the route; a `throw` there (or a
    table without a match) goes on to the next rule; without rules in the snapshot: the main table."""
    view, snaps = world()
    snaps["node1"]["rules"] = list(DEFAULT_RULES)
    assert run(view, snaps).verdict == "delivered"
    diverting = {"family": 2, "priority": 100, "table": 100, "src": "10.244.1.0/24"}
    snaps["node1"]["rules"].insert(1, diverting)
    snaps["node1"]["routes"].append({"family": 2, "table": 100, "type": "unreachable", "protocol": 4,
                                     "dst": "0.0.0.0/0"})
    trace = run(view, snaps)
    hop = trace.failed
    assert hop.step == "route" and hop.node == "node1", trace.lines()
    assert "100: from 10.244.1.0/24 lookup 100" in hop.rule and "table 100" in hop.what, hop
    # the same rule for another source selects nothing
    snaps["node1"]["rules"][1] = dict(diverting, src="10.99.0.0/16")
    assert run(view, snaps).verdict == "delivered"
    # a throw route in the rule's table: the lookup goes on to main
    snaps["node1"]["rules"][1] = diverting
    snaps["node1"]["routes"][-1] = {"family": 2, "table": 100, "type": "throw", "protocol": 4, "dst": "10.244.0.0/16"}
    assert run(view, snaps).verdict == "delivered"
    # a rule's own action
    snaps["node1"]["rules"][1] = dict(diverting, action="prohibit")
    assert run(view, snaps).failed.step == "route"
    # `not from` (invert) and iif selectors
    snaps["node1"]["rules"][1] = dict(diverting, invert=True, action="prohibit")
    assert run(view, snaps).verdict == "delivered"
    snaps["node1"]["rules"][1] = dict(diverting, iif="cni0", action="prohibit")
    assert run(view, snaps).failed.step == "route"
    snaps["node1"]["rules"][1] = dict(diverting, iif="eth0", action="prohibit")
    assert run(view, snaps).verdict == "delivered"


def test_rule_text():
    from diagnose.snapshot import RuleState
    assert RuleState(2, 100, 100, src="10.244.1.0/24", iif="cni0").text() == "100: from 10.244.1.0/24 iif cni0 lookup 100"
    assert RuleState(2, 5, 0, action="prohibit", invert=True, fwmark=1, fwmask=0xff).text() == \
        "5: not from all fwmark 0x1/0xff prohibit"


def test_another_firewalls_forward_drop_chain_is_a_warning():
    view, snaps = world()
    snaps["node1"]["nft_ruleset"] = [{"chain": {"family": "inet", "table": "firewall", "name": "forward",
                                                "hook": "forward", "policy": "drop"}}]
    trace = run(view, snaps)
    assert trace.verdict == "delivered"
    assert [h.what for h in trace.hops if h.status == "warn" and "inet firewall forward" in h.what]


def test_policy_drop_names_the_output_chain_where_ipvs_forwarded():
    """IPVS sends what it forwards out through the output hook: the deny is in output-<direction>."""
    from diagnose.trace import Trace, _policy_hop

    class Denied:
        allowed, denied_by, reason = False, "egress", "egress of default/a is isolated by deny"
        egress_by = ingress_by = None
        isolated_by = (("default", "deny"),)

    class Model:
        def verdict(self, *args):
            return Denied()
    for ipvs_node, chain in (("", "forward-egress"), ("node1", "output-egress"), ("node2", "forward-egress")):
        trace = Trace("a", "b", "TCP", 80, ipvs_node=ipvs_node)
        assert not _policy_hop(trace, Model(), ClusterView(), "node1", "egress", A, C, 80)
        hop = trace.failed
        assert hop.rule == "table inet podnet-network-policy chain %s" % chain and \
            hop.object == "NetworkPolicy default/deny"


def flannel_node(name, cidr, public_ip, mac):
    prefix = "flannel.alpha.coreos.com/"
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "annotations": {
        prefix + "kube-subnet-manager": "true", prefix + "public-ip": public_ip, prefix + "backend-type": "vxlan",
        prefix + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % mac}}, "spec": {"podCIDR": cidr}}


def test_leases_from_node_annotations_kube_subnet_manager():
    """flanneld --kube-subnet-mgr keeps no etcd: the trace takes the leases from the Nodes."""
    from diagnose.trace import flannel_leases
    view, snaps = world()
    nodes = [flannel_node("node1", "10.244.1.0/24", NODE1, MAC1), flannel_node("node2", "10.244.2.0/24", NODE2, MAC2),
             {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "not-flannels"}}]
    assert flannel_leases(nodes) == view.leases
    view.leases = flannel_leases(nodes)
    trace = run(view, snaps)
    assert trace.verdict == "delivered" and "fdb" in [h.step for h in trace.hops]
    snaps["node1"]["fdb"] = []
    hop = run(view, snaps).failed
    assert hop.step == "fdb" and hop.object == "flannel lease 10.244.2.0/24 (node %s)" % NODE2
