"""The NetworkPolicy truth tables: scenarios as data, shared by the traffic tests and the model check.

The layout is upstream's (kubernetes test/e2e/network/netpol): namespaces x, y and
z, pods a, b and c in each (labels pod=a|b|c; namespace labels ns=x|y|z and the
kubernetes.io/metadata.name label every API server puts on a namespace), servers
on ports 80 and 81 for TCP and UDP, SCTP on both (answered by the pods' kernels:
netpol_matrix.py says how), and the whole 9x9 matrix of "can pod S open a connection to pod D on protocol/port"
checked per scenario. A pod talking to itself never leaves its namespace, so the
diagonal is not probed (upstream ignores it too).

A scenario (`Case`) is a list of NetworkPolicy objects in the API's JSON shape,
built from the cluster's real addresses (`Topology`: ipBlock scenarios use the
pods' and nodes' real CIDRs), and one or more `Check`s: a protocol, a port and the
expected matrix. Expected matrices are written as upstream writes them: start
from "everything allowed" and apply (source pattern, destination pattern,
allowed) rules in order. Patterns: "" any pod, "x" any pod of namespace x, "x/a"
one pod, "*/a" pod a of any namespace, "@node1" the pods on node1.

Where the expected value follows from the API reference rather than from
upstream's suite (defaulting of policyTypes, named ports with a protocol,
`from: []`), the case says so in `about`.

Pure: nothing here touches the kernel; test_network_policy_semantics.py checks
every case against the model's reference evaluator without root.
"""
import copy
import ipaddress
from dataclasses import dataclass, field

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PODS = tuple("%s/%s" % (ns, p) for ns in NAMESPACES for p in POD_NAMES)
NODES = ("node1", "node2")
NS_NAME_LABEL = "kubernetes.io/metadata.name"
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP", "SCTP")
# every pod declares one named container port per (port, protocol), as upstream's pods do
CONTAINER_PORTS = tuple(("serve-%d-%s" % (port, proto.lower()), port, proto) for proto in PROTOCOLS for port in PORTS)


def container_ports(pod, web=None):
    """upstream's named ports, and "web": port 80 on the a pods, 81 on the others (one name,
    a different number per pod: a named port is resolved on each destination pod), or `web`."""
    return CONTAINER_PORTS + (("web", web or (80 if pod.endswith("/a") else 81), "TCP"),)


def node_of(pod):
    """Pods alternate between the two nodes, so every kind of pair (same node, across
    nodes, same namespace, other namespace) is in the matrix."""
    return NODES[PODS.index(pod) % len(NODES)]


# ---- the objects a cluster holds -----------------------------------------------------------

@dataclass(frozen=True)
class Topology:
    """The addresses scenarios are written against: pod -> IP, node -> pod CIDR(s), the
    cluster's pod network, and each node's own address (a hostNetwork pod's IP)."""
    pod_ips: dict
    pod_cidrs: dict             # node -> tuple of CIDR strings
    cluster_cidr: str
    node_ips: dict = field(default_factory=dict)

    def ip(self, pod):
        return self.pod_ips[pod]

    def host(self, pod):
        return self.pod_ips[pod] + "/32"


def synthetic_topology(flavour="flannel"):
    """A topology without a kernel, shaped as the lab's clusters: flannel's /24 per node in
    10.244.0.0/16, or calico_lite's /26 blocks in 10.65.0.0/16."""
    if flavour == "flannel":
        cidrs = {"node1": ("10.244.1.0/24",), "node2": ("10.244.2.0/24",)}
        cluster = "10.244.0.0/16"
    else:
        cidrs = {"node1": ("10.65.0.0/26",), "node2": ("10.65.0.64/26",)}
        cluster = "10.65.0.0/16"
    ips = {}
    for i, pod in enumerate(PODS):
        net = ipaddress.ip_network(cidrs[node_of(pod)][0])
        ips[pod] = str(net.network_address + 10 + i)
    return Topology(ips, cidrs, cluster, {"node1": "192.168.50.1", "node2": "192.168.50.2"})


