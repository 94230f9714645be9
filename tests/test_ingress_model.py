"""ingress.model: parsing, class selection, Kubernetes matching semantics, backends."""
import base64
import copy
import logging

import pytest

from ingress import model
from ingress.model import (
    IngressClass,
    InvalidIngress,
    ServiceBackend,
    build_routes,
    host_matches,
    normalize_request_host,
    owned,
    parse_ingress,
    parse_ingress_class,
    parse_tls_secret,
    path_matches,
    resolve_backends,
)
from kube_proxy.model import Endpoint, InvalidObject, ServicePortName


def be(svc, port=80):
    return {"service": {"name": svc, "port": {"number": port} if isinstance(port, int) else {"name": port}}}


def path(p, svc, path_type="Prefix", port=80):
    out = {"pathType": path_type, "backend": be(svc, port)}
    if p is not None:
        out["path"] = p
    return out


def ingress(name="web", rules=None, ns="shop", created="", annotations=None, **spec):
    obj = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
           "metadata": {"name": name, "namespace": ns}, "spec": dict(spec)}
    if created:
        obj["metadata"]["creationTimestamp"] = created
    if annotations:
        obj["metadata"]["annotations"] = annotations
    if rules is not None:
        obj["spec"]["rules"] = rules
    return obj


def rule(host, *paths):
    out = {"http": {"paths": list(paths)}}
    if host:
        out["host"] = host
    return out


def sb(svc, port=80, ns="shop"):
    return ServiceBackend(ns, svc, port, "") if isinstance(port, int) else ServiceBackend(ns, svc, 0, port)


# ---- parsing ------------------------------------------------------------------------------------

def test_parse_a_full_ingress():
    obj = ingress("web", [rule("foo.example.com", path("/", "web"), path("/api", "api", "Exact", "http")),
                          rule("*.wild.example.com", path(None, "wild", "ImplementationSpecific")),
                          {"host": "tls-only.example.com"}],
                  created="2026-11-20T09:14:03Z", ingressClassName="podnet", defaultBackend=be("fallback", 8080),
                  tls=[{"hosts": ["foo.example.com"], "secretName": "foo-tls"}, {"secretName": "default-tls"}])
    ing = parse_ingress(obj)
    assert (ing.namespace, ing.name, ing.class_name, ing.created) == ("shop", "web", "podnet", "2026-11-20T09:14:03Z")
    assert ing.default_backend == sb("fallback", 8080)
    assert [r.host for r in ing.rules] == ["foo.example.com", "*.wild.example.com", "tls-only.example.com"]
    p0, p1 = ing.rules[0].paths
    assert (p0.path, p0.path_type, p0.backend) == ("/", "Prefix", sb("web"))
    assert (p1.path, p1.exact, p1.backend) == ("/api", True, sb("api", "http"))
    assert ing.rules[1].paths[0].path == "/"                # ImplementationSpecific without a path: "/"
    assert ing.rules[2].paths == ()
    assert [(t.hosts, t.secret_name) for t in ing.tls] == [(("foo.example.com",), "foo-tls"), ((), "default-tls")]
    assert str(ing.default_backend) == "shop/fallback:8080"


def test_missing_namespace_is_default_and_only_default_backend_is_fine():
    obj = ingress(defaultBackend=be("x"))
    del obj["metadata"]["namespace"]
    ing = parse_ingress(obj)
    assert ing.namespace == "default" and ing.rules == () and ing.default_backend == sb("x", ns="default")


