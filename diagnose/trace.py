"""`podnet trace SRC DST[:PORT[/PROTO]]`: where a packet goes, hop by hop, and where it stops.

The walk is symbolic and pure (`walk()`): it reads the cluster's objects (`ClusterView`: Pods,
Namespaces, Services, EndpointSlices, NetworkPolicies, Nodes, and when given, flannel's leases
or calico_lite's blocks from etcd) and one kernel snapshot per node (`NodeState`: K's
diagnose/snapshot.py plus the established TCP sessions, for BGP), and compares what each agent
intends, computed by the agent's own pure code (kube_proxy.model for endpoint eligibility,
network_policy.model.PolicyModel.verdict for policy, flannel's lease layout, calico's blocks),
with what the kernel holds. Each hop names the object behind it and the exact rule or route.

A trace runs on one node. The other node's half is checked from that node's snapshot, written
there by `podnet trace --snapshot` and passed as `--remote-snapshot FILE`; without one, the
remote steps are reported as not checked rather than guessed.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diagnose.snapshot import RouteState, Snapshot, local_route, route_decision, route_lookup, rule_note

if TYPE_CHECKING:
    from podnet.kube.api import KubeApiSource

OK, FAIL, WARN, INFO = "ok", "fail", "warn", "info"
PROTOCOLS = ("TCP", "UDP", "SCTP")
BGP_PORT = 179
VXLAN_OVERHEAD = 50         # outer IPv4 + UDP + VXLAN + inner Ethernet
IPIP_OVERHEAD = 20


# ---- the answer ------------------------------------------------------------------------------

@dataclass
class Hop:
    node: str           # where the step happens ("" for cluster-level steps)
    step: str           # source, interface, service, kube-proxy-rules, egress-policy, forward, rp_filter,
                        # route, neighbour, fdb, bgp, mtu, ingress-policy, destination
    status: str         # ok, fail, warn, info
    what: str           # one sentence for a person
    object: str = ""    # the Kubernetes (or datastore) object behind it: "NetworkPolicy x/deny"
    rule: str = ""      # the exact rule or route

    def line(self) -> str:
        mark = {"ok": "  ", "info": "  ", "warn": "? ", "fail": "X "}[self.status]
        where = "[%s] " % self.node if self.node else ""
        tail = "".join("  (%s)" % x for x in (self.object, self.rule) if x)
        return "%s%-16s %s%s%s" % (mark, self.step, where, self.what, tail)


@dataclass
class Trace:
    source: str
    destination: str
    protocol: str
    port: int
    hops: list[Hop] = field(default_factory=list)
    verdict: str = "delivered"      # delivered, dropped, rejected, unknown
    src_ip: str = ""
    sent_to: str = ""               # the address the source sends to (a ClusterIP before DNAT)
    sent_port: int = 0
    endpoint: tuple[str, int] | None = None     # the Service endpoint the walk followed (after DNAT)
    ipvs_node: str = ""             # the node whose IPVS forwarded the packet (its output hook then polices it)
    live: dict[str, Any] | None = None

    def add(self, hop: Hop) -> Hop:
        self.hops.append(hop)
        return hop

    @property
    def failed(self) -> Hop | None:
        return next((h for h in self.hops if h.status == FAIL), None)

    def lines(self) -> list[str]:
        out = ["trace %s -> %s %s/%d" % (self.source, self.destination, self.protocol, self.port)]
        out += [h.line() for h in self.hops]
        failed = self.failed
        out.append("verdict: %s%s" % (self.verdict.upper(), " at %s%s" % (
            failed.step, " on " + failed.node if failed.node else "") if failed else ""))
        if self.live is not None:
            out.append("live: %s" % self.live.get("summary", ""))
            out += ["  " + line for line in self.live.get("events", [])[-8:]]
        return out

    def to_dict(self) -> dict[str, Any]:
        failed = self.failed
        return {"source": self.source, "destination": self.destination, "protocol": self.protocol,
                "port": self.port, "verdict": self.verdict,
                "failed_hop": dataclasses.asdict(failed) if failed else None,
                "hops": [dataclasses.asdict(h) for h in self.hops], "live": self.live}


# ---- the inputs ------------------------------------------------------------------------------

@dataclass
class NodeState:
    """One node's kernel, as the trace reads it: K's snapshot plus established TCP sessions
    ("local:port remote:port"), which say whether a BGP session is up whoever speaks it."""
    name: str
    snapshot: Snapshot
    tcp_established: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.name, "snapshot": self.snapshot.to_dict(), "tcp_established": list(self.tcp_established)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeState:
        return cls(data["node"], Snapshot.from_dict(data.get("snapshot", {})),
                   tuple(data.get("tcp_established", ())))


@dataclass
class FlannelLease:
    subnet: str
    public_ip: str
    backend: str
    vtep_mac: str = ""


@dataclass
class CalicoBlock:
    block: str
    node: str
    node_ip: str


@dataclass
class ClusterView:
    """The objects a trace reads, as the API's dicts, plus the overlay's datastore records."""
    pods: list[dict[str, Any]] = field(default_factory=list)
    namespaces: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    leases: list[FlannelLease] = field(default_factory=list)
    blocks: list[CalicoBlock] = field(default_factory=list)
    calico_peers: dict[str, tuple[str, str]] = field(default_factory=dict)  # address -> (node name, role)

    def add(self, kind: str, obj: dict[str, Any]) -> None:
        bucket = {"Pod": self.pods, "Namespace": self.namespaces, "Service": self.services,
                  "EndpointSlice": self.slices, "NetworkPolicy": self.policies, "Node": self.nodes}.get(kind)
        if bucket is not None:
            bucket.append(obj)


@dataclass
class Endpointish:
    """SRC or DST resolved: a pod, a node address, a Service port, or a bare address."""
    text: str
    kind: str                   # pod, node, service, address
    ip: str = ""
    node: str = ""              # the node it is on (pods, node addresses)
    pod: tuple[str, str] | None = None
    service: tuple[str, str, str] | None = None     # namespace, name, port (name or number)


# ---- parsing the command line --------------------------------------------------------------

def split_destination(text: str) -> tuple[str, str, str]:
    """DST[:PORT[/PROTO]] -> (dst, port text, protocol); the port may be a name."""
    proto = "TCP"
    head, slash, tail = text.rpartition("/")
    if slash and tail.upper() in PROTOCOLS:
        text, proto = head, tail.upper()
    if text.startswith("[") and "]" in text:        # [v6]:port
        addr, _, rest = text[1:].partition("]")
        return addr, rest.lstrip(":"), proto
    if text.count(":") == 1:
        addr, _, port = text.partition(":")
        return addr, port, proto
    return text, "", proto


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _pod_ip(pod: dict[str, Any]) -> str:
    status = pod.get("status") or {}
    return status.get("podIP") or next((x.get("ip", "") for x in status.get("podIPs") or ()), "")


def _node_addresses(view: ClusterView) -> dict[str, str]:
    out = {}
    for node in view.nodes:
        name = (node.get("metadata") or {}).get("name", "")
        for addr in (node.get("status") or {}).get("addresses") or ():
            if addr.get("type") == "InternalIP":
                out[addr.get("address", "")] = name
    for block in view.blocks:
        out.setdefault(block.node_ip, block.node)
    return out


def resolve(view: ClusterView, text: str, lease_nodes: dict[str, str]) -> Endpointish:
    """namespace/name, svc/namespace/name[:port], or an address -> an Endpointish (ValueError if unknown)."""
    if text.startswith("svc/"):
        parts = text[4:].split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError("%r: a Service is svc/NAMESPACE/NAME" % text)
        return Endpointish(text, "service", service=(parts[0], parts[1], ""))
    if _is_ip(text):
        ip = str(ipaddress.ip_address(text))
        for pod in view.pods:
            if _pod_ip(pod) == ip and not (pod.get("spec") or {}).get("hostNetwork"):
                meta = pod.get("metadata") or {}
                return Endpointish(text, "pod", ip, (pod.get("spec") or {}).get("nodeName", ""),
                                   pod=(meta.get("namespace", "default"), meta.get("name", "")))
        for service in view.services:
            spec = service.get("spec") or {}
            if ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]):
                meta = service.get("metadata") or {}
                return Endpointish(text, "service", ip, service=(meta.get("namespace", "default"), meta["name"], ""))
        nodes = dict(lease_nodes)
        nodes.update(_node_addresses(view))
        if ip in nodes:
            return Endpointish(text, "node", ip, nodes[ip])
        return Endpointish(text, "address", ip)
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name:
        raise ValueError("%r is neither NAMESPACE/POD, svc/NAMESPACE/NAME nor an IP address" % text)
    for pod in view.pods:
        meta = pod.get("metadata") or {}
        if meta.get("name") == name and meta.get("namespace", "default") == namespace:
            ip = _pod_ip(pod)
            if not ip:
                raise ValueError("pod %s has no address yet" % text)
            return Endpointish(text, "pod", ip, (pod.get("spec") or {}).get("nodeName", ""), pod=(namespace, name))
    raise ValueError("no pod %s" % text)


# ---- kernel lookups on a snapshot ------------------------------------------------------------

def route_text(route: RouteState) -> str:
    words = [route.dst if route.dst not in ("0.0.0.0/0", "::/0") else "default"]
    if route.type not in ("unicast", ""):
        words.insert(0, route.type)
    if route.gateway:
        words += ["via", route.gateway]
    if route.dev:
        words += ["dev", route.dev]
    words += ["proto", route.protocol_name]
    if route.onlink:
        words.append("onlink")
    if route.mtu:
        words += ["mtu", str(route.mtu)]
    return " ".join(words)


@dataclass
class IptRule:
    chain: str
    text: str
    args: list[str]

    def opt(self, name: str) -> str | None:
        for i, word in enumerate(self.args[:-1]):
            if word == name:
                return self.args[i + 1]
        return None

    @property
    def target(self) -> str:
        for i in range(len(self.args) - 1, 0, -1):
            if self.args[i - 1] in ("-j", "-g"):
                return self.args[i]
        return ""

    @property
    def comment(self) -> str:
        return self.opt("--comment") or ""


def iptables_table(saved: str, table: str, containing: str = "") -> tuple[dict[str, str], list[IptRule]]:
    """One table of iptables-save text: ({chain: policy}, rules in order); with `containing`, only the
    rules whose text holds it (10,000 Services are 173k rules: split only the ones asked about)."""
    policies: dict[str, str] = {}
    rules: list[IptRule] = []
    current = None
    for line in saved.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
        elif current != table:
            continue
        elif line.startswith(":"):
            name, _, rest = line[1:].partition(" ")
            policies[name] = rest.split(" ")[0]
        elif line.startswith("-A ") and (not containing or containing in line):
            try:
                args = shlex.split(line)
            except ValueError:
                continue
            rules.append(IptRule(args[1], line, args[2:]))
    return policies, rules


def _addr_matches(spec: str | None, ip: str, negate: bool) -> bool:
    if spec is None:
        return True
    try:
        inside = ipaddress.ip_address(ip) in ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False
    return inside != negate


def _rule_matches(rule: IptRule, src: str, dst: str, iif: str, oif: str, proto: str, port: int) -> bool | None:
    """Whether an iptables rule matches a new packet: True, False, or None when it uses a match
    this evaluator does not model (marks, sets, ...). Conntrack states: a new connection's."""
    args = rule.args
    i = 0
    negate = False
    while i < len(args):
        word = args[i]
        value = args[i + 1] if i + 1 < len(args) else ""
        if word == "!":
            negate = True
            i += 1
            continue
        if word in ("-j", "-g"):
            break
        if word == "-s" and not _addr_matches(value, src, negate):
            return False
        if word == "-d" and not _addr_matches(value, dst, negate):
            return False
        if word in ("-i", "-o"):
            dev = iif if word == "-i" else oif
            hit = value == dev or (value.endswith("+") and dev.startswith(value[:-1]))
            if hit == negate:
                return False
        if word == "-p" and (value.upper() == proto) == negate:
            return False
        if word == "--dport" and (str(port) == value) == negate:
            return False
        if word == "--ctstate" and ("NEW" in value.split(",")) == negate:
            return False
        if word in ("--mark", "--match-set", "--dst-type", "--src-type", "--state"):
            return None
        if word.startswith("-"):
            negate = False
        i += 1
    return True


