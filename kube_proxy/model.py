"""The proxy's view of Services and EndpointSlices, as plain immutable data.

Pure functions turn Kubernetes objects (the JSON shapes of core/v1 Service and
discovery.k8s.io/v1 EndpointSlice, as dicts) into:

- `ServicePortName`: which Service port ("ns/name:port" plus protocol), the key
  everything else is indexed by;
- `ServicePort`: what the rules of one Service port need (ClusterIP, port,
  NodePort, external and load-balancer IPs, traffic policies, affinity);
- `Endpoint`: one backend address:port with its ready/serving/terminating
  conditions and whether it runs on this node.

All three are frozen dataclasses: hashable and comparable, so a change is
detected with `!=` and a whole state can be diffed by key.

Validation is thorough because a manifests directory is written by people
and even the API can carry objects older than today's rules. A bad object is
never fatal: `service_ports()` and `slice_info()` log one specific reason
("skipping Service ns/web: spec.ports[1].port: 70000 is not a port number")
and return nothing for it, and every other object keeps working. The
`build_*` functions underneath raise `InvalidObject` instead, for callers that
want the reason.

What is ignored on purpose (logged at debug level, not an error): headless
Services (clusterIP None), ExternalName Services, Services without a ClusterIP
of the proxy's IP family (not allocated yet, or single-stack of the other
family), FQDN EndpointSlices and slices of the other family. Topology hints
are not used (topology-free).

Named target ports: the EndpointSlice controller resolves a Service port's
targetPort (a number or a container port name) per Pod and writes the result
into the slice, under the *Service port's* name. So endpoints are matched to
Service ports by (port name, protocol) of the slice's `ports`, exactly as
kube-proxy does; the Service's targetPort itself is validated but never used
to pick backend ports.
"""
import ipaddress
import logging
import re
from dataclasses import dataclass
from types import MappingProxyType

log = logging.getLogger("kube_proxy.model")

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
DEFAULT_AFFINITY_TIMEOUT = 10800            # seconds, the API's default for ClientIP
MAX_AFFINITY_TIMEOUT = 86400
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


class InvalidObject(ValueError):
    """An object that cannot be used; the message says where and why."""


# ---- the data ------------------------------------------------------------------

@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """One port of one Service. str() is kube-proxy's "ns/name:port" ("ns/name" when unnamed)."""
    namespace: str
    name: str
    port: str = ""              # the Service port's name; "" for a single unnamed port
    protocol: str = "TCP"

    def __str__(self):
        return "%s/%s:%s" % (self.namespace, self.name, self.port) if self.port else \
            "%s/%s" % (self.namespace, self.name)

    @property
    def service(self):
        """(namespace, name) of the Service."""
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """What the rules for one Service port need. IPs are normalised strings of one family."""
    name: ServicePortName
    type: str                                   # ClusterIP, NodePort or LoadBalancer
    cluster_ip: str
    port: int
    protocol: str
    target_port: object = 0                     # int, or a container port name (str)
    node_port: int = 0                          # 0: none
    external_ips: tuple = ()
    load_balancer_ips: tuple = ()               # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: tuple = ()     # CIDRs; () means anyone
    session_affinity_timeout: int = 0           # seconds of ClientIP affinity; 0: none
    external_policy_local: bool = False         # externalTrafficPolicy Local (NodePort/LB only)
    internal_policy_local: bool = False         # internalTrafficPolicy Local
    health_check_node_port: int = 0

    @property
    def session_affinity(self):
        return self.session_affinity_timeout > 0

    @property
    def externally_accessible(self):
        """Reachable other than by ClusterIP (kube-proxy's ExternallyAccessible)."""
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def uses_cluster_endpoints(self):
        """Cluster endpoints are needed for internal traffic under the Cluster policy, and
        for any externally reachable port: even with externalTrafficPolicy Local, pod and
        node traffic to its external addresses short-circuits to the Cluster chain."""
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self):
        return self.internal_policy_local or (self.externally_accessible and self.external_policy_local)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend. Conditions as EndpointSlice v1 defines them (ready/serving unset = true)."""
    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    is_local: bool = False                      # nodeName is this proxy's hostname
    node_name: str = ""

    def __str__(self):
        return self.addr

    @property
    def addr(self):
        """"ip:port", "[ip]:port" for IPv6: the text of DNAT's --to-destination and of SEP hashes."""
        return ("[%s]:%d" if ":" in self.ip else "%s:%d") % (self.ip, self.port)

    @property
    def usable_when_none_ready(self):
        """Serving but terminating: the fallback when a Service has no ready endpoint."""
        return self.serving and self.terminating


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """What one EndpointSlice contributes: endpoints per Service port."""
    namespace: str
    name: str
    service: str                                # the kubernetes.io/service-name label
    ports: tuple = ()                           # ((ServicePortName, (Endpoint, ...)), ...)

    def endpoints_by_port(self):
        return dict(self.ports)


