"""nftables mode: one `ip kube-proxy` table (`ip6 kube-proxy` for IPv6), rendered from the
desired state and kept in sync with one `nft -f -` transaction per sync.

The layout is kube-proxy's nftables mode (pkg/proxy/nftables), so what people and
tools know about it holds here, with one deliberate difference (load balancing,
below). The table is ours alone; nothing outside it is ever named.

Base chains (priorities as numbers: nft 1.0.6 refuses `dstnat` on the output hook):
  nat-prerouting, nat-output (dstnat, -100)   jump services
  nat-postrouting (srcnat, 100)               jump masquerading
  filter-prerouting (-110)                    ct state new: firewall-check
  filter-input (-110)                         ct state new: nodeport-endpoints-check, service-endpoints-check
  filter-forward (-110)                       ct state new: service-endpoints-check, cluster-ips-check
  filter-output (-110)                        ct state new: service-endpoints-check, firewall-check
  filter-output-post-dnat (-90)               ct state new: cluster-ips-check
Dispatch, all through named maps so that a Service costs the kernel the same
however many there are:
  services            ip daddr . meta l4proto . th dport vmap @service-ips
                      (fib daddr type local | ip daddr @nodeport-ips), not localhost:
                      meta l4proto . th dport vmap @service-nodeports
  service-endpoints-check / nodeport-endpoints-check: the same keys in
                      @no-endpoint-services / @no-endpoint-nodeports -> goto reject-chain | drop
  firewall-check      @firewall-ips -> goto firewall-<svc> (loadBalancerSourceRanges)
  cluster-ips-check   ip daddr @cluster-ips reject (a ClusterIP on a port no Service has)
  mark-for-masquerade / masquerading: the 0x4000 mark and the masquerade it asks for
Per service port ("<hash>-ns/name/proto/port", hash = 8 base32 characters of its sha256):
  service-<...>       Cluster policy: masquerade off-cluster sources, affinity, load balancing
  local-<...>         Local policy: the same over this node's endpoints
  external-<...>      NodePort / external IP / LB IP traffic (masquerade or keep the source)
  firewall-<...>      loadBalancerSourceRanges: allowed sources return, the rest is dropped
  endpoint-<...>__ip/port   hairpin masquerade, affinity update, DNAT
  affinity-<...>__ip/port   per-endpoint set of recent clients (ClientIP affinity only)

Load balancing: kube-proxy writes `numgen random mod N vmap { 0 : goto ep0, ... }`, an
anonymous map per Service. The kernel names every anonymous set by scanning all sets
of the table, so a table with 10,000 of them takes 71 s to load (measured, all kernel
time); 10,000 named per-Service maps take 15 s (set lookups by name are linear too);
one shared map indexed with `numgen ... offset` takes 91 s (every rule referencing a
verdict map makes the commit walk all its elements). So each endpoint is picked by a
rule, as iptables' statistic match does: `numgen random mod (N-i) == 0 goto ep_i`,
the last one unconditional (1/N each; rules are flat: 10,000 Services x 5 endpoints load
in ~4.5 s, as one iptables-restore of the same rules does).

Applying: one `nft -f -` transaction per sync, atomic. A full sync flushes every rule
of the table and every element of the shared maps, declares everything again, and
deletes the chains and sets of ours that are no longer wanted; affinity sets keep
their clients. Which chains and sets exist is listed from the kernel after a start
or a failed sync (~0.6 s at 10,000 Services; the shared maps and sets and any base
chain whose hook or priority differs are then declared anew, so an earlier
version's table is taken over), and known from the previous syncs otherwise. A
partial sync writes only the changed service ports: new chains as
`add chain T C { rules }`, changed ones `flush chain` + the same, map elements
added with `add map T M { type ...; elements = { ... } }` and deleted with
`delete element`, chains that went away flushed and deleted after the elements
and rules that referenced them. nft 1.0.6 makes any `delete` (and any `add rule`
or `add element`) dump every chain and set element of the ruleset first: ~0.45 s
at 10,000 Services, while the forms above cost the kernel's commit, ~70 ms. So in
a table of more than DEFER_CHAINS chains the flushed chains (empty, unreferenced,
harmless) wait to be deleted by a transaction that pays the dump anyway (one that
deletes map elements, a full sync) or until STALE_LIMIT of them pile up: a
replaced endpoint is then add + flush + add + flush, no dump.

IPv6: rendered with ip6/ipv6_addr and [addr]:port DNAT targets; the netns tests
cover IPv4 only. NodePorts never answer on localhost (as kube-proxy's nftables
mode; --iptables-localhost-nodeports is an iptables-mode flag).
"""
import functools
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from kube_proxy import model
from kube_proxy.proxier import (
    REFUSED,
    Config,
    Isolation,
    Quarantine,
    SyncResult,
    clear_stale_udp_flows,
    isolate,
)
from kube_proxy.tracker import Sync
from podnet.isolate import one_line
from podnet.kube.endpointslices import ServicePortName

log = logging.getLogger("kube_proxy.nftables")

