"""The change tracker: events in, one sync's worth of work out.

Sources (podnet/kube) emit Service and EndpointSlice events; the tracker keeps
the current objects' models (kube_proxy.model) in the shared object cache
(podnet/kube/cache.py) and the set of service ports
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
A failed sync is retried with exponential backoff (kube-proxy's RetryAfter,
made exponential): after k failures in a row the next sync waits
min_sync_period * 2^k (1 s * 2^k when min_sync_period is 0), at most
`retry_period` (--iptables-sync-period; DEFAULT_MAX_RETRY when unset), and
changes that arrive meanwhile wait too; a sync that works ends the backoff.
Nothing is synced before both kinds have been listed once (`ready`), so a
start-up never programs Services without their endpoints.

Pure and single-threaded: no I/O, no threads, time from an injected clock.
Sources that run in threads hand their events over through a queue that the
sync loop drains into `apply()`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kube_proxy import model
from podnet.kube.cache import Change, ObjectCache, resource_key
from podnet.kube.events import ADDED, DELETED, MODIFIED, RELIST, Event

log = logging.getLogger("kube_proxy.tracker")

DEFAULT_MAX_RETRY = 30.0    # the longest backoff after failed syncs: kube-proxy's default SyncPeriod

Key = tuple[str, str]
SPN = model.ServicePortName
Endpoints = tuple[model.Endpoint, ...]


@dataclass(frozen=True)
class Sync:
    """One sync's input. `changed`: service ports to rewrite (present in `state`: new or
    changed; absent: removed). `previous`: {name: (ServicePort or None, endpoints)} as of
    the sync before, for each changed name."""
    state: model.ProxyState
    changed: frozenset[model.ServicePortName]
    full: bool
    reason: str = ""
    previous: MappingProxyType[model.ServicePortName, tuple[model.ServicePort | None, tuple[model.Endpoint, ...]]] \
        = field(default_factory=lambda: MappingProxyType({}))

    @property
    def empty(self) -> bool:
        return not self.full and not self.changed


class ChangeTracker:
    def __init__(self, family: int = 4, hostname: str | None = None, min_sync_period: float = 1.0,
                 full_sync_period: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 retry_period: float | None = None) -> None:
        self.family = family
        self.hostname = hostname
        self.min_sync_period = float(min_sync_period)
        self.full_sync_period = float(full_sync_period)
        # after failed syncs the next one waits min_sync_period * 2^failures, at most this long
        # (kube-proxy's SyncPeriod, --iptables-sync-period)
        self.retry_period = float(DEFAULT_MAX_RETRY if retry_period is None else retry_period)
        self._retry_at: float | None = None
        self.failures = 0                   # syncs in a row that failed
        self._failed_since_take = False
        self.clock = clock
        # (ns, name) -> a Service's {ServicePortName: ServicePort}, or a slice's SliceInfo
        self._objects = ObjectCache(("Service", "EndpointSlice"), self._parse)
        self._by_service: dict[Key, set[Key]] = {}          # (ns, service) -> {slice key}
        self._service_eps: dict[Key, dict[SPN, Endpoints]] = {}
        self._ports: dict[SPN, model.ServicePort] = {}      # current
        self._endpoints: dict[SPN, Endpoints] = {}          # current, Service or not
        self._dirty: set[SPN] = set()
        self._synced_ports: dict[SPN, model.ServicePort] = {}   # as handed out by the previous take()
        self._synced_eps: dict[SPN, Endpoints] = {}
        self._listed = {"Service": False, "EndpointSlice": False}
        self._last_sync: float | None = None
        self._last_full: float | None = None
        self._full_reason: str | None = "first sync"

    # ---- state ----

    @property
    def ready(self) -> bool:
        """Both Services and EndpointSlices have been listed once."""
        return all(self._listed.values())

    def service_count(self) -> int:
        return sum(1 for ports in self._objects.values("Service") if ports)

    def slice_count(self) -> int:
        return sum(1 for info in self._objects.values("EndpointSlice") if info is not None)

    # ---- events ----

    def apply(self, event: Event) -> None:
        """One podnet.kube Event. Unknown kinds or types are logged and ignored."""
        kind, etype = event.kind, event.type
        if kind not in self._listed:
            log.debug("ignoring event for kind %s", kind)
            return
        if etype not in (ADDED, MODIFIED, DELETED, RELIST):
            log.warning("ignoring %s event of unknown type %r", kind, etype)
            return
        for change in self._objects.apply(event):
            self._changed(change)
        if etype == RELIST:
            self._listed[kind] = True

    def _parse(self, kind: str, obj: Any) -> Any:
        """What the cache keeps of an object: a Service's ports ({} if unusable), a slice's
        SliceInfo (None if unusable). Bad objects are logged by the model."""
        if kind == "Service":
            return model.service_ports(obj, self.family)
        return model.slice_info(obj, self.family, self.hostname)

    def _changed(self, change: Change[Any]) -> None:
        if change.kind == "Service":
            self._set_service(change.key, change.old or {}, change.new or {})
        else:
            self._set_slice(change.key, change.old, change.new)

    def update_service(self, obj: dict[str, Any]) -> None:
        self.apply(Event(MODIFIED, "Service", obj))

    def delete_service(self, obj_or_key: dict[str, Any] | tuple[str, str]) -> None:
        self._delete("Service", obj_or_key)

    def update_slice(self, obj: dict[str, Any]) -> None:
        self.apply(Event(MODIFIED, "EndpointSlice", obj))

    def delete_slice(self, obj_or_key: dict[str, Any] | tuple[str, str]) -> None:
        self._delete("EndpointSlice", obj_or_key)

    def _delete(self, kind: str, obj_or_key: dict[str, Any] | tuple[str, str]) -> None:
        key = obj_or_key if isinstance(obj_or_key, tuple) else resource_key(kind, obj_or_key)
        change = self._objects.delete(kind, key) if key is not None else None
        if change is not None:
            self._changed(change)

    def replace(self, kind: str, objs: Iterable[dict[str, Any]]) -> None:
        """A complete list of `kind` (after a list or re-list): what is not in it is deleted."""
        self.apply(Event(RELIST, kind, list(objs)))

    def _set_service(self, key, old, ports):
        for spn in old.keys() | ports.keys():
            new = ports.get(spn)
            if old.get(spn) != new:
                self._dirty.add(spn)
                if new is None:
                    self._ports.pop(spn, None)
                else:
                    self._ports[spn] = new

    def _set_slice(self, key, old, info):
        services = set()
        if old is not None:
            services.add((old.namespace, old.service))
            self._by_service[(old.namespace, old.service)].discard(key)
        if info is not None:
            services.add((info.namespace, info.service))
            self._by_service.setdefault((info.namespace, info.service), set()).add(key)
        for service in services:
            keys = self._by_service.get(service, set())
            if not keys:
                self._by_service.pop(service, None)
            # the cache holds the event's final state already: a slice of this Service
            # deleted by the same RELIST but not yet unindexed is simply gone
            merged = model.merge_endpoints([info for info in (self._objects.get("EndpointSlice", k)
                                                              for k in sorted(keys)) if info is not None])
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

    def request_full_sync(self, reason: str = "requested") -> None:
        if self._full_reason is None:
            self._full_reason = reason

    def sync_failed(self, reason: str = "previous sync failed") -> None:
        """The last Sync could not be applied: the next one is full, and waits retry_delay()
        from when the failed one was taken (a take() without sync_failed() after it ends
        the backoff)."""
        self._full_reason = reason
        if not self._failed_since_take:
            self.failures += 1
            self._failed_since_take = True
        if self._last_sync is not None:
            self._retry_at = self._last_sync + self.retry_delay()

    def retry_delay(self) -> float:
        """How long after the last failed sync the next one waits: min_sync_period (1 s if
        that is 0) * 2^failures, capped at retry_period; 0 when the last sync worked."""
        if not self.failures:
            return 0.0
        base = self.min_sync_period or 1.0
        return min(self.retry_period, base * 2.0 ** min(self.failures, 62))

    def _full_due(self, now: float) -> str | None:
        if self._full_reason is not None:
            return self._full_reason
        if self._last_full is not None and now - self._last_full >= self.full_sync_period:
            return "periodic full sync"
        return None

    def next_sync_at(self, now: float | None = None) -> float | None:
        """When the next sync should run (a clock value; <= now: at once), or None: nothing to do."""
        now = self.clock() if now is None else now
        if not self.ready:
            return None
        earliest = now if self._last_sync is None else max(now, self._last_sync + self.min_sync_period)
        if self._retry_at is not None:
            earliest = max(earliest, self._retry_at)
        if self._dirty or self._full_reason is not None:
            return earliest
        if self._last_full is not None:
            return max(earliest, self._last_full + self.full_sync_period)
        return None

    def due(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        when = self.next_sync_at(now)
        return when is not None and when <= now

    def take(self, now: float | None = None) -> Sync:
        """The Sync to apply now; resets the change set. Call when due() (or to force one)."""
        now = self.clock() if now is None else now
        if not self._failed_since_take:
            self.failures = 0               # the sync taken before this one worked
        self._failed_since_take = False
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
        self._retry_at = None
        if full_reason is not None:
            self._last_full = now
            self._full_reason = None
        return Sync(state, frozenset(changed), full_reason is not None, full_reason or "changes",
                    MappingProxyType(previous))
