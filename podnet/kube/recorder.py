"""Kubernetes Events from an agent, as client-go's tools/events records them (events.k8s.io/v1).

An agent says "this object has a problem" where operators look: `kubectl describe`
and `kubectl get events` show the Event next to the object it is about. kube-proxy
uses it for Service ports the kernel refused (kube_proxy/server.py).

The Event is the events.k8s.io/v1 shape client-go's recorder posts: metadata.name
`<regarding name>.<nanoseconds, hex>` in the regarding object's namespace ("default"
for cluster-scoped ones), eventTime with microseconds, reportingController and
reportingInstance (`<controller>-<node>`), action, reason, regarding (an
ObjectReference; with its uid, because `kubectl describe` selects Events by it),
note (at most 1,024 bytes, as the API allows), type Normal or Warning.

Repeats are a series, as client-go aggregates them: an Event with the same type,
action, reason, reporter, regarding and related object as one seen within
`series_window` (client-go's 6 minutes) is not posted again; its count grows, and
the API learns it by a strategic-merge PATCH of `series` (count, lastObservedTime)
at once for the first repeat, then at most once per `patch_interval` per series
while the repeats go on, and a last time when the series ends. So a burst of a
thousand repeats costs one POST and a few PATCHes, and `kubectl get events` is at
most a minute behind. (client-go refreshes a running series only every 30 minutes;
a minute is cheap at the rate kube-proxy's problems come, and fresher.)

record() never blocks and never raises: it updates the series under a lock held
for microseconds and queues new work for one background thread, which makes every
API call with a (connect, read) timeout. A full queue drops the new Event (counted
in stats()["dropped"], logged at most once a minute). Failures never reach the
caller: a refusal by the API server (4xx: bad Event, missing RBAC) abandons that
Event; an unreachable or failing server (5xx, 429, timeouts, connection errors) is
retried with backoff, at most `max_attempts` times; both are counted and logged at
most once per `log_interval`.

The `kubernetes` client is imported, and its client made, in the background thread
on first use (a few hundred ms the caller's loop must not pay). It provides the
configuration (kubeconfig or in-cluster), TLS and authentication; the request body
is our JSON, sent as is, so eventTime keeps the microseconds the API's MicroTime
requires.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from podnet.kube.events import DELETED, RELIST, RESOURCES, Event
from podnet.kube.objects import check_label_key, object_key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

log = logging.getLogger("podnet.kube.recorder")

NORMAL, WARNING = "Normal", "Warning"
API_VERSION = "events.k8s.io/v1"
NOTE_LIMIT = 1024               # bytes: the API refuses a longer note
NAME_LIMIT = 128                # reason, action and reportingInstance: the API's limit
JSON = "application/json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

Reference = dict[str, str]
Key = tuple[Any, ...]


def object_reference(kind: str, namespace: str, name: str, uid: str = "", api_version: str | None = None,
                     field_path: str = "") -> Reference:
    """An ObjectReference as Events carry it (apiVersion from podnet.kube.events.RESOURCES
    when the kind is known there, else "v1"); empty fields are left out."""
    if api_version is None:
        resource = RESOURCES.get(kind)
        api_version = resource.api_version if resource is not None else "v1"
    ref = {"apiVersion": api_version, "kind": kind, "name": name}
    if namespace:
        ref["namespace"] = namespace
    if uid:
        ref["uid"] = uid
    if field_path:
        ref["fieldPath"] = field_path
    return ref


def micro_time(ns: int) -> str:
    """The API's MicroTime: RFC 3339 in UTC with exactly six fractional digits."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%06dZ" % (rest // 1000)


