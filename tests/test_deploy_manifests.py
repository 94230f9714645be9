"""deploy/*.yaml, checked offline: against the Kubernetes API schemas, and against the code.

- Every document validates against the schemas of Kubernetes KUBERNETES_VERSION
  (kubernetes-validate, strict: an unknown field is an error, as `kubectl apply
  --validate=strict` makes it).
- Every podnet command a container runs parses with that daemon's own argparse parser
  (unknown flags and bad values fail), after the `$(VAR)` references are expanded the way
  kubelet does, from the container's env (every reference must be defined there, and a
  ConfigMap key it reads must exist in the manifest).
- Every hostPath a container mounts is one its daemon uses, at the same path inside the
  container, and every path it uses is mounted (HOST_PATHS: path -> the constant in the
  code, so renaming a path in code fails here); ConfigMap files the flags name exist.
- Probes ask the daemon's health server, on the port and address its flags give it, for
  a path that server serves.
- RBAC: each ClusterRole grants exactly the API calls the daemon's code makes. The calls are
  observed, not listed by hand: the daemon's own API code (podnet.kube.api's list + watch
  with the kinds the daemon asks for, podnet.kube.recorder's Events, flanneld's Kubernetes
  subnet manager) runs against scripted API servers (no kube-apiserver can run here; the
  servers speak the API's wire format and record every request), and each request becomes
  the (apiGroup, resource, verb) the API server's authorizer would check.
"""
import http.server
import json
import os
import socketserver
import threading
import time
import urllib.parse

import kubernetes_validate
import pytest
import yaml

import calico_lite.agent
import flanneld.daemon
import kube_proxy.server
import network_policy.server
from cli import cleanup as cleanup_cmd
from cli import install as install_cmd
from podnet import __version__, httpd
from podnet.net import iptables

from fake_kube_api import FakeKubeApi

KUBERNETES_VERSION = "1.31"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
MANIFESTS = ("podnet-flannel.yaml", "podnet-calico.yaml", "podnet-cleanup.yaml")
IMAGE = "localhost/podnet:" + __version__
CONTAINER_ENV = {"spec.nodeName": "node1", "metadata.name": "kube-flannel-ds-x2b9c",
                 "metadata.namespace": "podnet-system"}


