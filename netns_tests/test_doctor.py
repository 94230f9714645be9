"""`podnet doctor` on a real two-node flannel (vxlan) lab, faults injected one at a time (issue 16).

One cluster for the module: two nodes, a pod on each, `podnet kube-proxy --manifests DIR`
on node1 (the manifests directory stands in for an API server: none can run here).
Doctor runs inside node1 as an operator would (`podnet doctor` in the node's namespace)
against etcd's leases, the node's subnet.env and the same manifests. flanneld and
kube-proxy on node1 are stopped once the datapath is up (their rules and routes stay,
as on a node whose daemons died), so a fault stays put until the test repairs it, and
the repair is the very command the finding prints.
"""
import json
import os
import shlex

import pytest

from lab import manifests as k8s
from lab.cluster import Cluster, Lab

from helpers import wait_until

SVC_IP = "10.96.0.10"
HTTP = {"name": "http", "port": 80, "targetPort": 8080}
HTTP_EP = {"name": "http", "port": 8080}


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    with Lab() as lab:
        cluster = Cluster(lab, nodes=2).start()
        e = Env()
        e.lab, e.cluster = lab, cluster
        e.node1, e.node2 = cluster.nodes
        e.pod1 = cluster.add_pod(e.node1, "a")
        e.pod2 = cluster.add_pod(e.node2, "b")
        e.manifests = os.path.join(lab.workdir, "manifests")
        k8s.write(e.manifests, "web.json", k8s.service("web", SVC_IP, [HTTP]),
                  k8s.endpoint_slice("web", [(e.pod1.ip, e.node1.role), (e.pod2.ip, e.node2.role)], [HTTP_EP]))
        cluster.start_kube_proxy(e.node1, e.manifests)
        wait_until(lambda: "KUBE-SVC-" in e.node1.run(["iptables-save", "-t", "nat"]).stdout, 30,
                   "kube-proxy's rules on node1")
        wait_until(lambda: e.pod1.ns.run(["ping", "-c1", "-W1", e.pod2.ip], check=False).returncode == 0, 30,
                   "pod a to reach pod b")
        cluster.stop_kube_proxy(e.node1)
        cluster.stop_flanneld(e.node1)
        yield e