def cut(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes, ending in "..." when cut (as client-go cuts notes)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[:limit - 3].decode("utf-8", "ignore") + "..."


class ObjectUids:
    """The uid of every object of `kinds`, kept from the same Events a consumer's cache
    gets (podnet.kube.events), so that an Event's regarding reference carries it."""

    def __init__(self, kinds: Iterable[str]) -> None:
        self.kinds = frozenset(kinds)
        self._uids: dict[tuple[str, str, str], str] = {}

    def apply(self, event: Event) -> None:
        if event.kind not in self.kinds:
            return
        if event.type == RELIST:
            for key in [k for k in self._uids if k[0] == event.kind]:
                del self._uids[key]
            for obj in event.obj or ():
                self._put(event.kind, obj)
        elif event.type == DELETED:
            gone = object_key(event.obj)
            if gone is not None:
                self._uids.pop((event.kind,) + gone, None)
        else:
            self._put(event.kind, event.obj)

    def _put(self, kind: str, obj: Any) -> None:
        key = object_key(obj)
        if key is None:
            return
        uid = obj["metadata"].get("uid")
        if isinstance(uid, str) and uid:
            self._uids[(kind,) + key] = uid
        else:
            self._uids.pop((kind,) + key, None)

    def uid(self, kind: str, namespace: str, name: str) -> str:
        return self._uids.get((kind, namespace, name), "")

    def reference(self, kind: str, namespace: str, name: str, field_path: str = "") -> Reference:
        return object_reference(kind, namespace, name, self.uid(kind, namespace, name), field_path=field_path)


class _Throttle:
    """At most one log line per `interval` seconds, saying how many were held back."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self.last: float | None = None
        self.held = 0

    def warning(self, fmt: str, *args: object) -> None:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            self.held += 1
            return
        if self.held:
            fmt += " (and %d more like it since the last report)"
            args += (self.held,)
        log.warning(fmt, *args)
        self.last, self.held = now, 0


@dataclass
class _Series:
    """One Event and its repeats."""
    event: dict[str, Any]       # the body as first posted, without series
    observed_ns: int            # wall clock of the last occurrence (lastObservedTime)
    seen: float                 # monotonic clock of the last occurrence
    count: int = 1
    written: int = 0            # the count the API has (0: not created yet)
    last_write: float = 0.0
    queued: bool = False        # in the queue or being written: nobody else writes it
    attempts: int = 0           # failed writes in a row
    retry_at: float = 0.0
    abandoned: bool = False     # refused, or out of attempts: no more writes


class _ApiError(Exception):
    def __init__(self, status: int, body: bytes | str | None) -> None:
        super().__init__("HTTP %d" % status)
        self.status = status
        self.body = body

    def describe(self) -> str:
        import json
        message = ""
        try:
            message = json.loads(self.body or b"").get("message", "")
        except (TypeError, ValueError, AttributeError):
            pass
        return "HTTP %d%s" % (self.status, (" " + message) if message else "")


_WAKE = object()


class EventRecorder:
    """Records events.k8s.io/v1 Events as `reporting_controller` from `reporting_instance`
    (default: `<controller>-<hostname>`, as client-go names it); see the module's doc."""

    def __init__(self, reporting_controller: str, reporting_instance: str | None = None, *,
                 api_client: Any = None, kubeconfig: str | None = None, context: str | None = None,
                 queue_size: int = 1000, max_series: int = 4096, timeout: tuple[float, float] = (5.0, 10.0),
                 series_window: float = 360.0, patch_interval: float = 60.0, sweep_period: float = 5.0,
                 max_attempts: int = 5, retry_delay: float = 10.0, log_interval: float = 60.0,
                 now: Callable[[], int] = time.time_ns, clock: Callable[[], float] = time.monotonic) -> None:
        check_label_key(reporting_controller, "reporting controller")    # the API wants a qualified name
        if reporting_instance is None:
            import socket
            reporting_instance = "%s-%s" % (reporting_controller, socket.gethostname())
        self.controller = reporting_controller
        self.instance = reporting_instance[:NAME_LIMIT]
        self._client = api_client
        self.kubeconfig, self.context = kubeconfig, context
        self.timeout = timeout
        self.max_series = max_series
        self.series_window = series_window
        self.patch_interval = patch_interval
        self.sweep_period = sweep_period
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.now, self.clock = now, clock
        self._queue: queue.Queue[object] = queue.Queue(queue_size)
        self._series: dict[Key, _Series] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._flushes: list[threading.Event] = []
        self._errors = _Throttle(log_interval, clock)
        self._drops = _Throttle(log_interval, clock)
        self.counts = {"recorded": 0, "aggregated": 0, "dropped": 0, "created": 0, "patched": 0,
                       "retried": 0, "failed": 0}

    def stats(self) -> dict[str, int]:
        """recorded: accepted by record(); aggregated: of those, repeats folded into a series;
        dropped: refused by record() (queue or series table full, stopped, malformed);
        created / patched: API writes that succeeded; retried: writes that failed and were
        tried again; failed: Events given up (refused by the API, or out of attempts)."""
        with self._lock:
            return dict(self.counts)

    # ---- the caller's side: never blocks, never raises ----

    def record(self, regarding: Reference, reason: str, action: str, note: str, type: str = WARNING,
               related: Reference | None = None) -> bool:
        """Record one occurrence; False if it was dropped. `regarding` and `related` are
        ObjectReferences (object_reference(), ObjectUids.reference())."""
        try:
            return self._record(regarding, reason, action, note, type, related)
        except Exception:       # a bug here must not reach the caller's loop
            log.exception("could not record an Event (%s %s)", type, reason)
            return False

    def _record(self, regarding: Reference, reason: str, action: str, note: str, type: str,
                related: Reference | None) -> bool:
        if type not in (NORMAL, WARNING) or not reason or not action or not regarding.get("name") \
                or not regarding.get("kind"):
            with self._lock:
                self.counts["dropped"] += 1
            log.warning("not recording a malformed Event: type %r reason %r action %r regarding %r",
                        type, reason, action, regarding)
            return False
        key = (type, action, reason, _ref_key(regarding), _ref_key(related))
        now_ns, now = self.now(), self.clock()
        with self._lock:
            if self._stopping.is_set():
                self.counts["dropped"] += 1
                return False
            if self._thread is None:
                self._start()
            series = self._series.get(key)
            if series is not None:
                series.count += 1
                series.observed_ns, series.seen = now_ns, now
                self.counts["recorded"] += 1
                self.counts["aggregated"] += 1
                if series.written and not series.queued and not series.abandoned \
                        and (series.written == 1 or now - series.last_write >= self.patch_interval):
                    series.queued = self._put(key)
                return True
            if len(self._series) >= self.max_series:
                return self._dropped(reason, regarding, "%d Events in flight" % len(self._series))
            series = _Series(self._event(regarding, reason, action, note, type, related, now_ns), now_ns, now)
            series.queued = True
            self._series[key] = series
            if not self._put(key):
                del self._series[key]
                return self._dropped(reason, regarding, "the queue is full")
            self.counts["recorded"] += 1
            return True

    def _dropped(self, reason: str, regarding: Reference, why: str) -> bool:
        self.counts["dropped"] += 1
        self._drops.warning("dropping Event %s about %s %s/%s: %s (%d dropped so far)", reason,
                            regarding.get("kind"), regarding.get("namespace", ""), regarding.get("name"), why,
                            self.counts["dropped"])
        return False

    def _put(self, item: object) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            return False

    def _event(self, regarding: Reference, reason: str, action: str, note: str, type: str,
               related: Reference | None, now_ns: int) -> dict[str, Any]:
        event: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "Event",
            "metadata": {"name": "%s.%x" % (regarding["name"], now_ns),
                         "namespace": regarding.get("namespace") or "default"},
            "eventTime": micro_time(now_ns),
            "reportingController": self.controller,
            "reportingInstance": self.instance,
            "action": action[:NAME_LIMIT],
            "reason": reason[:NAME_LIMIT],
            "regarding": dict(regarding),
            "note": cut(note, NOTE_LIMIT),
            "type": type,
        }
        if related is not None:
            event["related"] = dict(related)
        return event

    # ---- the background thread ----

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-recorder", daemon=True)
        self._thread.start()

    def start(self) -> None:
        """Start the background thread now (record() starts it otherwise)."""
        with self._lock:
            if self._thread is None and not self._stopping.is_set():
                self._start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Write everything pending now (every series' latest count included); False if that
        did not finish within `timeout` s."""
        done = threading.Event()
        with self._lock:
            if self._thread is None:
                return not self._series
            self._flushes.append(done)
        self._put(_WAKE)        # a full queue wakes the thread anyway
        return done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is pending (for at most `timeout` s), then end the thread. Later
        record()s are dropped."""
        self._stopping.set()
        self._put(_WAKE)
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("Event recorder: %d Events still unwritten after %.0f s; giving up on them",
                            sum(1 for s in self._series.values() if s.count > s.written and not s.abandoned),
                            timeout)

    def _run(self) -> None:
        next_sweep = self.clock() + self.sweep_period
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, min(next_sweep - self.clock(), self.sweep_period)))
            except queue.Empty:
                item = None
            try:
                if isinstance(item, tuple):
                    self._write(item)
                if self._stopping.is_set() or self._flushes:
                    self._drain()
                    self._sweep(force=True)
                    with self._lock:
                        flushes, self._flushes = self._flushes, []
                    for done in flushes:
                        done.set()
                    if self._stopping.is_set():
                        return
                if self.clock() >= next_sweep:
                    self._sweep()
                    next_sweep = self.clock() + self.sweep_period
            except Exception:
                log.exception("Event recorder: unexpected failure (going on)")

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                self._write(item)

    def _sweep(self, force: bool = False) -> None:
        """Write the counts of series that grew (once per patch_interval, or now when
        forced), retry failed writes when due, and forget series that have ended."""
        now = self.clock()
        due = []
        with self._lock:
            for key, s in list(self._series.items()):
                ended = now - s.seen >= self.series_window
                pending = not s.abandoned and s.count > s.written
                if pending and not s.queued and now >= s.retry_at \
                        and (force or ended or not s.written or now - s.last_write >= self.patch_interval):
                    s.queued = True
                    due.append(key)
                elif ended and not pending:
                    del self._series[key]
        for key in due:
            self._write(key)

    def _write(self, key: Key) -> None:
        """Bring the API up to date with one series: create its Event, or PATCH its count.
        The series stays `queued` until this returns, so nobody else writes it meanwhile."""
        with self._lock:
            s = self._series.get(key)
            if s is None:
                return
            if s.abandoned or s.count <= s.written:
                s.queued = False
                return
            s.queued = True
            count, event = s.count, s.event
            series = {"count": count, "lastObservedTime": micro_time(s.observed_ns)} if count > 1 else None
            create = not s.written
        meta = event["metadata"]
        what = "create" if create else "patch"
        written = count
        try:
            if not create:
                try:
                    self._request("PATCH", "%s/%s" % (_events_path(meta["namespace"]), meta["name"]),
                                  {"series": series}, STRATEGIC_MERGE_PATCH)
                except _ApiError as e:
                    if e.status != 404:
                        raise
                    create = True       # it expired from the API (an Event lives an hour): post it again
            if create:
                body = dict(event, series=series) if series else event
                try:
                    self._request("POST", _events_path(meta["namespace"]), body, JSON)
                except _ApiError as e:
                    if e.status != 409:
                        raise
                    # Already there: an earlier try got through after all, with the first
                    # count at least; the next write brings the series up to date.
                    written = 1
        except _ApiError as e:
            self._failed(s, what, e.describe(), e.status >= 500 or e.status == 429)
            return
        except Exception as e:      # no answer: connection refused or reset, timeouts, TLS, DNS
            self._failed(s, what, "%s: %s" % (type(e).__name__, e), True)
            return
        with self._lock:
            s.written, s.last_write, s.attempts = max(s.written, written), self.clock(), 0
            self.counts["created" if create else "patched"] += 1
            # The first repeat is written at once, also when it came while the Event was posted.
            s.queued = s.written == 1 and s.count > 1 and self._put(key)

    def _failed(self, s: _Series, what: str, error: str, retry: bool) -> None:
        with self._lock:
            s.queued = False
            s.attempts += 1
            give_up = not retry or s.attempts >= self.max_attempts
            if give_up:
                s.abandoned = True
                self.counts["failed"] += 1
            else:
                s.retry_at = self.clock() + self.retry_delay * 2 ** (s.attempts - 1)
                self.counts["retried"] += 1
        event = s.event
        self._errors.warning("could not %s Event %s about %s %s/%s: %s; %s", what, event["reason"],
                             event["regarding"].get("kind"), event["regarding"].get("namespace", ""),
                             event["regarding"].get("name"), error,
                             ("giving it up" if not retry else "giving it up after %d attempts" % s.attempts)
                             if give_up else "retrying in %.0f s" % (s.retry_at - self.clock()))

    # ---- the API ----

    def _api(self) -> Any:
        if self._client is None:
            from podnet.kube.api import make_api_client
            self._client = make_api_client(self.kubeconfig, self.context)
        return self._client

    def _request(self, method: str, path: str, body: dict[str, Any], content_type: str) -> None:
        """One API call through the kubernetes client's connection pool and credentials;
        raises _ApiError for an HTTP error, other exceptions when there is no answer."""
        from kubernetes.client.rest import ApiException
        client = self._api()
        conf = client.configuration
        headers = dict(client.default_headers)
        headers.update({"Accept": JSON, "Content-Type": content_type,
                        "User-Agent": "%s (podnet)" % self.controller})
        for auth in conf.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        try:
            resp = client.rest_client.request(method, conf.host + path, headers=headers, body=body,
                                              _request_timeout=self.timeout)
        except ApiException as e:     # older clients raise for any status but 2xx
            raise _ApiError(e.status or 0, e.body) from None
        data = resp.read() if callable(getattr(resp, "read", None)) else getattr(resp, "data", b"")
        release = getattr(getattr(resp, "response", None), "release_conn", None)
        if release is not None:
            release()
        if not 200 <= resp.status <= 299:
            raise _ApiError(resp.status, data)


def _events_path(namespace: str) -> str:
    return "/apis/events.k8s.io/v1/namespaces/%s/events" % namespace


def _ref_key(ref: Reference | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(ref.items())) if ref else ()