def forward_verdict(saved: str, src: str, dst: str, iif: str, oif: str, proto: str, port: int,
                    chain: str = "FORWARD", depth: int = 0) -> tuple[str, str]:
    """The filter table's verdict on a new forwarded packet: (ACCEPT|DROP|REJECT|RETURN|"", the deciding
    rule or "policy X"). Rules with matches not modelled are skipped (named by the caller's live probe)."""
    policies, rules = iptables_table(saved, "filter")
    if chain not in policies:
        return ("ACCEPT", "no %s chain" % chain) if depth == 0 else ("RETURN", "")
    for rule in rules:
        if rule.chain != chain:
            continue
        if _rule_matches(rule, src, dst, iif, oif, proto, port) is not True:
            continue
        target = rule.target
        if target in ("ACCEPT", "DROP", "REJECT"):
            return target, rule.text
        if target == "RETURN":
            return "RETURN", rule.text
        if target in policies and depth < 8:
            verdict, why = forward_verdict(saved, src, dst, iif, oif, proto, port, target, depth + 1)
            if verdict in ("ACCEPT", "DROP", "REJECT"):
                return verdict, why
    if depth:
        return "RETURN", ""
    return policies.get(chain, "ACCEPT"), "policy %s of %s" % (policies.get(chain, "ACCEPT"), chain)


# ---- the walk -------------------------------------------------------------------------------

def _leases_by_node(view: ClusterView) -> dict[str, str]:
    return {lease.public_ip: "" for lease in view.leases}


def _lease_for(view: ClusterView, ip: str) -> FlannelLease | None:
    addr = ipaddress.ip_address(ip)
    for lease in view.leases:
        if addr in ipaddress.ip_network(lease.subnet, strict=False):
            return lease
    return None


def _block_for(view: ClusterView, ip: str) -> CalicoBlock | None:
    addr = ipaddress.ip_address(ip)
    for block in view.blocks:
        if addr in ipaddress.ip_network(block.block, strict=False):
            return block
    return None


def _node_of_ip(view: ClusterView, ip: str, states: dict[str, NodeState]) -> str:
    """The node a pod address lives on, from the pods, then the overlay's records, then the kernels."""
    for pod in view.pods:
        if _pod_ip(pod) == ip:
            return (pod.get("spec") or {}).get("nodeName", "")
    block = _block_for(view, ip)
    if block is not None:
        return block.node
    for name, state in states.items():
        route = route_lookup(state.snapshot, ip)
        if route is not None and (route.dev.startswith(("cni", "cali")) or route.dev == "cbr0"):
            return name
    return ""


