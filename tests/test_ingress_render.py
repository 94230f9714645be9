"""ingress.render: the nginx configuration, and a check that nginx's location and
server choice (simulated here; exercised for real in netns_tests/test_ingress.py) gives
Kubernetes' precedence as model.Routes.route defines it."""
import re

import pytest

from ingress import model, render
from ingress.model import Upstream
from kube_proxy.model import Endpoint, ServicePortName
from tests.test_ingress_model import PRECEDENCE, be, ingress, path, rule


def routes_of(*objs):
    return model.build_routes([model.parse_ingress(o) for o in objs])


def all_up(routes):
    """Every backend resolved to one endpoint named after it."""
    return {b: Upstream(model.upstream_name(b), b, ("10.0.0.1:%d" % (8000 + i),))
            for i, b in enumerate(sorted(routes.backends()))}


# ---- a model of nginx's choice -------------------------------------------------------------------

def nginx_server(view, host):
    host = model.normalize_request_host(host)
    servers = [s for s in view["servers"] if not s["default"]]
    for s in servers:
        if host in s["names"]:
            return s
    for s in servers:
        for name in s["names"]:
            if name.startswith("~") and re.search(name[1:], host):
                return s
    return next(s for s in view["servers"] if s["default"])


def nginx_location(server, uri):
    """nginx without regex locations: an `=` match, else the longest matching prefix."""
    for loc in server["locations"]:
        if loc["modifier"] == "=" and loc["path"] == uri:
            return loc
    prefixes = [loc for loc in server["locations"] if not loc["modifier"] and uri.startswith(loc["path"])]
    return max(prefixes, key=lambda loc: len(loc["path"]))


REQUESTS = ["/", "/api", "/api/", "/api/v1/x", "/apix", "/api/v2", "/api/v2/", "/api/v2/users", "/api/v22",
            "/exact", "/exact/", "/exact/more", "/app", "/app/", "/app/x", "/appx", "/catch", "/catch/x",
            "/catchy", "/other", "/a/b/c"]
HOSTS = ["foo.example.com", "FOO.example.com:8080", "bar.example.com", "a.bar.example.com", "example.com",
         "10.1.2.3", ""]


def test_nginx_choice_is_kubernetes_precedence():
    extra = ingress("more", [rule("foo.example.com", path("/exact/", "exact-slash", "Exact"),
                                  path("/a/b", "ab"), path("/a/b/c", "abc", "Exact"),
                                  path("/", "root-exact", "Exact"))],
                    created="2027-01-01T00:00:00Z")
    routes = routes_of(PRECEDENCE, extra)
    ups = all_up(routes)
    by_name = {u.name: b for b, u in ups.items()}
    view = render.nginx_view(routes, ups, {}, render.Options("/state"))
    checked = 0
    for host in HOSTS:
        for uri in REQUESTS:
            loc = nginx_location(nginx_server(view, host), uri)
            got = by_name.get(loc["upstream"])
            assert got == routes.route(host, uri), (host, uri, loc)
            checked += 1
    assert checked == len(HOSTS) * len(REQUESTS)


def test_locations_of_one_server():
    routes = routes_of(PRECEDENCE)
    view = render.nginx_view(routes, all_up(routes), {}, render.Options("/state"))
    foo = view["servers"][0]
    assert foo["names"] == ["foo.example.com"]
    assert [(l["modifier"], l["path"]) for l in foo["locations"]] == [
        ("=", "/api/v2"), ("=", "/exact"),            # Exact
        ("", "/api/v2/"),                             # Prefix /api/v2 (its "=" is the Exact one's)
        ("=", "/api"), ("", "/api/"),
        ("=", "/app"), ("", "/app/"),                 # Prefix /app/ (trailing slash ignored)
        ("", "/")]                                    # Prefix /
    wild = view["servers"][1]
    assert wild["names"] == [r"~^[^.]+\.example\.com$"]
    default = view["servers"][2]
    assert default["default"] and default["names"] == ["_"]
    assert [(l["modifier"], l["path"], l["upstream"]) for l in default["locations"]] == [
        ("=", "/catch", "pn_shop_catch-all_80"), ("", "/catch/", "pn_shop_catch-all_80"),
        ("", "/", "pn_shop_default_80")]