@dataclass(frozen=True, slots=True)
class EndpointCategories:
    """kube-proxy's CategorizeEndpoints, topology-free.

    cluster: endpoints for traffic policy Cluster (ready ones; if none, serving
    and terminating ones); local: the same among this node's endpoints, for
    policy Local; all_reachable: what some rule may send to; has_any: whether
    any usable endpoint exists anywhere (no: REJECT; yes but none for a Local
    policy: DROP).
    """
    cluster: tuple = ()
    local: tuple = ()
    all_reachable: tuple = ()
    has_any: bool = False


@dataclass(frozen=True, slots=True)
class ProxyState:
    """The whole desired state: read-only maps keyed by ServicePortName."""
    service_ports: MappingProxyType
    endpoints: MappingProxyType                 # ServicePortName -> (Endpoint, ...), sorted

    @classmethod
    def of(cls, service_ports, endpoints):
        return cls(MappingProxyType(dict(service_ports)), MappingProxyType(dict(endpoints)))

    def endpoints_for(self, name):
        return self.endpoints.get(name, ())


# ---- field helpers -----------------------------------------------------------------

def _get(obj, key, where, kind=dict, required=False, default=None):
    """obj[key] checked to be of `kind` (None when absent and not required)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidObject("%s%s: missing" % (where, key))
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidObject("%s%s: expected %s, got %s %s" % (where, key, _kind_word(names),
                                                              type(value).__name__, _short(value)))
    return value


def _kind_word(name):
    return {"dict": "an object", "list": "a list", "str": "a string", "int": "an integer",
            "bool": "a boolean"}.get(name, name)


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _port_number(value, where, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObject("%s: %s is not a port number" % (where, _short(value)))
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise InvalidObject("%s: %d is not a port number (1-65535)" % (where, value))
    return value


def _ip(value, where, family=None):
    if not isinstance(value, str):
        raise InvalidObject("%s: %s is not an IP address" % (where, _short(value)))
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidObject("%s: %s is not an IP address" % (where, _short(value))) from None
    if family is not None and addr.version != family:
        return None
    return str(addr)


def _cidr(value, where):
    if not isinstance(value, str):
        raise InvalidObject("%s: %s is not a CIDR" % (where, _short(value)))
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise InvalidObject("%s: %s is not a CIDR" % (where, _short(value))) from None


def _protocol(value, where):
    if value is None:
        return "TCP"
    if value not in PROTOCOLS:
        raise InvalidObject("%s: %s is not a supported protocol (TCP, UDP, SCTP)" % (where, _short(value)))
    return value


def _meta(obj, what):
    if not isinstance(obj, dict):
        raise InvalidObject("%s is not an object but %s" % (what, type(obj).__name__))
    meta = _get(obj, "metadata", "", required=True)
    name = _get(meta, "name", "metadata.", str, required=True)
    namespace = _get(meta, "namespace", "metadata.", str, default="default")
    if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise InvalidObject("metadata.namespace: %s is not a valid namespace" % _short(namespace))
    return meta, namespace, name


def object_key(obj):
    """(namespace, name) of an object, ("default" when the namespace is unset); None if unusable."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    meta = obj["metadata"]
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return (namespace, name)


# ---- Services ----------------------------------------------------------------------