def _pod_interface(trace: Trace, state: NodeState, ip: str, what: str) -> tuple[str, int] | None:
    """The host side of a pod's interface on its node: (the device the node reaches it by, its MTU)."""
    snap = state.snapshot
    route, _ = route_decision(snap, ip)
    if route is None or not route.dev or route.gateway or route.type != "unicast":
        trace.add(Hop(state.name, "interface", FAIL, "no on-link route to %s %s" % (what, ip),
                      rule=route_text(route) if route else "no route"))
        return None
    link = snap.link(route.dev)
    if link is None or not link.up:
        trace.add(Hop(state.name, "interface", FAIL, "%s %s is behind %s, which is %s" % (
            what, ip, route.dev, "missing" if link is None else "down"), rule=route_text(route)))
        return None
    if link.kind == "bridge":
        ports = [x for x in snap.links if x.master == link.name and x.kind == "veth"]
        mtu = min((p.mtu for p in ports), default=link.mtu)
        trace.add(Hop(state.name, "interface", OK, "%s %s on bridge %s (mtu %d, %d veth ports)" % (
            what, ip, link.name, link.mtu, len(ports)), rule=route_text(route)))
        return link.name, mtu
    trace.add(Hop(state.name, "interface", OK, "%s %s by %s %s /32 route (mtu %d)" % (
        what, ip, link.kind or "link", link.name, link.mtu), rule=route_text(route)))
    return link.name, link.mtu


def _rp_filter(trace: Trace, state: NodeState, src: str, iif: str, dst: str = "") -> bool:
    """Reverse-path check of a packet from `src` arriving on `iif`: strict (1) wants the route back to
    src to leave by iif; loose (2) wants any route back."""
    snap = state.snapshot
    mode = snap.sysctls.effective_rp_filter(iif)
    if not mode:
        trace.add(Hop(state.name, "rp_filter", OK, "rp_filter off on %s" % (iif or "?")))
        return True
    # the kernel checks the source with a lookup of the reverse flow, as if made on this node
    back, by_rule = route_decision(snap, src, dst, "lo")
    key = "net.ipv4.conf.%s.rp_filter" % iif
    if rule_note(by_rule):
        key += "; %s" % rule_note(by_rule)
    if back is None or back.type != "unicast":
        trace.add(Hop(state.name, "rp_filter", FAIL, "rp_filter=%d on %s drops packets from %s: no route back"
                      % (mode, iif, src), rule=key))
        return False
    if mode == 1 and back.dev != iif:
        trace.add(Hop(state.name, "rp_filter", FAIL, "rp_filter=1 (strict) on %s drops packets from %s: the route "
                      "back leaves by %s" % (iif, src, back.dev), rule="%s; %s" % (key, route_text(back))))
        return False
    trace.add(Hop(state.name, "rp_filter", OK, "rp_filter=%d on %s passes %s" % (mode, iif, src), rule=key))
    return True


def _forward(trace: Trace, state: NodeState, src: str, dst: str, iif: str, oif: str, proto: str,
             port: int) -> bool:
    snap = state.snapshot
    if snap.sysctls.ip_forward == 0 and iif != oif:
        trace.add(Hop(state.name, "forward", FAIL, "ip_forward is 0: the node does not route",
                      rule="net.ipv4.ip_forward"))
        return False
    verdict, why = forward_verdict(snap.iptables_save, src, dst, iif, oif, proto, port)
    if verdict in ("DROP", "REJECT"):
        trace.add(Hop(state.name, "forward", FAIL, "filter FORWARD %ss %s -> %s (%s -> %s)" % (
            verdict.lower(), src, dst, iif, oif), rule=why))
        return False
    trace.add(Hop(state.name, "forward", OK, "filter FORWARD accepts (%s -> %s)" % (iif, oif), rule=why))
    for chain in snap.nft_forward_drop_chains():
        trace.add(Hop(state.name, "forward", WARN, "nft base chain %s (hook forward) has policy drop: what its "
                      "rules do not accept is dropped (its rules are not evaluated here; --live shows the verdict)"
                      % chain, rule="nft list chain %s" % chain))
    return True


