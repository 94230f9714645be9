"""What a scrape costs: kube-proxy's and calico_lite's /metrics over podnet/httpd.py.

    sudo .venv/bin/python bench/metrics_scrape.py [--scrapes 500]

- kube-proxy: a Metrics after 100 syncs (17,000 nat rules, 1,000 service ports),
  its exposition rendered in-process, and GET /metrics over loopback (a new
  connection each time, as Prometheus keeps none open between scrapes);
- calico_lite: a speaker with 50 configured peers (a reflector's size in
  ANCHORS.md), GET /metrics and /readyz;
- a node agent's scrape-time route count (calico_lite.metrics.kernel_routes:
  one link dump and one route dump) with 10, 100 and 1,000 routes of ours in
  a network namespace of a lab (needs root; nothing outside the lab is touched).
Prints medians and p90s in ms.
"""
import argparse
import http.client
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from calico_lite import metrics as cm  # noqa: E402
from calico_lite.bgp.session import PeerConfig  # noqa: E402
from calico_lite.bgp.speaker import Speaker  # noqa: E402
from kube_proxy import metrics as km  # noqa: E402
from kube_proxy.proxier import SyncResult  # noqa: E402
from podnet import httpd  # noqa: E402


def spread(times):
    times = sorted(times)
    return statistics.median(times) * 1e3, times[int(0.9 * (len(times) - 1))] * 1e3


def get_times(port, path, n):
    times, size = [], 0
    for _ in range(n):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        size = len(conn.getresponse().read())
        conn.close()
        times.append(time.perf_counter() - started)
    return spread(times) + (size,)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scrapes", type=int, default=500)
    n = p.parse_args().scrapes

    m = km.Metrics()
    for i in range(100):
        m.synced(SyncResult(full=i == 0, seconds=0.01 * i, rules={"nat": 17000, "filter": 30}), 1000, 5000)
    renders = []
    for _ in range(n):
        started = time.perf_counter()
        m.render()
        renders.append(time.perf_counter() - started)
    print("kube-proxy render(): median %.2f ms, p90 %.2f ms" % spread(renders))
    server = httpd.serve(("127.0.0.1", 0), m.routes("metrics"))
    print("kube-proxy GET /metrics: median %.2f ms, p90 %.2f ms, %d bytes" % get_times(server.server_address[1],
                                                                                     "/metrics", n))
    server.shutdown()
    server.server_close()

    speaker = Speaker(64512, "10.0.0.1", listen_address="127.0.0.1", port=None)
    speaker.start_in_thread()
    for i in range(50):
        speaker.add_peer(PeerConfig("127.0.1.%d" % (2 + i), 64512, passive=True))
    metrics = cm.Metrics(lambda: speaker, lambda: 1)
    server = httpd.serve(("127.0.0.1", 0), metrics.routes_for("metrics"))
    time.sleep(0.5)
    for path in ("/metrics", "/readyz"):
        print("calico_lite, 50 peers, GET %s: median %.2f ms, p90 %.2f ms, %d bytes"
              % ((path,) + get_times(server.server_address[1], path, n)))
    server.shutdown()
    server.server_close()
    speaker.stop_thread()

    if os.geteuid() != 0:
        print("(not root: the kernel route count is skipped)")
        return
    from lab.cluster import Lab
    from podnet.net.netns import entered
    with Lab() as lab:
        ns = lab.namespace("scrape")
        for count in (10, 100, 1000):
            path = os.path.join(lab.workdir, "routes%d" % count)
            with open(path, "w") as f:
                f.writelines("route replace blackhole 10.%d.%d.0/26 proto 78\n" % (i // 250, i % 250)
                             for i in range(count))
            ns.run(["ip", "-batch", path])
            times = []
            with entered(ns.path):
                for _ in range(50):
                    started = time.perf_counter()
                    cm.kernel_routes()
                    times.append(time.perf_counter() - started)
            print("kernel_routes() with %d routes: median %.2f ms, p90 %.2f ms" % ((count,) + spread(times)))


if __name__ == "__main__":
    main()
