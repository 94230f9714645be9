"""NetworkPolicy through kube-proxy: a policy on a Service's backend pods applies to traffic that
reaches them through the Service.

The truth-table cluster (netpol_matrix.NetpolCluster, flannel vxlan) with kube-proxy on
both nodes, in iptables and then nftables mode (one cluster; the next mode's
kube-proxy removes the previous one's rules as it starts), and a client namespace
outside the cluster on the underlay. Service x/web has one backend, x/a (on node1):
ClusterIP 10.96.0.10 TCP 80 and UDP 81, NodePorts 30080 (TCP) and 30081 (UDP).

The policy is enforced after kube-proxy's DNAT (the forward hook sees the endpoint,
never the Service address), so a ClusterIP is allowed or denied exactly as x/a
itself, for ingress (x/a's policy) and egress (the client's policy). Through a
NodePort the source the policy sees is whatever reaches the backend's node: pods
and clients of node1 itself keep their address (node1 DNATs them and only
masquerades after the forward hook); what comes through node2's NodePort, or from
node2's pods to node1's address, was masqueraded by node2 on the way (kube-proxy's
NodePort SNAT, flannel's --ip-masq): the policy sees node2, as the API reference
warns ("cluster ingress and egress mechanisms often require rewriting the source or
destination IP"), and only an ipBlock for the node could admit it.
"""
import pytest

from lab import manifests as k8s
from lab.cluster import Lab

import netpol_cases as cases
import netpol_matrix as matrix
from helpers import wait_until

CLUSTER_IP = "10.96.0.10"
NODE_PORT_TCP, NODE_PORT_UDP = 30080, 30081
OUTSIDE_IP = "192.168.50.100"
TIMEOUT = 20
SOURCES = [p for p in cases.PODS if p != "x/a"]     # x/a through its own Service is hairpin: not our question