def _service_hops(trace: Trace, view: ClusterView, state: NodeState | None, target: Endpointish,
                  port_text: str, client_node: str, via_node_port: bool) -> tuple[str, int] | None:
    """kube-proxy's handling of a Service port: eligible endpoints and why, the kernel's DNAT rules
    against them; the endpoint followed onwards, or None when the Service stops the packet."""
    from kube_proxy.model import categorize_endpoints, service_ports
    from podnet.kube.endpointslices import merge_endpoints, slice_info
    assert target.service is not None
    namespace, name, _ = target.service
    obj = next((s for s in view.services if (s.get("metadata") or {}).get("name") == name
                and (s.get("metadata") or {}).get("namespace", "default") == namespace), None)
    if obj is None:
        trace.add(Hop("", "service", FAIL, "no Service %s/%s" % (namespace, name)))
        return None
    ports = service_ports(obj)
    chosen = None
    for spn, sp in sorted(ports.items()):
        if port_text in ("", spn.port, str(sp.port), str(sp.node_port) if via_node_port else "-") \
                and sp.protocol == trace.protocol:
            chosen = (spn, sp)
            break
    if chosen is None:
        trace.add(Hop("", "service", FAIL, "Service %s/%s has no %s port %s" % (
            namespace, name, trace.protocol, port_text or "(any)"), object="Service %s/%s" % (namespace, name)))
        return None
    spn, sp = chosen
    trace.port = trace.sent_port = sp.node_port if via_node_port else sp.port
    trace.sent_to = target.ip if via_node_port else sp.cluster_ip
    slices = [s for s in view.slices if (s.get("metadata") or {}).get("namespace", "default") == namespace
              and ((s.get("metadata") or {}).get("labels") or {}).get("kubernetes.io/service-name") == name]
    infos = [i for i in (slice_info(s, 4, client_node) for s in slices) if i is not None]
    endpoints = merge_endpoints(infos).get(spn, ())
    cats = categorize_endpoints(sp, endpoints)
    slice_names = ", ".join(sorted((s.get("metadata") or {}).get("name", "") for s in slices)) or "none"
    obj_text = "Service %s, EndpointSlice %s" % (spn, slice_names)
    policy = []
    if sp.internal_policy_local:
        policy.append("internalTrafficPolicy Local")
    if sp.external_policy_local:
        policy.append("externalTrafficPolicy Local")
    if sp.session_affinity:
        policy.append("ClientIP affinity %d s" % sp.session_affinity_timeout)
    local_policy = sp.external_policy_local if via_node_port else sp.internal_policy_local
    eligible = cats.local if local_policy else cats.cluster
    from diagnose import proxy_rules
    rules = proxy_rules.service_rules(state.snapshot, spn, sp) \
        if state is not None and proxy_rules.rules_read(state.snapshot) else None
    if rules is not None and rules.mode == proxy_rules.IPVS:
        trace.ipvs_node = state.name if state is not None else ""
        if local_policy and not cats.local and cats.cluster:
            # kube-proxy's IPVS mode: an external Local policy without local endpoints uses the cluster's
            eligible = cats.cluster
            policy.append("IPVS: no local endpoint, so the cluster's")
    why_not = []
    for ep in endpoints:
        if ep in eligible:
            continue
        reason = "not ready" if not ep.ready and not ep.terminating else \
            "terminating" if ep.terminating and not ep.serving else \
            "terminating (used only when none is ready)" if ep.terminating else \
            "not on %s (%s Local)" % (client_node, "external" if via_node_port else "internal") \
            if local_policy and not ep.is_local else "not eligible"
        why_not.append("%s %s" % (ep.addr, reason))
    address = "%s:%d" % (target.ip if via_node_port else sp.cluster_ip, trace.port)
    summary = "%s %s -> %d endpoint(s) eligible: %s%s" % (
        address, spn, len(eligible), ", ".join(e.addr for e in eligible) or "none",
        "; not: " + ", ".join(why_not) if why_not else "")
    if policy:
        summary += " [%s]" % ", ".join(policy)
    if not eligible:
        if not cats.has_any:
            trace.add(Hop(client_node, "service", FAIL, "%s: no ready endpoints, kube-proxy REJECTs" % summary,
                          object=obj_text, rule='"%s has no endpoints" -j REJECT' % spn))
            trace.verdict = "rejected"
        else:
            trace.add(Hop(client_node, "service", FAIL, "%s: no local endpoint on %s for %s Local, kube-proxy "
                          "DROPs" % (summary, client_node, "external" if via_node_port else "internal"),
                          object=obj_text, rule='"%s has no local endpoints" -j DROP' % spn))
            trace.verdict = "dropped"
        return None
    trace.add(Hop(client_node, "service", OK, summary, object=obj_text))
    if state is not None and rules is not None:
        path = rules.path(local_policy, (target.ip, sp.node_port) if via_node_port else None)
        policy_name = "%s Local" % ("external" if via_node_port else "internal") if local_policy else "Cluster"
        if rules.mode == proxy_rules.NONE:
            trace.add(Hop(state.name, "kube-proxy-rules", FAIL, "no kube-proxy rules for %s in any mode (iptables nat "
                          "chains, nftables table kube-proxy, IPVS virtual servers): kube-proxy not running?" % spn,
                          object=obj_text))
            trace.verdict = "dropped"
            return None
        if path is None or not path.present:
            trace.add(Hop(state.name, "kube-proxy-rules", FAIL, "kube-proxy's %s rules for %s have no %s (policy %s)%s "
                          "(is kube-proxy running and synced?)" % (
                              rules.mode, spn, path.name if path is not None else "virtual server for %s:%d" % (
                                  target.ip, trace.port), policy_name,
                              "; %s is caught by %s" % (address, rules.entry) if rules.entry else ""),
                          object=obj_text, rule=rules.entry))
            trace.verdict = "dropped"
            return None
        have = path.addrs()
        wanted = {e.addr for e in eligible}
        stale = sorted(a for a in have if a not in wanted)
        missing = sorted(wanted - set(have))
        if stale or missing:
            words = []
            if stale:
                words.append("%s sends to %s, which %s does not list" % (path.name, ", ".join(stale), slice_names))
            if missing:
                words.append("%s has no rule for %s" % (path.name, ", ".join(missing)))
            trace.add(Hop(state.name, "kube-proxy-rules", FAIL, "kube-proxy's %s rules for %s are stale: %s "
                          "(is kube-proxy running and synced?)" % (rules.mode, spn, "; ".join(words)),
                          object=obj_text, rule=have[stale[0]].rule if stale else ""))
            trace.verdict = "dropped"
            return None
        trace.add(Hop(state.name, "kube-proxy-rules", OK, "%s mode: %s%s sends to every eligible endpoint (%d)" % (
            rules.mode, "%s -> " % rules.entry_to if rules.entry_to and rules.entry_to != path.name else "",
            path.name, len(have)), object=obj_text, rule=rules.entry or path.name))
    first = eligible[0]
    if len(eligible) > 1:
        trace.add(Hop("", "endpoint", INFO, "one of %d candidates is picked per connection; following %s" % (
            len(eligible), first.addr)))
    return first.ip, first.port


def _policy_model(view: ClusterView, node: str, namespaces: set[str], ips: set[str]) -> Any:
    """A PolicyModel holding what one connection's verdict needs: the two pods, every namespace
    (for namespace selectors), the policies of the two namespaces (a cheap model at 1,000 policies)."""
    from network_policy.model import PolicyModel, parse_namespace, parse_pod, parse_policy
    model = PolicyModel(node)
    for obj in view.namespaces:
        try:
            ns = parse_namespace(obj)
        except ValueError:
            continue
        model.set_namespace(ns.name, ns)
    for obj in view.pods:
        if _pod_ip(obj) in ips:
            try:
                pod = parse_pod(obj)
            except ValueError:
                continue
            if pod is not None:
                model.set_pod((pod.namespace, pod.name), pod)
    for obj in view.policies:
        if (obj.get("metadata") or {}).get("namespace", "default") in namespaces:
            try:
                policy = parse_policy(obj)
            except ValueError:
                continue
            model.set_policy(policy.key, policy)
    return model


def _policy_object(verdict: Any) -> str:
    return ", ".join("NetworkPolicy %s/%s" % key for key in verdict.isolated_by)


def _policy_hop(trace: Trace, model: Any, view: ClusterView, node: str, direction: str, src: str, dst: str,
                port: int) -> bool:
    verdict = model.verdict(src, dst, trace.protocol, port)
    ref = verdict.egress_by if direction == "egress" else verdict.ingress_by
    if not verdict.allowed and verdict.denied_by == direction:
        from network_policy import nftables as np_nft
        # IPVS sends what it forwards out through the output hook, past the forward chains
        chains = np_nft.OUTPUT_CHAINS if trace.ipvs_node and trace.ipvs_node == node else np_nft.BASE_CHAINS
        trace.add(Hop(node, "%s-policy" % direction, FAIL, verdict.reason,
                      object=_policy_object(verdict),
                      rule="table %s %s chain %s" % (np_nft.FAMILY, np_nft.TABLE, chains[direction][0])))
        trace.verdict = "dropped"
        return False
    if ref is not None:
        trace.add(Hop(node, "%s-policy" % direction, OK, "allowed by NetworkPolicy %s/%s %s rule %d" % (
            ref[0], ref[1], ref[2], ref[3]), object="NetworkPolicy %s/%s" % (ref[0], ref[1])))
    else:
        trace.add(Hop(node, "%s-policy" % direction, OK, "not isolated for %s (no NetworkPolicy selects it)" %
                      direction))
    return True


def _bgp_up(state: NodeState, peer: str) -> bool:
    return any(conn.split(" ")[1] == "%s:%d" % (peer, BGP_PORT) or conn.split(" ")[0] == "%s:%d" % (peer, BGP_PORT)
               or conn.split(" ")[0].endswith(":%d" % BGP_PORT) and conn.split(" ")[1].startswith(peer + ":")
               for conn in state.tcp_established if " " in conn)


