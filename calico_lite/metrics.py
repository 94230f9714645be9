"""calico_lite's metrics and health endpoints, for the node agent and the reflector process.

BIRD has no metrics and Felix's are about its dataplane, so the names are
ours (prefix calico_lite_). They are read when scraped, from the BGP speaker
(and, on a node, from the kernel's routing table), never pushed by the
agent's loop: a scrape sees the sessions as they are now, and nobody pays
for metrics that nobody reads. The speaker's state is read from the HTTP
thread, as the agent's own loop reads it (a read that meets a peer being
added at that moment is retried).

  calico_lite_bgp_session_state{peer,state}   gauge: 1 for the session's current state, 0 for
    the five others (Idle, Connect, Active, OpenSent, OpenConfirm, Established). One gauge with
    the state as a label rather than one gauge per state or a numeric code: an alert is
    `calico_lite_bgp_session_state{state="Established"} == 0`, a dashboard counts peers per state
    with `sum by (state)`, and adding a state never renames a metric
  calico_lite_bgp_session_resets_total{peer}  counter: times the current peer's session left
    Established (hold timer expiry, NOTIFICATION, TCP loss); starts at 0 when a peer is
    (re)configured
  calico_lite_bgp_prefixes_received{peer}     gauge: prefixes the peer's current session announced
    to us (its Adj-RIB-In)
  calico_lite_bgp_prefixes_advertised{peer}   gauge: prefixes we announced to the peer (its
    Adj-RIB-Out: our own, and on a reflector what we reflect)
  calico_lite_bgp_prefixes_originated         gauge: prefixes we originate (a node: its pod blocks;
    the reflector process: its --announce prefixes)
  calico_lite_bgp_loc_rib_prefixes            gauge: prefixes with a best path in the Loc-RIB
  calico_lite_routes_installed{type}          gauge, node agents: our routes (protocol 78) in
    the kernel's main table now, by type: unicast (learned blocks), blackhole (our own blocks)
  calico_lite_route_syncs_total               counter, node agents: reconciliations of the
    kernel's routes that completed
  calico_lite_reconcile_failures_total        counter, node agents: reconciliations that raised
    (logged, retried a second later)

Flags and endpoints, named as Felix names them (FelixConfiguration; the
FELIX_* environment variables set the defaults, as for Felix):
--prometheus-metrics-enabled (FELIX_PROMETHEUSMETRICSENABLED, default false),
--prometheus-metrics-host (FELIX_PROMETHEUSMETRICSHOST, default "": all
addresses), --prometheus-metrics-port (FELIX_PROMETHEUSMETRICSPORT, 9091)
serve /metrics, /healthz and /readyz; --health-enabled
(FELIX_HEALTHENABLED, default false), --health-host (FELIX_HEALTHHOST,
localhost), --health-port (FELIX_HEALTHPORT, 9099) serve /healthz and
/readyz, and Felix's /liveness and /readiness.

/healthz (live): the process's main loop went round within the last
HEARTBEAT_TIMEOUT seconds. /readyz (ready): live, the speaker runs, every
configured BGP session is Established (as calico-node's BIRD readiness check
wants), and, on a node, the kernel's routes were reconciled at least once.
503 answers carry the reason.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from podnet import httpd

log = logging.getLogger("calico_lite.metrics")

SESSION_STATES = ("Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established")
HEARTBEAT_TIMEOUT = 60.0        # seconds: the agent's loop goes round at least every 5 s
METRICS_PORT = 9091             # Felix's PrometheusMetricsPort
HEALTH_PORT = 9099              # Felix's HealthPort
_STATUS_TRIES = 3


def peer_status(speaker: Any) -> list[dict[str, Any]]:
    """speaker.peer_status(), read from another thread than the speaker's: the speaker's loop may
    add or remove a peer while we iterate, which is then retried."""
    for attempt in range(_STATUS_TRIES):
        try:
            return list(speaker.peer_status())
        except RuntimeError:            # "dictionary changed size during iteration"
            if attempt == _STATUS_TRIES - 1:
                raise
    return []


def kernel_routes() -> dict[str, int]:
    """{route type: count} of our routes (protocol 78) in this network namespace's main table."""
    from calico_lite.routes import ROUTE_PROTOCOL
    from podnet.net.netlink import Netlink
    from podnet.net.routes import RTN_BLACKHOLE, RTN_UNICAST, read_routes
    with Netlink() as nl:
        have, _ = read_routes(nl, ROUTE_PROTOCOL, types=(RTN_UNICAST, RTN_BLACKHOLE))
    counts = {"unicast": 0, "blackhole": 0}
    for route in have.values():
        kind = str(route.get("type", "unicast"))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