BAD = [
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(path="foo"),
     "spec.rules[0].http.paths[0].path: 'foo' must be an absolute path (start with /)"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(pathType="Regex"),
     "spec.rules[0].http.paths[0].pathType: 'Regex' is not Exact, Prefix or ImplementationSpecific"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].pop("pathType"),
     "spec.rules[0].http.paths[0].pathType: missing"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].pop("backend"),
     "spec.rules[0].http.paths[0].backend: missing"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].pop("path"),
     "spec.rules[0].http.paths[0].path: missing (required for pathType Prefix)"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(path="/a//b"), "must not contain '//'"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(path="/a/../b"), "must not contain '/../'"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(path="/a/."), "must not end with /. or /.."),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(path="/a%2Fb"), "percent-encoding is not supported"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(path="/a b"), "' ' is not allowed in a path"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(path='/a";}'), "'\"' is not allowed in a path"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(path=7), "path: expected a string, got 7"),
    (lambda o: o["spec"]["rules"][0].update(host="Foo.example.com"), "is not a valid lower-case DNS name"),
    (lambda o: o["spec"]["rules"][0].update(host="10.0.0.1"), "host: '10.0.0.1' is an IP address"),
    (lambda o: o["spec"]["rules"][0].update(host="foo.*.com"), "a wildcard must be the whole first label"),
    (lambda o: o["spec"]["rules"][0].update(host="*"), "a wildcard must be the whole first label"),
    (lambda o: o["spec"]["rules"][0].update(host="foo.com:80"), "a host carries no port"),
    (lambda o: o["spec"]["rules"][0].update(host="a_b.com"), "is not a valid lower-case DNS name"),
    (lambda o: o["spec"]["rules"][0]["http"].update(paths=[]), "spec.rules[0].http.paths: empty"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"].update(name="http"),
     "needs exactly one of number and name"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"].update(number=0),
     "backend.service.port.number: 0 is not a port number"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"].update(port={"name": "80"}),
     "backend.service.port.name: '80' is not a valid port name"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"].update(
        port={"name": "a-very-long-port-name"}), "is not a valid port name"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"].update(name="Web"),
     "backend.service.name: 'Web' is not a valid Service name"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(
        backend={"resource": {"kind": "StorageBucket", "name": "b"}}), "resource backends are not supported"),
    (lambda o: o["spec"]["rules"][0]["http"]["paths"][0].update(backend={}), "backend.service: missing"),
    (lambda o: o["spec"].update(rules=[]), "spec: neither rules nor defaultBackend"),
    (lambda o: o["spec"].update(tls=[{"hosts": ["ok.com", "BAD"], "secretName": "s"}]), "spec.tls[0].hosts[1]"),
    (lambda o: o["spec"].update(tls=[{"secretName": "Not_OK"}]), "spec.tls[0].secretName"),
    (lambda o: o["spec"].update(ingressClassName="Nope!"), "spec.ingressClassName"),
    (lambda o: o.pop("spec"), "spec: missing"),
    (lambda o: o["metadata"].pop("name"), "metadata.name: missing"),
]


@pytest.mark.parametrize("mutate,reason", BAD, ids=[r for _, r in BAD])
def test_bad_ingresses_say_why(mutate, reason):
    obj = ingress("bad", [rule("foo.example.com", path("/x", "web"))])
    mutate(obj)
    with pytest.raises(InvalidIngress) as e:
        parse_ingress(obj)
    assert reason in str(e.value)
    assert isinstance(e.value, InvalidObject)


def test_ingress_or_error_logs_and_returns_the_reason(caplog):
    obj = ingress("bad", [rule("foo.example.com", path("/x", "web", "Regex"))])
    with caplog.at_level(logging.WARNING):
        ing, reason = model.ingress_or_error(obj)
    assert ing is None and "pathType: 'Regex'" in reason
    assert "skipping Ingress shop/bad: spec.rules[0].http.paths[0].pathType" in caplog.text
    ing, reason = model.ingress_or_error({"metadata": {"name": "odd"}, "spec": {"rules": "nope"}})
    assert ing is None and "spec.rules: expected a list" in reason


def test_ingress_class_and_tls_secret():
    cls = parse_ingress_class({"metadata": {"name": "podnet", "creationTimestamp": "2026-01-01T00:00:00Z",
                                            "annotations": {model.DEFAULT_CLASS_ANNOTATION: "true"}},
                               "spec": {"controller": "podnet.io/ingress-nginx"}})
    assert cls == IngressClass("podnet", "podnet.io/ingress-nginx", True, "2026-01-01T00:00:00Z")
    with pytest.raises(InvalidIngress, match="spec.controller: missing"):
        parse_ingress_class({"metadata": {"name": "x"}, "spec": {}})
    with pytest.raises(InvalidIngress, match="not a domain-prefixed path"):
        parse_ingress_class({"metadata": {"name": "x"}, "spec": {"controller": "nginx"}})
    with pytest.raises(InvalidIngress, match="not a domain-prefixed path"):      # $ matched before a newline
        parse_ingress_class({"metadata": {"name": "x"}, "spec": {"controller": "podnet.io/ingress-nginx\n"}})
    pem_c = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    pem_k = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
    secret = {"metadata": {"name": "foo-tls", "namespace": "shop"}, "type": "kubernetes.io/tls",
              "data": {"tls.crt": base64.b64encode(pem_c).decode(), "tls.key": base64.b64encode(pem_k).decode()}}
    s = parse_tls_secret(secret)
    assert (s.namespace, s.name, s.cert, s.key) == ("shop", "foo-tls", pem_c, pem_k)
    assert "MIIE" not in repr(s)                 # key material stays out of logs
    bad = copy.deepcopy(secret)
    bad["data"]["tls.key"] = "!!!"
    with pytest.raises(InvalidIngress, match=r"data\[tls.key\]: not valid base64"):
        parse_tls_secret(bad)
    bad["data"]["tls.key"] = base64.b64encode(b"hello").decode()
    with pytest.raises(InvalidIngress, match=r"data\[tls.key\]: not a PEM key"):
        parse_tls_secret(bad)
    del bad["data"]["tls.crt"]
    with pytest.raises(InvalidIngress, match=r"data\[tls.crt\]: missing"):
        parse_tls_secret(bad)