def build_service_ports(obj, family=4):
    """A Service object -> {ServicePortName: ServicePort} for IP family 4 or 6.

    Raises InvalidObject; returns {} for Services the proxy ignores (headless,
    ExternalName, no ClusterIP of this family)."""
    _, namespace, name = _meta(obj, "Service")
    if not _DNS_LABEL.match(name) or len(name) > 63:
        raise InvalidObject("metadata.name: %s is not a valid Service name" % _short(name))
    spec = _get(obj, "spec", "", required=True)
    svc_type = _get(spec, "type", "spec.", str, default="ClusterIP")
    if svc_type not in SERVICE_TYPES:
        raise InvalidObject("spec.type: %s is not a Service type" % _short(svc_type))
    if svc_type == "ExternalName":
        log.debug("ignoring Service %s/%s: type ExternalName", namespace, name)
        return {}

    cluster_ips = _get(spec, "clusterIPs", "spec.", list, default=None)
    if cluster_ips is None:
        single = _get(spec, "clusterIP", "spec.", str, default="")
        cluster_ips = [single] if single else []
    if not cluster_ips or cluster_ips[0] in ("", "None"):
        log.debug("ignoring Service %s/%s: %s", namespace, name,
                  "headless" if cluster_ips else "no ClusterIP allocated")
        return {}
    cluster_ip = None
    for i, value in enumerate(cluster_ips):
        ip = _ip(value, "spec.clusterIPs[%d]" % i, family)
        if ip and cluster_ip is None:
            cluster_ip = ip
    if cluster_ip is None:
        log.debug("ignoring Service %s/%s: no IPv%d ClusterIP", namespace, name, family)
        return {}

    external_ips = _ips(spec, "externalIPs", "spec.", family)
    lb_ips, lb_ranges, hc_port = (), (), 0
    if svc_type == "LoadBalancer":
        status = _get(obj, "status", "", default={})
        lb = _get(status, "loadBalancer", "status.", default={})
        ingress = _get(lb, "ingress", "status.loadBalancer.", list, default=[])
        found = []
        for i, entry in enumerate(ingress):
            where = "status.loadBalancer.ingress[%d]." % i
            if not isinstance(entry, dict):
                raise InvalidObject("%s: expected an object" % where[:-1])
            if _get(entry, "ipMode", where, str, default="VIP") == "Proxy":
                continue                    # the load balancer proxies: it does not send to the VIP
            value = _get(entry, "ip", where, str, default="")
            if value:
                ip = _ip(value, where + "ip", family)
                if ip and ip not in found:
                    found.append(ip)
        lb_ips = tuple(found)
        ranges = []
        for i, value in enumerate(_get(spec, "loadBalancerSourceRanges", "spec.", list, default=[])):
            net = _cidr(value, "spec.loadBalancerSourceRanges[%d]" % i)
            if net.version == family and str(net) not in ranges:
                ranges.append(str(net))
        lb_ranges = tuple(ranges)

    etp = _get(spec, "externalTrafficPolicy", "spec.", str, default="Cluster")
    if etp not in ("Cluster", "Local"):
        raise InvalidObject("spec.externalTrafficPolicy: %s is not Cluster or Local" % _short(etp))
    itp = _get(spec, "internalTrafficPolicy", "spec.", str, default="Cluster")
    if itp not in ("Cluster", "Local"):
        raise InvalidObject("spec.internalTrafficPolicy: %s is not Cluster or Local" % _short(itp))
    external_local = etp == "Local" and svc_type in ("NodePort", "LoadBalancer")
    if external_local and svc_type == "LoadBalancer":
        hc = _get(spec, "healthCheckNodePort", "spec.", int, default=0)
        hc_port = _port_number(hc, "spec.healthCheckNodePort", allow_zero=True)

    affinity = _get(spec, "sessionAffinity", "spec.", str, default="None")
    timeout = 0
    if affinity == "ClientIP":
        config = _get(spec, "sessionAffinityConfig", "spec.", default={})
        client = _get(config, "clientIP", "spec.sessionAffinityConfig.", default={})
        timeout = _get(client, "timeoutSeconds", "spec.sessionAffinityConfig.clientIP.", int,
                       default=DEFAULT_AFFINITY_TIMEOUT)
        if not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
            raise InvalidObject("spec.sessionAffinityConfig.clientIP.timeoutSeconds: %d is not in 1-%d"
                                % (timeout, MAX_AFFINITY_TIMEOUT))
    elif affinity != "None":
        raise InvalidObject("spec.sessionAffinity: %s is not None or ClientIP" % _short(affinity))

    ports = _get(spec, "ports", "spec.", list, default=[])
    if not ports:
        raise InvalidObject("spec.ports: a Service needs at least one port")
    out, seen = {}, set()
    for i, port in enumerate(ports):
        where = "spec.ports[%d]." % i
        if not isinstance(port, dict):
            raise InvalidObject("%s: expected an object" % where[:-1])
        port_name = _get(port, "name", where, str, default="")
        if port_name and (not _DNS_LABEL.match(port_name) or len(port_name) > 63):
            raise InvalidObject("%sname: %s is not a valid port name" % (where, _short(port_name)))
        if len(ports) > 1 and not port_name:
            raise InvalidObject("%sname: required when a Service has more than one port" % where)
        if port_name in seen:
            raise InvalidObject("%sname: %s is used by two ports" % (where, _short(port_name)))
        seen.add(port_name)
        number = _port_number(port.get("port"), where + "port")
        protocol = _protocol(port.get("protocol"), where + "protocol")
        target = port.get("targetPort", number)
        if isinstance(target, str) and not target.isdigit():
            if len(target) > 15 or not _IANA_SVC_NAME.match(target) or "--" in target \
                    or not re.search("[a-z]", target):
                raise InvalidObject("%stargetPort: %s is neither a port number nor a port name"
                                    % (where, _short(target)))
        else:
            target = _port_number(int(target) if isinstance(target, str) else target, where + "targetPort")
        node_port = 0
        if svc_type in ("NodePort", "LoadBalancer"):
            node_port = _port_number(port.get("nodePort", 0) or 0, where + "nodePort", allow_zero=True)
        spn = ServicePortName(namespace, name, port_name, protocol)
        out[spn] = ServicePort(
            name=spn, type=svc_type, cluster_ip=cluster_ip, port=number, protocol=protocol,
            target_port=target, node_port=node_port, external_ips=external_ips,
            load_balancer_ips=lb_ips, load_balancer_source_ranges=lb_ranges,
            session_affinity_timeout=timeout, external_policy_local=external_local,
            internal_policy_local=itp == "Local", health_check_node_port=hc_port)
    return out


