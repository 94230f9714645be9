"""How long `podnet trace` takes, symbolically, on a node with 10,000 Services and 1,000
NetworkPolicies: the walk on a kernel snapshot written as data (the nat table holding
kube-proxy's DNAT rules for every endpoint), and the objects' listing from a manifests directory.

    .venv/bin/python bench/trace_scale.py [--services 10000] [--policies 1000] [--runs 5]

No root: the snapshot is data (tests/test_trace_unit.py's two flannel nodes), the objects dicts.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from test_trace_unit import A, C, world  # noqa: E402

from diagnose.snapshot import Snapshot  # noqa: E402
from diagnose.trace import NodeState, load_view, walk  # noqa: E402
from lab import manifests as k8s  # noqa: E402

ENDPOINTS = 5


def build(services, policies):
    view, snaps = world()
    nat = ["*nat", ":PREROUTING ACCEPT [0:0]"]
    for i in range(services):
        name = "svc%d" % i
        ip = "10.96.%d.%d" % (i // 250, i % 250 + 1)
        eps = ["10.244.2.%d" % (j + 10) for j in range(ENDPOINTS)]
        view.services.append(k8s.service(name, ip, [{"port": 80, "targetPort": 8080}]))
        view.slices.append(k8s.endpoint_slice(name, [(e, "node2") for e in eps], [{"port": 8080}]))
        nat.append("-A KUBE-SERVICES -d %s/32 -p tcp -m comment --comment \"default/%s cluster IP\" -m tcp "
                   "--dport 80 -j KUBE-SVC-%08d" % (ip, name, i))
        for j, e in enumerate(eps):
            nat.append("-A KUBE-SVC-%08d -m comment --comment default/%s -m statistic --mode random "
                       "--probability 0.2 -j KUBE-SEP-%08d%d" % (i, name, i, j))
            nat.append("-A KUBE-SEP-%08d%d -p tcp -m comment --comment default/%s -m tcp -j DNAT "
                       "--to-destination %s:8080" % (i, j, name, e))
    nat.append("COMMIT")
    for i in range(policies):
        view.policies.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                              "metadata": {"name": "p%d" % i, "namespace": "default"},
                              "spec": {"podSelector": {"matchLabels": {"app": "x%d" % i}},
                                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}})
    snaps["node1"]["iptables_save"] += "\n".join(nat) + "\n"
    return view, {n: NodeState(n, Snapshot.from_dict(s)) for n, s in snaps.items()}


def timed(fn, runs):
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), max(samples), out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--policies", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    opts = p.parse_args()
    view, states = build(opts.services, opts.policies)
    last = "svc/default/svc%d:80" % (opts.services - 1)
    for what, src, dst in (("pod -> pod, across nodes", "default/a", "default/c:8080"),
                           ("pod -> the last Service", "default/a", last)):
        med, worst, trace = timed(lambda: walk(view, states, src, dst, "node1"), opts.runs)
        assert trace.verdict == "delivered", trace.lines()
        print("walk %-26s median %6.1f ms  max %6.1f ms" % (what, med * 1000, worst * 1000))
    with tempfile.TemporaryDirectory() as d:
        k8s.write(d, "services.json", *view.services)
        k8s.write(d, "slices.json", *view.slices)
        k8s.write(d, "policies.json", *view.policies)
        k8s.write(d, "pods.json", *view.pods, *view.namespaces)
        med, worst, _ = timed(lambda: load_view(d, None, None), max(1, opts.runs // 2))
        print("listing the objects from a manifests directory  median %6.1f ms  max %6.1f ms" % (
            med * 1000, worst * 1000))
    print("(%d Services x %d endpoints, %d policies, %d nat rules; A=%s C=%s)" % (
        opts.services, ENDPOINTS, opts.policies, opts.services * (1 + 2 * ENDPOINTS), A, C))


if __name__ == "__main__":
    main()
