"""kube-proxy's metrics (prometheus_client) and health endpoints.

The metric names, types, labels and buckets are kube-proxy's
(pkg/proxy/metrics), so dashboards and alerts written for it work unchanged.
Each Metrics object has a registry of its own (several can live in one
process, as tests build them); nothing goes to prometheus_client's global one.

  kubeproxy_sync_proxy_rules_duration_seconds          histogram: every sync (seconds)
  kubeproxy_sync_full_proxy_rules_duration_seconds     histogram: full syncs
  kubeproxy_sync_partial_proxy_rules_duration_seconds  histogram: partial syncs
    (the three: kube-proxy's buckets, exponential from 1 ms by 2, 15 of them, to 16.384 s)
  kubeproxy_sync_proxy_rules_last_timestamp_seconds    gauge: last successful sync (unix time)
  kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds  gauge: last change received (unix time)
  kubeproxy_sync_proxy_rules_iptables_total{table}     gauge, iptables mode: rules we own per table
  podnet_sync_proxy_rules_total{table}                 gauge, nftables and ipvs modes: rules (or
    virtual servers) we own per table
  kubeproxy_sync_proxy_rules_iptables_restore_failures_total  counter: transactions the kernel
    refused (iptables-restore, nft -f, ipset restore), those fault isolation tried included,
    plus syncs that failed as a whole
  kubeproxy_sync_proxy_rules_nftables_sync_failures_total  counter, nftables mode: the same count
    under the name kube-proxy's nftables mode uses
  kubeproxy_proxy_healthz_total{code}, kubeproxy_proxy_livez_total{code}  counters: answers of
    /healthz and /livez on --healthz-bind-address, by HTTP status ("200", "503")
  podnet_sync_proxy_rules_quarantined_service_ports    gauge: service ports whose rules the
    kernel refused, kept out of syncs until they change (kube_proxy/proxier.py, Quarantine)
  podnet_sync_proxy_rules_service_port_quarantines_total  counter: times a service port was
    quarantined (not "..._quarantined_service_ports_total": beside the gauge of that name it is
    one family twice to prometheus_client and OpenMetrics)
  podnet_sync_changed_service_ports_total              counter: service ports rewritten by syncs
  podnet_service_ports, podnet_endpoints               gauges: service ports and endpoints in the
    desired state after the last sync

Not exported: kubeproxy_sync_proxy_rules_{service,endpoint}_changes_{total,pending} (the tracker
coalesces changes per service port; podnet_sync_changed_service_ports_total counts what syncs
rewrote), kubeproxy_network_programming_duration_seconds (needs EndpointSlices' trigger-time
annotation), the conntrack-reconciler and nfacct packet counters; and no ip_family label (one
family per process, as kube-proxy before it went dual-stack in one process).

Health, as kube-proxy serves it. --healthz-bind-address (default 0.0.0.0:10256):
/healthz and /livez answer 200 while the proxier keeps up, 503 once a change has
waited for a sync longer than `health_timeout` (or the first sync has not come
within it of start). The body is kube-proxy's JSON: {"lastUpdated": ...,
"currentTime": ..., "nodeEligible": true} (/livez without nodeEligible);
lastUpdated is the current time while healthy, as kube-proxy reports it.
--metrics-bind-address (default 127.0.0.1:10249): /metrics, /proxyMode, and
/healthz answering "ok" while the process serves (kube-proxy's generic ping).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from podnet import httpd
from podnet.health import SyncHealth

if TYPE_CHECKING:
    from kube_proxy.proxier import SyncResult

# kube-proxy's buckets: exponential from 1 ms, factor 2, 15 of them (to ~16 s); rounded so the
# `le` labels read as kube-proxy's do (0.008, not 0.008000000000000002)
BUCKETS = tuple(round(0.001 * 2 ** i, 6) for i in range(15))

METRICS_PORT = 10249
HEALTHZ_PORT = 10256
JSON = "application/json"


class Metrics:
    """What the sync loop reports; read by the HTTP handlers from other threads."""

    def __init__(self, mode: str = "iptables", health_timeout: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.mode = mode
        self.clock = clock
        self.sync_health = SyncHealth(health_timeout, clock)

        self.registry = r = CollectorRegistry(auto_describe=True)
        self.sync_duration = Histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                                       "SyncProxyRules latency in seconds", buckets=BUCKETS, registry=r)
        self.full_sync_duration = Histogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
                                            "SyncProxyRules latency in seconds for full resyncs",
                                            buckets=BUCKETS, registry=r)
        self.partial_sync_duration = Histogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
                                               "SyncProxyRules latency in seconds for partial resyncs",
                                               buckets=BUCKETS, registry=r)
        self.last_sync_timestamp = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                                         "The last time proxy rules were successfully synced", registry=r)
        self.last_queued_timestamp = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                           "The last time a sync of proxy rules was queued", registry=r)
        if mode == "iptables":
            self.rules = Gauge("kubeproxy_sync_proxy_rules_iptables_total",
                               "Total number of iptables rules owned by kube-proxy", ["table"], registry=r)
        else:
            self.rules = Gauge("podnet_sync_proxy_rules_total",
                               "Rules (or virtual servers) owned by the proxier", ["table"], registry=r)
        self.rule_tables: set[str] = set()
        self.restore_failures = Counter("kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                                        "Cumulative proxy iptables restore failures", registry=r)
        self.nftables_failures = (Counter("kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                                          "Cumulative proxy nftables sync failures", registry=r)
                                  if mode == "nftables" else None)
        self.healthz_answers = Counter("kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status",
                                       ["code"], registry=r)
        self.livez_answers = Counter("kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status",
                                     ["code"], registry=r)
        self.quarantined = Gauge("podnet_sync_proxy_rules_quarantined_service_ports",
                                 "Service ports whose rules the kernel refused, kept out of syncs until they change",
                                 registry=r)
        self.quarantined_total = Counter("podnet_sync_proxy_rules_service_port_quarantines_total",
                                         "Service ports put into quarantine", registry=r)
        self.changed_ports = Counter("podnet_sync_changed_service_ports_total",
                                     "Service ports rewritten by syncs", registry=r)
        self.service_ports = Gauge("podnet_service_ports", "Service ports in the desired state", registry=r)
        self.endpoints = Gauge("podnet_endpoints", "Endpoints in the desired state", registry=r)
        self._exposition = httpd.metrics_handler(r)

    # ---- what the sync loop reports ---------------------------------------------------------

    def queued(self) -> None:
        now = self.clock()
        self.last_queued_timestamp.set(now)
        self.sync_health.queued(now)

    def synced(self, result: SyncResult, services: int = 0, endpoints: int = 0) -> None:
        now = self.clock()
        self.sync_duration.observe(result.seconds)
        (self.full_sync_duration if result.full else self.partial_sync_duration).observe(result.seconds)
        self.last_sync_timestamp.set(now)
        for table, count in result.rules.items():
            self.rules.labels(table).set(count)
        for gone in self.rule_tables - set(result.rules):
            self.rules.remove(gone)
        self.rule_tables = set(result.rules)
        self.changed_ports.inc(result.changed)
        self.service_ports.set(services)
        self.endpoints.set(endpoints)
        self._failures(result.refused)
        self.quarantined.set(result.in_quarantine)
        self.quarantined_total.inc(len(result.quarantined))
        self.sync_health.synced(now)

    def failed(self) -> None:
        self._failures(1)

    def _failures(self, count: int) -> None:
        self.restore_failures.inc(count)
        if self.nftables_failures is not None:
            self.nftables_failures.inc(count)

    # ---- what the HTTP endpoints answer -----------------------------------------------------

    def health(self, livez: bool = False) -> tuple[bool, str]:
        """(healthy, kube-proxy's JSON body) for /healthz, or /livez when `livez`."""
        state = self.sync_health.check()
        body: dict[str, object] = {"lastUpdated": _rfc3339(state.last_updated), "currentTime": _rfc3339(self.clock())}
        if not livez:
            body["nodeEligible"] = True     # no node-deletion tracking: this node always takes traffic
        return state.healthy, json.dumps(body) + "\n"

    def render(self) -> str:
        """The /metrics text, as served."""
        return self._exposition()[2].decode()

    def routes(self, server: str) -> dict[str, httpd.Handler]:
        """The paths of kube-proxy's "metrics" (--metrics-bind-address) or "healthz"
        (--healthz-bind-address) server."""
        if server == "metrics":
            return {"/metrics": self._exposition,
                    "/proxyMode": lambda: (200, httpd.TEXT, self.mode.encode()),
                    "/healthz": lambda: (200, httpd.TEXT, b"ok")}
        if server == "healthz":
            return {"/healthz": lambda: self._answer(self.healthz_answers, livez=False),
                    "/livez": lambda: self._answer(self.livez_answers, livez=True)}
        raise ValueError("no kube-proxy server %r (have: metrics, healthz)" % server)

    def _answer(self, answers: Counter, livez: bool) -> tuple[int, str, bytes]:
        healthy, body = self.health(livez)
        status = 200 if healthy else 503
        answers.labels(str(status)).inc()
        return status, JSON, body.encode()


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