TABLE = "kube-proxy"
CHECK_TABLE = "kube-proxy-check"    # what fault isolation has the kernel check (nft -c): never created
MASQ_MARK = 0x4000
DEFER_CHAINS = 5000         # more chains than this in the table: defer deleting stale ones (see above)
STALE_LIMIT = 1000          # ... until this many are waiting (or a transaction pays nft's dump anyway)

MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"
SERVICES = "services"
REJECT_CHAIN = "reject-chain"
SERVICE_EP_CHECK = "service-endpoints-check"
NODEPORT_EP_CHECK = "nodeport-endpoints-check"
FIREWALL_CHECK = "firewall-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"

SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_EP_SERVICES = "no-endpoint-services"
NO_EP_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
POD_CIDRS = "pod-cidrs"

# (name, type, hook, priority)
BASE_CHAINS = (
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
# rules of the base chains: (chain, rule)
BASE_JUMPS = (
    ("filter-prerouting", "ct state new jump " + FIREWALL_CHECK),
    ("filter-input", "ct state new jump " + NODEPORT_EP_CHECK),
    ("filter-input", "ct state new jump " + SERVICE_EP_CHECK),
    ("filter-forward", "ct state new jump " + SERVICE_EP_CHECK),
    ("filter-forward", "ct state new jump " + CLUSTER_IPS_CHECK),
    ("filter-output", "ct state new jump " + SERVICE_EP_CHECK),
    ("filter-output", "ct state new jump " + FIREWALL_CHECK),
    ("filter-output-post-dnat", "ct state new jump " + CLUSTER_IPS_CHECK),
    ("nat-prerouting", "jump " + SERVICES),
    ("nat-output", "jump " + SERVICES),
    ("nat-postrouting", "jump " + MASQUERADING),
)
# the shared maps: name -> (key type with {addr} for the family's address type, comment)
MAPS = {
    SERVICE_IPS: ("{addr} . inet_proto . inet_service", "ClusterIP, external IP and LoadBalancer IP dispatch"),
    SERVICE_NODEPORTS: ("inet_proto . inet_service", "NodePort dispatch"),
    NO_EP_SERVICES: ("{addr} . inet_proto . inet_service", "Service IPs without usable endpoints: reject or drop"),
    NO_EP_NODEPORTS: ("inet_proto . inet_service", "NodePorts without usable endpoints: reject or drop"),
    FIREWALL_IPS: ("{addr} . inet_proto . inet_service", "LoadBalancer IPs with loadBalancerSourceRanges"),
}
PORT_PREFIXES = ("service-", "local-", "external-", "firewall-", "endpoint-")
AFFINITY_PREFIX = "affinity-"


def family_words(family):
    """(nft family and address keyword, address type, localhost) of an IP family."""
    return ("ip", "ipv4_addr", "127.0.0.0/8") if family == 4 else ("ip6", "ipv6_addr", "::1")


# ---- names ----------------------------------------------------------------------------------

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _hash8(text):
    """The first 8 characters of base32(sha256(text)) (40 bits, done by hand: b32encode is slow)."""
    v = int.from_bytes(hashlib.sha256(text.encode()).digest()[:5], "big")
    return "".join(_B32[(v >> shift) & 31] for shift in (35, 30, 25, 20, 15, 10, 5, 0))


NAME_BASE_MAX = 240         # kube-proxy's chainNameBaseLengthMax: nft refuses names over 256


def _named(text):
    """"<hash>-text", cut to NAME_BASE_MAX with "..." (kube-proxy's hashAndTruncate): an
    endpoint of an IPv6 Service with 63-character namespace, name and port name would
    otherwise make a 261-character chain name, which nft refuses. The hash keeps it unique."""
    name = _hash8(text) + "-" + text
    return name if len(name) <= NAME_BASE_MAX else name[:NAME_BASE_MAX - 3] + "..."


@functools.lru_cache(maxsize=1 << 16)
def port_base(name):
    """"<hash>-ns/name/proto/port": what a service port's chain names end with."""
    return _named("%s/%s/%s/%s" % (name.namespace, name.name, name.protocol.lower(), name.port))


@functools.lru_cache(maxsize=1 << 17)
def _endpoint_base(name, ip, port):
    return _named("%s/%s/%s/%s__%s/%d" % (name.namespace, name.name, name.protocol.lower(), name.port,
                                         ip.replace(":", "."), port))


def service_chain(name):
    return "service-" + port_base(name)


def local_chain(name):
    return "local-" + port_base(name)


def external_chain(name):
    return "external-" + port_base(name)


def firewall_chain(name):
    return "firewall-" + port_base(name)


def endpoint_chain(name, ep):
    return "endpoint-" + _endpoint_base(name, ep.ip, ep.port)


def affinity_set(name, ep):
    return AFFINITY_PREFIX + _endpoint_base(name, ep.ip, ep.port)


def is_port_chain(chain):
    return chain.startswith(PORT_PREFIXES) and "/" in chain


# ---- one service port -------------------------------------------------------------------------

@dataclass(frozen=True)
class PortObjects:
    """What one service port puts into the table.

    chains: {name: (rule, ...)} of its own chains; elements: ((set, key, value, comment), ...)
    of the shared sets and maps (value None for a plain set); affinity: its affinity sets."""
    chains: dict = field(default_factory=dict)
    elements: tuple = ()
    affinity: tuple = ()

    @property
    def rules(self):
        return sum(map(len, self.chains.values()))


def _uses_cluster_endpoints(sp):
    """kube-proxy's UsesClusterEndpoints: an externally reachable port needs the Cluster
    endpoints even with both policies Local (pod and node traffic to its external
    addresses short-circuits to them). model.ServicePort's property leaves that case out."""
    return not sp.internal_policy_local or sp.externally_accessible


def _categorize(sp, endpoints):
    view = SimpleNamespace(uses_cluster_endpoints=_uses_cluster_endpoints(sp),
                           uses_local_endpoints=sp.uses_local_endpoints)
    return model.categorize_endpoints(view, endpoints)


def pod_cidrs(config):
    """--cluster-cidr entries of the config's family."""
    return tuple(c for c in config.cluster_cidr if (":" in c) == (config.family == 6))


def render_service_port(sp, endpoints, config):
    """kube-proxy's nftables objects for ServicePort `sp` and its endpoints (PortObjects)."""
    ipx, _, _ = family_words(config.family)
    name = str(sp.name)
    proto = sp.protocol.lower()
    cats = _categorize(sp, endpoints)
    has_endpoints = cats.has_any
    svc, svl, ext, fw = service_chain(sp.name), local_chain(sp.name), external_chain(sp.name), \
        firewall_chain(sp.name)
    uses_cluster = bool(cats.cluster) and _uses_cluster_endpoints(sp)
    uses_local = bool(cats.local) and sp.uses_local_endpoints

    internal_chain, has_internal = svc, has_endpoints
    if sp.internal_policy_local:
        internal_chain, has_internal = svl, has_endpoints and bool(cats.local)
    external_policy_chain, has_external = svc, has_endpoints
    if sp.external_policy_local:
        external_policy_chain, has_external = svl, has_endpoints and bool(cats.local)
    uses_ext = has_endpoints and sp.externally_accessible
    uses_fw = bool(sp.load_balancer_ips) and bool(sp.load_balancer_source_ranges)

    if not has_endpoints:
        internal_verdict = external_verdict = "goto " + REJECT_CHAIN
    else:
        internal_verdict = None if has_internal else "drop"
        external_verdict = None if has_external else "drop"

    def key(ip, port):
        return "%s . %s . %d" % (ip, proto, port)

    elements = [(CLUSTER_IPS, sp.cluster_ip, None, None)]
    if has_internal:
        elements.append((SERVICE_IPS, key(sp.cluster_ip, sp.port), "goto " + internal_chain, None))
    else:
        elements.append((NO_EP_SERVICES, key(sp.cluster_ip, sp.port), internal_verdict, name))
    for eip in sp.external_ips:
        if has_endpoints:
            elements.append((SERVICE_IPS, key(eip, sp.port), "goto " + ext, None))
        if not has_external:
            elements.append((NO_EP_SERVICES, key(eip, sp.port), external_verdict, name))
    for lbip in sp.load_balancer_ips:
        if has_endpoints:
            elements.append((SERVICE_IPS, key(lbip, sp.port), "goto " + ext, None))
        if uses_fw:
            elements.append((FIREWALL_IPS, key(lbip, sp.port), "goto " + fw, name))
        if not has_external:
            elements.append((NO_EP_SERVICES, key(lbip, sp.port), external_verdict, name))
    if sp.node_port:
        if has_endpoints:
            elements.append((SERVICE_NODEPORTS, "%s . %d" % (proto, sp.node_port), "goto " + ext, None))
        if not has_external:
            elements.append((NO_EP_NODEPORTS, "%s . %d" % (proto, sp.node_port), external_verdict, name))

    chains = {}
    if uses_fw:
        rules = ["%s saddr %s return" % (ipx, cidr) for cidr in sp.load_balancer_source_ranges]
        if config.node_ip and _contains_any(sp.load_balancer_source_ranges, config.node_ip):
            rules += ["%s saddr %s return" % (ipx, lbip) for lbip in sp.load_balancer_ips]
        rules.append("drop")
        chains[fw] = tuple(rules)

    cidrs = pod_cidrs(config)
    masq = ()
    if has_internal:
        match = "%s daddr %s %s dport %d" % (ipx, sp.cluster_ip, proto, sp.port)
        if config.masquerade_all:
            masq = ("%s jump %s" % (match, MARK_MASQ),)
        elif len(cidrs) == 1:
            masq = ("%s %s saddr != %s jump %s" % (match, ipx, cidrs[0], MARK_MASQ),)
        elif cidrs:
            masq = ("%s %s saddr != @%s jump %s" % (match, ipx, POD_CIDRS, MARK_MASQ),)

    if uses_ext:
        rules = []
        if not sp.external_policy_local:
            rules.append("jump " + MARK_MASQ)
        else:
            # pods and the node itself reach the external addresses as the ClusterIP: all endpoints
            rules += ["%s saddr %s goto %s" % (ipx, cidr, svc) for cidr in cidrs]
            rules.append("fib saddr type local jump " + MARK_MASQ)     # its source is the external address
            rules.append("fib saddr type local goto " + svc)
        if has_external:
            rules.append("goto " + external_policy_chain)
        chains[ext] = tuple(rules)

    sticky = sp.session_affinity

    def policy_chain(chain, eps):
        rules = list(masq) if chain == internal_chain else []
        if sticky:
            rules += ["%s saddr @%s goto %s" % (ipx, affinity_set(sp.name, ep), endpoint_chain(sp.name, ep))
                      for ep in eps]
        n = len(eps)
        for i, ep in enumerate(eps[:-1]):
            rules.append("numgen random mod %d == 0 goto %s" % (n - i, endpoint_chain(sp.name, ep)))
        rules.append("goto " + endpoint_chain(sp.name, eps[-1]))
        chains[chain] = tuple(rules)

    if uses_cluster:
        policy_chain(svc, cats.cluster)
    if uses_local:
        policy_chain(svl, cats.local)

    affinity = []
    for ep in cats.all_reachable:
        rules = ["%s saddr %s jump %s" % (ipx, ep.ip, MARK_MASQ)]
        if sticky:
            aff = affinity_set(sp.name, ep)
            affinity.append(aff)
            rules.append("update @%s { %s saddr timeout %ds }" % (aff, ipx, sp.session_affinity_timeout))
        rules.append("meta l4proto %s dnat to %s" % (proto, ep.addr))
        chains[endpoint_chain(sp.name, ep)] = tuple(rules)

    return PortObjects(chains, tuple(elements), tuple(affinity))


def _contains_any(cidrs, ip):
    addr = ipaddress.ip_address(ip)
    return any(addr.version == ipaddress.ip_network(c).version and addr in ipaddress.ip_network(c) for c in cidrs)


# ---- the fixed part of the table ----------------------------------------------------------------

def base_chain_spec(chain_type, hook, priority):
    return "type %s hook %s priority %d; policy accept;" % (chain_type, hook, priority)


def fixed_chains(config):
    """{name: (rule, ...)} of the chains that do not depend on Services (base chains included)."""
    ipx, _, localhost = family_words(config.family)
    chains = {name: [] for name, _, _, _ in BASE_CHAINS}
    for chain, rule in BASE_JUMPS:
        chains[chain].append(rule)
    nodeports = ("%s daddr @%s" % (ipx, NODEPORT_IPS) if config.nodeport_addresses else
                 "%s daddr != %s" % (ipx, localhost))
    mark = "0x%x" % MASQ_MARK
    chains.update({
        SERVICES: ["%s daddr . meta l4proto . th dport vmap @%s" % (ipx, SERVICE_IPS),
                   ("" if config.nodeport_addresses else "fib daddr type local ") + nodeports +
                   " meta l4proto . th dport vmap @" + SERVICE_NODEPORTS],
        MASQUERADING: ["meta mark & %s == 0 return" % mark, "meta mark set meta mark ^ %s" % mark,
                       "masquerade fully-random"],
        MARK_MASQ: ["meta mark set meta mark | %s" % mark],
        REJECT_CHAIN: ["reject"],
        SERVICE_EP_CHECK: ["%s daddr . meta l4proto . th dport vmap @%s" % (ipx, NO_EP_SERVICES)],
        NODEPORT_EP_CHECK: [nodeports + " meta l4proto . th dport vmap @" + NO_EP_NODEPORTS],
        FIREWALL_CHECK: ["%s daddr . meta l4proto . th dport vmap @%s" % (ipx, FIREWALL_IPS)],
        CLUSTER_IPS_CHECK: ["%s daddr @%s reject" % (ipx, CLUSTER_IPS)],
    })
    return {name: tuple(rules) for name, rules in chains.items()}


def set_declarations(config):
    """{name: declaration body} of the shared sets and maps (without elements). The text is
    always the same for a config: `add map` over an existing one must not differ."""
    _, addr, _ = family_words(config.family)
    decls = {CLUSTER_IPS: "type %s; comment \"ClusterIPs of Services\";" % addr}
    if config.nodeport_addresses:
        decls[NODEPORT_IPS] = "type %s; comment \"addresses NodePorts answer on\";" % addr
    if len(pod_cidrs(config)) > 1:
        decls[POD_CIDRS] = "type %s; flags interval; comment \"--cluster-cidr\";" % addr
    for name, (keytype, comment) in MAPS.items():
        decls[name] = "type %s : verdict; comment \"%s\";" % (keytype.format(addr=addr), comment)
    return decls


def fixed_elements(config):
    """{set: [element text]} of the sets whose content comes from the config."""
    out = {}
    if config.nodeport_addresses:
        out[NODEPORT_IPS] = [ip for ip in config.nodeport_addresses if (":" in ip) == (config.family == 6)
                             and not ip.startswith("127.") and ip != "::1"]
    if len(pod_cidrs(config)) > 1:
        out[POD_CIDRS] = list(pod_cidrs(config))
    return out


def is_map(name):
    return name in MAPS


def element_text(key, value, comment):
    text = key
    if comment:
        text += ' comment "%s"' % comment
    if value is not None:
        text += " : " + value
    return text


def affinity_declaration(config):
    _, addr, _ = family_words(config.family)
    return "type %s; flags dynamic,timeout;" % addr


def _block(kind, name, body_lines, indent="\t"):
    return "%s%s %s {\n%s%s}\n" % (indent, kind, name, "".join("%s\t%s\n" % (indent, line) for line in body_lines),
                                   indent)


# ---- the shared sets' elements --------------------------------------------------------------------

class Elements:
    """The shared sets' and maps' elements: which service ports claim each one, and what
    the kernel has. Several ports may claim one element (a Service's ports share its
    ClusterIP in @cluster-ips); two claiming one key with different values (two Services
    on one external IP:port) is a conflict the first port (by name) wins."""

    def __init__(self):
        self.claims = {}        # (set, key) -> {ServicePortName: (value, comment)}
        self.kernel = {}        # (set, key) -> (value, comment)

    def winner(self, sk):
        claims = self.claims.get(sk)
        return claims[min(claims)] if claims else None

    def claim(self, port, elements, add=True):
        touched = set()
        for set_name, key, value, comment in elements:
            sk = (set_name, key)
            touched.add(sk)
            if add:
                self.claims.setdefault(sk, {})[port] = (value, comment)
            else:
                claims = self.claims.get(sk)
                if claims is not None:
                    claims.pop(port, None)
                    if not claims:
                        del self.claims[sk]
        return touched

    def diff(self, touched):
        """(deletes, adds) turning the kernel into the claims for `touched` keys; updates `kernel`.
        deletes: [(set, key)]; adds: [(set, key, value, comment)]."""
        deletes, adds = [], []
        for sk in sorted(touched):
            want, have = self.winner(sk), self.kernel.get(sk)
            if want == have:
                continue
            if have is not None:
                deletes.append(sk)
                del self.kernel[sk]
            if want is not None:
                adds.append(sk + want)
                self.kernel[sk] = want
        return deletes, adds

    def rebuild(self, port_objects):
        self.claims, self.kernel = {}, {}
        for port in sorted(port_objects):
            self.claim(port, port_objects[port].elements)
        self.kernel = {sk: self.winner(sk) for sk in self.claims}
        return self.kernel


# ---- transactions ------------------------------------------------------------------------------------

def _elements_by_set(items):
    by_set = {}
    for set_name, key, value, comment in items:
        by_set.setdefault(set_name, []).append(element_text(key, value, comment))
    return by_set


def full_sync_text(config, ports, elements, kernel_chains=None, kernel_sets=(), recreate=(), table=TABLE):
    """The full sync transaction.

    ports: {ServicePortName: PortObjects}; elements: {(set, key): (value, comment)} (what
    Elements.rebuild returns); kernel_chains: names of chains in our table now (None: the
    table may not exist); kernel_sets: names of its sets and maps (affinity ones included);
    recreate: chains, sets and maps to delete and declare anew (a base chain's hook or
    priority, a map's type may differ from ours); table: another name, for a transaction
    that is only checked (CHECK_TABLE)."""
    fam, _, _ = family_words(config.family)
    head = "%s %s" % (fam, table)
    out = ["add table %s { comment \"rules for kube-proxy\"; }\n" % head, "flush table %s\n" % head]
    decls = set_declarations(config)
    for name in recreate:
        if name in decls:
            out.append("delete %s %s %s\n" % ("map" if is_map(name) else "set", head, name))
    for name, body in decls.items():
        kind = "map" if is_map(name) else "set"
        out.append("add %s %s %s { %s }\nflush %s %s %s\n" % (kind, head, name, body, kind, head, name))
    for name in recreate:
        if name not in decls:
            out.append("delete chain %s %s\n" % (head, name))
    out.append("table %s {\n" % head)
    fixed = fixed_chains(config)
    base = {name: (t, h, p) for name, t, h, p in BASE_CHAINS}
    aff_decl = affinity_declaration(config)
    wanted_sets = set(decls)
    for port in sorted(ports):
        for aff in ports[port].affinity:
            out.append("\tset %s { %s }\n" % (aff, aff_decl))
            wanted_sets.add(aff)
    # chains before the rules that jump to them: endpoint chains, policy chains, the rest
    for port in sorted(ports):
        chains = ports[port].chains
        for order in ("endpoint-", "service-", "local-", "external-", "firewall-"):
            for chain, rules in chains.items():
                if chain.startswith(order):
                    out.append(_block("chain", chain, rules))
    for name, rules in sorted(fixed.items(), key=lambda kv: kv[0] in base):      # base chains last
        if name in base:
            rules = (base_chain_spec(*base[name]),) + rules
        out.append(_block("chain", name, rules))
    by_set = _elements_by_set(sk + v for sk, v in sorted(elements.items()))
    for name, items in fixed_elements(config).items():
        by_set.setdefault(name, []).extend(items)
    for name, items in by_set.items():
        if items:
            kind = "map" if is_map(name) else "set"
            out.append("\t%s %s { %s elements = { %s } }\n" % (kind, name, decls[name], ", ".join(items)))
    out.append("}\n")
    wanted_chains = set(fixed)
    for p in ports.values():
        wanted_chains.update(p.chains)
    for chain in sorted(set(kernel_chains or ()) - wanted_chains):
        out.append("delete chain %s %s\n" % (head, chain))
    for name in sorted(set(kernel_sets) - wanted_sets):
        out.append("delete %s %s %s\n" % ("map" if is_map(name) else "set", head, name))
    return "".join(out)


@dataclass
class Change:
    """A partial sync's work, from the changed ports' old and new PortObjects."""
    create: dict = field(default_factory=dict)      # chain -> rules (not in the kernel)
    rewrite: dict = field(default_factory=dict)     # chain -> rules (in the kernel, different)
    stale: set = field(default_factory=set)         # chains that went away (to flush)
    affinity: set = field(default_factory=set)      # affinity sets the written chains use
    stale_sets: set = field(default_factory=set)
    deletes: list = field(default_factory=list)     # [(set, key)]
    adds: list = field(default_factory=list)        # [(set, key, value, comment)]


def partial_sync_text(config, change, delete_chains=(), delete_sets=()):
    """The partial sync transaction (see the module doc for its order and cost)."""
    fam, _, _ = family_words(config.family)
    head = "%s %s" % (fam, TABLE)
    out = []
    aff_decl = affinity_declaration(config)
    for aff in sorted(change.affinity):
        out.append("add set %s %s { %s }\n" % (head, aff, aff_decl))
    for chain in change.create:
        out.append("add chain %s %s\n" % (head, chain))
    for chain, rules in list(change.create.items()) + list(change.rewrite.items()):
        if chain in change.rewrite:
            out.append("flush chain %s %s\n" % (head, chain))
        out.append("add chain %s %s { %s; }\n" % (head, chain, "; ".join(rules)))
    for chain in sorted(change.stale):
        out.append("flush chain %s %s\n" % (head, chain))
    by_set = {}
    for set_name, key in change.deletes:
        by_set.setdefault(set_name, []).append(key)
    for set_name, keys in sorted(by_set.items()):
        out.append("delete element %s %s { %s }\n" % (head, set_name, ", ".join(keys)))
    decls = set_declarations(config)
    for set_name, items in sorted(_elements_by_set(change.adds).items()):
        out.append("add %s %s %s { %s elements = { %s } }\n" % ("map" if is_map(set_name) else "set", head,
                                                                 set_name, decls[set_name], ", ".join(items)))
    for chain in sorted(delete_chains):
        out.append("delete chain %s %s\n" % (head, chain))
    for name in sorted(delete_sets):
        out.append("delete set %s %s\n" % (head, name))
    return "".join(out)


def cleanup_text():
    """Delete our tables of both families (adding first makes it idempotent)."""
    return "".join("add table %s %s\ndelete table %s %s\n" % (fam, TABLE, fam, TABLE) for fam in ("ip", "ip6"))


# ---- the proxier ---------------------------------------------------------------------------------------

PRIORITY_NAMES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}


