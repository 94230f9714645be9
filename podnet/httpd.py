"""The one small HTTP server every daemon uses for /metrics and its health probes.

A route is a path and a handler: a callable taking nothing and answering
(HTTP status, Content-Type, body). `serve` binds (raising OSError when it
cannot, so a daemon can say which flag is wrong), then answers from a daemon
thread, one thread per connection, so a scrape never waits for the daemon's
own loop and the daemon never waits for a scrape. Only GET and HEAD are
answered; a path with no route is 404 (the query string is ignored). Every
request is bounded: a client that sends nothing for REQUEST_TIMEOUT seconds
is dropped, and a handler that raises answers 500 (logged) while every other
route keeps serving.

`metrics_handler` is prometheus_client's exposition of a registry;
`health_handler` turns a check, (healthy, reason), into 200 "ok" or 503 with
the reason, the shape kubelet's HTTP probes read.
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

Handler = Callable[[], tuple[int, str, bytes]]      # -> (HTTP status, Content-Type, body)

log = logging.getLogger("podnet.httpd")

REQUEST_TIMEOUT = 10.0      # seconds a connection may stay silent before it is dropped
TEXT = "text/plain; charset=utf-8"
# what generate_latest writes, and what Prometheus and prometheus_client's own server negotiate
# by default (the library's CONTENT_TYPE_LATEST says version=1.0.0, which 2.x servers do not know)
EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"


def parse_address(text: str, default_port: int) -> tuple[str, int] | None:
    """A bind-address flag -> (host, port), or None when it is "" (disabled; "0" too, as kube-proxy's
    flags allowed). "host:port", ":port" (all IPv4 addresses), "[v6]:port", "[v6]", a bare IPv6
    address or "host" (the default port). ValueError for a port that is not 0..65535."""
    text = text.strip()
    if text in ("", "0"):
        return None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("bad address %r: expected [v6]:port" % text)
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""       # a name, an IPv4 address, or an IPv6 address without brackets
    if not port:
        number = default_port
    elif port.isdigit() and int(port) <= 65535:
        number = int(port)
    else:
        raise ValueError("bad port in address %r" % text)
    return host or "0.0.0.0", number


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Handler]


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "podnet"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        handler = self.server.routes.get(self.path.split("?", 1)[0])
        if handler is None:
            status, content_type, body = 404, TEXT, b"not found\n"
        else:
            try:
                status, content_type, body = handler()
            except Exception as err:    # one broken route must not take the others (or the thread) down
                log.exception("%s: handler for %s failed", self.server.server_address, self.path)
                status, content_type, body = 500, TEXT, ("internal error: %s\n" % err).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)   # access logs would drown the daemon's


def serve(address: tuple[str, int], routes: Mapping[str, Handler], name: str = "httpd") -> ThreadingHTTPServer:
    """Bind `address` (OSError when it cannot) and answer `routes` from a daemon thread named
    `name`. The caller stops it with .shutdown() then .server_close(); .server_address has the
    bound port (port 0 binds any free one)."""
    server_class = _IPv6Server if ":" in address[0] else _Server
    server = server_class(address, _RequestHandler)
    server.routes = dict(routes)
    threading.Thread(target=server.serve_forever, name="%s-%s" % (name, server.server_address[1]),
                     daemon=True).start()
    return server


def metrics_handler(registry: CollectorRegistry | None = None) -> Handler:
    """prometheus_client's text exposition (format 0.0.4) of `registry` (the global REGISTRY by default)."""
    from prometheus_client import REGISTRY, disable_created_metrics, generate_latest

    # the *_created series (OpenMetrics' creation times) are in no upstream daemon's output and
    # double the lines of every counter and histogram; the switch is process-wide
    disable_created_metrics()
    chosen = REGISTRY if registry is None else registry

    def handle() -> tuple[int, str, bytes]:
        return 200, EXPOSITION, generate_latest(chosen)
    return handle


def health_handler(check: Callable[[], tuple[bool, str]]) -> Handler:
    """200 "ok" while check() says healthy, 503 with its reason when not."""
    def handle() -> tuple[int, str, bytes]:
        healthy, reason = check()
        if healthy:
            return 200, TEXT, b"ok\n"
        return 503, TEXT, ((reason or "unhealthy").rstrip("\n") + "\n").encode()
    return handle
