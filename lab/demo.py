"""The main job: a multi-node cluster in network namespaces, checked end to end.

etcd runs in its own namespace on the underlay; every node runs `flanneld`
(vxlan by default) which leases it a subnet and programs the overlay; pods
are attached by the stock 10-flannel conflist (flannel -> bridge ->
host-local, then portmap) run through podnet's conflist executor, as a
container runtime would. Then every pod pings every other pod on every node;
every pod runs a small HTTP server that answers with its name, a Service over
all of them (ClusterIP and NodePort) is written as manifests, `podnet
kube-proxy` runs on every node, and the Service is asked from a pod and from
an outside client on the underlay: the answers must come from every pod.
In flannel mode, `podnet network-policy` then runs on every node: a
default-deny ingress policy for the pods' namespace refuses a request from
another node's pod (the agent logs the dropped packet), and a policy allowing
that pod answers it again.
Everything lives in namespaces the Lab created and is removed at the end.
"""
import os
import re
import time

from lab import manifests as k8s
from lab.cluster import CalicoCluster, Cluster, Lab

SERVICE_IP, SERVICE_PORT, NODE_PORT, POD_PORT = "10.96.0.10", 80, 30080, 8080
OUTSIDE_CLIENT = "192.168.50.100"


def _step(text):
    print("  " + text, flush=True)


def run_demo(nodes=3, backend="vxlan", pods_per_node=1, keep=False, mode="flannel"):
    started = time.monotonic()
    with Lab() as lab:
        if mode == "calico":
            print("podnet demo: %d nodes in calico mode: BGP via a route reflector, no overlay (lab %s)"
                  % (nodes, lab.prefix))
            cluster = CalicoCluster(lab, nodes=nodes)
        else:
            print("podnet demo: %d nodes, flannel backend %s (lab %s)" % (nodes, backend, lab.prefix))
            cluster = Cluster(lab, nodes=nodes, backend=backend)
        cluster.start()
        _step("etcd at %s; network config %s" % (cluster.etcd_url, cluster.network_config()))
        if mode == "calico":
            _show_calico_nodes(cluster)
        else:
            for node in cluster.nodes:
                with open(cluster.subnet_file(node)) as f:
                    env = dict(line.split("=", 1) for line in f.read().split())
                _step("%s (underlay %s): flanneld leased %s, MTU %s"
                      % (node.role, node.underlay_ip, env["FLANNEL_SUBNET"], env["FLANNEL_MTU"]))
        for node in (cluster.workers() if mode == "calico" else cluster.nodes):
            for i in range(1, pods_per_node + 1):
                pod = cluster.add_pod(node, "%s-pod%d" % (node.role, i))
                _step("pod %s on %s: %s" % (pod.name, node.role, pod.ip))

        print("connectivity (every pod pings every other pod, 1 packet each):")
        matrix = cluster.ping_matrix()
        for pod in cluster.pods:
            row = ["%s %s" % (b, "ok" if ok else "FAIL") for (a, b), ok in matrix.items() if a == pod.name]
            _step("%s -> %s" % (pod.name, ", ".join(row)))
        failures = [pair for pair, ok in matrix.items() if not ok]
        service_failures = _service_check(lab, cluster)
        policy_failures = _network_policy_check(lab, cluster) if mode != "calico" else None
        pod_count = len(cluster.pods)

        if keep:
            input("cluster is up; press Enter to tear it down ")
        for pod in list(cluster.pods):
            cluster.remove_pod(pod)
    print("RESULT: %s; %s%s (%.1f s)" % (
        "all %d pod pairs across %d nodes reach each other" % (len(matrix), nodes) if not failures
        else "%d of %d pod pairs FAILED: %s" % (len(failures), len(matrix), failures),
        "the Service answers from all %d pods, by ClusterIP and by NodePort on every node" % pod_count
        if not service_failures else "Service FAILED: %s" % "; ".join(service_failures),
        "" if policy_failures is None else "; NetworkPolicy: default-deny refuses, the allow rule answers"
        if not policy_failures else "; NetworkPolicy FAILED: %s" % "; ".join(policy_failures),
        time.monotonic() - started))
    return 0 if not failures and not service_failures and not policy_failures else 1


def _show_calico_nodes(cluster):
    for node in cluster.nodes:
        if getattr(node, "calico_role", "node") == "route-reflector":
            _step("%s (underlay %s): route reflector for every node" % (node.role, node.underlay_ip))
            continue
        with open(cluster.blocks_file(node)) as f:
            blocks = f.read().split()
        learned = ["%s via %s" % (r["dst"], r["gateway"]) for r in cluster.routes_via_bgp(node)]
        _step("%s (underlay %s): block %s; BGP-learned routes: %s"
              % (node.role, node.underlay_ip, ", ".join(blocks), "; ".join(learned)))


