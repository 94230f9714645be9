"""podnet.kube.events: the manifests directory and the Kubernetes API (list + watch).

No kube-apiserver can run on this machine (no binary, no container image, no
network beyond package registries). The API source is therefore tested
against a scripted stand-in on 127.0.0.1 that replays responses in the real
wire format of kube-apiserver (v1.30-era JSON): list responses are
`ServiceList` / `EndpointSliceList` objects whose items carry no kind, with
`metadata.resourceVersion` and `metadata.continue` for paging; watches are
`?watch=true` requests answered 200 with a chunked body of newline-delimited
`{"type": ..., "object": ...}` events, BOOKMARK objects carrying only
`metadata.resourceVersion`, and an expired resourceVersion reported as an
`ERROR` event holding a `Status` with code 410 "Expired"; an expired
continue token is an HTTP 410 with a `Status` body. The client side is the
real `kubernetes` package (kubeconfig loading, request building, urllib3).
"""
import base64
import http.server
import json
import logging
import os
import socketserver
import threading
import time
import urllib.parse

import pytest

from kube_proxy.model import ServicePortName
from kube_proxy.tracker import ChangeTracker
from podnet.kube.api import KubeApiSource
from podnet.kube.events import Event
from podnet.kube.manifests import ManifestSource

# ---------------------------------------------------------------------------------------------
# the manifests directory
# ---------------------------------------------------------------------------------------------

