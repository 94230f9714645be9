"""`podnet trace` on real two-node labs: the delivered path with no fault (and --live agreeing),
then faults injected one at a time, each named by the hop and the object behind it.

Flannel vxlan: pods a, b on node1 and c on node2 (echo servers on 8080), kube-proxy (iptables)
and the NetworkPolicy agent on both nodes, reading one manifests directory; Service default/web
(10.96.0.20:80 -> c:8080). The trace runs inside node1 (`ip netns exec`, as an operator would
on the node), reading the objects from the manifests, the leases from etcd, and node2's state
from a file `podnet trace --snapshot` wrote on node2. Each fault is undone before the next.
"""
import json
import os
import time

import pytest

from lab import manifests as k8s
from lab.cluster import _SOURCE_ROOT, CalicoCluster, Cluster, Lab

from helpers import wait_until

CLUSTER_IP = "10.96.0.20"
NODE_PORT = 30090


def _pods_manifest(cluster, pods):
    return [cluster.pod_manifest(p, labels={"app": p.name}, ports=[("http", 8080, "TCP")]) for p in pods]


class Env:
    def __init__(self, lab, cluster, manifests):
        self.lab, self.cluster, self.manifests = lab, cluster, manifests
        self.node1, self.node2 = cluster.workers()[:2] if isinstance(cluster, CalicoCluster) else cluster.nodes[:2]

    def run(self, node, *args):
        out = node.run([self.cluster.python, "-m", "cli.main", "trace"] + list(args), check=False,
                       env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT), timeout=60)
        return out

    def remote(self):
        out = self.run(self.node2, "--snapshot", "--hostname-override", self.node2.role)
        assert out.returncode == 0, out.stderr
        path = os.path.join(self.lab.workdir, "node2-snapshot.json")
        with open(path, "w") as f:
            f.write(out.stdout)
        return path

    def trace(self, src, dst, *extra):
        out = self.run(self.node1, src, dst, "--manifests", self.manifests, "--etcd-endpoints", self.cluster.etcd_url,
                       "--hostname-override", self.node1.role, "--remote-snapshot", self.remote(), "--json", *extra)
        assert out.returncode in (0, 1), out.stderr
        return json.loads(out.stdout)


def failed(result):
    hop = result["failed_hop"]
    assert hop is not None, json.dumps(result, indent=1)
    return hop


def write_policy(env, name, namespace, spec):
    k8s.write(env.manifests, "policy-%s.json" % name, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec})


@pytest.fixture(scope="module")
def flannel(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        cluster = Cluster(lab, nodes=2).start()
        node1, node2 = cluster.nodes
        a, b = cluster.add_pod(node1, "a"), cluster.add_pod(node1, "b")
        c = cluster.add_pod(node2, "c")
        for pod in (a, b, c):
            cluster.start_echo(pod)
        manifests = os.path.join(lab.workdir, "manifests")
        k8s.write(manifests, "pods.json", *_pods_manifest(cluster, [a, b, c]),
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        k8s.write(manifests, "web.json",
                  k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}],
                              type="NodePort"),
                  k8s.endpoint_slice("web", [(c.ip, "node2")], [{"port": 8080}]))
        for node in (node1, node2):
            cluster.start_kube_proxy(node, manifests)
            cluster.start_network_policy(node, manifests)
        env = Env(lab, cluster, manifests)
        env.a, env.b, env.c = a, b, c
        wait_until(lambda: a.ns.run(["curl", "-s", "-m", "1", "http://%s:80/" % CLUSTER_IP],
                                    check=False).returncode == 0, 30, "the Service to answer")
        yield env
        for node in (node1, node2):
            cluster.stop_kube_proxy(node)
            cluster.stop_network_policy(node)


def test_delivered_paths_and_live_agree(flannel):
    env = flannel
    for src, dst in (("default/a", "default/b:8080"), ("default/a", "default/c:8080"),
                     ("default/a", "svc/default/web:80")):
        result = env.trace(src, dst, "--live", "--probe-netns", env.a.ns.path)
        assert result["verdict"] == "delivered", json.dumps(result, indent=1)
        steps = [h["step"] for h in result["hops"]]
        assert steps[-1] == "destination"
        assert result["live"]["agrees"] is True, result["live"]
        if dst != "default/b:8080":
            assert {"route", "neighbour", "fdb", "mtu", "rp_filter"} <= set(steps), steps
        if dst.startswith("svc/"):
            assert "kube-proxy-rules" in steps


