"""A tiny workload for pods in demos and tests: servers that say who they are, and a client that tallies.

    python -m lab.echo serve --name NAME [--port 8080] [--udp-port 8081]
        HTTP: every GET answers "NAME CLIENT_IP:PORT\\n" (the client address as the pod
        sees it, so a test can tell whether the source was kept or masqueraded);
        GET /stream sends a line every 10 ms until the client goes away.
        UDP: every datagram is answered with "NAME CLIENT_IP:PORT\\n".
    python -m lab.echo get URL [--count N] [--timeout S]
        N requests, one new TCP connection each (so each is load-balanced anew);
        prints JSON: {"answers": {NAME: n}, "sources": {CLIENT: n}, "errors": {reason: n}, "seconds": s}.
    python -m lab.echo udp HOST PORT [--count N] [--interval S]
        N datagrams from one socket (one conntrack flow); prints each answer's name ("-" for
        none) on its own line as it comes, so a test can act in the middle of the flow.
"""
import argparse
import http.client
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(name, port=8080, udp_port=None, bind=""):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            who = "%s %s:%d\n" % (name, self.client_address[0], self.client_address[1])
            if self.path.startswith("/stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    seq = 0
                    while True:
                        self.wfile.write(("%d %s" % (seq, who)).encode())
                        self.wfile.flush()
                        seq += 1
                        time.sleep(0.01)
                except OSError:
                    return
            body = who.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    if udp_port:
        def udp_loop():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((bind, udp_port))
            while True:
                _, peer = sock.recvfrom(2048)
                sock.sendto(("%s %s:%d\n" % (name, peer[0], peer[1])).encode(), peer)
        threading.Thread(target=udp_loop, daemon=True).start()
    Server((bind, port), Handler).serve_forever()


def get(url, count=1, timeout=2.0):
    """Tally `count` GETs of url, each on a new connection."""
    host_port, _, path = url.split("://", 1)[-1].partition("/")
    host, _, port = host_port.partition(":")
    answers, sources, errors = {}, {}, {}
    started = time.monotonic()
    for _ in range(count):
        conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout)
        try:
            conn.request("GET", "/" + path, headers={"Connection": "close"})
            text = conn.getresponse().read().decode().split()
            answers[text[0]] = answers.get(text[0], 0) + 1
            source = text[1].rsplit(":", 1)[0]
            sources[source] = sources.get(source, 0) + 1
        except (OSError, http.client.HTTPException, IndexError) as e:
            reason = type(e).__name__ if not isinstance(e, OSError) or not e.strerror else e.strerror
            errors[reason] = errors.get(reason, 0) + 1
        finally:
            conn.close()
    return {"answers": answers, "sources": sources, "errors": errors, "seconds": time.monotonic() - started}


def udp(host, port, count=1, interval=0.1, timeout=1.0, out=sys.stdout):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    for _ in range(count):
        sock.sendto(b"hello", (host, port))
        try:
            name = sock.recv(2048).decode().split()[0]
        except OSError:
            name = "-"
        out.write(name + "\n")
        out.flush()
        time.sleep(interval)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.echo")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--udp-port", type=int, default=0)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--timeout", type=float, default=2.0)
    u = sub.add_parser("udp")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("--count", type=int, default=1)
    u.add_argument("--interval", type=float, default=0.1)
    opts = p.parse_args(argv)
    if opts.cmd == "serve":
        serve(opts.name, opts.port, opts.udp_port)
    elif opts.cmd == "get":
        print(json.dumps(get(opts.url, opts.count, opts.timeout)))
    else:
        udp(opts.host, opts.port, opts.count, opts.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