def test_wildcard_regex_is_one_label():
    (name,) = render.server_names("*.my-site.example.com")
    regex = re.compile(name[1:])
    assert regex.search("a.my-site.example.com") and regex.search("a-b.my-site.example.com")
    assert not regex.search("a.b.my-site.example.com") and not regex.search("my-site.example.com")
    assert not regex.search("axmy-site.example.com") and not regex.search("a.my-siteXexample.com")


def test_rendered_config():
    routes = routes_of(
        ingress("a", [rule("foo.com", path("/", "web")), rule("nocert.com", path("/", "gone"))],
                tls=[{"hosts": ["foo.com"], "secretName": "foo-tls"}, {"hosts": ["nocert.com"], "secretName": "x"}]))
    ups = model.resolve_backends(routes.backends(), {("shop", "web"): {"spec": {"ports": [{"port": 80}]}}},
                                 {ServicePortName("shop", "web", ""): (Endpoint("10.0.0.1", 8080),)})
    certs = {("shop", "foo-tls"): ("/st/certs/abc.crt", "/st/certs/abc.key")}
    text, digest = render.render(routes, ups, certs, render.Options("/st", status_port=10246))
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert 'return 200 "%s\\n";' % digest in text
    for line in ['pid "/st/nginx.pid";', 'error_log "/st/logs/error.log" notice;', 'lock_file "/st/nginx.lock";',
                 'proxy_temp_path "/st/tmp/proxy";', 'client_body_temp_path "/st/tmp/client_body";',
                 "daemon off;", "access_log off;", "proxy_set_header Host $pn_host;",
                 "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                 "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header X-Real-IP $remote_addr;",
                 "upstream pn_shop_web_80 {", "server 10.0.0.1:8080 max_fails=1 fail_timeout=10s;",
                 "keepalive 32;", "proxy_pass http://pn_shop_web_80;",
                 'ssl_certificate "/st/certs/abc.crt";', 'ssl_certificate_key "/st/certs/abc.key";',
                 "listen 80 default_server;", "listen 443 ssl default_server;", "ssl_reject_handshake on;",
                 "listen 127.0.0.1:10246;", "# nocert.com (TLS Secret shop/x missing or unusable: no HTTPS)",
                 "# Prefix / (shop/a) -> shop/gone:80: Service shop/gone not found"]:
        assert line in text, line
    assert "/etc/nginx" not in text and "include" not in text
    assert "upstream pn_shop_gone_80" not in text              # no endpoints: a 503, no upstream
    servers = text.split("server {")
    nocert = next(s for s in servers if "server_name nocert.com;" in s)
    assert "listen 443" not in nocert and "return 503;" in nocert
    foo = next(s for s in servers if "server_name foo.com;" in s)
    assert "listen 443 ssl;" in foo
    # same input, same text; a change, another hash
    assert render.render(routes, ups, certs, render.Options("/st", status_port=10246)) == (text, digest)
    assert render.render(routes, ups, {}, render.Options("/st", status_port=10246))[1] != digest


def test_options_keepalive_ipv6_access_log_default_cert():
    routes = routes_of(ingress("a", defaultBackend=be("web"), tls=[{"secretName": "d"}]))
    ups = all_up(routes)
    opts = render.Options("/state dir", http_port=8080, https_port=8443, status_port=0, keepalive=0, ipv6=True,
                          access_log=True, workers="2")
    text, _ = render.render(routes, ups, {("shop", "d"): ("/c.crt", "/c.key")}, opts)
    assert "keepalive " not in text.replace("keepalive_", "") and '"" "close";' in text
    for line in ["listen 8080 default_server;", "listen [::]:8080 default_server;", "listen 8443 ssl default_server;",
                 "listen [::]:8443 ssl default_server;", 'access_log "/state dir/logs/access.log";',
                 "worker_processes 2;", 'ssl_certificate "/c.crt";']:
        assert line in text, line
    assert "ssl_reject_handshake" not in text and "127.0.0.1:" not in text


def test_quote_and_comment():
    assert render.quote('/a"b\\c') == '"/a\\"b\\\\c"'
    with pytest.raises(ValueError):
        render.quote("a\nb")
    assert render.comment("x\n}\nserver {") == "x?}?server {"
