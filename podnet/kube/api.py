"""Objects from the Kubernetes API: list + watch, as client-go's reflector.

Uses the official `kubernetes` client (imported lazily: ~0.3 s) for what it
is good at: kubeconfig / in-cluster configuration, TLS, authentication,
request building. Responses are read raw (`_preload_content=False`) and
parsed as plain JSON dicts, because the model works on the API's JSON shapes
and deserialising 10,000 Services into generated classes would cost seconds
for nothing.

Per kind asked for (default Service and EndpointSlice; also Ingress,
IngressClass and TLS Secret, see podnet.kube.events.RESOURCES) one thread
runs the reflector loop:
1. list all namespaces, paged (`limit` / `continue`), and emit one RELIST
   with every object; remember the list's resourceVersion;
2. watch from that resourceVersion with `allowWatchBookmarks`; emit ADDED /
   MODIFIED / DELETED; BOOKMARK events only advance the resourceVersion;
3. when the server ends the watch (its `timeoutSeconds`), watch again from
   the last resourceVersion seen: nothing is missed and nothing re-listed;
4. 410 Gone (a watch ERROR event with code 410 "Expired", or HTTP 410 on a
   list page whose continue token expired): re-list from scratch, emitting a
   RELIST, which the tracker diffs against what it has;
5. other failures (connection refused, 5xx, a read timeout on a dead
   connection): back off exponentially (0.8 s doubling to 30 s) and watch
   again from the last resourceVersion, or list again if there is none.

Secrets are listed and watched with the field selector type=kubernetes.io/tls
and trimmed (podnet.kube.events.keep) before they are emitted.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
from typing import Any

from podnet.kube.events import ADDED, DELETED, MODIFIED, RELIST, RESOURCES, Emit, Event, check_kinds, keep

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

log = logging.getLogger("podnet.kube.api")

Objects = list[dict[str, Any]]
Threads = list[threading.Thread]


class Gone(Exception):
    """The resourceVersion (or continue token) is too old: list again."""


class WatchError(Exception):
    pass


def make_api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A kubernetes.client.ApiClient: in-cluster config when running in a Pod and no
    kubeconfig is given, else the kubeconfig (default ~/.kube/config or $KUBECONFIG)."""
    from kubernetes import client, config
    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    return client.ApiClient(configuration)


def _iter_lines(resp: Any, chunk: int = 65536) -> Iterator[bytes]:
    """Lines of a streamed (chunked) response body, as bytes."""
    buf = b""
    for data in resp.stream(chunk, decode_content=True):
        buf += data
        while True:
            i = buf.find(b"\n")
            if i < 0:
                break
            line, buf = buf[:i], buf[i + 1:]
            if line.strip():
                yield line
    if buf.strip():
        yield buf


