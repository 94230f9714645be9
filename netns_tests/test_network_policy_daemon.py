"""`podnet network-policy`, the real daemon, in a two-node flannel (vxlan) lab cluster.

Both nodes run the agent (`Cluster.start_network_policy`) on one manifests
directory; policies are written there and probed with real TCP connections
between pods on different nodes (routed through the overlay) and on one node
(bridged on cni0: br_netfilter must be on). Checked besides: /readyz and
/metrics (parsed by prometheus_client's parser), the NFLOG drop line in the
agent's log, a malformed policy among good ones logged and skipped, SIGTERM
leaving the rules, a restart taking them over, the kernel refusing the NFLOG
bind (another listener holds the group: the agent runs on without drop lines),
and `--cleanup` removing exactly our table.
"""
import os
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import manifests as k8s
from lab.cluster import _SOURCE_ROOT, Cluster, Lab
from podnet.net.nflog import NflogListener

from helpers import requires_etcd, wait_until

pytestmark = requires_etcd
PORT = 8080
TABLE = "podnet-network-policy"
BR_NETFILTER = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")


def namespace(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": dict({"kubernetes.io/metadata.name": name}, **labels)}}


def policy(name, ns, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    with Lab() as lab:
        cluster = Cluster(lab, nodes=2, backend="vxlan").start()
        node1, node2 = cluster.nodes
        e = Env()
        e.lab, e.cluster, e.node1, e.node2 = lab, cluster, node1, node2
        e.web = cluster.add_pod(node1, "web")          # x/web on node1
        e.client = cluster.add_pod(node2, "client")    # y/client on node2
        e.other = cluster.add_pod(node2, "other")      # y/other on node2: same node as the client
        for p in (e.web, e.other):
            cluster.start_echo(p, port=PORT)
        e.manifests = os.path.join(lab.workdir, "netpol")
        http = [("http", PORT, "TCP")]
        k8s.write(e.manifests, "objects.json", namespace("x", team="web"), namespace("y", team="clients"),
                  cluster.pod_manifest(e.web, namespace="x", labels={"app": "web"}, ports=http),
                  cluster.pod_manifest(e.client, namespace="y", labels={"app": "client"}),
                  cluster.pod_manifest(e.other, namespace="y", labels={"app": "other"}, ports=http))
        for node in cluster.nodes:      # per network namespace here: off, for the agent to turn on
            for key in BR_NETFILTER:
                node.sysctl(key, 0)
        for node in cluster.nodes:
            cluster.start_network_policy(node, e.manifests)
        for node in cluster.nodes:
            wait_until(lambda n=node: cluster.network_policy_get(n, "/readyz")[0] == 200, 20,
                       "the agent on %s to be ready" % node.role)
        wait_until(lambda: answers(e, e.client, e.web) and answers(e, e.client, e.other), 20, "the echo servers")
        yield e


def answers(e, src, dst, timeout=1):
    out = e.cluster.echo(src.ns, "get", "%s:%d" % (dst.ip, PORT), "--timeout", timeout)
    return dst.name in out["answers"]


def apply(e, filename, *objects):
    """Write policies and wait until both agents enforce them."""
    k8s.write(e.manifests, filename, *objects)
    since = time.time()
    for node in e.cluster.nodes:
        e.cluster.wait_network_policy(node, since)


def remove(e, *filenames):
    for name in filenames:
        k8s.remove(e.manifests, name)
    since = time.time()
    for node in e.cluster.nodes:
        e.cluster.wait_network_policy(node, since)


def log_text(e, node):
    with open(e.cluster.network_policy_log(node)) as f:
        return f.read()


def metrics(e, node):
    status, body = e.cluster.network_policy_get(node, "/metrics")
    assert status == 200, body
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


DENY_INGRESS = {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_ready_with_br_netfilter_on_and_nothing_isolated(env):
    for node in env.cluster.nodes:
        assert env.cluster.network_policy_get(node, "/readyz") == (200, "ok\n")
        assert env.cluster.network_policy_get(node, "/healthz")[0] == 200
        for key in BR_NETFILTER:
            assert node.run(["sysctl", "-n", key]).stdout.strip() == "1"
        assert "table inet %s" % TABLE in node.run(["nft", "list", "tables"]).stdout
    for node in env.cluster.nodes:
        assert "net.bridge.bridge-nf-call-iptables and net.bridge.bridge-nf-call-ip6tables set to 1" \
            in log_text(env, node)
    assert answers(env, env.client, env.web) and answers(env, env.client, env.other)


def test_deny_then_allow_across_nodes_with_the_drop_logged(env):
    apply(env, "deny.json", policy("deny", "x", DENY_INGRESS))
    assert not answers(env, env.client, env.web)
    assert answers(env, env.client, env.other)                  # namespace y is not isolated
    line = "dropped ingress to x/web (%s) from y/client (%s): TCP port %d" % (env.web.ip, env.client.ip, PORT)
    wait_until(lambda: line in log_text(env, env.node1), 5, "the NFLOG drop line on node1")
    # allowed: app=client pods of namespaces labelled team=clients (one peer: AND), on the named port
    allow = {"podSelector": {"matchLabels": {"app": "web"}},
             "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "clients"}},
                                    "podSelector": {"matchLabels": {"app": "client"}}}],
                          "ports": [{"port": "http"}]}]}
    apply(env, "allow.json", policy("allow-client", "x", allow))
    assert answers(env, env.client, env.web)
    assert not answers(env, env.other, env.web)                # same namespace, other labels
    remove(env, "deny.json", "allow.json")
    assert answers(env, env.other, env.web)


