"""`podnet doctor`'s checks on snapshots written as data (no root, no kernel)."""
import json

from diagnose import doctor
from diagnose.doctor import FlannelView, NodeInputs, diagnose
from diagnose.snapshot import Snapshot
from flanneld.subnet import Lease
from kube_proxy.iptables import endpoint_chain, service_chain
from kube_proxy.model import Endpoint, ServicePortName
from lab import manifests as k8s
from podnet.net.ip import parse_cidr, parse_ip

MAC1, MAC2 = "aa:00:00:00:00:01", "aa:00:00:00:00:02"
NET = "10.244.0.0/16"


def lease(subnet, ip, mac):
    return Lease(parse_cidr(subnet).masked(), parse_ip(ip), "vxlan", {"VNI": 1, "VtepMAC": mac})


LEASES = [lease("10.244.1.0/24", "192.168.50.1", MAC1), lease("10.244.2.0/24", "192.168.50.2", MAC2)]


def healthy(**over):
    data = {
        "links": [
            {"index": 1, "name": "lo", "kind": "", "mtu": 65536, "mac": "", "up": True, "operstate": "unknown"},
            {"index": 2, "name": "eth0", "kind": "veth", "mtu": 1500, "mac": "", "up": True, "operstate": "up"},
            {"index": 3, "name": "flannel.1", "kind": "vxlan", "mtu": 1450, "mac": MAC1, "up": True,
             "operstate": "unknown", "vxlan_vni": 1, "vxlan_dev": "eth0", "vxlan_local": "192.168.50.1"},
            {"index": 4, "name": "cni0", "kind": "bridge", "mtu": 1450, "mac": "", "up": True, "operstate": "up"},
            {"index": 5, "name": "veth1", "kind": "veth", "mtu": 1450, "mac": "", "up": True, "operstate": "up",
             "master": "cni0"},
        ],
        "addrs": [{"dev": "eth0", "cidr": "192.168.50.1/24", "family": 2}],
        "routes": [{"family": 2, "dst": "10.244.2.0/24", "table": 254, "type": "unicast", "protocol": 77,
                    "gateway": "10.244.2.0", "dev": "flannel.1", "onlink": True},
                   {"family": 2, "dst": "10.244.1.0/24", "table": 254, "type": "unicast", "protocol": 2,
                    "dev": "cni0"}],
        "neighbours": [{"dev": "flannel.1", "dst": "10.244.2.0", "lladdr": MAC2, "state": "permanent"}],
        "fdb": [{"dev": "flannel.1", "mac": MAC2, "dst": "192.168.50.2", "state": "permanent", "self_entry": True}],
        "sysctls": {"ip_forward": 1, "rp_filter": {"all": 0, "flannel.1": 0}, "bridge_nf_call_iptables": 1,
                    "conntrack_count": 10, "conntrack_max": 1000},
        "iptables_save": "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n",
    }
    data.update(over)
    return data


def run(data=None, objects=None, node="node1", kube_mode=False):
    snap = Snapshot.from_dict(json.loads(json.dumps(data or healthy())))
    view = FlannelView(network=NET, subnet="10.244.1.1/24", mtu=1450, leases=list(LEASES))
    return diagnose(NodeInputs(snapshot=snap, node_name=node, flannel=view, objects=objects, kube_mode=kube_mode))


def codes(findings, severities=("error", "warning")):
    return sorted(f.code for f in findings if f.severity in severities)


def test_healthy_snapshot_has_no_findings():
    assert run() == []
    assert doctor.render_text([]).startswith("no findings")


def test_snapshot_round_trips_as_data():
    snap = Snapshot.from_dict(healthy())
    assert Snapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap


def test_missing_fdb_route_neighbour_each_name_the_lease():
    for part, code in (("fdb", "flannel-fdb-missing"), ("neighbours", "flannel-neighbour-missing")):
        found = run(healthy(**{part: []}))
        assert codes(found) == [code]
        assert found[0].object == "flannel lease 10.244.2.0/24 (node 192.168.50.2)"
    found = run(healthy(routes=healthy()["routes"][1:]))
    assert codes(found) == ["flannel-route-missing"]
    assert "ip route replace 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink" in found[0].fix


