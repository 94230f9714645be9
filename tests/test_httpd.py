"""podnet/httpd.py over real HTTP on loopback (port 0: a free port the test's own process binds)."""
import http.client
import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from podnet import httpd


@pytest.fixture
def running():
    servers = []

    def start(routes, host="127.0.0.1"):
        server = httpd.serve((host, 0), routes, name="test")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def request(server, path, method="GET"):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def test_parse_address_forms():
    assert httpd.parse_address("", 10249) is None
    assert httpd.parse_address("0", 10249) is None
    assert httpd.parse_address("127.0.0.1:10249", 1) == ("127.0.0.1", 10249)
    assert httpd.parse_address(":9091", 1) == ("0.0.0.0", 9091)
    assert httpd.parse_address("[::1]:9000", 1) == ("::1", 9000)
    assert httpd.parse_address("[::]", 9000) == ("::", 9000)
    assert httpd.parse_address("::1", 9000) == ("::1", 9000)
    assert httpd.parse_address("localhost", 10256) == ("localhost", 10256)
    assert httpd.parse_address("10.0.0.1", 10256) == ("10.0.0.1", 10256)
    for bad in ("1.2.3.4:http", "1.2.3.4:70000", "[::1", "[::1]x", "1.2.3.4:-1"):
        with pytest.raises(ValueError):
            httpd.parse_address(bad, 1)


def test_routes_get_head_404_and_query_string(running):
    server = running({"/hello": lambda: (200, "text/plain", b"hi\n")})
    assert request(server, "/hello") == (200, "text/plain", b"hi\n")
    assert request(server, "/hello?x=1") == (200, "text/plain", b"hi\n")
    status, _, body = request(server, "/hello", "HEAD")
    assert (status, body) == (200, b"")
    assert request(server, "/nope")[0] == 404
    assert request(server, "/hello", "POST")[0] == 501      # only GET and HEAD


def test_a_failing_handler_answers_500_and_the_rest_keep_serving(running):
    def broken():
        raise RuntimeError("boom")
    server = running({"/broken": broken, "/ok": lambda: (200, "text/plain", b"ok\n")})
    status, _, body = request(server, "/broken")
    assert status == 500 and b"boom" in body
    assert request(server, "/ok")[0] == 200


def test_health_handler(running):
    state = {"ok": True}
    server = running({"/healthz": httpd.health_handler(lambda: (state["ok"], "" if state["ok"] else "no peers"))})
    assert request(server, "/healthz")[::2] == (200, b"ok\n")
    state["ok"] = False
    assert request(server, "/healthz")[::2] == (503, b"no peers\n")


def test_metrics_handler_exposes_its_registry(running):
    registry = CollectorRegistry()
    Counter("demo_things", "Things seen", registry=registry).inc(3)
    server = running({"/metrics": httpd.metrics_handler(registry)})
    status, content_type, body = request(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["demo_things"].type == "counter"
    assert [s.value for s in families["demo_things"].samples if s.name == "demo_things_total"] == [3.0]


def test_bind_failure_raises_oserror(running):
    server = running({})
    with pytest.raises(OSError):
        httpd.serve(server.server_address[:2], {})


def test_ipv6_loopback(running):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    server = running({"/x": lambda: (200, "text/plain", b"6\n")}, host="::1")
    assert request(server, "/x")[2] == b"6\n"


def test_a_silent_client_is_dropped_and_others_are_served_meanwhile(running, monkeypatch):
    monkeypatch.setattr(httpd._RequestHandler, "timeout", 0.5)
    server = running({"/x": lambda: (200, "text/plain", b"x\n")})
    silent = socket.create_connection(server.server_address[:2], timeout=5)
    try:
        assert request(server, "/x")[0] == 200          # not queued behind the silent one
        started = time.monotonic()
        assert silent.recv(1) == b""                     # the server hung up on it
        assert time.monotonic() - started < 3
    finally:
        silent.close()
    assert threading.active_count() < 50