class Metrics(Collector):
    """One process's metrics (its own registry) and health state.

    speaker: a callable returning the BGP Speaker, or None while there is none yet.
    originated: a callable returning how many prefixes we originate.
    routes: a callable returning {route type: count} of our kernel routes (node agents;
    None for the reflector process, which installs nothing)."""

    def __init__(self, speaker: Callable[[], Any], originated: Callable[[], int],
                 routes: Callable[[], Mapping[str, int]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.speaker = speaker
        self.originated = originated
        self.routes = routes
        self.clock = clock
        self.lock = threading.Lock()
        self.started = clock()
        self.last_beat: float | None = None
        self.route_syncs = 0
        self.reconcile_failures = 0
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # ---- what the daemon reports --------------------------------------------------------

    def beat(self) -> None:
        """The main loop went round (liveness)."""
        with self.lock:
            self.last_beat = self.clock()

    def routes_synced(self) -> None:
        with self.lock:
            self.route_syncs += 1

    def reconcile_failed(self) -> None:
        with self.lock:
            self.reconcile_failures += 1

    # ---- the scrape -----------------------------------------------------------------------

    def collect(self) -> Iterable[Any]:
        state = GaugeMetricFamily("calico_lite_bgp_session_state",
                                  "BGP session state per peer: 1 for the current state, 0 for the others",
                                  labels=["peer", "state"])
        resets = CounterMetricFamily("calico_lite_bgp_session_resets",
                                     "Times the peer's session left Established", labels=["peer"])
        received = GaugeMetricFamily("calico_lite_bgp_prefixes_received",
                                     "Prefixes the peer's current session announced to us", labels=["peer"])
        advertised = GaugeMetricFamily("calico_lite_bgp_prefixes_advertised",
                                       "Prefixes we announced to the peer", labels=["peer"])
        speaker = self.speaker()
        if speaker is not None:
            for peer in peer_status(speaker):
                address = str(peer["address"])
                for name in SESSION_STATES:
                    state.add_metric([address, name], 1.0 if peer["state"] == name else 0.0)
                resets.add_metric([address], float(peer["flaps"]))
                received.add_metric([address], float(peer["received"]))
                advertised.add_metric([address], float(peer["advertised"]))
        yield from (state, resets, received, advertised)
        yield GaugeMetricFamily("calico_lite_bgp_prefixes_originated", "Prefixes we originate",
                                value=float(self.originated()))
        yield GaugeMetricFamily("calico_lite_bgp_loc_rib_prefixes", "Prefixes with a best path in the Loc-RIB",
                                value=float(len(speaker.rib.prefixes())) if speaker is not None else 0.0)
        if self.routes is None:
            return
        installed = GaugeMetricFamily("calico_lite_routes_installed",
                                      "Our routes (protocol 78) in the kernel's main table, by type",
                                      labels=["type"])
        try:
            for kind, count in sorted(self.routes().items()):
                installed.add_metric([kind], float(count))
        except Exception as e:          # a scrape never fails for one family
            log.warning("cannot count the kernel's routes for /metrics: %s", e)
        yield installed
        with self.lock:
            syncs, failures = self.route_syncs, self.reconcile_failures
        yield CounterMetricFamily("calico_lite_route_syncs", "Reconciliations of the kernel's routes that completed",
                                  value=float(syncs))
        yield CounterMetricFamily("calico_lite_reconcile_failures", "Reconciliations that raised",
                                  value=float(failures))

    # ---- health -------------------------------------------------------------------------

    def alive(self) -> tuple[bool, str]:
        with self.lock:
            now, beat = self.clock(), self.last_beat
        since = now - (self.started if beat is None else beat)
        if since > HEARTBEAT_TIMEOUT:
            return False, "the main loop has not gone round for %.0f s" % since
        return True, ""

    def ready(self) -> tuple[bool, str]:
        alive, reason = self.alive()
        if not alive:
            return False, reason
        speaker = self.speaker()
        if speaker is None:
            return False, "no BGP speaker yet (registering in the datastore)"
        down = sorted("%s (%s)" % (p["address"], p["state"]) for p in peer_status(speaker)
                      if p["state"] != "Established")
        if down:
            return False, "BGP not established with %s" % ", ".join(down)
        with self.lock:
            syncs = self.route_syncs
        if self.routes is not None and not syncs:
            return False, "the kernel's routes have not been reconciled yet"
        return True, ""

    def routes_for(self, server: str) -> dict[str, httpd.Handler]:
        """The paths of the "metrics" or the "health" server."""
        live, ready = httpd.health_handler(self.alive), httpd.health_handler(self.ready)
        if server == "metrics":
            return {"/metrics": httpd.metrics_handler(self.registry), "/healthz": live, "/readyz": ready}
        return {"/healthz": live, "/readyz": ready, "/liveness": live, "/readiness": ready}


# ---- flags ----------------------------------------------------------------------------------

def _flag_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "t", "yes", "y", "on"):
        return True
    if value in ("0", "false", "f", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError("not a boolean: %r" % text)


def add_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str] = os.environ) -> None:
    """Felix's metrics and health settings, with its FELIX_* environment variables as defaults."""
    def env(name: str, default: str) -> str:
        return environ.get("FELIX_" + name.upper(), default)

    def port(default: int, name: str) -> int:
        text = env(name, str(default))
        return int(text) if text.isdigit() else default

    group = parser.add_argument_group("metrics and health (Felix's names; FELIX_* variables set the defaults)")
    group.add_argument("--prometheus-metrics-enabled", type=_flag_bool, nargs="?", const=True,
                       default=_flag_bool(env("PrometheusMetricsEnabled", "false")),
                       help="serve /metrics, /healthz, /readyz (default false)")
    group.add_argument("--prometheus-metrics-host", default=env("PrometheusMetricsHost", ""),
                       help='address for /metrics (default "": all addresses)')
    group.add_argument("--prometheus-metrics-port", type=int, default=port(METRICS_PORT, "PrometheusMetricsPort"),
                       help="port for /metrics (default %d)" % METRICS_PORT)
    group.add_argument("--health-enabled", type=_flag_bool, nargs="?", const=True,
                       default=_flag_bool(env("HealthEnabled", "false")),
                       help="serve /healthz, /readyz, /liveness, /readiness (default false)")
    group.add_argument("--health-host", default=env("HealthHost", "localhost"),
                       help="address for the health endpoints (default localhost)")
    group.add_argument("--health-port", type=int, default=port(HEALTH_PORT, "HealthPort"),
                       help="port for the health endpoints (default %d)" % HEALTH_PORT)


def start_servers(opts: argparse.Namespace, metrics: Metrics, name: str) -> list[Any]:
    """The HTTP servers the flags ask for (OSError when one cannot bind)."""
    servers = []
    for enabled, host, port, kind in ((opts.prometheus_metrics_enabled, opts.prometheus_metrics_host,
                                       opts.prometheus_metrics_port, "metrics"),
                                      (opts.health_enabled, opts.health_host, opts.health_port, "health")):
        if enabled:
            servers.append(httpd.serve((host or "0.0.0.0", port), metrics.routes_for(kind),
                                       name="%s-%s" % (name, kind)))
            log.info("%s on %s:%d", "/metrics, /healthz, /readyz" if kind == "metrics" else "health endpoints",
                     host or "0.0.0.0", servers[-1].server_address[1])
    return servers
