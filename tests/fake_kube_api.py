"""A stateful stand-in for kube-apiserver, for tests only: Nodes (list, watch, get, patch),
and lists of Pods, Services, Namespaces, EndpointSlices and NetworkPolicies.

No kube-apiserver can run on this machine, so the Kubernetes clients of podnet
(flanneld's Kubernetes subnet manager, `podnet trace --kubeconfig`) are tested against
this server: real HTTP on a real socket, the API's JSON wire format, state that changes as a
real server's does. It is not part of the product and nothing in the product
imports it.

What it serves (everything else answers 404, or 405 for other methods):

    GET   /api/v1/nodes                       NodeList, paged (limit / continue)
    GET   /api/v1/nodes?watch=true            a watch stream (resourceVersion, timeoutSeconds,
                                              allowWatchBookmarks)
    GET   /api/v1/nodes/NAME                  one Node
    PATCH /api/v1/nodes/NAME[/status]         strategic-merge or JSON merge patch
    GET   /api/v1/namespaces                  NamespaceList; /api/v1/namespaces/NAME: one
    GET   /api/v1/pods, /api/v1/services      lists of every namespace, paged as Nodes are
    GET   /api/v1/namespaces/NS/pods, .../NS/services          lists of one namespace
    GET   /api/v1/namespaces/NS/pods/NAME, .../services/NAME   one object
    GET   /apis/discovery.k8s.io/v1/[namespaces/NS/]endpointslices[/NAME]
    GET   /apis/networking.k8s.io/v1/[namespaces/NS/]networkpolicies[/NAME]

Behaviour taken from the Kubernetes API documentation ("API Concepts": efficient
detection of changes, resource versions, retrieving large results in chunks,
watch bookmarks; "Field Selectors"; "Labels and Selectors"; "Update API Objects in
Place Using kubectl patch" and the strategic-merge-patch design notes; the Node
reference for patchMergeKey):

- every write bumps one cluster-wide resourceVersion (an integer, sent as a
  string, as etcd's revision); a write that changes nothing does not;
- list items carry no kind / apiVersion, and come in the order of their storage
  keys ("NAMESPACE/NAME", or "NAME" for Nodes and Namespaces), as etcd's; the list's
  metadata.resourceVersion is where a watch starts; `limit` pages with an opaque
  `continue` token (shaped as the real ones: base64 of {"v": "meta.k8s.io/v1", "rv": N,
  "start": "key"}); remainingItemCount only on lists without selectors;
- `fieldSelector`: `metadata.name` and `metadata.namespace` for every kind, and for Pods
  `spec.nodeName` and `status.podIP` (a subset of what the real server supports); terms
  `f=v`, `f==v`, `f!=v`, comma-joined (all must hold); any other field answers 400
  "field label not supported: F", as the real server does;
- `labelSelector`: equality-based terms `k=v`, `k==v`, `k!=v` (true where k is absent
  too), `k` (exists), `!k` (absent), comma-joined; set-based ones (`in`, `notin`) answer
  400: this fake does not implement them;
- a watch (Nodes only) is a 200 with a chunked body of newline-delimited JSON
  {"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}; it replays
  every change after its resourceVersion, then follows live ones until
  timeoutSeconds; a DELETED event carries the object's last state with the
  deletion's resourceVersion; without a resourceVersion (or "0") it starts with
  a synthetic ADDED for every current object; BOOKMARKs (when asked for with
  allowWatchBookmarks) carry only metadata.resourceVersion;
- after a compaction, a watch from an older resourceVersion gets an ERROR event
  holding a Status with code 410 "Expired" ("too old resource version: X (Y)"),
  and an older continue token a HTTP 410 Status;
- patches: `application/strategic-merge-patch+json` merges maps key by key, a null
  value deletes a key (so metadata.annotations merge annotation by annotation),
  and merges the lists the API declares with a patchMergeKey (Node
  status.conditions and status.addresses by `type`) entry by entry;
  `application/merge-patch+json` (RFC 7386) is the same for maps but replaces
  lists whole; metadata.resourceVersion in a patch is a precondition (409 on a
  mismatch); a patch of the `status` subresource cannot change spec, a patch of
  the object cannot change status (the Node registry strategies);
- errors are Status objects (BadRequest 400, NotFound 404, Conflict 409, Expired 410, ...).

Not implemented (a request that needs it fails loudly rather than passing by
accident): JSON patch and server-side apply (415), watches of kinds other than
Node and watches with selectors (400), set-based label selectors (400), POST / PUT /
DELETE (405; objects are created and deleted through the test-side methods below),
other kinds (404).

For tests: `add_node`, `set_annotations`, `update_node`, `delete_node`, `add_pod`,
`add_object(kind, obj)` (any kind served, Nodes included: the server fills in
resourceVersion, uid, creationTimestamp, a Namespace's kubernetes.io/metadata.name label)
change the state as another client would; `compact()` makes every older
resourceVersion expire; `drop_watches()` cuts every open watch connection;
`fail_next()` answers the next matching requests with an error; `requests` records
every request (method, path, query, content type, body, arrival time) so a test can assert the
exact calls made. `FakeKubeApi(netns=path, host=ip)` listens inside a network
namespace (the socket is made there), so daemons in other namespaces of a lab reach
it over the lab's underlay while the test keeps the state in its own process.
"""
from __future__ import annotations

