"""ingress.controller without root and without a real nginx.

A stand-in `nginx` (a small Python script) plays the binary: `-t` accepts any
configuration except one naming the host reject.example.com, and the
foreground mode records its start and every SIGHUP (with the hash of the
nginx.conf it would load) in a log, until SIGQUIT/SIGTERM. The real nginx,
which binds its ports even for `-t`, only ever runs in network namespaces:
netns_tests/test_ingress.py.
"""
import base64
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from ingress import controller as ctl
from ingress import render
from podnet.kube.events import Event
from tests.test_ingress_model import ingress, path, rule

FAKE_NGINX = textwrap.dedent("""\
    #!%s
    import hashlib, os, signal, sys, time
    args = sys.argv[1:]
    conf = args[args.index("-c") + 1]
    text = open(conf).read()
    if "-t" in args:
        if "reject.example.com" in text:
            sys.stderr.write("nginx: [emerg] pretend failure in %%s:1\\n" %% conf)
            sys.exit(1)
        sys.exit(0)
    state = args[args.index("-p") + 1]
    log = open(os.path.join(state, "fake.log"), "a", buffering=1)
    def digest():
        return hashlib.sha256(open(conf, "rb").read()).hexdigest()[:8]
    signal.signal(signal.SIGHUP, lambda *a: log.write("reload %%s\\n" %% digest()))
    signal.signal(signal.SIGQUIT, lambda *a: (log.write("quit\\n"), sys.exit(0)))
    signal.signal(signal.SIGTERM, lambda *a: (log.write("term\\n"), sys.exit(0)))
    log.write("start %%d %%s\\n" %% (os.getpid(), digest()))
    while True:
        time.sleep(1)
""") % sys.executable


def service(name, ns="shop", port=80, port_name="http"):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": port_name, "port": port, "targetPort": 8080}]}}