@pytest.fixture(scope="module")
def env(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        e = matrix.NetpolCluster(lab, "flannel").start()
        e.outside = lab.namespace("outside")
        e.cluster.underlay.attach(e.outside, OUTSIDE_IP)
        e.proxy_manifests = lab.workdir + "/kube-proxy-manifests"
        xa = e.pods["x/a"]
        k8s.write(e.proxy_manifests, "web.json",
                  k8s.service("web", CLUSTER_IP, [
                      {"name": "http", "port": 80, "targetPort": 80, "nodePort": NODE_PORT_TCP},
                      {"name": "dns", "port": 81, "targetPort": 81, "protocol": "UDP", "nodePort": NODE_PORT_UDP}],
                      namespace="x", type="NodePort"),
                  k8s.endpoint_slice("web", [(xa.ip, xa.node.role)], [
                      {"name": "http", "port": 80}, {"name": "dns", "port": 81, "protocol": "UDP"}], namespace="x"))
        yield e
        for node in e.nodes.values():
            if node.role in e.cluster.network_policy:
                e.cluster.stop_network_policy(node)


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def proxied(request, env):
    """kube-proxy in one mode on both nodes, the Service answering from everywhere."""
    for node in env.nodes.values():
        env.cluster.start_kube_proxy(node, env.proxy_manifests, ["--proxy-mode", request.param])
    env.proxy_mode = request.param
    env.set_policies([])
    wait_until(lambda: not diff(env, expect(env, {})), TIMEOUT, "the Service to answer everywhere (%s)" % request.param)
    yield env
    for node in env.nodes.values():
        env.cluster.stop_kube_proxy(node)


def targets(env):
    """{source: [(what, ip, protocol, port)]}: the ClusterIP from every pod, node1's NodePorts
    from node1's and node2's pods, both nodes' NodePorts from outside."""
    node1, node2 = env.nodes["node1"].underlay_ip, env.nodes["node2"].underlay_ip
    out = {}
    for pod in SOURCES:
        out[pod] = [("cluster-ip tcp", CLUSTER_IP, "TCP", 80), ("cluster-ip udp", CLUSTER_IP, "UDP", 81),
                    ("node1 nodeport tcp", node1, "TCP", NODE_PORT_TCP),
                    ("node1 nodeport udp", node1, "UDP", NODE_PORT_UDP)]
    out["outside"] = [("node1 nodeport tcp", node1, "TCP", NODE_PORT_TCP),
                      ("node1 nodeport udp", node1, "UDP", NODE_PORT_UDP),
                      ("node2 nodeport tcp", node2, "TCP", NODE_PORT_TCP)]
    return out


def expect(env, rules):
    """{(source, what): allowed}: allowed unless `rules` ({(source pattern, what prefix): bool},
    applied in order) say otherwise."""
    out = {}
    for source, items in targets(env).items():
        for what, _, _, _ in items:
            allowed = True
            for (pattern, prefix), value in rules.items():
                src_ok = pattern == source if pattern == "outside" else (
                    source != "outside" and cases.matches(pattern, source))
                if src_ok and what.startswith(prefix):
                    allowed = value
            out[(source, what)] = allowed
    return out


def probe(env, timeout):
    """{(source, what): outcome}, and the slowest answer of the two rounds (pods, outside)."""
    requests = {src: [["%s|%s" % (src, what), ip, proto, port] for what, ip, proto, port in items]
                for src, items in targets(env).items() if src != "outside"}
    seen = env.probe_round(requests, timeout)
    slowest = env.round_slowest
    outside = [["outside|%s" % what, ip, proto, port] for what, ip, proto, port in targets(env)["outside"]]
    seen.update(env.probe_from("outside", env.outside, outside, timeout))
    return {tuple(key.split("|")): outcome for key, outcome in seen.items()}, max(slowest, env.round_slowest)


def diff(env, expected):
    """What differs from `expected`. As in the matrix (netpol_matrix.NetpolCluster.compare),
    silence is a drop only in a round that answered fast, and never fails an expected-open
    cell on its own: either sends the whole round again with the long timeout."""
    seen, slowest = probe(env, matrix.DROP_TIMEOUT)
    silent_open = any(allowed and seen[key] == "timeout" for key, allowed in expected.items())
    if silent_open or slowest > matrix.TRUSTED_FRACTION * matrix.DROP_TIMEOUT:
        seen, _ = probe(env, matrix.RECHECK_TIMEOUT)
    return ["%s -> %s: expected %s, got %s" % (src, what, "allowed" if allowed else "denied", seen[(src, what)])
            for (src, what), allowed in sorted(expected.items()) if (seen[(src, what)] == "ok") != allowed]


def assert_expected(env, rules, what):
    wrong = diff(env, expect(env, rules))
    assert not wrong, "[%s] %s:\n%s\n%s" % (env.proxy_mode, what, "\n".join(wrong), env.agent_logs())


# node2's pods reach node1's address masqueraded by node2 (flannel --ip-masq): the policy sees node2
NODE2_PODS_VIA_NODE1 = ("@node2", "node1 nodeport")


def test_ingress_policy_on_the_backend_applies_to_cluster_ip_and_node_port(proxied):
    env = proxied
    env.set_policies([cases.netpol("web-from-y-and-outside", pods=cases.labels(pod="a"), ingress=[cases.ingress_rule(
        cases.peer(namespaces=cases.ns_is("y")), cases.block(OUTSIDE_IP + "/32"),
        ports=[cases.port(80), cases.port(81, "UDP")])])])
    assert_expected(env, {("", "cluster-ip"): False, ("y", "cluster-ip"): True,
                          ("", "node1 nodeport"): False, ("y", "node1 nodeport"): True,
                          NODE2_PODS_VIA_NODE1: False,
                          ("outside", "node2 nodeport"): False}, "backend allows y and the outside client")


def test_default_deny_on_the_backend_closes_the_service(proxied):
    env = proxied
    env.set_policies([cases.DENY_INGRESS_X])
    assert_expected(env, {("", ""): False, ("outside", ""): False}, "x denies all ingress")


def test_egress_policy_of_the_client_sees_the_endpoint_not_the_service(proxied):
    """y/a may only talk to x/b: the ClusterIP (whose endpoint is x/a) is closed to it, though
    no policy names the Service address; allowing x/a opens it."""
    env = proxied
    to_xb = cases.netpol("ya-to-xb", namespace="y", pods=cases.labels(pod="a"), types=["Egress"], egress=[
        cases.egress_rule(cases.peer(namespaces=cases.ns_is("x"), pods=cases.labels(pod="b")))])
    env.set_policies([to_xb])
    assert_expected(env, {("y/a", ""): False}, "y/a egress only to x/b")
    to_xa = cases.netpol("ya-to-xa", namespace="y", pods=cases.labels(pod="a"), types=["Egress"], egress=[
        cases.egress_rule(cases.peer(namespaces=cases.ns_is("x"), pods=cases.labels(pod="a")))])
    env.set_policies([to_xb, to_xa])
    # y/a runs on node2, where node1's NodePort address is not DNATed: y/a's egress policy sees
    # node1's address, which no rule allows
    assert_expected(env, {("y/a", "node1 nodeport"): False}, "y/a egress to x/b and x/a")