class KubeApiSource:
    def __init__(self, emit: Emit, api_client: Any = None, kubeconfig: str | None = None,
                 context: str | None = None, page_size: int = 500,
                 watch_timeout: tuple[float, float] = (300, 600), connect_timeout: float = 10,
                 backoff: tuple[float, float] = (0.8, 30.0), kinds: Iterable[str] | None = None) -> None:
        self.emit = emit
        self._client = api_client
        self.kubeconfig, self.context = kubeconfig, context
        self.page_size = page_size
        self.watch_timeout = watch_timeout          # (min, max) seconds asked of the server
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.kinds = check_kinds(kinds)
        self.resource_versions: dict[str, str | None] = {}   # kind -> last resourceVersion seen
        self.relists = {kind: 0 for kind in self.kinds}
        self._stop = threading.Event()
        self._responses: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._threads: Threads = []

    # ---- the API calls ----

    @property
    def client(self) -> Any:
        with self._lock:                        # one client for every kind's thread
            if self._client is None:
                self._client = make_api_client(self.kubeconfig, self.context)
            return self._client

    def _func(self, kind: str, namespace: str | None = None) -> Any:
        import kubernetes.client
        res = RESOURCES[kind]
        api = getattr(kubernetes.client, res.api_class)(self.client)
        if namespace is None:
            return getattr(api, res.list_func)
        namespaced = getattr(api, res.namespaced_list_func)
        return lambda **kw: namespaced(namespace, **kw)

    def _call(self, kind: str, namespace: str | None = None, field_selector: str | None = None, **kw: Any) -> Any:
        from kubernetes.client.rest import ApiException
        selectors = ",".join(s for s in (RESOURCES[kind].field_selector, field_selector) if s)
        if selectors:
            kw["field_selector"] = selectors
        try:
            return self._func(kind, namespace)(_preload_content=False, **kw)
        except ApiException as e:
            if e.status == 410:
                raise Gone(_status_message(e.body) or "410 Gone") from None
            raise

    def list(self, kind: str, namespace: str | None = None, field_selector: str | None = None,
             label_selector: str | None = None) -> tuple[Objects, str | None]:
        """Every object of `kind` (paged) -> (objects, resourceVersion); with `namespace`, those
        of that namespace; with selectors (the API's syntax, e.g. "status.podIP=10.244.1.2",
        "app=web"), those the API server selects. A kind's own field selector (RESOURCES) is
        always asked for too."""
        api_version = RESOURCES[kind].api_version
        items: Objects = []
        token = None
        while True:
            kw: dict[str, Any] = {"limit": self.page_size, "_request_timeout": (self.connect_timeout, 120)}
            if token:
                kw["_continue"] = token
            if label_selector:
                kw["label_selector"] = label_selector
            resp = self._call(kind, namespace, field_selector, **kw)
            try:
                data = json.loads(resp.data)
            finally:
                resp.release_conn()
            for item in data.get("items") or ():
                if isinstance(item, dict):
                    item.setdefault("kind", kind)           # list items carry neither
                    item.setdefault("apiVersion", api_version)
                    item = keep(kind, item)
                    if item is not None:
                        items.append(item)
            meta = data.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, meta.get("resourceVersion")

    def watch(self, kind: str, resource_version: str | None) -> str | None:
        """Follow one watch from resource_version until the server ends it; returns the last
        resourceVersion. Raises Gone on 410, WatchError on other error events."""
        low, high = self.watch_timeout
        timeout = int(random.uniform(low, high))
        resp = self._call(kind, watch=True, resource_version=resource_version, allow_watch_bookmarks=True,
                          timeout_seconds=timeout, _request_timeout=(self.connect_timeout, timeout + 30))
        with self._lock:
            self._responses[kind] = resp
        rv = resource_version
        try:
            if self._stop.is_set():
                return rv
            for line in _iter_lines(resp):
                if self._stop.is_set():
                    break
                try:
                    event = json.loads(line)
                    etype, obj = event["type"], event["object"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s watch: ignoring an undecodable line: %.100r", kind, line)
                    continue
                if etype == "ERROR":
                    message = (obj or {}).get("message", "")
                    if (obj or {}).get("code") == 410:
                        raise Gone(message or "410 Gone")
                    raise WatchError("%s watch error %s: %s" % (kind, (obj or {}).get("code"), message))
                new_rv = ((obj or {}).get("metadata") or {}).get("resourceVersion") \
                    if isinstance(obj, dict) else None
                if etype == "BOOKMARK":
                    pass
                elif etype in (ADDED, MODIFIED, DELETED) and isinstance(obj, dict):
                    kept = keep(kind, obj)
                    if kept is not None:
                        self.emit(Event(etype, kind, kept))
                else:
                    log.warning("%s watch: ignoring event type %r", kind, etype)
                if new_rv:
                    rv = new_rv
                    self.resource_versions[kind] = rv
        finally:
            with self._lock:
                self._responses.pop(kind, None)
            resp.release_conn()
        return rv

    # ---- the reflector loop ----

    def reflect(self, kind: str) -> None:
        """List, then watch for ever (until stop()), re-listing on 410 and backing off on errors."""
        rv: str | None = None
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                if rv is None:
                    items, rv = self.list(kind)
                    self.resource_versions[kind] = rv
                    self.relists[kind] += 1
                    log.info("listed %d %s at resourceVersion %s", len(items), _plural(kind), rv)
                    self.emit(Event(RELIST, kind, items))
                rv = self.watch(kind, rv)
                delay = self.backoff[0]
            except Gone as e:
                log.info("%s: %s; listing again", kind, e)
                rv = None
            except Exception as e:
                if self._stop.is_set():
                    break
                log.warning("%s list/watch failed: %s; retrying in %.1f s", kind, _describe(e), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])

    def start(self) -> Threads:
        for kind in self.kinds:
            thread = threading.Thread(target=self.reflect, args=(kind,), name="watch-" + kind, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self._threads

    def stop(self, timeout: float = 5) -> None:
        """Stop the loops; a watch blocked on a quiet stream is shut down."""
        self._stop.set()
        with self._lock:
            responses = list(self._responses.values())
        for resp in responses:
            shutdown = getattr(resp, "shutdown", None)
            try:
                if shutdown is not None:
                    shutdown()
                else:
                    resp.close()
            except Exception:
                pass
        for thread in self._threads:
            thread.join(timeout)


def _plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def _status_message(body: Any) -> str | None:
    try:
        return json.loads(body).get("message")
    except (TypeError, ValueError, AttributeError):
        return None


def _describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    if status:
        return "HTTP %s %s" % (status, _status_message(getattr(e, "body", None)) or getattr(e, "reason", ""))
    return "%s: %s" % (type(e).__name__, e)