def _between_nodes(trace: Trace, view: ClusterView, state: NodeState, dst: str, dst_node: str,
                   pod_mtu: int, src: str = "", iif: str = "") -> str | None:
    """The source node's route towards another node's pod: the overlay's device, neighbour, FDB,
    or the BGP route and its session; MTU on the way. The device it leaves by, or None."""
    snap = state.snapshot
    route, by_rule = route_decision(snap, dst, src, iif or "lo")
    note = rule_note(by_rule)
    lease = _lease_for(view, dst)
    block = _block_for(view, dst)
    behind = ("flannel lease %s (node %s)" % (lease.subnet, lease.public_ip) if lease else
              "calico block %s (node %s)" % (block.block, block.node) if block else "")
    rt = (route_text(route) if route else "") + ("; chosen by %s" % note if note else "")
    if route is None or route.type != "unicast":
        why = "no route to %s" % dst if route is None else "route %s is %s" % (route.dst, route.type)
        if note and route is not None:
            why += " (%s sends it to table %d)" % (note, by_rule.table if by_rule else 0)
        elif behind:
            why += ": the route for %s is missing" % behind
        trace.add(Hop(state.name, "route", FAIL, why, object=behind, rule=rt))
        return None
    link = snap.link(route.dev)
    expected_ok = True
    if lease is not None and lease.backend == "vxlan":
        gw = lease.subnet.split("/")[0]
        if route.dst != lease.subnet or route.gateway != gw or link is None or link.kind != "vxlan":
            expected_ok = False
            trace.add(Hop(state.name, "route", FAIL, "route to %s is %s, not flannel's %s via %s dev flannel.1 "
                          "onlink" % (dst, route_text(route), lease.subnet, gw), object=behind, rule=rt))
            return None
        trace.add(Hop(state.name, "route", OK, "to %s by vxlan %s (VNI %s)" % (dst, link.name, link.vxlan_vni),
                      object=behind, rule=rt))
        neigh = next((n for n in snap.neighbours_of(link.name) if n.dst == gw), None)
        if neigh is None or not neigh.lladdr or (lease.vtep_mac and neigh.lladdr.lower() != lease.vtep_mac.lower()):
            trace.add(Hop(state.name, "neighbour", FAIL, "no neighbour entry %s lladdr %s on %s: the inner frame has "
                          "no destination MAC" % (gw, lease.vtep_mac or "?", link.name) if neigh is None or not
                          neigh.lladdr else "neighbour %s on %s is %s, the lease says VtepMAC %s" % (
                              gw, link.name, neigh.lladdr, lease.vtep_mac),
                          object=behind, rule="ip neigh show dev %s %s" % (link.name, gw)))
            return None
        trace.add(Hop(state.name, "neighbour", OK, "%s is VTEP MAC %s (%s)" % (gw, neigh.lladdr, neigh.state),
                      object=behind))
        fdb = next((f for f in snap.fdb_of(link.name) if f.mac.lower() == neigh.lladdr.lower()), None)
        if fdb is None or (lease.public_ip and fdb.dst != lease.public_ip):
            trace.add(Hop(state.name, "fdb", FAIL, "no FDB entry %s dst %s on %s: VXLAN does not know where to send"
                          % (neigh.lladdr, lease.public_ip, link.name) if fdb is None else
                          "FDB entry %s on %s points at %s, the lease says %s" % (
                              neigh.lladdr, link.name, fdb.dst, lease.public_ip),
                          object=behind, rule="bridge fdb show dev %s" % link.name))
            return None
        trace.add(Hop(state.name, "fdb", OK, "%s -> VTEP %s" % (fdb.mac, fdb.dst), object=behind))
        under = snap.link(link.vxlan_dev) if link.vxlan_dev else None
        problems = []
        if link.mtu < pod_mtu:
            problems.append("%s mtu %d < pod mtu %d" % (link.name, link.mtu, pod_mtu))
        if under is not None and under.mtu < link.mtu + VXLAN_OVERHEAD:
            problems.append("%s mtu %d < %s mtu %d + %d of VXLAN" % (under.name, under.mtu, link.name, link.mtu,
                                                                   VXLAN_OVERHEAD))
        _mtu_hop(trace, state.name, problems, "pod %d, %s %d%s" % (
            pod_mtu, link.name, link.mtu, ", %s %d" % (under.name, under.mtu) if under else ""))
        return link.name if not problems else None
    if lease is not None and lease.backend == "host-gw":
        if route.gateway != lease.public_ip:
            trace.add(Hop(state.name, "route", FAIL, "route to %s is %s, not flannel host-gw's via %s" % (
                dst, route_text(route), lease.public_ip), object=behind, rule=rt))
            return None
        trace.add(Hop(state.name, "route", OK, "to %s via node %s" % (dst, lease.public_ip), object=behind,
                      rule=rt))
    elif block is not None:
        peer = route.gateway or ""
        if route.dst != block.block or (peer and peer != block.node_ip and not (link and link.kind == "ipip")):
            expected_ok = False
        status = OK if expected_ok else FAIL
        trace.add(Hop(state.name, "route", status, "to %s by %s%s" % (
            dst, route_text(route), "" if expected_ok else ", not calico's %s via %s" % (block.block, block.node_ip)),
            object=behind, rule=rt))
        if not expected_ok:
            return None
        own = {a.cidr.split("/")[0] for a in snap.addrs}
        reflectors = [p for p, (_, role) in view.calico_peers.items() if role == "route-reflector" and p not in own]
        speakers = sorted(reflectors or [p for p in view.calico_peers if p not in own]) or [block.node_ip]
        down = [p for p in speakers if not _bgp_up(state, p)]
        if down:
            names = ", ".join("%s (%s)" % (p, view.calico_peers.get(p, ("?", ""))[0]) for p in down)
            trace.add(Hop(state.name, "bgp", FAIL, "BGP session to %s is down: route %s is stale and will be "
                          "withdrawn" % (names, route.dst), object="BGP peer %s" % names,
                          rule="no established TCP session to port %d" % BGP_PORT))
            return None
        trace.add(Hop(state.name, "bgp", OK, "route learned over BGP; session to %s established" % ", ".join(speakers),
                      object="BGP peer %s" % ", ".join(speakers)))
    else:
        trace.add(Hop(state.name, "route", OK, "to %s by %s" % (dst, route_text(route)), rule=rt))
    problems = []
    if link is not None:
        overhead = IPIP_OVERHEAD if link.kind == "ipip" else 0
        if link.mtu - overhead < pod_mtu and link.kind == "ipip":
            problems.append("%s mtu %d < pod mtu %d + %d" % (link.name, link.mtu, pod_mtu, overhead))
        elif link.mtu < pod_mtu:
            problems.append("%s mtu %d < pod mtu %d" % (link.name, link.mtu, pod_mtu))
    if route.mtu and route.mtu < pod_mtu:
        problems.append("route mtu %d < pod mtu %d" % (route.mtu, pod_mtu))
    _mtu_hop(trace, state.name, problems, "pod %d, %s %d" % (pod_mtu, route.dev, link.mtu if link else 0))
    return route.dev if not problems else None


def _mtu_hop(trace: Trace, node: str, problems: list[str], summary: str) -> None:
    if problems:
        trace.add(Hop(node, "mtu", FAIL, "MTU too small on the path: %s; full-size packets are dropped "
                      "(DF set) or fragmented" % "; ".join(problems), rule="ip link show"))
        trace.verdict = "dropped"
    else:
        trace.add(Hop(node, "mtu", OK, "MTU on the path: %s" % summary))


