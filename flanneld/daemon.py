"""flanneld: lease a subnet, tell the CNI plugin about it, program the backend.

Run once per node, inside the node's network namespace (a DaemonSet with
hostNetwork in a real cluster):

    podnet flanneld --etcd-endpoints http://192.168.50.254:2379 --iface eth0 --ip-masq

The start-up order is flannel's: read and validate the network config (a bad
one is logged and waited out: nothing is configured from it), register the
backend (e.g. create the VTEP), acquire the lease (a restarted node gets its
subnet back), configure the device, write subnet.env, install the masquerade
rules, then follow the other nodes' leases and keep the kernel in step with
them, level-triggered. Every --reconcile-period (5 s) the backend is synced
again with the leases already known, without reading etcd, so what was
deleted by hand (the VTEP, a route, a neighbour or FDB entry) comes back.
SIGTERM stops the daemon and leaves the datapath in place, so pods keep
talking across a restart or upgrade.

The daemon knows its backend and its subnet manager by their contracts only
(flanneld.backend.base.Backend, flanneld.subnet.SubnetManager); main() picks
the concrete ones.
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

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from flanneld.backend.base import Backend
    from flanneld.config import NetworkConfig
    from flanneld.subnet import Lease, SubnetManager
    from podnet.net.ip import IPNet

T = TypeVar("T")

log = logging.getLogger("flanneld")

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_RECONCILE_PERIOD = 5.0      # as the calico agent's reconcile


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="flanneld", description=__doc__.split("\n\n")[0])
    p.add_argument("--etcd-endpoints", default="http://127.0.0.1:2379",
                   help="comma-separated etcd endpoints (default: %(default)s)")
    p.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, help="etcd key prefix (default: %(default)s)")
    p.add_argument("--etcd-cafile", default=None, help="CA bundle to verify etcd's certificate")
    p.add_argument("--etcd-certfile", default=None, help="client certificate for etcd")
    p.add_argument("--etcd-keyfile", default=None, help="client key for etcd")
    p.add_argument("--iface", action="append", default=[],
                   help="interface (name or IP) for inter-node traffic; default: the default route's")
    p.add_argument("--public-ip", default=None, help="IP other nodes reach this node at (default: --iface's)")
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
    p.add_argument("--healthz-port", type=int, default=0, help="port of /healthz; 0 disables it (default)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


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


# ---- the node's external interface ---------------------------------------------------

def find_external_interface(ifaces, public_ip=None):
    """ExternalInterface for --iface (names or IPs, first match wins) or the default route's."""
    from flanneld.backend.base import ExternalInterface
    from podnet.net.ip import AF_INET, parse_ip
    from podnet.net.netlink import Netlink
    with Netlink() as nl:
        links = {l.index: l for l in nl.links()}
        addrs = [a for a in nl.addrs(family=AF_INET) if a.scope == 0]
        candidates = []
        if ifaces:
            for want in ifaces:
                for a in addrs:
                    if links[a.index].name == want or str(a.net.ip) == want:
                        candidates.append(a)
        else:
            default = [r for r in nl.routes(AF_INET) if r.dst.prefixlen == 0 and r.oif]
            index = default[0].oif if default else None
            candidates = [a for a in addrs if a.index == index] if index else []
            if not candidates:   # no default route: the first interface with a global address
                candidates = [a for a in addrs if links[a.index].name != "lo"]
        if not candidates:
            raise RuntimeError("no usable interface found for %s" % (", ".join(ifaces) or "the default route"))
        a = candidates[0]
        link = links[a.index]
        ip = parse_ip(public_ip) if public_ip else a.net.ip
        return ExternalInterface(link.name, link.index, ip, a.net.prefixlen, link.mtu)


# ---- the daemon --------------------------------------------------------------------

