"""flanneld: lease a subnet, tell the CNI plugin about it, program the backend.

Run once per node, inside the node's network namespace (a DaemonSet with
hostNetwork in a real cluster), with etcd or the Kubernetes API as the store:

    podnet flanneld --etcd-endpoints http://192.168.50.254:2379 --iface eth0 --ip-masq
    podnet flanneld --kube-subnet-mgr --ip-masq --healthz-port 8081       # as kube-flannel.yml runs it

The start-up order is flannel's: read and validate the network config (etcd's
<prefix>/config, or net-conf.json in Kubernetes mode; a bad one is logged and
waited out: nothing is configured from it), find the external interface
(flanneld.iface: --iface, --iface-regex, --iface-can-reach, --public-ip),
register the backend (e.g. create the VTEP), acquire the lease (a restarted
node gets its subnet back; in Kubernetes mode the lease is the Node's podCIDR
and the backend's data goes into the Node's annotations), configure the
device, write subnet.env, install the masquerade rules, then follow the other
nodes' leases and keep the kernel in step with them, level-triggered. Every
--reconcile-period (5 s) the backend is synced again with the leases already
known, without reading the store, so what was deleted by hand (the VTEP, a
route, a neighbour or FDB entry) comes back. SIGTERM stops the daemon and
leaves the datapath in place, so pods keep talking across a restart or upgrade.

With --healthz-port (kube-flannel.yml uses 8081), one HTTP server on
--healthz-ip answers:
    /healthz   liveness: 200 "flanneld is running" while the daemon's loops are
               alive; 503 with the reason when a loop thread has died or a backend
               sync has run for longer than --healthz-stall-timeout (a wedged daemon);
    /readyz    readiness: 503 "flanneld is not ready yet" until the backend's rules
               for the leases listed at start are in, the iptables rules are
               installed and subnet.env is written, then 200 "flanneld is ready";
    /metrics   flanneld/metrics.py's metrics.

The daemon knows its backend and its subnet manager by their contracts only
(flanneld.backend.base.Backend, flanneld.subnet.SubnetManager); main() picks
the concrete ones. What only the Kubernetes manager has (the node's name, the
attributes its Node stored, the NetworkUnavailable condition) the daemon asks
for when the manager offers it (`_optional`).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, TypeVar

from flanneld.config import ConfigError
from flanneld.subnet import DEFAULT_PREFIX, DEFAULT_TTL
from flanneld.subnet.kube import DEFAULT_ANNOTATION_PREFIX, DEFAULT_NET_CONF

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from flanneld.backend.base import Backend, ExternalInterface
    from flanneld.config import NetworkConfig
    from flanneld.metrics import FlanneldMetrics
    from flanneld.subnet import Lease, SubnetManager
    from podnet.net.ip import IPNet

T = TypeVar("T")

log = logging.getLogger("flanneld")

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_RECONCILE_PERIOD = 5.0      # as the calico agent's reconcile
DEFAULT_STALL_TIMEOUT = 60.0        # a backend sync taking longer is a wedged daemon


def build_parser():
    p = argparse.ArgumentParser(prog="flanneld", description=__doc__.split("\n\n")[0])
    p.add_argument("--etcd-endpoints", default="http://127.0.0.1:2379",
                   help="comma-separated etcd endpoints (default: %(default)s)")
    p.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, help="etcd key prefix (default: %(default)s)")
    p.add_argument("--etcd-cafile", default=None, help="CA bundle to verify etcd's certificate")
    p.add_argument("--etcd-certfile", default=None, help="client certificate for etcd")
    p.add_argument("--etcd-keyfile", default=None, help="client key for etcd")
    p.add_argument("--kube-subnet-mgr", action="store_true",
                   help="take the subnet from this Node's spec.podCIDR and publish the backend's data as Node "
                        "annotations (the Kubernetes API instead of etcd)")
    p.add_argument("--kube-api-url", default="",
                   help="Kubernetes API server URL (default: in-cluster, or the kubeconfig's)")
    p.add_argument("--kubeconfig-file", default="", help="kubeconfig file (default: in-cluster configuration)")
    p.add_argument("--kube-annotation-prefix", default=DEFAULT_ANNOTATION_PREFIX,
                   help="prefix of the Node annotations; may contain one slash (default: %(default)s)")
    p.add_argument("--net-config-path", default=DEFAULT_NET_CONF,
                   help="the network config in Kubernetes mode (default: %(default)s)")
    p.add_argument("--set-node-network-unavailable", type=_bool, nargs="?", const=True, default=True,
                   metavar="BOOL", help="set the Node's NetworkUnavailable condition to False once ready "
                                        "(Kubernetes mode; default: true)")
    p.add_argument("--iface", action="append", default=[],
                   help="interface (name or IP) for inter-node traffic; repeat to try several in order "
                        "(default: the default route's)")
    p.add_argument("--iface-regex", action="append", default=[],
                   help="regex matched against interface addresses, then names, tried after --iface; repeatable")
    p.add_argument("--iface-can-reach", default="",
                   help="the interface (and source address) of the route to this IP, tried last")
    p.add_argument("--public-ip", default=None, help="IP other nodes reach this node at (default: the interface's)")
    p.add_argument("--ip-masq", action="store_true", help="masquerade traffic leaving the cluster network")
    p.add_argument("--subnet-file", default=DEFAULT_SUBNET_FILE,
                   help="where to write subnet.env (default: %(default)s)")
    p.add_argument("--subnet-lease-renew-margin", type=float, default=60,
                   help="renew the lease this many minutes before it expires (default: %(default)s; "
                        "fractions allowed)")
    p.add_argument("--subnet-lease-ttl", type=int, default=DEFAULT_TTL, help=argparse.SUPPRESS)
    p.add_argument("--config-retry-max", type=_positive, default=10.0, metavar="SECONDS",
                   help="while the network config is missing, unreadable or invalid, read it again after "
                        "1 s, doubling up to this (default: %(default)s)")
    p.add_argument("--reconcile-period", type=_seconds, default=DEFAULT_RECONCILE_PERIOD, metavar="SECONDS",
                   help="every this often, sync the backend again with the leases already known (no etcd "
                        "read): what was deleted by hand (the VTEP, a route, a neighbour or FDB entry) comes "
                        "back; 0 turns it off (default: %(default)s)")
    p.add_argument("--healthz-ip", default="0.0.0.0", help="address of the health endpoint (default: %(default)s)")
    p.add_argument("--healthz-port", type=int, default=0,
                   help="port of /healthz, /readyz and /metrics; 0 disables them (default)")
    p.add_argument("--healthz-stall-timeout", type=_positive, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                   help="/healthz fails when a backend sync has been running this long (default: %(default)s)")
    # test hook: SIGUSR2 wedges the next backend sync (it blocks, holding the sync lock, until SIGTERM),
    # so that a test can see /healthz catch a wedged daemon
    p.add_argument("--test-wedge-on-sigusr2", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_args(argv=None, environ=None):
    """The flags; as flannel, FLANNELD_<FLAG> variables (FLANNELD_IFACE, FLANNELD_IP_MASQ...)
    give the values of flags not on the command line."""
    parser = build_parser()
    repeatable = defaults_from_env(parser, os.environ if environ is None else environ)
    opts = parser.parse_args(argv)
    for dest, value in repeatable.items():
        if not getattr(opts, dest):
            setattr(opts, dest, value)
    return opts


def defaults_from_env(parser, environ):
    """Set the defaults of `parser` from FLANNELD_* variables; returns {dest: [value]} for the
    repeatable flags (argparse would append the command line's to a default list)."""
    repeatable = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest == "help":
            continue
        name = "FLANNELD_" + longs[0][2:].upper().replace("-", "_")
        if name not in environ:
            continue
        text = environ[name]
        try:
            if isinstance(action, argparse._StoreTrueAction):
                parser.set_defaults(**{action.dest: _bool(text)})
            elif isinstance(action, argparse._AppendAction):
                repeatable[action.dest] = [action.type(text) if action.type else text]
            else:
                parser.set_defaults(**{action.dest: action.type(text) if action.type else text})
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error("%s=%r: %s" % (name, text, e))
    return repeatable


def _bool(text):
    """Go's strconv.ParseBool, as flannel's boolean flags and FLANNELD_* variables take them."""
    if isinstance(text, bool):
        return text
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError("not a boolean: %r" % (text,))


def _seconds(text, zero=True):
    """A finite number of seconds, positive or (if `zero`) 0: an argparse type."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf") or zero and value == 0):
        raise argparse.ArgumentTypeError("must be a %snumber of seconds, not %r"
                                         % ("" if zero else "positive ", text))
    return value


def _positive(text):
    return _seconds(text, zero=False)


# ---- pure pieces ---------------------------------------------------------------

def subnet_env(network, subnet, mtu, ipmasq):
    """The text of subnet.env: FLANNEL_SUBNET is the pod gateway (.1) with the lease's length."""
    gateway = subnet.network + 1
    return ("FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=%s/%d\nFLANNEL_MTU=%d\nFLANNEL_IPMASQ=%s\n"
            % (network, gateway, subnet.prefixlen, mtu, "true" if ipmasq else "false"))


def describe(e):
    """An exception as a log line shows it: its text, or its type when it has none
    (a MemoryError, a bare RuntimeError())."""
    return str(e) or type(e).__name__


def write_file_atomically(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remote_leases(leases, own_subnet):
    """{subnet: lease} of every node but this one."""
    return {l.subnet: l for l in leases if l.subnet != own_subnet}


def apply_event(remotes, event, own_subnet):
    """Update the {subnet: lease} map with one watch event; returns the map."""
    kind, payload = event
    if kind == "resync":
        return remote_leases(payload, own_subnet)
    if kind == "put":
        if payload.subnet != own_subnet:
            remotes[payload.subnet] = payload
    elif kind == "delete":
        remotes.pop(payload, None)
    return remotes


# ---- the daemon --------------------------------------------------------------------

def _optional(manager, name):
    """A method only some subnet managers have (the Kubernetes one), or None."""
    return getattr(manager, name, None)


class Daemon:
    def __init__(self, opts: argparse.Namespace, subnet_manager: SubnetManager,
                 metrics: FlanneldMetrics | None = None) -> None:
        self.opts = opts
        self.sm = subnet_manager
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.backend: Backend | None = None
        self.lease: Lease | None = None
        # backend.sync() runs in the watch thread (after each event) and in the reconcile
        # thread (every --reconcile-period): one at a time, always with the latest leases.
        self._sync_lock = threading.Lock()
        self._remotes: dict[IPNet, Lease] | None = None     # what the last sync was given
        self._last_failure: str | None = None
        self._iptables_pending: Callable[[], object] | None = None     # until it has worked once
        # readiness: subnet.env written, the first listing synced, the iptables rules in
        self._subnet_written = False
        self._synced_once = False
        # liveness: the loops' threads, and when the sync under way (if any) started
        self._threads: dict[str, threading.Thread] = {}
        self._sync_started: float | None = None
        self._wedge = False
        self._stored_mac: str | None = None     # the VTEP MAC our Node published (Kubernetes mode)
        self.metrics = metrics

    def config_location(self) -> str:
        if getattr(self.opts, "kube_subnet_mgr", False):
            return self.opts.net_config_path
        return "%s/config" % self.opts.etcd_prefix

    def wait_for_config(self) -> NetworkConfig | None:
        """The network config; a missing or bad one is logged and retried, never applied."""
        longest = self.opts.config_retry_max
        delay = min(1.0, longest)
        while not self.stop.is_set():
            try:
                return self.sm.get_network_config()
            except ConfigError as e:
                log.error("invalid network config at %s: %s (waiting for a valid one)", self.config_location(), e)
            except Exception as e:   # etcd unreachable, the key or the file missing
                log.error("cannot read the network config: %s (retrying)", describe(e))
            self.stop.wait(delay)
            delay = min(delay * 2, longest)
        return None

    def find_interface(self) -> ExternalInterface | None:
        """flanneld.iface's choice, retried while nothing matches (the interface or its
        address may not be there yet); with the public IP the manager stored, if any."""
        from flanneld.iface import find_external_interface
        public_ip = self.opts.public_ip
        stored = _optional(self.sm, "stored_attributes")
        self._stored_mac = None
        if stored is not None:
            annotated_ip, self._stored_mac = stored()
            if annotated_ip:
                log.info("using the public IP %s the node's annotation gives", annotated_ip)
                public_ip = annotated_ip
        return self._retry(lambda: find_external_interface(self.opts.iface, self.opts.iface_regex,
                                                           self.opts.iface_can_reach or None, public_ip),
                           "find the interface to use")

    def run(self) -> int:
        from flanneld import ipmasq
        from flanneld.backend import backend_class
        config = self.wait_for_config()
        if config is None:
            return 0
        resolve = _optional(self.sm, "resolve_node_name")
        if resolve is not None and self._retry(resolve, "find this node's name") is None:
            return 0
        ext = self.find_interface()
        if ext is None:
            return 0
        log.info("network %s, subnet length /%d, backend %s, external interface %s",
                 config.network, config.subnet_len, config.backend_type, ext)
        self.backend = backend_class(config.backend_type)(config, ext)
        if self._stored_mac and getattr(self.backend, "mac", False) is None:
            # the VTEP's MAC our Node published before: used if the device must be created
            log.info("VTEP MAC %s from this node's annotation", self._stored_mac)
            self.backend.mac = self._stored_mac      # type: ignore[attr-defined]
        if self.metrics is not None and callable(getattr(self.backend, "stats", None)):
            self.metrics.backend_stats = self.backend.stats         # type: ignore[attr-defined]
        data, mtu = self.backend.register()
        self.lease = self._retry(lambda: self.sm.acquire_lease(ext.ip, config.backend_type, data,
                                                               ttl=self.opts.subnet_lease_ttl), "acquire a lease")
        if self.lease is None:
            return 0
        log.info("lease acquired: %s", self.lease)
        self.backend.configure(self.lease)
        write_file_atomically(self.opts.subnet_file,
                              subnet_env(config.network, self.lease.subnet, mtu, self.opts.ip_masq))
        self._subnet_written = True
        # As flannel: the FORWARD accept rules always (a node whose FORWARD
        # policy is DROP must still forward pod traffic), masquerade on --ip-masq.
        # A failure is logged and retried by the reconcile thread; it stops nothing else.
        self._iptables_pending = functools.partial(ipmasq.apply, config.network, self.lease.subnet,
                                                   masquerade=self.opts.ip_masq)
        self._apply_iptables()
        self._start_thread("renew", self._renew_loop)
        if self.opts.reconcile_period or self._iptables_pending is not None:
            self._start_thread("reconcile", self._reconcile_loop)
        self._follow_leases()
        with self._sync_lock:       # not under a reconcile round's feet
            self.backend.close()
        stop = _optional(self.sm, "stop")
        if stop is not None:
            stop()
        log.info("stopped; the datapath stays in place")
        return 0

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads[name] = thread
        thread.start()

    def _retry(self, action: Callable[[], T], what: str) -> T | None:
        delay = 1
        while not self.stop.is_set():
            try:
                return action()
            except Exception as e:
                log.error("failed to %s: %s (retrying in %gs)", what, describe(e), delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 10)
        return None

    def _follow_leases(self) -> None:
        """List, sync, then apply every watch event and sync again (level-triggered)."""
        assert self.lease is not None, "run() acquires the lease first"
        while not self.stop.is_set():
            listed = self._retry(self.sm.list_leases, "list leases")
            if listed is None:
                return
            leases, revision = listed
            remotes = remote_leases(leases, self.lease.subnet)
            if self._sync(remotes) and not self._synced_once:
                self._synced_once = True
                self._update_ready()
            for event in self.sm.watch_leases(revision, self.stop):
                remotes = apply_event(remotes, event, self.lease.subnet)
                if self._sync(remotes) and not self._synced_once:
                    self._synced_once = True
                    self._update_ready()
                if event[0] == "put" and event[1].subnet == self.lease.subnet \
                        and event[1].public_ip != self.lease.public_ip:
                    log.error("our subnet %s was taken by %s", self.lease.subnet, event[1].public_ip)

    def _update_ready(self) -> None:
        """Ready once subnet.env is written, the iptables rules are in and the leases listed
        at start are synced; then, in Kubernetes mode, the Node's NetworkUnavailable is cleared."""
        if self.ready.is_set() or not (self._subnet_written and self._synced_once
                                       and self._iptables_pending is None):
            return
        self.ready.set()
        if self.metrics is not None:
            self.metrics.ready.set(1)
        log.info("flannel is ready")
        complete = _optional(self.sm, "complete_lease")
        if complete is not None:
            lease = self.lease
            self._start_thread("complete-lease", lambda: self._retry(functools.partial(complete, lease),
                                                                     "set the node's NetworkUnavailable condition"))

    def readiness(self) -> tuple[bool, str]:
        if self.ready.is_set() and not self.stop.is_set():
            return True, ""
        missing = [what for what, done in (("the network config and lease", self._subnet_written),
                                           ("the backend's first sync", self._synced_once),
                                           ("the iptables rules", self._subnet_written
                                            and self._iptables_pending is None)) if not done]
        return False, "waiting for " + ", ".join(missing) if missing else "stopping"

    def liveness(self) -> tuple[bool, str]:
        """False with the reason when a loop thread has died or a backend sync is stuck."""
        if self.stop.is_set():
            return False, "stopping"
        started = self._sync_started
        if started is not None:
            running = time.monotonic() - started
            if running > self.opts.healthz_stall_timeout:
                return False, "a backend sync has been running for %.0fs" % running
        for name, thread in list(self._threads.items()):
            if not thread.is_alive() and name != "complete-lease":
                return False, "the %s loop has stopped" % name
        alive = _optional(self.sm, "alive")
        if alive is not None:
            return alive()
        return True, ""

    def wedge(self, signum=None, frame=None) -> None:
        """The test hook (--test-wedge-on-sigusr2): the next sync blocks until stop."""
        log.warning("test hook: wedging the next backend sync")
        self._wedge = True

    def _sync(self, remotes: dict[IPNet, Lease] | None, why: str = "event") -> bool:
        """backend.sync() with these remote leases (None: the ones of the last sync);
        False if it failed. A failure is logged (its traceback once, then a line per
        repeat) and stops nothing: the next event or reconcile round tries again."""
        assert self.backend is not None, "run() registers the backend first"
        with self._sync_lock:
            if remotes is not None:
                self._remotes = dict(remotes)       # a copy: the watch thread updates its own map
            if self._remotes is None:
                return True                         # nothing listed yet: nothing to reconcile
            leases = list(self._remotes.values())
            self._sync_started = started = time.monotonic()
            try:
                if self._wedge:
                    self.stop.wait()
                changes = self.backend.sync(leases)
            except Exception as e:
                self._sync_started = None
                if self.metrics is not None:
                    self.metrics.sync_errors.labels(why).inc()
                text = describe(e)
                if text != self._last_failure:
                    log.exception("backend sync failed (%s)", why)
                else:
                    log.error("backend sync failed again (%s): %s", why, text)
                self._last_failure = text
                return False
            self._sync_started = None
            if self.metrics is not None:
                self._record_sync(why, time.monotonic() - started, changes, leases)
            if self._last_failure is not None:
                log.info("backend sync works again (%s)", why)
                self._last_failure = None
            return True

    def _record_sync(self, why: str, seconds: float, changes: object, leases: list[Lease]) -> None:
        from flanneld.metrics import entry_counts
        metrics = self.metrics
        assert metrics is not None
        metrics.sync_duration.labels(why).observe(seconds)
        metrics.last_sync.set_to_current_time()
        metrics.leases.set(len(leases))
        if isinstance(changes, (list, tuple)) and changes:
            metrics.changes.inc(len(changes))
        desired = getattr(self.backend, "desired", None)
        if desired is not None:
            try:
                metrics.set_entries(entry_counts(desired(leases)))
            except Exception as e:      # a figure must never fail a sync
                log.debug("counting the backend's entries: %s", describe(e))

    def _apply_iptables(self) -> bool:
        """The iptables rules, if they are still to be installed; False if that failed."""
        apply = self._iptables_pending
        if apply is None:
            return True
        try:
            apply()
        except Exception as e:
            log.error("failed to install the iptables rules: %s (retrying)", describe(e))
            return False
        self._iptables_pending = None
        self._update_ready()
        return True

    def _reconcile_loop(self) -> None:
        """Every --reconcile-period: sync the backend again with the leases already
        known, without reading etcd. The sync computes the whole desired state and
        applies only the difference, so a round that finds everything in place
        changes nothing and costs a few netlink dumps; what was deleted by hand (the
        VTEP, a route, a neighbour or FDB entry) comes back. Failed rounds back off
        (doubling, up to a minute); iptables rules not yet installed are retried here."""
        period = self.opts.reconcile_period or DEFAULT_RECONCILE_PERIOD
        delay = period
        while not self.stop.wait(delay):
            ok = self._apply_iptables()
            if self.opts.reconcile_period:
                ok = self._sync(None, "reconcile") and ok
            elif self._iptables_pending is None:
                return          # reconciling is off and the rules are in: nothing left to do
            delay = period if ok else min(delay * 2, max(period, 60.0))

    def _renew_loop(self) -> None:
        margin = self.opts.subnet_lease_renew_margin * 60
        while not self.stop.is_set():
            lease = self.lease      # only this thread replaces it, once run() has acquired it
            assert lease is not None, "run() acquires the lease first"
            expires = lease.expiration or (time.time() + self.opts.subnet_lease_ttl)
            wait = max(1.0, expires - margin - time.time())
            if self.stop.wait(wait):
                return
            renewed = self._retry(functools.partial(self.sm.renew_lease, lease), "renew the lease")
            if renewed is not None:
                self.lease = renewed
                if renewed.expiration:
                    log.info("lease renewed: %s until %s", self.lease.subnet,
                             time.strftime("%H:%M:%S", time.localtime(renewed.expiration)))


# ---- /healthz, /readyz, /metrics ------------------------------------------------------

TEXT = "text/plain; charset=utf-8"


def health_routes(daemon):
    """flannel's /healthz and /readyz texts, with the reason when they fail; /metrics."""
    from podnet.httpd import metrics_handler

    def healthz():
        ok, why = daemon.liveness()
        if ok:
            return 200, TEXT, b"flanneld is running\n"
        return 503, TEXT, ("flanneld is not healthy: %s\n" % why).encode()

    def readyz():
        ok, why = daemon.readiness()
        if ok:
            return 200, TEXT, b"flanneld is ready\n"
        return 503, TEXT, ("flanneld is not ready yet: %s\n" % why).encode()

    routes = {"/healthz": healthz, "/readyz": readyz}
    if daemon.metrics is not None:
        routes["/metrics"] = metrics_handler(daemon.metrics.registry)
    return routes


def serve_healthz(daemon, address, port):
    from podnet.httpd import serve
    return serve((address, port), health_routes(daemon), name="healthz")


# ---- main ----------------------------------------------------------------------------

def make_subnet_manager(opts):
    """The subnet manager the flags ask for: the Kubernetes API's or etcd's."""
    if opts.kube_subnet_mgr:
        from flanneld.subnet.kube import KubeSubnetManager
        from podnet.kube.nodes import make_client
        return KubeSubnetManager(lambda: make_client(opts.kube_api_url or None, opts.kubeconfig_file or None),
                                 net_config_path=opts.net_config_path,
                                 annotation_prefix=opts.kube_annotation_prefix,
                                 set_network_unavailable=opts.set_node_network_unavailable)
    from flanneld.subnet.etcd import EtcdSubnetManager
    return EtcdSubnetManager([e.strip() for e in opts.etcd_endpoints.split(",") if e.strip()],
                             prefix=opts.etcd_prefix, cafile=opts.etcd_cafile,
                             certfile=opts.etcd_certfile, keyfile=opts.etcd_keyfile)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s flanneld: %(message)s")
    from flanneld.metrics import FlanneldMetrics
    from podnet.kube.nodes import NodeNameError
    try:
        sm = make_subnet_manager(opts)
    except ValueError as e:         # e.g. an annotation prefix flannel refuses
        log.error("%s", e)
        return 2
    metrics = FlanneldMetrics()
    metrics.subnet_stats = _optional(sm, "stats")
    daemon = Daemon(opts, sm, metrics)

    def on_signal(signum, frame):
        log.info("signal %d: shutting down", signum)
        daemon.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if opts.test_wedge_on_sigusr2:
        signal.signal(signal.SIGUSR2, daemon.wedge)
    if opts.healthz_port:
        try:
            serve_healthz(daemon, opts.healthz_ip, opts.healthz_port)
        except OSError as e:
            log.error("cannot serve /healthz on %s:%d: %s", opts.healthz_ip, opts.healthz_port, e)
            return 1
        log.info("serving /healthz, /readyz and /metrics on %s:%d", opts.healthz_ip, opts.healthz_port)
    try:
        return daemon.run()
    except NodeNameError as e:
        log.error("cannot tell which node this is: %s", e)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