def walk(view: ClusterView, states: dict[str, NodeState], source: str, destination: str, local_node: str = "") -> Trace:
    """The symbolic trace of a new connection from `source` to `destination` (DST[:PORT[/PROTO]])."""
    dst_text, port_text, proto = split_destination(destination)
    lease_nodes = _leases_by_node(view)
    src = resolve(view, source, lease_nodes)
    dst = resolve(view, dst_text, lease_nodes)
    port = int(port_text) if port_text.isdigit() else 0
    trace = Trace(source, destination, proto, port, src_ip=src.ip)
    if src.kind == "service":
        raise ValueError("a Service cannot be a source")
    src_node = src.node or local_node
    trace.add(Hop(src_node, "source", INFO, "%s %s on node %s" % (src.kind, src.ip, src_node or "?"),
                  object="Pod %s/%s" % src.pod if src.pod else ""))
    src_state = states.get(src_node)
    pod_mtu = 1500
    in_dev = ""
    if src_state is None:
        trace.add(Hop(src_node, "interface", WARN, "no snapshot of node %s: its steps are not checked" % src_node))
    elif src.kind == "pod":
        found = _pod_interface(trace, src_state, src.ip, "source pod")
        if found is None:
            trace.verdict = "dropped"
            return trace
        in_dev, pod_mtu = found
    for x in (src, dst):
        if x.kind in ("node", "address") and not x.node:
            owner = next((name for name, st in states.items() if local_route(st.snapshot, x.ip)), "")
            if owner:
                x.kind, x.node = "node", owner
    # a Service (by name, ClusterIP, or a node address with a NodePort)
    via_node_port = False
    trace.sent_to, trace.sent_port = dst.ip, port
    if dst.kind == "node" and port:
        for service in view.services:
            for p in (service.get("spec") or {}).get("ports") or ():
                if p.get("nodePort") == port:
                    meta = service.get("metadata") or {}
                    dst = Endpointish(dst.text, "service", dst.ip, dst.node,
                                      service=(meta.get("namespace", "default"), meta["name"], ""))
                    via_node_port = True
    if dst.kind == "service":
        # for a NodePort, the node receiving it judges locality; for a ClusterIP, the client's node
        client_node = dst.node if via_node_port else src_node
        found_ep = _service_hops(trace, view, states.get(client_node), dst, port_text, client_node, via_node_port)
        if found_ep is None:
            if trace.verdict == "delivered":
                trace.verdict = "dropped"
            return trace
        dst_ip, port = found_ep
        trace.endpoint = found_ep
        dst = resolve(view, dst_ip, lease_nodes)
        if not dst.node:
            dst.node = _node_of_ip(view, dst_ip, states)
    elif not dst.node:
        dst.node = _node_of_ip(view, dst.ip, states)
    dst_node = dst.node
    model = _policy_model(view, src_node, {x.pod[0] for x in (src, dst) if x.pod}, {src.ip, dst.ip})
    if src.kind == "pod" and not _policy_hop(trace, model, view, src_node, "egress", src.ip, dst.ip, port):
        return trace
    out_dev = ""
    if src_state is not None and src.kind == "pod":
        if dst_node == src_node and dst.kind == "pod":
            found = _pod_interface(trace, src_state, dst.ip, "destination pod")
            if found is None:
                trace.verdict = "dropped"
                return trace
            out_dev = found[0]
            if not _forward(trace, src_state, src.ip, dst.ip, in_dev, out_dev, proto, port):
                trace.verdict = "dropped"
                return trace
        else:
            if not _rp_filter(trace, src_state, src.ip, in_dev, dst.ip):
                trace.verdict = "dropped"
                return trace
            out = _between_nodes(trace, view, src_state, dst.ip, dst_node, pod_mtu, src.ip, in_dev)
            if out is None:
                if trace.verdict == "delivered":
                    trace.verdict = "dropped"
                return trace
            out_dev = out
            if not _forward(trace, src_state, src.ip, dst.ip, in_dev, out_dev, proto, port):
                trace.verdict = "dropped"
                return trace
    if dst_node and dst_node != src_node and dst.kind == "pod":
        remote = states.get(dst_node)
        if remote is None:
            trace.add(Hop(dst_node, "remote", WARN, "no snapshot of node %s (give --remote-snapshot): its steps "
                          "are not checked" % dst_node))
        else:
            route_in = route_lookup(remote.snapshot, src.ip)
            entry = route_in.dev if route_in is not None and route_in.dev else ""
            vx = next((x for x in remote.snapshot.links if x.kind == "vxlan"), None)
            lease, block = _lease_for(view, dst.ip), _block_for(view, dst.ip)
            if lease is not None and vx is not None and lease.backend == "vxlan":
                entry = vx.name         # VXLAN decapsulates: the inner packet enters by the VXLAN device
            elif block is not None:     # plain routing: it enters by the underlay device holding the node's address
                entry = next((a.dev for a in remote.snapshot.addrs if a.cidr.split("/")[0] == block.node_ip), entry)
            if not _rp_filter(trace, remote, src.ip, entry, dst.ip):
                trace.verdict = "dropped"
                return trace
            found = _pod_interface(trace, remote, dst.ip, "destination pod")
            if found is None:
                trace.verdict = "dropped"
                return trace
            if not _forward(trace, remote, src.ip, dst.ip, entry, found[0], proto, port):
                trace.verdict = "dropped"
                return trace
    if dst.kind == "pod" and not _policy_hop(trace, model, view, dst_node, "ingress", src.ip, dst.ip, port):
        return trace
    trace.add(Hop(dst_node, "destination", OK, "delivered to %s %s%s" % (
        dst.kind, dst.ip, ":%d" % port if port else ""), object="Pod %s/%s" % dst.pod if dst.pod else ""))
    trace.verdict = "delivered"
    return trace


# ---- reading the world (the command) --------------------------------------------------------

def tcp_established(path: str = "/proc/net/tcp") -> tuple[str, ...]:
    """Established IPv4 TCP sessions of this network namespace as "local:port remote:port"."""
    out = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return ()
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "01":
            continue
        pair = []
        for endpoint in fields[1:3]:
            addr, _, port = endpoint.partition(":")
            ip = ipaddress.IPv4Address(bytes(reversed(bytes.fromhex(addr))))
            pair.append("%s:%d" % (ip, int(port, 16)))
        out.append(" ".join(pair))
    return tuple(out)


def node_state(name: str, scope: Any = None) -> NodeState:
    from diagnose import snapshot
    return NodeState(name, snapshot.take(scope=scope), tcp_established())


def rule_scope(view: ClusterView, destination: str) -> Any:
    """The rules a trace to `destination` reads (diagnose.snapshot.RuleScope): the filter FORWARD
    chain and what it jumps to, the nft chain list of family inet (other firewalls' base chains),
    and for a Service (by name, ClusterIP, or a NodePort) kube-proxy's chains and maps for its ports
    in each mode. Everything else stays unread: a trace reads milliseconds of a 10,000-Service
    node's rules, not the minute a full read takes."""
    from diagnose.snapshot import RuleScope
    from kube_proxy import iptables as kp_ipt
    from kube_proxy import nftables as kp_nft
    from kube_proxy.model import service_ports
    dst, port_text, _ = split_destination(destination)
    services = []
    for obj in view.services:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        name = "svc/%s/%s" % (meta.get("namespace", "default"), meta.get("name", ""))
        ports = [str(p.get("nodePort", "")) for p in spec.get("ports") or ()]
        if dst == name or dst in (spec.get("clusterIPs") or [spec.get("clusterIP")]) or \
                (_is_ip(dst) and port_text and port_text in ports) or dst in (spec.get("externalIPs") or ()):
            services.append(obj)
    ipt: list[tuple[str, str, bool]] = [("filter", "FORWARD", True)]
    ip6t: list[tuple[str, str, bool]] = [("filter", "FORWARD", True)]
    nft: list[tuple[str, str, str, str, bool]] = []
    if services:
        for chain in ("KUBE-SERVICES", "KUBE-NODEPORTS"):
            ipt.append(("nat", chain, False))
            ip6t.append(("nat", chain, False))
        for family in ("ip", "ip6"):
            nft += [("map", family, kp_nft.TABLE, m, False) for m in (kp_nft.SERVICE_IPS, kp_nft.SERVICE_NODEPORTS,
                                                                     kp_nft.NO_EP_SERVICES, kp_nft.NO_EP_NODEPORTS)]
    for obj in services:
        for spn, sp in service_ports(obj).items():
            chains = [f(spn) for f in (kp_ipt.service_chain, kp_ipt.local_chain, kp_ipt.external_chain,
                                       kp_ipt.firewall_chain)]
            (ip6t if ":" in (sp.cluster_ip or "") else ipt).extend(("nat", c, True) for c in chains)
            family = "ip6" if ":" in (sp.cluster_ip or "") else "ip"
            nft += [("chain", family, kp_nft.TABLE, f(spn), True) for f in (
                kp_nft.service_chain, kp_nft.local_chain, kp_nft.external_chain, kp_nft.firewall_chain)]
    return RuleScope(iptables=tuple(ipt), ip6tables=tuple(ip6t), nft=tuple(nft),
                     ipvs=bool(services))


