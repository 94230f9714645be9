"""Kubernetes objects from a directory of manifests, watched for changes.

For standalone use and tests: `*.yaml`, `*.yml` and `*.json` files in one
directory (optionally its subdirectories), multi-document YAML, each document
an object of a kind the consumer asked for (default Service and
EndpointSlice; also Ingress, IngressClass, Secret), or a List of them
(`kind: List`, `ServiceList`, `IngressList`, ...); other kinds are ignored.
A missing namespace means "default", as with kubectl (IngressClasses are
cluster-scoped: no namespace). Secrets other than type kubernetes.io/tls are
ignored and TLS ones trimmed (podnet.kube.events.keep); a manifest's
`stringData` is folded into `data` as the API server would.

Watching is polling: every `interval` seconds each file's (size, mtime,
ctime, inode) is compared with the last scan and only changed files are
re-read, so an idle directory of thousands of files costs one stat per file.
Files whose mtime is within the last two seconds are re-read even if their
stat looks the same, because a rewrite within one timestamp tick can keep
it; their content hash tells whether anything changed.

Events (podnet.kube.events.Event) go to `emit`: first a RELIST per kind with
everything found, then ADDED / MODIFIED / DELETED per object as files change.
A file that cannot be parsed (an editor's half-written save, a YAML error)
keeps the objects it had before, with a warning; a bad object inside a
good file is the model's business (logged and skipped there). When two
files define the same object, the one whose path sorts last wins, with a
warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

from podnet.kube.events import ADDED, DELETED, KINDS, MODIFIED, RELIST, RESOURCES, Emit, Event, check_kinds, keep

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

Key = tuple[str, str, str]          # (kind, namespace, name)

log = logging.getLogger("podnet.kube.manifests")

SUFFIXES = (".yaml", ".yml", ".json")
LIST_KINDS = dict([("List", None)] + [(res.list_kind, kind) for kind, res in RESOURCES.items()])
RECENT = 2.0        # seconds: files modified this recently are hashed on every scan


def _yaml() -> tuple[Any, Any]:
    import yaml
    return yaml, getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_documents(text: str, name: str = "<text>") -> list[Any]:
    """Manifest text -> list of documents (dicts or whatever YAML/JSON holds). Raises ValueError."""
    if name.endswith(".json"):
        try:
            return [json.loads(text)]
        except ValueError as e:
            raise ValueError("%s: not valid JSON: %s" % (name, e)) from None
    yaml, loader = _yaml()
    try:
        return [doc for doc in yaml.load_all(text, Loader=loader) if doc is not None]
    except yaml.YAMLError as e:
        raise ValueError("%s: not valid YAML: %s" % (name, str(e).replace("\n", " "))) from None


def objects_of(documents: Iterable[Any], name: str = "<text>",
               kinds: tuple[str, ...] = KINDS) -> list[tuple[str, dict[str, Any]]]:
    """Documents -> [(kind, object)] for objects of `kinds`, Lists unpacked, Secrets
    filtered and trimmed (podnet.kube.events.keep)."""
    out: list[tuple[str, dict[str, Any]]] = []

    def visit(doc: Any, where: str, list_kind: str | None = None) -> None:
        if not isinstance(doc, dict):
            log.warning("%s: ignoring a document that is not an object (%s)", where, type(doc).__name__)
            return
        kind = doc.get("kind") or list_kind
        if kind in LIST_KINDS:
            items = doc.get("items")
            if not isinstance(items, list):
                log.warning("%s: %s without an items list", where, kind)
                return
            for i, item in enumerate(items):
                visit(item, "%s items[%d]" % (where, i), LIST_KINDS[kind])
        elif isinstance(kind, str) and kind in kinds:
            kept = keep(kind, doc)
            if kept is None:
                log.debug("%s: ignoring a %s the consumer does not need", where, kind)
            else:
                out.append((kind, kept))
        else:
            log.debug("%s: ignoring kind %r", where, kind)
    for i, doc in enumerate(documents):
        visit(doc, "%s document %d" % (name, i + 1))
    return out


def _key(kind: str, obj: dict[str, Any]) -> Key | None:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return None
    namespace = (meta.get("namespace") or "default") if RESOURCES[kind].namespaced else ""
    return (kind, namespace if isinstance(namespace, str) else repr(namespace), meta["name"])


class _File:
    __slots__ = ("stat", "digest", "objects")

    def __init__(self, stat: tuple[int, int, int, int], digest: bytes,
                 objects: list[tuple[Key, dict[str, Any]]]) -> None:
        self.stat, self.digest, self.objects = stat, digest, objects


class ManifestSource:
    """Polls `directory`; `scan()` does one pass, `start()` runs passes in a thread."""

    def __init__(self, directory: str, emit: Emit, interval: float = 1.0, recursive: bool = False,
                 clock: Callable[[], float] = time.time, kinds: Iterable[str] | None = None,
                 after_scan: Callable[[float], object] | None = None) -> None:
        self.directory = directory
        # called after every pass with the clock() time the pass started: whatever was in the
        # directory before then has been emitted (the NetworkPolicy agent's "synced through")
        self.after_scan = after_scan
        self.kinds = check_kinds(kinds)
        self.emit = emit
        self.interval = interval
        self.recursive = recursive
        self.clock = clock
        self._files: dict[str, _File] = {}
        self._objects: dict[Key, dict[str, Any]] = {}     # as last emitted
        self._listed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- one pass ----

    def _paths(self) -> list[str]:
        try:
            if not self.recursive:
                entries = [os.path.join(self.directory, e) for e in os.listdir(self.directory)]
            else:
                entries = []
                for root, dirs, files in os.walk(self.directory):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    entries += [os.path.join(root, f) for f in files]
        except FileNotFoundError:
            log.warning("manifest directory %s does not exist", self.directory)
            return []
        return sorted(p for p in entries
                      if p.endswith(SUFFIXES) and not os.path.basename(p).startswith("."))

    def scan(self) -> list[Event]:
        """Read what changed and emit the events; returns them too."""
        now = self.clock()
        events = self._scan(now)
        if self.after_scan is not None:
            self.after_scan(now)
        return events

    def _scan(self, now: float) -> list[Event]:
        seen, changed = set(), False
        for path in self._paths():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            seen.add(path)
            stat = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            old = self._files.get(path)
            if old is not None and old.stat == stat and now - st.st_mtime_ns / 1e9 > RECENT:
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                log.warning("%s: cannot read: %s", path, e)
                continue
            digest = hashlib.sha256(data).digest()
            if old is not None and old.digest == digest:
                old.stat = stat
                continue
            try:
                objects = objects_of(parse_documents(data.decode("utf-8"), path), path, self.kinds)
            except (ValueError, UnicodeDecodeError) as e:
                log.warning("%s; keeping what it held before", e)
                if old is not None:
                    old.stat, old.digest = stat, digest
                else:
                    self._files[path] = _File(stat, digest, [])
                    changed = True
                continue
            keyed: list[tuple[Key, dict[str, Any]]] = []
            for kind, obj in objects:
                key = _key(kind, obj)
                if key is None:
                    log.warning("%s: skipping a %s without metadata.name", path, kind)
                else:
                    keyed.append((key, obj))
            self._files[path] = _File(stat, digest, keyed)
            changed = True
        for path in [p for p in self._files if p not in seen]:
            del self._files[path]
            changed = True
        if not changed and self._listed:
            return []
        return self._emit_changes()

    def _emit_changes(self) -> list[Event]:
        current: dict[Key, dict[str, Any]] = {}
        owner: dict[Key, str] = {}
        for path in sorted(self._files):
            for key, obj in self._files[path].objects:
                if key in current:
                    log.warning("%s %s/%s is defined in %s and %s; using the latter",
                                key[0], key[1], key[2], owner[key], path)
                current[key] = obj
                owner[key] = path
        events = []
        if not self._listed:
            for kind in self.kinds:
                events.append(Event(RELIST, kind, [o for k, o in current.items() if k[0] == kind]))
            self._listed = True
        else:
            for key, obj in self._objects.items():
                if key not in current:
                    events.append(Event(DELETED, key[0], obj))
            for key, obj in current.items():
                before = self._objects.get(key)
                if before is None:
                    events.append(Event(ADDED, key[0], obj))
                elif before != obj:
                    events.append(Event(MODIFIED, key[0], obj))
        self._objects = current
        for event in events:
            self.emit(event)
        return events

    # ---- the watching thread ----

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                log.exception("scanning %s failed; trying again", self.directory)
            self._stop.wait(self.interval)

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="manifests", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
