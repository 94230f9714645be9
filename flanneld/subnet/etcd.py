"""Subnet leases in etcd v3, in flannel's layout, through etcd's JSON gateway.

    sm = EtcdSubnetManager(["https://10.0.0.1:2379"], cafile=..., certfile=..., keyfile=...)
    config = sm.get_network_config()
    lease = sm.acquire_lease(public_ip, "vxlan", {"VtepMAC": "..."})
    leases, revision = sm.list_leases()
    for kind, payload in sm.watch_leases(revision, stop_event):
        ...   # ("put", Lease) | ("delete", IPNet) | ("resync", [Lease])
    lease = sm.renew_lease(lease)         # on a timer, renew_margin before lease.expiration

Each subnet key carries its own etcd lease (TTL, default 24 h), so a node that
goes away loses its subnet when the TTL runs out and the watchers of the other
nodes see a delete. A node that comes back with the same public IP gets its
old subnet back. New subnets are created with a transaction "create if
absent", so two nodes can never hold the same one.

The transport is podnet.etcd.EtcdClient (etcd3gw, shared with calico-lite:
endpoint failover, TLS, the raw watch stream that reports compaction and
connection loss). What is flannel's stays here: the key layout, leases with
their etcd leases, and the watch loop with resync and reconnect.

Threads: every method may be called from any thread (each thread gets its own
HTTP session; the table of etcd lease IDs is locked), so the daemon can watch
in one thread while another renews.
"""
import contextlib
import logging
import threading
import time

from flanneld.config import ConfigError, parse
from flanneld.subnet import DEFAULT_PREFIX, DEFAULT_TTL, Lease, LeaseError, choose_subnet, parse_lease, subnet_from_key
from podnet.etcd import EtcdClient, EtcdError, WatchCompacted, cmp_absent, cmp_mod, decode_event, op_delete, op_put

log = logging.getLogger("flanneld.subnet.etcd")

RENEW_MARGIN = 3600      # flannel renews a lease one hour before it expires
ACQUIRE_ATTEMPTS = 10    # create-if-absent conflicts before giving up (each retry re-lists)

__all__ = ["EtcdSubnetManager", "EtcdError", "ConfigMissingError", "NetworkFullError", "LeaseLostError"]


class ConfigMissingError(LookupError):
    """There is no network config at <prefix>/config (yet)."""


class NetworkFullError(RuntimeError):
    """Every subnet of the network is leased."""


class LeaseLostError(RuntimeError):
    """Our subnet is now held by another node (our lease had expired)."""


class _StreamEnded(Exception):
    pass


