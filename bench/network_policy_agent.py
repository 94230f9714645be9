#!/usr/bin/env python3
"""The NetworkPolicy agent around the model: what the loop, NFLOG parsing and the daemon cost.

    sudo .venv/bin/python bench/network_policy_agent.py [--policies 1000 --pods 10000 --namespaces 100]
                                                          [--runs 5] [--quick] [--no-daemon]

The objects are bench/network_policy_sync.py's (API-shaped Namespaces, Pods, NetworkPolicies).
Figures, medians over --runs:

  initial list   the three RELISTs through PolicyAgent.apply (ObjectCache, parse_or_skip,
                 PolicyModel.set_*): the Python cost before the first sync can run
  pod event      one pod relabelled (a MODIFIED event) through apply
  policy event   one policy's port changed through apply
  NFLOG packet   one datagram the kernel sent (tests/test_nflog.py's bytes) parsed into a
                 LoggedPacket, and its drop line formatted
  daemon         `podnet network-policy --manifests DIR` in a network namespace a podnet Lab
                 makes (never the root namespace): process start -> /readyz 200 (the first
                 full sync done); then a policy file written -> the agent's synced_through
                 past the write (the change in the kernel), the manifests polled every 0.2 s
                 and --min-sync-period 0.2 s as in the lab

Results go to docs/performance.md (network_policy agent section).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import network_policy_sync as shapes  # noqa: E402

from lab import manifests as k8s  # noqa: E402
from lab.cluster import Lab  # noqa: E402
from network_policy.agent import DropLogger, PolicyAgent  # noqa: E402
from network_policy.model import PolicyModel  # noqa: E402
from podnet.kube.events import MODIFIED, RELIST, Event  # noqa: E402
from podnet.net import nflog  # noqa: E402

KERNEL_TCP4 = bytes.fromhex(
    "840000000004000000000000000000000200000708000100080003000e000a00696e67726573732078000000080005000000000108"
    "000b000000000008000e0000000000400009004500003cf1aa400040064b0f7f0000017f000001b35a0051ed3b90ff00000000a002"
    "ffd7fe3000000204ffd70402080ad8050d85000000000103030a")


class NoDataplane:
    def sync(self, full=False):
        raise RuntimeError("not here")

    def cleanup(self):
        pass

    def drop_counts(self):
        return {}


def fmt(seconds):
    if seconds < 1e-3:
        return "%.1f us" % (seconds * 1e6)
    return "%.1f ms" % (seconds * 1000) if seconds < 1 else "%.2f s" % seconds


def objects(opts):
    return (shapes.namespaces(opts.namespaces), [shapes.pod(j, opts.namespaces) for j in range(opts.pods)],
            [shapes.policy(i, opts.namespaces) for i in range(opts.policies)])


def bench_loop(opts, log):
    nss, pods, pols = objects(opts)
    lists, pod_events, policy_events = [], [], []
    for run in range(opts.runs):
        agent = PolicyAgent(PolicyModel(shapes.NODE), NoDataplane(), shapes.NODE)
        start = time.perf_counter()
        agent.apply(Event(RELIST, "Namespace", nss))
        agent.apply(Event(RELIST, "Pod", pods))
        agent.apply(Event(RELIST, "NetworkPolicy", pols))
        lists.append(time.perf_counter() - start)
        for k in range(20):
            relabelled = json.loads(json.dumps(pods[k * 7]))
            relabelled["metadata"]["labels"]["tier"] = "db" if relabelled["metadata"]["labels"]["tier"] != "db" else "web"
            start = time.perf_counter()
            agent.apply(Event(MODIFIED, "Pod", relabelled))
            pod_events.append(time.perf_counter() - start)
            changed = shapes.policy(k * 3, opts.namespaces, extra_port=9000 + run * 100 + k)
            start = time.perf_counter()
            agent.apply(Event(MODIFIED, "NetworkPolicy", changed))
            policy_events.append(time.perf_counter() - start)
    log("initial list (%d namespaces, %d pods, %d policies): %s" % (
        opts.namespaces, opts.pods, opts.policies, fmt(statistics.median(lists))))
    log("pod event: %s; policy event: %s" % (fmt(statistics.median(pod_events)),
                                             fmt(statistics.median(policy_events))))
    agent = PolicyAgent(PolicyModel(shapes.NODE), NoDataplane(), shapes.NODE)
    agent.apply(Event(RELIST, "Pod", [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x"},
                                      "spec": {"nodeName": "n"}, "status": {"podIPs": [{"ip": "127.0.0.1"}]}}]))
    drops = DropLogger(agent, 100)
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        for _mtype, _, payload in nflog.parse_messages(KERNEL_TCP4):
            agent.drop_line(nflog.parse_packet_message(payload))
    log("NFLOG packet (parse + drop line): %s" % fmt((time.perf_counter() - start) / n))
    del drops


def _get(ns, path, port=10265):
    out = ns.run(["curl", "-s", "-m", "2", "-o", "-", "-w", "\\n%{http_code}", "http://127.0.0.1:%d%s" % (port, path)],
                 check=False).stdout
    body, _, status = out.rpartition("\n")
    return (int(status) if status.isdigit() else 0), body


def _synced_through(ns):
    status, body = _get(ns, "/metrics")
    for line in body.splitlines():
        if line.startswith("podnet_network_policy_synced_through_timestamp_seconds "):
            return float(line.split()[1])
    return 0.0


def bench_daemon(opts, log):
    nss, pods, pols = objects(opts)
    with Lab() as lab:
        ns = lab.namespace("node0")
        manifests = os.path.join(lab.workdir, "manifests")
        k8s.write(manifests, "namespaces.json", *nss)
        k8s.write(manifests, "pods.json", *pods)
        k8s.write(manifests, "policies.json", *pols)
        logfile = os.path.join(lab.workdir, "agent.log")
        with open(logfile, "w") as f:
            start = time.monotonic()
            ns.popen([sys.executable, "-m", "cli.main", "network-policy", "--manifests", manifests,
                      "--manifests-interval", "0.2", "--min-sync-period", "0.2", "--hostname-override", shapes.NODE],
                     stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
            deadline = start + 300
            while _get(ns, "/readyz")[0] != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("the agent did not become ready:\n" + open(logfile).read()[-3000:])
                time.sleep(0.05)
            log("daemon start -> ready (%d pods, %d policies): %s" % (opts.pods, opts.policies,
                                                                     fmt(time.monotonic() - start)))
        waits = []
        for run in range(opts.runs):
            extra = shapes.policy(0, opts.namespaces, extra_port=9000 + run)
            extra["metadata"]["name"] = "extra"         # a policy of its own, changed every run
            k8s.write(manifests, "extra.json", extra)
            written = time.time()
            start = time.monotonic()
            while _synced_through(ns) <= written + 0.02:
                if time.monotonic() - start > 60:
                    raise SystemExit("the change never reached the kernel:\n" + open(logfile).read()[-3000:])
                time.sleep(0.02)
            waits.append(time.monotonic() - start)
        log("policy file written -> in the kernel: median %s (min %s, max %s; the poll every 0.2 s is most of it)"
            % (fmt(statistics.median(waits)), fmt(min(waits)), fmt(max(waits))))
        with open(logfile) as f:
            syncs = [line for line in f if " sync" in line and "INFO network_policy:" in line]
        log("agent's last sync: %s" % (syncs[-1].split("INFO network_policy: ")[-1].strip() if syncs else "-"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--policies", type=int, default=1000)
    p.add_argument("--pods", type=int, default=10000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="100 policies, 1,000 pods, 2 runs")
    p.add_argument("--no-daemon", action="store_true", help="only the in-process figures (no root needed)")
    opts = p.parse_args()
    if opts.quick:
        opts.policies, opts.pods, opts.namespaces, opts.runs = 100, 1000, 10, 2

    def log(text):
        print(text, flush=True)
    bench_loop(opts, log)
    if not opts.no_daemon:
        bench_daemon(opts, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