TRACE_KINDS = ("Service", "EndpointSlice", "NetworkPolicy", "Pod", "Namespace", "Node")
FEW_ENDPOINT_ADDRESSES = 16     # up to this many, a Service's endpoints' pods are asked for one by one
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def load_view(manifests: str | None, kubeconfig: str | None, etcd_endpoints: str | None,
              source: str | None = None, destination: str | None = None) -> ClusterView:
    """The objects, listed once from the daemons' sources, and the overlay's records from etcd.
    From the API with SRC or DST given, only what a trace between them reads (api_view); every
    object otherwise, and always from manifests (local files are cheap)."""
    from podnet.kube.events import RELIST
    view = ClusterView()

    def emit(event: Any) -> None:
        if event.type == RELIST:
            for obj in event.obj:
                view.add(event.kind, obj)
        elif event.type != "DELETED":
            view.add(event.kind, event.obj)
    if manifests:
        from podnet.kube.manifests import ManifestSource
        ManifestSource(manifests, emit, kinds=TRACE_KINDS).scan()
    elif kubeconfig is not None:
        from podnet.kube.api import KubeApiSource
        api = KubeApiSource(emit, kubeconfig=kubeconfig or None, kinds=TRACE_KINDS)
        if source or destination:
            view = api_view(api, source, destination)
        else:
            for kind in TRACE_KINDS:
                items, _ = api.list(kind)
                for obj in items:
                    view.add(kind, obj)
    if etcd_endpoints:
        _load_etcd(view, [e for e in etcd_endpoints.split(",") if e])
    if not view.leases:         # flanneld --kube-subnet-mgr: the leases are the Nodes' annotations
        view.leases = flannel_leases(view.nodes)
    return view


def _object_key(obj: dict[str, Any]) -> str:
    """Where the API server keeps an object ("namespace/name", "name" when cluster-scoped): its
    lists come in this order, and the walk's first-match lookups depend on it."""
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    return "%s/%s" % (meta["namespace"], name) if meta.get("namespace") else name


class _TargetedLists:
    """The lists api_view asks for, each object kept once, in the order of a full list."""

    def __init__(self, api: KubeApiSource) -> None:
        self.api = api
        self.view = ClusterView()
        self._seen: set[tuple[str, str]] = set()

    def list(self, kind: str, namespace: str | None = None, field_selector: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        items, _ = self.api.list(kind, namespace, field_selector, label_selector)
        for obj in items:
            key = (kind, _object_key(obj))
            if key not in self._seen:
                self._seen.add(key)
                self.view.add(kind, obj)
        return items

    def sorted_view(self) -> ClusterView:
        for bucket in (self.view.pods, self.view.namespaces, self.view.services, self.view.slices,
                       self.view.policies, self.view.nodes):
            bucket.sort(key=_object_key)
        return self.view


def _addressed_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods the resolver takes for their address: a hostNetwork pod's is its node's."""
    return [p for p in pods if _pod_ip(p) and not (p.get("spec") or {}).get("hostNetwork")]


def _namespace_of(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("namespace", "default")


def api_view(api: KubeApiSource, source: str | None, destination: str | None) -> ClusterView:
    """The objects a trace from `source` to `destination` (DST[:PORT[/PROTO]]) reads, each kind
    asked for with the API's own selectors instead of listed cluster-wide: every Node and
    Namespace (routes and leases; namespace selectors); a pod by name in its namespace, a pod by
    address with status.podIP (hostNetwork pods share their node's address: the resolver skips
    them); a Service by name in its namespace; every Service only when an address is no pod's (a
    ClusterIP has no field selector, and a node address with a port needs the NodePorts); the
    destination Service's EndpointSlices by their service-name label, and its endpoints' pods by
    address (by one list of the Service's namespace when there are many, then by address those
    no pod there holds, a few at most); the NetworkPolicies of the namespaces holding those pods.
    The walk then meets every object it would have found in a full view. Not looked up: other
    Services at an endpoint's address (Kubernetes does not support a ClusterIP as an endpoint),
    and the addresses of more than FEW_ENDPOINT_ADDRESSES endpoints outside the namespace."""
    lists = _TargetedLists(api)
    lists.list("Node")
    lists.list("Namespace")
    dst_text, port_text, _ = split_destination(destination) if destination else ("", "", "")
    policy_namespaces: set[str] = set()
    every_service: list[dict[str, Any]] | None = None
    target: dict[str, Any] | None = None        # the destination Service
    for text, is_destination in ((source or "", False), (dst_text, True)):
        if text.startswith("svc/"):
            parts = text[4:].split("/")
            # a Service as the source, or a malformed name: the walk says what is wrong
            if is_destination and len(parts) == 2 and all(parts):
                found = lists.list("Service", parts[0], "metadata.name=" + parts[1])
                target = found[0] if found else None
        elif _is_ip(text):
            ip = str(ipaddress.ip_address(text))
            pods = _addressed_pods(lists.list("Pod", field_selector="status.podIP=" + ip))
            policy_namespaces.update(_namespace_of(p) for p in pods)
            if pods:
                continue
            if every_service is None:
                every_service = lists.list("Service")
            if is_destination:
                target = _service_at(every_service, ip, port_text)
        else:
            namespace, slash, name = text.partition("/")
            if slash and namespace and name and lists.list("Pod", namespace, "metadata.name=" + name):
                policy_namespaces.add(namespace)
    if target is not None:
        policy_namespaces.update(_endpoint_pod_namespaces(lists, target))
    for namespace in sorted(policy_namespaces):
        lists.list("NetworkPolicy", namespace)
    return lists.sorted_view()


def _service_at(services: list[dict[str, Any]], ip: str, port_text: str) -> dict[str, Any] | None:
    """The Service the walk takes for an address that is no pod's: the first holding it as a
    ClusterIP, else (a node address) the last with that NodePort, as walk() picks them."""
    for service in services:
        spec = service.get("spec") or {}
        if ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]):
            return service
    port = int(port_text) if port_text.isdigit() else 0
    by_node_port = [s for s in services if port and any(
        p.get("nodePort") == port for p in (s.get("spec") or {}).get("ports") or ())]
    return by_node_port[-1] if by_node_port else None


def _endpoint_pod_namespaces(lists: _TargetedLists, service: dict[str, Any]) -> set[str]:
    """Fetch a Service's EndpointSlices and the pods at their addresses; the namespaces of those pods."""
    namespace, name = _namespace_of(service), (service.get("metadata") or {}).get("name", "")
    slices = lists.list("EndpointSlice", namespace, label_selector="%s=%s" % (SERVICE_NAME_LABEL, name))
    addresses = list(dict.fromkeys(str(a) for s in slices for ep in s.get("endpoints") or ()
                                   for a in ep.get("addresses") or ()))
    pods: list[dict[str, Any]] = []
    unheld = addresses
    if len(addresses) > FEW_ENDPOINT_ADDRESSES:
        wanted = set(addresses)
        in_namespace = lists.list("Pod", namespace)
        held = {_pod_ip(p) for p in in_namespace}
        pods = [p for p in in_namespace if _pod_ip(p) in wanted]
        unheld = [a for a in addresses if a not in held]
    if len(unheld) <= FEW_ENDPOINT_ADDRESSES:
        for address in unheld:
            pods += lists.list("Pod", field_selector="status.podIP=" + address)
    return {_namespace_of(p) for p in _addressed_pods(pods)}


