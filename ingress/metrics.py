"""The Ingress controller's metrics and health endpoints.

Names are ingress-nginx's where it has the metric, so its dashboards and
alerts (e.g. "last reload failed") work; every series carries its constant
labels controller_class (--controller-name), controller_namespace and
controller_pod ($POD_NAMESPACE, $POD_NAME, as ingress-nginx reads them from
the downward API; "" outside a Pod).

  nginx_ingress_controller_config_hash        gauge: the hash of the configuration nginx runs
    (the first 13 hex digits of the 16 in status.json and in nginx.conf, as a number: exact in
    a float64); 0 before nginx runs one
  nginx_ingress_controller_config_last_reload_successful  gauge: 1 if the last attempt to apply
    a new configuration succeeded, 0 if nginx -t refused it or nginx did not confirm it (1 before
    any attempt, as ingress-nginx starts)
  nginx_ingress_controller_config_last_reload_successful_timestamp_seconds  gauge: unix time nginx
    last confirmed a new configuration (start or reload)
  nginx_ingress_controller_success            untyped (a counter): configurations nginx took (its
    start and every confirmed reload)
  nginx_ingress_controller_errors             untyped (a counter): configurations refused by
    nginx -t, or not confirmed by nginx
    (the two counters keep ingress-nginx's names, which have no _total: prometheus_client writes
    every counter with one, so they are exposed untyped; rate() and increase() work the same)
  podnet_ingress_config_size_bytes            gauge: size of the configuration nginx runs
  podnet_ingress_syncs_total                  counter: renders of the desired configuration
  podnet_ingress_ingresses{status}            gauge: Ingresses by status after the last sync:
    ok (served), not_ours (another class), invalid (skipped with a reason, see status.json)

Served on --healthz-host:--healthz-port (ingress-nginx's flags; default all
addresses, port 10254), with --enable-metrics (default true) for /metrics:
/healthz answers 200 while the controller's loop goes round and nginx, once
started, runs; /readyz while nginx runs a configuration it confirmed.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from podnet import httpd

HEALTHZ_PORT = 10254            # ingress-nginx's --healthz-port (and its metrics)
HEARTBEAT_TIMEOUT = 60.0        # the loop goes round every 0.5 s
STATUSES = ("ok", "not_ours", "invalid")


def hash_value(digest: str | None) -> float:
    """The configuration hash as ingress-nginx's gauge holds it: a number (ours: 52 bits, exact)."""
    return float(int(digest[:13], 16)) if digest else 0.0


class Metrics(Collector):
    """What the controller reports (from its loop) and what /metrics reads (another thread)."""

    def __init__(self, controller_class: str, namespace: str | None = None, pod: str | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.labels = {"controller_class": controller_class,
                       "controller_namespace": os.environ.get("POD_NAMESPACE", "") if namespace is None else namespace,
                       "controller_pod": os.environ.get("POD_NAME", "") if pod is None else pod}
        self.clock = clock
        self.monotonic = monotonic
        self.lock = threading.Lock()
        self.started = monotonic()
        self.last_beat: float | None = None
        self.config_hash: str | None = None
        self.config_bytes = 0
        self.last_ok = True
        self.last_ok_at = 0.0
        self.successes = 0
        self.errors = 0
        self.syncs = 0
        self.ingresses = dict.fromkeys(STATUSES, 0)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # ---- what the controller reports ----------------------------------------------------

    def beat(self) -> None:
        with self.lock:
            self.last_beat = self.monotonic()

    def synced(self, ingress_status: dict[str, str]) -> None:
        """A render; `ingress_status`: {namespace/name: "ok" | "not ours (...)" | "invalid: ..."}."""
        counts = dict.fromkeys(STATUSES, 0)
        for text in ingress_status.values():
            counts["ok" if text == "ok" else "invalid" if text.startswith("invalid") else "not_ours"] += 1
        with self.lock:
            self.syncs += 1
            self.ingresses = counts

    def applied(self, digest: str, size: int) -> None:
        """nginx runs a new configuration (started with it, or reloaded and confirmed)."""
        with self.lock:
            self.config_hash, self.config_bytes = digest, size
            self.last_ok, self.last_ok_at = True, self.clock()
            self.successes += 1

    def refused(self) -> None:
        """A new configuration did not make it: nginx -t refused it, or nginx did not confirm it."""
        with self.lock:
            self.last_ok = False
            self.errors += 1

    def stopped(self) -> None:
        """nginx is gone (died or stopped): it runs no configuration."""
        with self.lock:
            self.config_hash, self.config_bytes = None, 0

    # ---- the scrape ---------------------------------------------------------------------

    def collect(self) -> Iterable[Any]:
        names, values = list(self.labels), list(self.labels.values())
        with self.lock:
            state = dict(vars(self))

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def untyped(name: str, doc: str, value: float) -> Metric:
            family = Metric(name, doc, "unknown")
            family.add_sample(name, dict(self.labels), value)
            return family

        yield gauge("nginx_ingress_controller_config_hash", "Running configuration hash actually running",
                    hash_value(state["config_hash"]))
        yield gauge("nginx_ingress_controller_config_last_reload_successful",
                    "Whether the last configuration reload attempt was successful", 1.0 if state["last_ok"] else 0.0)
        yield gauge("nginx_ingress_controller_config_last_reload_successful_timestamp_seconds",
                    "Timestamp of the last successful configuration reload.", state["last_ok_at"])
        yield untyped("nginx_ingress_controller_success", "Cumulative number of Ingress controller reload operations",
                      float(state["successes"]))
        yield untyped("nginx_ingress_controller_errors",
                      "Cumulative number of Ingress controller errors during reload operations", float(state["errors"]))
        yield gauge("podnet_ingress_config_size_bytes", "Size of the configuration nginx runs",
                    float(state["config_bytes"]))
        syncs = CounterMetricFamily("podnet_ingress_syncs", "Renders of the desired configuration", labels=names)
        syncs.add_metric(values, float(state["syncs"]))
        yield syncs
        ingresses = GaugeMetricFamily("podnet_ingress_ingresses", "Ingresses by status after the last sync",
                                      labels=names + ["status"])
        for status in STATUSES:
            ingresses.add_metric(values + [status], float(state["ingresses"][status]))
        yield ingresses

    # ---- health -------------------------------------------------------------------------

    def loop_alive(self) -> tuple[bool, str]:
        with self.lock:
            now, beat = self.monotonic(), self.last_beat
        since = now - (self.started if beat is None else beat)
        if since > HEARTBEAT_TIMEOUT:
            return False, "the controller's loop has not gone round for %.0f s" % since
        return True, ""

    def routes(self, live: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]],
               metrics: bool = True) -> dict[str, httpd.Handler]:
        out = {"/healthz": httpd.health_handler(live), "/readyz": httpd.health_handler(ready)}
        if metrics:
            out["/metrics"] = httpd.metrics_handler(self.registry)
        return out
