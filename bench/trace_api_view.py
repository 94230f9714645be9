#!/usr/bin/env python3
"""What `podnet trace --kubeconfig` fetches from the API: targeted lists against full ones.

    .venv/bin/python bench/trace_api_view.py [--pods 30000] [--services 3000] [--policies 1000]

The scripted API server of the tests (tests/fake_kube_api.py: real HTTP, the API's JSON and
selectors; no kube-apiserver can run here) holds a cluster of --pods pods in 100 namespaces,
--services Services with an EndpointSlice of 5 endpoints each, and --policies NetworkPolicies.
For three traces (pod -> pod by name, pod -> svc/NS/NAME, pod -> a ClusterIP, which falls back
to listing every Service), diagnose.trace.load_view is run with SRC/DST (the targeted lists)
and without (every object of six kinds, as before), side by side in one run: requests made,
objects and bytes received (the objects as JSON), seconds (median of 3). The server's own speed
is not a kube-apiserver's; the objects and bytes are what a real one would send.
No root needed: no kernel state is read.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from diagnose.trace import load_view  # noqa: E402
from lab import manifests as k8s  # noqa: E402

from fake_kube_api import FakeKubeApi  # noqa: E402

NAMESPACES = 100


def pod_ip(i):
    return "10.%d.%d.%d" % (64 + (i >> 16), (i >> 8) & 255, i & 255)


def build(api, pods, services, policies):
    for n in range(2):
        api.add_node("node%d" % n, pod_cidr="10.%d.0.0/16" % (64 + n), internal_ip="192.168.0.%d" % (10 + n))
    for n in range(NAMESPACES):
        api.add_object("Namespace", {"metadata": {"name": "ns%d" % n, "labels": {"team": "t%d" % (n % 10)}}})
    for i in range(pods):
        ns = "ns%d" % (i % NAMESPACES)
        api.add_object("Pod", {"metadata": {"name": "p%d" % i, "namespace": ns, "labels": {"app": "a%d" % (i % 500)}},
                               "spec": {"nodeName": "node%d" % (i % 2), "containers": [{"name": "c"}]},
                               "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]}})
    for s in range(services):
        ns = "ns%d" % (s % NAMESPACES)
        api.add_object("Service", k8s.service("s%d" % s, "10.96.%d.%d" % (s >> 8, s & 255),
                                              [{"port": 80, "targetPort": 8080}], namespace=ns))
        # pods of the Service's own namespace (pod i is in namespace i % NAMESPACES)
        eps = [(pod_ip((s + NAMESPACES * 7 * k) % pods), "node%d" % (k % 2)) for k in range(5)]
        api.add_object("EndpointSlice", k8s.endpoint_slice("s%d" % s, eps, [{"port": 8080}], namespace=ns))
    for p in range(policies):
        ns = "ns%d" % (p % NAMESPACES)
        api.add_object("NetworkPolicy", {"metadata": {"name": "np%d" % p, "namespace": ns},
                                         "spec": {"podSelector": {"matchLabels": {"app": "a%d" % (p % 500)}},
                                                  "policyTypes": ["Ingress"],
                                                  "ingress": [{"from": [{"podSelector": {}}]}]}})


def measure(api, kubeconfig, source, destination, rounds=3):
    times = []
    for _ in range(rounds):
        api.requests.clear()
        started = time.perf_counter()
        view = load_view(None, kubeconfig, None, source, destination)
        times.append(time.perf_counter() - started)
    objects = [o for bucket in (view.pods, view.namespaces, view.services, view.slices, view.policies, view.nodes)
               for o in bucket]
    return {"requests": len(api.requests), "objects": len(objects),
            "bytes": len(json.dumps(objects)), "seconds": statistics.median(times)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pods", type=int, default=30000)
    p.add_argument("--services", type=int, default=3000)
    p.add_argument("--policies", type=int, default=1000)
    opts = p.parse_args()
    api = FakeKubeApi()
    try:
        build(api, opts.pods, opts.services, opts.policies)
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = api.kubeconfig(tmp)
            last = opts.services - 1
            cases = [("pod -> pod", "ns1/p1", "ns2/p2:8080"),
                     ("pod -> svc/NS/NAME", "ns1/p1", "svc/ns%d/s%d:80" % (last % NAMESPACES, last)),
                     ("pod -> ClusterIP", "ns1/p1", "10.96.%d.%d:80" % (last >> 8, last & 255))]
            print("%d pods, %d Services (5 endpoints each), %d NetworkPolicies, %d namespaces"
                  % (opts.pods, opts.services, opts.policies, NAMESPACES))
            full = measure(api, kubeconfig, None, None)
            print("%-20s %9s %9s %12s %9s" % ("", "requests", "objects", "bytes", "seconds"))
            row = "%-20s %9d %9d %12d %9.3f"
            print(row % ("every object (before)", full["requests"], full["objects"], full["bytes"], full["seconds"]))
            for name, source, destination in cases:
                m = measure(api, kubeconfig, source, destination)
                print(row % (name, m["requests"], m["objects"], m["bytes"], m["seconds"]))
    finally:
        api.close()


if __name__ == "__main__":
    main()