def test_foreign_fdb_entry_is_a_warning():
    data = healthy()
    data["fdb"].append({"dev": "flannel.1", "mac": "aa:00:00:00:00:09", "dst": "192.168.50.9",
                        "state": "permanent", "self_entry": True})
    assert codes(run(data)) == ["flannel-fdb-foreign"]


def test_sysctls():
    assert codes(run(healthy(sysctls={"ip_forward": 0, "bridge_nf_call_iptables": 1}))) == ["ip-forward-off"]
    assert codes(run(healthy(sysctls={"ip_forward": 1, "bridge_nf_call_iptables": 0}))) == ["br-netfilter-off"]
    strict = run(healthy(sysctls={"ip_forward": 1, "bridge_nf_call_iptables": 1,
                                  "rp_filter": {"all": 1, "eth0": 0, "flannel.1": 0}}))
    assert {f.object for f in strict if f.code == "rp-filter-strict"} == {"flannel.1", "cni0", "veth1"}
    full = run(healthy(sysctls={"ip_forward": 1, "bridge_nf_call_iptables": 1, "conntrack_count": 950,
                                "conntrack_max": 1000}))
    assert codes(full) == ["conntrack-nearly-full"]


def test_forward_drop_needs_an_allow_rule():
    drop = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:FLANNEL-FWD - [0:0]\n-A FORWARD -j FLANNEL-FWD\n"
    assert codes(run(healthy(iptables_save=drop + "COMMIT\n"))) == ["forward-drop"]
    allowed = drop + "-A FLANNEL-FWD -s 10.244.0.0/16 -j ACCEPT\nCOMMIT\n"
    assert run(healthy(iptables_save=allowed)) == []
    only_established = drop + "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n"
    assert codes(run(healthy(iptables_save=only_established))) == ["forward-drop"]


def test_both_iptables_backends():
    rules = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"
    other = "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n"
    assert codes(run(healthy(iptables_save=rules, iptables_legacy_save=other))) == ["iptables-both-backends"]


def test_mtu():
    data = healthy()
    data["links"][1]["mtu"] = 1400
    assert codes(run(data)) == ["mtu-encap-too-big"]
    data = healthy()
    data["links"][4]["mtu"] = 1500
    found = run(data)
    assert codes(found) == ["mtu-pod-too-big"] and found[0].object == "veth1"


def test_xtables_lock_held_long():
    found = run(healthy(xtables_lock_holders=[[42, "iptables", 120.0], [43, "iptables", 0.2]]))
    assert codes(found) == ["xtables-lock-held"] and "pid 42" in found[0].what


def test_node_without_pod_cidr():
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}, "spec": {}}
    found = run(objects={"Node": [node]}, kube_mode=True)
    assert codes(found) == ["node-no-podcidr"] and found[0].object == "Node node1"
    node["spec"]["podCIDR"] = "10.244.1.0/24"
    assert run(objects={"Node": [node]}, kube_mode=True) == []


def nat(*lines):
    return "*nat\n:KUBE-SERVICES - [0:0]\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


SPN = ServicePortName("default", "web", "http", "TCP")
EP1, EP2 = Endpoint("10.244.1.5", 8080), Endpoint("10.244.2.5", 8080)


def service_rules(*eps):
    svc = service_chain(SPN)
    lines = [":%s - [0:0]" % svc]
    for ep in eps:
        sep = endpoint_chain(SPN, ep)
        lines += [":%s - [0:0]" % sep, "-A %s -j %s" % (svc, sep),
                  "-A %s -p tcp -m tcp -j DNAT --to-destination %s" % (sep, ep.addr)]
    return nat(*lines)


def web(endpoints):
    return {"Service": [k8s.service("web", "10.96.0.10", [{"name": "http", "port": 80, "targetPort": 8080}])],
            "EndpointSlice": [k8s.endpoint_slice("web", endpoints, [{"name": "http", "port": 8080}])]}