def _ips(spec, key, where, family):
    found = []
    for i, value in enumerate(_get(spec, key, where, list, default=[])):
        ip = _ip(value, "%s%s[%d]" % (where, key, i), family)
        if ip and ip not in found:
            found.append(ip)
    return tuple(found)


def service_ports(obj, family=4):
    """build_service_ports that never raises: a bad Service is logged and yields {}."""
    ports, _ = service_ports_or_error(obj, family)
    return ports


def service_ports_or_error(obj, family=4):
    """({ServicePortName: ServicePort}, None) or ({}, reason); the reason is logged."""
    try:
        return build_service_ports(obj, family), None
    except InvalidObject as e:
        reason = str(e)
    except Exception as e:                      # a shape nobody foresaw: still only this object
        reason = "unexpected %s: %s" % (type(e).__name__, e)
    key = object_key(obj)
    log.warning("skipping Service %s: %s", "%s/%s" % key if key else "(unnamed)", reason)
    return {}, reason


# ---- EndpointSlices ----------------------------------------------------------------

def build_slice_info(obj, family=4, hostname=None):
    """An EndpointSlice -> SliceInfo, or None for slices the proxy ignores (FQDN, other family).

    Raises InvalidObject for a bad slice. A single endpoint with a bad address
    is skipped with a warning; the rest of the slice is used."""
    meta, namespace, name = _meta(obj, "EndpointSlice")
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise InvalidObject("metadata.name: %s is not a valid EndpointSlice name" % _short(name))
    labels = _get(meta, "labels", "metadata.", default={})
    service = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise InvalidObject("metadata.labels: no %s label" % SERVICE_NAME_LABEL)
    if not _DNS_LABEL.match(service) or len(service) > 63:
        raise InvalidObject("metadata.labels[%s]: %s is not a Service name" % (SERVICE_NAME_LABEL, _short(service)))
    address_type = _get(obj, "addressType", "", str, required=True)
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidObject("addressType: %s is not IPv4, IPv6 or FQDN" % _short(address_type))
    if address_type == "FQDN" or address_type != "IPv%d" % family:
        log.debug("ignoring EndpointSlice %s/%s: addressType %s", namespace, name, address_type)
        return None

    port_list = []
    seen = set()
    for i, port in enumerate(_get(obj, "ports", "", list, default=[])):
        where = "ports[%d]." % i
        if not isinstance(port, dict):
            raise InvalidObject("%s: expected an object" % where[:-1])
        port_name = _get(port, "name", where, str, default="")
        protocol = _protocol(port.get("protocol"), where + "protocol")
        number = port.get("port")
        if number is None:
            continue                            # "all ports": nothing kube-proxy can DNAT to
        number = _port_number(number, where + "port")
        if (port_name, protocol) in seen:
            raise InvalidObject("%sname: %s/%s appears twice" % (where, _short(port_name), protocol))
        seen.add((port_name, protocol))
        port_list.append((ServicePortName(namespace, service, port_name, protocol), number))

    addresses = []
    for i, ep in enumerate(_get(obj, "endpoints", "", list, default=[])):
        where = "endpoints[%d]." % i
        try:
            if not isinstance(ep, dict):
                raise InvalidObject("%s: expected an object" % where[:-1])
            addrs = _get(ep, "addresses", where, list, required=True)
            if not addrs:
                raise InvalidObject("%saddresses: empty" % where)
            ip = _ip(addrs[0], where + "addresses[0]")        # kube-proxy uses the first address
            if ipaddress.ip_address(ip).version != family:
                raise InvalidObject("%saddresses[0]: %s is not an %s address" % (where, ip, address_type))
            cond = _get(ep, "conditions", where, default={})
            ready = _cond(cond, "ready", where, True)
            serving = _cond(cond, "serving", where, ready)
            terminating = _cond(cond, "terminating", where, False)
            node = _get(ep, "nodeName", where, str, default="")
        except InvalidObject as e:
            log.warning("EndpointSlice %s/%s: skipping endpoint: %s", namespace, name, e)
            continue
        addresses.append((ip, ready, serving, terminating, node))

    ports = []
    for spn, number in port_list:
        eps = tuple(sorted((Endpoint(ip, number, ready, serving, terminating,
                                     bool(hostname) and node == hostname, node)
                            for ip, ready, serving, terminating, node in addresses), key=_endpoint_order))
        ports.append((spn, _dedupe(eps)))
    return SliceInfo(namespace, name, service, tuple(ports))


