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
want the reason. Names match as a whole (a trailing newline is no name: it
would break the restore input of every later sync), and addresses the API
refuses are refused here too: a ClusterIP or external IP that is unspecified,
loopback, link-local or multicast makes the Service invalid; such an endpoint
is skipped (podnet.kube.endpointslices.special_ip).

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
import logging
from dataclasses import dataclass
from types import MappingProxyType

from podnet.kube.endpointslices import (  # noqa: F401
    SERVICE_NAME_LABEL,
    Endpoint,
    ServicePortName,
    SliceInfo,
    build_slice_info,
    merge_endpoints,
    slice_info,
    slice_info_or_error,
    special_ip,
)
from podnet.kube.objects import (  # noqa: F401
    PROTOCOLS,
    InvalidObject,
    is_dns_label,
    is_port_name,
    namespaced_metadata,
    object_key,
    parse_or_skip,
    short,
)
from podnet.kube.objects import cidr as _cidr
from podnet.kube.objects import get_field as _get
from podnet.kube.objects import ip_address as _ip
from podnet.kube.objects import port_number as _port_number
from podnet.kube.objects import protocol as _protocol

log = logging.getLogger("kube_proxy.model")

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
DEFAULT_AFFINITY_TIMEOUT = 10800            # seconds, the API's default for ClientIP
MAX_AFFINITY_TIMEOUT = 86400




# ---- the data ------------------------------------------------------------------

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


def build_service_ports(obj, family=4):
    """A Service object -> {ServicePortName: ServicePort} for IP family 4 or 6.

    Raises InvalidObject; returns {} for Services the proxy ignores (headless,
    ExternalName, no ClusterIP of this family)."""
    _, namespace, name = namespaced_metadata(obj, "Service")
    if not is_dns_label(name):
        raise InvalidObject("metadata.name: %s is not a valid Service name" % short(name))
    spec = _get(obj, "spec", "", required=True)
    svc_type = _get(spec, "type", "spec.", str, default="ClusterIP")
    if svc_type not in SERVICE_TYPES:
        raise InvalidObject("spec.type: %s is not a Service type" % short(svc_type))
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
        ip = _service_ip(value, "spec.clusterIPs[%d]" % i, family)
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
        raise InvalidObject("spec.externalTrafficPolicy: %s is not Cluster or Local" % short(etp))
    itp = _get(spec, "internalTrafficPolicy", "spec.", str, default="Cluster")
    if itp not in ("Cluster", "Local"):
        raise InvalidObject("spec.internalTrafficPolicy: %s is not Cluster or Local" % short(itp))
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
        raise InvalidObject("spec.sessionAffinity: %s is not None or ClientIP" % short(affinity))

    ports = _get(spec, "ports", "spec.", list, default=[])
    if not ports:
        raise InvalidObject("spec.ports: a Service needs at least one port")
    out, seen = {}, set()
    for i, port in enumerate(ports):
        where = "spec.ports[%d]." % i
        if not isinstance(port, dict):
            raise InvalidObject("%s: expected an object" % where[:-1])
        port_name = _get(port, "name", where, str, default="")
        if port_name and not is_dns_label(port_name):
            raise InvalidObject("%sname: %s is not a valid port name" % (where, short(port_name)))
        if len(ports) > 1 and not port_name:
            raise InvalidObject("%sname: required when a Service has more than one port" % where)
        if port_name in seen:
            raise InvalidObject("%sname: %s is used by two ports" % (where, short(port_name)))
        seen.add(port_name)
        number = _port_number(port.get("port"), where + "port")
        protocol = _protocol(port.get("protocol"), where + "protocol")
        target = port.get("targetPort", number)
        if isinstance(target, str) and not target.isdigit():
            if not is_port_name(target):
                raise InvalidObject("%stargetPort: %s is neither a port number nor a port name"
                                    % (where, short(target)))
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


def _service_ip(value, where, family):
    """A ClusterIP or external IP, normalised; None when of the other family. Addresses the API
    refuses as external IPs (podnet.kube.endpointslices.special_ip: its ValidateNonSpecialIP),
    of either family, make the Service invalid; a ClusterIP is never allocated from them (and
    a rule for 127.0.0.1:80 would capture the node's own traffic), so the same holds for it."""
    ip = _ip(value, where)
    assert ip is not None
    why = special_ip(ip)
    if why:
        raise InvalidObject("%s: %s %s" % (where, ip, why))
    return ip if (":" in ip) == (family == 6) else None


def _ips(spec, key, where, family):
    found = []
    for i, value in enumerate(_get(spec, key, where, list, default=[])):
        ip = _service_ip(value, "%s%s[%d]" % (where, key, i), family)
        if ip and ip not in found:
            found.append(ip)
    return tuple(found)


def service_ports(obj, family=4):
    """build_service_ports that never raises: a bad Service is logged and yields {}."""
    ports, _ = service_ports_or_error(obj, family)
    return ports


def service_ports_or_error(obj, family=4):
    """({ServicePortName: ServicePort}, None) or ({}, reason); the reason is logged."""
    return parse_or_skip("Service", build_service_ports, obj, (family,), {}, log)


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
