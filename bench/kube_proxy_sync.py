#!/usr/bin/env python3
"""kube_proxy sync times at scale, per proxy mode, rules really applied to a kernel.

    sudo .venv/bin/python bench/kube_proxy_sync.py [--services 1000,10000] [--runs 3] [--modes iptables,nftables]

For each mode and N: N ClusterIP Services x 5 endpoints go through the real pipeline
(manifest-shaped objects -> ChangeTracker -> proxier -> iptables-restore or nft -f)
into a fresh network namespace made by a podnet Lab (never the root
namespace's tables; no packet is sent). Figures are wall times of
`proxier.sync()` (rendering + restore + bookkeeping), median over --runs:

  floor          the same rules loaded in one go into an empty namespace: one plain
                 `iptables-restore` (no --noflush) of the ruleset, or one `nft -f` of
                 the table: the least any full sync can cost here
  first sync     a proxier's first (full) sync into an empty namespace, incl. reading it
  full sync      a periodic full sync (iptables: our chains read back, those that differ
                 rewritten; nftables: the whole table rewritten in one transaction)
  restart sync   a new proxier's first sync over its predecessor's rules (iptables reads
                 them back; nftables lists the table's chains and sets, then rewrites it)
  1 endpoint     one endpoint of one Service replaced (a partial sync)
  add/remove svc one Service added, one removed (partial syncs touching the dispatch:
                 KUBE-SERVICES, or the service-ips map)

Results go to docs/performance.md (kube_proxy section).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kube_proxy import iptables as ipt  # noqa: E402
from kube_proxy import nftables as nft  # noqa: E402
from kube_proxy.proxier import Config  # noqa: E402
from kube_proxy.tracker import ChangeTracker  # noqa: E402
from lab import manifests as k8s  # noqa: E402
from lab.cluster import Lab  # noqa: E402
from podnet.net.netns import entered  # noqa: E402

ENDPOINTS = 5
HTTP = {"name": "http", "port": 80, "targetPort": 8080}
HTTP_EP = {"name": "http", "port": 8080}
CONFIG = Config(cluster_cidr=("10.244.0.0/16",))


def cluster_ip(i):
    return "10.%d.%d.%d" % (96 + (i >> 16), (i >> 8) & 255, i & 255)


def endpoint_ip(j):
    return "10.%d.%d.%d" % (244 + (j >> 16), (j >> 8) & 255, j & 255)


def objects(n):
    svcs = [k8s.service("svc%d" % i, cluster_ip(i + 1), [HTTP], namespace="ns%d" % (i // 100)) for i in range(n)]
    slices = [k8s.endpoint_slice("svc%d" % i, [(endpoint_ip(i * ENDPOINTS + e + 1), "node%d" % (e % 3))
                                               for e in range(ENDPOINTS)], [HTTP_EP], namespace="ns%d" % (i // 100))
              for i in range(n)]
    return svcs, slices


def new_tracker(svcs, slices):
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    t.replace("Service", svcs)
    t.replace("EndpointSlice", slices)
    return t


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def fmt(seconds):
    return "%.0f ms" % (seconds * 1000) if seconds < 1 else "%.2f s" % seconds


def floor_input(mode, state):
    """(argv, input) loading the same rules in one go into an empty namespace."""
    if mode == "iptables":
        ruleset = ipt.render(state, CONFIG)
        return ["iptables-restore", "-w"], "".join(line + "\n" for line in ipt.restore_input(ruleset).splitlines()
                                                   if line != "-S")
    ports = {name: nft.render_service_port(sp, state.endpoints_for(name), CONFIG)
             for name, sp in state.service_ports.items()}
    return ["nft", "-f", "-"], nft.full_sync_text(CONFIG, ports, nft.Elements().rebuild(ports))


def new_proxier(mode):
    return ipt.IptablesProxier(CONFIG) if mode == "iptables" else nft.NftablesProxier(CONFIG)


def bench(lab, mode, n, runs, log):
    svcs, slices = objects(n)
    results = {}
    floors, firsts, fulls, restarts, ones, adds, removes = [], [], [], [], [], [], []
    rules = None
    tag = mode[:3]
    for run in range(runs):
        ns = lab.namespace("kp%s%d-%d" % (tag, n, run))
        with entered(ns.path):
            # the floor: the same rules loaded in one go into an empty namespace
            tracker = new_tracker(svcs, slices)
            argv, text = floor_input(mode, tracker.take().state)
            floor_ns = lab.namespace("kpf%s%d-%d" % (tag, n, run))
            with entered(floor_ns.path):
                t, proc = timed(lambda: subprocess.run(argv, input=text.encode(), capture_output=True))
                assert proc.returncode == 0, proc.stderr
                floors.append(t)

            tracker = new_tracker(svcs, slices)
            proxier = new_proxier(mode)
            proxier.setup()
            t, result = timed(lambda: proxier.sync(tracker.take()))
            firsts.append(t)
            rules = result.rules

            tracker.request_full_sync("bench")
            t, result = timed(lambda: proxier.sync(tracker.take()))
            assert result.full
            fulls.append(t)

            for k in range(5):          # one endpoint replaced in Service k * n/5
                i = k * n // 5 + 7
                eps = [(endpoint_ip(i * ENDPOINTS + e + 1), "node1") for e in range(ENDPOINTS - 1)]
                eps.append(("10.250.%d.%d" % (run, k + 1), "node1"))
                tracker.update_slice(k8s.endpoint_slice("svc%d" % i, eps, [HTTP_EP], namespace="ns%d" % (i // 100)))
                t, result = timed(lambda: proxier.sync(tracker.take()))
                assert not result.full and result.changed == 1
                ones.append(t)

            extra = k8s.service("extra%d" % run, "10.127.0.%d" % (run + 1), [HTTP])
            tracker.update_service(extra)
            tracker.update_slice(k8s.endpoint_slice("extra%d" % run, [("10.250.0.%d" % e, "node1")
                                                                      for e in range(1, 6)], [HTTP_EP]))
            t, result = timed(lambda: proxier.sync(tracker.take()))
            adds.append(t)
            tracker.delete_service(extra)
            t, result = timed(lambda: proxier.sync(tracker.take()))
            removes.append(t)

            tracker2 = new_tracker(svcs, slices)
            proxier2 = new_proxier(mode)
            t, result = timed(lambda: proxier2.sync(tracker2.take()))
            restarts.append(t)
        log("  %s N=%d run %d: floor %s, first %s, full %s, restart %s, 1 endpoint %s"
            % (mode, n, run + 1, fmt(floors[-1]), fmt(firsts[-1]), fmt(fulls[-1]), fmt(restarts[-1]),
               fmt(statistics.median(ones[-5:]))))
    med = statistics.median
    results = {"floor": med(floors), "first": med(firsts), "full": med(fulls), "restart": med(restarts),
               "one": med(ones), "one_max": max(ones), "add": med(adds), "remove": med(removes), "rules": rules}
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", default="1000,10000")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--modes", default="iptables,nftables", help="comma-separated (default: both)")
    opts = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (it makes network namespaces)")

    def log(text):
        print(text, file=sys.stderr, flush=True)

    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("iptables", "nftables"):
            sys.exit("unknown mode %r (have: iptables, nftables)" % mode)
    rows = []
    with Lab(prefix="kpbench") as lab:
        for n in (int(x) for x in opts.services.split(",")):
            for mode in modes:
                log("%s: N=%d Services x %d endpoints" % (mode, n, ENDPOINTS))
                rows.append((mode, n, bench(lab, mode, n, opts.runs, log)))
    print("| mode | Services (x5 endpoints) | rules | floor: one load into an empty netns | first sync "
          "| full sync | full / floor | restart sync | 1 endpoint changed (median / max) | Service added "
          "| Service removed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, n, r in rows:
        rules = " / ".join("%s %d" % kv for kv in sorted(r["rules"].items()))
        print("| %s | %d | %s | %s | %s | %s | %.2fx | %s | %s / %s | %s | %s |" % (
            mode, n, rules, fmt(r["floor"]), fmt(r["first"]), fmt(r["full"]), r["full"] / r["floor"],
            fmt(r["restart"]), fmt(r["one"]), fmt(r["one_max"]), fmt(r["add"]), fmt(r["remove"])))


if __name__ == "__main__":
    main()
