"""EndpointSlices (discovery.k8s.io/v1) as plain immutable data: which backends a Service port has.

Shared by every consumer of endpoints (kube-proxy's rules, the Ingress
controller's upstreams), so that a slice means the same to all of them:

- `ServicePortName`: which Service port ("ns/name:port" plus protocol);
- `Endpoint`: one backend address:port with its ready/serving/terminating
  conditions and whether it runs on this node;
- `SliceInfo`: what one slice contributes, endpoints per Service port;
- `merge_endpoints()`: the slices of a cluster -> endpoints per Service port,
  sorted and deduplicated as kube-proxy's slice cache does.

Endpoints are matched to Service ports by the slice's (port name, protocol):
the EndpointSlice controller has already resolved named target ports per Pod.
A bad slice is never fatal: `slice_info()` logs one specific reason and
returns None; a bad endpoint inside a good slice is skipped with a warning.
That includes an address the API server refuses (`special_ip()`: unspecified,
loopback, link-local, link-local multicast, as its ValidateEndpointIP) and the
ones no proxy can send a connection to (any multicast, the limited broadcast).
FQDN slices and slices of the other IP family are ignored (debug log).
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from podnet.kube.objects import (
    InvalidObject,
    get_field,
    ip_address,
    is_dns_label,
    is_dns_subdomain,
    namespaced_metadata,
    parse_or_skip,
    port_number,
    protocol,
    short,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

log = logging.getLogger("podnet.kube.endpointslices")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def special_ip(ip: str) -> str | None:
    """Why address `ip` (valid, normalised) may not be a backend or a Service address, or None.

    The API server refuses unspecified, loopback, link-local unicast and link-local
    multicast addresses in EndpointSlices, Endpoints and externalIPs (its
    ValidateEndpointIP / ValidateNonSpecialIP); a manifests directory or an object from
    before that check can still carry them. Other multicast addresses (which the API
    lets through) and the limited broadcast are refused too: nothing can DNAT a
    connection to them."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped                 # ::ffff:127.0.0.1 is 127.0.0.1 to the API (Go's net.IP)
    if addr.is_unspecified:
        return "may not be unspecified"
    if addr.is_loopback:
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    if addr.is_link_local:
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    if addr.is_multicast:
        return "may not be a multicast address (224.0.0.0/4, ff00::/8)"
    if addr == _LIMITED_BROADCAST:
        return "may not be the broadcast address"
    return None


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """One port of one Service. str() is kube-proxy's "ns/name:port" ("ns/name" when unnamed)."""
    namespace: str
    name: str
    port: str = ""              # the Service port's name; "" for a single unnamed port
    protocol: str = "TCP"

    def __str__(self) -> str:
        return "%s/%s:%s" % (self.namespace, self.name, self.port) if self.port else \
            "%s/%s" % (self.namespace, self.name)

    @property
    def service(self) -> tuple[str, str]:
        """(namespace, name) of the Service."""
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend. Conditions as EndpointSlice v1 defines them (ready/serving unset = true)."""
    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    is_local: bool = False                      # nodeName is this node's name
    node_name: str = ""

    def __str__(self) -> str:
        return self.addr

    @property
    def addr(self) -> str:
        """"ip:port", "[ip]:port" for IPv6: the text of DNAT's --to-destination and of SEP hashes."""
        return ("[%s]:%d" if ":" in self.ip else "%s:%d") % (self.ip, self.port)

    @property
    def usable_when_none_ready(self) -> bool:
        """Serving but terminating: the fallback when a Service has no ready endpoint."""
        return self.serving and self.terminating


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """What one EndpointSlice contributes: endpoints per Service port."""
    namespace: str
    name: str
    service: str                                # the kubernetes.io/service-name label
    ports: tuple[tuple[ServicePortName, tuple[Endpoint, ...]], ...] = ()


