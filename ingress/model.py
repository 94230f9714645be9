"""The Ingress controller's view of the cluster, as plain immutable data. Pure: no I/O.

Objects in (the JSON shapes of networking.k8s.io/v1 Ingress and IngressClass,
v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Secret of type
kubernetes.io/tls), routing out:

- `parse_ingress` / `parse_ingress_class` / `parse_tls_secret` validate one
  object and raise `InvalidIngress` (a podnet.kube.objects.InvalidObject) with
  the field and the reason ("spec.rules[0].http.paths[1].pathType: 'Regex' is
  not Exact, Prefix or ImplementationSpecific"); `ingress_or_error` logs it.
  The controller skips a bad object and every other one keeps working.
- `owned` decides whether an Ingress is this controller's (below).
- `build_routes` merges the owned Ingresses into `Routes`: one `Server` per
  host plus the catch-all default server, each with its `Location`s.
- `resolve_backends` turns each Service backend into an `Upstream`: the
  ready endpoints' ip:port, or the reason why there are none (503).
- `Routes.route(host, path)` is the Kubernetes matching semantics in Python,
  the reference the nginx rendering is checked against.

Which Ingresses are ours (`owned`), given our IngressClass name (default
"podnet") and controller name (default "podnet.io/ingress-nginx"):
1. spec.ingressClassName set: ours if the IngressClass of that name has our
   controller; if no IngressClass of that name exists (a manifests directory
   without one), ours if the name is our class name.
2. else the deprecated `kubernetes.io/ingress.class` annotation: ours if it
   is our class name, or names an IngressClass with our controller.
3. else (no class): ours if the default IngressClass (annotation
   `ingressclass.kubernetes.io/is-default-class: "true"`; the most recently
   created if several, as the admission plugin picks) has our controller, or
   if the controller was told to take Ingresses without a class.

Matching (the Ingress v1 spec):
- hosts: an exact host beats a wildcard; `*.example.com` matches exactly one
  more label (`a.example.com`, not `a.b.example.com`, not `example.com`);
  rules without a host are the catch-all, used only for requests whose host
  has no rule of its own (as ingress-nginx: the host is chosen first, then
  the path; an unmatched path of a known host does not fall through to the
  catch-all rules).
- paths: Exact matches the path exactly (case-sensitive, `/foo` is not
  `/foo/`); Prefix matches element-wise on `/`-separated elements, trailing
  slash ignored: `/foo` matches `/foo`, `/foo/` and `/foo/bar` but not
  `/foobar`. ImplementationSpecific is treated as Prefix (no regexes: a path
  is always literal). The longest matching path wins; on equal paths Exact
  beats Prefix.
- when two Ingresses define the same host + path + type (ImplementationSpecific
  counting as Prefix), the older one (creationTimestamp, then namespace/name)
  wins and the conflict is reported.
- no path matches: the host's fallback backend — the defaultBackend of the
  oldest Ingress with rules for that host that has one, else the cluster-wide
  default (the oldest Ingress's defaultBackend), else 404.

TLS: each `spec.tls` entry names hosts and a Secret in the Ingress's
namespace. A host server uses the entry naming its host, else one naming a
wildcard that matches it; an entry without hosts gives the catch-all server
its certificate. A TLS host without rules still gets a server (its requests
go to the fallback).

Paths are restricted to RFC 3986 path characters without percent-encoding
(A-Z a-z 0-9 / - . _ ~ ! $ & ' ( ) * + , ; = : @), because nginx matches the
decoded, normalised URI: an encoded path could never match as written, and
nothing outside that set can reach the nginx configuration.
"""
import base64
import binascii
import ipaddress
import logging
import re
from dataclasses import dataclass, field

from podnet.kube.endpointslices import ServicePortName
from podnet.kube.objects import DNS_SUBDOMAIN as _DNS_SUBDOMAIN
from podnet.kube.objects import InvalidObject, get_field, is_dns_label, is_port_name, parse_or_skip
from podnet.kube.objects import short as _short