SERVICES_YAML = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: http-web
---
# a comment-only document and an empty one are skipped
---
apiVersion: v1
kind: Service
metadata:
  name: dns
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"""

SLICES_JSON = {
    "apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
         "metadata": {"name": "web-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": True}}]},
    ]}

WEB = ServicePortName("shop", "web", "http", "TCP")
DNS = ServicePortName("default", "dns", "dns", "UDP")


def write(path, text, age=None):
    with open(path, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(text))
    if age is not None:                      # pretend the file was written long ago
        t = time.time() - age
        os.utime(path, (t, t))


@pytest.fixture
def mdir(tmp_path):
    write(tmp_path / "services.yaml", SERVICES_YAML, age=100)
    write(tmp_path / "slices.json", SLICES_JSON, age=100)
    write(tmp_path / "README.md", "not a manifest", age=100)
    write(tmp_path / ".hidden.yaml", "kind: Service\nmetadata: {name: nope}\n", age=100)
    return tmp_path


def collect():
    events = []
    return events, events.append


def names(event):
    return sorted(o["metadata"]["name"] for o in event.obj) if event.type == "RELIST" else \
        event.obj["metadata"]["name"]


def test_initial_scan_is_a_relist_per_kind(mdir):
    events, emit = collect()
    ManifestSource(str(mdir), emit).scan()
    assert [(e.type, e.kind, names(e)) for e in events] == [
        ("RELIST", "Service", ["dns", "web"]), ("RELIST", "EndpointSlice", ["web-x1"])]


def test_changes_become_added_modified_deleted(mdir):
    events, emit = collect()
    src = ManifestSource(str(mdir), emit)
    src.scan()
    events.clear()
    assert src.scan() == []                               # nothing changed, nothing said
    write(mdir / "services.yaml", SERVICES_YAML.replace("port: 80", "port: 81"))
    write(mdir / "more.yml", "kind: Service\nmetadata: {name: api, namespace: shop}\n"
                             "spec: {clusterIP: 10.96.0.20, ports: [{port: 443}]}\n")
    os.unlink(mdir / "slices.json")
    src.scan()
    assert sorted((e.type, e.kind, names(e)) for e in events) == [
        ("ADDED", "Service", "api"), ("DELETED", "EndpointSlice", "web-x1"), ("MODIFIED", "Service", "web")]


def test_unchanged_old_files_are_not_read_again(mdir, monkeypatch):
    from podnet.kube import manifests
    src = ManifestSource(str(mdir), lambda e: None)
    src.scan()
    calls = []
    real = manifests.parse_documents
    monkeypatch.setattr(manifests, "parse_documents", lambda *a: calls.append(a) or real(*a))
    src.scan()
    assert calls == []


def test_rewrite_within_one_timestamp_tick_is_seen(mdir):
    events, emit = collect()
    src = ManifestSource(str(mdir), emit)
    path = mdir / "services.yaml"
    st = os.stat(path)
    write(path, SERVICES_YAML)
    src.scan()
    events.clear()
    # same size, same mtime as before: only the content hash can tell
    write(path, SERVICES_YAML.replace("10.96.0.10", "10.96.0.11"))
    os.utime(path, ns=(st.st_atime_ns, os.stat(path).st_mtime_ns))
    src.scan()
    assert [(e.type, names(e)) for e in events] == [("MODIFIED", "web")]


def test_broken_file_keeps_its_previous_objects(mdir, caplog):
    events, emit = collect()
    src = ManifestSource(str(mdir), emit)
    src.scan()
    events.clear()
    write(mdir / "services.yaml", "kind: Service\nmetadata: {name: web\n  bad: [")
    src.scan()
    assert events == []
    assert "services.yaml: not valid YAML" in caplog.text and "keeping what it held before" in caplog.text
    write(mdir / "services.yaml", SERVICES_YAML.replace("port: 80", "port: 82"))
    src.scan()
    assert [(e.type, names(e)) for e in events] == [("MODIFIED", "web")]


def test_duplicate_definition_last_file_wins(mdir, caplog):
    events, emit = collect()
    write(mdir / "z-override.yaml", SERVICES_YAML.split("---")[0].replace("10.96.0.10", "10.96.0.99"))
    ManifestSource(str(mdir), emit).scan()
    web = [o for o in events[0].obj if o["metadata"]["name"] == "web"][0]
    assert web["spec"]["clusterIP"] == "10.96.0.99"
    assert "Service shop/web is defined in" in caplog.text


def test_nameless_and_odd_documents_are_logged(tmp_path, caplog):
    write(tmp_path / "odd.yaml", "- 1\n- 2\n---\nkind: Service\nmetadata: {}\n---\nkind: List\nitems: 3\n")
    events, emit = collect()
    ManifestSource(str(tmp_path), emit).scan()
    assert [len(e.obj) for e in events] == [0, 0]
    assert "not an object" in caplog.text and "without metadata.name" in caplog.text
    assert "List without an items list" in caplog.text


def test_missing_directory_is_a_warning(tmp_path, caplog):
    events, emit = collect()
    ManifestSource(str(tmp_path / "nope"), emit).scan()
    assert [e.obj for e in events] == [[], []] and "does not exist" in caplog.text


def test_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "s.yaml", SERVICES_YAML)
    events, emit = collect()
    ManifestSource(str(tmp_path), emit).scan()
    assert events[0].obj == []
    events.clear()
    ManifestSource(str(tmp_path), emit, recursive=True).scan()
    assert names(events[0]) == ["dns", "web"]


def test_watch_thread_feeds_the_tracker(mdir):
    tracker = ChangeTracker(min_sync_period=0)
    lock = threading.Lock()

    def emit(event):
        with lock:
            tracker.apply(event)
    src = ManifestSource(str(mdir), emit, interval=0.05)
    src.start()
    try:
        wait_for(lambda: tracker.ready)
        with lock:
            state = tracker.take().state
        assert set(state.service_ports) == {WEB, DNS}
        assert [e.addr for e in state.endpoints_for(WEB)] == ["10.244.1.2:8080"]
        slices = json.loads(json.dumps(SLICES_JSON))
        slices["items"][0]["endpoints"].append({"addresses": ["10.244.1.3"]})
        write(mdir / "slices.json", slices)
        wait_for(lambda: tracker._dirty)
        with lock:
            sync = tracker.take()
        assert sync.changed == {WEB} and len(sync.state.endpoints_for(WEB)) == 2
    finally:
        src.stop()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# the Kubernetes API: recorded responses in kube-apiserver's wire format
# ---------------------------------------------------------------------------------------------

def _service(name, ns, ip, rv, port=80, uid="0"):
    return {"metadata": {"name": name, "namespace": ns, "uid": "5d1f6a2e-0000-4000-8000-%012d" % int(uid),
                         "resourceVersion": rv, "creationTimestamp": "2026-11-20T09:14:03Z",
                         "labels": {"app": name},
                         "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                                            "apiVersion": "v1", "time": "2026-11-20T09:14:03Z",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:ports": {}}}}]},
            "spec": {"ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}],
                     "selector": {"app": name}, "clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
                     "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "internalTrafficPolicy": "Cluster"},
            "status": {"loadBalancer": {}}}


def _slice(name, ns, service, ips, rv):
    return {"metadata": {"name": name, "generateName": service + "-", "namespace": ns,
                         "uid": "8a7c0c1e-0000-4000-8000-000000000001", "resourceVersion": rv,
                         "generation": 3, "creationTimestamp": "2026-11-20T09:14:03Z",
                         "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                    "kubernetes.io/service-name": service},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                              "uid": "5d1f6a2e-0000-4000-8000-000000000001",
                                              "controller": True, "blockOwnerDeletion": True}]},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": "node-1", "zone": "z1",
                           "targetRef": {"kind": "Pod", "namespace": ns, "name": "%s-%d" % (service, i),
                                         "uid": "c0ffee00-0000-4000-8000-%012d" % i}}
                          for i, ip in enumerate(ips)],
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]}


def service_list(items, rv, cont=None):
    meta = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
        meta["remainingItemCount"] = 1
    return {"kind": "ServiceList", "apiVersion": "v1", "metadata": meta, "items": items}


def slice_list(items, rv):
    return {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": rv}, "items": items}


def event(etype, obj, kind="Service", api="v1"):
    obj = dict(obj, kind=kind, apiVersion=api)
    return {"type": etype, "object": obj}


def bookmark(rv, kind="Service", api="v1"):
    obj = {"kind": kind, "apiVersion": api, "metadata": {"resourceVersion": rv, "creationTimestamp": None}}
    if kind == "Service":
        obj.update(spec={}, status={"loadBalancer": {}})
    return {"type": "BOOKMARK", "object": obj}


EXPIRED_EVENT = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                             "status": "Failure", "message": "too old resource version: 1100 (1250)",
                                             "reason": "Expired", "code": 410}}
EXPIRED_CONTINUE = {"kind": "Status", "apiVersion": "v1", "metadata": {"continue": "eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ"},
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": "The provided continue parameter is too old to display a consistent list result. "
                               "You can start a new list without the continue parameter, or use the continue "
                               "token in this response to retrieve the remainder of the results."}


class FakeApiServer:
    """Replays scripted responses per (path, list|watch); records every request.

    A script entry is ("json", status, body) or ("watch", [events], hold): a 200 with a
    chunked stream of events, ended after the events, or held open until close() when
    hold is True. When a script runs out, watches are held open (a quiet watch) and
    lists answer 500.
    """

    def __init__(self):
        self.script = {}
        self.requests = []
        self.closing = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                mode = "watch" if query.get("watch") in ("true", "1", "True") else "list"
                server.requests.append((url.path, mode, query))
                queue = server.script.get((url.path, mode), [])
                entry = queue.pop(0) if queue else (("watch", [], True) if mode == "watch"
                                                    else ("json", 500, {"kind": "Status", "code": 500}))
                if entry[0] == "json":
                    body = json.dumps(entry[2]).encode()
                    self.send_response(entry[1])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                _, events, hold = entry
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for ev in events:
                        data = json.dumps(ev).encode() + b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    if hold:
                        server.closing.wait(30)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, path, mode, *entries):
        self.script.setdefault((path, mode), []).extend(entries)

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, directory):
        path = os.path.join(directory, "kubeconfig")
        with open(path, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "test",
                       "clusters": [{"name": "test", "cluster": {"server": self.url}}],
                       "users": [{"name": "test", "user": {"token": "recorded-token"}}],
                       "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}, f)
        return path


SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"


@pytest.fixture
def api(tmp_path):
    server = FakeApiServer()
    yield server
    server.close()


def make_source(api, tmp_path, events, **kw):
    kw.setdefault("backoff", (0.01, 0.05))
    kw.setdefault("watch_timeout", (300, 300))
    lock = threading.Lock()

    def emit(ev):
        with lock:
            events.append(ev)
    return KubeApiSource(emit, kubeconfig=api.kubeconfig(str(tmp_path)), **kw)


def test_list_watch_bookmark_410_relist(api, tmp_path):
    dns = _service("kube-dns", "kube-system", "10.96.0.10", "900", 53, uid=1)
    web = _service("web", "shop", "10.96.0.20", "950", uid=2)
    api_svc = _service("api", "shop", "10.96.0.30", "1001", uid=3)
    web2 = _service("web", "shop", "10.96.0.20", "1002", 8080, uid=2)
    # list in two pages, then a watch that the server ends after a bookmark
    api.add(SERVICES, "list", ("json", 200, service_list([dns], "1000", cont="c1")),
            ("json", 200, service_list([web], "1000")))
    api.add(SERVICES, "watch", ("watch", [event("ADDED", api_svc), event("MODIFIED", web2), bookmark("1100")], False))
    # the next watch loses a Service, then the server says the resourceVersion expired
    api.add(SERVICES, "watch", ("watch", [event("DELETED", dict(api_svc, metadata=dict(
        api_svc["metadata"], resourceVersion="1101"))), EXPIRED_EVENT], False))
    # the re-list's second page finds its continue token expired: list from scratch again
    api.add(SERVICES, "list", ("json", 200, service_list([dns], "1250", cont="c2")),
            ("json", 410, EXPIRED_CONTINUE), ("json", 200, service_list([dns, web2], "1300")))
    events = []
    src = make_source(api, tmp_path, events, kinds=["Service"], page_size=1)
    src.start()
    try:
        wait_for(lambda: len([r for r in api.requests if r[1] == "watch"]) >= 3)
        wait_for(lambda: len(events) >= 5)
    finally:
        t0 = time.monotonic()
        src.stop()
        stop_took = time.monotonic() - t0
    summary = [(e.type, names(e)) for e in events]
    assert summary == [("RELIST", ["kube-dns", "web"]), ("ADDED", "api"), ("MODIFIED", "web"), ("DELETED", "api"),
                       ("RELIST", ["kube-dns", "web"])]
    assert all(o["kind"] == "Service" and o["apiVersion"] == "v1" for o in events[0].obj)
    lists = [q for p, m, q in api.requests if m == "list"]
    assert [q.get("continue") for q in lists] == [None, "c1", None, "c2", None]
    assert all(q["limit"] == "1" for q in lists)
    watches = [q for p, m, q in api.requests if m == "watch"]
    assert [q["resourceVersion"] for q in watches[:3]] == ["1000", "1100", "1300"]
    assert all(q["allowWatchBookmarks"] == "true" and q["timeoutSeconds"] == "300" for q in watches)
    assert src.relists["Service"] == 2 and src.resource_versions["Service"] == "1300"
    assert stop_took < 3                     # a quiet watch does not keep stop() waiting


def test_both_kinds_drive_the_tracker(api, tmp_path):
    web = _service("web", "shop", "10.96.0.20", "10")
    api.add(SERVICES, "list", ("json", 200, service_list([web], "10")))
    api.add(SERVICES, "watch", ("watch", [], True))
    s1 = _slice("web-abcde", "shop", "web", ["10.244.1.2", "10.244.2.3"], "11")
    s1b = _slice("web-abcde", "shop", "web", ["10.244.1.2"], "12")
    api.add(SLICES, "list", ("json", 200, slice_list([s1], "11")))
    api.add(SLICES, "watch", ("watch", [event("MODIFIED", s1b, "EndpointSlice", "discovery.k8s.io/v1"),
                                        bookmark("20", "EndpointSlice", "discovery.k8s.io/v1")], True))
    events = []
    src = make_source(api, tmp_path, events)
    src.start()
    try:
        wait_for(lambda: len(events) >= 3)
    finally:
        src.stop()
    tracker = ChangeTracker(min_sync_period=0)
    for ev in events:
        tracker.apply(ev)
    state = tracker.take().state
    spn = ServicePortName("shop", "web", "http", "TCP")
    assert [e.addr for e in state.endpoints_for(spn)] == ["10.244.1.2:8080"]
    assert state.service_ports[spn].cluster_ip == "10.96.0.20"
    assert src.resource_versions["EndpointSlice"] == "20"


def test_server_errors_back_off_and_retry(api, tmp_path, caplog):
    api.add(SERVICES, "list", ("json", 503, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                             "message": "etcdserver: leader changed", "code": 503}),
            ("json", 200, service_list([], "5")))
    events = []
    src = make_source(api, tmp_path, events, kinds=["Service"])
    with caplog.at_level(logging.WARNING, "podnet.kube.api"):
        src.start()
        try:
            wait_for(lambda: events)
        finally:
            src.stop()
    assert events == [Event("RELIST", "Service", [])]
    assert "HTTP 503 etcdserver: leader changed; retrying" in caplog.text


def test_unreachable_server_keeps_retrying_until_stopped(tmp_path, caplog):
    server = FakeApiServer()
    path = server.kubeconfig(str(tmp_path))
    server.close()                          # nothing listens there any more
    events = []
    src = KubeApiSource(events.append, kubeconfig=path, backoff=(0.01, 0.02), kinds=["Service"])
    with caplog.at_level(logging.WARNING, "podnet.kube.api"):
        src.start()
        wait_for(lambda: caplog.text.count("retrying") >= 2)
        src.stop()
    assert events == []


def test_kubeapi_module_does_not_import_kubernetes_until_used():
    import subprocess
    import sys
    code = ("import sys, podnet.kube.api, kube_proxy.tracker, podnet.kube.manifests; "
            "print('kubernetes' in sys.modules, 'yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------
# the Ingress controller's kinds: Ingress, IngressClass, TLS Secret (asked for explicitly)
# ---------------------------------------------------------------------------------------------

from podnet.kube.events import INGRESS_KINDS, KINDS  # noqa: E402

CRT_B64 = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="
KEY_B64 = "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JSUUKLS0tLS1FTkQgUFJJVkFURSBLRVktLS0tLQo="

INGRESS_YAML = """\
apiVersion: networking.k8s.io/v1
kind: IngressList
items:
- apiVersion: networking.k8s.io/v1
  kind: Ingress
  metadata: {name: web, namespace: shop}
  spec:
    ingressClassName: podnet
    rules:
    - host: web.example.com
      http:
        paths:
        - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: podnet
  namespace: ignored-for-a-cluster-scoped-kind
  annotations: {ingressclass.kubernetes.io/is-default-class: "true"}
