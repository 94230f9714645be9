"""The change tracker: events in, one sync's worth of work out.

Sources (sources/) emit Service and EndpointSlice events; the tracker keeps
the current objects' models (kube_proxy.model) and the set of service ports
that may have changed. A proxier asks `next_sync_at()` when to run and
`take()` for a `Sync`: the whole desired state (to render) plus exactly the
service ports whose ServicePort or endpoints differ from the previous sync
(to write a partial update). A change undone before the sync (A -> B -> A)
does not show up at all.

Timing, as kube-proxy's bounded-frequency runner: the first change after a
quiet period is synced at once; further changes wait until `min_sync_period`
has passed since the previous sync, so a burst coalesces into one sync. Every
`full_sync_period` (and after a failed sync, and the first time) the sync is
marked full, meaning: render and check everything, not only the changes.
Nothing is synced before both kinds have been listed once (`ready`), so a
start-up never programs Services without their endpoints.

Pure and single-threaded: no I/O, no threads, time from an injected clock.
Sources that run in threads hand their events over through a queue that the
sync loop drains into `apply()`.
"""
import logging
import time
from dataclasses import dataclass, field
from types import MappingProxyType

from kube_proxy import model

log = logging.getLogger("kube_proxy.tracker")


@dataclass(frozen=True)
class Sync:
    """One sync's input. `changed`: service ports to rewrite (present in `state`: new or
    changed; absent: removed). `previous`: {name: (ServicePort or None, endpoints)} as of
    the sync before, for each changed name."""
    state: model.ProxyState
    changed: frozenset
    full: bool
    reason: str = ""
    previous: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    @property
    def empty(self):
        return not self.full and not self.changed