def test_policy_faults(flannel):
    env = flannel
    write_policy(env, "deny-c", "default", {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Ingress"]})
    try:
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "ingress-policy" and hop["object"] == "NetworkPolicy default/deny-c", hop
        env.cluster.wait_network_policy(env.node2, time.time())
        live = env.trace("default/a", "default/c:8080", "--live", "--probe-netns", env.a.ns.path)["live"]
        assert live["outcome"] == "timeout" and live["agrees"], live
    finally:
        k8s.remove(env.manifests, "policy-deny-c.json")
    write_policy(env, "deny-a-out", "default",
                 {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]})
    try:
        hop = failed(env.trace("default/a", "default/b:8080"))
        assert hop["step"] == "egress-policy" and hop["object"] == "NetworkPolicy default/deny-a-out", hop
        env.cluster.wait_network_policy(env.node1, time.time())
        live = env.trace("default/a", "default/b:8080", "--live", "--probe-netns", env.a.ns.path)["live"]
        assert live["agrees"] and "podnet-network-policy" in (live["decisive"] or {}).get("table", ""), live
    finally:
        k8s.remove(env.manifests, "policy-deny-a-out.json")


def test_service_faults(flannel):
    env = flannel
    c = env.c
    k8s.write(env.manifests, "web.json",
              k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}], type="NodePort"),
              k8s.endpoint_slice("web", [(c.ip, "node2", {"ready": False})], [{"port": 8080}]))
    hop = failed(env.trace("default/a", "svc/default/web:80"))
    assert hop["step"] == "service" and "no ready endpoints" in hop["what"] and "default/web" in hop["object"], hop
    # externalTrafficPolicy Local: node1's NodePort has no local endpoint (c runs on node2)
    k8s.write(env.manifests, "web.json",
              k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}], type="NodePort",
                          external_traffic_policy="Local"),
              k8s.endpoint_slice("web", [(c.ip, "node2")], [{"port": 8080}]))
    hop = failed(env.trace("default/a", "%s:%d" % (env.node1.underlay_ip, NODE_PORT)))
    assert hop["step"] == "service" and "no local endpoint on node1" in hop["what"], hop
    # a stale endpoint: kube-proxy stopped (its rules stay), then the endpoint moves away
    k8s.write(env.manifests, "web.json",
              k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}], type="NodePort"),
              k8s.endpoint_slice("web", [(c.ip, "node2")], [{"port": 8080}]))
    time.sleep(1.0)
    env.cluster.stop_kube_proxy(env.node1)
    try:
        k8s.write(env.manifests, "web.json",
                  k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}],
                              type="NodePort"),
                  k8s.endpoint_slice("web", [(env.b.ip, "node1")], [{"port": 8080}]))
        hop = failed(env.trace("default/a", "svc/default/web:80"))
        assert hop["step"] == "kube-proxy-rules" and "%s:8080" % c.ip in hop["what"] and "KUBE-SEP-" in hop["rule"], hop
    finally:
        k8s.write(env.manifests, "web.json",
                  k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}],
                              type="NodePort"),
                  k8s.endpoint_slice("web", [(c.ip, "node2")], [{"port": 8080}]))
        env.cluster.start_kube_proxy(env.node1, env.manifests)


def _vxlan_entries(env):
    node2_lease = next(r for r in env.node1.ip_json("route", "show", "dev", "flannel.1"))
    gw = node2_lease["gateway"]
    neigh = next(n for n in env.node1.ip_json("neigh", "show", "dev", "flannel.1") if n["dst"] == gw)
    return node2_lease, gw, neigh["lladdr"]


