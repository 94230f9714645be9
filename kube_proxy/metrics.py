"""kube-proxy's metrics (Prometheus text format) and health endpoints.

The metric names are kube-proxy's, so dashboards and alerts written for it
work unchanged:

  kubeproxy_sync_proxy_rules_duration_seconds          histogram, every sync
  kubeproxy_sync_full_proxy_rules_duration_seconds     histogram, full syncs
  kubeproxy_sync_partial_proxy_rules_duration_seconds  histogram, partial syncs
  kubeproxy_sync_proxy_rules_last_timestamp_seconds    gauge, last successful sync (unix time)
  kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds  gauge, last change received
  kubeproxy_sync_proxy_rules_iptables_total{table}     gauge, rules we own per table
  kubeproxy_sync_proxy_rules_iptables_restore_failures_total  counter: transactions the kernel
    refused (iptables-restore, nft -f, ipset restore), those fault isolation tried included,
    plus syncs that failed as a whole
  podnet_sync_proxy_rules_quarantined_service_ports    gauge, service ports whose rules the
    kernel refused, kept out of syncs until they change (kube_proxy/proxier.py, Quarantine)
  podnet_sync_proxy_rules_quarantined_service_ports_total  counter, times a service port was
    quarantined
  kubeproxy_sync_proxy_rules_service_changes_total, ..._endpoint_changes_total: not kept
    separately; `podnet_sync_changed_service_ports_total` counts rewritten service ports.

/healthz (kube-proxy's --healthz-bind-address) answers 200 while the proxier
keeps up: no change has waited for a sync longer than `timeout`; 503 when one
has (or when the first sync has not happened within `timeout` of start). The
body is kube-proxy's JSON ({"lastUpdated": ..., "currentTime": ...}).
"""
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("kube_proxy.metrics")

# kube-proxy's buckets: exponential from 1 ms, factor 2, 15 of them (to ~16 s)
BUCKETS = tuple(0.001 * 2 ** i for i in range(15))


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value):
        self.total += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name, help_text):
        out = ["# HELP %s %s" % (name, help_text), "# TYPE %s histogram" % name]
        for bound, count in zip(BUCKETS, self.counts):
            out.append('%s_bucket{le="%s"} %d' % (name, repr(round(bound, 6)), count))
        out.append('%s_bucket{le="+Inf"} %d' % (name, self.total))
        out.append("%s_sum %s" % (name, repr(self.sum)))
        out.append("%s_count %d" % (name, self.total))
        return out


