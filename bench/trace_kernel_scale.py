#!/usr/bin/env python3
"""`podnet trace` as an operator runs it on a node with 10,000 Services: the whole command (python
start, the objects from a manifests directory, the kernel read, the walk) in a network namespace
whose nat table holds kube-proxy's real iptables rules for every Service (5 endpoints each), with
1,000 NetworkPolicies in the source pod's namespace. Side by side: the rules the trace needs
(the default: FORWARD, the dispatch chains and the Service's own chains) and `--all-rules`
(iptables-save and `nft list ruleset` of everything, what a trace read before).

    sudo .venv/bin/python bench/trace_kernel_scale.py [--services 10000] [--policies 1000] [--runs 5] [--no-all-rules]
    sudo LIVE=1 .venv/bin/python bench/trace_kernel_scale.py ...      # also once with --live from pod a

Everything lives in namespaces of a podnet Lab (removed afterwards); no packet is sent.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from kube_proxy_sync import new_proxier, new_tracker, objects  # noqa: E402

from diagnose import snapshot  # noqa: E402
from diagnose.trace import load_view, rule_scope  # noqa: E402
from lab import manifests as k8s  # noqa: E402
from lab.cluster import Lab  # noqa: E402
from podnet.net.netns import entered  # noqa: E402

SRC_IP = "10.244.1.2"


def pod(name, ip):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                            "labels": {"app": name}},
            "spec": {"nodeName": "node1", "containers": [{"name": "m"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def policies(n):
    return [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "p%d" % i, "namespace": "default"},
             "spec": {"podSelector": {"matchLabels": {"app": "x%d" % i}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}} for i in range(n)]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--policies", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-all-rules", action="store_true", help="skip the (minute-long) full read")
    opts = p.parse_args()
    svcs, slices = objects(opts.services)
    last = svcs[-1]["metadata"]
    dst = "svc/%s/%s:80" % (last["namespace"], last["name"])
    with Lab() as lab, tempfile.TemporaryDirectory() as manifests:
        k8s.write(manifests, "services.json", *svcs)
        k8s.write(manifests, "slices.json", *slices)
        k8s.write(manifests, "policies.json", *policies(opts.policies))
        k8s.write(manifests, "pods.json", pod("a", SRC_IP),
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        ns = lab.namespace("trace10k")
        for argv in (["link", "add", "cni0", "type", "bridge"], ["addr", "add", "10.244.1.1/24", "dev", "cni0"],
                     ["link", "set", "cni0", "up"], ["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
                     ["addr", "add", "192.168.50.1/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["link", "set", "eth0p", "up"], ["route", "add", "10.244.0.0/16", "via", "192.168.50.2"],
                     ["route", "add", "default", "via", "192.168.50.2"]):
            ns.ip(*argv)
        ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        pod_ns = lab.namespace("trace10k-a")       # pod a itself, for --live's probe
        ns.ip("link", "add", "veth-a", "type", "veth", "peer", "name", "eth0", "netns", pod_ns.path)
        ns.ip("link", "set", "veth-a", "master", "cni0", "up")
        for argv in (["addr", "add", SRC_IP + "/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["route", "add", "default", "via", "10.244.1.1"]):
            pod_ns.ip(*argv)
        with entered(ns.path):
            # written as kube-proxy writes them (its proxier's first sync): a plain iptables-restore
            # of the same rules leaves a table whose iptables-save is ten times slower here
            proxier = new_proxier("iptables")
            proxier.setup()
            t, _ = timed(lambda: proxier.sync(new_tracker(svcs, slices).take()))
            print("kube-proxy (iptables mode) wrote %d Services' rules in %.1f s" % (opts.services, t))
            view = load_view(manifests, None, None)
            scope = rule_scope(view, dst)
            t, snap = timed(lambda: snapshot.take(scope=scope))
            print("the scoped kernel read alone: %.0f ms (%d nat lines)" % (t * 1000, snap.iptables_save.count("\n")))
            if os.environ.get("PROFILE"):     # each command the scoped read runs, timed
                from podnet.net import nft as nft_mod
                real = snapshot.run

                def traced(argv, **kw):
                    t0 = time.perf_counter()
                    out = real(argv, **kw)
                    print("  %5.0f ms  %s" % ((time.perf_counter() - t0) * 1000, " ".join(argv)[:90]))
                    return out
                snapshot.run = nft_mod.run = traced
                snapshot.take(scope=scope)
                snapshot.run = nft_mod.run = real
            t_view, view = timed(lambda: load_view(manifests, None, None))
            print("listing the objects from the manifests directory: %.0f ms" % (t_view * 1000))
            t, _ = timed(lambda: subprocess.run([sys.executable, "-c", "import cli.main, diagnose.trace, "
                                                 "kube_proxy.model, network_policy.model"], cwd=ROOT, env=dict(
                                                     os.environ, PYTHONPATH=ROOT)))
            print("python start-up and imports: %.0f ms" % (t * 1000))
            command = [sys.executable, "-m", "cli.main", "trace", "default/a", dst, "--manifests", manifests,
                       "--hostname-override", "node1", "--json"]
            env = dict(os.environ, PYTHONPATH=ROOT)
            samples = []
            for _ in range(opts.runs):
                t, proc = timed(lambda: subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=600))
                verdict = json.loads(proc.stdout)["verdict"]
                assert verdict == "delivered", proc.stdout.decode()[-2000:]
                samples.append(t)
            print("podnet trace pod -> the last Service (scoped rules): median %.2f s, max %.2f s over %d runs" % (
                statistics.median(samples), max(samples), len(samples)))
            if os.environ.get("LIVE"):     # --live from pod a: trace events at this scale
                t, proc = timed(lambda: subprocess.run(command + ["--live", "--probe-netns", pod_ns.path],
                                                       capture_output=True, env=env,
                                                       cwd=ROOT, timeout=600))
                print("podnet trace ... --live: %.1f s: %s" % (t, json.loads(proc.stdout)["live"].get("summary")))
            if not opts.no_all_rules:
                t, proc = timed(lambda: subprocess.run(command + ["--all-rules"], capture_output=True, env=env,
                                                       cwd=ROOT, timeout=900))
                result = json.loads(proc.stdout)
                assert result["verdict"] == "delivered", result["failed_hop"]
                print("podnet trace ... --all-rules (every rule read): %.1f s, one run" % t)
                t, _ = timed(lambda: snapshot.take())
                print("  the full read alone (what doctor reads): %.1f s" % t)
                for argv in (["iptables-save"], ["nft", "-j", "list", "ruleset"]):
                    t, _ = timed(lambda: subprocess.run(argv, capture_output=True, timeout=900))
                    print("  for comparison, %s: %.1f s" % (" ".join(argv), t))


if __name__ == "__main__":
    main()