def test_datapath_faults(flannel):
    env = flannel
    route, gw, mac = _vxlan_entries(env)
    entries = json.loads(env.node1.run(["bridge", "-j", "fdb", "show", "dev", "flannel.1"]).stdout)
    fdb = [f for f in entries if f["mac"] == mac][0]
    # each fault made and undone by hand: flanneld would repair it at its next resync
    env.cluster.stop_flanneld(env.node1)
    try:
        env.node1.ip("neigh", "del", gw, "dev", "flannel.1")
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "neighbour" and "flannel lease %s" % route["dst"] in hop["object"], hop
        env.node1.ip("neigh", "add", gw, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")

        env.node1.run(["bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", fdb["dst"], "self"])
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "fdb" and fdb["dst"] in hop["what"], hop
        env.node1.run(["bridge", "fdb", "append", mac, "dev", "flannel.1", "dst", fdb["dst"], "self", "permanent"])

        env.node1.ip("route", "del", route["dst"])
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "route" and route["dst"] in hop["object"], hop
        env.node1.ip("route", "add", route["dst"], "via", gw, "dev", "flannel.1", "onlink")

        env.node1.ip("link", "set", "flannel.1", "mtu", "1000")
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "mtu" and "flannel.1 mtu 1000" in hop["what"], hop
        env.node1.ip("link", "set", "flannel.1", "mtu", "1450")
        assert env.trace("default/a", "default/c:8080")["verdict"] == "delivered"
    finally:
        env.cluster.start_flanneld(env.node1)
    # rp_filter strict on node2's flannel.1, with the route back to a leaving by another device
    env.node2.sysctl("net.ipv4.conf.flannel/1.rp_filter", "1")
    env.node2.ip("route", "add", "%s/32" % env.a.ip, "dev", env.node2.underlay_if)
    try:
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "rp_filter" and hop["node"] == "node2" and "flannel.1" in hop["what"], hop
    finally:
        env.node2.ip("route", "del", "%s/32" % env.a.ip)
        env.node2.sysctl("net.ipv4.conf.flannel/1.rp_filter", "0")
    # policy routing: an ip rule sends a's packets to a table without the overlay's route
    env.node1.ip("route", "add", "unreachable", "default", "table", "100")
    env.node1.ip("rule", "add", "from", env.a.ip, "lookup", "100", "priority", "100")
    try:
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "route" and hop["node"] == "node1", hop
        assert "ip rule 100: from %s/32 lookup 100" % env.a.ip in hop["rule"] and "unreachable" in hop["what"], hop
        assert env.trace("default/b", "default/c:8080")["verdict"] == "delivered"
    finally:
        env.node1.run(["ip", "rule", "del", "priority", "100"], check=False)
        env.node1.ip("route", "flush", "table", "100")


@pytest.fixture(scope="module")
def calico(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        cluster = CalicoCluster(lab, nodes=2, ipip="never").start()
        node1, node2 = cluster.workers()
        a, c = cluster.add_pod(node1, "a"), cluster.add_pod(node2, "c")
        cluster.start_echo(c)
        manifests = os.path.join(lab.workdir, "manifests")
        k8s.write(manifests, "pods.json", *_pods_manifest(cluster, [a, c]))
        env = Env(lab, cluster, manifests)
        env.a, env.c = a, c
        yield env


def test_calico_faults(calico):
    env = calico
    result = env.trace("default/a", "default/c:8080", "--live", "--probe-netns", env.a.ns.path)
    assert result["verdict"] == "delivered" and result["live"]["agrees"], json.dumps(result, indent=1)
    assert "bgp" in [h["step"] for h in result["hops"]]
    # FORWARD policy DROP on node1 (nothing of calico_lite's accepts pod traffic in filter FORWARD)
    env.node1.run(["iptables", "-P", "FORWARD", "DROP"])
    try:
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "forward" and hop["node"] == "node1" and "policy DROP" in hop["rule"], hop
    finally:
        env.node1.run(["iptables", "-P", "FORWARD", "ACCEPT"])
    # a NetworkPolicy isolating c for ingress (policy is judged from the objects, on either overlay)
    write_policy(env, "deny-c", "default", {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Ingress"]})
    try:
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "ingress-policy" and hop["object"] == "NetworkPolicy default/deny-c", hop
    finally:
        k8s.remove(env.manifests, "policy-deny-c.json")
    # the BGP-learned route deleted while node1's agent is down (it would put it back)
    (route,) = env.cluster.routes_via_bgp(env.node1)
    env.cluster.stop_agent(env.node1)
    try:
        env.node1.ip("route", "del", route["dst"], "proto", "78")
        hop = failed(env.trace("default/a", "default/c:8080"))
        assert hop["step"] == "route" and hop["object"].startswith("calico block %s" % route["dst"]), hop
    finally:
        env.cluster.start_agent(env.node1)
    wait_until(lambda: env.cluster.routes_via_bgp(env.node1), 30, "node1's agent to put the route back")
    wait_until(lambda: env.trace("default/a", "default/c:8080")["verdict"] == "delivered", 30,
               "node1's BGP session to come back")
    # the BGP session down: the route reflector's agent killed
    rr = next(n for n in env.cluster.nodes if n.role == "rr1")
    import signal
    env.cluster.stop_agent(rr, sig=signal.SIGKILL)
    hop = failed(env.trace("default/a", "default/c:8080"))
    assert hop["step"] in ("bgp", "route") and rr.underlay_ip in hop["object"] + hop["what"], hop
