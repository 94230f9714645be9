"""NetworkPolicy as plain data: parsing, the incremental model of who may talk to whom, and the
reference evaluator.

networking.k8s.io/v1 semantics, in the words of the API reference and upstream's e2e suite:

- A policy selects pods of its own namespace (`podSelector`, `{}`: all of them). A pod is
  isolated for a direction once any policy selecting it has that direction in its
  `policyTypes` (explicit, or inferred: Ingress always, Egress when `egress` is non-empty);
  what is then allowed is the union of those policies' rules of that direction.
- A rule allows its peers (`from` / `to`; empty or absent: everyone) on its ports (`ports`;
  empty or absent: every port and protocol). Peers are ORed; within one peer `podSelector`
  and `namespaceSelector` are ANDed; `podSelector` alone means the policy's own namespace;
  `ipBlock` (with `except`) matches addresses, pods' included.
- Ports: a number, a range (`endPort`), a name (resolved on the destination pod: the
  selected pod for ingress, the peer for egress, from its containers' ports) or no port
  (every port of the protocol); the protocol defaults to TCP.
- Not policed: hostNetwork pods (and their addresses, the node's, never count as a pod's),
  pods without addresses (nobody yet), finished pods (Succeeded/Failed: their address may be
  another pod's already), a pod's traffic to itself, and traffic between a pod and its own
  node (kubelet probes).

`PolicyModel` keeps, incrementally, what the dataplane needs: for every set a policy refers
to (`PodSet`: pods by namespace and labels; `PortSet`: pods' named ports; `IPBlock`: address
ranges) the elements it holds now, for this node's pods whether they are isolated
(`INGRESS_PODS`, `EGRESS_PODS`: address -> namespace) and their addresses (`LOCAL_PODS`),
and what changed since the dataplane last took the changes. A pod change costs the
selectors its labels may match (selectors are indexed by the label pairs they require), a
namespace relabel the pods of that namespace, a policy change the pods in its scope.
`verdict()` answers from the objects alone, independently of that bookkeeping, so that the
two can be checked against each other (tests/test_network_policy_model.py).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property

from podnet.kube.objects import (
    InvalidObject,
    LabelSelector,
    cidr,
    get_field,
    ip_address,
    is_dns_label,
    is_dns_subdomain,
    is_port_name,
    labels_of,
    namespaced_metadata,
    parse_selector,
    port_number,
    protocol,
    short,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping
    from typing import Any, TypeAlias

Key = tuple[str, str]
INGRESS, EGRESS = "ingress", "egress"
DIRECTIONS = (INGRESS, EGRESS)
# the label the API server puts on every Namespace (immutable, = its name); a namespace the
# model has no object for (yet) is taken to have just this one
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
EVERYTHING = LabelSelector()


# ---- the objects ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NamedPort:
    """A container port with a name: what a policy's named port resolves to on that pod."""
    name: str
    protocol: str
    port: int


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ips: tuple[str, ...]                    # normal text form; () until the pod has addresses
    labels: tuple[tuple[str, str], ...]     # sorted
    node: str                               # spec.nodeName ("" while unscheduled)
    host_network: bool
    ports: tuple[NamedPort, ...]            # its containers' named ports
    host_ips: tuple[str, ...] = ()          # status.hostIPs: its node's addresses (node traffic is allowed)

    @cached_property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def addressable(self) -> bool:
        """A pod policies apply to and peers can name: an address of its own."""
        return bool(self.ips) and not self.host_network

    def __str__(self) -> str:
        return "%s/%s" % (self.namespace, self.name)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...]     # sorted, NAMESPACE_NAME_LABEL included


def _normal(selector: LabelSelector) -> LabelSelector:
    """One form per meaning: requirements sorted and without duplicates (matchLabels {a: b}
    and matchExpressions [a In (b)] are then the same selector, and share a set)."""
    reqs = sorted(set(selector.requirements), key=lambda r: (r.key, r.operator, sorted(r.values)))
    return LabelSelector(tuple(reqs), selector.nothing)


@dataclass(frozen=True)
class PodSet:
    """The addresses of the pods matching `pods` in namespace `namespace`, or (namespace None)
    in every namespace matching `namespaces`. A policy's target and its pod peers."""
    namespace: str | None
    namespaces: LabelSelector | None
    pods: LabelSelector

    @property
    def canonical(self) -> str:
        scope = "ns %s" % self.namespace if self.namespace is not None else "nssel %s" % self.namespaces
        return "%s; pods %s" % (scope, self.pods)

    def __str__(self) -> str:
        if self.namespace is not None:
            return "pods %s in namespace %s" % (self.pods, self.namespace)
        return "pods %s in namespaces %s" % (self.pods, self.namespaces)


@dataclass(frozen=True)
class PortSet:
    """(pod address, protocol, port) of every pod's container port named `name` with `protocol`."""
    name: str
    protocol: str

    @property
    def canonical(self) -> str:
        return "port %s/%s" % (self.name, self.protocol)

    def __str__(self) -> str:
        return "port %s/%s" % (self.name, self.protocol)