spec: {controller: podnet.io/ingress-nginx}
---
apiVersion: v1
kind: Secret
type: kubernetes.io/tls
metadata:
  name: web-tls
  namespace: shop
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{...the whole secret...}"}
  labels: {app: web}
data:
  tls.crt: %s
  tls.key: %s
  ca.crt: %s
---
apiVersion: v1
kind: Secret
type: Opaque
metadata: {name: password, namespace: shop}
data: {password: aHVudGVyMg==}
---
apiVersion: v1
kind: SecretList
items:
- apiVersion: v1
  kind: Secret
  type: kubernetes.io/tls
  metadata: {name: typed-in, namespace: shop}
  stringData: {tls.crt: "-----BEGIN CERTIFICATE-----", tls.key: "-----BEGIN PRIVATE KEY-----"}
""" % (CRT_B64, KEY_B64, CRT_B64)


def test_manifests_default_kinds_ignore_ingress_objects(mdir):
    write(mdir / "ingress.yaml", INGRESS_YAML, age=100)
    events, emit = collect()
    ManifestSource(str(mdir), emit).scan()
    assert [(e.type, e.kind, names(e)) for e in events] == [
        ("RELIST", "Service", ["dns", "web"]), ("RELIST", "EndpointSlice", ["web-x1"])]


def test_manifests_ingress_kinds(mdir):
    write(mdir / "ingress.yaml", INGRESS_YAML, age=100)
    events, emit = collect()
    src = ManifestSource(str(mdir), emit, kinds=INGRESS_KINDS)
    src.scan()
    assert [(e.type, e.kind, names(e)) for e in events] == [
        ("RELIST", "Service", ["dns", "web"]), ("RELIST", "EndpointSlice", ["web-x1"]),
        ("RELIST", "Ingress", ["web"]), ("RELIST", "IngressClass", ["podnet"]),
        ("RELIST", "Secret", ["typed-in", "web-tls"])]         # the Opaque Secret is not read
    secrets = {s["metadata"]["name"]: s for s in events[4].obj}
    assert secrets["web-tls"] == {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                                  "metadata": {"name": "web-tls", "namespace": "shop"},
                                  "data": {"tls.crt": CRT_B64, "tls.key": KEY_B64}}
    assert base64.b64decode(secrets["typed-in"]["data"]["tls.key"]) == b"-----BEGIN PRIVATE KEY-----"
    events.clear()
    write(mdir / "ingress.yaml", INGRESS_YAML.replace("podnet.io/ingress-nginx", "podnet.io/other"))
    src.scan()
    assert [(e.type, e.kind, names(e)) for e in events] == [("MODIFIED", "IngressClass", "podnet")]


def test_unknown_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        ManifestSource("/nowhere", lambda e: None, kinds=["Service", "Gateway"])
    with pytest.raises(ValueError, match="unknown kind"):
        KubeApiSource(lambda e: None, api_client=object(), kinds=["Gateway"])
    assert KubeApiSource(lambda e: None, api_client=object()).kinds == KINDS


INGRESSES = "/apis/networking.k8s.io/v1/ingresses"
CLASSES = "/apis/networking.k8s.io/v1/ingressclasses"
SECRETS = "/api/v1/secrets"


def _ingress(name, ns, host, rv, service="web"):
    return {"metadata": {"name": name, "namespace": ns, "uid": "1d2e3f40-0000-4000-8000-000000000001",
                         "resourceVersion": rv, "generation": 1, "creationTimestamp": "2026-11-20T09:14:03Z",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                                            "apiVersion": "networking.k8s.io/v1", "time": "2026-11-20T09:14:03Z",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"ingressClassName": "podnet",
                     "rules": [{"host": host, "http": {"paths": [
                         {"path": "/", "pathType": "Prefix",
                          "backend": {"service": {"name": service, "port": {"number": 80}}}}]}}]},
            "status": {"loadBalancer": {}}}


def _ingress_class(name, rv, default=False):
    meta = {"name": name, "uid": "1d2e3f40-0000-4000-8000-000000000002", "resourceVersion": rv, "generation": 1,
            "creationTimestamp": "2026-11-20T09:14:03Z"}
    if default:
        meta["annotations"] = {"ingressclass.kubernetes.io/is-default-class": "true"}
    return {"metadata": meta, "spec": {"controller": "podnet.io/ingress-nginx"}}


def _secret(name, ns, rv):
    return {"metadata": {"name": name, "namespace": ns, "uid": "1d2e3f40-0000-4000-8000-000000000003",
                         "resourceVersion": rv, "creationTimestamp": "2026-11-20T09:14:03Z",
                         "labels": {"app": "web"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration":
                                         '{"data":{"tls.key":"%s"}}' % KEY_B64},
                         "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                                            "apiVersion": "v1", "time": "2026-11-20T09:14:03Z",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {}}}]},
            "data": {"ca.crt": CRT_B64, "tls.crt": CRT_B64, "tls.key": KEY_B64},
            "type": "kubernetes.io/tls"}


def _list(kind, api, items, rv):
    return {"kind": kind, "apiVersion": api, "metadata": {"resourceVersion": rv}, "items": items}


NET = "networking.k8s.io/v1"


def test_api_ingress_kinds_list_watch_and_secrets_are_trimmed(api, tmp_path):
    api.add(INGRESSES, "list", ("json", 200, _list("IngressList", NET, [_ingress("web", "shop", "web.example.com",
                                                                                    "200")], "210")))
    api.add(INGRESSES, "watch", ("watch", [event("ADDED", _ingress("api", "shop", "api.example.com", "211"),
                                                 "Ingress", NET),
                                           event("MODIFIED", _ingress("web", "shop", "www.example.com", "212"),
                                                 "Ingress", NET),
                                           bookmark("215", "Ingress", NET)], True))
    api.add(CLASSES, "list", ("json", 200, _list("IngressClassList", NET, [_ingress_class("podnet", "100", True)],
                                                 "210")))
    api.add(SECRETS, "list", ("json", 200, _list("SecretList", "v1", [_secret("web-tls", "shop", "205")], "210")))
    api.add(SECRETS, "watch", ("watch", [event("MODIFIED", _secret("web-tls", "shop", "213"), "Secret"),
                                         event("DELETED", _secret("web-tls", "shop", "214"), "Secret")], True))
    events = []
    src = make_source(api, tmp_path, events, kinds=["Ingress", "IngressClass", "Secret"])
    src.start()
    try:
        wait_for(lambda: len(events) >= 7)
        wait_for(lambda: src.resource_versions.get("Ingress") == "215")
    finally:
        src.stop()
    by_kind = {}
    for e in events:
        by_kind.setdefault(e.kind, []).append((e.type, names(e)))
    assert by_kind == {"Ingress": [("RELIST", ["web"]), ("ADDED", "api"), ("MODIFIED", "web")],
                       "IngressClass": [("RELIST", ["podnet"])],
                       "Secret": [("RELIST", ["web-tls"]), ("MODIFIED", "web-tls"), ("DELETED", "web-tls")]}
    relisted = {e.kind: e.obj for e in events if e.type == "RELIST"}
    assert relisted["Ingress"][0]["kind"] == "Ingress" and relisted["Ingress"][0]["apiVersion"] == NET
    assert relisted["IngressClass"][0]["metadata"]["annotations"] == {
        "ingressclass.kubernetes.io/is-default-class": "true"}
    for secret in [relisted["Secret"][0]] + [e.obj for e in events if e.kind == "Secret" and e.type != "RELIST"]:
        assert secret["data"] == {"tls.crt": CRT_B64, "tls.key": KEY_B64}
        assert set(secret["metadata"]) == {"name", "namespace", "resourceVersion", "uid", "creationTimestamp"}
        assert KEY_B64 not in json.dumps(secret["metadata"])
    # Secrets are asked for by type; the other kinds are not filtered
    secret_queries = [q for p, m, q in api.requests if p == SECRETS]
    assert secret_queries and all(q.get("fieldSelector") == "type=kubernetes.io/tls" for q in secret_queries)
    assert all("fieldSelector" not in q for p, m, q in api.requests if p in (INGRESSES, CLASSES))
    assert [q["resourceVersion"] for p, m, q in api.requests if p == INGRESSES and m == "watch"][:1] == ["210"]


def test_api_default_kinds_do_not_touch_ingress_resources(api, tmp_path):
    api.add(SERVICES, "list", ("json", 200, service_list([], "1")))
    api.add(SLICES, "list", ("json", 200, slice_list([], "1")))
    events = []
    src = make_source(api, tmp_path, events)
    src.start()
    try:
        wait_for(lambda: len(events) >= 2)
    finally:
        src.stop()
    assert {p for p, m, q in api.requests} == {SERVICES, SLICES}