# ---- which Ingresses are ours --------------------------------------------------------------------

OURS = IngressClass("podnet", model.CONTROLLER_NAME)
THEIRS = IngressClass("nginx", "k8s.io/ingress-nginx")


def _ing(class_name="", annotation="", **kw):
    spec = {"defaultBackend": be("x")}
    if class_name:
        spec["ingressClassName"] = class_name
    return parse_ingress(ingress(annotations={model.CLASS_ANNOTATION: annotation} if annotation else None, **spec))


@pytest.mark.parametrize("ing,classes,without,expected", [
    (_ing("podnet"), {"podnet": OURS}, False, True),
    (_ing("nginx"), {"podnet": OURS, "nginx": THEIRS}, False, False),
    (_ing("podnet"), {}, False, True),                         # no IngressClass objects: the name decides
    (_ing("other"), {}, False, False),
    (_ing("podnet"), {"podnet": IngressClass("podnet", "k8s.io/ingress-nginx")}, False, False),  # name taken
    (_ing(annotation="podnet"), {}, False, True),
    (_ing(annotation="nginx"), {"nginx": THEIRS}, False, False),
    (_ing(annotation="mine"), {"mine": IngressClass("mine", model.CONTROLLER_NAME)}, False, True),
    (_ing(), {}, False, False),
    (_ing(), {}, True, True),
    (_ing(), {"podnet": IngressClass("podnet", model.CONTROLLER_NAME, True)}, False, True),
    (_ing(), {"nginx": IngressClass("nginx", "k8s.io/ingress-nginx", True)}, False, False),
    # two defaults: the newest one counts
    (_ing(), {"podnet": IngressClass("podnet", model.CONTROLLER_NAME, True, "2026-01-02T00:00:00Z"),
              "nginx": IngressClass("nginx", "k8s.io/ingress-nginx", True, "2026-01-01T00:00:00Z")}, False, True),
    (_ing(), {"podnet": IngressClass("podnet", model.CONTROLLER_NAME, True, "2026-01-01T00:00:00Z"),
              "nginx": IngressClass("nginx", "k8s.io/ingress-nginx", True, "2026-01-02T00:00:00Z")}, False, False),
])
def test_owned(ing, classes, without, expected):
    assert owned(ing, classes, "podnet", model.CONTROLLER_NAME, without) is expected


def test_spec_class_name_beats_the_annotation():
    ing = parse_ingress(ingress(annotations={model.CLASS_ANNOTATION: "podnet"}, ingressClassName="nginx",
                                defaultBackend=be("x")))
    assert not owned(ing, {"nginx": THEIRS})


# ---- matching ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p,exact,request_path,expected", [
    # the Kubernetes documentation's examples table
    ("/", False, "/anything/at/all", True),
    ("/foo", True, "/foo", True),
    ("/foo", True, "/bar", False),
    ("/foo", True, "/foo/", False),
    ("/foo/", True, "/foo", False),
    ("/foo", False, "/foo", True),
    ("/foo", False, "/foo/", True),
    ("/foo/", False, "/foo", True),
    ("/foo/", False, "/foo/", True),
    ("/aaa/bb", False, "/aaa/bbb", False),
    ("/aaa/bbb", False, "/aaa/bbb", True),
    ("/aaa/bbb/", False, "/aaa/bbb", True),
    ("/aaa/bbb", False, "/aaa/bbb/", True),
    ("/aaa/bbb", False, "/aaa/bbb/ccc", True),
    ("/aaa/bbb", False, "/aaa/bbbxyz", False),
    ("/foo", False, "/foobar", False),
    ("/foo", False, "/FOO", False),                 # case-sensitive
])
def test_path_matches(p, exact, request_path, expected):
    assert path_matches(p if exact else model.normalize_prefix(p), exact, request_path) is expected