def slice_(service_name, ips, ns="shop", port_name="http"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": service_name + "-x", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "ports": [{"name": port_name, "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def web_ingress(host="web.example.com", name="web", **kw):
    return ingress(name, [rule(host, path("/", "web"))], ingressClassName="podnet", **kw)


def relists(**objs):
    out = []
    for kind in ("Service", "EndpointSlice", "Ingress", "IngressClass", "Secret"):
        out.append(Event("RELIST", kind, objs.get(kind, [])))
    return out


@pytest.fixture
def fake_nginx(tmp_path):
    path = tmp_path / "nginx"
    path.write_text(FAKE_NGINX)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def controller(tmp_path, fake_nginx):
    c = ctl.IngressController(render.Options(str(tmp_path / "state"), status_port=0), nginx_binary=fake_nginx,
                              debounce=0, min_sync_interval=0, stop_grace=2)
    c.prepare()
    yield c
    c.nginx.stop()


def fake_log(c):
    try:
        with open(os.path.join(c.state_dir, "fake.log")) as f:
            return f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []


def wait_for(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def feed(c, *events):
    for e in events:
        c.enqueue(e)
    c.run_once(0)


def status(c):
    with open(os.path.join(c.state_dir, "status.json")) as f:
        return json.load(f)


def test_start_reload_unchanged_rejected_and_stop(controller, caplog):
    c = controller
    feed(c, *relists(Service=[service("web")], EndpointSlice=[slice_("web", ["10.244.1.2"])])[:4])
    assert c.syncs == 0 and c.nginx.proc is None            # Secrets not listed yet: no sync
    feed(c, Event("RELIST", "Secret", []))                  # all listed: no Ingress yet is a config too
    assert c.syncs == 1 and c.nginx.running()
    wait_for(lambda: fake_log(c))
    pid = c.nginx.pid
    assert fake_log(c)[0].startswith("start %d" % pid)
    st = status(c)
    assert st["config"] == c.running_hash and st["nginx_pid"] == pid
    with open(os.path.join(c.state_dir, "nginx.conf")) as f:
        assert c.running_hash in f.read()
    assert not os.path.exists(os.path.join(c.state_dir, "nginx.conf.candidate"))

    feed(c, Event("ADDED", "Ingress", web_ingress()))
    assert c.syncs == 2 and c.reloads == 1
    wait_for(lambda: len(fake_log(c)) == 2)
    assert fake_log(c)[1].startswith("reload ")
    assert status(c)["ingresses"] == {"shop/web": "ok"}

    # the same object again: no sync; a change that renders the same config: a sync, no reload
    feed(c, Event("MODIFIED", "Ingress", web_ingress()))
    assert c.syncs == 2
    svc = service("web")
    svc["metadata"]["labels"] = {"team": "a"}
    feed(c, Event("MODIFIED", "Service", svc))
    assert c.syncs == 3 and c.reloads == 1

    # nginx -t refuses the candidate: the running configuration stays, the reason is logged
    running = c.running_hash
    with caplog.at_level(logging.ERROR):
        feed(c, Event("ADDED", "Ingress", web_ingress("reject.example.com", "rej")))
    assert c.running_hash == running and c.reloads == 1
    assert "nginx -t rejected configuration" in caplog.text and "pretend failure" in caplog.text
    st = status(c)
    assert st["config"] == running and st["rejected"] and "pretend failure" in st["last_error"]
    with open(os.path.join(c.state_dir, "nginx.conf")) as f:
        assert "reject.example.com" not in f.read()
    # the refused candidate is not tried again for an unrelated no-op; removing the cause recovers
    feed(c, Event("DELETED", "Ingress", web_ingress("reject.example.com", "rej")))
    assert c.running_hash == running and status(c)["rejected"] is None

    # an endpoint more: reload
    feed(c, Event("MODIFIED", "EndpointSlice", slice_("web", ["10.244.1.2", "10.244.1.3"])))
    assert c.reloads == 2
    with open(os.path.join(c.state_dir, "nginx.conf")) as f:
        assert "server 10.244.1.3:8080" in f.read()

    c.nginx.stop()
    assert c.nginx.proc is None
    wait_for(lambda: fake_log(c)[-1] == "quit")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_bad_ingress_is_skipped_and_others_work(controller, caplog):
    c = controller
    bad = ingress("bad", [rule("bad.example.com", path("/x", "web", "Regex"))], ingressClassName="podnet")
    other = ingress("theirs", [rule("t.example.com", path("/", "web"))], ingressClassName="nginx")
    with caplog.at_level(logging.WARNING):
        feed(c, *relists(Service=[service("web")], EndpointSlice=[slice_("web", ["10.244.1.2"])],
                         Ingress=[web_ingress(), bad, other],
                         IngressClass=[{"metadata": {"name": "nginx"},
                                        "spec": {"controller": "k8s.io/ingress-nginx"}}]))
    assert c.syncs == 1
    ings = status(c)["ingresses"]
    assert ings["shop/web"] == "ok" and ings["shop/theirs"] == "not ours (class nginx)"
    assert ings["shop/bad"].startswith("invalid: spec.rules[0].http.paths[0].pathType: 'Regex'")
    assert caplog.text.count("skipping Ingress shop/bad") == 1
    with open(os.path.join(c.state_dir, "nginx.conf")) as f:
        text = f.read()
    assert "server_name web.example.com;" in text and "bad.example.com" not in text and "t.example.com" not in text
    # parsed once: an unrelated change does not log the bad Ingress again
    feed(c, Event("MODIFIED", "EndpointSlice", slice_("web", ["10.244.1.9"])))
    assert c.syncs == 2 and caplog.text.count("skipping Ingress shop/bad") == 1


def _openssl_cert(tmp_path, cn):
    key, crt = tmp_path / (cn + ".key"), tmp_path / (cn + ".crt")
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(crt), "-subj", "/CN=" + cn, "-days", "1"],
                   check=True, capture_output=True)
    return crt.read_bytes(), key.read_bytes()