import base64
import bisect
import copy
import http.server
import json
import os
import socket
import socketserver
import threading
import time
import urllib.parse
from typing import Any, NamedTuple

NODES = "/api/v1/nodes"
MERGE_KEYS = {("status", "conditions"): "type", ("status", "addresses"): "type"}
Key = tuple[str, str]       # (namespace, name); namespace "" for Nodes and Namespaces


class Served(NamedTuple):
    """Where a kind lives in the API and which field labels its lists can select on."""
    prefix: tuple[str, ...]     # the path's head: ("api", "v1") or ("apis", GROUP, VERSION)
    plural: str
    namespaced: bool
    fields: tuple[str, ...] = ()    # beyond metadata.name and metadata.namespace

    @property
    def api_version(self) -> str:
        return "/".join(self.prefix[1:])


SERVED = {
    "Node": Served(("api", "v1"), "nodes", False),
    "Namespace": Served(("api", "v1"), "namespaces", False),
    "Pod": Served(("api", "v1"), "pods", True, ("spec.nodeName", "status.podIP")),
    "Service": Served(("api", "v1"), "services", True),
    "EndpointSlice": Served(("apis", "discovery.k8s.io", "v1"), "endpointslices", True),
    "NetworkPolicy": Served(("apis", "networking.k8s.io", "v1"), "networkpolicies", True),
}
COMMON_FIELDS = ("metadata.name", "metadata.namespace")


class BadSelector(ValueError):
    pass


def storage_key(key: Key) -> str:
    """An object's place in a list: its etcd key's tail, so lists sort as etcd's do."""
    return "%s/%s" % key if key[0] else key[1]


def field_value(obj: dict[str, Any], label: str) -> str:
    value: Any = obj
    for part in label.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, str) else "" if value is None else json.dumps(value)


def field_matcher(selector: str, allowed: tuple[str, ...]) -> Any:
    """fieldSelector -> a predicate on objects (BadSelector for an unsupported field or syntax)."""
    terms = []
    for term in (t for t in selector.split(",") if t):
        for op in ("!=", "==", "="):
            label, sep, value = term.partition(op)
            if sep:
                break
        else:
            raise BadSelector("invalid field selector: %r: expected an operator" % term)
        label = label.strip()
        if label not in allowed:
            raise BadSelector("field label not supported: %s" % label)
        terms.append((label, op == "!=", value.strip()))
    return lambda obj: all((field_value(obj, label) == value) != negated for label, negated, value in terms)


def label_matcher(selector: str) -> Any:
    """labelSelector (equality-based terms) -> a predicate on objects."""
    if "(" in selector or " in " in selector or " notin " in selector:
        raise BadSelector("set-based label selectors are not supported by this fake: %r" % selector)
    terms: list[tuple[str, str, str]] = []
    for term in (t.strip() for t in selector.split(",") if t.strip()):
        if term.startswith("!"):
            terms.append(("absent", term[1:].strip(), ""))
            continue
        for op in ("!=", "==", "="):
            key, sep, value = term.partition(op)
            if sep:
                terms.append(("!=" if op == "!=" else "=", key.strip(), value.strip()))
                break
        else:
            terms.append(("exists", term, ""))
        if not terms[-1][1]:
            raise BadSelector("invalid label selector: %r" % term)

    def matches(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for op, key, value in terms:
            if op == "absent" and key in labels or op == "exists" and key not in labels or \
                    op == "=" and labels.get(key) != value or op == "!=" and labels.get(key) == value:
                return False
        return True
    return matches


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: bytes
    at: float = 0.0         # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
           "reason": reason, "code": code}
    if details:
        out["details"] = details
    return out