log = logging.getLogger("ingress.model")

CONTROLLER_NAME = "podnet.io/ingress-nginx"
CLASS_NAME = "podnet"
CLASS_ANNOTATION = "kubernetes.io/ingress.class"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")

_PATH_CHARS = re.compile(r"[A-Za-z0-9/._~!$&'()*+,;=:@-]*")
_CONTROLLER = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9._/-]+\Z")


class InvalidIngress(InvalidObject):
    """An Ingress (IngressClass, TLS Secret) that cannot be used; the message says where and why."""


# ---- the data -------------------------------------------------------------------

@dataclass(frozen=True, slots=True, order=True)
class ServiceBackend:
    """A Service port an Ingress sends to: by number, or by the Service port's name."""
    namespace: str
    service: str
    port_number: int = 0
    port_name: str = ""

    def __str__(self):
        return "%s/%s:%s" % (self.namespace, self.service, self.port_number or self.port_name)


@dataclass(frozen=True, slots=True)
class IngressPath:
    path: str                   # as written ("/" for an ImplementationSpecific path left empty)
    path_type: str              # Exact | Prefix | ImplementationSpecific
    backend: ServiceBackend

    @property
    def exact(self):
        return self.path_type == "Exact"

    @property
    def match_path(self):
        """The path matched: as written for Exact, without trailing slashes for a prefix."""
        return self.path if self.exact else normalize_prefix(self.path)


@dataclass(frozen=True, slots=True)
class IngressRule:
    host: str                   # "" for every host (the catch-all)
    paths: tuple = ()           # (IngressPath, ...)


@dataclass(frozen=True, slots=True)
class IngressTLS:
    hosts: tuple                # () for the catch-all
    secret_name: str