def _priority(words):
    """nft's printed priority ("dstnat - 10", "srcnat", "-100") -> a number."""
    value = PRIORITY_NAMES.get(words[0])
    value = int(words[0]) if value is None else value
    if len(words) == 3:
        value += int(words[2]) if words[1] == "+" else -int(words[2])
    return value


def parse_chains(text, family="ip"):
    """`nft list chains <family>` text -> {chain: (type, hook, priority) or None} of our table.
    (Text, not JSON: at 60,000 chains nft prints it in 0.6 s, its JSON in 0.9 s.)"""
    chains, ours, chain = {}, False, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("table "):
            ours = line == "table %s %s {" % (family, TABLE)
        elif not ours:
            continue
        elif line.startswith("chain ") and line.endswith(" {"):
            chain = line[6:-2]
            chains[chain] = None
        elif line.startswith("type ") and chain is not None:
            words = line.replace(";", " ;").split()
            prio = words[words.index("priority") + 1:words.index(";")]
            chains[chain] = (words[1], words[3], _priority(prio))
    return chains


def parse_sets(objects):
    """`nft -j -t list sets|maps <family>` objects -> names of our table's sets and maps."""
    return {obj[kind]["name"] for obj in objects for kind in ("set", "map")
            if kind in obj and obj[kind].get("table") == TABLE}