def _cond(cond, key, where, default):
    value = cond.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidObject("%sconditions.%s: expected a boolean, got %s" % (where, key, _short(value)))
    return value


def slice_info(obj, family=4, hostname=None):
    """build_slice_info that never raises: a bad slice is logged and yields None."""
    info, _ = slice_info_or_error(obj, family, hostname)
    return info


def slice_info_or_error(obj, family=4, hostname=None):
    try:
        return build_slice_info(obj, family, hostname), None
    except InvalidObject as e:
        reason = str(e)
    except Exception as e:
        reason = "unexpected %s: %s" % (type(e).__name__, e)
    key = object_key(obj)
    log.warning("skipping EndpointSlice %s: %s", "%s/%s" % key if key else "(unnamed)", reason)
    return None, reason


def _endpoint_order(ep):
    addr = ipaddress.ip_address(ep.ip)
    return (addr.version, addr.packed, ep.port)


def _rank(ep):
    """Which of two copies of one address:port wins: ready, then serving, then the rest."""
    return (ep.ready, ep.serving and ep.terminating, ep.serving, ep.is_local)


def _dedupe(eps):
    """Sorted endpoints with duplicates of one address:port merged (the better copy wins)."""
    out = []
    for ep in eps:
        if out and out[-1].ip == ep.ip and out[-1].port == ep.port:
            if _rank(ep) > _rank(out[-1]):
                out[-1] = ep
            continue
        out.append(ep)
    return tuple(out)


def merge_endpoints(slices):
    """SliceInfos (of any Services) -> {ServicePortName: (Endpoint, ...)} sorted and deduplicated.

    An address in two slices of one Service (a Pod moving between slices) is
    listed once, the ready copy preferred, as kube-proxy's slice cache does."""
    by_port = {}
    for info in slices:
        for spn, eps in info.ports:
            by_port.setdefault(spn, []).extend(eps)
    return {spn: _dedupe(sorted(eps, key=_endpoint_order)) for spn, eps in by_port.items()}


# ---- choosing endpoints --------------------------------------------------------------

def categorize_endpoints(port, endpoints):
    """kube-proxy's CategorizeEndpoints without topology: see EndpointCategories."""
    cluster, local, has_any = (), (), False
    if port.uses_cluster_endpoints:
        cluster = tuple(ep for ep in endpoints if ep.ready)
        if not cluster:
            cluster = tuple(ep for ep in endpoints if ep.usable_when_none_ready)
        has_any = bool(cluster)
    if not port.uses_local_endpoints:
        return EndpointCategories(cluster, (), cluster, has_any)
    local_ready = local_fallback = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            local_ready = local_ready or ep.is_local
        elif ep.usable_when_none_ready:
            has_any = True
            local_fallback = local_fallback or ep.is_local
    if local_ready:
        local = tuple(ep for ep in endpoints if ep.is_local and ep.ready)
    elif local_fallback:
        local = tuple(ep for ep in endpoints if ep.is_local and ep.usable_when_none_ready)
    if not port.uses_cluster_endpoints:
        return EndpointCategories((), local, local, has_any)
    seen = set(cluster)
    reachable = cluster + tuple(ep for ep in local if ep not in seen)
    return EndpointCategories(cluster, local, reachable, has_any)


# ---- a whole state at once -------------------------------------------------------------

def build_state(services, slices, family=4, hostname=None):
    """Service and EndpointSlice objects -> ProxyState; bad objects are logged and skipped.

    Endpoints are kept only for Service ports that exist."""
    ports = {}
    for obj in services:
        ports.update(service_ports(obj, family))
    infos = [info for info in (slice_info(obj, family, hostname) for obj in slices) if info is not None]
    endpoints = {spn: eps for spn, eps in merge_endpoints(infos).items() if spn in ports}
    return ProxyState.of(ports, endpoints)