class EtcdSubnetManager:
    def __init__(self, endpoints, prefix=DEFAULT_PREFIX, cafile=None, certfile=None, keyfile=None,
                 timeout=5.0, renew_margin=RENEW_MARGIN, retry_min=0.5, retry_max=10.0,
                 watch_idle_timeout=900.0):
        self.etcd = EtcdClient(endpoints, cafile=cafile, certfile=certfile, keyfile=keyfile, timeout=timeout)
        self.endpoints = self.etcd.endpoints  # [(scheme, host, port, url)]
        self.prefix = "/" + prefix.strip("/")
        self.subnets_prefix = self.prefix + "/subnets/"
        self.config_key = self.prefix + "/config"
        self.renew_margin = renew_margin      # seconds before expiration that renew_delay() aims at
        self.retry_min, self.retry_max = retry_min, retry_max
        # etcd sends a progress notification on quiet watches every 10 min (3.4 default):
        # a stream silent for longer than this is taken as a dead connection.
        self.watch_idle_timeout = watch_idle_timeout
        self._lock = threading.Lock()
        self._held = {}                       # subnet -> (etcd lease id, ttl) of leases we own

    def __repr__(self):
        return "EtcdSubnetManager(%s %s)" % (",".join(e.url for e in self.endpoints), self.prefix)

    def _post(self, path, body):
        """A raw v3 API call (for tests and debugging: everything else goes through self.etcd)."""
        return self.etcd.post(path, body)

    def _revoke(self, lease_id):
        try:
            self.etcd.lease_revoke(lease_id)
        except EtcdError as e:
            log.debug("revoking etcd lease %x: %s", lease_id, e)

    # ---- the network config -----------------------------------------------------

    def get_network_config(self):
        kv, _ = self.etcd.get(self.config_key)
        if kv is None:
            raise ConfigMissingError(
                "no network config at %s in etcd (%s); write one, e.g. etcdctl put %s "
                "'{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}'"
                % (self.config_key, ",".join(e.url for e in self.endpoints), self.config_key))
        try:
            return parse(kv.value.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError("%s is not UTF-8 text" % self.config_key) from None

    # ---- listing --------------------------------------------------------------------

    def _list(self):
        """(leases, taken subnets, kvs by subnet, revision). A malformed value still takes its subnet."""
        kvs, revision = self.etcd.get_prefix(self.subnets_prefix)
        leases, taken, by_subnet = [], set(), {}
        for kv in kvs:
            try:
                subnet = subnet_from_key(kv.key)
            except LeaseError as e:
                log.warning("skipping %s", e)
                continue
            taken.add(subnet)
            by_subnet[subnet] = kv
            try:
                leases.append(parse_lease(kv.key, kv.value))
            except LeaseError as e:
                log.warning("skipping %s", e)
        return leases, taken, by_subnet, revision

    def list_leases(self):
        """(every valid lease, the etcd revision of the listing). Malformed ones are logged and skipped."""
        leases, _, _, revision = self._list()
        return leases, revision

    # ---- our own lease --------------------------------------------------------------

    def _compatible(self, config, subnet):
        return (subnet.prefixlen == config.subnet_len
                and config.subnet_min.value <= subnet.network.value <= config.subnet_max.value)

    def acquire_lease(self, public_ip, backend_type, backend_data, ttl=DEFAULT_TTL):
        """Our lease: the subnet this public IP already holds, or a free one, created atomically."""
        from podnet.net.ip import parse_ip
        if isinstance(public_ip, str):
            public_ip = parse_ip(public_ip)
        config = self.get_network_config()
        for attempt in range(ACQUIRE_ATTEMPTS):
            leases, taken, by_subnet, _ = self._list()
            mine = [l for l in leases if l.public_ip == public_ip]
            mine.sort(key=lambda l: not self._compatible(config, l.subnet))     # a usable one first
            for old in mine[1:]:
                log.warning("%s holds a second lease %s; ignoring it", public_ip, old.subnet)
            if mine and not self._compatible(config, mine[0].subnet):
                old = mine[0]
                log.warning("our previous lease %s does not fit the network config %s: releasing it",
                            old.subnet, config)
                kv = by_subnet[old.subnet]
                self.etcd.txn([cmp_mod(kv.key, kv.mod_revision)], [op_delete(kv.key)])
                continue
            lease = Lease(mine[0].subnet if mine else None, public_ip, backend_type, backend_data)
            if mine:
                kv = by_subnet[lease.subnet]
                done = self._put_lease(lease, ttl, compare=cmp_mod(kv.key, kv.mod_revision), previous=kv.lease)
                verb = "reusing"
            else:
                lease.subnet = choose_subnet(config, taken)
                if lease.subnet is None:
                    count = (config.subnet_max.value - config.subnet_min.value >> 32 - config.subnet_len) + 1
                    raise NetworkFullError("network %s is full: all %d /%d subnets from %s to %s are leased "
                                           "(or overlap a lease)"
                                           % (config.network, count, config.subnet_len,
                                              config.subnet_min, config.subnet_max))
                done = self._put_lease(lease, ttl, compare=cmp_absent(lease.key(self.prefix)))
                verb = "new"
            if done:
                log.info("acquired %s lease %s for %s (ttl %ds)", verb, lease.subnet, public_ip, ttl)
                return lease
            log.info("lease %s changed under us (attempt %d): retrying", lease.subnet, attempt + 1)
        raise EtcdError("could not acquire a lease after %d attempts: too much contention" % ACQUIRE_ATTEMPTS)

    def _put_lease(self, lease, ttl, compare, previous=0):
        """Put lease.value() under a fresh etcd lease if `compare` holds; sets lease.expiration."""
        lease_id, granted = self.etcd.lease_grant(ttl)
        ok = self.etcd.txn([compare], [op_put(lease.key(self.prefix), lease.value(), lease=lease_id)])
        if not ok:
            self._revoke(lease_id)
            return False
        lease.expiration = time.time() + granted
        with self._lock:
            self._held[lease.subnet] = (lease_id, ttl)
        if previous and previous != lease_id:
            self._revoke(previous)    # the key moved to the new lease: the old one only holds nothing now
        return True

    def renew_lease(self, lease):
        """The same lease with a new expiration (an etcd keepalive: no watch event for the
        others). If the key or its etcd lease was lost (expired while etcd was unreachable,
        deleted by hand), it is recreated with the same subnet; LeaseLostError if another
        node holds that subnet by now."""
        key = lease.key(self.prefix)
        with self._lock:
            held = self._held.get(lease.subnet)
        kv, _ = self.etcd.get(key)
        if kv is not None and kv.lease and kv.value == lease.value().encode():
            lease_id = kv.lease
            remaining = self.etcd.lease_keepalive(lease_id)
            if remaining > 0:
                with self._lock:
                    self._held[lease.subnet] = (lease_id, remaining)
                log.debug("renewed %s for %ds", lease.subnet, remaining)
                return Lease(lease.subnet, lease.public_ip, lease.backend_type, lease.backend_data,
                             time.time() + remaining)
        ttl = held[1] if held else DEFAULT_TTL
        for _ in range(ACQUIRE_ATTEMPTS):
            renewed = Lease(lease.subnet, lease.public_ip, lease.backend_type, lease.backend_data)
            if kv is None:
                log.warning("lease %s had gone from etcd: recreating it", lease.subnet)
                ok = self._put_lease(renewed, ttl, compare=cmp_absent(key))
            else:
                try:
                    current = parse_lease(key, kv.value)
                except LeaseError:
                    current = None
                if current is None or current.public_ip != lease.public_ip:
                    raise LeaseLostError("subnet %s is now held by %s" % (
                        lease.subnet, current.public_ip if current else "a malformed entry"))
                log.warning("lease %s had lost its etcd lease or changed: rewriting it", lease.subnet)
                ok = self._put_lease(renewed, ttl, compare=cmp_mod(kv.key, kv.mod_revision), previous=kv.lease)
            if ok:
                return renewed
            kv, _ = self.etcd.get(key)
        raise EtcdError("could not renew %s: too much contention" % lease.subnet)

    def renew_delay(self, lease, now=None):
        """Seconds until `lease` should be renewed (renew_margin before it expires), at least 0."""
        if lease.expiration is None:
            return 0.0
        return max(0.0, lease.expiration - self.renew_margin - (now if now is not None else time.time()))

    def release_lease(self, lease):
        """Delete our lease's key (a node leaving). False if it was gone or is another node's."""
        key = lease.key(self.prefix)
        kv, _ = self.etcd.get(key)
        with self._lock:
            held = self._held.pop(lease.subnet, None)
        if kv is None:
            return False
        try:
            current = parse_lease(key, kv.value)
        except LeaseError:
            current = None
        if current is not None and current.public_ip != lease.public_ip:
            log.warning("not releasing %s: it is held by %s", lease.subnet, current.public_ip)
            return False
        ok = self.etcd.txn([cmp_mod(kv.key, kv.mod_revision)], [op_delete(key)])
        for lease_id in {kv.lease, held[0] if held else 0} - {0}:
            self._revoke(lease_id)
        return ok

    # ---- watching ---------------------------------------------------------------------

    def watch_leases(self, revision, stop_event):
        """Events after `revision` until stop_event is set:
            ("put", Lease)      a node's lease was created or changed
            ("delete", IPNet)   a lease was deleted or expired (or overwritten with garbage)
            ("resync", [Lease]) the complete set: after a reconnect or a compacted revision,
                                events may have been missed; replace everything you know.
        Never raises on etcd outages: logs them and reconnects with backoff."""
        start = revision + 1
        resync = False
        delay = self.retry_min
        down_since = None
        last_warning = 0.0
        while not stop_event.is_set():
            index = self.etcd.current
            try:
                if resync:
                    leases, rev = self.list_leases()
                    yield ("resync", leases)
                    start, resync = rev + 1, False
                with contextlib.closing(self.etcd.watch(self.subnets_prefix, start, stop_event,
                                                        self.watch_idle_timeout, index)) as stream:
                    for result in stream:
                        if down_since is not None:
                            log.info("etcd watch on %s is back after %.1fs", self.endpoints[index].url,
                                     time.time() - down_since)
                            down_since, last_warning = None, 0.0
                        delay = self.retry_min
                        header_rev = int(result.get("header", {}).get("revision", 0))
                        events = result.get("events") or []
                        for ev in events:
                            out = self._event(ev)
                            if out is not None:
                                yield out
                        if events:
                            start = max(int(ev["kv"].get("mod_revision", 0)) for ev in events) + 1
                        elif not result.get("created") and header_rev:
                            start = max(start, header_rev + 1)     # progress notification
                if stop_event.is_set():
                    return
                raise _StreamEnded("the watch stream ended")
            except WatchCompacted as e:
                log.warning("etcd watch: %s: listing everything again", e)
                resync = True
                continue
            except Exception as e:       # any failure: log, back off, re-list
                if stop_event.is_set():
                    return
                resync = True
                self.etcd.failover_from(index)
                now = time.time()
                if down_since is None:
                    down_since = now
                text = str(e) if isinstance(e, (EtcdError, _StreamEnded)) else self.etcd.describe(index, e)
                if now - last_warning > 30:      # once per outage, then every 30 s
                    log.warning("etcd watch interrupted: %s (retrying in %.1fs)", text, delay)
                    last_warning = now
                else:
                    log.debug("etcd watch: %s (retrying in %.1fs)", text, delay)
                if stop_event.wait(delay):
                    return
                delay = min(delay * 2, self.retry_max)

    def _event(self, ev):
        kind, kv = decode_event(ev)
        try:
            subnet = subnet_from_key(kv.key)
        except LeaseError as e:
            log.warning("ignoring watch event: %s", e)
            return None
        if kind == "DELETE":
            return ("delete", subnet)
        try:
            return ("put", parse_lease(kv.key, kv.value))
        except LeaseError as e:
            log.warning("%s: treating it as deleted", e)
            return ("delete", subnet)