def flannel_leases(nodes: list[dict[str, Any]]) -> list[FlannelLease]:
    """The leases flanneld's Kubernetes subnet manager keeps in Node annotations."""
    from flanneld.subnet.kube import leases_of_nodes
    return [_flannel_lease(lease) for lease in leases_of_nodes(nodes)]


def _flannel_lease(lease: Any) -> FlannelLease:
    data = lease.backend_data or {}
    return FlannelLease(str(lease.subnet), str(lease.public_ip), lease.backend_type,
                        str(data.get("VtepMAC", "")) if isinstance(data, dict) else "")


def _load_etcd(view: ClusterView, endpoints: list[str]) -> None:
    """flannel's leases under /coreos.com/network and calico_lite's blocks, whichever exist."""
    from podnet.etcd import EtcdClient
    client = EtcdClient(endpoints, timeout=5.0)
    from flanneld.subnet import parse_lease
    kvs, _ = client.get_prefix("/coreos.com/network/subnets/")
    for kv in kvs:
        try:
            lease = parse_lease(kv.key, kv.value)
        except ValueError:
            continue
        view.leases.append(_flannel_lease(lease))
    from calico_lite.datastore import Datastore
    try:
        snap = Datastore(endpoints).snapshot()
    except Exception:       # no calico datastore in this cluster
        return
    for block, node in snap.blocks.items():
        owner = snap.nodes.get(node)
        if owner is not None:
            view.blocks.append(CalicoBlock(str(block), node, str(owner.address)))
    for name, node in snap.nodes.items():
        view.calico_peers[str(node.address)] = (name, node.role)


def node_states(local: str, remote_files: list[str], scope: Any = None) -> dict[str, NodeState]:
    states = {local: node_state(local, scope)}
    for path in remote_files:
        with open(path) as f:
            state = NodeState.from_dict(json.load(f))
        states[state.name] = state
    return states


def add_parser(sub: Any) -> None:
    p = sub.add_parser("trace", help="where a packet from SRC to DST goes, hop by hop, and where it stops")
    p.add_argument("source", nargs="?", help="NAMESPACE/POD, or a pod or node address")
    p.add_argument("destination", nargs="?", help="NAMESPACE/POD, an address, or svc/NAMESPACE/NAME, "
                   "each with :PORT[/PROTO] (e.g. svc/default/web:80/tcp)")
    p.add_argument("--manifests", help="read the cluster's objects from this directory (as the daemons do)")
    p.add_argument("--kubeconfig", default=None, help="read them from the Kubernetes API")
    p.add_argument("--etcd-endpoints", default="", help="flannel leases / calico_lite blocks from this etcd")
    p.add_argument("--hostname-override", default="", help="this node's name")
    p.add_argument("--remote-snapshot", action="append", default=[], metavar="FILE",
                   help="another node's state, written there by `podnet trace --snapshot` (repeatable)")
    p.add_argument("--snapshot", action="store_true", help="print this node's state as JSON and exit (for "
                   "--remote-snapshot; with [SRC] DST and the objects, the rules a trace to DST needs)")
    p.add_argument("--all-rules", action="store_true", help="read every iptables and nftables rule, not only "
                   "the chains the trace needs (slow on a node with many Services)")
    p.add_argument("--live", action="store_true", help="confirm with a real probe traced by nftables, and the "
                   "kernel's drop reasons (skb:kfree_skb, host-wide) during it")
    p.add_argument("--probe-netns", default="", help="--live: the source pod's network namespace path")
    p.add_argument("--remote-exec", action="append", default=[], metavar="NODE=COMMAND",
                   help="--live: a command prefix running `podnet` on NODE (repeatable); the probe starts "
                   "`podnet trace --watch` there first and reports that node's path too. On a cluster of "
                   "deploy/: NODE='kubectl -n podnet-system exec POD -- podnet', POD being the network-policy "
                   "DaemonSet's pod on NODE (privileged, host network: nft and a tracefs mount need both; "
                   "`ds/network-policy` would pick any node's pod); in the lab: "
                   "NODE='ip netns exec NODE_NETNS python -m cli.main'")
    p.add_argument("--watch", nargs=3, metavar=("SRC_IP", "DST_IP", "PORT/PROTO"),
                   help="the remote half of --live: trace SRC_IP -> DST_IP:PORT here for --seconds, printing "
                   "JSON lines (\"listening\", then the events)")
    p.add_argument("--seconds", type=float, default=3.0, help="--watch: how long to listen (at most 120)")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=main)


def main(opts: Any) -> int:
    import socket
    import sys
    node = opts.hostname_override or socket.gethostname()
    if opts.snapshot:
        # for another node's trace: every rule with --all-rules; else the chains a trace to
        # DESTINATION needs (given, with the objects), or the forward chains a pod's packet meets
        scope = None
        if not opts.all_rules:
            from diagnose.snapshot import RuleScope
            scope = RuleScope(iptables=(("filter", "FORWARD", True),), ip6tables=(("filter", "FORWARD", True),),
                              nft_chain_families=("inet",), ipvs=False)
            if opts.source and (opts.manifests or opts.kubeconfig is not None):
                # one positional argument is DST (`[SRC] DST`)
                view = load_view(opts.manifests, opts.kubeconfig, None, opts.source if opts.destination else None,
                                 opts.destination or opts.source)
                scope = rule_scope(view, opts.destination or opts.source)
        print(json.dumps(node_state(node, scope).to_dict()))
        return 0
    if opts.watch:
        from diagnose import live
        try:
            port, proto = live.parse_watch_port(opts.watch[2])
            src_ip, dst_ip = (str(ipaddress.ip_address(x)) for x in opts.watch[:2])
        except ValueError as e:
            print("podnet trace: %s" % e, file=sys.stderr)
            return 2
        return live.watch(src_ip, dst_ip, port, proto, opts.seconds, node)
    if not opts.source or not opts.destination:
        print("podnet trace: SRC and DST are required", file=sys.stderr)
        return 2
    try:
        remote_exec: dict[str, list[str]] = {}
        if opts.remote_exec:
            from diagnose import live
            remote_exec = live.parse_remote_exec(opts.remote_exec)
        view = load_view(opts.manifests, opts.kubeconfig if opts.kubeconfig is not None else
                         (None if opts.manifests else ""), opts.etcd_endpoints, opts.source, opts.destination)
        states = node_states(node, opts.remote_snapshot, None if opts.all_rules else rule_scope(view, opts.destination))
        trace = walk(view, states, opts.source, opts.destination, node)
    except (ValueError, OSError) as e:
        print("podnet trace: %s" % e, file=sys.stderr)
        return 2
    if opts.live:
        from diagnose import live
        trace.live = live.confirm(trace, opts.probe_netns, node, remote_exec)
    if opts.json:
        print(json.dumps(trace.to_dict(), indent=2))
    else:
        print("\n".join(trace.lines()))
    return 0 if trace.verdict == "delivered" else 1