def tls_secret(name, crt, key, ns="shop"):
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": ns},
            "data": {"tls.crt": base64.b64encode(crt).decode(), "tls.key": base64.b64encode(key).decode()}}


@pytest.mark.skipif(not os.path.exists("/usr/bin/openssl"), reason="needs openssl")
def test_certificates_are_private_files_and_bad_pairs_are_skipped(controller, tmp_path, caplog):
    c = controller
    crt, key = _openssl_cert(tmp_path, "web.example.com")
    other_crt, other_key = _openssl_cert(tmp_path, "other.example.com")
    ing = web_ingress(tls=[{"hosts": ["web.example.com"], "secretName": "web-tls"}])
    mismatched = web_ingress("mix.example.com", "mix", tls=[{"hosts": ["mix.example.com"], "secretName": "mix-tls"}])
    missing = web_ingress("gone.example.com", "gone", tls=[{"hosts": ["gone.example.com"], "secretName": "nope"}])
    with caplog.at_level(logging.WARNING):
        feed(c, *relists(Service=[service("web")], Ingress=[ing, mismatched, missing],
                         Secret=[tls_secret("web-tls", crt, key), tls_secret("mix-tls", crt, other_key)]))
    certs = os.path.join(c.state_dir, "certs")
    assert stat.S_IMODE(os.stat(certs).st_mode) == 0o700
    files = sorted(os.listdir(certs))
    assert len(files) == 2 and all(stat.S_IMODE(os.stat(os.path.join(certs, f)).st_mode) == 0o600 for f in files)
    with open(os.path.join(certs, [f for f in files if f.endswith(".key")][0]), "rb") as f:
        assert f.read() == key
    with open(os.path.join(c.state_dir, "nginx.conf")) as f:
        text = f.read()
    web = next(s for s in text.split("server {") if "server_name web.example.com;" in s)
    assert "listen 443 ssl;" in web and "ssl_certificate " in web
    mix = next(s for s in text.split("server {") if "server_name mix.example.com;" in s)
    assert "listen 443" not in mix
    assert "TLS Secret shop/mix-tls: tls.crt / tls.key do not load" in caplog.text
    assert "TLS Secret shop/nope: not found" in caplog.text
    # a new certificate: new files, the old ones collected after the reload
    feed(c, Event("MODIFIED", "Secret", tls_secret("web-tls", other_crt, other_key)))
    assert c.reloads == 1
    new_files = sorted(os.listdir(certs))
    assert len(new_files) == 2 and not set(new_files) & set(files)


def test_nginx_that_dies_is_started_again(controller):
    c = controller
    feed(c, *relists(Service=[service("web")], Ingress=[web_ingress()]))
    wait_for(lambda: fake_log(c))
    first = c.nginx.pid
    os.kill(first, 9)
    c.nginx.proc.wait()
    c.run_once(0)                       # notices, schedules a sync
    c.run_once(0)
    assert c.nginx.running() and c.nginx.pid != first


def test_store_relist_replaces_and_secrets_are_tls_only():
    s = ctl.Store()
    assert not s.ready
    assert s.apply(Event("RELIST", "Service", [service("a"), service("b")]))
    assert not s.apply(Event("RELIST", "Service", [service("a"), service("b")]))
    assert s.apply(Event("RELIST", "Service", [service("a")]))
    assert set(s.services) == {("shop", "a")}
    assert s.apply(Event("DELETED", "Service", service("a"))) and not s.apply(Event("DELETED", "Service", service("a")))
    assert not s.apply(Event("RELIST", "Pod", []))
    s.apply(Event("RELIST", "IngressClass", [{"metadata": {"name": "podnet"},
                                               "spec": {"controller": "podnet.io/ingress-nginx"}}]))
    assert s.classes["podnet"].controller == "podnet.io/ingress-nginx"