class ChangeTracker:
    def __init__(self, family=4, hostname=None, min_sync_period=1.0, full_sync_period=3600.0,
                 clock=time.monotonic):
        self.family = family
        self.hostname = hostname
        self.min_sync_period = float(min_sync_period)
        self.full_sync_period = float(full_sync_period)
        self.clock = clock
        self._services = {}         # (ns, name) -> {ServicePortName: ServicePort}
        self._slices = {}           # (ns, slice name) -> SliceInfo
        self._by_service = {}       # (ns, service) -> {slice key}
        self._service_eps = {}      # (ns, service) -> {ServicePortName: (Endpoint, ...)}
        self._ports = {}            # ServicePortName -> ServicePort (current)
        self._endpoints = {}        # ServicePortName -> (Endpoint, ...) (current, Service or not)
        self._dirty = set()
        self._synced_ports = {}     # as handed out by the previous take()
        self._synced_eps = {}
        self._listed = {"Service": False, "EndpointSlice": False}
        self._last_sync = None
        self._last_full = None
        self._full_reason = "first sync"

    # ---- state ----

    @property
    def ready(self):
        """Both Services and EndpointSlices have been listed once."""
        return all(self._listed.values())

    def service_count(self):
        return len(self._services)

    def slice_count(self):
        return len(self._slices)

    # ---- events ----

    def apply(self, event):
        """One sources.Event. Unknown kinds or types are logged and ignored."""
        kind, etype, obj = event.kind, event.type, event.obj
        if kind not in self._listed:
            log.debug("ignoring event for kind %s", kind)
        elif etype == "RELIST":
            self.replace(kind, obj)
        elif etype in ("ADDED", "MODIFIED"):
            (self.update_service if kind == "Service" else self.update_slice)(obj)
        elif etype == "DELETED":
            (self.delete_service if kind == "Service" else self.delete_slice)(obj)
        else:
            log.warning("ignoring %s event of unknown type %r", kind, etype)

    def update_service(self, obj):
        key = model.object_key(obj)
        if key is None:
            model.service_ports(obj, self.family)      # logs the reason
            return
        self._set_service(key, model.service_ports(obj, self.family))

    def delete_service(self, obj_or_key):
        key = obj_or_key if isinstance(obj_or_key, tuple) else model.object_key(obj_or_key)
        if key is not None:
            self._set_service(key, {})

    def update_slice(self, obj):
        key = model.object_key(obj)
        if key is None:
            model.slice_info(obj, self.family, self.hostname)
            return
        self._set_slice(key, model.slice_info(obj, self.family, self.hostname))

    def delete_slice(self, obj_or_key):
        key = obj_or_key if isinstance(obj_or_key, tuple) else model.object_key(obj_or_key)
        if key is not None:
            self._set_slice(key, None)

    def replace(self, kind, objs):
        """A complete list of `kind` (after a list or re-list): what is not in it is deleted."""
        keyed = {}
        for obj in objs:
            key = model.object_key(obj)
            if key is None:
                log.warning("skipping %s without a name in a list", kind)
                continue
            keyed[key] = obj
        if kind == "Service":
            for key in [k for k in self._services if k not in keyed]:
                self._set_service(key, {})
            for key, obj in keyed.items():
                self._set_service(key, model.service_ports(obj, self.family))
        else:
            for key in [k for k in self._slices if k not in keyed]:
                self._set_slice(key, None)
            for key, obj in keyed.items():
                self._set_slice(key, model.slice_info(obj, self.family, self.hostname))
        self._listed[kind] = True

    def _set_service(self, key, ports):
        old = self._services.get(key, {})
        if ports:
            self._services[key] = ports
        else:
            self._services.pop(key, None)
        for spn in old.keys() | ports.keys():
            new = ports.get(spn)
            if old.get(spn) != new:
                self._dirty.add(spn)
                if new is None:
                    self._ports.pop(spn, None)
                else:
                    self._ports[spn] = new

    def _set_slice(self, key, info):
        old = self._slices.get(key)
        if old == info:
            return
        services = set()
        if old is not None:
            services.add((old.namespace, old.service))
            self._by_service[(old.namespace, old.service)].discard(key)
        if info is None:
            self._slices.pop(key, None)
        else:
            self._slices[key] = info
            services.add((info.namespace, info.service))
            self._by_service.setdefault((info.namespace, info.service), set()).add(key)
        for service in services:
            keys = self._by_service.get(service, set())
            if not keys:
                self._by_service.pop(service, None)
            merged = model.merge_endpoints([self._slices[k] for k in sorted(keys)])
            before = self._service_eps.get(service, {})
            if merged:
                self._service_eps[service] = merged
            else:
                self._service_eps.pop(service, None)
            for spn in before.keys() | merged.keys():
                eps = merged.get(spn)
                if before.get(spn) != eps:
                    self._dirty.add(spn)
                    if eps:
                        self._endpoints[spn] = eps
                    else:
                        self._endpoints.pop(spn, None)

    # ---- syncing ----

    def request_full_sync(self, reason="requested"):
        if self._full_reason is None:
            self._full_reason = reason

    def sync_failed(self, reason="previous sync failed"):
        """The last Sync could not be applied: the next one is full."""
        self._full_reason = reason

    def _full_due(self, now):
        if self._full_reason is not None:
            return self._full_reason
        if self._last_full is not None and now - self._last_full >= self.full_sync_period:
            return "periodic full sync"
        return None

    def next_sync_at(self, now=None):
        """When the next sync should run (a clock value; <= now: at once), or None: nothing to do."""
        now = self.clock() if now is None else now
        if not self.ready:
            return None
        earliest = now if self._last_sync is None else max(now, self._last_sync + self.min_sync_period)
        if self._dirty or self._full_reason is not None:
            return earliest
        if self._last_full is not None:
            return max(earliest, self._last_full + self.full_sync_period)
        return None

    def due(self, now=None):
        now = self.clock() if now is None else now
        when = self.next_sync_at(now)
        return when is not None and when <= now

    def take(self, now=None):
        """The Sync to apply now; resets the change set. Call when due() (or to force one)."""
        now = self.clock() if now is None else now
        full_reason = self._full_due(now)
        changed, previous = set(), {}
        for spn in self._dirty:
            port = self._ports.get(spn)
            eps = self._endpoints.get(spn, ()) if port is not None else ()
            old_port = self._synced_ports.get(spn)
            old_eps = self._synced_eps.get(spn, ())
            if port == old_port and eps == old_eps:
                continue
            changed.add(spn)
            previous[spn] = (old_port, old_eps)
            if port is None:
                self._synced_ports.pop(spn, None)
            else:
                self._synced_ports[spn] = port
            if eps:
                self._synced_eps[spn] = eps
            else:
                self._synced_eps.pop(spn, None)
        self._dirty.clear()
        state = model.ProxyState.of(self._ports, {spn: eps for spn, eps in self._endpoints.items()
                                                  if spn in self._ports})
        self._last_sync = now
        if full_reason is not None:
            self._last_full = now
            self._full_reason = None
        return Sync(state, frozenset(changed), full_reason is not None, full_reason or "changes",
                    MappingProxyType(previous))
