"""The informer-style store: the current objects of the kinds a consumer watches.

A source (api.py, manifests.py) emits Events; a consumer feeds each one to
`ObjectCache.apply()`, which keeps one value per object and answers with the
`Change`s the event made, old and new value side by side. That is all a
consumer's level-triggered logic needs: it never diffs lists itself, and a
RELIST (after a start, a 410 Gone, a lost watch) turns into exactly the
deletions, additions and modifications it implies.

As client-go's informers can, the cache stores what a consumer makes of an
object rather than the object (`transform`): kube-proxy keeps the parsed
Service ports and slices, not the dicts, so 10,000 Services are held once, as
the small frozen values the proxy diffs. A transform that raises is a bug in
the consumer; for bad objects, transforms return what stands for "nothing
usable" (None, {}), which is stored like any value, so a fix to the object
is a change.

Keys are (namespace, name); cluster-scoped kinds (RESOURCES[kind].namespaced
False) get ("", name). Pure and single-threaded: sources hand events over
through a queue (events.drain), and one thread applies them.
"""
from __future__ import annotations

import logging
from typing import Any, Generic, NamedTuple, TypeVar

from podnet.kube.events import DELETED, RELIST, RESOURCES, Event
from podnet.kube.objects import object_key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("podnet.kube.cache")

V = TypeVar("V")
Key = tuple[str, str]


class Change(NamedTuple, Generic[V]):
    """One object's value before and after an event; None: absent."""
    kind: str
    key: Key
    old: V | None
    new: V | None


def resource_key(kind: str, obj: object) -> Key | None:
    """(namespace, name) of an object of `kind`, ("", name) for cluster-scoped kinds;
    None when it has no usable name."""
    key = object_key(obj)
    if key is None:
        return None
    resource = RESOURCES.get(kind)
    if resource is not None and not resource.namespaced:
        return ("", key[1])
    return key


def _identity(kind: str, obj: Any) -> Any:
    return obj


class ObjectCache(Generic[V]):
    """Current values per kind and key, fed by Events (see the module's docstring)."""

    def __init__(self, kinds: Iterable[str], transform: Callable[[str, Any], V] = _identity) -> None:
        self.kinds = tuple(kinds)
        self.transform = transform
        self.listed: set[str] = set()
        self._store: dict[str, dict[Key, V]] = {kind: {} for kind in self.kinds}

    @property
    def ready(self) -> bool:
        """Every kind has been listed once: acting before that would drop what is not there yet."""
        return self.listed.issuperset(self.kinds)

    def get(self, kind: str, key: Key) -> V | None:
        return self._store[kind].get(key)

    def items(self, kind: str) -> Iterator[tuple[Key, V]]:
        return iter(self._store[kind].items())

    def values(self, kind: str) -> Iterator[V]:
        return iter(self._store[kind].values())

    def count(self, kind: str) -> int:
        return len(self._store[kind])

    def delete(self, kind: str, key: Key) -> Change[V] | None:
        """Forget one object by key (a consumer that learnt of a deletion otherwise)."""
        return self._set(kind, key, None)

    def apply(self, event: Event) -> list[Change[V]]:
        """One Event -> the changes it made (none for an unknown kind, or a repeat)."""
        kind = event.kind
        store = self._store.get(kind)
        if store is None:
            log.debug("ignoring an event for kind %s", kind)
            return []
        if event.type == RELIST:
            self.listed.add(kind)
            objs = event.obj if isinstance(event.obj, list) else []
            keyed: dict[Key, Any] = {}
            for obj in objs:
                key = resource_key(kind, obj)
                if key is None:
                    log.warning("skipping a %s without metadata.name in a list", kind)
                    continue
                keyed[key] = obj
            changes = [c for c in (self._set(kind, key, None) for key in list(store) if key not in keyed) if c]
            changes.extend(c for c in (self._set(kind, key, obj) for key, obj in keyed.items()) if c)
            return changes
        key = resource_key(kind, event.obj)
        if key is None:
            log.warning("ignoring a %s without metadata.name", kind)
            return []
        change = self._set(kind, key, None if event.type == DELETED else event.obj)
        return [change] if change else []

    def _set(self, kind: str, key: Key, obj: Any) -> Change[V] | None:
        store = self._store[kind]
        old = store.get(key)
        if obj is None:
            if key not in store:
                return None
            del store[key]
            return Change(kind, key, old, None)
        new = self.transform(kind, obj)
        if key in store and old == new:
            return None
        store[key] = new
        return Change(kind, key, old, new)