def test_kube_proxy_rules_against_endpoint_slices():
    both = web([("10.244.1.5", "node1"), ("10.244.2.5", "node2")])
    assert run(healthy(iptables_save=service_rules(EP1, EP2)), objects=both) == []
    stale = run(healthy(iptables_save=service_rules(EP1, EP2)), objects=web([("10.244.1.5", "node1")]))
    assert codes(stale) == ["kube-proxy-stale-endpoint"] and "10.244.2.5:8080" in stale[0].what
    assert stale[0].object == "Service default/web port http"
    missing = run(healthy(iptables_save=service_rules(EP1)), objects=both)
    assert codes(missing) == ["kube-proxy-endpoint-missing"]
    none_ready = run(healthy(iptables_save=service_rules()), objects=web([("10.244.1.5", "node1", {"ready": False})]))
    assert "service-no-ready-endpoints" in codes(none_ready)


def test_external_traffic_policy_local_without_local_endpoints():
    objects = {"Service": [k8s.service("loc", "10.96.0.20", [{"name": "http", "port": 80, "targetPort": 8080,
                                                              "nodePort": 30080}], type="NodePort",
                                       external_traffic_policy="Local", health_check_node_port=30081)],
               "EndpointSlice": [k8s.endpoint_slice("loc", [("10.244.2.5", "node2")],
                                                    [{"name": "http", "port": 8080}])]}
    found = run(objects=objects)
    assert codes(found) == ["service-no-local-endpoints"]


def test_network_policy_isolation_is_information():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "default",
                                                           "labels": {"app": "a"}},
           "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
           "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}}
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "deny", "namespace": "default"},
              "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]}}
    found = run(objects={"Pod": [pod], "NetworkPolicy": [policy]})
    info = [f for f in found if f.code == "pod-isolated-egress"]
    assert len(info) == 1 and "default/a" in info[0].what and "deny" in info[0].what
    assert codes(found) == ["network-policy-table-missing"]


def test_a_failing_check_does_not_stop_the_others(monkeypatch):
    def broken(inp):
        raise RuntimeError("boom")
    monkeypatch.setattr(doctor, "CHECKS", (broken, doctor.check_sysctls))
    found = run(healthy(sysctls={"ip_forward": 0, "bridge_nf_call_iptables": 1}))
    assert codes(found) == ["check-failed", "ip-forward-off"]


def test_json_output_counts_errors():
    out = json.loads(doctor.render_json(run(healthy(sysctls={"ip_forward": 0, "bridge_nf_call_iptables": 1}))))
    assert out["errors"] == 1 and out["findings"][0]["fix"] == "sysctl -w net.ipv4.ip_forward=1"


def test_calico_routes_against_the_datastore():
    from calico_lite.datastore import ClusterConfig, Node
    from calico_lite.datastore import Snapshot as Store
    store = Store(ClusterConfig(ipip_mode="never", pool="10.65.0.0/16", block_size=26),
                  {"node1": Node("node1", "192.168.50.1/24"), "node2": Node("node2", "192.168.50.2/24")},
                  {parse_cidr("10.65.0.0/26"): "node1", parse_cidr("10.65.0.64/26"): "node2"})
    routes = [{"family": 2, "dst": "10.65.0.0/26", "table": 254, "type": "blackhole", "protocol": 78},
              {"family": 2, "dst": "10.65.0.64/26", "table": 254, "type": "unicast", "protocol": 78,
               "gateway": "192.168.50.2", "dev": "eth0"}]
    data = healthy(routes=routes, links=healthy()["links"][:2])
    snap = Snapshot.from_dict(data)

    def found(snapshot):
        return diagnose(NodeInputs(snapshot=snapshot, node_name="node1", calico=store))
    assert found(snap) == []
    missing = found(Snapshot.from_dict(dict(data, routes=routes[:1])))
    assert codes(missing) == ["calico-route-missing"]
    assert missing[0].object == "block 10.65.0.64/26 of node node2 (BGP next hop 192.168.50.2)"


RULES = [{"family": 2, "priority": 0, "table": 255}, {"family": 2, "priority": 32766, "table": 254},
         {"family": 2, "priority": 32767, "table": 253}]


