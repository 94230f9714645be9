"""`podnet trace --live` across two nodes: the probe on node1, `podnet trace --watch` on node2 (started
through --remote-exec), and the kernel's drop reasons (skb:kfree_skb in a trace instance of the
probe's own, in a private mount namespace).

Flannel vxlan: pod a on node1, c on node2 (echo server on 8080); kube-proxy (iptables) on node1,
where the Service's DNAT happens, and the NetworkPolicy agent on node2, where c's ingress is
enforced; Service default/web (10.96.0.21:80 -> c:8080). The trace runs inside node1 as in
test_trace.py, with node2's state from `podnet trace --snapshot` written there.
"""
import json
import os
import time

import pytest

from lab import manifests as k8s
from lab.cluster import _SOURCE_ROOT, Cluster, Lab

from helpers import wait_until

CLUSTER_IP = "10.96.0.21"


class Env:
    def __init__(self, lab, cluster, manifests):
        self.lab, self.cluster, self.manifests = lab, cluster, manifests
        self.node1, self.node2 = cluster.nodes[:2]
        self.environ = dict(os.environ, PYTHONPATH=_SOURCE_ROOT)

    def run(self, node, *args):
        return node.run([self.cluster.python, "-m", "cli.main", "trace"] + list(args), check=False,
                        env=self.environ, timeout=60)

    def remote(self):
        out = self.run(self.node2, "--snapshot", "--hostname-override", "node2")
        assert out.returncode == 0, out.stderr
        path = os.path.join(self.lab.workdir, "node2-snapshot.json")
        with open(path, "w") as f:
            f.write(out.stdout)
        return path

    def live(self, src, dst):
        remote_exec = "node2=ip netns exec %s %s -m cli.main" % (self.node2.name, self.cluster.python)
        out = self.run(self.node1, src, dst, "--manifests", self.manifests, "--etcd-endpoints", self.cluster.etcd_url,
                       "--hostname-override", "node1", "--remote-snapshot", self.remote(), "--json",
                       "--live", "--probe-netns", self.a.ns.path, "--remote-exec", remote_exec)
        assert out.returncode in (0, 1), out.stderr
        result = json.loads(out.stdout)
        live = result["live"]
        assert [n["node"] for n in live["nodes"]] == ["node1", "node2"], live
        return result, live, {n["node"]: n for n in live["nodes"]}


@pytest.fixture(scope="module")
def flannel(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        cluster = Cluster(lab, nodes=2).start()
        node1, node2 = cluster.nodes
        a, c = cluster.add_pod(node1, "a"), cluster.add_pod(node2, "c")
        cluster.start_echo(c)
        manifests = os.path.join(lab.workdir, "manifests")
        k8s.write(manifests, "pods.json",
                  *[cluster.pod_manifest(p, labels={"app": p.name}, ports=[("http", 8080, "TCP")]) for p in (a, c)],
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        k8s.write(manifests, "web.json", k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080}]),
                  k8s.endpoint_slice("web", [(c.ip, "node2")], [{"port": 8080}]))
        cluster.start_kube_proxy(node1, manifests)
        cluster.start_network_policy(node2, manifests)
        env = Env(lab, cluster, manifests)
        env.a, env.c = a, c
        wait_until(lambda: a.ns.run(["curl", "-s", "-m", "1", "http://%s:80/" % CLUSTER_IP],
                                    check=False).returncode == 0, 30, "the Service to answer")
        cluster.wait_network_policy(node2, time.time())
        yield env
        cluster.stop_kube_proxy(node1)
        cluster.stop_network_policy(node2)


def _host_side(node, pod):
    """The device node reaches the pod by (where a packet for it leaves the node's routing)."""
    return node.ip_json("route", "get", pod.ip)[0]["dev"]


def test_no_fault_both_nodes_see_the_packet_reach_the_pod(flannel):
    env = flannel
    towards_c = _host_side(env.node2, env.c)
    for dst in ("default/c:8080", "svc/default/web:80"):
        result, live, nodes = env.live("default/a", dst)
        assert result["verdict"] == "delivered" and live["outcome"] == "connected", json.dumps(result, indent=1)
        assert live["agrees"] is True, live
        assert nodes["node1"]["seen"] and not nodes["node1"]["dropped"], nodes["node1"]
        node2 = nodes["node2"]
        assert not node2["error"] and node2["seen"] and not node2["dropped"], node2
        # node2 marked the inner packet to the endpoint (after node1's DNAT), seen coming out of
        # the VXLAN device and headed for c
        assert node2["marked"] == "%s -> %s:8080/TCP" % (env.a.ip, env.c.ip), node2
        assert node2["iif"] == "flannel.1" and node2["oif"] == towards_c, node2
        assert any("podnet-network-policy" in e for e in node2["events"]), node2["events"]


def test_ingress_policy_on_node2_is_named_as_node2s_drop(flannel):
    env = flannel
    k8s.write(env.manifests, "policy-deny-c.json", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-c", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Ingress"]}})
    try:
        env.cluster.wait_network_policy(env.node2, time.time())
        result, live, nodes = env.live("default/a", "default/c:8080")
        hop = result["failed_hop"]
        assert hop["step"] == "ingress-policy" and hop["node"] == "node2", hop
        assert live["outcome"] == "timeout" and live["agrees"] is True, live
        assert not nodes["node1"]["dropped"], nodes["node1"]
        node2 = nodes["node2"]
        assert node2["dropped"] and node2["decisive"]["table"] == "podnet-network-policy", node2
        assert "node2 (marked %s -> %s:8080/TCP): drop in inet podnet-network-policy " % (env.a.ip, env.c.ip) \
            in live["summary"], live["summary"]
    finally:
        k8s.remove(env.manifests, "policy-deny-c.json")
        env.cluster.wait_network_policy(env.node2, time.time())


def test_rp_filter_on_node2_is_a_kernel_drop_not_an_nftables_one(flannel):
    env = flannel
    # strict rp_filter on node2's flannel.1, the route back to a by another device (as in
    # test_trace.py::test_datapath_faults)
    env.node2.sysctl("net.ipv4.conf.flannel/1.rp_filter", "1")
    env.node2.ip("route", "add", "%s/32" % env.a.ip, "dev", env.node2.underlay_if)
    try:
        result, live, nodes = env.live("default/a", "default/c:8080")
        hop = result["failed_hop"]
        assert hop["step"] == "rp_filter" and hop["node"] == "node2", hop
        assert live["outcome"] == "timeout" and live["agrees"] is True, live
        assert not any(n["dropped"] for n in nodes.values()), live
        # node2's hooks saw it come in (prerouting) and nothing after: the route lookup dropped it
        assert nodes["node2"]["seen"] and nodes["node2"]["iif"] == "flannel.1", nodes["node2"]
        reports = [n["drops"] for n in nodes.values()]
        assert all(r["available"] and r["host_wide"] for r in reports), reports
        rp = [d for d in reports[0]["drops"] if d["reason"] == "IP_RPFILTER"]
        assert rp and rp[0]["count"] >= 1 and rp[0]["location"].startswith("ip_"), reports[0]
        assert live["kernel_confirms"] is True, live
        assert "x IP_RPFILTER at " in live["summary"] and "(host-wide" in live["summary"], live["summary"]
    finally:
        env.node2.ip("route", "del", "%s/32" % env.a.ip)
        env.node2.sysctl("net.ipv4.conf.flannel/1.rp_filter", "0")
