"""The NetworkPolicy agent's metrics (prometheus_client) and health endpoints.

No upstream component owns these names (kube-proxy's are about Services), so they
are ours, all under `podnet_network_policy_`. Each Metrics object has a registry
of its own (tests build several in one process); nothing goes to
prometheus_client's global registry.

  podnet_network_policy_sync_duration_seconds{type}      histogram: syncs, type "full" or "partial"
    (kube-proxy's buckets: exponential from 1 ms by 2, 15 of them, to 16.384 s)
  podnet_network_policy_last_sync_timestamp_seconds      gauge: last successful sync (unix time)
  podnet_network_policy_last_queued_timestamp_seconds    gauge: last change received from the source
  podnet_network_policy_synced_through_timestamp_seconds gauge: every source event the agent took
    in up to this time is in the kernel (or changed nothing); what a test or a rollout waits on
  podnet_network_policy_sync_failures_total              counter: syncs that failed as a whole
    (retried as full syncs with backoff)
  podnet_network_policy_chains, _rules, _sets, _set_elements   gauges: what our nftables table
    holds after the last sync (the dataplane's SyncResult)
  podnet_network_policy_changes_total                    counter: objects the syncs wrote (the
    dataplane's SyncResult.changed)
  podnet_network_policy_policies                         gauge: NetworkPolicies in the model (valid ones)
  podnet_network_policy_pods{scope}                      gauge: pods with addresses, scope "cluster"
    (every pod: peers) or "node" (this node's, not hostNetwork: the ones policed here)
  podnet_network_policy_namespaces                       gauge: namespaces in the model
  podnet_network_policy_invalid_objects{kind}            gauge: objects skipped as malformed
    (logged once each), by kind
  podnet_network_policy_quarantined_policies             gauge: policies whose rules the kernel
    refused, left out of the table (everything else is applied)
  podnet_network_policy_policy_quarantines_total         counter: times a policy was quarantined
  podnet_network_policy_dropped_packets_total{direction} counter: packets our table dropped,
    "ingress" or "egress", read from the table's named counters at scrape time (the kernel
    keeps the count: it restarts when the table is made anew)
  podnet_network_policy_logged_drops_total{direction}    counter: dropped packets the kernel
    logged to our NFLOG group and the agent wrote a line for (rate-limited by the ruleset)
  podnet_network_policy_nflog_listening                  gauge: 1 while the agent reads its NFLOG
    group, 0 when the kernel refused the bind (the agent runs on without drop lines)

Health. /healthz and /livez answer 200 "ok" while syncs keep up, 503 with the reason
once a change has waited for a sync longer than `health_timeout` (or no sync has
come within it of start), as kube-proxy's health server decides. /readyz answers
503 until the first successful sync (a start must not count as ready while it
has not yet programmed anything), 200 from then on. --metrics-bind-address
(default 127.0.0.1:10265) serves /metrics and all three; --healthz-bind-address
(default 0.0.0.0:10266) the three health paths. The ports: the Kubernetes node
components' 102xx range, beside kube-proxy's 10249 / 10256, clear of kubelet's
10248 / 10250 / 10255, kube-controller-manager's 10257, cloud-controller-manager's
10258 and kube-scheduler's 10259.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from podnet import httpd
from podnet.health import SyncHealth

log = logging.getLogger("network_policy.metrics")

BUCKETS = tuple(round(0.001 * 2 ** i, 6) for i in range(15))
METRICS_PORT = 10265
HEALTHZ_PORT = 10266
DIRECTIONS = ("ingress", "egress")
DROP_COUNTS_MAX_AGE = 1.0       # seconds a read of the kernel's drop counters is reused by scrapes


class _DropCounters(Collector):
    """podnet_network_policy_dropped_packets_total, read from the dataplane when scraped (at most
    once per DROP_COUNTS_MAX_AGE: every read runs nft)."""

    NAME = "podnet_network_policy_dropped_packets"
    HELP = "Packets the NetworkPolicy table dropped, by direction (the kernel's named counters)"

    def __init__(self, read: Callable[[], Mapping[str, int]] | None, clock: Callable[[], float]) -> None:
        self.read = read
        self.clock = clock
        self.lock = threading.Lock()
        self._cached: tuple[float, dict[str, int]] | None = None

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["direction"])

    def counts(self) -> dict[str, int] | None:
        if self.read is None:
            return None
        with self.lock:
            now = self.clock()
            if self._cached is not None and now - self._cached[0] < DROP_COUNTS_MAX_AGE:
                return self._cached[1]
            try:
                counts = {k: int(v) for k, v in self.read().items()}
            except Exception as e:      # a scrape must answer even when nft does not
                log.debug("reading the drop counters failed: %s", e)
                return self._cached[1] if self._cached else None
            self._cached = (now, counts)
            return counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["direction"])
        counts = self.counts()
        if counts is not None:
            for direction in DIRECTIONS:
                family.add_metric([direction], counts.get(direction, 0))
        yield family


class Metrics:
    """What the agent reports; read by the HTTP handlers from other threads."""

    def __init__(self, health_timeout: float = 60.0, clock: Callable[[], float] = time.time,
                 drop_counts: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.clock = clock
        self.sync_health = SyncHealth(health_timeout, clock)

        self.registry = r = CollectorRegistry(auto_describe=True)
        p = "podnet_network_policy_"
        self.sync_duration = Histogram(p + "sync_duration_seconds", "Sync latency in seconds, full or partial",
                                       ["type"], buckets=BUCKETS, registry=r)
        self.last_sync_timestamp = Gauge(p + "last_sync_timestamp_seconds",
                                         "The last time the rules were successfully synced", registry=r)
        self.last_queued_timestamp = Gauge(p + "last_queued_timestamp_seconds",
                                           "The last time a change was received from the source", registry=r)
        self.synced_through = Gauge(p + "synced_through_timestamp_seconds",
                                    "Every source event received up to this time is in the kernel", registry=r)
        self.sync_failures = Counter(p + "sync_failures_total", "Syncs that failed as a whole", registry=r)
        self.chains = Gauge(p + "chains", "Chains in our nftables table", registry=r)
        self.rules = Gauge(p + "rules", "Rules in our nftables table", registry=r)
        self.sets = Gauge(p + "sets", "Sets and maps in our nftables table", registry=r)
        self.set_elements = Gauge(p + "set_elements", "Elements of the sets and maps in our table", registry=r)
        self.changes = Counter(p + "changes_total", "Objects written by syncs", registry=r)
        self.policies = Gauge(p + "policies", "NetworkPolicies in the model", registry=r)
        self.pods = Gauge(p + "pods", "Pods with addresses: cluster-wide, or on this node and policed here",
                          ["scope"], registry=r)
        self.namespaces = Gauge(p + "namespaces", "Namespaces in the model", registry=r)
        self.invalid_objects = Gauge(p + "invalid_objects", "Objects skipped as malformed", ["kind"], registry=r)
        self.quarantined = Gauge(p + "quarantined_policies",
                                 "Policies whose rules the kernel refused, left out of the table", registry=r)
        self.quarantines = Counter(p + "policy_quarantines_total", "Times a policy was quarantined", registry=r)
        self.logged_drops = Counter(p + "logged_drops_total", "Dropped packets logged through NFLOG",
                                    ["direction"], registry=r)
        self.nflog_listening = Gauge(p + "nflog_listening", "1 while the agent reads its NFLOG group", registry=r)
        for direction in DIRECTIONS:
            self.logged_drops.labels(direction)
        self.drop_counters = _DropCounters(drop_counts, time.monotonic)
        r.register(self.drop_counters)
        self._exposition = httpd.metrics_handler(r)

    # ---- what the agent reports ------------------------------------------------------------

    def queued(self) -> None:
        now = self.clock()
        self.last_queued_timestamp.set(now)
        self.sync_health.queued(now)

    def synced(self, result: Any, synced_through: float | None) -> None:
        """After a successful dataplane sync (`result`: the contract's SyncResult)."""
        now = self.clock()
        self.sync_duration.labels("full" if result.full else "partial").observe(result.seconds)
        self.last_sync_timestamp.set(now)
        self.chains.set(result.chains)
        self.rules.set(result.rules)
        self.sets.set(result.sets)
        self.set_elements.set(result.elements)
        self.changes.inc(max(0, result.changed))
        self.quarantined.set(len(result.quarantined))
        if synced_through is not None:
            self.synced_through.set(synced_through)
        self.sync_health.synced(now)

    def caught_up(self, synced_through: float) -> None:
        """Events were taken in that changed nothing: the kernel reflects them already."""
        self.synced_through.set(synced_through)

    def failed(self) -> None:
        self.sync_failures.inc()

    def counts(self, policies: int, pods: int, local_pods: int, namespaces: int, invalid: Mapping[str, int]) -> None:
        self.policies.set(policies)
        self.pods.labels("cluster").set(pods)
        self.pods.labels("node").set(local_pods)
        self.namespaces.set(namespaces)
        for kind, count in invalid.items():
            self.invalid_objects.labels(kind).set(count)

    # ---- what the HTTP endpoints answer -----------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): syncs keep up with the changes (see the module's docstring)."""
        state = self.sync_health.check()
        return state.healthy, state.reason

    def readiness(self) -> tuple[bool, str]:
        return self.sync_health.readiness()

    def render(self) -> str:
        """The /metrics text, as served."""
        return self._exposition()[2].decode()

    def routes(self, server: str) -> dict[str, httpd.Handler]:
        """The paths of the "metrics" (--metrics-bind-address) or "healthz" (--healthz-bind-address)
        server."""
        health = {"/healthz": httpd.health_handler(self.health), "/livez": httpd.health_handler(self.health),
                  "/readyz": httpd.health_handler(self.readiness)}
        if server == "metrics":
            return dict(health, **{"/metrics": self._exposition})
        if server == "healthz":
            return health
        raise ValueError("no NetworkPolicy agent server %r (have: metrics, healthz)" % server)
