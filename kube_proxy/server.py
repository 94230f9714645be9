"""`podnet kube-proxy`: sources -> change tracker -> proxier, with metrics and healthz.

One thread runs the sync loop; the sources (a Kubernetes API reflector per
kind, or a manifests directory poller) run in their own threads and hand
events over through a queue, so the tracker stays single-threaded. The loop
sleeps until the tracker says a sync is due (the first change after a quiet
spell at once, later ones coalesced by --min-sync-period), applies it, and
records the result. Service ports whose rules the kernel refuses are
quarantined by the proxier (kube_proxy/proxier.py) and logged here; a sync
that fails as a whole is logged, counted, and retried as a full sync with
exponential backoff (kube_proxy/tracker.py: 2, 4, 8 ... x --min-sync-period, at
most --iptables-sync-period, 30 s unless set).

Stopping (SIGTERM/SIGINT) leaves every rule in place: a restarted proxy
finds them, rewrites them with the same content, and established
connections never notice (conntrack holds their NAT). `--cleanup` removes
everything ours and exits, as kube-proxy's does.

Flags are kube-proxy's where they apply (--proxy-mode, --cluster-cidr,
--masquerade-all, --nodeport-addresses, --min-sync-period, --hostname-override,
--kubeconfig, --metrics-bind-address, --healthz-bind-address, --cleanup, -v);
--manifests DIR and --sync-period (the full-sync period, kube-proxy's fixed
FullSyncPeriod) are ours; --iptables-sync-period and --ipvs-sync-period have
kube-proxy's meaning (the delay before a failed sync is retried), as the cap of
the exponential backoff.

The proxy modes (Proxier, proxier.py) are picked here, by make_proxier().
"""
import argparse
import logging
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

from kube_proxy.proxier import Config, Proxier
from podnet.flags import parse_duration
from podnet.kube.events import drain

log = logging.getLogger("kube_proxy")

# The Event about a quarantined Service port (upstream kube-proxy has none: ours, in its style)
QUARANTINE_REASON = "ServicePortQuarantined"
SYNC_ACTION = "SyncProxyRules"

def _cidrs(text):
    import ipaddress
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                out.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    return tuple(out)


def local_addresses(family=4):
    """This network namespace's global unicast addresses, [(ip, prefixlen)]."""
    from podnet.net.ip import AF_INET, AF_INET6
    from podnet.net.netlink import Netlink
    fam = AF_INET if family == 4 else AF_INET6
    with Netlink() as nl:
        return [(str(a.net.ip), a.net.prefixlen) for a in nl.addrs(family=fam) if a.scope == 0]


def resolve_nodeport_addresses(spec, family=4):
    """--nodeport-addresses: CIDRs and/or "primary" -> this node's matching IPs (sorted);
    () when unset, meaning every local address."""
    import ipaddress
    if not spec:
        return ()
    addrs = local_addresses(family)
    chosen = set()
    for item in spec:
        if item == "primary":
            if addrs:
                chosen.add(addrs[0][0])
            continue
        net = ipaddress.ip_network(item, strict=False)
        chosen.update(ip for ip, _ in addrs if ipaddress.ip_address(ip) in net)
    if not chosen:
        log.warning("--nodeport-addresses %s matches no address of this node: NodePorts answer nowhere",
                    ",".join(spec))
    return tuple(sorted(chosen, key=lambda ip: ipaddress.ip_address(ip)))


MODES = ("iptables", "ipvs", "nftables")


def make_proxier(mode: str, config: Config) -> Proxier:
    """The proxier of --proxy-mode `mode` (the modes are imported on demand)."""
    if mode == "iptables":
        from kube_proxy.iptables import IptablesProxier
        return IptablesProxier(config)
    if mode == "nftables":
        from kube_proxy.nftables import NftablesProxier
        return NftablesProxier(config)
    if mode == "ipvs":
        from kube_proxy.ipvs import IpvsProxier
        return IpvsProxier(config)
    raise ValueError("unknown proxy mode %r (have: %s)" % (mode, ", ".join(MODES)))


def cleanup_other_modes(mode: str, config: Config) -> None:
    """Remove what the other proxy modes left here (a switch of --proxy-mode), as kube-proxy
    does when it starts. Never fatal: leftovers cost unused rules, not a node without Services."""
    for other in MODES:
        if other != mode:
            try:
                make_proxier(other, config).cleanup()
            except Exception as e:
                log.warning("could not remove what --proxy-mode %s left: %s", other, e)