class NftablesProxier:
    """Applies the tracker's Syncs to our nftables table (in the current network namespace).

    Keeps `ports` (each service port's PortObjects: rendering is pure, they stay right
    until the port or its endpoints change), `elements` (who claims which shared
    element; what the kernel has), the chains and sets of ours that were flushed but
    not yet deleted, and whether the kernel holds all that (`synced`). A refused
    transaction changes nothing in the kernel (nft transactions are atomic); the
    service ports it was refused for are found and quarantined (_isolate) and the rest
    applied. `check` (default: podnet.net.nft.check) has the kernel check a transaction without
    applying it; with an injected `apply` and no `check`, a refused full sync raises."""
    mode = "nftables"

    def __init__(self, config: Config, apply: Callable[[str], object] | None = None,
                 list_json: Callable[..., list[dict[str, Any]]] | None = None,
                 list_text: Callable[..., str] | None = None,
                 check: Callable[[str], object] | None = None) -> None:
        from podnet.net import nft
        self.config = config
        self.ipv6 = config.family == 6
        self.family = family_words(config.family)[0]
        self._real = apply is None
        self._apply = apply or nft.apply
        self._check: Callable[[str], object] | None = check or (nft.check if apply is None else None)
        self._list = list_json or nft.list_json
        self._list_text = list_text or nft.list_text
        self.quarantine = Quarantine()          # service ports whose rules the kernel refused
        self.synced = False
        self.ports: dict[ServicePortName, PortObjects] = {}
        self.elements = Elements()
        self.stale_chains: set[str] = set()
        self.stale_sets: set[str] = set()
        self.rules = 0
        self.chain_count = 0
        self.chains_written: int | None = None  # by the last full sync: every chain, and the stale ones it deleted

    def setup(self) -> None:
        """Nothing to prepare: the first (full) sync creates the table. Fails early without nft."""
        if self._real:
            from podnet.net import nft
            nft.version()

    def cleanup(self) -> None:
        """Delete our tables (both families): kube-proxy --cleanup, or a switch to another mode."""
        try:
            self._apply(cleanup_text())
        except FileNotFoundError:       # no nft on this host: nothing of ours can exist
            pass
        self.synced = False
        self.ports, self.elements = {}, Elements()
        self.stale_chains, self.stale_sets = set(), set()
        self.quarantine = Quarantine()

    def sync(self, sync: Sync) -> SyncResult:
        started = time.monotonic()
        sync = self.quarantine.effective(sync)
        full = sync.full or not self.synced
        found: Isolation[ServicePortName] = Isolation()
        try:
            try:
                text = self._full(sync.state, sync.changed) if full else self._partial(sync.state, sync.changed)
            except REFUSED as e:
                log.warning("nft refused the %s sync: %s; finding the service ports it refuses",
                            "full" if full else "partial", one_line(e))
                found, text, full = self._isolate(sync, full)
                found.refused += 1
        except Exception:
            self.synced = False
            for name in sync.changed:       # not rendered for this state: the next (full) sync renders them
                self.ports.pop(name, None)
            raise
        self.synced = True
        quarantined = self.quarantine.add(sync, found.bad)
        deleted = clear_stale_udp_flows(sync, self.ipv6)
        return SyncResult(full, time.monotonic() - started, len(sync.changed), len(text),
                          {TABLE: self.rules}, deleted, self.chains_written if full else None, found.refused,
                          quarantined, len(self.quarantine))

    # ---- fault isolation ----

    def _isolate(self, sync, full):
        """A refused transaction changed nothing. After a partial one: apply the changed
        ports in halves (real partial transactions, proxier.isolate); the refused ones keep
        their previous objects. If nothing at all goes through and even a harmless
        transaction on our table is refused, or after a full one: have the kernel check
        (nft -c, nothing applied) full tables of halves of all the ports, in a scratch
        table, to find the refused ones; then one real full sync with those at their
        fallback. Returns (Isolation, text applied last, whether that was full)."""
        state = sync.state
        if not full:
            applied = []

            def trial(names):
                applied.append(self._partial(state, names))

            try:
                found = isolate(sorted(sync.changed), trial, self._control)
                return found, "".join(applied), False
            except REFUSED as e:
                log.warning("nft refuses even a harmless transaction on our table (%s): rewriting it all",
                            one_line(e))
            found = Isolation(refused=1)
        else:
            found: Isolation[ServicePortName] = Isolation()
        if self._check is not None:
            ports = {name: (self.ports.get(name) if name not in sync.changed else None)
                     or render_service_port(sp, state.endpoints_for(name), self.config)
                     for name, sp in state.service_ports.items()}
            check = self._check

            def check_trial(names):
                subset = {n: ports[n] for n in names}
                check(full_sync_text(self.config, subset, Elements().rebuild(subset), table=CHECK_TABLE))

            def check_control():
                check(full_sync_text(self.config, {}, {}, table=CHECK_TABLE))

            more = isolate(sorted(ports), check_trial, check_control)
            found = Isolation(found.bad + more.bad, found.tried + more.tried, found.refused + more.refused)
        bad = [name for name, _ in found.bad]
        self.synced = False                 # what the kernel holds is not what self.ports says: list it
        text = self._full(self.quarantine.fallback_state(sync, bad), set(sync.changed) | set(bad))
        return found, text, True

    def _control(self):
        """What every partial trial has in common, alone: the deletion of the chains and sets
        earlier syncs left flushed (their deletion deferred), and a change of nothing
        (reject-chain rewritten as it is), so that a table the kernel refuses to touch at
        all is told from refused ports."""
        head = "%s %s" % (self.family, TABLE)
        rules = fixed_chains(self.config)[REJECT_CHAIN]
        text = "flush chain %s %s\nadd chain %s %s { %s; }\n" % (head, REJECT_CHAIN, head, REJECT_CHAIN,
                                                                 "; ".join(rules))
        text += "".join("delete chain %s %s\n" % (head, c) for c in sorted(self.stale_chains))
        text += "".join("delete set %s %s\n" % (head, n) for n in sorted(self.stale_sets))
        self._apply(text)
        self.stale_chains, self.stale_sets = set(), set()

    # ---- full ----

    def _known(self):
        """Our chains and sets as the previous (successful) syncs left them."""
        chains = dict.fromkeys(fixed_chains(self.config))
        sets = set(set_declarations(self.config)) | self.stale_sets
        for p in self.ports.values():
            chains.update(dict.fromkeys(p.chains))
            sets.update(p.affinity)
        chains.update(dict.fromkeys(self.stale_chains))
        return chains, sets

    def _full(self, state, changed):
        """Render what changed (the rest is cached) and rewrite the table in one transaction.
        Which chains and sets of ours exist is read from the kernel after a start or a
        failure (0.6 s at 10,000 Services); otherwise it is what the previous syncs wrote."""
        if self.synced:
            kernel_chains, kernel_sets = self._known()
            recreate = []
        else:
            kernel_chains = parse_chains(self._list_text("chains", self.family), self.family)
            kernel_sets = parse_sets(self._list("sets", self.family, terse=True) +
                                     self._list("maps", self.family, terse=True))
            base = {name: (t, h, p) for name, t, h, p in BASE_CHAINS}
            recreate = [name for name, spec in kernel_chains.items() if name in base and spec != base[name]]
            # the shared sets and maps are emptied anyway: declare them anew, whatever an
            # earlier version (or kube-proxy itself) made of them
            recreate += sorted(n for n in kernel_sets if n in set_declarations(self.config))
        ports = {}
        for name, sp in state.service_ports.items():
            cached = None if name in changed else self.ports.get(name)
            ports[name] = cached if cached is not None else render_service_port(sp, state.endpoints_for(name),
                                                                               self.config)
        self.ports = ports              # right for the state whether or not the kernel takes it
        elements = Elements()
        kernel_elements = elements.rebuild(ports)
        text = full_sync_text(self.config, ports, kernel_elements, kernel_chains, kernel_sets, recreate)
        self._apply(text)
        self.elements = elements
        self.stale_chains, self.stale_sets = set(), set()
        fixed = fixed_chains(self.config)
        self.rules = sum(map(len, fixed.values())) + sum(p.rules for p in ports.values())
        self.chain_count = len(fixed) + sum(len(p.chains) for p in ports.values())
        wanted = set(fixed).union(*(p.chains for p in ports.values()))
        self.chains_written = self.chain_count + sum(1 for c in kernel_chains if c not in wanted)
        return text

    # ---- partial ----

    def _partial(self, state, changed):
        change = Change()
        new_ports = dict(self.ports)
        rules_delta = chains_delta = 0
        elements = self.elements
        touched = set()
        for name in sorted(changed):
            old = new_ports.pop(name, None)
            sp = state.service_ports.get(name)
            new = render_service_port(sp, state.endpoints_for(name), self.config) if sp is not None else None
            if new is not None:
                new_ports[name] = new
            old_chains = old.chains if old is not None else {}
            new_chains = new.chains if new is not None else {}
            for chain, rules in new_chains.items():
                if chain in old_chains:
                    if old_chains[chain] != rules:
                        change.rewrite[chain] = rules
                elif chain in self.stale_chains:
                    change.rewrite[chain] = rules
                else:
                    change.create[chain] = rules
            change.stale.update(c for c in old_chains if c not in new_chains)
            old_aff = set(old.affinity) if old is not None else set()
            new_aff = set(new.affinity) if new is not None else set()
            change.affinity |= new_aff
            change.stale_sets |= old_aff - new_aff
            rules_delta += (new.rules if new else 0) - (old.rules if old else 0)
            chains_delta += len(new_chains) - len(old_chains)
            if old is not None:
                touched |= elements.claim(name, old.elements, add=False)
            if new is not None:
                touched |= elements.claim(name, new.elements)
        # a chain or set another changed port still uses is not stale
        change.stale -= set(change.create) | set(change.rewrite)
        change.stale_sets -= change.affinity
        saved_kernel = dict(elements.kernel)
        change.deletes, change.adds = elements.diff(touched)
        stale_chains = (self.stale_chains - set(change.rewrite)) | change.stale
        stale_sets = (self.stale_sets - change.affinity) | change.stale_sets
        chain_total = self.chain_count + chains_delta + len(stale_chains)
        delete_now = (bool(change.deletes) or chain_total <= DEFER_CHAINS
                      or len(stale_chains) + len(stale_sets) >= STALE_LIMIT)
        text = partial_sync_text(self.config, change, stale_chains if delete_now else (),
                                 stale_sets if delete_now else ())
        if text:
            try:
                self._apply(text)
            except Exception:
                # nothing was applied: the claims and what the kernel holds are as before
                elements.kernel = saved_kernel
                for name in reversed(sorted(changed)):
                    if name in new_ports:
                        elements.claim(name, new_ports[name].elements, add=False)
                    if name in self.ports:
                        elements.claim(name, self.ports[name].elements)
                raise
        self.ports = new_ports
        self.stale_chains, self.stale_sets = (set(), set()) if delete_now else (stale_chains, stale_sets)
        self.rules += rules_delta
        self.chain_count += chains_delta
        return text
