"""flanneld's Prometheus metrics, served on /metrics of the health port (--healthz-port).

Upstream flannel exports no metrics, so the names are podnet's, all prefixed
`flanneld_` (the daemon that exports them; kube-proxy's are `kubeproxy_*`):

    flanneld_ready (gauge): 1 once the backend's rules are installed and subnet.env is
        written (/readyz says 200), else 0.
    flanneld_leases (gauge): other nodes' leases the backend was last given (what it
        programs routes for).
    flanneld_backend_sync_duration_seconds{trigger} (histogram): the time of one backend
        sync (diff + apply); trigger "event" (a lease changed) or "reconcile" (the periodic
        round).
    flanneld_backend_sync_errors_total{trigger} (counter): backend syncs that failed
        (logged; the next event or round tries again).
    flanneld_backend_changes_total (counter): kernel changes the syncs made (a route,
        neighbour or FDB entry added or removed).
    flanneld_backend_last_sync_timestamp_seconds (gauge): unix time of the last
        successful sync.
    flanneld_backend_entries{kind} (gauge): entries the backend keeps in the kernel for
        the current leases, kind "route", "neighbour", "fdb" (vxlan: all three; host-gw and
        udp: routes).
    flanneld_kube_nodes{state} (gauge, --kube-subnet-mgr): Node objects seen, state
        "lease" (usable), "ignored" (not flannel's: no kube-subnet-manager annotation) or
        "invalid" (flannel's but unusable: logged with the reason).
    flanneld_kube_relists_total (counter): complete lists of Nodes (the first, then one
        after every 410 Gone).
    flanneld_kube_node_events_total (counter): Node list and watch events received.
    flanneld_udp_packets_total{direction} (counter, udp backend): packets forwarded,
        direction "tx" (TUN -> UDP) or "rx" (UDP -> TUN).
    flanneld_udp_dropped_packets_total{reason} (counter, udp backend): packets dropped,
        by the backend's reason ("no_route", "not_ipv4", "send_error", "foreign",
        "malformed", "write_error").
    flanneld_udp_send_errors_total (counter, udp backend): failed sendmsg calls.
    flanneld_udp_tun_reopened_total (counter, udp backend): times the TUN device was
        found gone and opened again.

The figures of the subnet manager and of the udp backend are read when scraped
(`stats()` of each, if it has one), so nothing on the packet path or in the
watch loop does more than it did.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from prometheus_client.core import Metric

SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ENTRY_KINDS = (("routes", "route"), ("neighbours", "neighbour"), ("fdb", "fdb"))


def entry_counts(desired: Mapping[Any, Any]) -> dict[str, int]:
    """{kind: count} from a backend's desired(): vxlan and host-gw give lists per kind
    ({"routes": [...], ...}); udp gives {subnet: remote}, one route each."""
    if any(key in desired for key, _ in ENTRY_KINDS):
        return {kind: len(desired.get(key) or ()) for key, kind in ENTRY_KINDS if key in desired}
    return {"route": len(desired)}


def udp_counters(stats: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """({direction: packets}, {reason: drops}) from the udp backend's stats(): keys `tx` / `rx`
    (or `tx_packets` / `rx_packets`) are packets, `drops_<reason>` / `dropped_<reason>` /
    `drop_<reason>` are drops by reason (a `drops` mapping too)."""
    packets: dict[str, int] = {}
    drops: dict[str, int] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            if key.startswith("drop"):
                drops.update({str(k): int(v) for k, v in value.items()})
            continue
        if key in ("tx", "tx_packets", "rx", "rx_packets"):
            packets[key[:2]] = int(value)
            continue
        for head in ("drops_", "dropped_", "drop_"):
            if key.startswith(head):
                drops[key[len(head):]] = int(value)
                break
    return packets, drops


class _ScrapeTime:
    """A collector that reads the subnet manager's and the udp backend's figures at scrape time."""

    def __init__(self, metrics: FlanneldMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        sm_stats = _call(self.metrics.subnet_stats)
        if sm_stats is not None and "nodes" in sm_stats:
            nodes = GaugeMetricFamily("flanneld_kube_nodes", "Node objects seen, by what they are to flanneld",
                                      labels=["state"])
            for state, key in (("lease", "leases"), ("ignored", "ignored"), ("invalid", "invalid")):
                nodes.add_metric([state], sm_stats.get(key, 0))
            yield nodes
            yield CounterMetricFamily("flanneld_kube_relists", "complete lists of Nodes",
                                      value=sm_stats.get("relists", 0))
            yield CounterMetricFamily("flanneld_kube_node_events", "Node list and watch events received",
                                      value=sm_stats.get("events", 0))
        udp = _call(self.metrics.backend_stats)
        if udp is not None:
            packets, drops = udp_counters(udp)
            family = CounterMetricFamily("flanneld_udp_packets", "packets the udp backend forwarded",
                                         labels=["direction"])
            for direction in ("tx", "rx"):
                family.add_metric([direction], packets.get(direction, 0))
            yield family
            dropped = CounterMetricFamily("flanneld_udp_dropped_packets", "packets the udp backend dropped",
                                          labels=["reason"])
            for reason, count in sorted(drops.items()):
                dropped.add_metric([reason], count)
            yield dropped
            for key, name, text in (("send_errors", "flanneld_udp_send_errors", "failed sendmsg calls"),
                                    ("tun_reopened", "flanneld_udp_tun_reopened",
                                     "times the TUN device was opened again")):
                if key in udp:
                    yield CounterMetricFamily(name, text, value=udp[key])


def _call(source: Callable[[], Mapping[str, Any] | None] | None) -> Mapping[str, Any] | None:
    if source is None:
        return None
    try:
        return source()
    except Exception:       # a scrape must never fail over one figure
        return None


class FlanneldMetrics:
    """One daemon's metrics, in a registry of its own (the handler serves that registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ready = Gauge("flanneld_ready", "1 once the backend's rules are in and subnet.env is written",
                           registry=r)
        self.leases = Gauge("flanneld_leases", "other nodes' leases the backend was last given", registry=r)
        self.sync_duration = Histogram("flanneld_backend_sync_duration_seconds", "time of one backend sync",
                                       ["trigger"], buckets=SYNC_BUCKETS, registry=r)
        self.sync_errors = Counter("flanneld_backend_sync_errors", "backend syncs that failed", ["trigger"],
                                   registry=r)
        self.changes = Counter("flanneld_backend_changes", "kernel changes the backend syncs made", registry=r)
        self.last_sync = Gauge("flanneld_backend_last_sync_timestamp_seconds",
                               "unix time of the last successful backend sync", registry=r)
        self.entries = Gauge("flanneld_backend_entries", "entries the backend keeps in the kernel", ["kind"],
                             registry=r)
        for trigger in ("event", "reconcile"):
            self.sync_errors.labels(trigger)
            self.sync_duration.labels(trigger)
        self.subnet_stats: Callable[[], Mapping[str, Any] | None] | None = None
        self.backend_stats: Callable[[], Mapping[str, Any] | None] | None = None
        r.register(_ScrapeTime(self))

    def set_entries(self, counts: Mapping[str, int]) -> None:
        for kind, count in counts.items():
            self.entries.labels(kind).set(count)
