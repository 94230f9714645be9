"""The Ingress controller end to end: real nginx, real traffic, all in namespaces.

One module-wide lab:
- an underlay (192.168.60.0/24) with the "ingress" node (.1: host networking,
  where the controller and its nginx run) and an outside "client" (.2);
- a pod network (10.244.1.0/24, its own switch) joining the node (pods0,
  .1) and backend "pods": namespaces running a small HTTP server that answers
  with its own name, the path and the forwarding headers it got;
- a manifests directory with Services, EndpointSlices, TLS Secrets (self-
  signed certificates made with openssl) and Ingresses, which the controller
  (`python -m ingress.controller --manifests ...`, started in the
  ingress node) follows.

nginx never runs outside the ingress node's namespace: the controller starts
it there, and `nginx -t` runs there too. Every process is the lab's or the
controller's; the last test stops the controller by PID and checks that the
nginx master it started is gone. Lab cleanup removes the namespaces however
the tests end.
"""
import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lab.cluster import Lab

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 20
NODE_IP = "192.168.60.1"

SERVER = """
import json, sys, time, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, port = sys.argv[1], int(sys.argv[2])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.path.startswith("/slow"):
            q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            time.sleep(int(q.get("ms", ["500"])[0]) / 1000)
        body = json.dumps({"pod": name, "path": self.path, "host": self.headers.get("Host"),
                           "xff": self.headers.get("X-Forwarded-For"), "xfp": self.headers.get("X-Forwarded-Proto"),
                           "xri": self.headers.get("X-Real-IP")}).encode()
        self.answer(body)
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        self.answer(json.dumps({"pod": name, "path": self.path, "received": len(data)}).encode())
    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("0.0.0.0", port), H)
print("ready", flush=True)
server.serve_forever()
"""

CLIENT = """
import http.client, json, socket, ssl, sys, threading
node, requests, cafile = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
out = [None] * len(requests)
def one(i, r):
    cn = None
    try:
        if r.get("sni") is not None:
            ctx = ssl.create_default_context(cafile=cafile)
            sock = socket.create_connection((node, 443), timeout=5)
            tls = ctx.wrap_socket(sock, server_hostname=r["sni"])
            cn = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
            conn = http.client.HTTPConnection(node, 443, timeout=5)
            conn.sock = tls
        else:
            conn = http.client.HTTPConnection(node, 80, timeout=5)
        if r.get("body"):
            conn.request("POST", r["path"], body=b"x" * r["body"], headers={"Host": r["host"]})
        else:
            conn.request("GET", r["path"], headers={"Host": r["host"]})
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        try:
            body = json.loads(body)
        except ValueError:
            pass
        out[i] = {"status": resp.status, "body": body, "cn": cn}
    except Exception as e:
        out[i] = {"error": "%s: %s" % (type(e).__name__, e), "cn": cn}
threads = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(requests)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""

# Requests without pause from several threads, each on a new connection, until the stop file
# appears; thread 0 sends slow ones (the backend waits 700 ms), so requests are in flight
# whenever a reload happens.
LOOP = """
import http.client, json, os, sys, threading, time
node, host, stop, nthreads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
pods, failures, slow_ok = {}, [], [0]
lock = threading.Lock()
end = time.monotonic() + 30
def run(slow):
    while time.monotonic() < end and not os.path.exists(stop):
        try:
            conn = http.client.HTTPConnection(node, 80, timeout=10)
            conn.request("GET", "/slow?ms=700" if slow else "/", headers={"Host": host})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status != 200:
                raise RuntimeError("HTTP %d %r" % (resp.status, body[:80]))
            pod = json.loads(body)["pod"]
            with lock:
                pods[pod] = pods.get(pod, 0) + 1
                slow_ok[0] += slow
        except Exception as e:
            with lock:
                failures.append("%.3f %s: %s" % (time.monotonic(), type(e).__name__, e))
threads = [threading.Thread(target=run, args=(i == 0,)) for i in range(nthreads)]
for t in threads:
    t.start()
print("started", flush=True)
for t in threads:
    t.join()