@pytest.mark.parametrize("pattern,host,expected", [
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", False),    # one label only
    ("*.example.com", "example.com", False),
    ("*.example.com", ".example.com", False),
    ("foo.example.com", "foo.example.com", True),
    ("foo.example.com", "bar.example.com", False),
])
def test_host_matches(pattern, host, expected):
    assert host_matches(pattern, host) is expected


def test_request_host_normalisation():
    assert normalize_request_host("Foo.Example.COM:8443") == "foo.example.com"
    assert normalize_request_host("foo.example.com.") == "foo.example.com"
    assert normalize_request_host("[fd00::1]:80") == "[fd00::1]"
    assert normalize_request_host(None) == ""


PRECEDENCE = ingress("routes", [
    rule("foo.example.com",
         path("/", "root"), path("/api", "api"), path("/api/v2", "api-v2"), path("/api/v2", "v2-exact", "Exact"),
         path("/exact", "exact", "Exact"), path("/app/", "app")),
    rule("*.example.com", path("/", "wild")),
    rule("", path("/catch", "catch-all")),
], defaultBackend=be("default"))


@pytest.mark.parametrize("host,request_path,backend", [
    ("foo.example.com", "/", "root"),
    ("foo.example.com", "/api", "api"),
    ("foo.example.com", "/api/", "api"),
    ("foo.example.com", "/api/v1/x", "api"),
    ("foo.example.com", "/apix", "root"),              # not element-wise: falls back to /
    ("foo.example.com", "/api/v2", "v2-exact"),         # Exact over Prefix of the same path
    ("foo.example.com", "/api/v2/", "api-v2"),          # Exact /api/v2 does not match /api/v2/
    ("foo.example.com", "/api/v2/users", "api-v2"),     # the longest Prefix first
    ("foo.example.com", "/api/v22", "api"),
    ("foo.example.com", "/exact", "exact"),
    ("foo.example.com", "/exact/more", "root"),
    ("foo.example.com", "/app", "app"),                 # trailing slash of a Prefix ignored
    ("FOO.example.com:8080", "/app/x", "app"),
    ("foo.example.com", "/catch", "root"),              # a host's own rules first: no fall-through
    ("bar.example.com", "/anything", "wild"),           # wildcard
    ("a.bar.example.com", "/catch", "catch-all"),       # a wildcard is one label: catch-all rules
    ("a.bar.example.com", "/other", "default"),         # ... then the default backend
    ("example.com", "/x", "default"),
    ("10.1.2.3", "/catch", "catch-all"),
])
def test_route_precedence(host, request_path, backend):
    routes = build_routes([parse_ingress(PRECEDENCE)])
    assert routes.route(host, request_path) == sb(backend)


def test_no_default_backend_is_404_and_locations_are_in_match_order():
    routes = build_routes([parse_ingress(ingress(rules=[rule("foo.com", path("/a", "a"), path("/a/b/c", "abc"),
                                                                       path("/z", "z", "Exact"))]))])
    assert routes.route("foo.com", "/nothing") is None and routes.route("other.com", "/a") is None
    assert [(l.path, l.exact) for l in routes.servers[0].locations] == [("/z", True), ("/a/b/c", False),
                                                                        ("/a", False)]
    assert routes.backends() == {sb("a"), sb("abc"), sb("z")}


def test_merging_ingresses_older_wins_conflicts():
    old = ingress("old", [rule("foo.com", path("/", "old-root"), path("/shared", "old-shared"))],
                  created="2026-01-01T00:00:00Z", defaultBackend=be("old-default"))
    new = ingress("new", [rule("foo.com", path("/shared/", "new-shared"), path("/new", "new")),
                          rule("bar.com", path("/", "bar"))], ns="other",
                  created="2026-02-01T00:00:00Z", defaultBackend=be("new-default"))
    routes = build_routes([parse_ingress(new), parse_ingress(old)])
    assert routes.route("foo.com", "/shared/x") == sb("old-shared")       # /shared/ normalises to /shared
    assert routes.route("foo.com", "/new") == sb("new", ns="other")       # rules of one host merge
    # fallbacks: a host's own Ingress's defaultBackend, else the oldest one
    assert routes.route("bar.com", "/") == sb("bar", ns="other")
    assert routes.server_for("bar.com").fallback == sb("new-default", ns="other")
    assert routes.server_for("foo.com").fallback == sb("old-default")
    assert routes.route("unknown.com", "/") == sb("old-default")
    assert any("Prefix foo.com/shared/ is already defined by Ingress shop/old" in c for c in routes.conflicts)
    assert any("defaultBackend other/new-default:80 is used for its own hosts only" in c
               for c in routes.conflicts)


