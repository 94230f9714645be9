"""podnet/kube/recorder.py: Kubernetes Events (events.k8s.io/v1) posted in the background.

No kube-apiserver can run here, so the API is a scripted stand-in: a small http.server
(EventsApi below) that speaks the events.k8s.io/v1 wire format for POST and PATCH of
Events, records every request (method, path, headers, JSON body) and answers as
scripted (201/200 with the object, an error status, or not at all). The recorder talks
to it through the real kubernetes client, configured from a kubeconfig file.
"""
import http.server
import json
import logging
import os
import socketserver
import threading
import time

import pytest

from kube_proxy import metrics as km
from kube_proxy import server
from kube_proxy.tracker import ChangeTracker
from lab import manifests as k8s
from podnet.kube import recorder as rec
from podnet.kube.events import ADDED, DELETED, RELIST, Event

T0 = 1_718_000_000_123_456_789      # 2024-06-10T06:13:20.123456789Z
HTTP = {"name": "http", "port": 80, "targetPort": 8080}


class EventsApi:
    """The scripted stand-in for the API server's events.k8s.io/v1 Events (see the module doc).

    `answers`: statuses to give, in order ("stuck": hold the request until close());
    when they run out every request succeeds. `events` holds what the server would store."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.requests = []
        self.events = {}
        self.release = threading.Event()
        self.lock = threading.Lock()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with api.lock:
                    api.requests.append({"method": self.command, "path": self.path,
                                         "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                    answer = api.answers.pop(0) if api.answers else None
                if answer == "stuck":
                    api.release.wait(30)
                    return
                status, obj = answer or 0, None
                parts = self.path.split("/")        # /apis/events.k8s.io/v1/namespaces/NS/events[/NAME]
                if not status:
                    with api.lock:
                        if self.command == "POST":
                            key = (parts[5], body["metadata"]["name"])
                            if key in api.events:
                                status, obj = 409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
                            else:
                                obj = dict(body, metadata=dict(body["metadata"], uid="e-1", resourceVersion="1"))
                                api.events[key] = obj
                                status = 201
                        else:
                            key = (parts[5], parts[7])
                            if key not in api.events:
                                status, obj = 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
                            else:
                                api.events[key] = obj = dict(api.events[key], **body)
                                status = 200
                if obj is None:
                    obj = {"kind": "Status", "apiVersion": "v1", "code": status, "message": "scripted %d" % status}
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_PATCH = _handle

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def kubeconfig(self, directory):
        path = os.path.join(directory, "kubeconfig")
        with open(path, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "test",
                       "clusters": [{"name": "test", "cluster": {"server": self.url}}],
                       "users": [{"name": "test", "user": {"token": "recorded-token"}}],
                       "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}, f)
        return path

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def bodies(self, method):
        return [r["body"] for r in self.requests if r["method"] == method]


@pytest.fixture
def api():
    a = EventsApi()
    yield a
    a.close()


def make(api, tmp_path, **kw):
    kw.setdefault("timeout", (1.0, 1.0))
    return rec.EventRecorder("kube-proxy", "kube-proxy-node1", kubeconfig=api.kubeconfig(str(tmp_path)), **kw)


SVC_REF = rec.object_reference("Service", "default", "web", uid="u-web", field_path="spec.ports{http}")


def test_the_event_has_the_exact_fields_of_an_events_k8s_io_v1_event(api, tmp_path):
    r = make(api, tmp_path, now=lambda: T0)
    assert r.record(SVC_REF, "ServicePortQuarantined", "SyncProxyRules", "the kernel refused it")
    assert r.flush(10)
    r.stop()
    (req,) = api.requests
    assert req["method"] == "POST" and req["path"] == "/apis/events.k8s.io/v1/namespaces/default/events"
    assert req["headers"]["content-type"] == "application/json"
    assert req["headers"]["authorization"] == "Bearer recorded-token"
    assert req["headers"]["user-agent"] == "kube-proxy (podnet)"
    assert req["body"] == {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "web.%x" % T0, "namespace": "default"},
        "eventTime": "2024-06-10T06:13:20.123456Z",
        "reportingController": "kube-proxy",
        "reportingInstance": "kube-proxy-node1",
        "action": "SyncProxyRules",
        "reason": "ServicePortQuarantined",
        "regarding": {"apiVersion": "v1", "kind": "Service", "namespace": "default", "name": "web",
                      "uid": "u-web", "fieldPath": "spec.ports{http}"},
        "note": "the kernel refused it",
        "type": "Warning",
    }
    assert r.stats() == {"recorded": 1, "aggregated": 0, "dropped": 0, "created": 1, "patched": 0,
                         "retried": 0, "failed": 0}


def test_cluster_scoped_objects_long_notes_and_related_objects(api, tmp_path):
    r = make(api, tmp_path, now=lambda: T0)
    node = rec.object_reference("Node", "", "node1")
    r.record(node, "Starting", "StartKubeProxy", "é" * 1000, type=rec.NORMAL,
             related=rec.object_reference("Service", "kube-system", "dns"))
    assert not r.record(node, "Starting", "StartKubeProxy", "x", type="Info")    # not a type the API takes
    assert r.flush(10)
    r.stop()
    (body,) = api.bodies("POST")
    assert body["metadata"] == {"name": "node1.%x" % T0, "namespace": "default"}      # as client-go
    assert body["regarding"] == {"apiVersion": "v1", "kind": "Node", "name": "node1"}
    assert body["related"] == {"apiVersion": "v1", "kind": "Service", "namespace": "kube-system", "name": "dns"}
    assert body["type"] == "Normal"
    assert len(body["note"].encode()) <= 1024 and body["note"].endswith("...")
    assert r.stats()["dropped"] == 1
    with pytest.raises(ValueError):
        rec.EventRecorder("not a qualified name!")


def test_micro_time_keeps_six_digits():
    assert rec.micro_time(0) == "1970-01-01T00:00:00.000000Z"
    assert rec.micro_time(T0 + 1_000) == "2024-06-10T06:13:20.123457Z"


def test_a_burst_of_repeats_is_one_event_with_a_series(api, tmp_path):
    """1,000 repeats of one (object, reason): one POST, a PATCH of the series, and the final
    count by the end; another object or reason is an Event of its own."""
    clock = [T0]
    r = make(api, tmp_path, now=lambda: clock[0])
    for i in range(1000):
        clock[0] = T0 + i * 1000
        assert r.record(SVC_REF, "ServicePortQuarantined", "SyncProxyRules", "refused #%d" % i)
    other = dict(SVC_REF, fieldPath="spec.ports{https}")
    r.record(other, "ServicePortQuarantined", "SyncProxyRules", "refused")
    assert r.flush(10)
    r.stop()
    posts, patches = api.bodies("POST"), api.bodies("PATCH")
    assert len(posts) == 2 and len(patches) <= 2, api.requests
    first = posts[0]
    assert first["note"] == "refused #0" and first["regarding"] == SVC_REF
    # every write after the first carries the count so far; the last one all 1,000
    (stored,) = [e for (ns, name), e in api.events.items() if name == first["metadata"]["name"]]
    assert stored["series"] == {"count": 1000, "lastObservedTime": rec.micro_time(T0 + 999 * 1000)}
    for patch in patches:
        assert set(patch) == {"series"} and set(patch["series"]) == {"count", "lastObservedTime"}
    assert {r["headers"]["content-type"] for r in api.requests if r["method"] == "PATCH"} \
        <= {"application/strategic-merge-patch+json"}
    assert all(r["path"] == "/apis/events.k8s.io/v1/namespaces/default/events/" + first["metadata"]["name"]
               for r in api.requests if r["method"] == "PATCH")
    assert posts[1]["regarding"]["fieldPath"] == "spec.ports{https}"
    stats = r.stats()
    assert stats["recorded"] == 1001 and stats["aggregated"] == 999 and stats["created"] == 2
    assert stats["failed"] == stats["dropped"] == 0


def test_repeats_after_the_first_are_patched_at_most_once_per_interval(api, tmp_path):
    r = make(api, tmp_path, patch_interval=3600, sweep_period=0.05)
    r.record(SVC_REF, "R", "A", "n")
    assert r.flush(10)
    for _ in range(50):
        r.record(SVC_REF, "R", "A", "n")
        time.sleep(0.002)
    time.sleep(0.3)          # many sweeps: none may write, the interval has not passed
    assert [q["method"] for q in api.requests] == ["POST", "PATCH"]
    assert api.requests[1]["body"]["series"]["count"] == 2      # the first repeat at once
    assert r.flush(10)       # forced: the count so far
    assert api.requests[-1]["body"]["series"]["count"] == 51
    r.stop()


def test_a_series_ends_after_its_window_and_the_next_occurrence_is_a_new_event(api, tmp_path):
    clock = [T0]
    r = make(api, tmp_path, series_window=0.2, sweep_period=0.05, now=lambda: clock[0])
    r.record(SVC_REF, "R", "A", "n")
    assert r.flush(10)
    time.sleep(0.5)         # the window passes: the series is forgotten
    clock[0] = T0 + 10**9
    r.record(SVC_REF, "R", "A", "n")
    assert r.flush(10)
    r.stop()
    names = [b["metadata"]["name"] for b in api.bodies("POST")]
    assert names == ["web.%x" % T0, "web.%x" % (T0 + 10**9)]


def test_a_stuck_server_never_blocks_record(api, tmp_path, caplog):
    api.answers = ["stuck"] * 10
    r = make(api, tmp_path, queue_size=100, timeout=(0.5, 0.5), max_attempts=1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "podnet.kube.recorder"):
        results = [r.record(rec.object_reference("Service", "default", "s%d" % i), "R", "A", "n")
                   for i in range(5000)]
        took = time.monotonic() - started
        assert took < 2.0, took                 # 5,000 calls; each one microseconds
        # the queue's 100, and the few the worker took out while the calls ran
        assert 100 <= results.count(True) < 200 and r.stats()["dropped"] == results.count(False)
        stop_started = time.monotonic()
        r.stop(timeout=1.0)
        assert time.monotonic() - stop_started < 2.0
    drops = [m for m in caplog.messages if m.startswith("dropping Event")]
    assert len(drops) == 1 and "the queue is full" in drops[0], drops        # rate-limited
    assert not r.record(SVC_REF, "R", "A", "n")                              # stopped


def test_a_failing_server_is_retried_with_backoff_then_given_up_and_logged_rate_limited(api, tmp_path, caplog):
    api.answers = [500] * 100
    r = make(api, tmp_path, max_attempts=3, retry_delay=0.05, sweep_period=0.02)
    with caplog.at_level(logging.WARNING, "podnet.kube.recorder"):
        for i in range(20):
            assert r.record(rec.object_reference("Service", "default", "s%d" % i), "R", "A", "n")
        deadline = time.monotonic() + 10
        while r.stats()["failed"] < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        r.stop()
    stats = r.stats()
    assert stats["failed"] == 20 and stats["retried"] == 40 and stats["created"] == 0
    assert len(api.requests) == 60
    errors = [m for m in caplog.messages if m.startswith("could not create")]
    assert len(errors) == 1 and "HTTP 500 scripted 500" in errors[0], errors


def test_a_refusal_is_not_retried_and_repeats_of_it_cost_no_requests(api, tmp_path):
    api.answers = [403]
    r = make(api, tmp_path)
    for _ in range(10):
        r.record(SVC_REF, "R", "A", "n")
    assert r.flush(10)
    r.stop()
    assert len(api.requests) == 1 and r.stats()["failed"] == 1


def test_an_unreachable_server_and_a_server_that_lost_the_event(api, tmp_path):
    r = rec.EventRecorder("kube-proxy", "kube-proxy-node1", timeout=(0.2, 0.2), max_attempts=2,
                          retry_delay=0.01, sweep_period=0.02,
                          kubeconfig=EventsApi.kubeconfig(type("Dead", (), {"url": "http://127.0.0.1:9"})(),
                                                          str(tmp_path)))
    r.record(SVC_REF, "R", "A", "n")
    deadline = time.monotonic() + 10
    while r.stats()["failed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    r.stop()
    assert r.stats()["failed"] == 1 and r.stats()["retried"] == 1

    # The API dropped the Event (they live an hour): the next count is posted again, whole.
    r = make(api, tmp_path)
    r.record(SVC_REF, "R", "A", "n")
    assert r.flush(10)
    api.events.clear()
    r.record(SVC_REF, "R", "A", "n")
    assert r.flush(10)
    r.stop()
    assert [q["method"] for q in api.requests] == ["POST", "PATCH", "POST"]
    assert api.requests[2]["body"]["series"]["count"] == 2
    assert api.requests[2]["body"]["metadata"] == api.requests[0]["body"]["metadata"]


def test_object_uids_follow_the_event_stream():
    uids = rec.ObjectUids(("Service",))
    svc = k8s.service("web", "10.96.0.10", [HTTP])
    svc["metadata"]["uid"] = "u-1"
    uids.apply(Event(RELIST, "Service", [svc]))
    uids.apply(Event(ADDED, "EndpointSlice", k8s.endpoint_slice("web", [], [])))
    assert uids.reference("Service", "default", "web") == {"apiVersion": "v1", "kind": "Service",
                                                           "namespace": "default", "name": "web", "uid": "u-1"}
    uids.apply(Event(DELETED, "Service", svc))
    assert uids.uid("Service", "default", "web") == ""
    assert uids.reference("Service", "default", "web", "spec.ports{http}")["fieldPath"] == "spec.ports{http}"


# ---- kube-proxy: a quarantined port becomes an Event about its Service -------------------------

def test_the_sync_loop_records_an_event_for_a_quarantined_service_port(api, tmp_path):
    import test_kube_proxy_isolation as iso

    kernel = iso.FakeTables()
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    recorder = make(api, tmp_path)
    srv = server.ProxyServer(iso.ipt_proxier(kernel), t, lambda emit: None, km.Metrics(), recorder)
    svcs, slices = iso.objects(4, bad={2})
    for i, svc in enumerate(svcs):
        svc["metadata"]["uid"] = "uid-svc%d" % i
    srv._take(Event(RELIST, "Service", svcs))      # as the API source hands them over
    srv._take(Event(RELIST, "EndpointSlice", slices))
    result = srv.sync_once()
    assert [str(q) for q in result.quarantined] == ["default/svc2:http (TCP)"]
    assert recorder.flush(10)
    (body,) = api.bodies("POST")
    assert body["regarding"] == {"apiVersion": "v1", "kind": "Service", "namespace": "default", "name": "svc2",
                                 "uid": "uid-svc2", "fieldPath": "spec.ports{http}"}
    assert (body["reason"], body["action"], body["type"]) == ("ServicePortQuarantined", "SyncProxyRules", "Warning")
    assert body["reportingController"] == "kube-proxy" and body["reportingInstance"] == "kube-proxy-node1"
    assert body["note"].startswith("kube-proxy (iptables mode) on node node1: the kernel refused the rules of "
                                   "port http/TCP: iptables-restore v1.8.9"), body["note"]
    assert body["note"].endswith("; it has no rules until the Service or its endpoints change")

    # The same port refused again after its endpoints changed: the same Event, counted.
    iso.set_endpoints(t, 2, "10.244.1.9", iso.POISON)
    assert [str(q) for q in srv.sync_once().quarantined] == ["default/svc2:http (TCP)"]
    assert recorder.flush(10)
    recorder.stop()
    assert len(api.bodies("POST")) == 1
    assert api.bodies("PATCH")[-1]["series"]["count"] == 2


def test_without_a_recorder_the_sync_loop_only_logs(caplog):
    import test_kube_proxy_isolation as iso
    srv = server.ProxyServer(iso.ipt_proxier(iso.FakeTables()), iso.tracker(3, bad={1}), lambda emit: None)
    assert srv.uids is None and srv.sync_once().quarantined