def load(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


ALL = {name: load(name) for name in MANIFESTS}


def find(docs, kind, name=None):
    out = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return out


def workloads(docs):
    return [d for d in docs if d["kind"] in ("DaemonSet", "Deployment")]


def containers(workload):
    spec = workload["spec"]["template"]["spec"]
    return [(c, True) for c in spec.get("initContainers", [])] + [(c, False) for c in spec["containers"]]


def every_container():
    for name, docs in ALL.items():
        for w in workloads(docs):
            for c, _init in containers(w):
                yield name, docs, w, c


# ---- the schemas ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", MANIFESTS)
def test_every_document_validates_against_the_api_schemas(name):
    assert ALL[name], name
    for doc in ALL[name]:
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION, doc


def test_one_image_everywhere_named_by_the_version():
    images = {c["image"] for _, _, _, c in every_container()}
    assert images == {IMAGE}


@pytest.mark.parametrize("name", MANIFESTS[:2])
def test_node_daemons_run_as_kube_flannel_does(name):
    for w in workloads(ALL[name]):
        spec = w["spec"]["template"]["spec"]
        assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
        assert {"operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert {"operator": "Exists", "effect": "NoExecute"} in spec["tolerations"]
        assert all(d["metadata"].get("namespace") in (None, "podnet-system") for d in ALL[name])


def test_kube_proxy_and_the_policy_agent_are_the_same_in_both_modes():
    def shared(docs):
        return [d for d in docs if d["kind"] != "Namespace" and "calico" not in d["metadata"]["name"]
                and "flannel" not in d["metadata"]["name"] and d["metadata"]["name"] != "podnet-config"]
    assert shared(ALL["podnet-flannel.yaml"]) == shared(ALL["podnet-calico.yaml"])
    cidrs = {n: find(ALL[n], "ConfigMap", "podnet-config")[0]["data"]["cluster-cidr"] for n in MANIFESTS[:2]}
    net_conf = json.loads(find(ALL["podnet-flannel.yaml"], "ConfigMap", "kube-flannel-cfg")[0]["data"]["net-conf.json"])
    assert cidrs["podnet-flannel.yaml"] == net_conf["Network"]
    from calico_lite.datastore import DEFAULT_POOL
    assert cidrs["podnet-calico.yaml"] == DEFAULT_POOL


def test_the_configs_shipped_are_ones_the_code_accepts():
    from flanneld.config import parse
    cfg = find(ALL["podnet-flannel.yaml"], "ConfigMap", "kube-flannel-cfg")[0]["data"]
    assert str(parse(cfg["net-conf.json"]).network) == "10.244.0.0/16"
    calico = find(ALL["podnet-calico.yaml"], "ConfigMap", "calico-config")[0]["data"]
    for text, types in ((cfg["cni-conf.json"], ["flannel", "portmap"]),
                        (calico["cni_network_config"], ["calico", "portmap"])):
        conf = install_cmd.check_conflist(text.encode(), "the ConfigMap")
        assert [p["type"] for p in conf["plugins"]] == types
        from cni.executable import PLUGINS
        assert set(types) <= set(PLUGINS)


# ---- flags -------------------------------------------------------------------------------

def _cli_parser(command):
    import argparse
    p = argparse.ArgumentParser(prog="podnet")
    sub = p.add_subparsers(dest="command")
    install_cmd.add_parser(sub)
    cleanup_cmd.add_parser(sub)
    return sub.choices[command]


# command prefix -> (name in the tables below, the daemon's parser, parse(argv, environ) -> options)
PARSERS = {
    ("podnet", "flanneld"): ("flanneld", flanneld.daemon.build_parser,
                             lambda argv, env: flanneld.daemon.parse_args(argv, environ=env)),
    ("podnet", "kube-proxy"): ("kube-proxy", kube_proxy.server.build_parser, None),
    ("podnet", "network-policy"): ("network-policy", network_policy.server.build_parser, None),
    ("podnet", "calico", "agent"): ("calico", calico_lite.agent.build_parser, None),
    ("podnet", "install-cni"): ("install-cni", lambda: _cli_parser("install-cni"), None),
    ("podnet", "cleanup"): ("cleanup", lambda: _cli_parser("cleanup"), None),
}


def container_env(docs, c):
    """The container's environment as kubelet would make it (fieldRefs from CONTAINER_ENV)."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = CONTAINER_ENV[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            (cm,) = find(docs, "ConfigMap", ref["name"])
            assert ref["key"] in cm["data"], (c["name"], ref)
            env[e["name"]] = cm["data"][ref["key"]]
    for source in c.get("envFrom", []):
        ref = source["configMapRef"]
        assert ref.get("optional") or find(docs, "ConfigMap", ref["name"]), (c["name"], ref)
    return env


def expand(text, env, where):
    """kubelet's $(VAR) expansion; every reference must be defined."""
    import re

    def var(m):
        assert m.group(1) in env, "%s: $(%s) is not in its env" % (where, m.group(1))
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var, text)


def parsed(docs, c):
    """(daemon name, options) of a podnet container; None for any other command. Flags must be
    spelled out: argparse takes an unambiguous prefix (--kube-subnet for --kube-subnet-mgr),
    the Go daemons operators know do not, so a manifest never relies on it."""
    argv = list(c.get("command", [])) + list(c.get("args", []))
    env = container_env(docs, c)
    argv = [expand(a, env, c["name"]) for a in argv]
    for prefix, (name, build, parse) in PARSERS.items():
        if tuple(argv[:len(prefix)]) == prefix:
            args = argv[len(prefix):]
            parser = build()
            for a in args:
                if a.startswith("-"):
                    assert a.split("=", 1)[0] in parser._option_string_actions, \
                        "%s: %s has no flag %s" % (c["name"], name, a)
            try:
                return name, parse(args, env) if parse else parser.parse_args(args)
            except SystemExit:
                pytest.fail("%s: %s does not parse %s" % (c["name"], name, args))
    assert argv[0] != "podnet", "%s runs a podnet command this test does not know: %s" % (c["name"], argv)
    return None


def test_every_flag_exists_in_its_daemons_parser():
    seen = set()
    for _name, docs, _w, c in every_container():
        got = parsed(docs, c)
        if got:
            seen.add(got[0])
    assert seen == {n for n, _, _ in PARSERS.values()}


def test_the_flags_mean_what_the_manifests_say():
    flannel = ALL["podnet-flannel.yaml"]
    (ds,) = find(flannel, "DaemonSet", "kube-flannel-ds")
    opts = parsed(flannel, ds["spec"]["template"]["spec"]["containers"][0])[1]
    assert opts.kube_subnet_mgr and opts.ip_masq and opts.healthz_port == 8081
    (kp,) = find(flannel, "DaemonSet", "kube-proxy")
    opts = parsed(flannel, kp["spec"]["template"]["spec"]["containers"][0])[1]
    assert opts.hostname_override == "node1" and list(opts.cluster_cidr) == ["10.244.0.0/16"]
    assert opts.proxy_mode == "iptables"
    calico = ALL["podnet-calico.yaml"]
    (rr,) = find(calico, "DaemonSet", "calico-route-reflector")
    opts = parsed(calico, rr["spec"]["template"]["spec"]["containers"][0])[1]
    assert opts.role == "route-reflector" and opts.etcd_endpoints.startswith("http")


# ---- host paths --------------------------------------------------------------------------

def host_paths():
    """hostPath -> the constant in the code that names it (a rename in code fails the test)."""
    from calico_lite.agent import DEFAULT_BLOCKS_FILE
    from cni.plugins import flannel as flannel_plugin
    return {
        "/run/flannel": os.path.dirname(flanneld.daemon.DEFAULT_SUBNET_FILE),
        "/run/calico-lite": os.path.dirname(DEFAULT_BLOCKS_FILE),
        "/run/xtables.lock": iptables.LOCK_PATH,
        "/opt/cni/bin": cleanup_cmd.DEFAULT_BIN_DIR,
        "/var/lib/cni": cleanup_cmd.DEFAULT_CACHE_DIR,
        # where the flannel plugin (on the host) reads what flanneld (in its container) writes
        "flannel plugin's subnet file": (flannel_plugin.DEFAULT_SUBNET_FILE, flanneld.daemon.DEFAULT_SUBNET_FILE),
    }


# daemon -> the host paths it uses (by HOST_PATHS); /etc/cni/net.d is where --conflist-dest says
USES = {
    "flanneld": {"/run/flannel", "/run/xtables.lock"},        # subnet.env; iptables-restore's lock
    "kube-proxy": {"/run/xtables.lock"},
    "network-policy": set(),                                    # nftables only: no lock file
    "calico": {"/run/calico-lite"},                             # the blocks file
    "install-cni": {"/opt/cni/bin", "/etc/cni/net.d"},
    "cleanup": {"/opt/cni/bin", "/etc/cni/net.d", "/var/lib/cni", "/run/flannel", "/run/calico-lite",
                "/run/xtables.lock"},
}


def test_host_paths_are_the_codes():
    table = host_paths()
    for path, constant in table.items():
        if path.startswith("/"):
            assert path == constant, (path, constant)
    plugin_side, daemon_side = table["flannel plugin's subnet file"]
    assert plugin_side == daemon_side


def test_every_host_path_mounted_is_used_and_every_one_used_is_mounted():
    table = host_paths()
    for name, docs, w, c in every_container():
        got = parsed(docs, c)
        if got is None:
            assert not c.get("volumeMounts"), c["name"]
            continue
        daemon, opts = got
        spec = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounted = {}
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            if "hostPath" in v:
                path = v["hostPath"]["path"].rstrip("/")
                assert m["mountPath"].rstrip("/") == path, "%s sees %s elsewhere" % (c["name"], path)
                mounted[path] = m
        want = set(USES[daemon])
        if daemon == "install-cni":
            assert opts.dest == table["/opt/cni/bin"] and opts.copy_code
            assert os.path.dirname(opts.conflist_dest) == "/etc/cni/net.d"
        if daemon == "calico" and opts.role == "route-reflector":
            want = set()                    # it claims no block: no blocks file
        if daemon == "calico":
            assert os.path.dirname(opts.blocks_file) in want | {"/run/calico-lite"}
        if daemon == "flanneld":
            assert os.path.dirname(opts.subnet_file) == "/run/flannel"
        assert set(mounted) == want, (name, c["name"], sorted(mounted), sorted(want))
        for path in want & {"/run/xtables.lock"}:
            assert volumes[mounted[path]["name"]]["hostPath"]["type"] == "FileOrCreate"


def test_cleanup_mounts_every_directory_the_installers_write():
    cleanup_ds = workloads(ALL["podnet-cleanup.yaml"])[0]
    (c, _), = [(c, i) for c, i in containers(cleanup_ds) if i]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for name in MANIFESTS[:2]:
        for _, docs, _w, ic in [x for x in every_container() if x[0] == name]:
            got = parsed(docs, ic)
            if got and got[0] == "install-cni":
                assert os.path.dirname(got[1].conflist_dest) in mounts and got[1].dest in mounts


def test_files_the_flags_name_are_in_mounted_config_maps():
    for _name, docs, w, c in every_container():
        got = parsed(docs, c)
        if not got:
            continue
        daemon, opts = got
        files = []
        if daemon == "flanneld":
            files.append(opts.net_config_path)
        if daemon == "install-cni":
            files.append(opts.conflist_src)
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
        for path in files:
            for m in c.get("volumeMounts", []):
                v = volumes[m["name"]]
                if "configMap" in v and os.path.dirname(path) == m["mountPath"].rstrip("/"):
                    (cm,) = find(docs, "ConfigMap", v["configMap"]["name"])
                    assert os.path.basename(path) in cm["data"], (c["name"], path)
                    break
            else:
                pytest.fail("%s: %s is in no mounted ConfigMap" % (c["name"], path))


# ---- probes -----------------------------------------------------------------------------------

def health_server(daemon, opts):
    """(bind host, port, paths served) of the daemon's health server, from its options."""
    if daemon == "flanneld":
        stub = type("Stub", (), {"metrics": None, "liveness": lambda s: (True, ""),
                                 "readiness": lambda s: (True, "")})()
        return opts.healthz_ip, opts.healthz_port, set(flanneld.daemon.health_routes(stub))
    if daemon == "kube-proxy":
        from kube_proxy.metrics import HEALTHZ_PORT, Metrics
        host, port = httpd.parse_address(opts.healthz_bind_address, HEALTHZ_PORT)
        return host, port, set(Metrics().routes("healthz"))
    if daemon == "network-policy":
        from network_policy.metrics import HEALTHZ_PORT, Metrics
        host, port = httpd.parse_address(opts.healthz_bind_address, HEALTHZ_PORT)
        return host, port, set(Metrics().routes("healthz"))
    if daemon == "calico":
        from calico_lite.metrics import Metrics
        assert opts.health_enabled
        return opts.health_host, opts.health_port, set(Metrics(lambda: None, lambda: 0).routes_for("health"))
    raise AssertionError(daemon)


def test_probes_ask_the_daemons_health_server():
    probed = set()
    for _name, docs, _w, c in every_container():
        got = parsed(docs, c)
        if not got or got[0] in ("install-cni", "cleanup"):
            assert "livenessProbe" not in c
            continue
        host, port, paths = health_server(*got)
        for probe in ("livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            assert get["port"] == port and get["path"] in paths, (c["name"], probe, get, port, paths)
            if host not in ("0.0.0.0", "", "::"):
                assert get.get("host") == host, (c["name"], probe, "the server listens on %s only" % host)
        probed.add(got[0])
        for p in c.get("ports", []):
            assert p["containerPort"] == port
    assert probed == {"flanneld", "kube-proxy", "network-policy", "calico"}


# ---- RBAC: what the code calls == what the ClusterRole grants --------------------------------

def rbac_request(method, url):
    """(apiGroup, resource[/subresource], verb) the API server's authorizer checks for a request."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    segs = [s for s in parts.path.split("/") if s]
    if segs[0] == "api":
        group, rest = "", segs[2:]
    else:
        group, rest = segs[1], segs[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method)
    if verb is None:
        verb = "get" if name else ("watch" if query.get("watch") in ("true", "1") else "list")
    return group, resource + ("/" + sub if sub else ""), verb


class RecordingApi:
    """A scripted API server for the list + watch and Event calls: every list is empty (with a
    resourceVersion), a watch sends a BOOKMARK and ends, a POST or PATCH answers the object;
    every request is recorded. Test-only (no kube-apiserver can run here)."""

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                outer.requests.append(("GET", self.path))
                if "watch=" in self.path:
                    time.sleep(0.05)
                    self._answer(200, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "1"}}})
                else:
                    self._answer(200, {"metadata": {"resourceVersion": "1"}, "items": []})

            def _write(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                outer.requests.append((self.command, self.path))
                body.setdefault("metadata", {}).setdefault("resourceVersion", "2")
                self._answer(201 if self.command == "POST" else 200, body)

            do_POST = do_PATCH = _write

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass        # a client closing its watch connection early is no error here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def kubeconfig(self, directory):
        path = os.path.join(directory, "kubeconfig")
        with open(path, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "t",
                       "clusters": [{"name": "t", "cluster": {"server": self.url}}],
                       "users": [{"name": "t", "user": {"token": "t"}}],
                       "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}, f)
        return path

    def calls(self):
        return {rbac_request(m, p) for m, p in self.requests}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_for(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def list_and_watch_calls(tmp_path, kinds):
    """The requests podnet.kube.api makes for `kinds` (None: its default, what kube-proxy asks for)."""
    from podnet.kube.api import KubeApiSource
    api = RecordingApi()
    try:
        kw = {} if kinds is None else {"kinds": kinds}
        source = KubeApiSource(lambda e: None, kubeconfig=api.kubeconfig(str(tmp_path)), **kw)
        expected = len(source.kinds)
        source.start()
        try:
            wait_for(lambda: len({r for r in api.calls() if r[2] == "watch"}) >= expected)
        finally:
            source.stop()
        return api.calls()
    finally:
        api.close()


def event_calls(tmp_path):
    """What kube-proxy's EventRecorder sends for an Event and a repeat of it."""
    from podnet.kube.recorder import EventRecorder, object_reference
    api = RecordingApi()
    try:
        recorder = EventRecorder("kube-proxy", "kube-proxy-node1", kubeconfig=api.kubeconfig(str(tmp_path)))
        ref = object_reference("Service", "default", "web", uid="u1")
        for _ in range(2):
            recorder.record(ref, "FailedToApplyRules", "Sync", "refused")
            assert recorder.flush(10)
        recorder.stop()
        return api.calls()
    finally:
        api.close()


def flanneld_calls(tmp_path):
    """flanneld's Kubernetes subnet manager through its life: the node's name (from $NODE_NAME,
    and from its Pod when that is not set), the lease, the NetworkUnavailable condition, the
    list + watch of Nodes."""
    from flanneld.subnet.kube import KubeSubnetManager
    from podnet.kube.nodes import make_client
    from podnet.net.ip import parse_ip
    net_conf = tmp_path / "net-conf.json"
    net_conf.write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}))
    api = FakeKubeApi(bookmark_interval=0.2)
    calls = set()
    try:
        api.add_node("node1", pod_cidr="10.244.1.0/24")
        api.add_pod("podnet-system", "kube-flannel-ds-x2b9c", "node1")
        for environ in ({"NODE_NAME": "node1"},
                        {"POD_NAME": "kube-flannel-ds-x2b9c", "POD_NAMESPACE": "podnet-system"}):
            sm = KubeSubnetManager(lambda: make_client(api.url), str(net_conf), environ=environ,
                                   backoff=(0.05, 0.2))
            try:
                sm.stored_attributes()
                lease = sm.acquire_lease(parse_ip("192.168.50.1"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:00:00:01"})
                sm.complete_lease(lease)
                sm.list_leases()
            finally:
                sm.stop()
        for r in list(api.requests):
            query = urllib.parse.urlencode(r.query) if isinstance(r.query, dict) else (r.query or "")
            calls.add(rbac_request(r.method, r.path + ("?" + query if query else "")))
    finally:
        api.close()
    return calls


def granted(docs, service_account):
    """{(apiGroup, resource, verb)} the ClusterRoles bound to the ServiceAccount grant."""
    out = set()
    for binding in find(docs, "ClusterRoleBinding"):
        if any(s["kind"] == "ServiceAccount" and s["name"] == service_account for s in binding["subjects"]):
            (role,) = find(docs, "ClusterRole", binding["roleRef"]["name"])
            for rule in role["rules"]:
                out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert not find(docs, "RoleBinding"), "namespaced grants: this test reads ClusterRoleBindings only"
    return out


def service_account_of(docs, workload_name):
    (w,) = [w for w in workloads(docs) if w["metadata"]["name"] == workload_name]
    spec = w["spec"]["template"]["spec"]
    assert find(docs, "ServiceAccount", spec["serviceAccountName"])
    return spec["serviceAccountName"], spec


def test_rbac_grants_exactly_what_the_code_calls(tmp_path):
    from network_policy.agent import KINDS as POLICY_KINDS
    observed = {
        "kube-flannel-ds": flanneld_calls(tmp_path),
        "kube-proxy": list_and_watch_calls(tmp_path, None) | event_calls(tmp_path),
        "network-policy": list_and_watch_calls(tmp_path, POLICY_KINDS),
    }
    assert observed["kube-flannel-ds"] == {("", "pods", "get"), ("", "nodes", "get"), ("", "nodes", "list"),
                                           ("", "nodes", "watch"), ("", "nodes/status", "patch")}
    for name in MANIFESTS[:2]:
        docs = ALL[name]
        for workload, calls in observed.items():
            if not find(docs, "DaemonSet", workload):
                continue
            sa, _ = service_account_of(docs, workload)
            assert granted(docs, sa) == calls, (name, workload, sorted(granted(docs, sa) ^ calls))


def test_calico_lite_and_cleanup_need_no_api_access():
    for name in MANIFESTS[1:]:
        docs = ALL[name]
        for w in workloads(docs):
            spec = w["spec"]["template"]["spec"]
            if "calico" in w["metadata"]["name"] or name == "podnet-cleanup.yaml":
                assert spec["automountServiceAccountToken"] is False
                assert not granted(docs, spec.get("serviceAccountName", "default"))
    for directory, _, files in os.walk(os.path.join(ROOT, "calico_lite")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(directory, f)) as fh:
                    text = fh.read()
                assert "kubernetes" not in text and "podnet.kube" not in text, f


def test_the_image_carries_every_product_package():
    """deploy/image.sh copies SOURCE_PACKAGES into the image: every package the project ships
    except the lab (test harness) must be there, or a command the image offers fails to import."""
    import re
    import tomllib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "deploy", "image.sh")) as f:
        shipped = set(re.search(r"^SOURCE_PACKAGES=\(([^)]*)\)", f.read(), re.M).group(1).split())
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        included = {p.rstrip("*") for p in tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert included - {"lab"} == shipped