def strategic_merge(old: Any, patch: Any, path: tuple[str, ...] = (), lists_by_key: bool = True) -> Any:
    """`patch` applied to `old`: maps merged key by key (None deletes), lists with a merge
    key merged by it (strategic) or replaced (JSON merge patch: lists_by_key False)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
            continue
        here = path + (key,)
        merge_key = MERGE_KEYS.get(here) if lists_by_key else None
        if merge_key and isinstance(value, list) and isinstance(out.get(key), list):
            merged = [copy.deepcopy(e) for e in out[key]]
            for entry in value:
                if not isinstance(entry, dict):
                    continue
                for i, have in enumerate(merged):
                    if isinstance(have, dict) and have.get(merge_key) == entry.get(merge_key):
                        merged[i] = strategic_merge(have, entry, here, lists_by_key)
                        break
                else:
                    merged.append(copy.deepcopy(entry))
            out[key] = merged
        elif isinstance(value, dict):
            out[key] = strategic_merge(out.get(key), value, here, lists_by_key)
        else:
            out[key] = copy.deepcopy(value)
    return out


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FakeKubeApi:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, netns: str | None = None,
                 bookmark_interval: float = 1.0, max_watch_seconds: float | None = None) -> None:
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds     # cap on timeoutSeconds (None: as asked)
        self.cond = threading.Condition()
        self.rv = 100
        self.compacted = 0                  # events at or below this resourceVersion are forgotten
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[Key, dict[str, Any]] = {}
        self.objects: dict[str, dict[Key, dict[str, Any]]] = {     # every kind served but Node
            kind: self.pods if kind == "Pod" else {} for kind in SERVED if kind != "Node"}
        self.history: list[tuple[int, str, dict[str, Any]]] = []     # (rv, event type, object) of Nodes
        self.requests: list[Request] = []
        self.failures: list[list[Any]] = []    # [method, path, status, remaining]
        self._watch_sockets: set[socket.socket] = set()
        self._uid = 0
        self.closed = False
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._handle(self, "GET")

            def do_PATCH(self) -> None:
                api._handle(self, "PATCH")

            def do_POST(self) -> None:
                api._handle(self, "POST")

            def do_PUT(self) -> None:
                api._handle(self, "PUT")

            def do_DELETE(self) -> None:
                api._handle(self, "DELETE")

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        if netns is not None:
            from podnet.net.netns import entered
            with entered(netns):            # the listening socket belongs to that namespace
                self.httpd = Server((host, port), Handler)
        else:
            self.httpd = Server((host, port), Handler)
        self.host, self.port = self.httpd.server_address[:2]
        self.url = "http://%s:%d" % (self.host, self.port)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="fake-kube-api",
                                       daemon=True)
        self.thread.start()

    # ---- the state, as other clients of the API would change it ----

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _record(self, etype: str, node: dict[str, Any]) -> None:
        self.history.append((self.rv, etype, copy.deepcopy(node)))
        self.cond.notify_all()

    def add_node(self, name: str, pod_cidr: str | None = None, pod_cidrs: list[str] | None = None,
                 annotations: dict[str, str] | None = None, internal_ip: str | None = None,
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
        with self.cond:
            if name in self.nodes:
                raise ValueError("node %s exists" % name)
            self._uid += 1
            spec: dict[str, Any] = {}
            if pod_cidr or pod_cidrs:
                spec["podCIDR"] = pod_cidr or (pod_cidrs or [""])[0]
                spec["podCIDRs"] = list(pod_cidrs or [pod_cidr])
            node: dict[str, Any] = {
                "kind": "Node", "apiVersion": "v1",
                "metadata": {"name": name, "uid": "00000000-0000-4000-8000-%012d" % self._uid,
                             "resourceVersion": self._bump(), "creationTimestamp": now_rfc3339(),
                             "labels": dict(labels or {"kubernetes.io/hostname": name})},
                "spec": spec,
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                           "message": "kubelet is posting ready status",
                                           "lastHeartbeatTime": now_rfc3339(),
                                           "lastTransitionTime": now_rfc3339()}],
                           "addresses": ([{"type": "InternalIP", "address": internal_ip}] if internal_ip else [])
                           + [{"type": "Hostname", "address": name}]},
            }
            if annotations:
                node["metadata"]["annotations"] = dict(annotations)
            self.nodes[name] = node
            self._record("ADDED", node)
            return copy.deepcopy(node)

    def update_node(self, name: str, change: Any) -> dict[str, Any]:
        """change(node) edits a copy of the Node in place (another client's update)."""
        with self.cond:
            node = copy.deepcopy(self.nodes[name])
            change(node)
            return self._store(name, node)

    def _store(self, name: str, node: dict[str, Any]) -> dict[str, Any]:
        old = self.nodes[name]
        strip = ("resourceVersion",)
        same = {k: v for k, v in old["metadata"].items() if k not in strip} == \
            {k: v for k, v in node["metadata"].items() if k not in strip} and \
            old.get("spec") == node.get("spec") and old.get("status") == node.get("status")
        if same:
            return copy.deepcopy(old)
        node["metadata"]["resourceVersion"] = self._bump()
        self.nodes[name] = node
        self._record("MODIFIED", node)
        return copy.deepcopy(node)

    def set_annotations(self, name: str, values: dict[str, str | None]) -> dict[str, Any]:
        def change(node: dict[str, Any]) -> None:
            ann = node["metadata"].setdefault("annotations", {})
            for k, v in values.items():
                if v is None:
                    ann.pop(k, None)
                else:
                    ann[k] = v
        return self.update_node(name, change)

    def delete_node(self, name: str) -> None:
        with self.cond:
            node = self.nodes.pop(name)
            node["metadata"]["resourceVersion"] = self._bump()
            self._record("DELETED", node)

    def add_pod(self, namespace: str, name: str, node_name: str) -> dict[str, Any]:
        with self.cond:
            self._uid += 1
            pod = {"kind": "Pod", "apiVersion": "v1",
                   "metadata": {"name": name, "namespace": namespace, "resourceVersion": self._bump(),
                                "uid": "00000000-0000-4000-9000-%012d" % self._uid},
                   "spec": {"nodeName": node_name, "containers": [{"name": "kube-flannel", "image": "x"}]},
                   "status": {"phase": "Running"}}
            self.pods[(namespace, name)] = pod
            return copy.deepcopy(pod)

    def add_object(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a copy of `obj` (an API dict of a kind served) as created by another client."""
        served = SERVED[kind]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("a %s needs metadata.name" % kind)
        if served.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), name)
        with self.cond:
            if key in (self._stored(kind)):
                raise ValueError("%s %s exists" % (kind, storage_key(key)))
            self._uid += 1
            meta.setdefault("uid", "00000000-0000-4000-a000-%012d" % self._uid)
            meta.setdefault("creationTimestamp", now_rfc3339())
            meta["resourceVersion"] = self._bump()
            if kind == "Namespace":         # the API server always sets it
                meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            obj["kind"], obj["apiVersion"] = kind, served.api_version
            if kind == "Node":
                self.nodes[name] = obj
                self._record("ADDED", obj)
            else:
                self.objects[kind][key] = obj
            return copy.deepcopy(obj)

    def _stored(self, kind: str) -> dict[Key, dict[str, Any]]:
        if kind == "Node":
            return {("", name): node for name, node in self.nodes.items()}
        return self.objects[kind]

    def node(self, name: str) -> dict[str, Any]:
        with self.cond:
            return copy.deepcopy(self.nodes[name])

    def compact(self) -> int:
        """Forget every change up to now: older resourceVersions answer 410 Gone."""
        with self.cond:
            self.compacted = self.rv
            return self.rv

    def drop_watches(self) -> int:
        """Cut every open watch connection (no chunked terminator: a dropped connection)."""
        with self.cond:
            socks = list(self._watch_sockets)
            self._watch_sockets.clear()
            self.cond.notify_all()
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)

    def watch_count(self) -> int:
        with self.cond:
            return len(self._watch_sockets)

    def fail_next(self, method: str, path: str, code: int = 500, count: int = 1) -> None:
        """Answer the next `count` requests of `method` on `path` with a Status `code`."""
        with self.cond:
            self.failures.append([method, path, code, count])

    def writes(self) -> list[Request]:
        """Every request that was not a GET."""
        return [r for r in list(self.requests) if r.method != "GET"]

    def kubeconfig(self, directory: str, token: str = "test-token") -> str:
        path = os.path.join(directory, "kubeconfig")
        with open(path, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                       "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                       "users": [{"name": "fake", "user": {"token": token}}],
                       "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}, f)
        return path

    def close(self) -> None:
        self.closed = True
        self.drop_watches()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- HTTP ----

    def _handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        content_type = (h.headers.get("Content-Type") or "").split(";")[0].strip()
        path = url.path.rstrip("/") or "/"
        with self.cond:
            self.requests.append(Request(method, path, query, content_type, body, time.monotonic()))
            for failure in self.failures:
                if failure[0] == method and failure[1] == path and failure[3] > 0:
                    failure[3] -= 1
                    code = failure[2]
                    self._send(h, code, status(code, "InternalError" if code >= 500 else "BadRequest",
                                               "injected failure %d" % code))
                    return
        parts = path.strip("/").split("/")
        prefix = tuple(parts[:2]) if parts[:2] == ["api", "v1"] else tuple(parts[:3]) if parts[:1] == ["apis"] else ()
        by_plural = {served.plural: kind for kind, served in SERVED.items() if served.prefix == prefix}
        rest = parts[len(prefix):] if prefix else []
        if method == "GET" and by_plural:
            if rest == ["nodes"] and query.get("watch") in ("true", "1"):
                if query.get("fieldSelector") or query.get("labelSelector"):
                    return self._send(h, 400, status(400, "BadRequest",
                                                     "watches with selectors are not supported by this fake"))
                return self._watch(h, query)
            namespace, tail = (rest[1], rest[2:]) if rest[:1] == ["namespaces"] and len(rest) >= 3 else (None, rest)
            kind = by_plural.get(tail[0]) if tail else None
            if kind is not None and (namespace is None or SERVED[kind].namespaced):
                if len(tail) == 1:
                    if query.get("watch") in ("true", "1"):
                        return self._send(h, 400, status(400, "BadRequest",
                                                         "this fake serves watches of Nodes only"))
                    return self._list(h, query, kind, namespace)
                if len(tail) == 2 and (namespace is not None) == SERVED[kind].namespaced:
                    with self.cond:
                        obj = copy.deepcopy(self._stored(kind).get((namespace or "", tail[1])))
                    if obj is None:
                        plural = SERVED[kind].plural
                        return self._send(h, 404, status(404, "NotFound", '%s "%s" not found' % (plural, tail[1]),
                                                         name=tail[1], kind=plural))
                    return self._send(h, 200, obj)
        elif method == "PATCH" and prefix == ("api", "v1") and rest[:1] == ["nodes"] and len(rest) in (2, 3) \
                and rest[2:] in ([], ["status"]):
            return self._patch(h, rest[1], content_type, body, subresource=rest[2] if len(rest) == 3 else "")
        elif method != "GET" and by_plural:
            return self._send(h, 405, status(405, "MethodNotAllowed", "%s is not supported by this fake" % method))
        return self._send(h, 404, status(404, "NotFound", "the server could not find the requested resource"))

    def _send(self, h: http.server.BaseHTTPRequestHandler, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            h.close_connection = True

    def _list(self, h: http.server.BaseHTTPRequestHandler, query: dict[str, str], kind: str = "Node",
              namespace: str | None = None) -> None:
        served = SERVED[kind]
        try:
            selected = [field_matcher(query["fieldSelector"], COMMON_FIELDS + served.fields)] \
                if query.get("fieldSelector") else []
            if query.get("labelSelector"):
                selected.append(label_matcher(query["labelSelector"]))
        except BadSelector as e:
            return self._send(h, 400, status(400, "BadRequest", str(e)))
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self.cond:
            if token:
                try:
                    decoded = json.loads(base64.b64decode(token))
                    list_rv, start = int(decoded["rv"]), str(decoded["start"])
                except (ValueError, KeyError, TypeError):
                    return self._send(h, 400, status(400, "BadRequest", "continue key is not valid"))
                if list_rv < self.compacted:
                    return self._send(h, 410, status(
                        410, "Expired", "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter."))
            else:
                list_rv, start = self.rv, ""
            stored = {storage_key(key): obj for key, obj in self._stored(kind).items()
                      if namespace is None or key[0] == namespace}
            keys = [k for k in sorted(stored) if k > start and all(match(stored[k]) for match in selected)]
            page = keys[:limit] if limit else keys
            items = []
            for key in page:
                item = copy.deepcopy(stored[key])
                item.pop("kind", None)
                item.pop("apiVersion", None)
                items.append(item)
            meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
            if limit and len(keys) > limit:
                meta["continue"] = base64.b64encode(json.dumps(
                    {"v": "meta.k8s.io/v1", "rv": list_rv, "start": page[-1] + "\x00"}).encode()).decode()
                if not selected:
                    meta["remainingItemCount"] = len(keys) - limit
        self._send(h, 200, {"kind": kind + "List", "apiVersion": served.api_version, "metadata": meta,
                            "items": items})

    def _watch(self, h: http.server.BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        timeout = float(query.get("timeoutSeconds") or 1800)
        if self.max_watch_seconds is not None:
            timeout = min(timeout, self.max_watch_seconds)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        rv_text = query.get("resourceVersion") or ""
        sock = h.connection
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.close_connection = True

        def send(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        try:
            with self.cond:
                if rv_text in ("", "0"):
                    start = self.rv
                    initial = [copy.deepcopy(self.nodes[n]) for n in sorted(self.nodes)]
                else:
                    start, initial = int(rv_text), []
                    if start < self.compacted:
                        expired = status(410, "Expired", "too old resource version: %d (%d)"
                                         % (start, self.compacted))
                        send({"type": "ERROR", "object": expired})
                        h.wfile.write(b"0\r\n\r\n")
                        return
                self._watch_sockets.add(sock)
            for obj in initial:
                send({"type": "ADDED", "object": obj})
            position = start
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + self.bookmark_interval
            while not self.closed:
                with self.cond:
                    if sock not in self._watch_sockets:
                        return                                  # dropped: no terminator
                    i = bisect.bisect_right(self.history, position, key=lambda e: e[0])
                    events = self.history[i:]
                    if not events:
                        wait = min(deadline, next_bookmark if bookmarks else deadline) - time.monotonic()
                        if wait > 0:
                            self.cond.wait(wait)
                        i = bisect.bisect_right(self.history, position, key=lambda e: e[0])
                        events = self.history[i:]
                    current = self.rv
                for rv, etype, obj in events:
                    send({"type": etype, "object": obj})
                    position = rv
                now = time.monotonic()
                if now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    send({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
                                                         "metadata": {"resourceVersion": str(current)}}})
                    position = max(position, current)
                    next_bookmark = now + self.bookmark_interval
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:
            pass
        finally:
            with self.cond:
                self._watch_sockets.discard(sock)

    def _patch(self, h: http.server.BaseHTTPRequestHandler, name: str, content_type: str, body: bytes,
               subresource: str) -> None:
        if content_type == "application/strategic-merge-patch+json":
            by_key = True
        elif content_type == "application/merge-patch+json":
            by_key = False
        else:
            return self._send(h, 415, status(415, "UnsupportedMediaType",
                                             "the body of the request was in an unknown format - accepted media "
                                             "types by this fake: application/strategic-merge-patch+json, "
                                             "application/merge-patch+json; got %r" % content_type))
        try:
            patch = json.loads(body)
        except ValueError as e:
            return self._send(h, 400, status(400, "BadRequest", "error decoding patch: %s" % e))
        if not isinstance(patch, dict):
            return self._send(h, 400, status(400, "BadRequest", "a patch must be a JSON object"))
        with self.cond:
            old = self.nodes.get(name)
            if old is None:
                return self._send(h, 404, status(404, "NotFound", 'nodes "%s" not found' % name,
                                                 name=name, kind="nodes"))
            want_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if want_rv is not None and want_rv != old["metadata"]["resourceVersion"]:
                return self._send(h, 409, status(409, "Conflict", 'Operation cannot be fulfilled on nodes "%s": '
                                                 "the object has been modified; please apply your changes to the "
                                                 "latest version and try again" % name, name=name, kind="nodes"))
            new = strategic_merge(old, patch, lists_by_key=by_key)
            for fixed in ("name", "uid", "creationTimestamp", "resourceVersion"):
                if fixed in old["metadata"]:
                    new["metadata"][fixed] = old["metadata"][fixed]
            new["kind"], new["apiVersion"] = "Node", "v1"
            if subresource == "status":
                new["spec"] = copy.deepcopy(old.get("spec", {}))
            else:
                new["status"] = copy.deepcopy(old.get("status", {}))
            stored = self._store(name, new)
        self._send(h, 200, stored)