def test_bridged_traffic_between_pods_of_one_node_is_policed(env):
    """Only because the agent turned bridge-nf-call-iptables on (the fixture had it off)."""
    apply(env, "deny-y.json", policy("deny", "y", {"podSelector": {"matchLabels": {"app": "other"}},
                                                   "policyTypes": ["Ingress"]}))
    assert not answers(env, env.client, env.other)             # both on node2: bridged on cni0
    remove(env, "deny-y.json")
    assert answers(env, env.client, env.other)


def test_a_malformed_policy_is_logged_and_skipped_while_the_good_ones_are_enforced(env):
    bad = {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/40"}}]}]}
    apply(env, "mixed.json", policy("deny", "x", DENY_INGRESS), policy("bad", "x", bad),
          policy("allow-other", "x", {"podSelector": {}, "ingress": [{"from": [
              {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "other"}}}]}]}))
    assert answers(env, env.other, env.web) and not answers(env, env.client, env.web)
    text = log_text(env, env.node1)
    assert "skipping NetworkPolicy x/bad: spec.ingress[0].from[0].ipBlock.cidr" in text, text[-3000:]
    m = metrics(env, env.node1)
    assert m[("podnet_network_policy_invalid_objects", (("kind", "NetworkPolicy"),))] == 1
    assert m[("podnet_network_policy_policies", ())] == 2
    remove(env, "mixed.json")
    assert "skipping NetworkPolicy x/bad" in log_text(env, env.node1)
    assert metrics(env, env.node1)[("podnet_network_policy_invalid_objects", (("kind", "NetworkPolicy"),))] == 0


def test_metrics(env):
    m = metrics(env, env.node1)
    assert m[("podnet_network_policy_sync_duration_seconds_count", (("type", "full"),))] >= 1
    assert m[("podnet_network_policy_sync_duration_seconds_count", (("type", "partial"),))] >= 1
    assert m[("podnet_network_policy_last_sync_timestamp_seconds", ())] > time.time() - 600
    assert m[("podnet_network_policy_rules", ())] > 0 and m[("podnet_network_policy_chains", ())] > 0
    assert m[("podnet_network_policy_pods", (("scope", "cluster"),))] == 3
    assert m[("podnet_network_policy_pods", (("scope", "node"),))] == 1
    assert m[("podnet_network_policy_namespaces", ())] == 2
    assert m[("podnet_network_policy_dropped_packets_total", (("direction", "ingress"),))] >= 1
    assert m[("podnet_network_policy_logged_drops_total", (("direction", "ingress"),))] >= 1
    assert m[("podnet_network_policy_nflog_listening", ())] == 1
    assert m[("podnet_network_policy_sync_failures_total", ())] == 0


def test_sigterm_leaves_the_rules_and_a_restart_without_nflog_takes_them_over(env):
    apply(env, "deny.json", policy("deny", "x", DENY_INGRESS))
    env.cluster.stop_network_policy(env.node1)
    assert "the rules stay in place" in log_text(env, env.node1)
    assert not answers(env, env.client, env.web)                # still enforced with the agent gone
    # the kernel refuses the agent's NFLOG bind: another listener (ours) holds group 100 in node1
    with NflogListener(100, netns=env.node1.path):
        env.cluster.start_network_policy(env.node1, env.manifests)
        wait_until(lambda: env.cluster.network_policy_get(env.node1, "/readyz")[0] == 200, 20, "the restarted agent")
        assert not answers(env, env.client, env.web)
        text = log_text(env, env.node1)
        assert "cannot read NFLOG group 100" in text and "running without a log line per dropped packet" in text
        assert metrics(env, env.node1)[("podnet_network_policy_nflog_listening", ())] == 0
    remove(env, "deny.json")
    assert answers(env, env.client, env.web)


def test_explain_lists_the_source_once(env):
    apply(env, "allow.json", policy("allow-client", "x", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "clients"}}}], "ports": [{"port": "http"}]}]}))
    out = subprocess.run([sys.executable, "-m", "cli.main", "network-policy", "explain", "x/web", "--manifests",
                          env.manifests, "--verdict", "y/client", "--port", "http"], capture_output=True, text=True,
                         cwd=_SOURCE_ROOT, env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT), timeout=30)
    assert out.returncode == 0, out.stderr
    assert "x/allow-client" in out.stdout and "y/client" in out.stdout and str(PORT) in out.stdout, out.stdout
    assert "allowed" in out.stdout.lower(), out.stdout
    k8s.remove(env.manifests, "allow.json")


def test_cleanup_removes_exactly_our_table(env):
    apply(env, "deny.json", policy("deny", "x", DENY_INGRESS))
    env.cluster.stop_network_policy(env.node1)
    env.node1.run(["nft", "add", "table", "inet", "someone-else"])
    before = set(env.node1.run(["nft", "list", "tables"]).stdout.splitlines())
    out = env.node1.run([sys.executable, "-m", "cli.main", "network-policy", "--cleanup"], check=False,
                        env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
    assert out.returncode == 0, out.stderr
    after = set(env.node1.run(["nft", "list", "tables"]).stdout.splitlines())
    assert before - after == {"table inet %s" % TABLE} and after <= before
    assert answers(env, env.client, env.web)
    again = env.node1.run([sys.executable, "-m", "cli.main", "network-policy", "--cleanup"], check=False,
                          env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
    assert again.returncode == 0, again.stderr                  # nothing to remove is fine
    env.node1.run(["nft", "delete", "table", "inet", "someone-else"])
    k8s.remove(env.manifests, "deny.json")