@dataclass(frozen=True)
class IPBlock:
    """An ipBlock: `cidr` minus the `excepts` (normal forms, the excepts sorted)."""
    cidr: str
    excepts: tuple[str, ...] = ()

    @property
    def family(self) -> int:
        return 6 if ":" in self.cidr else 4

    @cached_property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The addresses as disjoint, sorted, inclusive (first, last) integer ranges."""
        net = ipaddress.ip_network(self.cidr)
        holes = sorted((int(n.network_address), int(n.broadcast_address))
                       for n in map(ipaddress.ip_network, self.excepts))
        out, start, end = [], int(net.network_address), int(net.broadcast_address)
        for first, last in holes:
            if last < start:
                continue
            if first > start:
                out.append((start, min(end, first - 1)))
            start = max(start, last + 1)
            if start > end:
                break
        if start <= end:
            out.append((start, end))
        return tuple(out)

    @cached_property
    def prefixes(self) -> tuple[str, ...]:
        """The same as the fewest CIDR prefixes (what an nftables interval set is given)."""
        make = ipaddress.IPv6Address if self.family == 6 else ipaddress.IPv4Address
        out: list[str] = []
        for first, last in self.ranges:
            out.extend(str(n) for n in ipaddress.summarize_address_range(make(first), make(last)))
        return tuple(out)

    def contains(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        if addr.version != self.family:
            return False
        value = int(addr)
        return any(first <= value <= last for first, last in self.ranges)

    @property
    def canonical(self) -> str:
        return "cidr %s except %s" % (self.cidr, ",".join(self.excepts))

    def __str__(self) -> str:
        return self.cidr + (" except " + ", ".join(self.excepts) if self.excepts else "")


@dataclass(frozen=True)
class PortRange:
    """A numbered port or range of one protocol; port None: every port of it."""
    protocol: str
    port: int | None = None
    end_port: int | None = None

    def matches(self, proto: str, port: int) -> bool:
        if proto != self.protocol:
            return False
        if self.port is None:
            return True
        return self.port <= port <= (self.end_port if self.end_port is not None else self.port)

    def __str__(self) -> str:
        if self.port is None:
            return "%s (all ports)" % self.protocol
        if self.end_port is not None and self.end_port != self.port:
            return "%d-%d/%s" % (self.port, self.end_port, self.protocol)
        return "%d/%s" % (self.port, self.protocol)


if TYPE_CHECKING:
    Peer: TypeAlias = "PodSet | IPBlock"
    PortMatch: TypeAlias = "PortRange | PortSet"
    # what the model keeps elements of
    SetRef: TypeAlias = "PodSet | PortSet | IPBlock | Local"


@dataclass(frozen=True)
class Rule:
    """One ingress or egress rule: peers () = everyone, ports () = every port and protocol."""
    peers: tuple[Peer, ...] = ()
    ports: tuple[PortMatch, ...] = ()


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    ingress: tuple[Rule, ...] | None        # None: not an Ingress policy (() : isolates, allows nothing)
    egress: tuple[Rule, ...] | None         # None: not an Egress policy

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def target(self) -> PodSet:
        return PodSet(self.namespace, None, self.pod_selector)

    def rules(self, direction: str) -> tuple[Rule, ...] | None:
        return self.ingress if direction == INGRESS else self.egress

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(d for d in DIRECTIONS if self.rules(d) is not None)

    def refs(self) -> set[SetRef]:
        """Every set this policy needs: its target, its pod and ipBlock peers, its named ports."""
        out: set[SetRef] = {self.target}
        for direction in self.directions:
            for rule in self.rules(direction) or ():
                out.update(rule.peers)
                out.update(p for p in rule.ports if isinstance(p, PortSet))
        return out


@dataclass(frozen=True)
class Local:
    """This node's pods: their addresses (LOCAL_PODS), and those isolated for a direction with
    their namespace (INGRESS_PODS, EGRESS_PODS: address -> namespace, the dispatch maps)."""
    what: str

    @property
    def canonical(self) -> str:
        return "local %s" % self.what


LOCAL_PODS = Local("pods")
INGRESS_PODS = Local(INGRESS)
EGRESS_PODS = Local(EGRESS)
DISPATCH = {INGRESS: INGRESS_PODS, EGRESS: EGRESS_PODS}


# ---- parsing ------------------------------------------------------------------------------------

FINISHED_PHASES = ("Succeeded", "Failed")


def _sorted_labels(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    ips: list[str] = []
    for i, entry in enumerate(get_field(status, "podIPs", "status.", list, default=[])):
        if not isinstance(entry, dict):
            raise InvalidObject("status.podIPs[%d]: expected an object, got %s" % (i, short(entry)))
        ip = ip_address(get_field(entry, "ip", "status.podIPs[%d]." % i, str, required=True),
                        "status.podIPs[%d].ip" % i)
        if ip is not None and ip not in ips:
            ips.append(ip)
    if not ips and status.get("podIP"):
        ip = ip_address(get_field(status, "podIP", "status.", str), "status.podIP")
        if ip is not None:
            ips.append(ip)
    return tuple(ips)


def _host_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    ips: list[str] = []
    for i, entry in enumerate(get_field(status, "hostIPs", "status.", list, default=[])):
        if isinstance(entry, dict) and isinstance(entry.get("ip"), str):
            ip = ip_address(entry["ip"], "status.hostIPs[%d].ip" % i)
            if ip is not None and ip not in ips:
                ips.append(ip)
    if not ips and isinstance(status.get("hostIP"), str) and status["hostIP"]:
        ip = ip_address(status["hostIP"], "status.hostIP")
        if ip is not None:
            ips.append(ip)
    return tuple(ips)


def _named_ports(spec: Mapping[str, Any]) -> tuple[NamedPort, ...]:
    out: list[NamedPort] = []
    for i, container in enumerate(get_field(spec, "containers", "spec.", list, default=[])):
        at = "spec.containers[%d]" % i
        if not isinstance(container, dict):
            raise InvalidObject("%s: expected an object, got %s" % (at, short(container)))
        for j, port in enumerate(get_field(container, "ports", at + ".", list, default=[])):
            where = "%s.ports[%d]" % (at, j)
            if not isinstance(port, dict):
                raise InvalidObject("%s: expected an object, got %s" % (where, short(port)))
            number = port_number(port.get("containerPort"), where + ".containerPort")
            proto = protocol(port.get("protocol"), where + ".protocol")
            name = port.get("name")
            if name is None or name == "":
                continue
            if not is_port_name(name):
                raise InvalidObject("%s.name: %s is not a valid port name" % (where, short(name)))
            named = NamedPort(name, proto, number)
            if named not in out:
                out.append(named)
    return tuple(out)


def parse_pod(obj: object) -> Pod | None:
    """A Pod object -> Pod; None for a finished pod (Succeeded or Failed: no longer there for
    policies, and its address may be reused). A pod without addresses yet is a Pod with
    ips=(). Raises InvalidObject for a malformed object."""
    meta, namespace, name = namespaced_metadata(obj, "a Pod")
    assert isinstance(obj, dict)
    labels = labels_of(obj)
    spec = get_field(obj, "spec", "", dict, default={})
    status = get_field(obj, "status", "", dict, default={})
    if status.get("phase") in FINISHED_PHASES:
        return None
    node = get_field(spec, "nodeName", "spec.", str, default="")
    host_network = get_field(spec, "hostNetwork", "spec.", bool, default=False)
    return Pod(namespace, name, _pod_ips(status), _sorted_labels(labels), node, host_network,
               _named_ports(spec), _host_ips(status))


def parse_namespace(obj: object) -> Namespace:
    """A Namespace object -> Namespace, with the kubernetes.io/metadata.name label the API
    server always sets (set here too, for manifests written without it)."""
    if not isinstance(obj, dict):
        raise InvalidObject("a Namespace is not an object but %s" % type(obj).__name__)
    meta = get_field(obj, "metadata", "", required=True)
    name = get_field(meta, "name", "metadata.", str, required=True)
    if not is_dns_label(name):
        raise InvalidObject("metadata.name: %s is not a valid namespace name" % short(name))
    labels = labels_of(obj)
    labels[NAMESPACE_NAME_LABEL] = name
    return Namespace(name, _sorted_labels(labels))


def _selector(value: object, where: str) -> LabelSelector:
    return _normal(parse_selector(value, where))


def _ip_block(value: object, where: str) -> IPBlock:
    if not isinstance(value, dict):
        raise InvalidObject("%s: expected an object, got %s" % (where, short(value)))
    net = cidr(get_field(value, "cidr", where + ".", str, required=True), where + ".cidr")
    excepts = []
    for i, text in enumerate(get_field(value, "except", where + ".", list, default=[])):
        at = "%s.except[%d]" % (where, i)
        hole = cidr(text, at)
        if hole.version != net.version or not hole.subnet_of(net):     # type: ignore[arg-type]
            raise InvalidObject("%s: %s is not within cidr %s" % (at, short(text), net))
        excepts.append(str(hole))
    return IPBlock(str(net), tuple(sorted(set(excepts), key=lambda t: ipaddress.ip_network(t))))


def _peer(value: object, where: str, namespace: str) -> PodSet | IPBlock:
    if not isinstance(value, dict):
        raise InvalidObject("%s: expected an object, got %s" % (where, short(value)))
    pods, namespaces, block = value.get("podSelector"), value.get("namespaceSelector"), value.get("ipBlock")
    if block is not None:
        if pods is not None or namespaces is not None:
            raise InvalidObject("%s: ipBlock may not be combined with podSelector or namespaceSelector" % where)
        return _ip_block(block, where + ".ipBlock")
    if pods is None and namespaces is None:
        raise InvalidObject("%s: must specify podSelector, namespaceSelector or ipBlock" % where)
    pod_selector = _selector(pods, where + ".podSelector") if pods is not None else EVERYTHING
    if namespaces is None:
        return PodSet(namespace, None, pod_selector)
    return PodSet(None, _selector(namespaces, where + ".namespaceSelector"), pod_selector)


def _port(value: object, where: str) -> PortRange | PortSet:
    if not isinstance(value, dict):
        raise InvalidObject("%s: expected an object, got %s" % (where, short(value)))
    proto = protocol(value.get("protocol"), where + ".protocol")
    port, end = value.get("port"), value.get("endPort")
    if isinstance(port, str):
        if not is_port_name(port):
            raise InvalidObject("%s.port: %s is neither a port number nor a valid port name" % (where, short(port)))
        if end is not None:
            raise InvalidObject("%s.endPort: may not be set with a named port" % where)
        return PortSet(port, proto)
    if port is None:
        if end is not None:
            raise InvalidObject("%s.endPort: may not be set without a port" % where)
        return PortRange(proto)
    number = port_number(port, where + ".port")
    if end is None:
        return PortRange(proto, number)
    last = port_number(end, where + ".endPort")
    if last < number:
        raise InvalidObject("%s.endPort: %d is below port %d" % (where, last, number))
    return PortRange(proto, number, last if last != number else None)


def _rules(value: object, where: str, peers_field: str, namespace: str) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise InvalidObject("%s: expected a list, got %s" % (where, short(value)))
    out = []
    for i, entry in enumerate(value):
        at = "%s[%d]" % (where, i)
        if not isinstance(entry, dict):
            raise InvalidObject("%s: expected an object, got %s" % (at, short(entry)))
        peers = tuple(_peer(p, "%s.%s[%d]" % (at, peers_field, j), namespace)
                      for j, p in enumerate(get_field(entry, peers_field, at + ".", list, default=[])))
        ports = tuple(_port(p, "%s.ports[%d]" % (at, j))
                      for j, p in enumerate(get_field(entry, "ports", at + ".", list, default=[])))
        out.append(Rule(peers, ports))
    return tuple(out)


def parse_policy(obj: object) -> Policy:
    """A NetworkPolicy object -> Policy; InvalidObject says where ("spec.ingress[0].from[1].ipBlock.cidr:
    ...") for anything the API server would refuse."""
    meta, namespace, name = namespaced_metadata(obj, "a NetworkPolicy")
    if not is_dns_subdomain(name):
        raise InvalidObject("metadata.name: %s is not a valid name" % short(name))
    assert isinstance(obj, dict)
    spec = get_field(obj, "spec", "", dict, required=True)
    # absent, the API's Go type decodes to the empty selector: every pod of the namespace
    pod_selector = _selector(spec.get("podSelector", {}), "spec.podSelector")
    ingress = _rules(get_field(spec, "ingress", "spec.", list, default=[]), "spec.ingress", "from", namespace)
    egress = _rules(get_field(spec, "egress", "spec.", list, default=[]), "spec.egress", "to", namespace)
    types = get_field(spec, "policyTypes", "spec.", list, default=[])
    for i, t in enumerate(types):
        if t not in ("Ingress", "Egress"):
            raise InvalidObject("spec.policyTypes[%d]: %s is not Ingress or Egress" % (i, short(t)))
    if len(set(types)) != len(types):
        raise InvalidObject("spec.policyTypes: %s names a type twice" % short(types))
    if not types:
        types = ["Ingress"] + (["Egress"] if egress else [])
    return Policy(namespace, name, pod_selector, ingress if "Ingress" in types else None,
                  egress if "Egress" in types else None)


# ---- selector indexes ------------------------------------------------------------------------------

class _SelectorIndex:
    """Items keyed by a selector, found from a label set: a selector requiring key=value (In)
    is filed under those pairs, one requiring a key (Exists) under the key, the rest (NotIn,
    DoesNotExist only, or everything) is always a candidate."""

    def __init__(self) -> None:
        self.items: set[PodSet] = set()
        self.by_pair: dict[tuple[str, str], set[PodSet]] = {}
        self.by_key: dict[str, set[PodSet]] = {}
        self.rest: set[PodSet] = set()

    @staticmethod
    def _slots(selector: LabelSelector) -> tuple[str, tuple[Any, ...]]:
        for req in selector.requirements:
            if req.operator == "In":
                return "pair", tuple((req.key, v) for v in sorted(req.values))
        for req in selector.requirements:
            if req.operator == "Exists":
                return "key", (req.key,)
        return "rest", ()

    def add(self, item: PodSet) -> None:
        kind, slots = self._slots(item.pods)
        self.items.add(item)
        if kind == "pair":
            for pair in slots:
                self.by_pair.setdefault(pair, set()).add(item)
        elif kind == "key":
            self.by_key.setdefault(slots[0], set()).add(item)
        else:
            self.rest.add(item)

    def remove(self, item: PodSet) -> None:
        kind, slots = self._slots(item.pods)
        self.items.discard(item)
        table: dict[Any, set[PodSet]] = self.by_pair if kind == "pair" else self.by_key
        if kind == "rest":
            self.rest.discard(item)
            return
        for slot in slots:
            bucket = table.get(slot)
            if bucket is not None:
                bucket.discard(item)
                if not bucket:
                    del table[slot]

    def matching(self, labels: Mapping[str, str]) -> set[PodSet]:
        found = set(x for x in self.rest if x.pods.matches(labels))
        for key, value in labels.items():
            for x in self.by_pair.get((key, value), ()):
                if x.pods.matches(labels):
                    found.add(x)
            for x in self.by_key.get(key, ()):
                if x.pods.matches(labels):
                    found.add(x)
        return found


@dataclass
class Delta:
    """What happened to one set since the last take: elements added and removed, or
    reset (made, remade or dropped: its whole content is to be written)."""
    added: set[Any] = field(default_factory=set)
    removed: set[Any] = field(default_factory=set)
    reset: bool = False

    def add(self, element: Any) -> None:
        if self.reset:
            return
        if element in self.removed:
            self.removed.discard(element)
        else:
            self.added.add(element)

    def remove(self, element: Any) -> None:
        if self.reset:
            return
        if element in self.added:
            self.added.discard(element)
        else:
            self.removed.add(element)

    def __bool__(self) -> bool:
        return self.reset or bool(self.added or self.removed)


@dataclass
class Changes:
    """What changed since the last take_changes(): the policies added, changed or deleted (look
    them up in the model), and the sets whose elements changed."""
    policies: set[Key] = field(default_factory=set)
    elements: dict[SetRef, Delta] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.policies or self.elements)