def build_slice_info(obj: Any, family: int = 4, hostname: str | None = None) -> SliceInfo | None:
    """An EndpointSlice -> SliceInfo, or None for slices that carry no usable endpoints
    of `family` (FQDN, the other family).

    Raises InvalidObject for a bad slice. A single endpoint with a bad address
    is skipped with a warning; the rest of the slice is used."""
    meta, namespace, name = namespaced_metadata(obj, "EndpointSlice")
    if not is_dns_subdomain(name):
        raise InvalidObject("metadata.name: %s is not a valid EndpointSlice name" % short(name))
    labels = get_field(meta, "labels", "metadata.", default={})
    service = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise InvalidObject("metadata.labels: no %s label" % SERVICE_NAME_LABEL)
    if not is_dns_label(service):
        raise InvalidObject("metadata.labels[%s]: %s is not a Service name" % (SERVICE_NAME_LABEL, short(service)))
    address_type = get_field(obj, "addressType", "", str, required=True)
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidObject("addressType: %s is not IPv4, IPv6 or FQDN" % short(address_type))
    if address_type == "FQDN" or address_type != "IPv%d" % family:
        log.debug("ignoring EndpointSlice %s/%s: addressType %s", namespace, name, address_type)
        return None

    port_list = []
    seen = set()
    for i, port in enumerate(get_field(obj, "ports", "", list, default=[])):
        where = "ports[%d]." % i
        if not isinstance(port, dict):
            raise InvalidObject("%s: expected an object" % where[:-1])
        port_name = get_field(port, "name", where, str, default="")
        if port_name and not is_dns_label(port_name):          # as the API validates it
            raise InvalidObject("%sname: %s is not a valid port name" % (where, short(port_name)))
        proto = protocol(port.get("protocol"), where + "protocol")
        number = port.get("port")
        if number is None:
            continue                            # "all ports": nothing a proxy can DNAT to
        number = port_number(number, where + "port")
        if (port_name, proto) in seen:
            raise InvalidObject("%sname: %s/%s appears twice" % (where, short(port_name), proto))
        seen.add((port_name, proto))
        port_list.append((ServicePortName(namespace, service, port_name, proto), number))

    addresses = []
    for i, ep in enumerate(get_field(obj, "endpoints", "", list, default=[])):
        where = "endpoints[%d]." % i
        try:
            if not isinstance(ep, dict):
                raise InvalidObject("%s: expected an object" % where[:-1])
            addrs = get_field(ep, "addresses", where, list, required=True)
            if not addrs:
                raise InvalidObject("%saddresses: empty" % where)
            ip = ip_address(addrs[0], where + "addresses[0]")      # kube-proxy uses the first address
            assert ip is not None
            if ipaddress.ip_address(ip).version != family:
                raise InvalidObject("%saddresses[0]: %s is not an %s address" % (where, ip, address_type))
            why = special_ip(ip)
            if why:
                raise InvalidObject("%saddresses[0]: %s %s" % (where, ip, why))
            cond = get_field(ep, "conditions", where, default={})
            ready = _condition(cond, "ready", where, True)
            serving = _condition(cond, "serving", where, ready)
            terminating = _condition(cond, "terminating", where, False)
            node = get_field(ep, "nodeName", where, str, default="")
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


def _condition(cond: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = cond.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidObject("%sconditions.%s: expected a boolean, got %s" % (where, key, short(value)))
    return value


def slice_info(obj: Any, family: int = 4, hostname: str | None = None) -> SliceInfo | None:
    """build_slice_info that never raises: a bad slice is logged and yields None."""
    info, _ = slice_info_or_error(obj, family, hostname)
    return info


def slice_info_or_error(obj: Any, family: int = 4,
                        hostname: str | None = None) -> tuple[SliceInfo | None, str | None]:
    return parse_or_skip("EndpointSlice", build_slice_info, obj, (family, hostname), None, log)


def _endpoint_order(ep: Endpoint) -> tuple[int, bytes, int]:
    addr = ipaddress.ip_address(ep.ip)
    return (addr.version, addr.packed, ep.port)


def _rank(ep: Endpoint) -> tuple[bool, bool, bool, bool]:
    """Which of two copies of one address:port wins: ready, then serving, then the rest."""
    return (ep.ready, ep.serving and ep.terminating, ep.serving, ep.is_local)


def _dedupe(eps: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Sorted endpoints with duplicates of one address:port merged (the better copy wins)."""
    out: list[Endpoint] = []
    for ep in eps:
        if out and out[-1].ip == ep.ip and out[-1].port == ep.port:
            if _rank(ep) > _rank(out[-1]):
                out[-1] = ep
            continue
        out.append(ep)
    return tuple(out)


def merge_endpoints(slices: Iterable[SliceInfo]) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """SliceInfos (of any Services) -> {ServicePortName: (Endpoint, ...)} sorted and deduplicated.

    An address in two slices of one Service (a Pod moving between slices) is
    listed once, the ready copy preferred, as kube-proxy's slice cache does."""
    by_port: dict[ServicePortName, list[Endpoint]] = {}
    for info in slices:
        for spn, eps in info.ports:
            by_port.setdefault(spn, []).extend(eps)
    return {spn: _dedupe(sorted(eps, key=_endpoint_order)) for spn, eps in by_port.items()}