@dataclass(frozen=True, slots=True)
class Ingress:
    namespace: str
    name: str
    class_name: str = ""        # spec.ingressClassName
    class_annotation: str = ""  # the deprecated kubernetes.io/ingress.class annotation
    rules: tuple = ()
    default_backend: ServiceBackend | None = None
    tls: tuple = ()
    created: str = ""           # metadata.creationTimestamp (RFC 3339: sorts as text)

    def __str__(self):
        return "%s/%s" % (self.namespace, self.name)

    @property
    def age_key(self):
        """Oldest first; namespace/name break ties (manifests often carry no timestamps)."""
        return (self.created or "", self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class IngressClass:
    name: str
    controller: str
    is_default: bool = False
    created: str = ""


@dataclass(frozen=True, slots=True)
class TlsSecret:
    namespace: str
    name: str
    cert: bytes = field(repr=False)       # PEM: the certificate chain
    key: bytes = field(repr=False)        # PEM: the private key


@dataclass(frozen=True, slots=True)
class Location:
    path: str                   # the match path (see IngressPath.match_path)
    exact: bool
    backend: ServiceBackend
    ingress: str                # "ns/name" of the Ingress that defined it

    def matches(self, request_path):
        return path_matches(self.path, self.exact, request_path)


@dataclass(frozen=True, slots=True)
class Server:
    host: str                   # "" for the catch-all default server
    locations: tuple = ()       # (Location, ...): Exact first, then longest path first
    fallback: ServiceBackend | None = None      # for requests no location matches; None: 404
    tls: tuple[str, str] | None = None          # (namespace, secret name) or None

    @property
    def wildcard(self):
        return self.host.startswith("*.")

    def match(self, request_path):
        """The Location serving request_path (Kubernetes precedence), or None."""
        best = None
        for loc in self.locations:
            if loc.matches(request_path) and (best is None or (len(loc.path), loc.exact) >
                                              (len(best.path), best.exact)):
                best = loc
        return best


@dataclass(frozen=True, slots=True)
class Routes:
    servers: tuple = ()         # host servers: exact hosts (sorted), then wildcards (sorted)
    default: Server = Server("")
    conflicts: tuple = ()       # human-readable reports of what lost a conflict

    def server_for(self, host):
        """The server a request for `host` (a Host header or SNI name) goes to."""
        host = normalize_request_host(host)
        for server in self.servers:
            if not server.wildcard and server.host == host:
                return server
        for server in self.servers:
            if server.wildcard and host_matches(server.host, host):
                return server
        return self.default

    def route(self, host, request_path):
        """The ServiceBackend for a request, or None (404). request_path as nginx matches it:
        without the query, decoded, `.` / `..` resolved and slashes merged."""
        server = self.server_for(host)
        loc = server.match(request_path)
        return loc.backend if loc is not None else server.fallback

    def backends(self):
        """Every ServiceBackend some location or fallback uses."""
        out = set()
        for server in self.servers + (self.default,):
            out.update(loc.backend for loc in server.locations)
            if server.fallback is not None:
                out.add(server.fallback)
        return out

    def secrets(self):
        """Every (namespace, name) of a TLS Secret some server uses."""
        return {s.tls for s in self.servers + (self.default,) if s.tls is not None}


@dataclass(frozen=True, slots=True)
class Upstream:
    """What nginx sends a backend's requests to: ready endpoints, or nothing and why (503)."""
    name: str                   # the nginx upstream name
    backend: ServiceBackend
    servers: tuple = ()         # ("10.244.1.2:8080", "[fd00::2]:8080", ...)
    reason: str = ""            # why `servers` is empty


# ---- matching ----------------------------------------------------------------------

def normalize_prefix(path):
    """A Prefix path without its trailing slashes ("/" stays "/")."""
    return path.rstrip("/") or "/"


def _elements(path):
    return [e for e in path.split("/") if e]


def path_matches(path, exact, request_path):
    """Kubernetes path matching: Exact is string equality; Prefix compares `/`-separated
    elements, so /foo matches /foo, /foo/ and /foo/bar but not /foobar."""
    if exact:
        return request_path == path
    prefix = _elements(path)
    return _elements(request_path)[:len(prefix)] == prefix


def host_matches(pattern, host):
    """An Ingress host against a request's host: equal, or `*.rest` and host is one label + `.rest`."""
    if not pattern.startswith("*."):
        return pattern == host
    label, dot, rest = host.partition(".")
    return bool(label) and bool(dot) and rest == pattern[2:]


def normalize_request_host(host):
    """A Host header as nginx compares it: lower case, without port and trailing dot."""
    host = (host or "").strip().lower()
    if host.startswith("["):                         # an IPv6 literal
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


# ---- parsing ----------------------------------------------------------------------

def _get(obj, key, where, kind=dict, required=False, default=None):
    """The shared field getter (podnet.kube.objects), raising InvalidIngress."""
    try:
        return get_field(obj, key, where, kind, required, default)
    except InvalidIngress:
        raise
    except InvalidObject as e:
        raise InvalidIngress(str(e)) from None


def _meta(obj, what, namespaced=True):
    if not isinstance(obj, dict):
        raise InvalidIngress("%s is not an object but %s" % (what, type(obj).__name__))
    meta = _get(obj, "metadata", "", required=True)
    name = _get(meta, "name", "metadata.", str, required=True)
    namespace = ""
    if namespaced:
        namespace = _get(meta, "namespace", "metadata.", str, default="default")
        if not is_dns_label(namespace):
            raise InvalidIngress("metadata.namespace: %s is not a valid namespace" % _short(namespace))
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise InvalidIngress("metadata.name: %s is not a valid %s name" % (_short(name), what))
    created = meta.get("creationTimestamp")
    return meta, namespace, name, created if isinstance(created, str) else ""


def check_host(host, where, allow_wildcard=True):
    """A rule or TLS host: a lower-case DNS name, optionally `*.` + a DNS name; not an IP."""
    if not isinstance(host, str):
        raise InvalidIngress("%s: expected a string, got %s" % (where, _short(host)))
    name = host[2:] if allow_wildcard and host.startswith("*.") else host
    if _is_ip(host):
        raise InvalidIngress("%s: %s is an IP address; hosts must be DNS names" % (where, _short(host)))
    if "*" in name:
        raise InvalidIngress("%s: %s: a wildcard must be the whole first label (*.example.com)"
                             % (where, _short(host)))
    if ":" in name:
        raise InvalidIngress("%s: %s: a host carries no port" % (where, _short(host)))
    if len(host) > 253 or not _DNS_SUBDOMAIN.match(name) or any(len(l) > 63 for l in name.split(".")):
        raise InvalidIngress("%s: %s is not a valid lower-case DNS name" % (where, _short(host)))
    return host


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_path(path, where):
    """A path of type Exact / Prefix / ImplementationSpecific (treated as Prefix)."""
    if not isinstance(path, str):
        raise InvalidIngress("%s: expected a string, got %s" % (where, _short(path)))
    if not path.startswith("/"):
        raise InvalidIngress("%s: %s must be an absolute path (start with /)" % (where, _short(path)))
    bad = path[_PATH_CHARS.match(path).end():][:1]
    if bad:
        what = "percent-encoding is not supported (nginx matches the decoded path)" if bad == "%" else \
            "%r is not allowed in a path" % bad
        raise InvalidIngress("%s: %s: %s" % (where, _short(path), what))
    for seq in ("//", "/./", "/../"):
        if seq in path:
            raise InvalidIngress("%s: %s must not contain %r" % (where, _short(path), seq))
    if path.endswith(("/..", "/.")):
        raise InvalidIngress("%s: %s must not end with /. or /.." % (where, _short(path)))
    return path


def parse_backend(backend, where):
    """spec.defaultBackend or a path's backend -> ServiceBackend (namespace filled in later)."""
    if not isinstance(backend, dict):
        raise InvalidIngress("%s: expected an object, got %s" % (where, _short(backend)))
    if backend.get("resource") is not None:
        raise InvalidIngress("%s.resource: resource backends are not supported (only Services)" % where)
    svc = backend.get("service")
    if svc is None:
        raise InvalidIngress("%s.service: missing (a backend needs a Service)" % where)
    svc = _get(backend, "service", where + ".", dict)
    name = _get(svc, "name", where + ".service.", str, required=True)
    if not is_dns_label(name):
        raise InvalidIngress("%s.service.name: %s is not a valid Service name" % (where, _short(name)))
    port = _get(svc, "port", where + ".service.", dict, required=True)
    number, port_name = port.get("number"), port.get("name")
    if (number is None) == (port_name is None):
        raise InvalidIngress("%s.service.port: needs exactly one of number and name" % where)
    if number is not None:
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            raise InvalidIngress("%s.service.port.number: %s is not a port number (1-65535)"
                                 % (where, _short(number)))
        return ServiceBackend("", name, number, "")
    if not is_port_name(port_name):
        raise InvalidIngress("%s.service.port.name: %s is not a valid port name (IANA service name: "
                             "1-15 of a-z 0-9 -, a letter at least)" % (where, _short(port_name)))
    return ServiceBackend("", name, 0, port_name)


def parse_ingress(obj):
    """A networking.k8s.io/v1 Ingress -> Ingress. Raises InvalidIngress."""
    meta, namespace, name, created = _meta(obj, "Ingress")
    annotations = _get(meta, "annotations", "metadata.", dict, default={})
    class_annotation = annotations.get(CLASS_ANNOTATION) or ""
    if not isinstance(class_annotation, str):
        raise InvalidIngress("metadata.annotations[%s]: expected a string" % CLASS_ANNOTATION)
    spec = _get(obj, "spec", "", dict, required=True)
    class_name = _get(spec, "ingressClassName", "spec.", str, default="")
    if class_name and (len(class_name) > 253 or not _DNS_SUBDOMAIN.match(class_name)):
        raise InvalidIngress("spec.ingressClassName: %s is not a valid IngressClass name" % _short(class_name))

    def backend_of(value, where):
        b = parse_backend(value, where)
        return ServiceBackend(namespace, b.service, b.port_number, b.port_name)

    default = spec.get("defaultBackend")
    default = backend_of(default, "spec.defaultBackend") if default is not None else None
    rules = []
    for i, rule in enumerate(_get(spec, "rules", "spec.", list, default=[])):
        where = "spec.rules[%d]" % i
        if not isinstance(rule, dict):
            raise InvalidIngress("%s: expected an object" % where)
        host = rule.get("host") or ""
        if host:
            check_host(host, where + ".host")
        http = _get(rule, "http", where + ".", dict, default=None)
        paths = []
        if http is not None:
            items = _get(http, "paths", where + ".http.", list, required=True)
            if not items:
                raise InvalidIngress("%s.http.paths: empty (an http rule needs at least one path)" % where)
            for j, item in enumerate(items):
                pwhere = "%s.http.paths[%d]" % (where, j)
                if not isinstance(item, dict):
                    raise InvalidIngress("%s: expected an object" % pwhere)
                path_type = item.get("pathType")
                if path_type is None:
                    raise InvalidIngress("%s.pathType: missing (Exact, Prefix or ImplementationSpecific)" % pwhere)
                if path_type not in PATH_TYPES:
                    raise InvalidIngress("%s.pathType: %s is not Exact, Prefix or ImplementationSpecific"
                                         % (pwhere, _short(path_type)))
                path = item.get("path")
                if path in (None, "") and path_type == "ImplementationSpecific":
                    path = "/"
                if path is None:
                    raise InvalidIngress("%s.path: missing (required for pathType %s)" % (pwhere, path_type))
                check_path(path, pwhere + ".path")
                if item.get("backend") is None:
                    raise InvalidIngress("%s.backend: missing" % pwhere)
                paths.append(IngressPath(path, path_type, backend_of(item["backend"], pwhere + ".backend")))
        rules.append(IngressRule(host, tuple(paths)))
    if not rules and default is None:
        raise InvalidIngress("spec: neither rules nor defaultBackend: nothing to serve")
    tls = []
    for i, entry in enumerate(_get(spec, "tls", "spec.", list, default=[])):
        where = "spec.tls[%d]" % i
        if not isinstance(entry, dict):
            raise InvalidIngress("%s: expected an object" % where)
        hosts = _get(entry, "hosts", where + ".", list, default=[])
        for j, host in enumerate(hosts):
            check_host(host, "%s.hosts[%d]" % (where, j))
        secret = _get(entry, "secretName", where + ".", str, default="")
        if not secret:
            log.debug("Ingress %s/%s: %s has no secretName; no certificate for %s", namespace, name, where,
                      ", ".join(hosts) or "the default server")
            continue
        if len(secret) > 253 or not _DNS_SUBDOMAIN.match(secret):
            raise InvalidIngress("%s.secretName: %s is not a valid Secret name" % (where, _short(secret)))
        tls.append(IngressTLS(tuple(hosts), secret))
    return Ingress(namespace, name, class_name, class_annotation, tuple(rules), default, tuple(tls), created)


def ingress_or_error(obj):
    """(Ingress, None) or (None, reason); the reason is logged."""
    return parse_or_skip("Ingress", parse_ingress, obj, (), None, log)


def parse_ingress_class(obj):
    """A networking.k8s.io/v1 IngressClass -> IngressClass. Raises InvalidIngress."""
    meta, _, name, created = _meta(obj, "IngressClass", namespaced=False)
    spec = _get(obj, "spec", "", dict, required=True)
    controller = _get(spec, "controller", "spec.", str, required=True)
    if len(controller) > 250 or not _CONTROLLER.match(controller):
        raise InvalidIngress("spec.controller: %s is not a domain-prefixed path" % _short(controller))
    annotations = _get(meta, "annotations", "metadata.", dict, default={})
    return IngressClass(name, controller, annotations.get(DEFAULT_CLASS_ANNOTATION) == "true", created)


def parse_tls_secret(obj):
    """A Secret of type kubernetes.io/tls -> TlsSecret (PEM bytes). Raises InvalidIngress.

    Checks the shape only (base64, PEM markers); whether the pair loads is the
    controller's check, with the TLS library."""
    _, namespace, name, _ = _meta(obj, "Secret")
    if obj.get("type") != "kubernetes.io/tls":
        raise InvalidIngress("type: %s is not kubernetes.io/tls" % _short(obj.get("type")))
    data = _get(obj, "data", "", dict, required=True)
    out = {}
    for key, marker in (("tls.crt", b"-----BEGIN CERTIFICATE-----"), ("tls.key", b"PRIVATE KEY-----")):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidIngress("data[%s]: missing" % key)
        try:
            pem = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidIngress("data[%s]: not valid base64" % key) from None
        if marker not in pem:
            raise InvalidIngress("data[%s]: not a PEM %s" % (key, "certificate" if key == "tls.crt" else "key"))
        out[key] = pem
    return TlsSecret(namespace, name, out["tls.crt"], out["tls.key"])


# ---- which Ingresses are ours ------------------------------------------------------------

def default_class(classes):
    """The default IngressClass of {name: IngressClass} (newest if several), or None."""
    defaults = [c for c in classes.values() if c.is_default]
    return max(defaults, key=lambda c: (c.created, c.name)) if defaults else None


def owned(ingress, classes, class_name=CLASS_NAME, controller=CONTROLLER_NAME, without_class=False):
    """Whether this controller serves `ingress` (rules in the module's docstring)."""
    if ingress.class_name:
        cls = classes.get(ingress.class_name)
        return cls.controller == controller if cls is not None else ingress.class_name == class_name
    if ingress.class_annotation:
        cls = classes.get(ingress.class_annotation)
        return ingress.class_annotation == class_name or (cls is not None and cls.controller == controller)
    default = default_class(classes)
    return without_class or (default is not None and default.controller == controller)


# ---- routes ---------------------------------------------------------------------------

class _ServerDraft:
    def __init__(self, host):
        self.host = host
        self.locations = {}         # (match path, exact) -> Location
        self.fallback = None
        self.tls = None


def build_routes(ingresses):
    """Owned Ingresses -> Routes, merged oldest first (the older one wins a conflict)."""
    ingresses = sorted(ingresses, key=lambda i: i.age_key)
    drafts, conflicts = {}, []
    default = _ServerDraft("")
    global_fallback = global_from = None
    tls_hosts, tls_default = {}, None
    for ing in ingresses:
        src = str(ing)
        if ing.default_backend is not None:
            if global_fallback is None:
                global_fallback, global_from = ing.default_backend, src
            elif global_fallback != ing.default_backend:
                conflicts.append("Ingress %s: defaultBackend %s is used for its own hosts only; "
                                 "Ingress %s's %s is the default for every other request"
                                 % (src, ing.default_backend, global_from, global_fallback))
        for rule in ing.rules:
            draft = drafts.setdefault(rule.host, _ServerDraft(rule.host)) if rule.host else default
            if rule.host and draft.fallback is None and ing.default_backend is not None:
                draft.fallback = ing.default_backend
            for p in rule.paths:
                key = (p.match_path, p.exact)
                old = draft.locations.get(key)
                if old is None:
                    draft.locations[key] = Location(p.match_path, p.exact, p.backend, src)
                elif old.backend != p.backend or old.ingress != src:
                    conflicts.append("Ingress %s: %s %s%s is already defined by Ingress %s (to %s); ignored"
                                     % (src, "Exact" if p.exact else "Prefix", rule.host or "*", p.path,
                                        old.ingress, old.backend))
        for entry in ing.tls:
            secret = (ing.namespace, entry.secret_name)
            if not entry.hosts:
                if tls_default is None:
                    tls_default = secret
                elif tls_default != secret:
                    conflicts.append("Ingress %s: TLS Secret %s/%s for the default server ignored; %s/%s is used"
                                     % ((src,) + secret + tls_default))
            for host in entry.hosts:
                if host not in tls_hosts:
                    tls_hosts[host] = secret
                elif tls_hosts[host] != secret:
                    conflicts.append("Ingress %s: TLS Secret %s/%s for %s ignored; %s/%s is used"
                                     % ((src,) + secret + (host,) + tls_hosts[host]))
    for host in tls_hosts:
        drafts.setdefault(host, _ServerDraft(host))
    servers = []
    for host in sorted(drafts, key=lambda h: (h.startswith("*."), h)):
        draft = drafts[host]
        tls = tls_hosts.get(host)
        if tls is None:
            tls = next((s for h, s in sorted(tls_hosts.items()) if h.startswith("*.") and host_matches(h, host)),
                       None)
        servers.append(Server(host, _ordered(draft.locations), draft.fallback or global_fallback, tls))
    return Routes(tuple(servers), Server("", _ordered(default.locations), global_fallback, tls_default),
                  tuple(conflicts))


def _ordered(locations):
    """Locations in matching order: Exact first, then the longest path first."""
    return tuple(sorted(locations.values(), key=lambda l: (not l.exact, -len(l.path), l.path)))


# ---- backends --------------------------------------------------------------------------

def upstream_name(backend):
    """An nginx upstream name for a backend; unique: namespaces and names have no '_'."""
    return "pn_%s_%s_%s" % (backend.namespace, backend.service, backend.port_number or backend.port_name)


def _service_port(service, backend):
    """The Service's port entry a backend means -> (port name, reason)."""
    spec = service.get("spec") if isinstance(service, dict) else None
    if not isinstance(spec, dict):
        return None, "Service %s/%s has no spec" % (backend.namespace, backend.service)
    if spec.get("type") == "ExternalName":
        return None, "Service %s/%s is of type ExternalName (not supported)" % (backend.namespace, backend.service)
    ports = spec.get("ports")
    if not isinstance(ports, list):
        ports = []
    other = None
    for port in ports:
        if not isinstance(port, dict):
            continue
        if (backend.port_number and port.get("port") == backend.port_number) or \
                (backend.port_name and port.get("name") == backend.port_name):
            if port.get("protocol", "TCP") != "TCP":        # e.g. 53/UDP beside 53/TCP
                other = other or port
                continue
            name = port.get("name") or ""
            return (name if isinstance(name, str) else ""), ""
    if other is not None:
        return None, "Service %s port %s is %s, not TCP" % (
            backend, _short(other.get("port")), _short(other.get("protocol")))
    return None, "Service %s/%s has no port %s" % (
        backend.namespace, backend.service,
        backend.port_number if backend.port_number else "named %r" % backend.port_name)


def resolve_backends(backends, services, endpoints):
    """ServiceBackends -> {ServiceBackend: Upstream}.

    services: {(namespace, name): Service object}; endpoints: {ServicePortName:
    (podnet.kube.endpointslices.Endpoint, ...)} as merged from EndpointSlices. The port is
    found in the Service (by number or name) and its name picks the slices'
    port, as kube-proxy matches them; only ready endpoints are used."""
    out = {}
    for backend in sorted(backends):
        name, servers = upstream_name(backend), ()
        service = services.get((backend.namespace, backend.service))
        if service is None:
            reason = "Service %s/%s not found" % (backend.namespace, backend.service)
        else:
            port_name, reason = _service_port(service, backend)
            if not reason:
                eps = endpoints.get(ServicePortName(backend.namespace, backend.service, port_name, "TCP"), ())
                servers = tuple(ep.addr for ep in eps if ep.ready)
                if not servers:
                    reason = "Service %s has no ready endpoints" % backend
        out[backend] = Upstream(name, backend, servers, reason)
    return out