def namespace_object(name, extra_labels=None):
    labels = {"ns": name, NS_NAME_LABEL: name}
    labels.update(extra_labels or {})
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod_object(namespace, name, ip, node, labels, host_network=False, ports=CONTAINER_PORTS, host_ip=None):
    """A running Pod as the API server holds it: spec.nodeName, status.podIP(s) and hostIP,
    container ports named serve-<port>-<protocol>. ip=None: scheduled but not started."""
    spec = {"nodeName": node, "containers": [{"name": "server", "image": "podnet/echo", "ports": [
        {"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}]}
    if host_network:
        spec["hostNetwork"] = True
    status = {"phase": "Running" if ip else "Pending"}
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    if host_ip:
        status.update(hostIP=host_ip, hostIPs=[{"ip": host_ip}])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "spec": spec, "status": status}


def default_pod_labels():
    return {pod: {"pod": pod.split("/")[1]} for pod in PODS}


def default_namespace_labels():
    return {ns: {} for ns in NAMESPACES}


def cluster_objects(topo, pod_labels=None, namespace_labels=None, without_address=(), web_ports=None):
    """(namespaces, pods): the 3 Namespaces and 9 Pods, plus two pods that must change
    nothing: x/pending (labels pod=a, no address yet: nobody) and x/hostnet (hostNetwork
    on node1, labels pod=b, the node's address: never policed, never a peer). Pods in
    `without_address` are written as not started yet (no status.podIPs); `web_ports`
    ({pod: number}) moves a pod's "web" port."""
    web_ports = web_ports or {}
    pod_labels = pod_labels or default_pod_labels()
    namespace_labels = namespace_labels or default_namespace_labels()
    namespaces = [namespace_object(ns, namespace_labels.get(ns)) for ns in NAMESPACES]
    host = topo.node_ips.get
    pods = [pod_object(p.split("/")[0], p.split("/")[1], None if p in without_address else topo.ip(p), node_of(p),
                       pod_labels[p], ports=container_ports(p, web_ports.get(p)), host_ip=host(node_of(p)))
            for p in PODS]
    pods.append(pod_object("x", "pending", None, "node1", {"pod": "a"}, host_ip=host("node1")))
    if host("node1"):
        pods.append(pod_object("x", "hostnet", host("node1"), "node1", {"pod": "b"}, host_network=True,
                               host_ip=host("node1")))
    return namespaces, pods


# ---- building policies -----------------------------------------------------------------------

def netpol(name, namespace="x", pods=None, ingress=None, egress=None, types=None):
    """A NetworkPolicy. pods: the podSelector (None: {} = every pod of the namespace);
    ingress/egress: lists of rules, None = the section is absent; types: policyTypes,
    None = absent (the model defaults it as the API server does)."""
    spec = {"podSelector": pods if pods is not None else {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = list(types)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def labels(**match):
    return {"matchLabels": dict(match)}


def expr(key, operator, *values):
    requirement = {"key": key, "operator": operator}
    if values:
        requirement["values"] = list(values)
    return {"matchExpressions": [requirement]}


def peer(pods=None, namespaces=None):
    out = {}
    if pods is not None:
        out["podSelector"] = pods
    if namespaces is not None:
        out["namespaceSelector"] = namespaces
    return out


def block(cidr, *excepted):
    out = {"cidr": cidr}
    if excepted:
        out["except"] = list(excepted)
    return {"ipBlock": out}


def port(number=None, protocol=None, end=None):
    out = {}
    if number is not None:
        out["port"] = number
    if protocol is not None:
        out["protocol"] = protocol
    if end is not None:
        out["endPort"] = end
    return out


def ingress_rule(*peers, ports=None):
    """One ingress rule; no peers = `from` absent (every source)."""
    out = {}
    if peers:
        out["from"] = list(peers)
    if ports is not None:
        out["ports"] = list(ports)
    return out


def egress_rule(*peers, ports=None):
    out = {}
    if peers:
        out["to"] = list(peers)
    if ports is not None:
        out["ports"] = list(ports)
    return out


def ns_is(name):
    return labels(ns=name)


# ---- expected matrices ---------------------------------------------------------------------

def matches(pattern, pod):
    if pattern == "":
        return True
    if pattern.startswith("@"):
        return node_of(pod) == pattern[1:]
    ns, _, name = pattern.partition("/")
    pod_ns, _, pod_name = pod.partition("/")
    return (ns in ("*", pod_ns)) and (not name or name == pod_name)


class Reachability:
    """{(source pod, destination pod): allowed} for every ordered pair of distinct pods."""

    def __init__(self, default=True, rules=()):
        self.cells = {(s, d): default for s in PODS for d in PODS if s != d}
        for src, dst, allowed in rules:
            self.expect(src, dst, allowed)

    def expect(self, src, dst, allowed):
        for s, d in self.cells:
            if matches(src, s) and matches(dst, d):
                self.cells[(s, d)] = allowed
        return self

    def __eq__(self, other):
        return isinstance(other, Reachability) and self.cells == other.cells

    def __repr__(self):
        denied = sum(1 for v in self.cells.values() if not v)
        return "<Reachability %d denied of %d>" % (denied, len(self.cells))


def reach(*rules):
    """Everything allowed, then each (source pattern, destination pattern, allowed) in order."""
    return Reachability(True, rules)


@dataclass(frozen=True)
class Check:
    protocol: str
    port: int
    expected: Reachability

    @property
    def label(self):
        return "%s/%d" % (self.protocol, self.port)


@dataclass(frozen=True)
class Case:
    name: str
    about: str
    build: object               # Topology -> [NetworkPolicy dict]
    checks: tuple

    def policies(self, topo):
        return copy.deepcopy(self.build(topo))


def case(name, about, build, *checks):
    if not callable(build):
        fixed = build
        build = lambda topo: fixed      # noqa: E731 - most scenarios need no addresses
    return Case(name, about, build, tuple(Check(proto, port, exp) for proto, port, exp in checks))


# shorthands for the matrices that recur
ALL = reach()
INTO_XA_DENIED = ("", "x/a", False)


def only_into_xa(*allowed_sources):
    return reach(INTO_XA_DENIED, *[(s, "x/a", True) for s in allowed_sources])


DENY_INGRESS_X = netpol("deny-ingress", ingress=[])
DENY_EGRESS_X = netpol("deny-egress", types=["Egress"])

CASES = [
    # --- isolation per namespace and per pod ---
    case("default-deny-ingress", "an empty podSelector with no ingress rules isolates the whole namespace",
         [DENY_INGRESS_X],
         ("TCP", 80, reach(("", "x", False))), ("UDP", 81, reach(("", "x", False))),
         ("SCTP", 80, reach(("", "x", False)))),
    case("default-deny-all", "policyTypes Ingress and Egress without rules: nothing in or out of x",
         [netpol("deny-all", types=["Ingress", "Egress"])],
         ("TCP", 80, reach(("", "x", False), ("x", "", False))),
         ("UDP", 80, reach(("", "x", False), ("x", "", False)))),
    case("default-deny-egress", "policyTypes [Egress] alone: x cannot open anything, anyone may reach x",
         [DENY_EGRESS_X],
         ("TCP", 80, reach(("x", "", False))), ("UDP", 81, reach(("x", "", False)))),
    case("deny-egress-one-pod", "egress isolation of the selected pod only",
         [netpol("deny-egress-a", pods=labels(pod="a"), types=["Egress"])],
         ("TCP", 80, reach(("x/a", "", False)))),
    case("empty-egress-list-is-ingress-only",
         "API defaulting (networking/v1 SetDefaults_NetworkPolicy): without policyTypes, Egress is implied "
         "only by a non-empty egress list, so `egress: []` is an Ingress-only policy that denies all ingress",
         [netpol("no-egress-rules", egress=[])],
         ("TCP", 80, reach(("", "x", False)))),
    case("two-namespaces-isolated", "policies in two namespaces apply independently",
         [DENY_INGRESS_X, netpol("deny-ingress", namespace="y", ingress=[])],
         ("TCP", 80, reach(("", "x", False), ("", "y", False)))),
    case("policy-selecting-nothing", "a policy whose podSelector matches no pod isolates nobody",
         [netpol("selects-nobody", pods=labels(pod="nobody"), types=["Ingress", "Egress"])],
         ("TCP", 80, ALL)),
    case("allow-all-ingress", "one empty ingress rule allows every source on every port",
         [netpol("allow-all", ingress=[{}])],
         ("TCP", 80, ALL), ("TCP", 81, ALL), ("UDP", 80, ALL)),
    case("allow-all-wins-over-deny", "allowed = union over every policy selecting the pod",
         [DENY_INGRESS_X, netpol("allow-all", ingress=[{}])],
         ("TCP", 80, ALL), ("UDP", 81, ALL)),
    # --- pod and namespace selectors ---
    case("from-pod-b-matchlabels", "a peer with only a podSelector means pods of the policy's own namespace",
         [netpol("a-from-b", pods=labels(pod="a"), ingress=[ingress_rule(peer(pods=labels(pod="b")))])],
         ("TCP", 80, only_into_xa("x/b"))),
    case("deny-all-then-allow-into-a", "deny-all for x plus an allow-all into x/a from every pod of every namespace",
         [DENY_INGRESS_X, netpol("allow-all-to-a", pods=labels(pod="a"),
                                 ingress=[ingress_rule(peer(pods={}, namespaces={}))])],
         ("TCP", 80, reach(("", "x", False), ("", "x/a", True)))),
    case("from-all-namespaces", "namespaceSelector {} selects every namespace",
         [netpol("a-from-everywhere", pods=labels(pod="a"), ingress=[ingress_rule(peer(namespaces={}))])],
         ("TCP", 80, ALL)),
    case("from-namespace-y", "namespaceSelector matchLabels",
         [netpol("a-from-y", pods=labels(pod="a"), ingress=[ingress_rule(peer(namespaces=ns_is("y")))])],
         ("TCP", 80, only_into_xa("y")), ("UDP", 80, only_into_xa("y"))),
    case("from-namespace-y-by-name-label", "the kubernetes.io/metadata.name label every namespace carries",
         [netpol("a-from-y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces={"matchLabels": {NS_NAME_LABEL: "y"}}))])],
         ("TCP", 80, only_into_xa("y"))),
    case("pod-in-expression", "podSelector matchExpressions In",
         [netpol("a-from-b", pods=labels(pod="a"), ingress=[ingress_rule(peer(pods=expr("pod", "In", "b")))])],
         ("TCP", 80, only_into_xa("x/b"))),
    case("pod-notin-expression", "podSelector matchExpressions NotIn (own namespace)",
         [netpol("a-not-from-b", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(pods=expr("pod", "NotIn", "b")))])],
         ("TCP", 80, only_into_xa("x/c"))),
    case("pod-exists-expressions", "Exists on both selectors, with NotIn in the same podSelector (AND of requirements)",
         [netpol("a-from-labelled", pods=labels(pod="a"), ingress=[ingress_rule(peer(
             pods={"matchExpressions": [{"key": "pod", "operator": "Exists"},
                                        {"key": "pod", "operator": "NotIn", "values": ["c"]}]},
             namespaces=expr("ns", "Exists")))])],
         ("TCP", 80, reach(("*/c", "x/a", False)))),
    case("pod-doesnotexist-nobody", "DoesNotExist on a label every pod has selects no peer",
         [netpol("a-from-unlabelled", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(pods=expr("pod", "DoesNotExist")))])],
         ("TCP", 80, only_into_xa())),
    case("pod-doesnotexist-everyone", "DoesNotExist on a label no pod has selects every pod of the namespace",
         [netpol("a-from-untiered", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(pods=expr("tier", "DoesNotExist")))])],
         ("TCP", 80, only_into_xa("x"))),
    case("namespace-in-expression", "namespaceSelector matchExpressions In",
         [netpol("a-from-y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces=expr(NS_NAME_LABEL, "In", "y")))])],
         ("TCP", 80, only_into_xa("y"))),
    case("namespace-in-two-values", "In with two values",
         [netpol("a-from-y-z", pods=labels(pod="a"), ingress=[ingress_rule(peer(namespaces=expr("ns", "In", "y", "z")))])],
         ("TCP", 80, only_into_xa("y", "z"))),
    case("namespace-or-pod", "two peers in one rule are OR: other namespaces, or x/b",
         [netpol("a-from-other-ns-or-b", pods=labels(pod="a"), ingress=[ingress_rule(
             peer(namespaces=expr(NS_NAME_LABEL, "NotIn", "x")), peer(pods=labels(pod="b")))])],
         ("TCP", 80, reach(("x/c", "x/a", False)))),
    case("namespace-and-pod", "podSelector and namespaceSelector in one peer are AND",
         [netpol("a-from-b-elsewhere", pods=labels(pod="a"), ingress=[ingress_rule(
             peer(namespaces=expr(NS_NAME_LABEL, "NotIn", "x"), pods=labels(pod="b")))])],
         ("TCP", 80, only_into_xa("y/b", "z/b"))),
    case("namespaces-and-pods-multiple", "AND of NotIn namespaces and In [b, c] pods",
         [netpol("a-from-bc-elsewhere", pods=labels(pod="a"), ingress=[ingress_rule(
             peer(namespaces=expr(NS_NAME_LABEL, "NotIn", "x"), pods=expr("pod", "In", "b", "c")))])],
         ("TCP", 80, only_into_xa("y/b", "y/c", "z/b", "z/c"))),
    case("any-of-two-pod-selectors", "two podSelector peers: b or c of x",
         [netpol("a-from-b-or-c", pods=labels(pod="a"), ingress=[ingress_rule(
             peer(pods=labels(pod="b")), peer(pods=labels(pod="c")))])],
         ("TCP", 80, only_into_xa("x/b", "x/c"))),
    case("only-y-a", "one pod of another namespace",
         [netpol("a-from-y-a", pods=labels(pod="a"), ingress=[ingress_rule(
             peer(namespaces=ns_is("y"), pods=labels(pod="a")))])],
         ("TCP", 80, only_into_xa("y/a")), ("UDP", 80, only_into_xa("y/a")), ("SCTP", 80, only_into_xa("y/a"))),
    case("only-own-namespace", "a podSelector {} peer: every pod of x and nothing else",
         [netpol("from-x", ingress=[ingress_rule(peer(pods={}))])],
         ("TCP", 80, reach(("y", "x", False), ("z", "x", False)))),
    # --- ports ---
    case("port-81-from-y", "a numbered port: only TCP 81, only from y",
         [netpol("a-81-from-y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces=ns_is("y")), ports=[port(81, "TCP")])])],
         ("TCP", 81, only_into_xa("y")), ("TCP", 80, only_into_xa()), ("UDP", 81, only_into_xa())),
    case("stacked-port-policies", "two policies for the same pod, one port each: their union",
         [netpol("a-81-from-y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces=ns_is("y")), ports=[port(81, "TCP")])]),
          netpol("a-80-from-y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces=ns_is("y")), ports=[port(80, "TCP")])])],
         ("TCP", 80, only_into_xa("y")), ("TCP", 81, only_into_xa("y"))),
    case("port-default-protocol-tcp", "a port without protocol is TCP",
         [netpol("ingress-80", ingress=[ingress_rule(ports=[port(80)])])],
         ("TCP", 80, ALL), ("TCP", 81, reach(("", "x", False))), ("UDP", 80, reach(("", "x", False)))),
    case("port-80-plus-allow-all", "a port-limited policy and an allow-all one on the same pods",
         [netpol("ingress-80", ingress=[ingress_rule(ports=[port(80)])]), netpol("allow-all", ingress=[{}])],
         ("TCP", 81, ALL)),
    case("named-port-ingress", "a named port (serve-81-tcp) resolved on each destination pod",
         [netpol("ingress-serve-81", ingress=[ingress_rule(ports=[port("serve-81-tcp")])])],
         ("TCP", 81, ALL), ("TCP", 80, reach(("", "x", False))), ("UDP", 81, reach(("", "x", False)))),
    case("named-port-from-namespace", "a named port and a namespaceSelector",
         [netpol("a-serve-80-from-y", pods=labels(pod="a"), ingress=[ingress_rule(
             peer(namespaces=ns_is("y")), ports=[port("serve-80-tcp", "TCP")])])],
         ("TCP", 80, only_into_xa("y")), ("TCP", 81, only_into_xa())),
    case("named-port-udp", "a named UDP port",
         [netpol("a-serve-80-udp", pods=labels(pod="a"), ingress=[ingress_rule(ports=[port("serve-80-udp", "UDP")])])],
         ("UDP", 80, ALL), ("TCP", 80, only_into_xa()), ("UDP", 81, only_into_xa())),
    case("named-port-protocol-mismatch",
         "a named port resolves to a container port of that name and that protocol: serve-80-tcp on UDP is "
         "nothing (API reference: 'the port on the given protocol')",
         [netpol("a-serve-80-tcp-udp", pods=labels(pod="a"),
                 ingress=[ingress_rule(ports=[port("serve-80-tcp", "UDP")])])],
         ("UDP", 80, only_into_xa()), ("TCP", 80, only_into_xa())),
    case("named-port-missing", "a named port no container declares allows nothing, yet isolates",
         [netpol("a-serve-82", pods=labels(pod="a"), ingress=[ingress_rule(ports=[port("serve-82-tcp")])])],
         ("TCP", 80, only_into_xa()), ("TCP", 81, only_into_xa())),
    case("named-port-per-pod", "one name, a different number per pod: web is 80 on x/a, 81 on x/b and x/c",
         [netpol("ingress-web", ingress=[ingress_rule(ports=[port("web")])])],
         ("TCP", 80, reach(("", "x/b", False), ("", "x/c", False))), ("TCP", 81, reach(("", "x/a", False)))),
    case("named-port-per-pod-egress", "egress to web: 80 on the a pods, 81 on the others",
         [netpol("egress-web", types=["Egress"], egress=[egress_rule(ports=[port("web")])])],
         ("TCP", 80, reach(("x", "*/b", False), ("x", "*/c", False))), ("TCP", 81, reach(("x", "*/a", False)))),
    case("named-port-egress", "egress to a named port, resolved on the destination pods",
         [netpol("egress-serve-80", egress=[egress_rule(ports=[port("serve-80-tcp")])], types=["Egress"])],
         ("TCP", 80, ALL), ("TCP", 81, reach(("x", "", False)))),
    case("port-range-ingress", "endPort: 80-81 from y",
         [netpol("a-80-81-from-y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces=ns_is("y")), ports=[port(80, "TCP", end=81)])])],
         ("TCP", 80, only_into_xa("y")), ("TCP", 81, only_into_xa("y")), ("UDP", 80, only_into_xa())),
    case("port-range-excludes-below", "endPort: 81-90 leaves 80 out",
         [netpol("a-81-90-from-y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces=ns_is("y")), ports=[port(81, "TCP", end=90)])])],
         ("TCP", 80, only_into_xa()), ("TCP", 81, only_into_xa("y"))),
    case("port-range-egress", "endPort on egress: 79-80",
         [netpol("egress-79-80", egress=[egress_rule(ports=[port(79, end=80)])], types=["Egress"])],
         ("TCP", 80, ALL), ("TCP", 81, reach(("x", "", False)))),
    case("protocol-only-tcp", "a port entry with only a protocol: every TCP port, no UDP, no SCTP",
         [netpol("a-any-tcp", pods=labels(pod="a"), ingress=[ingress_rule(ports=[port(protocol="TCP")])])],
         ("TCP", 80, ALL), ("TCP", 81, ALL), ("UDP", 80, only_into_xa()), ("SCTP", 80, only_into_xa())),
    case("protocol-only-udp", "every UDP port, no TCP",
         [netpol("a-any-udp", pods=labels(pod="a"), ingress=[ingress_rule(ports=[port(protocol="UDP")])])],
         ("UDP", 80, ALL), ("UDP", 81, ALL), ("TCP", 80, only_into_xa())),
    case("udp-only-port-81", "a UDP-only rule must not open TCP",
         [netpol("a-udp-81", pods=labels(pod="a"), ingress=[ingress_rule(ports=[port(81, "UDP")])])],
         ("TCP", 81, only_into_xa()), ("UDP", 81, ALL), ("UDP", 80, only_into_xa())),
    case("udp-port-81-from-y", "UDP port and namespace together",
         [netpol("a-udp-81-from-y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces=ns_is("y")), ports=[port(81, "UDP")])])],
         ("UDP", 81, only_into_xa("y")), ("UDP", 80, only_into_xa()), ("TCP", 81, only_into_xa())),
    case("sctp-only-port-81", "an SCTP rule must not open TCP (upstream: a security hole if it does)",
         [DENY_INGRESS_X, netpol("a-sctp-81", pods=labels(pod="a"), ingress=[ingress_rule(ports=[port(81, "SCTP")])])],
         ("TCP", 81, reach(("", "x", False))), ("SCTP", 81, reach(("", "x", False), ("", "x/a", True))),
         ("SCTP", 80, reach(("", "x", False)))),
    case("sctp-rule-isolates", "a pod selected by an SCTP-only policy is isolated for TCP",
         [netpol("a-sctp-80", pods=labels(pod="a"), ingress=[ingress_rule(ports=[port(80, "SCTP")])])],
         ("TCP", 81, only_into_xa()), ("TCP", 80, only_into_xa()), ("SCTP", 80, ALL)),
    case("two-rules-one-policy", "the rules of one policy are OR: x/b on 80, or y on 81",
         [netpol("a-two-rules", pods=labels(pod="a"), ingress=[
             ingress_rule(peer(pods=labels(pod="b")), ports=[port(80)]),
             ingress_rule(peer(namespaces=ns_is("y")), ports=[port(81)])])],
         ("TCP", 80, only_into_xa("x/b")), ("TCP", 81, only_into_xa("y"))),
    case("empty-ports-list", "`ports: []` matches every port and protocol",
         [netpol("a-from-b-any-port", pods=labels(pod="a"),
                 ingress=[{"from": [peer(pods=labels(pod="b"))], "ports": []}])],
         ("TCP", 81, only_into_xa("x/b")), ("UDP", 80, only_into_xa("x/b")), ("SCTP", 81, only_into_xa("x/b"))),
    case("empty-from-list", "`from: []` matches every source (API reference: empty or missing)",
         [netpol("a-81-from-anyone", pods=labels(pod="a"), ingress=[{"from": [], "ports": [port(81)]}])],
         ("TCP", 81, ALL), ("TCP", 80, only_into_xa())),
    # --- egress ---
    case("egress-to-y-a", "egress to one pod of another namespace (AND peer)",
         [netpol("a-to-y-a", pods=labels(pod="a"), types=["Egress"],
                 egress=[egress_rule(peer(namespaces=ns_is("y"), pods=labels(pod="a")))])],
         ("TCP", 80, reach(("x/a", "", False), ("x/a", "y/a", True)))),
    case("egress-inferred-types", "no policyTypes and a non-empty egress list: Ingress and Egress (ingress: deny all)",
         [netpol("a-to-y-a", pods=labels(pod="a"),
                 egress=[egress_rule(peer(namespaces=ns_is("y"), pods=labels(pod="a")))])],
         ("TCP", 80, reach(("x/a", "", False), ("x/a", "y/a", True), ("", "x/a", False)))),
    case("egress-to-namespace-z", "egress namespaceSelector",
         [netpol("to-z", egress=[egress_rule(peer(namespaces=ns_is("z")))], types=["Egress"])],
         ("TCP", 80, reach(("x", "", False), ("x", "z", True)))),
    case("egress-own-namespace", "egress podSelector {}: the policy's own namespace",
         [netpol("to-x", egress=[egress_rule(peer(pods={}))], types=["Egress"])],
         ("TCP", 80, reach(("x", "y", False), ("x", "z", False)))),
    case("egress-namespace-notin", "egress NotIn on the namespace name label",
         [netpol("a-not-to-y", pods=labels(pod="a"), types=["Egress"],
                 egress=[egress_rule(peer(namespaces=expr(NS_NAME_LABEL, "NotIn", "y")))])],
         ("TCP", 80, reach(("x/a", "y", False)))),
    case("egress-port-80-only", "egress limited to a port",
         [netpol("egress-80", egress=[egress_rule(ports=[port(80)])], types=["Egress"])],
         ("TCP", 80, ALL), ("TCP", 81, reach(("x", "", False)))),
    case("egress-allow-all-wins", "a port-limited egress policy and an allow-all egress policy",
         [netpol("egress-80", egress=[egress_rule(ports=[port(80)])], types=["Egress"]),
          netpol("egress-all", egress=[{}], types=["Egress"])],
         ("TCP", 81, ALL)),
    case("empty-to-list", "`to: []` matches every destination",
         [netpol("a-to-anyone-80", pods=labels(pod="a"), types=["Egress"], egress=[{"to": [], "ports": [port(80)]}])],
         ("TCP", 80, ALL), ("TCP", 81, reach(("x/a", "", False)))),
    case("dns-like-egress", "deny egress, except UDP 81 to y/a (the shape of 'only DNS to the resolver')",
         [DENY_EGRESS_X, netpol("dns", types=["Egress"], egress=[egress_rule(
             peer(namespaces=ns_is("y"), pods=labels(pod="a")), ports=[port(81, "UDP")])])],
         ("UDP", 81, reach(("x", "", False), ("x", "y/a", True))), ("UDP", 80, reach(("x", "", False))),
         ("TCP", 81, reach(("x", "", False)))),
    case("client-egress-denies-despite-server", "egress of the client denies what the server's ingress allows",
         [netpol("a-to-y-a", pods=labels(pod="a"), types=["Egress"],
                 egress=[egress_rule(peer(namespaces=ns_is("y"), pods=labels(pod="a")))]),
          netpol("ya-from-x-a", namespace="y", pods=labels(pod="a"),
                 ingress=[ingress_rule(peer(namespaces=ns_is("x"), pods=labels(pod="a")))]),
          netpol("yb-from-x-a", namespace="y", pods=labels(pod="b"),
                 ingress=[ingress_rule(peer(namespaces=ns_is("x"), pods=labels(pod="a")))])],
         ("TCP", 80, reach(("x/a", "", False), ("", "y/a", False), ("x/a", "y/a", True), ("", "y/b", False)))),
    case("ingress-and-egress-together", "one policy with both sections (explicit types)",
         [netpol("a-both", pods=labels(pod="a"), types=["Egress", "Ingress"],
                 ingress=[ingress_rule(peer(pods=labels(pod="b")))], egress=[egress_rule(ports=[port(80)])])],
         ("TCP", 80, only_into_xa("x/b")),
         ("TCP", 81, reach(INTO_XA_DENIED, ("x/a", "", False), ("x/b", "x/a", True)))),
    case("ingress-and-egress-independent", "egress allow-all and ingress deny for the same pod, two policies",
         [netpol("a-egress-all", pods=labels(pod="a"), egress=[{}], types=["Egress"]),
          netpol("a-no-ingress", pods=labels(pod="a"), types=["Ingress"])],
         ("TCP", 80, only_into_xa())),
    case("types-egress-ignores-ingress-section", "policyTypes [Egress]: an ingress section present is ignored",
         [netpol("a-egress-only", pods=labels(pod="a"), ingress=[], egress=[], types=["Egress"])],
         ("TCP", 80, reach(("x/a", "", False)))),
    case("types-ingress-ignores-egress-section", "policyTypes [Ingress]: an egress section present is ignored",
         [netpol("a-ingress-only", pods=labels(pod="a"), types=["Ingress"],
                 ingress=[ingress_rule(peer(pods=labels(pod="b")))],
                 egress=[egress_rule(peer(pods=labels(pod="c")))])],
         ("TCP", 80, only_into_xa("x/b"))),
    # --- ipBlock, with the cluster's real addresses ---
    case("egress-cidr-one-pod", "egress ipBlock of one pod's /32",
         lambda t: [netpol("a-to-yb-cidr", pods=labels(pod="a"), types=["Egress"],
                           egress=[egress_rule(block(t.host("y/b")))])],
         ("TCP", 80, reach(("x/a", "", False), ("x/a", "y/b", True)))),
    case("egress-cidr-except", "egress to the whole pod network except x/b",
         lambda t: [netpol("a-to-all-but-xb", pods=labels(pod="a"), types=["Egress"],
                           egress=[egress_rule(block(t.cluster_cidr, t.host("x/b")))])],
         ("TCP", 80, reach(("x/a", "x/b", False)))),
    case("egress-cidr-except-overlap", "an address in one policy's except and another's cidr is allowed",
         lambda t: [netpol("a-to-all-but-xb", pods=labels(pod="a"), types=["Egress"],
                           egress=[egress_rule(block(t.cluster_cidr, t.host("x/b")))]),
                    netpol("a-to-xb", pods=labels(pod="a"), types=["Egress"],
                           egress=[egress_rule(block(t.host("x/b")))])],
         ("TCP", 80, ALL)),
    case("ingress-cidr-node", "ingress from one node's pod CIDR",
         lambda t: [netpol("a-from-node2", pods=labels(pod="a"),
                           ingress=[ingress_rule(*[block(c) for c in t.pod_cidrs["node2"]])])],
         ("TCP", 80, only_into_xa("@node2"))),
    case("ingress-cidr-excepts", "ingress from the pod network except node2's CIDR and z/a",
         lambda t: [netpol("a-from-node1-but-za", pods=labels(pod="a"), ingress=[ingress_rule(
             block(t.cluster_cidr, *(t.pod_cidrs["node2"] + (t.host("z/a"),))))])],
         ("TCP", 80, reach(INTO_XA_DENIED, ("@node1", "x/a", True), ("z/a", "x/a", False)))),
    case("egress-cidr-named-port", "a named port towards an ipBlock peer: resolved on the pod behind the address",
         lambda t: [netpol("a-to-yb-web", pods=labels(pod="a"), types=["Egress"],
                           egress=[egress_rule(block(t.host("y/b")), ports=[port("web")])])],
         ("TCP", 81, reach(("x/a", "", False), ("x/a", "y/b", True))), ("TCP", 80, reach(("x/a", "", False)))),
    case("ingress-cidr-or-pod", "an ipBlock peer OR a pod peer in one rule",
         lambda t: [netpol("a-from-zc-or-b", pods=labels(pod="a"), ingress=[ingress_rule(
             block(t.host("z/c")), peer(pods=labels(pod="b")))])],
         ("TCP", 80, only_into_xa("z/c", "x/b"))),
]

CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"


# ---- bad input: each is skipped, the good policies beside it are enforced ------------------

def bad_policies(topo):
    """(policy, the path its error must name). Each is malformed the way a hand-written
    manifest can be; the API server would refuse them, a manifests directory does not."""
    return [
        (netpol("bad-operator", pods=labels(pod="a"),
                ingress=[ingress_rule(peer(pods={"matchExpressions": [{"key": "pod", "operator": "Has"}]}))]),
         "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator"),
        (netpol("bad-cidr", pods=labels(pod="b"), ingress=[ingress_rule(block("10.0.0.300/8"))]),
         "spec.ingress[0].from[0].ipBlock.cidr"),
        (netpol("bad-except", pods=labels(pod="b"), types=["Egress"],
                egress=[egress_rule(block(topo.host("y/a"), "300.1.0.0/16"))]),
         "spec.egress[0].to[0].ipBlock.except[0]"),
        (netpol("except-outside-cidr", pods=labels(pod="c"), types=["Egress"],
                egress=[egress_rule(block(topo.host("y/a"), "172.16.0.0/12"))]),
         "spec.egress[0].to[0].ipBlock.except[0]"),
        (netpol("bad-label-value", pods=labels(pod="not valid!"), ingress=[]),
         "spec.podSelector.matchLabels"),
        (netpol("bad-port", namespace="y", ingress=[ingress_rule(ports=[port(70000)])]),
         "spec.ingress[0].ports[0].port"),
        (netpol("bad-protocol", namespace="z", ingress=[ingress_rule(ports=[port(80, "ICMP")])]),
         "spec.ingress[0].ports[0].protocol"),
        (netpol("bad-end-port", namespace="z", ingress=[ingress_rule(ports=[port(81, "TCP", end=80)])]),
         "spec.ingress[0].ports[0].endPort"),
        (netpol("named-end-port", namespace="y", ingress=[ingress_rule(ports=[port("serve-80-tcp", end=81)])]),
         "spec.ingress[0].ports[0].endPort"),
        (netpol("bad-type", namespace="y", types=["Sideways"]), "spec.policyTypes[0]"),
    ]


BAD_INPUT_GOOD_POLICIES = [
    netpol("a-from-y", pods=labels(pod="a"), ingress=[ingress_rule(peer(namespaces=ns_is("y")))]),
    netpol("deny-egress-c", namespace="z", pods=labels(pod="c"), types=["Egress"]),
]
# what the good ones alone give: the bad ones (which would isolate x/b, y, z) change nothing
BAD_INPUT_EXPECTED = reach(INTO_XA_DENIED, ("y", "x/a", True), ("z/c", "", False))