print(json.dumps({"pods": pods, "failures": failures, "slow_ok": slow_ok[0]}), flush=True)
"""

# ---- manifests -------------------------------------------------------------------------------

PODS = {"web-1": "web", "web-2": "web", "web-3": "web", "api-1": "api", "v2-1": "api-v2", "exact-1": "exact",
        "wild-1": "wild", "default-1": "default", "secure-1": "secure"}
SERVICES = ["web", "api", "api-v2", "exact", "wild", "default", "secure", "empty"]
POD_PORT = 8080


def service(name):
    port = {"name": "http", "port": 80, "targetPort": POD_PORT}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": "10.96.0.%d" % (10 + SERVICES.index(name)), "ports": [port]}}


def endpoint_slice(name, ips):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name + "-abcde", "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": POD_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def backend(svc, port=80):
    return {"service": {"name": svc, "port": {"number": port} if isinstance(port, int) else {"name": port}}}


def prefix(p, svc, path_type="Prefix", port=80):
    return {"path": p, "pathType": path_type, "backend": backend(svc, port)}


def ingress(name, rules=None, **spec):
    spec = dict(spec)
    spec.setdefault("ingressClassName", "podnet")
    if rules is not None:
        spec["rules"] = rules
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": name}, "spec": spec}


INGRESSES = [
    ingress("shop", [{"host": "shop.example.com", "http": {"paths": [
        prefix("/", "web"),
        prefix("/api", "api", port="http"),             # by the Service port's name
        prefix("/api/v2", "api-v2"),
        prefix("/api/v2", "exact", "Exact"),
        prefix("/empty", "empty"),
    ]}}], tls=[{"hosts": ["shop.example.com"], "secretName": "shop-tls"}]),
    ingress("wild", [{"host": "*.wild.example.com", "http": {"paths": [prefix("/", "wild")]}}]),
    ingress("secure", [{"host": "secure.example.com", "http": {"paths": [prefix("/", "secure")]}}],
            tls=[{"hosts": ["secure.example.com"], "secretName": "secure-tls"}]),
    ingress("a-default", defaultBackend=backend("default")),
    ingress("bad", [{"host": "bad.example.com", "http": {"paths": [prefix("/x", "web", "Regex")]}}]),
    ingress("theirs", [{"host": "theirs.example.com", "http": {"paths": [prefix("/", "web")]}}],
            ingressClassName="other"),
]


def tls_secret(name, crt, key):
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": name},
            "data": {"tls.crt": base64.b64encode(crt).decode(), "tls.key": base64.b64encode(key).decode()}}


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def make_cert(directory, cn):
    key, crt = os.path.join(directory, cn + ".key"), os.path.join(directory, cn + ".crt")
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", key, "-out", crt, "-subj", "/CN=" + cn, "-addext", "subjectAltName=DNS:" + cn,
                    "-days", "1"], check=True, capture_output=True)
    with open(crt, "rb") as f, open(key, "rb") as g:
        return f.read(), g.read(), crt


# ---- the lab -----------------------------------------------------------------------------------

class IngressLab:
    def __init__(self, lab):
        self.lab = lab
        # nginx's workers (user nobody) write request bodies to <state>/tmp: let them through
        # the lab's private workdir (o+x only; its listing stays private).
        os.chmod(lab.workdir, 0o711)
        underlay = lab.underlay("192.168.60.0/24")
        self.node = lab.node("ingress", underlay, ip=NODE_IP)
        self.client = lab.node("client", underlay)
        pods = lab.underlay("10.244.1.0/24", name="podnet")
        pods.attach(self.node, "10.244.1.1", ifname="pods0")
        self.pod_ip, self.servers = {}, {}
        for pod in PODS:
            ns = lab.namespace("pod-" + pod)
            self.pod_ip[pod] = pods.attach(ns)
            self.servers[pod] = ns.popen([sys.executable, "-c", SERVER, pod, str(POD_PORT)],
                                         stdout=subprocess.PIPE, text=True)
        for pod, proc in self.servers.items():
            assert proc.stdout.readline().strip() == "ready", pod
        self.manifests = os.path.join(lab.workdir, "manifests")
        self.state = os.path.join(lab.workdir, "state")
        self.log_path = os.path.join(lab.workdir, "controller.log")
        certs = os.path.join(lab.workdir, "certs")
        os.makedirs(self.manifests)
        os.makedirs(certs)
        shop_crt, shop_key, shop_pem = make_cert(certs, "shop.example.com")
        secure_crt, secure_key, secure_pem = make_cert(certs, "secure.example.com")
        self.cafile = os.path.join(certs, "trust.pem")
        with open(self.cafile, "wb") as f:
            f.write(shop_crt + secure_crt)
        write_json(os.path.join(self.manifests, "services.json"),
                   {"kind": "List", "items": [service(s) for s in SERVICES]})
        self.slices = {s: [ip for pod, ip in self.pod_ip.items() if PODS[pod] == s and pod != "web-3"]
                       for s in SERVICES}
        self.write_slices()
        write_json(os.path.join(self.manifests, "secrets.json"),
                   {"kind": "SecretList", "items": [tls_secret("shop-tls", shop_crt, shop_key),
                                                    tls_secret("secure-tls", secure_crt, secure_key)]})
        for ing in INGRESSES:
            write_json(os.path.join(self.manifests, "ingress-%s.json" % ing["metadata"]["name"]), ing)
        with open(self.log_path, "w") as log:
            self.controller = self.node.popen(
                [sys.executable, "-m", "ingress.controller", "--manifests", self.manifests,
                 "--state-dir", self.state, "--poll-interval", "0.1", "--debounce", "0.05",
                 "--min-sync-interval", "0.2", "--workers", "2"],
                stdout=log, stderr=subprocess.STDOUT, cwd=SOURCE_ROOT, env=dict(os.environ, PYTHONPATH=SOURCE_ROOT))
        self.wait(lambda: (self.status() or {}).get("config"), "the controller to start nginx")

    def write_slices(self):
        write_json(os.path.join(self.manifests, "slices.json"),
                   {"kind": "List", "items": [endpoint_slice(s, ips) for s, ips in self.slices.items()]})

    def status(self):
        try:
            with open(os.path.join(self.state, "status.json")) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def wait(self, cond, what, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while not cond():
            if self.controller.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %s; controller log:\n%s" % (what, self.log()[-4000:]))
            time.sleep(0.05)

    def requests(self, requests):
        out = self.client.run([sys.executable, "-c", CLIENT, NODE_IP, json.dumps(requests), self.cafile],
                              timeout=TIMEOUT)
        return json.loads(out.stdout)


@pytest.fixture(scope="module")
def ing(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        yield IngressLab(lab)


def pod_of(result):
    assert "error" not in result, result
    assert result["status"] == 200, result
    return result["body"]["pod"]


# ---- tests -------------------------------------------------------------------------------------

ROUTING = [
    # host, path, the pod (or service) that must answer
    ("shop.example.com", "/", "web"),
    ("shop.example.com", "/apix", "web"),               # Prefix /api is element-wise
    ("shop.example.com", "/api", "api-1"),              # backend port given by name
    ("shop.example.com", "/api/", "api-1"),
    ("shop.example.com", "/api/v1/users", "api-1"),
    ("shop.example.com", "/api/v2", "exact-1"),         # Exact over Prefix of the same path
    ("shop.example.com", "/api/v2/", "v2-1"),           # the longest Prefix
    ("shop.example.com", "/api/v2/users?x=1", "v2-1"),
    ("shop.example.com", "/api/v22", "api-1"),
    ("SHOP.example.com:80", "/api/v2/x", "v2-1"),
    ("a.wild.example.com", "/anything", "wild-1"),      # wildcard host
    ("b-2.wild.example.com", "/", "wild-1"),
    ("a.b.wild.example.com", "/", "default-1"),         # a wildcard is one label: the default backend
    ("wild.example.com", "/", "default-1"),
    ("secure.example.com", "/s", "secure-1"),
    ("unknown.example.com", "/", "default-1"),
    ("bad.example.com", "/x", "default-1"),             # the bad Ingress is skipped
    ("theirs.example.com", "/", "default-1"),           # another controller's Ingress
]


def test_hosts_and_paths_reach_the_right_pods(ing):
    results = ing.requests([{"host": h, "path": p} for h, p, _ in ROUTING])
    for (host, path, want), result in zip(ROUTING, results):
        got = pod_of(result)
        if want == "web":
            assert got in ("web-1", "web-2"), (host, path, result)
        else:
            assert got == want, (host, path, result)
        assert result["body"]["path"] == path
    # the forwarding headers
    body = results[2]["body"]
    assert body["host"] == "shop.example.com" and body["xfp"] == "http"
    assert body["xff"] == ing.client.underlay_ip and body["xri"] == ing.client.underlay_ip
    assert results[9]["body"]["host"] == "SHOP.example.com:80"
    # round robin over both ready endpoints of web
    spread = ing.requests([{"host": "shop.example.com", "path": "/"} for _ in range(8)])
    assert {pod_of(r) for r in spread} == {"web-1", "web-2"}


def test_service_without_endpoints_answers_503(ing):
    (empty,) = ing.requests([{"host": "shop.example.com", "path": "/empty/x"}])
    assert empty["status"] == 503
    assert "Service default/empty:80 has no ready endpoints" in json.dumps(ing.status()["warnings"])


def test_large_request_body_is_buffered_and_passed(ing):
    (result,) = ing.requests([{"host": "shop.example.com", "path": "/api/upload", "body": 300000}])
    assert pod_of(result) == "api-1" and result["body"]["received"] == 300000
    assert "cannot enter" not in ing.log()


def test_https_sni_picks_the_certificate(ing):
    results = ing.requests([
        {"host": "secure.example.com", "sni": "secure.example.com", "path": "/tls"},
        {"host": "shop.example.com", "sni": "shop.example.com", "path": "/api/v2"},
        {"host": "a.wild.example.com", "sni": "a.wild.example.com", "path": "/"},   # no certificate for it
        {"host": "nobody.example.com", "sni": "nobody.example.com", "path": "/"},
    ])
    assert results[0]["cn"] == "secure.example.com" and pod_of(results[0]) == "secure-1"
    assert results[0]["body"]["xfp"] == "https"
    assert results[1]["cn"] == "shop.example.com" and pod_of(results[1]) == "exact-1"
    for r in results[2:]:                                 # the default server refuses the handshake
        assert r["cn"] is None and "SSL" in r["error"], r
    # the certificates nginx reads are private copies in the state directory
    certs = os.path.join(ing.state, "certs")
    assert oct(os.stat(certs).st_mode & 0o777) == "0o700"
    assert all(os.stat(os.path.join(certs, f)).st_mode & 0o777 == 0o600 for f in os.listdir(certs))


def test_bad_ingress_is_logged_and_skipped_while_others_work(ing):
    log = ing.log()
    assert ("skipping Ingress default/bad: spec.rules[0].http.paths[0].pathType: 'Regex' is not Exact, "
            "Prefix or ImplementationSpecific") in log
    assert ing.status()["ingresses"]["default/bad"].startswith("invalid: ")
    # one more, added while running: skipped with its reason, nothing else disturbed
    write_json(os.path.join(ing.manifests, "ingress-bad2.json"),
               ingress("bad2", [{"host": "shop.example.com", "http": {"paths": [
                   {"path": "/nobackend", "pathType": "Prefix"}]}}]))
    ing.wait(lambda: "default/bad2" in (ing.status() or {}).get("ingresses", {}), "the controller to see bad2")
    assert ("skipping Ingress default/bad2: spec.rules[0].http.paths[0].backend: missing") in ing.log()
    results = ing.requests([{"host": "shop.example.com", "path": "/nobackend"},
                            {"host": "shop.example.com", "path": "/api/v2"}])
    assert pod_of(results[0]) in ("web-1", "web-2") and pod_of(results[1]) == "exact-1"
    os.unlink(os.path.join(ing.manifests, "ingress-bad2.json"))


def test_new_endpoint_reloads_nginx_without_dropping_requests(ing):
    before = ing.status()
    stop = os.path.join(ing.lab.workdir, "stop-loop")
    loop = ing.client.popen([sys.executable, "-c", LOOP, NODE_IP, "shop.example.com", stop, "6"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert loop.stdout.readline().strip() == "started"
        time.sleep(0.8)
        ing.slices["web"].append(ing.pod_ip["web-3"])
        ing.write_slices()
        ing.wait(lambda: (ing.status() or {}).get("config") not in (None, before["config"]), "a reload")
        time.sleep(1.0)                                    # traffic on the new configuration too
    finally:
        open(stop, "w").close()
    out, _ = loop.communicate(timeout=TIMEOUT)
    ing.client.processes.remove(loop)                      # reaped: cleanup must not signal its pid again
    after = ing.status()
    assert after["reloads"] > before["reloads"] and after["nginx_pid"] == before["nginx_pid"]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["failures"] == [], result
    assert result["slow_ok"] >= 2                          # slow requests spanned the reload
    assert set(result["pods"]) == {"web-1", "web-2", "web-3"}, result
    assert sum(result["pods"].values()) > 50


def test_metrics_and_health_of_the_running_controller(ing):
    """--healthz-port 10254 (its default): ingress-nginx's reload metrics from a real nginx."""
    from prometheus_client.parser import text_string_to_metric_families

    def get(path):
        out = ing.node.run(["curl", "-s", "-m", "2", "-w", "\\n%{http_code}", "http://127.0.0.1:10254" + path],
                           check=False).stdout
        body, _, status = out.rpartition("\n")
        return int(status) if status.isdigit() else 0, body
    assert get("/healthz") == (200, "ok\n") and get("/readyz") == (200, "ok\n")
    status, body = get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    running = ing.status()

    def one(name):
        [sample] = [s for s in families[name].samples if s.name == name]
        return sample.value
    assert one("nginx_ingress_controller_config_hash") == int(running["config"][:13], 16)
    assert one("nginx_ingress_controller_config_last_reload_successful") == 1
    assert one("nginx_ingress_controller_success") == running["reloads"] + 1      # its start, then reloads
    assert one("podnet_ingress_config_size_bytes") == os.path.getsize(os.path.join(ing.state, "nginx.conf"))


def test_stopping_the_controller_stops_its_nginx(ing):
    pid = ing.status()["nginx_pid"]
    os.kill(pid, 0)                                        # runs now
    ing.controller.send_signal(signal.SIGTERM)
    assert ing.controller.wait(TIMEOUT) == 0
    ing.node.processes.remove(ing.controller)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "nginx (pid %d) stopped" % pid in ing.log()
    left = subprocess.run(["ip", "netns", "pids", ing.node.name], capture_output=True, text=True).stdout.split()
    assert left == []                                      # nothing of ours is left in the node