class ProxyServer:
    """The sync loop. `source_factory(emit)` returns an object with start()/stop(). With a
    `recorder` (podnet.kube.recorder.EventRecorder: the API source only) every quarantined
    Service port is also a Warning Event about its Service."""

    def __init__(self, proxier, tracker, source_factory, metrics=None, recorder=None):
        self.proxier = proxier
        self.tracker = tracker
        self.source = source_factory(self._emit)
        self.metrics = metrics
        self.recorder = recorder
        self.uids = None
        if recorder is not None:
            from podnet.kube.recorder import ObjectUids
            self.uids = ObjectUids(("Service",))     # Events name their Service by uid too
        self.events = queue.Queue()
        self.stopping = threading.Event()
        self.syncs = 0

    def _emit(self, event):
        self.events.put(event)

    def _drain(self, timeout):
        drain(self.events, timeout, self._take)

    def _take(self, event):
        try:
            if self.uids is not None:
                self.uids.apply(event)
            self.tracker.apply(event)
        except Exception:       # a bug shown by one object must not stop the proxy
            log.exception("skipping %s %s event", event.type, event.kind)
        if self.metrics:
            self.metrics.queued()

    def sync_once(self):
        sync = self.tracker.take()
        try:
            result = self.proxier.sync(sync)
        except Exception as e:
            self.tracker.sync_failed(str(e))
            if self.metrics:
                self.metrics.failed()
            log.error("sync failed (%d in a row; the next one is full, in %.1f s at the earliest): %s",
                      self.tracker.failures, self.tracker.retry_delay(), e)
            return None
        self.syncs += 1
        state = sync.state
        if self.metrics:
            self.metrics.synced(result, len(state.service_ports),
                                sum(len(state.endpoints_for(n)) for n in state.service_ports))
        log.info("%s sync (%s): %d service ports changed, %d service ports, %s rules, %.3f s%s",
                 "full" if result.full else "partial", sync.reason, result.changed, len(state.service_ports),
                 "/".join("%s %d" % kv for kv in sorted(result.rules.items())), result.seconds,
                 (", %d UDP flows cleared" % result.conntrack_deleted if result.conntrack_deleted else "")
                 + (", %d chains written" % result.chains_written if result.chains_written is not None else ""))
        if result.quarantined:
            log.warning("%d service port%s quarantined (%s): the kernel refused their rules, everything else "
                        "is programmed; %d in quarantine", len(result.quarantined),
                        "" if len(result.quarantined) == 1 else "s", ", ".join(map(str, result.quarantined)),
                        result.in_quarantine)
            if self.recorder is not None:
                self._record_quarantined(result.quarantined)
        return result

    def _record_quarantined(self, quarantined):
        """One Warning Event per quarantined port, about its Service (`kubectl describe service`
        shows it); the port is the reference's fieldPath, so each port is its own series."""
        for q in quarantined:
            name = q.name
            ref = self.uids.reference("Service", name.namespace, name.name,
                                      field_path="spec.ports{%s}" % name.port if name.port else "")
            self.recorder.record(
                ref, QUARANTINE_REASON, SYNC_ACTION,
                "kube-proxy (%s mode) on node %s: the kernel refused the rules of port %s/%s: %s; %s until the "
                "Service or its endpoints change" % (
                    self.proxier.mode, self.tracker.hostname or "-", name.port or "(unnamed)", name.protocol,
                    q.error, "its previous rules stay" if q.fallback[0] is not None else "it has no rules"))

    def run(self):
        self.proxier.setup()
        self.source.start()
        try:
            while not self.stopping.is_set():
                now = self.tracker.clock()
                when = self.tracker.next_sync_at(now)
                if when is not None and when <= now:
                    self.sync_once()
                    continue
                self._drain(1.0 if when is None else min(1.0, when - now))
        finally:
            self.source.stop()

    def stop(self, *_):
        self.stopping.set()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="podnet kube-proxy",
                                description="A kube-proxy: programs the kernel for Kubernetes Services.")
    p.add_argument("--proxy-mode", default="iptables", choices=MODES)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config)")
    src.add_argument("--manifests", metavar="DIR",
                     help="read Services and EndpointSlices from YAML/JSON files in DIR (watched)")
    p.add_argument("--manifests-interval", type=parse_duration, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--hostname-override", default="",
                   help="this node's name, as EndpointSlices' nodeName says it (default: the hostname)")
    p.add_argument("--cluster-cidr", type=_cidrs, default=(),
                   help="pod CIDR(s), comma-separated: traffic to Services from elsewhere is masqueraded")
    p.add_argument("--masquerade-all", action="store_true", help="masquerade all traffic to Service IPs")
    p.add_argument("--nodeport-addresses", default="",
                   help='CIDRs (comma-separated) or "primary": the node addresses NodePorts answer on '
                        "(default: all)")
    p.add_argument("--min-sync-period", "--iptables-min-sync-period", dest="min_sync_period",
                   type=parse_duration, default=1.0, help="minimum time between syncs (default 1s)")
    p.add_argument("--sync-period", dest="full_sync_period", type=parse_duration,
                   default=3600.0, help="interval of full syncs (default 1h: partial syncs in between)")
    # kube-proxy's SyncPeriod: since its partial syncs (1.27) the delay before a failed sync is
    # retried, while syncs without changes and full syncs come every FullSyncPeriod (1h, our
    # --sync-period). It once meant "rewrite everything this often": taken that way, the usual
    # 30s would be a multi-second full sync every 30 s at 10k Services.
    p.add_argument("--iptables-sync-period", "--ipvs-sync-period", dest="retry_period", type=parse_duration,
                   default=None, metavar="DURATION",
                   help="after failed syncs, the longest wait before the next (full) one, as kube-proxy's "
                        "SyncPeriod (default 30s; the wait doubles from 2 x --min-sync-period); full syncs "
                        "are --sync-period")
    p.add_argument("--iptables-localhost-nodeports", type=lambda v: v.lower() in ("1", "true", "yes"),
                   default=True, help="NodePorts also answer on 127.0.0.1 (default true)")
    p.add_argument("--metrics-bind-address", default="127.0.0.1:10249", help='("" disables)')
    p.add_argument("--healthz-bind-address", default="0.0.0.0:10256", help='("" disables)')
    p.add_argument("--ipvs-scheduler", default="rr",
                   help="IPVS scheduler for --proxy-mode ipvs: rr, lc, sh, wrr, ... (default rr)")
    p.add_argument("--cleanup", action="store_true", help="remove every rule of ours and exit")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=2, help="log verbosity (kube-proxy's -v)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    opts = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbosity >= 4 else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if opts.cleanup:
        for mode in MODES:
            make_proxier(mode, Config()).cleanup()
        log.info("removed every rule of ours")
        return 0
    spec = tuple(s.strip() for s in opts.nodeport_addresses.split(",") if s.strip())
    try:
        nodeport_ips = resolve_nodeport_addresses(tuple(s if s == "primary" else _cidrs(s)[0] for s in spec))
    except (ValueError, argparse.ArgumentTypeError) as e:
        print("podnet kube-proxy: --nodeport-addresses: %s" % e, file=sys.stderr)
        return 2
    addrs = local_addresses()
    config = Config(cluster_cidr=opts.cluster_cidr, masquerade_all=opts.masquerade_all,
                    nodeport_addresses=nodeport_ips, localhost_nodeports=opts.iptables_localhost_nodeports,
                    node_ip=addrs[0][0] if addrs else "", ipvs_scheduler=opts.ipvs_scheduler)
    hostname = opts.hostname_override or socket.gethostname()

    from kube_proxy.metrics import HEALTHZ_PORT, METRICS_PORT, Metrics
    from kube_proxy.tracker import ChangeTracker
    tracker = ChangeTracker(hostname=hostname, min_sync_period=opts.min_sync_period,
                            full_sync_period=opts.full_sync_period, retry_period=opts.retry_period)
    metrics = Metrics(mode=opts.proxy_mode, health_timeout=max(60.0, 2 * opts.min_sync_period))
    if opts.manifests:
        from podnet.kube.manifests import ManifestSource

        def source_factory(emit):
            return ManifestSource(opts.manifests, emit, interval=opts.manifests_interval)
    else:
        from podnet.kube.api import KubeApiSource

        def source_factory(emit):
            return KubeApiSource(emit, kubeconfig=opts.kubeconfig)
    recorder = None         # manifests: no API to post Events to, the log says it all
    if not opts.manifests:
        from podnet.kube.recorder import EventRecorder
        recorder = EventRecorder("kube-proxy", "kube-proxy-" + hostname, kubeconfig=opts.kubeconfig)
    server = ProxyServer(make_proxier(opts.proxy_mode, config), tracker, source_factory, metrics, recorder)
    from podnet import httpd
    for flag, default_port, kind in (("metrics_bind_address", METRICS_PORT, "metrics"),
                                     ("healthz_bind_address", HEALTHZ_PORT, "healthz")):
        try:
            address = httpd.parse_address(getattr(opts, flag), default_port)
            if address:
                httpd.serve(address, metrics.routes(kind), name="kube-proxy-" + kind)
        except (OSError, ValueError) as e:
            print("podnet kube-proxy: --%s %s: %s" % (flag.replace("_", "-"), getattr(opts, flag), e),
                  file=sys.stderr)
            return 1
    cleanup_other_modes(opts.proxy_mode, config)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    log.info("kube-proxy (%s mode) for node %s; cluster CIDR %s; NodePorts on %s; source %s",
             opts.proxy_mode, hostname, ",".join(opts.cluster_cidr) or "-",
             ",".join(nodeport_ips) or "all local addresses",
             "manifests in %s" % opts.manifests if opts.manifests else "the Kubernetes API")
    started = time.monotonic()
    server.run()
    if recorder is not None:
        recorder.stop()
    log.info("stopped after %.0f s and %d syncs; rules stay in place", time.monotonic() - started, server.syncs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
