#!/usr/bin/env python3
"""flanneld --kube-subnet-mgr at scale: 1,000 Node objects, one real daemon, a real kernel.

    sudo .venv/bin/python bench/flanneld_kube_scale.py [--nodes 1000] [--events 20] [--relists 3]

A lab (lab.cluster.KubeFlannelCluster): one node namespace running `python -m
flanneld.daemon --kube-subnet-mgr` (vxlan, the defaults: --reconcile-period 5),
and the scripted API server of the tests (tests/fake_kube_api.py; no
kube-apiserver can run here) holding --nodes Node objects annotated as upstream
flannel annotates them, so the daemon programs 3 kernel entries (route, neighbour,
FDB) per node. Reported:

- start: flanneld started -> /readyz 200 (list of every Node in pages of 500, one
  sync programming every entry), and the entries in the kernel afterwards;
- RSS: VmRSS after start, after the events, after the relists; VmHWM (peak);
- event -> route: a Node added to the API -> its route in the kernel (`ip route
  get` into its subnet leaves through flannel.1), and a Node deleted -> the route
  gone, --events of each, median and p90 (the route lookup is polled every 0.5 ms);
- full relist: every watch dropped, a Node added, the history compacted, so the
  resumed watch gets 410 Gone and lists everything again: from that list request
  to the new Node's route (list + cache diff + one sync), median of --relists;
- the backend sync's cost from the daemon's own histogram
  (flanneld_backend_sync_duration_seconds, reconcile rounds: every entry diffed),
  and the daemon's CPU while idle (utime + stime over 10 s, reconcile rounds included).
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from lab.cluster import KubeFlannelCluster, Lab  # noqa: E402
from podnet.net.ip import parse_ip  # noqa: E402
from podnet.net.netlink import Netlink  # noqa: E402

from fake_kube_api import FakeKubeApi  # noqa: E402

P = "flannel.alpha.coreos.com/"
HEALTHZ = 8081


def subnet(i):
    """The i-th /24 of 10.0.0.0/8 (0 is the bench node's own)."""
    return "10.%d.%d.0/24" % (i >> 8, i & 255)


def annotations(i):
    mac = "02:%02x:%02x:%02x:%02x:%02x" % (0x10, (i >> 16) & 255, (i >> 8) & 255, i & 255, 1)
    return {P + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % mac, P + "backend-type": "vxlan",
            P + "kube-subnet-manager": "true", P + "public-ip": "172.16.%d.%d" % (i >> 8, i & 255)}


def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_get(node, path):
    out = node.run(["curl", "-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}",
                    "http://127.0.0.1:%d%s" % (HEALTHZ, path)], check=False).stdout
    body, _, status = out.rpartition("\n")
    return (int(status) if status.isdigit() else 0), body


def metric(node, name):
    _, body = http_get(node, "/metrics")
    for line in body.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait(predicate, timeout, what, interval=0.0005):
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)
    return time.monotonic()