def doctor(e, *extra):
    argv = [e.cluster.python, "-m", "cli.main", "doctor", "--json", "--hostname-override", e.node1.role,
            "--subnet-file", e.cluster.subnet_file(e.node1), "--etcd-endpoints", e.cluster.etcd_url,
            "--manifests", e.manifests] + list(extra)
    out = e.node1.run(argv, check=False, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    assert (out.returncode == 1) == (report["errors"] > 0)
    return [f for f in report["findings"] if f["severity"] != "info" or f["code"].startswith("pod-isolated")]


def codes(findings):
    return sorted(f["code"] for f in findings)


def only(findings, code):
    """The one finding there is, which must be `code`."""
    assert codes(findings) == [code], findings
    return findings[0]


def fix(e, finding):
    e.node1.run(shlex.split(finding["fix"].split(" (")[0]))


def test_healthy_node_has_no_findings(env):
    assert doctor(env) == []


def test_deleted_fdb_entry(env):
    fdb = json.loads(env.node1.run(["bridge", "-j", "fdb", "show", "dev", "flannel.1"]).stdout)
    entry = next(f for f in fdb if f.get("dst") == env.node2.underlay_ip)
    env.node1.run(["bridge", "fdb", "del", entry["mac"], "dev", "flannel.1", "dst", entry["dst"], "self"])
    finding = only(doctor(env), "flannel-fdb-missing")
    assert env.node2.underlay_ip in finding["object"] and finding["severity"] == "error"
    fix(env, finding)
    assert doctor(env) == []


def test_deleted_route(env):
    subnet = [r for r in env.node1.ip_json("route", "show", "dev", "flannel.1") if r.get("gateway")][0]
    env.node1.ip("route", "del", subnet["dst"], "dev", "flannel.1")
    finding = only(doctor(env), "flannel-route-missing")
    assert subnet["dst"] in finding["object"]
    fix(env, finding)
    assert doctor(env) == []


def test_missing_neighbour(env):
    neigh = [n for n in env.node1.ip_json("neigh", "show", "dev", "flannel.1") if "PERMANENT" in n.get("state", [])][0]
    env.node1.ip("neigh", "del", neigh["dst"], "dev", "flannel.1")
    finding = only(doctor(env), "flannel-neighbour-missing")
    assert env.node2.underlay_ip in finding["object"]
    fix(env, finding)
    assert doctor(env) == []


def test_rp_filter_strict(env):
    env.node1.sysctl("net.ipv4.conf.flannel/1.rp_filter", "1")
    try:
        finding = only(doctor(env), "rp-filter-strict")
        assert finding["object"] == "flannel.1"
    finally:
        env.node1.sysctl("net.ipv4.conf.flannel/1.rp_filter", "0")


def test_forward_policy_drop(env):
    saved = env.node1.run(["iptables-save", "-t", "filter"]).stdout
    env.node1.run(["iptables", "-P", "FORWARD", "DROP"])
    env.node1.run(["iptables", "-F", "FLANNEL-FWD"])
    try:
        finding = only(doctor(env), "forward-drop")
        assert env.cluster.network in finding["what"]
    finally:
        env.node1.run(["iptables-restore"], input=saved)
    assert doctor(env) == []


def test_mtu_too_small_on_the_underlay(env):
    dev = env.node1.underlay_if
    env.node1.ip("link", "set", dev, "mtu", "1400")
    try:
        finding = only(doctor(env), "mtu-encap-too-big")
        assert finding["object"] == "flannel.1" and dev in finding["what"]
    finally:
        env.node1.ip("link", "set", dev, "mtu", "1500")


def test_ip_forward_off(env):
    env.node1.sysctl("net.ipv4.ip_forward", "0")
    try:
        only(doctor(env), "ip-forward-off")
    finally:
        env.node1.sysctl("net.ipv4.ip_forward", "1")


def test_br_netfilter_off(env):
    env.node1.sysctl("net.bridge.bridge-nf-call-iptables", "0")
    try:
        assert "cni0" in only(doctor(env), "br-netfilter-off")["what"]
    finally:
        env.node1.sysctl("net.bridge.bridge-nf-call-iptables", "1")


def test_service_faults_and_stale_endpoint(env):
    e = env
    # the EndpointSlice loses pod b while kube-proxy is down: its rules still send there
    k8s.write(e.manifests, "web.json", k8s.service("web", SVC_IP, [HTTP]),
              k8s.endpoint_slice("web", [(e.pod1.ip, e.node1.role)], [HTTP_EP]))
    try:
        finding = only(doctor(e), "kube-proxy-stale-endpoint")
        assert e.pod2.ip in finding["what"] and finding["object"] == "Service default/web port http"
        # no ready endpoint at all (and the rules are stale for both then)
        k8s.write(e.manifests, "web.json", k8s.service("web", SVC_IP, [HTTP]),
                  k8s.endpoint_slice("web", [(e.pod1.ip, e.node1.role, {"ready": False})], [HTTP_EP]))
        found = doctor(e)
        assert "service-no-ready-endpoints" in codes(found)
    finally:
        k8s.write(e.manifests, "web.json", k8s.service("web", SVC_IP, [HTTP]),
                  k8s.endpoint_slice("web", [(e.pod1.ip, e.node1.role), (e.pod2.ip, e.node2.role)], [HTTP_EP]))
    assert doctor(e) == []


def test_external_traffic_policy_local_without_local_endpoints(env):
    e = env
    port = dict(HTTP, nodePort=30080)
    k8s.write(e.manifests, "local.json",
              k8s.service("local", "10.96.0.20", [port], type="NodePort", external_traffic_policy="Local",
                          health_check_node_port=30081),
              k8s.endpoint_slice("local", [(e.pod2.ip, e.node2.role)], [HTTP_EP]))
    try:
        found = [f for f in doctor(e) if f["code"].startswith("service-")]
        finding = only(found, "service-no-local-endpoints")
        assert finding["object"] == "Service default/local port http"
    finally:
        k8s.remove(e.manifests, "local.json")


def test_network_policy_denying_ingress_is_reported(env):
    e = env
    pods = [e.cluster.pod_manifest(e.pod1, labels={"app": "a"}), e.cluster.pod_manifest(e.pod2, labels={"app": "b"})]
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "deny-a", "namespace": "default"},
              "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"]}}
    k8s.write(e.manifests, "netpol.json", *(pods + [policy]))
    try:
        found = doctor(e)
        isolated = [f for f in found if f["code"] == "pod-isolated-ingress"]
        assert len(isolated) == 1 and "default/a" in isolated[0]["what"] and "deny-a" in isolated[0]["what"]
        # no agent runs here: the table is missing, so the policy is not enforced
        assert "network-policy-table-missing" in codes(found)
    finally:
        k8s.remove(e.manifests, "netpol.json")