class Metrics:
    """What the sync loop reports; read by the HTTP handlers (thread-safe)."""

    def __init__(self, mode="iptables", health_timeout=60.0, clock=time.time):
        self.mode = mode
        self.health_timeout = health_timeout
        self.clock = clock
        self.lock = threading.Lock()
        self.started = clock()
        self.all = Histogram()
        self.full = Histogram()
        self.partial = Histogram()
        self.last_sync = None           # unix time of the last successful sync
        self.last_queued = None         # unix time of the last change received
        self.pending_since = None       # oldest change not yet synced
        self.rules = {}
        self.failures = 0
        self.quarantined = 0
        self.quarantined_total = 0
        self.changed_ports = 0
        self.services = 0
        self.endpoints = 0

    def queued(self):
        with self.lock:
            now = self.clock()
            self.last_queued = now
            if self.pending_since is None:
                self.pending_since = now

    def synced(self, result, services=0, endpoints=0):
        with self.lock:
            self.all.observe(result.seconds)
            (self.full if result.full else self.partial).observe(result.seconds)
            self.last_sync = self.clock()
            self.pending_since = None
            self.rules = dict(result.rules)
            self.changed_ports += result.changed
            self.services, self.endpoints = services, endpoints
            self.failures += result.refused
            self.quarantined = result.in_quarantine
            self.quarantined_total += len(result.quarantined)

    def failed(self):
        with self.lock:
            self.failures += 1

    def health(self):
        """(healthy, JSON body)."""
        with self.lock:
            now = self.clock()
            if self.last_sync is None:
                healthy = now - self.started < self.health_timeout
            else:
                healthy = self.pending_since is None or now - self.pending_since < self.health_timeout
            body = {"lastUpdated": _rfc3339(self.last_sync or self.started), "currentTime": _rfc3339(now),
                    "nodeEligible": True}
        return healthy, json.dumps(body) + "\n"

    def render(self):
        with self.lock:
            out = []
            out += self.all.lines("kubeproxy_sync_proxy_rules_duration_seconds",
                                  "SyncProxyRules latency in seconds")
            out += self.full.lines("kubeproxy_sync_full_proxy_rules_duration_seconds",
                                   "SyncProxyRules latency in seconds for full resyncs")
            out += self.partial.lines("kubeproxy_sync_partial_proxy_rules_duration_seconds",
                                      "SyncProxyRules latency in seconds for partial resyncs")
            out += ["# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds "
                    "The last time proxy rules were successfully synced",
                    "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
                    "kubeproxy_sync_proxy_rules_last_timestamp_seconds %s" % repr(float(self.last_sync or 0))]
            out += ["# HELP kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds "
                    "The last time a sync of proxy rules was queued",
                    "# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge",
                    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds %s"
                    % repr(float(self.last_queued or 0))]
            if self.mode == "iptables":
                out += ["# HELP kubeproxy_sync_proxy_rules_iptables_total Total number of iptables rules owned "
                        "by kube-proxy", "# TYPE kubeproxy_sync_proxy_rules_iptables_total gauge"]
                out += ['kubeproxy_sync_proxy_rules_iptables_total{table="%s"} %d' % (t, n)
                        for t, n in sorted(self.rules.items())]
            else:
                out += ["# HELP podnet_sync_proxy_rules_total Rules (or virtual servers) owned by the proxier",
                        "# TYPE podnet_sync_proxy_rules_total gauge"]
                out += ['podnet_sync_proxy_rules_total{table="%s"} %d' % (t, n)
                        for t, n in sorted(self.rules.items())]
            out += ["# HELP kubeproxy_sync_proxy_rules_iptables_restore_failures_total "
                    "Cumulative proxy restore failures",
                    "# TYPE kubeproxy_sync_proxy_rules_iptables_restore_failures_total counter",
                    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total %d" % self.failures,
                    "# HELP podnet_sync_proxy_rules_quarantined_service_ports Service ports whose rules the "
                    "kernel refused, kept out of syncs until they change",
                    "# TYPE podnet_sync_proxy_rules_quarantined_service_ports gauge",
                    "podnet_sync_proxy_rules_quarantined_service_ports %d" % self.quarantined,
                    "# HELP podnet_sync_proxy_rules_quarantined_service_ports_total Service ports put into "
                    "quarantine",
                    "# TYPE podnet_sync_proxy_rules_quarantined_service_ports_total counter",
                    "podnet_sync_proxy_rules_quarantined_service_ports_total %d" % self.quarantined_total,
                    "# HELP podnet_sync_changed_service_ports_total Service ports rewritten by partial syncs",
                    "# TYPE podnet_sync_changed_service_ports_total counter",
                    "podnet_sync_changed_service_ports_total %d" % self.changed_ports,
                    "# HELP podnet_service_ports Service ports in the desired state",
                    "# TYPE podnet_service_ports gauge",
                    "podnet_service_ports %d" % self.services,
                    "# HELP podnet_endpoints Endpoints in the desired state",
                    "# TYPE podnet_endpoints gauge",
                    "podnet_endpoints %d" % self.endpoints]
        return "\n".join(out) + "\n"


def _rfc3339(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def parse_address(text, default_port):
    """"host:port", ":port", "host" or "[v6]:port" -> (host, port); "" or "0" -> None (disabled)."""
    if text in ("", "0"):
        return None
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return host or "0.0.0.0", int(port) if port else default_port


def serve(address, metrics, paths):
    """An HTTP server in a daemon thread answering `paths` (subset of /metrics, /healthz,
    /livez, /proxyMode). Returns the server (its .server_address has the bound port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path not in paths:
                return self._answer(404, "text/plain", "not found\n")
            if path == "/metrics":
                return self._answer(200, "text/plain; version=0.0.4", metrics.render())
            if path == "/proxyMode":
                return self._answer(200, "text/plain", metrics.mode)
            healthy, body = metrics.health()
            return self._answer(200 if healthy else 503, "application/json", body)

        def _answer(self, code, ctype, body):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):     # access logs would drown the sync logs
            pass

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http-%s" % address[1], daemon=True).start()
    return server