def routed(nl, vtep_index, i):
    """Does a packet into subnet(i) leave through the VTEP?"""
    route = nl.route_get(parse_ip(subnet(i).replace(".0/24", ".9")))
    return route is not None and route.oif == vtep_index


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--relists", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()
    out = {"nodes": args.nodes}
    with Lab() as lab:
        c = KubeFlannelCluster(lab, nodes=1, backend="vxlan", network="10.0.0.0/8", ip_masq=True,
                               flanneld_args=["--healthz-port", str(HEALTHZ)])
        ns, ip = c.api_namespace()
        api = FakeKubeApi(host=ip, port=c.API_PORT, netns=ns.path, bookmark_interval=5.0)
        try:
            c.api_url = api.url
            api.add_node("node1", pod_cidr=subnet(0))
            for i in range(1, args.nodes + 1):
                api.add_node("n%05d" % i, pod_cidr=subnet(i), annotations=annotations(i))
            node = c._new_node("node1", c.underlay)
            t0 = time.monotonic()
            proc = c.start_flanneld(node)
            wait(lambda: http_get(node, "/readyz")[0] == 200, 120, "/readyz 200", interval=0.05)
            out["start_to_ready_s"] = time.monotonic() - t0
            nl = Netlink(netns=node.path)
            try:
                vtep = nl.link("flannel.1").index
                out["kernel_routes"] = sum(1 for r in nl.routes() if r.protocol == 77)
                out["kernel_fdb"] = sum(1 for e in nl.fdb(vtep) if e.dst is not None)
                out["rss_after_start_mb"] = proc_status(proc.pid, "VmRSS")

                adds, dels = [], []
                for k in range(args.events):
                    i = args.nodes + 1 + k
                    t = time.monotonic()
                    api.add_node("e%05d" % i, pod_cidr=subnet(i), annotations=annotations(i))
                    adds.append(wait(lambda i=i: routed(nl, vtep, i), 10, "route of e%d" % i) - t)
                    time.sleep(0.05)
                    t = time.monotonic()
                    api.delete_node("e%05d" % i)
                    dels.append(wait(lambda i=i: not routed(nl, vtep, i), 10, "e%d's route to go" % i) - t)
                    time.sleep(0.05)
                out["event_to_route_ms"] = {"median": statistics.median(adds) * 1e3, "p90": pct(adds, 90) * 1e3}
                out["delete_to_gone_ms"] = {"median": statistics.median(dels) * 1e3, "p90": pct(dels, 90) * 1e3}
                out["rss_after_events_mb"] = proc_status(proc.pid, "VmRSS")

                relists = []
                for k in range(args.relists):
                    i = args.nodes + args.events + 1 + k
                    before = len(api.requests)
                    api.drop_watches()
                    api.add_node("r%05d" % i, pod_cidr=subnet(i), annotations=annotations(i))
                    api.compact()
                    done = wait(lambda i=i: routed(nl, vtep, i), 60, "the relist to bring r%d" % i)
                    lists = [r for r in api.requests[before:] if r.path == "/api/v1/nodes"
                             and r.query.get("watch") != "true" and not r.query.get("continue")]
                    relists.append(done - lists[0].at)
                    wait(lambda: api.watch_count() >= 1, 30, "the watch to be back", interval=0.01)
                out["relist_to_route_s"] = {"median": statistics.median(relists), "max": max(relists)}
                out["relists_seen"] = metric(node, "flanneld_kube_relists_total")
                out["rss_after_relists_mb"] = proc_status(proc.pid, "VmRSS")
                out["rss_peak_mb"] = proc_status(proc.pid, "VmHWM")

                time.sleep(6)               # a reconcile round or more with every entry in place
                total = metric(node, 'flanneld_backend_sync_duration_seconds_sum{trigger="reconcile"}')
                count = metric(node, 'flanneld_backend_sync_duration_seconds_count{trigger="reconcile"}')
                out["reconcile_sync_ms"] = total / count * 1e3 if count else None
                cpu0 = cpu_seconds(proc.pid)
                time.sleep(10)
                out["idle_cpu_percent"] = (cpu_seconds(proc.pid) - cpu0) / 10 * 100
            finally:
                nl.close()
            c.stop_flanneld(node)
        finally:
            api.close()
    print("flanneld --kube-subnet-mgr, vxlan, %d Node objects (3 kernel entries each)" % args.nodes)
    print("  start -> /readyz 200:              %.2f s  (%d routes, %d FDB entries in the kernel)"
          % (out["start_to_ready_s"], out["kernel_routes"], out["kernel_fdb"]))
    print("  RSS after start / events / relists: %.1f / %.1f / %.1f MiB (peak %.1f MiB)"
          % (out["rss_after_start_mb"], out["rss_after_events_mb"], out["rss_after_relists_mb"],
             out["rss_peak_mb"]))
    print("  Node added -> route:               median %.1f ms, p90 %.1f ms (%d events)"
          % (out["event_to_route_ms"]["median"], out["event_to_route_ms"]["p90"], args.events))
    print("  Node deleted -> route gone:        median %.1f ms, p90 %.1f ms"
          % (out["delete_to_gone_ms"]["median"], out["delete_to_gone_ms"]["p90"]))
    print("  410 Gone relist -> new route:      median %.3f s, max %.3f s (%d relists)"
          % (out["relist_to_route_s"]["median"], out["relist_to_route_s"]["max"], args.relists))
    print("  reconcile round (diff of every entry): %.1f ms; idle CPU %.1f %%"
          % (out["reconcile_sync_ms"] or 0, out["idle_cpu_percent"]))
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