def test_network_policy_denying_egress_is_reported(env):
    e = env
    pods = [e.cluster.pod_manifest(e.pod1, labels={"app": "a"}), e.cluster.pod_manifest(e.pod2, labels={"app": "b"})]
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "deny-a-out", "namespace": "default"},
              "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]}}
    # the cluster DNS runs as pod b: an egress deny-all without a DNS rule cuts a's name lookups
    dns = k8s.endpoint_slice("kube-dns", [(e.pod2.ip, e.node2.role)], [{"name": "dns", "port": 53, "protocol": "UDP"}],
                             namespace="kube-system")
    k8s.write(e.manifests, "netpol.json", *(pods + [policy, dns]))
    try:
        found = doctor(e)
        isolated = [f for f in found if f["code"] == "pod-isolated-egress"]
        assert len(isolated) == 1 and "default/a" in isolated[0]["what"] and "deny-a-out" in isolated[0]["what"]
        (blocked,) = [f for f in found if f["code"] == "pod-egress-blocks-dns"]
        assert blocked["object"] == "NetworkPolicy default/deny-a-out" and "%s:53" % e.pod2.ip in blocked["what"]
    finally:
        k8s.remove(e.manifests, "netpol.json")


def test_policy_routing_diverting_pod_traffic(env):
    e = env
    e.node1.ip("route", "add", "unreachable", "default", "table", "100")
    e.node1.ip("rule", "add", "from", e.cluster.subnet_env(e.node1)["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0/24",
               "lookup", "100", "priority", "100")
    try:
        finding = only(doctor(e), "policy-routing-diverts-pods")
        assert "100: from" in finding["what"] and env.node2.underlay_ip in finding["object"]
        fix(e, finding)
        assert doctor(e) == []
    finally:
        e.node1.run(["ip", "rule", "del", "priority", "100"], check=False)
        e.node1.ip("route", "flush", "table", "100")


# ---- calico_lite: two nodes and a route reflector, BGP-learned routes against the datastore ----

def test_calico_deleted_route_and_bgp_session_down(lab):
    import signal

    from lab.cluster import CalicoCluster
    cluster = CalicoCluster(lab, nodes=2, graceful_restart_time=1).start()
    node1, node2 = cluster.workers()

    def calico_doctor():
        argv = [cluster.python, "-m", "cli.main", "doctor", "--json", "--hostname-override", node1.role,
                "--calico-etcd-endpoints", cluster.etcd_url]
        out = node1.run(argv, check=False, env=dict(os.environ, PYTHONPATH=os.getcwd()))
        assert out.returncode in (0, 1), out.stderr
        return [f for f in json.loads(out.stdout)["findings"] if f["severity"] != "info"]

    assert calico_doctor() == []
    # FORWARD policy DROP: nothing of calico_lite's accepts pod traffic in filter FORWARD
    node1.run(["iptables", "-P", "FORWARD", "DROP"])
    try:
        finding = only(calico_doctor(), "forward-drop")
        assert "policy is DROP" in finding["what"]
    finally:
        node1.run(["iptables", "-P", "FORWARD", "ACCEPT"])
    (route,) = cluster.routes_via_bgp(node1)
    # the agent stopped (its routes stay), then a route deleted by hand
    cluster.stop_agent(node1)
    node1.ip("route", "del", route["dst"], "proto", "78")
    finding = only(calico_doctor(), "calico-route-missing")
    assert finding["object"].startswith("block %s of node %s" % (route["dst"], node2.role))
    cluster.start_agent(node1)
    wait_until(lambda: cluster.routes_via_bgp(node1), 30, "the agent to put the route back")
    assert calico_doctor() == []
    # node2's BGP speaker dies: the reflector withdraws its block, node1's agent removes the route
    cluster.stop_agent(node2, sig=signal.SIGKILL)
    wait_until(lambda: not cluster.routes_via_bgp(node1), 40, "node2's block to be withdrawn on node1")
    finding = only(calico_doctor(), "calico-route-missing")
    assert node2.role in finding["object"] and "BGP session" in finding["why"]