class Daemon:
    def __init__(self, opts: argparse.Namespace, subnet_manager: SubnetManager) -> None:
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

    def wait_for_config(self) -> NetworkConfig | None:
        """The network config; a missing or bad one is logged and retried, never applied."""
        longest = self.opts.config_retry_max
        delay = min(1.0, longest)
        while not self.stop.is_set():
            try:
                return self.sm.get_network_config()
            except ConfigError as e:
                log.error("invalid network config at %s/config: %s (waiting for a valid one)",
                          self.opts.etcd_prefix, e)
            except Exception as e:   # etcd unreachable or the key missing
                log.error("cannot read the network config: %s (retrying)", describe(e))
            self.stop.wait(delay)
            delay = min(delay * 2, longest)
        return None

    def run(self) -> int:
        from flanneld import ipmasq
        from flanneld.backend import backend_class
        config = self.wait_for_config()
        if config is None:
            return 0
        ext = find_external_interface(self.opts.iface, self.opts.public_ip)
        log.info("network %s, subnet length /%d, backend %s, external interface %s",
                 config.network, config.subnet_len, config.backend_type, ext)
        self.backend = backend_class(config.backend_type)(config, ext)
        data, mtu = self.backend.register()
        self.lease = self._retry(lambda: self.sm.acquire_lease(ext.ip, config.backend_type, data,
                                                               ttl=self.opts.subnet_lease_ttl), "acquire a lease")
        if self.lease is None:
            return 0
        log.info("lease acquired: %s", self.lease)
        self.backend.configure(self.lease)
        write_file_atomically(self.opts.subnet_file,
                              subnet_env(config.network, self.lease.subnet, mtu, self.opts.ip_masq))
        # As flannel: the FORWARD accept rules always (a node whose FORWARD
        # policy is DROP must still forward pod traffic), masquerade on --ip-masq.
        # A failure is logged and retried by the reconcile thread; it stops nothing else.
        self._iptables_pending = functools.partial(ipmasq.apply, config.network, self.lease.subnet,
                                                   masquerade=self.opts.ip_masq)
        self._apply_iptables()
        threading.Thread(target=self._renew_loop, name="renew", daemon=True).start()
        if self.opts.reconcile_period or self._iptables_pending is not None:
            threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True).start()
        self.ready.set()
        self._follow_leases()
        with self._sync_lock:       # not under a reconcile round's feet
            self.backend.close()
        log.info("stopped; the datapath stays in place")
        return 0

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
            self._sync(remotes)
            for event in self.sm.watch_leases(revision, self.stop):
                remotes = apply_event(remotes, event, self.lease.subnet)
                self._sync(remotes)
                if event[0] == "put" and event[1].subnet == self.lease.subnet \
                        and event[1].public_ip != self.lease.public_ip:
                    log.error("our subnet %s was taken by %s", self.lease.subnet, event[1].public_ip)

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
            try:
                self.backend.sync(list(self._remotes.values()))
            except Exception as e:
                text = describe(e)
                if text != self._last_failure:
                    log.exception("backend sync failed (%s)", why)
                else:
                    log.error("backend sync failed again (%s): %s", why, text)
                self._last_failure = text
                return False
            if self._last_failure is not None:
                log.info("backend sync works again (%s)", why)
                self._last_failure = None
            return True

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
                log.info("lease renewed: %s until %s", self.lease.subnet,
                         time.strftime("%H:%M:%S", time.localtime(self.lease.expiration or 0)))


def serve_healthz(daemon, address, port):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/healthz" and daemon.ready.is_set() and not daemon.stop.is_set()
            body = b"flanneld is running\n" if ok else b"not ready\n"
            self.send_response(200 if ok else (404 if self.path != "/healthz" else 503))
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    return server


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s flanneld: %(message)s")
    from flanneld.subnet.etcd import EtcdSubnetManager
    sm = EtcdSubnetManager([e.strip() for e in opts.etcd_endpoints.split(",") if e.strip()],
                           prefix=opts.etcd_prefix, cafile=opts.etcd_cafile,
                           certfile=opts.etcd_certfile, keyfile=opts.etcd_keyfile)
    daemon = Daemon(opts, sm)

    def on_signal(signum, frame):
        log.info("signal %d: shutting down", signum)
        daemon.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if opts.healthz_port:
        serve_healthz(daemon, opts.healthz_ip, opts.healthz_port)
    return daemon.run()


if __name__ == "__main__":
    raise SystemExit(main())