def _service_check(lab, cluster):
    """A Service over every pod, proxied by `podnet kube-proxy` on every node; returns failures."""
    pods = list(cluster.pods)
    names = {p.name for p in pods}
    print("Service default/hello: ClusterIP %s:%d, NodePort %d, over %d pods (podnet kube-proxy, iptables mode):"
          % (SERVICE_IP, SERVICE_PORT, NODE_PORT, len(pods)))
    for pod in pods:
        cluster.start_echo(pod, port=POD_PORT)
    manifests = os.path.join(lab.workdir, "manifests")
    http = {"name": "http", "port": SERVICE_PORT, "targetPort": POD_PORT, "nodePort": NODE_PORT}
    k8s.write(manifests, "hello.json",
              k8s.service("hello", SERVICE_IP, [http], type="NodePort"),
              k8s.endpoint_slice("hello", [(p.ip, p.node.role) for p in pods], [{"name": "http", "port": POD_PORT}]))
    nodes = cluster.workers() if isinstance(cluster, CalicoCluster) else cluster.nodes
    for node in nodes:
        cluster.start_kube_proxy(node, manifests)
    outside = lab.namespace("outside")
    cluster.underlay.attach(outside, OUTSIDE_CLIENT)
    _wait_for(lambda: all(_synced(cluster, n) for n in nodes), 20)
    _wait_for(lambda: all(_answers(cluster, pods[0].node, "%s:%d" % (p.ip, POD_PORT), 1)[0] for p in pods), 20)
    failures = []
    for node in nodes:
        _step("%s: %s" % (node.role, _last_sync(cluster, node)))
    checks = [("pod %s -> %s:%d" % (pods[0].name, SERVICE_IP, SERVICE_PORT), pods[0].ns,
               "%s:%d" % (SERVICE_IP, SERVICE_PORT), 20 * len(pods))]
    checks += [("outside %s -> %s:%d" % (OUTSIDE_CLIENT, n.underlay_ip, NODE_PORT), outside,
                "%s:%d" % (n.underlay_ip, NODE_PORT), 10 * len(pods)) for n in nodes]
    for label, ns, url, count in checks:
        answers, errors = _answers(cluster, ns, url, count)
        _step("%s, %d requests: %s%s" % (label, count, ", ".join("%s %d" % kv for kv in sorted(answers.items())),
                                        "; errors %s" % errors if errors else ""))
        if set(answers) != names or errors:
            failures.append("%s: answers from %s, errors %s" % (label, sorted(answers), errors))
    return failures


def _network_policy_check(lab, cluster):
    """`podnet network-policy` on every node; a deny, then an allow, probed across nodes; returns failures."""
    pods = list(cluster.pods)
    if len(pods) < 2:
        return []
    target, client = pods[0], next((p for p in pods if p.node is not pods[0].node), pods[1])
    url = "%s:%d" % (target.ip, POD_PORT)
    manifests = os.path.join(lab.workdir, "network-policy")
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}
    objects = [namespace] + [cluster.pod_manifest(p, labels={"app": "hello", "pod": p.name},
                                                  ports=[("http", POD_PORT, "TCP")]) for p in pods]
    k8s.write(manifests, "pods.json", *objects)
    print("NetworkPolicy (podnet network-policy on every node, nftables), %s -> %s (%s):"
          % (client.name, target.name, url))
    started = time.monotonic()
    for node in cluster.nodes:
        cluster.start_network_policy(node, manifests)
    since = time.time()
    for node in cluster.nodes:
        cluster.wait_network_policy(node, since)
    _step("agents started and synced on every node in %.2f s; nothing isolated yet" % (time.monotonic() - started))
    failures = []

    def apply(filename, policy, expect_answer, label):
        k8s.write(manifests, filename, policy)
        since = time.time()
        seconds = max(cluster.wait_network_policy(n, since) for n in cluster.nodes)
        answers, errors = _answers(cluster, client.ns, url, 1, timeout=1)
        answered = target.name in answers
        _step("%s (in the kernel of every node %.2f s after the write): %s" % (
            label, seconds, "answered by %s" % target.name if answered else "refused (%s)" % ", ".join(errors)))
        if answered != expect_answer:
            failures.append("%s: %s" % (label, "answered" if answered else "refused"))

    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny-ingress", "namespace": "default"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    apply("deny.json", deny, False, "default-deny-ingress for namespace default")
    dropped = _drop_line(cluster, target.node)
    _step("%s's agent logged: %s" % (target.node.role, dropped or "(no drop line)"))
    if dropped is None:
        failures.append("no drop line in %s's agent log" % target.node.role)
    allow = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "allow-%s" % client.name, "namespace": "default"},
             "spec": {"podSelector": {"matchLabels": {"pod": target.name}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": client.name}}}],
                                   "ports": [{"protocol": "TCP", "port": "http"}]}]}}
    apply("allow.json", allow, True, "allow-%s (pod=%s, named port http)" % (client.name, client.name))
    return failures


def _drop_line(cluster, node, timeout=3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(cluster.network_policy_log(node)) as f:
            found = re.findall(r"network_policy\.drops: (dropped .*)", f.read())
        if found:
            return found[-1]
        time.sleep(0.1)
    return None


def _answers(cluster, ns, url, count, timeout=2):
    out = cluster.echo(ns, "get", url, "--count", count, "--timeout", timeout)
    return out["answers"], out["errors"]


def _synced(cluster, node):
    return _last_sync(cluster, node) is not None


def _last_sync(cluster, node):
    try:
        with open(cluster.kube_proxy_log(node)) as f:
            found = re.findall(r"INFO kube_proxy: ((?:full|partial) sync .*)", f.read())
    except FileNotFoundError:
        return None
    return found[-1] if found else None


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the Service did not come up within %d s" % timeout)
        time.sleep(0.1)