class _SetState:
    __slots__ = ("counts", "members", "users")

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}        # element -> how many member pods bring it
        self.members: set[Key] = set()
        self.users: set[Key] = set()            # policies referring to the set


# ---- verdicts and explanations ------------------------------------------------------------------

RuleRef = tuple[str, str, str, int]            # (namespace, policy, direction, rule index)


@dataclass(frozen=True)
class Verdict:
    """allowed, and why: the rules that allowed each policed side (egress_by, ingress_by), or
    the direction whose isolation denies (denied_by) and the policies isolating it there
    (isolated_by: (namespace, name) each)."""
    allowed: bool
    reason: str
    egress_by: RuleRef | None = None
    ingress_by: RuleRef | None = None
    denied_by: str | None = None
    isolated_by: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ExplainedPeer:
    """One peer of a rule: `kind` "pods" (with the pods matching now, as ns/name) or "ipBlock"."""
    kind: str
    description: str
    pods: tuple[str, ...] = ()
    cidrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExplainedPort:
    """One port of a rule; a named one with what it resolves to: (pod ns/name, port) per pod."""
    protocol: str
    port: int | None = None
    end_port: int | None = None
    name: str | None = None
    resolved: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ExplainedRule:
    index: int
    peers: tuple[ExplainedPeer, ...]        # (): everyone
    ports: tuple[ExplainedPort, ...]        # (): every port and protocol