def test_policy_routing_diverting_pod_traffic():
    assert codes(run(healthy(rules=RULES))) == []
    data = healthy(rules=RULES[:1] + [{"family": 2, "priority": 100, "table": 100, "src": "10.244.1.0/24"}]
                   + RULES[1:])
    data["routes"].append({"family": 2, "dst": "0.0.0.0/0", "table": 100, "type": "unicast", "protocol": 4,
                           "gateway": "192.168.50.254", "dev": "eth0"})
    (finding,) = [f for f in run(data) if f.code == "policy-routing-diverts-pods"]
    assert "100: from 10.244.1.0/24 lookup 100" in finding.what and "table 100" in finding.what
    assert finding.object == "flannel lease 10.244.2.0/24 (node 192.168.50.2)"
    assert finding.fix.startswith("ip rule del priority 100")
    # the same table holding the overlay's route: nothing diverted
    data["routes"].append(dict(data["routes"][0], table=100))
    assert "policy-routing-diverts-pods" not in codes(run(data))


def test_egress_isolation_without_dns_is_a_warning():
    def pod(name, ns, ip, labels):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
    pods = [pod("a", "default", "10.244.1.5", {"app": "a"}), pod("dns", "kube-system", "10.244.2.9", {"k8s": "dns"})]
    namespaces = [{"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": n, "labels": {"kubernetes.io/metadata.name": n}}}
                  for n in ("default", "kube-system")]
    dns = k8s.endpoint_slice("kube-dns", [("10.244.2.9", "node2")], [{"name": "dns", "port": 53, "protocol": "UDP"}],
                             namespace="kube-system")
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-out", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]}}
    objects = {"Pod": pods, "Namespace": namespaces, "EndpointSlice": [dns], "NetworkPolicy": [deny]}
    (finding,) = [f for f in run(objects=objects) if f.code == "pod-egress-blocks-dns"]
    assert finding.object == "NetworkPolicy default/deny-out" and "10.244.2.9:53" in finding.what
    assert "Pod default/a" in finding.what and "port 53" in finding.fix
    allow_dns = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "allow-dns", "namespace": "default"},
                 "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                          "egress": [{"to": [{"namespaceSelector": {"matchLabels": {
                              "kubernetes.io/metadata.name": "kube-system"}}}],
                              "ports": [{"protocol": "UDP", "port": 53}]}]}}
    objects["NetworkPolicy"] = [deny, allow_dns]
    assert "pod-egress-blocks-dns" not in codes(run(objects=objects))


def test_another_firewalls_forward_drop_chain():
    chain = {"chain": {"family": "inet", "table": "firewall", "name": "forward", "type": "filter",
                       "hook": "forward", "prio": 0, "policy": "drop"}}
    iptables_own = {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "type": "filter",
                              "hook": "forward", "prio": 0, "policy": "drop"}}
    (finding,) = [f for f in run(healthy(nft_ruleset=[chain, iptables_own])) if f.code == "nft-forward-drop"]
    assert "inet firewall forward" in finding.what and finding.severity == "warning"


def test_flannel_view_from_node_annotations(tmp_path):
    """flanneld --kube-subnet-mgr: no etcd; doctor takes the leases (and the VNI) from the Nodes."""
    from test_trace_unit import flannel_node
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n")
    nodes = [flannel_node("node1", "10.244.1.0/24", "192.168.50.1", MAC1),
             flannel_node("node2", "10.244.2.0/24", "192.168.50.2", MAC2)]
    view = doctor.flannel_view(str(env), None, nodes=nodes)
    assert sorted(str(l.subnet) for l in view.leases) == ["10.244.1.0/24", "10.244.2.0/24"]
    assert (view.backend_type, view.vni, view.mtu) == ("vxlan", 1, 1450)
    snap = Snapshot.from_dict(json.loads(json.dumps(healthy(fdb=[]))))
    found = diagnose(NodeInputs(snapshot=snap, node_name="node1", flannel=view))
    assert codes(found) == ["flannel-fdb-missing"]