def test_print_config_from_manifests(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    objs = {"kind": "List", "items": [service("web"), slice_("web", ["10.244.1.2"]), web_ingress()]}
    (d / "all.json").write_text(json.dumps(objs))
    assert ctl.main(["--manifests", str(d), "--state-dir", str(tmp_path / "st"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "server_name web.example.com;" in out and "server 10.244.1.2:8080" in out


@pytest.mark.parametrize("argv,message", [
    (["--state-dir", "/x"], "--manifests DIR or --kubeconfig FILE"),
    (["--manifests", "d", "--kubeconfig", "k"], "not allowed with argument"),
    (["--manifests", "d", "--http-port", "0"], "--http-port: not a port number"),
    (["--manifests", "d", "--http-port", "443"], "must differ"),
    (["--manifests", "d", "--workers", "two"], "--workers"),
    (["--kubeconfig", "k", "--print-config"], "--print-config needs --manifests"),
    (["--manifests", "d", "--worker-user", "a;b"], "--worker-user"),
])
def test_bad_arguments(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SystemExit):
        ctl.parse_args(argv)
    assert message in capsys.readouterr().err


def test_controller_follows_the_kubernetes_api(tmp_path, fake_nginx):
    """The API source with every kind the controller asks for, against recorded-format responses."""
    from podnet.kube.api import KubeApiSource
    from podnet.kube.events import INGRESS_KINDS
    from tests.test_kube_sources import FakeApiServer

    def lst(kind, api, items):
        return ("json", 200, {"kind": kind + "List", "apiVersion": api, "metadata": {"resourceVersion": "7"},
                              "items": items})
    server = FakeApiServer()
    server.add("/api/v1/services", "list", lst("Service", "v1", [service("web")]))
    server.add("/apis/discovery.k8s.io/v1/endpointslices", "list",
               lst("EndpointSlice", "discovery.k8s.io/v1", [slice_("web", ["10.244.1.2"])]))
    server.add("/apis/networking.k8s.io/v1/ingresses", "list", lst("Ingress", "networking.k8s.io/v1",
                                                                    [web_ingress()]))
    server.add("/apis/networking.k8s.io/v1/ingressclasses", "list", lst("IngressClass", "networking.k8s.io/v1", []))
    server.add("/api/v1/secrets", "list", lst("Secret", "v1", []))
    c = ctl.IngressController(render.Options(str(tmp_path / "state"), status_port=0), nginx_binary=fake_nginx,
                              debounce=0, min_sync_interval=0)
    c.prepare()
    source = KubeApiSource(c.enqueue, kubeconfig=server.kubeconfig(str(tmp_path)), kinds=INGRESS_KINDS,
                           backoff=(0.01, 0.05))
    source.start()
    try:
        deadline = time.monotonic() + 10
        while c.syncs == 0 and time.monotonic() < deadline:
            c.run_once(0.05)
        with open(os.path.join(c.state_dir, "nginx.conf")) as f:
            text = f.read()
        assert "server_name web.example.com;" in text and "server 10.244.1.2:8080" in text
    finally:
        source.stop()
        c.nginx.stop()
        server.close()


def test_unreachable_state_dir_is_reported(tmp_path, fake_nginx, caplog):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    blocked = ctl.unreachable_for_others(str(private / "state" / "tmp"))
    assert blocked and (str(private) + "/").startswith(blocked + "/")
    assert ctl.unreachable_for_others("/usr/share/nothing-here") is None
    c = ctl.IngressController(render.Options(str(private / "state"), status_port=0), nginx_binary=fake_nginx)
    with caplog.at_level(logging.WARNING):
        c.prepare()
    if os.geteuid() == 0:
        assert "cannot enter %s (mode 700)" % blocked in caplog.text
    c = ctl.IngressController(render.Options(str(private / "state"), status_port=0, user="root"),
                              nginx_binary=fake_nginx)
    caplog.clear()
    c.prepare()
    assert "cannot enter" not in caplog.text