@dataclass(frozen=True)
class ExplainedPolicy:
    namespace: str
    name: str
    direction: str
    rules: tuple[ExplainedRule, ...]        # (): allows nothing


@dataclass(frozen=True)
class Explanation:
    """What applies to one pod, as plain data."""
    namespace: str
    name: str
    pod: Pod | None
    policed: bool                           # a pod policies can apply to (found, not hostNetwork, has an IP)
    reason: str
    local: bool                             # on the model's node (enforced here)
    isolated_ingress: bool = False
    isolated_egress: bool = False
    ingress: tuple[ExplainedPolicy, ...] = ()
    egress: tuple[ExplainedPolicy, ...] = ()

    def lines(self) -> list[str]:
        """A human-readable account."""
        out = ["pod %s/%s: %s" % (self.namespace, self.name, self.reason)]
        if not self.policed:
            return out
        for direction, isolated, policies in ((INGRESS, self.isolated_ingress, self.ingress),
                                              (EGRESS, self.isolated_egress, self.egress)):
            if not isolated:
                out.append("  %s: not isolated (everything allowed)" % direction)
                continue
            count = len(policies)
            out.append("  %s: isolated by %d polic%s" % (direction, count, "y" if count == 1 else "ies"))
            for policy in policies:
                out.append("    %s/%s%s" % (policy.namespace, policy.name, "" if policy.rules else ": allows nothing"))
                for rule in policy.rules:
                    word = "from" if direction == INGRESS else "to"
                    peers = "; ".join(_peer_text(p) for p in rule.peers) or "everyone"
                    ports = ", ".join(_port_text(p) for p in rule.ports) or "all ports"
                    out.append("      rule %d: %s %s on %s" % (rule.index, word, peers, ports))
        return out


