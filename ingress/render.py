"""Routes + upstreams -> one nginx.conf (templates/nginx.conf.j2). Pure: no I/O but
reading the template.

`nginx_view` computes everything the template prints (plain dicts, unit-
tested); the template only formats it. How Kubernetes matching maps onto
nginx's location choice (exact `=` first, then the longest prefix; no regex
locations at all, so nothing else can interfere):

- Exact /p            -> `location = "/p"`
- Prefix /p (p != /)  -> `location = "/p"` and `location "/p/"`: /p itself and
                         everything below it element-wise, never /pq. The `=`
                         location also keeps nginx from answering /p with its
                         automatic 301 to /p/.
- Prefix /            -> `location "/"`
- Exact and Prefix of one path: the Exact one takes `= "/p"`, the Prefix
  keeps `"/p/"` (Kubernetes: Exact beats Prefix on equal paths).
- no Prefix /         -> `location "/"` serves the server's fallback: the
                         default backend, or 404.
An Exact match always wins in nginx, and any Prefix that matches a path is at
most as long as it; among prefixes nginx's longest match is the longest
Kubernetes path. So nginx picks what `Routes.route` picks (checked in the
netns tests).

Hosts: an exact host is a plain `server_name`; `*.example.com` becomes the
regex `~^[^.]+\\.example\\.com$`, because nginx's own `*.example.com` also
matches a.b.example.com, and Kubernetes' wildcard is one label. nginx tries
exact names before regexes, so exact hosts win, as Kubernetes wants; two
single-label wildcards never match one name, so their order does not matter.
SNI picks the server, and its certificate, by the same rules. The default
server takes every other host: the catch-all rules, else the default backend,
else 404; on HTTPS it rejects the handshake unless a TLS entry without hosts
gave it a certificate.

A backend without ready endpoints (or whose Service is missing) is a
`return 503` instead of a proxy_pass: nginx wants at least one server per
upstream block.
"""
import hashlib
import os
import re
from dataclasses import dataclass

HASH_PLACEHOLDER = "@@PODNET_CONFIG_HASH@@"
TEMPLATE = "nginx.conf.j2"
_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


@dataclass(frozen=True)
class Options:
    state_dir: str
    http_port: int = 80
    https_port: int = 443
    status_port: int = 10246        # 127.0.0.1 only; 0: no status server
    workers: str = "auto"
    keepalive: int = 32             # idle connections kept per upstream (per worker); 0: none
    ipv6: bool = False              # also listen on [::]
    access_log: bool = False
    worker_connections: int = 1024
    shutdown_timeout: int = 240     # seconds old workers may finish requests after a reload
    user: str = ""                  # nginx `user` of the workers; "": nginx's default (nobody)


def server_names(host):
    """nginx server_name values for an Ingress host ("" -> the default server "_")."""
    if not host:
        return ["_"]
    if host.startswith("*."):
        return ["~^[^.]+%s$" % re.escape(host[1:]).replace("\\-", "-")]
    return [host]


def quote(text):
    """An nginx string argument, double-quoted."""
    text = str(text)
    if any(c in text for c in "\n\r\0"):
        raise ValueError("cannot put %r in an nginx config" % text)
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def comment(text):
    """Text safe on one nginx comment line: printable ASCII only."""
    return re.sub(r"[^\x20-\x7e]", "?", str(text))


def _action(backend, upstreams, what):
    """How a location answers: proxy to an upstream, or a status with the reason."""
    if backend is None:
        return {"upstream": None, "status": 404, "comment": "%s: no backend" % what}
    up = upstreams.get(backend)
    if up is None:
        return {"upstream": None, "status": 503, "comment": "%s -> %s: not resolved" % (what, backend)}
    if not up.servers:
        return {"upstream": None, "status": 503, "comment": "%s -> %s: %s" % (what, backend, up.reason)}
    return {"upstream": up.name, "status": None, "comment": "%s -> %s" % (what, backend)}


def _locations(server, upstreams):
    out = []
    exact_paths = {loc.path for loc in server.locations if loc.exact}
    has_root = False
    for loc in server.locations:
        what = "%s %s (%s)" % ("Exact" if loc.exact else "Prefix", loc.path, loc.ingress)
        action = _action(loc.backend, upstreams, what)
        if loc.exact:
            out.append(dict(action, modifier="=", path=loc.path))
        elif loc.path == "/":
            has_root = True
            out.append(dict(action, modifier="", path="/"))
        else:
            if loc.path not in exact_paths:
                out.append(dict(action, modifier="=", path=loc.path))
            out.append(dict(action, modifier="", path=loc.path + "/"))
    if not has_root:
        out.append(dict(_action(server.fallback, upstreams, "fallback"), modifier="", path="/"))
    return out


def nginx_view(routes, upstreams, certs, options):
    """Everything the template prints. certs: {(namespace, secret): (crt path, key path)}
    for the Secrets that are usable; a server whose Secret is not there gets no HTTPS."""
    servers = []
    for server in routes.servers + (routes.default,):
        cert = certs.get(server.tls) if server.tls is not None else None
        servers.append({
            "host": server.host or "(default)",
            "default": not server.host,
            "names": server_names(server.host),
            "cert": cert[0] if cert else None,
            "key": cert[1] if cert else None,
            "tls_missing": "%s/%s" % server.tls if server.tls is not None and not cert else None,
            "locations": _locations(server, upstreams),
        })
    used = {loc["upstream"] for s in servers for loc in s["locations"] if loc["upstream"]}
    ups = [{"name": up.name, "backend": str(up.backend), "servers": list(up.servers)}
           for up in sorted(upstreams.values(), key=lambda u: u.name) if up.name in used]
    state = options.state_dir.rstrip("/") or "/"
    return {
        "o": options,
        "state": state,
        "paths": {name: os.path.join(state, *parts) for name, parts in {
            "pid": ("nginx.pid",), "lock": ("nginx.lock",), "error_log": ("logs", "error.log"),
            "access_log": ("logs", "access.log"), "client_body": ("tmp", "client_body"),
            "proxy": ("tmp", "proxy"), "fastcgi": ("tmp", "fastcgi"), "uwsgi": ("tmp", "uwsgi"),
            "scgi": ("tmp", "scgi")}.items()},
        "servers": servers,
        "upstreams": ups,
    }


_env = None


def _template():
    global _env
    if _env is None:
        import jinja2
        _env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=False,
                                  undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                  keep_trailing_newline=True)
        _env.filters["q"] = quote
        _env.filters["c"] = comment
    return _env.get_template(TEMPLATE)


def render(routes, upstreams, certs, options):
    """-> (config text, hash). The hash (of the text without it) is served by the status server
    at /podnet/config, so the controller can tell when a reload has taken effect."""
    text = _template().render(**nginx_view(routes, upstreams, certs, options), config_hash=HASH_PLACEHOLDER)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text.replace(HASH_PLACEHOLDER, digest), digest