def test_tls_hosts_wildcards_and_default_certificate():
    a = ingress("a", [rule("foo.com", path("/", "a")), rule("x.wild.com", path("/", "x")),
                      rule("*.wild.com", path("/", "w"))],
                tls=[{"hosts": ["foo.com"], "secretName": "foo-tls"}, {"hosts": ["*.wild.com"], "secretName": "wild"},
                     {"hosts": ["only-tls.com"], "secretName": "only"}, {"secretName": "default-tls"}],
                created="2026-01-01T00:00:00Z")
    b = ingress("b", [rule("foo.com", path("/b", "b"))], tls=[{"hosts": ["foo.com"], "secretName": "b-tls"}],
                created="2026-02-01T00:00:00Z")
    routes = build_routes([parse_ingress(a), parse_ingress(b)])
    tls = {s.host: s.tls for s in routes.servers}
    assert tls == {"foo.com": ("shop", "foo-tls"), "x.wild.com": ("shop", "wild"), "only-tls.com": ("shop", "only"),
                   "*.wild.com": ("shop", "wild")}
    assert routes.default.tls == ("shop", "default-tls")
    assert [s.host for s in routes.servers] == ["foo.com", "only-tls.com", "x.wild.com", "*.wild.com"]
    assert routes.route("only-tls.com", "/") is None
    assert routes.secrets() == {("shop", s) for s in ("foo-tls", "wild", "only", "default-tls")}
    assert any("TLS Secret shop/b-tls for foo.com ignored" in c for c in routes.conflicts)


# ---- backends --------------------------------------------------------------------------------------

def test_resolve_backends():
    services = {
        ("shop", "web"): {"spec": {"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9000}]}},
        ("shop", "one"): {"spec": {"clusterIP": "None", "ports": [{"port": 80}]}},      # headless is fine
        ("shop", "dns"): {"spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}},
        ("shop", "dns2"): {"spec": {"ports": [{"name": "dns-udp", "port": 53, "protocol": "UDP"},
                                              {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
        ("shop", "ext"): {"spec": {"type": "ExternalName", "externalName": "example.com"}},
    }
    endpoints = {
        ServicePortName("shop", "web", "http"): (Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.2", 8080, ready=False),
                                                 Endpoint("fd00::3", 8080)),
        ServicePortName("shop", "web", "admin"): (Endpoint("10.0.0.1", 9090),),
        ServicePortName("shop", "one", ""): (Endpoint("10.0.0.9", 80),),
        ServicePortName("shop", "dns2", "dns-tcp"): (Endpoint("10.0.0.53", 53),),
    }
    backends = [sb("web"), sb("web", "admin"), sb("web", 81), sb("one"), sb("dns", 53), sb("ext"), sb("gone"),
                sb("web", "metrics"), sb("dns2", 53)]
    ups = resolve_backends(backends, services, endpoints)
    assert ups[sb("dns2", 53)].servers == ("10.0.0.53:53",)       # the TCP one of two ports 53
    assert ups[sb("web")].servers == ("10.0.0.1:8080", "[fd00::3]:8080")
    assert ups[sb("web")].name == "pn_shop_web_80"
    assert ups[sb("web", "admin")].servers == ("10.0.0.1:9090",) and ups[sb("web", "admin")].name == "pn_shop_web_admin"
    assert ups[sb("one")].servers == ("10.0.0.9:80",)
    reasons = {str(b): ups[b].reason for b in backends if not ups[b].servers}
    assert reasons == {
        "shop/web:81": "Service shop/web has no port 81",
        "shop/web:metrics": "Service shop/web has no port named 'metrics'",
        "shop/dns:53": "Service shop/dns:53 port 53 is 'UDP', not TCP",
        "shop/ext:80": "Service shop/ext is of type ExternalName (not supported)",
        "shop/gone:80": "Service shop/gone not found",
    }
    endpoints[ServicePortName("shop", "web", "http")] = (Endpoint("10.0.0.2", 8080, ready=False),)
    assert resolve_backends([sb("web")], services, endpoints)[sb("web")].reason == \
        "Service shop/web:80 has no ready endpoints"