def _peer_text(peer: ExplainedPeer) -> str:
    if peer.kind == "ipBlock":
        return peer.description
    return "%s [%s]" % (peer.description, ", ".join(peer.pods) or "no pods now")


def _port_text(port: ExplainedPort) -> str:
    if port.name is not None:
        where = ", ".join("%s:%d" % r for r in port.resolved) or "no pod has it"
        return "%s/%s (%s)" % (port.name, port.protocol, where)
    return str(PortRange(port.protocol, port.port, port.end_port))


# ---- the model ----------------------------------------------------------------------------------------

class PolicyModel:
    """Pods, namespaces and policies of the cluster, seen from node `node`: the elements of every
    set the policies need, this node's isolated pods, and the changes since the last take."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._pods: dict[Key, Pod] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._policies: dict[Key, Policy] = {}
        self._policies_by_ns: dict[str, dict[str, Policy]] = {}
        # addressable pods, indexed for making a set's members
        self._by_ns: dict[str, set[Key]] = {}
        self._by_pair: dict[tuple[str, str], set[Key]] = {}
        self._by_port: dict[tuple[str, str], set[Key]] = {}     # (port name, protocol) -> pods
        self._by_ip: dict[str, set[Key]] = {}
        # sets and who is in them
        self._sets: dict[SetRef, _SetState] = {}
        self._static: dict[IPBlock, frozenset[str]] = {}
        self._block_users: dict[IPBlock, set[Key]] = {}
        self._member_of: dict[Key, dict[SetRef, frozenset[Any]]] = {}    # pod -> set -> its elements there
        self._ns_index: dict[str, _SelectorIndex] = {}                # namespace -> its PodSets
        self._nssel_index: dict[LabelSelector, _SelectorIndex] = {}   # namespace selector -> its PodSets
        self._nssels_of: dict[str, frozenset[LabelSelector]] = {}     # namespace -> matching selectors (cache)
        for ref in (LOCAL_PODS, INGRESS_PODS, EGRESS_PODS):
            self._sets[ref] = _SetState()
        self._changes = Changes()

    # ---- what the dataplane reads ----

    @property
    def policies(self) -> Mapping[Key, Policy]:
        return self._policies

    def policies_in(self, namespace: str) -> list[Policy]:
        """The namespace's policies, by name."""
        by_name = self._policies_by_ns.get(namespace, {})
        return [by_name[n] for n in sorted(by_name)]

    def namespaces_with(self, direction: str) -> set[str]:
        """Namespaces that have a policy of `direction`."""
        return {ns for ns, by_name in self._policies_by_ns.items()
                if any(p.rules(direction) is not None for p in by_name.values())}

    def elements(self, ref: SetRef) -> frozenset[Any]:
        """A set's elements now: addresses (PodSet, LOCAL_PODS), (address, protocol, port) (PortSet),
        prefixes (IPBlock), (address, namespace) (INGRESS_PODS, EGRESS_PODS)."""
        if isinstance(ref, IPBlock):
            return self._static.get(ref, frozenset(ref.prefixes))
        state = self._sets.get(ref)
        return frozenset(state.counts) if state is not None else frozenset()

    def size(self, ref: SetRef) -> int:
        if isinstance(ref, IPBlock):
            return len(ref.prefixes)
        state = self._sets.get(ref)
        return len(state.counts) if state is not None else 0

    def refs(self) -> set[SetRef]:
        """Every set some policy needs (the Local ones not included)."""
        out: set[SetRef] = {ref for ref in self._sets if not isinstance(ref, Local)}
        out.update(self._static)
        return out

    def take_changes(self) -> Changes:
        changes, self._changes = self._changes, Changes()
        changes.elements = {ref: d for ref, d in changes.elements.items() if d}
        return changes

    def pods(self) -> Iterator[Pod]:
        return iter(self._pods.values())

    def pod(self, namespace: str, name: str) -> Pod | None:
        return self._pods.get((namespace, name))

    def namespace_labels(self, name: str) -> dict[str, str]:
        ns = self._namespaces.get(name)
        return dict(ns.labels) if ns is not None else {NAMESPACE_NAME_LABEL: name}

    # ---- element bookkeeping ----

    def _delta(self, ref: SetRef) -> Delta:
        delta = self._changes.elements.get(ref)
        if delta is None:
            delta = self._changes.elements[ref] = Delta()
        return delta

    def _place(self, key: Key, ref: SetRef, elements: frozenset[Any] | None) -> None:
        """Pod `key` brings `elements` to set `ref` (None or empty: is not in it)."""
        mine = self._member_of.setdefault(key, {})
        old = mine.get(ref, frozenset())
        new = elements or frozenset()
        if old == new:
            return
        state = self._sets[ref]
        delta = self._delta(ref)
        for element in old - new:
            n = state.counts[element] - 1
            if n:
                state.counts[element] = n
            else:
                del state.counts[element]
                delta.remove(element)
        for element in new - old:
            n = state.counts.get(element, 0)
            state.counts[element] = n + 1
            if not n:
                delta.add(element)
        if new:
            mine[ref] = new
            state.members.add(key)
        else:
            mine.pop(ref, None)
            state.members.discard(key)
        if not mine:
            del self._member_of[key]

    @staticmethod
    def _elements_for(ref: SetRef, pod: Pod) -> frozenset[Any]:
        if isinstance(ref, PortSet):
            return frozenset((ip, np.protocol, np.port) for np in pod.ports
                             if np.name == ref.name and np.protocol == ref.protocol for ip in pod.ips)
        return frozenset(pod.ips)

    def _nssels_matching(self, namespace: str) -> frozenset[LabelSelector]:
        found = self._nssels_of.get(namespace)
        if found is None:
            labels = self.namespace_labels(namespace)
            found = frozenset(s for s in self._nssel_index if s.matches(labels))
            self._nssels_of[namespace] = found
        return found

    def _pod_sets_of(self, pod: Pod) -> set[PodSet]:
        labels = pod.label_map
        index = self._ns_index.get(pod.namespace)
        found = index.matching(labels) if index is not None else set()
        for nssel in self._nssels_matching(pod.namespace):
            found |= self._nssel_index[nssel].matching(labels)
        return found

    def _isolated(self, key: Key, namespace: str, direction: str) -> bool:
        mine = self._member_of.get(key, {})
        return any(p.rules(direction) is not None and p.target in mine
                   for p in self._policies_by_ns.get(namespace, {}).values())

    def _refresh_local(self, key: Key) -> None:
        """LOCAL_PODS and the dispatch maps for pod `key` (of this node), from its memberships."""
        pod = self._pods.get(key)
        live = pod is not None and pod.addressable and pod.node == self.node
        self._place(key, LOCAL_PODS, frozenset(pod.ips) if live and pod is not None else None)
        for direction, ref in DISPATCH.items():
            isolated = live and pod is not None and self._isolated(key, pod.namespace, direction)
            self._place(key, ref, frozenset((ip, key[0]) for ip in pod.ips) if isolated and pod is not None else None)

    # ---- pods ----

    def _index(self, key: Key, pod: Pod, add: bool) -> None:
        def file(table: dict[Any, set[Key]], slot: Any) -> None:
            if add:
                table.setdefault(slot, set()).add(key)
                return
            bucket = table.get(slot)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del table[slot]
        file(self._by_ns, pod.namespace)
        for pair in pod.labels:
            file(self._by_pair, pair)
        for np in pod.ports:
            file(self._by_port, (np.name, np.protocol))
        for ip in pod.ips:
            file(self._by_ip, ip)

    def set_pod(self, key: Key, pod: Pod | None) -> None:
        old = self._pods.get(key)
        if old == pod:
            return
        if old is not None and old.addressable:
            self._index(key, old, add=False)
        if pod is None:
            del self._pods[key]
        else:
            self._pods[key] = pod
            if pod.addressable:
                self._index(key, pod, add=True)
        wanted: dict[SetRef, frozenset[Any]] = {}
        if pod is not None and pod.addressable:
            for pod_set in self._pod_sets_of(pod):
                wanted[pod_set] = frozenset(pod.ips)
            for np in pod.ports:
                port_set = PortSet(np.name, np.protocol)
                if port_set in self._sets:
                    wanted[port_set] = self._elements_for(port_set, pod)
        current = self._member_of.get(key, {})
        for gone in [r for r in current if not isinstance(r, Local) and r not in wanted]:
            self._place(key, gone, None)
        for ref, elements in wanted.items():
            self._place(key, ref, elements)
        self._refresh_local(key)

    # ---- namespaces ----

    def set_namespace(self, name: str, namespace: Namespace | None) -> None:
        old_labels = self.namespace_labels(name)
        if namespace is None:
            self._namespaces.pop(name, None)
        else:
            self._namespaces[name] = namespace
        new_labels = self.namespace_labels(name)
        if old_labels == new_labels:
            return
        self._nssels_of.pop(name, None)
        pods = [(k, self._pods[k]) for k in sorted(self._by_ns.get(name, ()))]
        for nssel, index in self._nssel_index.items():
            before, after = nssel.matches(old_labels), nssel.matches(new_labels)
            if before == after:
                continue
            for ref in sorted(index.items, key=lambda r: r.canonical):
                for key, pod in pods:
                    self._place(key, ref, frozenset(pod.ips) if after and ref.pods.matches(pod.label_map) else None)

    # ---- policies and their sets ----

    def _scope_pods(self, ref: PodSet) -> Iterable[Key]:
        """Candidate members of a new PodSet: pods in scope, narrowed by one required label pair."""
        if ref.namespace is not None:
            namespaces: Iterable[str] = (ref.namespace,)
        else:
            assert ref.namespaces is not None
            namespaces = [ns for ns in self._by_ns if ref.namespaces.matches(self.namespace_labels(ns))]
        in_scope = set().union(*(self._by_ns.get(ns, set()) for ns in namespaces))
        for req in ref.pods.requirements:
            if req.operator == "In":
                narrowed: set[Key] = set().union(*(self._by_pair.get((req.key, v), set()) for v in req.values))
                return sorted(narrowed & in_scope)
        return sorted(in_scope)

    def _make_set(self, ref: SetRef) -> None:
        self._delta(ref).reset = True
        if isinstance(ref, IPBlock):
            self._static[ref] = frozenset(ref.prefixes)
            return
        self._sets[ref] = _SetState()
        if isinstance(ref, PortSet):
            for key in sorted(self._by_port.get((ref.name, ref.protocol), ())):
                self._place(key, ref, self._elements_for(ref, self._pods[key]))
            return
        assert isinstance(ref, PodSet)
        if ref.namespace is not None:
            self._ns_index.setdefault(ref.namespace, _SelectorIndex()).add(ref)
        else:
            assert ref.namespaces is not None
            index = self._nssel_index.get(ref.namespaces)
            if index is None:
                index = self._nssel_index[ref.namespaces] = _SelectorIndex()
                for ns, found in self._nssels_of.items():
                    if ref.namespaces.matches(self.namespace_labels(ns)):
                        self._nssels_of[ns] = found | {ref.namespaces}
            index.add(ref)
        for key in self._scope_pods(ref):
            pod = self._pods[key]
            if ref.pods.matches(pod.label_map):
                self._place(key, ref, frozenset(pod.ips))

    def _drop_set(self, ref: SetRef) -> None:
        delta = self._delta(ref)
        delta.reset = True
        delta.added.clear()
        delta.removed.clear()
        if isinstance(ref, IPBlock):
            del self._static[ref]
            return
        state = self._sets.pop(ref)
        for key in state.members:
            mine = self._member_of.get(key)
            if mine is not None:
                mine.pop(ref, None)
                if not mine:
                    del self._member_of[key]
        if isinstance(ref, PodSet):
            if ref.namespace is not None:
                index = self._ns_index[ref.namespace]
                index.remove(ref)
                if not index.items:
                    del self._ns_index[ref.namespace]
            else:
                assert ref.namespaces is not None
                index = self._nssel_index[ref.namespaces]
                index.remove(ref)
                if not index.items:
                    del self._nssel_index[ref.namespaces]
                    for ns, found in self._nssels_of.items():
                        if ref.namespaces in found:
                            self._nssels_of[ns] = found - {ref.namespaces}

    def _users(self, ref: SetRef) -> set[Key] | None:
        if isinstance(ref, IPBlock):
            return self._block_users.get(ref)
        state = self._sets.get(ref)
        return state.users if state is not None else None

    def _use(self, ref: SetRef, key: Key) -> None:
        users = self._users(ref)
        if users is None:
            self._make_set(ref)
            if isinstance(ref, IPBlock):
                users = self._block_users[ref] = set()
            else:
                users = self._sets[ref].users
        users.add(key)

    def _unuse(self, ref: SetRef, key: Key) -> None:
        users = self._users(ref)
        if users is None:
            return
        users.discard(key)
        if not users:
            if isinstance(ref, IPBlock):
                del self._block_users[ref]
            self._drop_set(ref)

    def _local_members(self, ref: PodSet) -> set[Key]:
        state = self._sets.get(ref)
        if state is None:
            return set()
        return {k for k in state.members if self._pods[k].node == self.node}

    def set_policy(self, key: Key, policy: Policy | None) -> None:
        old = self._policies.get(key)
        if old == policy:
            return
        self._changes.policies.add(key)
        affected: set[Key] = self._local_members(old.target) if old is not None else set()
        if old is not None:
            by_name = self._policies_by_ns[key[0]]
            del by_name[key[1]]
            if not by_name:
                del self._policies_by_ns[key[0]]
            del self._policies[key]
        if policy is not None:
            self._policies[key] = policy
            self._policies_by_ns.setdefault(key[0], {})[key[1]] = policy
            for ref in sorted(policy.refs(), key=lambda r: r.canonical):
                self._use(ref, key)
        old_refs = old.refs() if old is not None else set()
        new_refs = policy.refs() if policy is not None else set()
        for ref in sorted(old_refs - new_refs, key=lambda r: r.canonical):
            self._unuse(ref, key)
        if policy is not None:
            affected |= self._local_members(policy.target)
        for pod_key in sorted(affected):
            self._refresh_local(pod_key)

    # ---- the reference evaluator ----

    def _pod_at(self, ip: str) -> Pod | None:
        keys = self._by_ip.get(ip)
        return self._pods[min(keys)] if keys else None

    def _in_set(self, peer: PodSet | IPBlock, ip: str, pod: Pod | None) -> bool:
        if isinstance(peer, IPBlock):
            return peer.contains(ip)
        if pod is None:
            return False
        if peer.namespace is not None:
            if pod.namespace != peer.namespace:
                return False
        else:
            assert peer.namespaces is not None
            if not peer.namespaces.matches(self.namespace_labels(pod.namespace)):
                return False
        return peer.pods.matches(pod.label_map)

    @staticmethod
    def _port_allows(port: PortRange | PortSet, proto: str, number: int, dst: Pod | None) -> bool:
        if isinstance(port, PortRange):
            return port.matches(proto, number)
        return dst is not None and port.protocol == proto and any(
            np.name == port.name and np.protocol == proto and np.port == number for np in dst.ports)

    def _selecting(self, pod: Pod, direction: str) -> list[Policy]:
        return [p for p in self.policies_in(pod.namespace)
                if p.rules(direction) is not None and p.pod_selector.matches(pod.label_map)]

    def _allowed_by(self, policies: list[Policy], direction: str, peer_ip: str, peer: Pod | None,
                    proto: str, number: int, dst: Pod | None) -> RuleRef | None:
        for policy in policies:
            for i, rule in enumerate(policy.rules(direction) or ()):
                if rule.peers and not any(self._in_set(p, peer_ip, peer) for p in rule.peers):
                    continue
                if rule.ports and not any(self._port_allows(p, proto, number, dst) for p in rule.ports):
                    continue
                return (policy.namespace, policy.name, direction, i)
        return None

    def verdict(self, src: str, dst: str, protocol: str = "TCP", port: int = 0) -> Verdict:
        """Whether a new connection from address `src` to address `dst` (after any DNAT: an
        endpoint, not a Service address) on protocol/port is allowed, straight from the objects.
        Both sides are judged wherever they run (egress on the source's node, ingress on the
        destination's). protocol: TCP, UDP, SCTP (or anything else, with port 0: only rules
        without ports allow it)."""
        src_ip = ip_address(src, "src") or src
        dst_ip = ip_address(dst, "dst") or dst
        proto = protocol.upper()
        src_pod, dst_pod = self._pod_at(src_ip), self._pod_at(dst_ip)
        if src_pod is not None and src_pod is dst_pod:
            return Verdict(True, "%s reaches itself (never policed)" % src_pod)
        if dst_pod is not None and src_ip in dst_pod.host_ips:
            return Verdict(True, "from %s's own node (never policed)" % dst_pod)
        if src_pod is not None and dst_ip in src_pod.host_ips:
            return Verdict(True, "to %s's own node (never policed)" % src_pod)
        said = []
        egress_by = ingress_by = None
        if src_pod is not None:
            policies = self._selecting(src_pod, EGRESS)
            if policies:
                egress_by = self._allowed_by(policies, EGRESS, dst_ip, dst_pod, proto, port, dst_pod)
                if egress_by is None:
                    return Verdict(False, "egress of %s is isolated by %s and no rule allows %s %s/%d" % (
                        src_pod, ", ".join(p.name for p in policies), dst_ip, proto, port), denied_by=EGRESS,
                        isolated_by=tuple((p.namespace, p.name) for p in policies))
                said.append("egress allowed by %s/%s rule %d" % (egress_by[0], egress_by[1], egress_by[3]))
            else:
                said.append("egress of %s not isolated" % src_pod)
        if dst_pod is not None:
            policies = self._selecting(dst_pod, INGRESS)
            if policies:
                ingress_by = self._allowed_by(policies, INGRESS, src_ip, src_pod, proto, port, dst_pod)
                if ingress_by is None:
                    return Verdict(False, "ingress of %s is isolated by %s and no rule allows %s %s/%d" % (
                        dst_pod, ", ".join(p.name for p in policies), src_ip, proto, port),
                        egress_by=egress_by, denied_by=INGRESS,
                        isolated_by=tuple((p.namespace, p.name) for p in policies))
                said.append("ingress allowed by %s/%s rule %d" % (ingress_by[0], ingress_by[1], ingress_by[3]))
            else:
                said.append("ingress of %s not isolated" % dst_pod)
        return Verdict(True, "; ".join(said) or "neither address is a policed pod", egress_by, ingress_by)

    # ---- explanations ----

    def _members_now(self, peer: PodSet) -> tuple[str, ...]:
        return tuple(sorted(str(p) for p in self._pods.values() if p.addressable and self._in_set(peer, "", p)))

    def _explain_port(self, port: PortRange | PortSet, direction: str, pod: Pod,
                      peers: tuple[PodSet | IPBlock, ...]) -> ExplainedPort:
        if isinstance(port, PortRange):
            return ExplainedPort(port.protocol, port.port, port.end_port)
        if direction == INGRESS:
            holders: list[Pod] = [pod]
        else:
            holders = [p for p in self._pods.values() if p.addressable
                       and (not peers or any(self._in_set(x, ip, p) for x in peers for ip in p.ips))]
        resolved = sorted((str(p), np.port) for p in holders for np in p.ports
                          if np.name == port.name and np.protocol == port.protocol)
        return ExplainedPort(port.protocol, name=port.name, resolved=tuple(resolved))

    def _explain_peer(self, peer: PodSet | IPBlock) -> ExplainedPeer:
        if isinstance(peer, IPBlock):
            return ExplainedPeer("ipBlock", str(peer), cidrs=peer.prefixes)
        return ExplainedPeer("pods", str(peer), pods=self._members_now(peer))

    def explain(self, namespace: str, name: str) -> Explanation:
        pod = self._pods.get((namespace, name))
        if pod is None:
            return Explanation(namespace, name, None, False, "no such pod (or it has finished)", False)
        local = pod.node == self.node
        if pod.host_network:
            return Explanation(namespace, name, pod, False, "hostNetwork: not policed", local)
        if not pod.ips:
            return Explanation(namespace, name, pod, False, "no IP yet: not policed", local)
        where = "on this node" if local else "on node %s" % (pod.node or "(unscheduled)")
        explained: dict[str, tuple[ExplainedPolicy, ...]] = {}
        for direction in DIRECTIONS:
            out = []
            for policy in self._selecting(pod, direction):
                rules = tuple(ExplainedRule(i, tuple(self._explain_peer(p) for p in rule.peers),
                                            tuple(self._explain_port(p, direction, pod, rule.peers)
                                                  for p in rule.ports))
                              for i, rule in enumerate(policy.rules(direction) or ()))
                out.append(ExplainedPolicy(policy.namespace, policy.name, direction, rules))
            explained[direction] = tuple(out)
        return Explanation(namespace, name, pod, True, "%s, %s" % (", ".join(pod.ips), where), local,
                           bool(explained[INGRESS]), bool(explained[EGRESS]), explained[INGRESS], explained[EGRESS])

