"""iptables mode: kube-proxy's chains rendered from the desired state, and the proxier that applies them.

The layout, chain names and rules are kube-proxy's (pkg/proxy/iptables), so
tools and people that know kube-proxy's rules read ours unchanged:

nat:    KUBE-SERVICES     one rule per ClusterIP / external IP / LB IP of every service port,
                          then the jump to KUBE-NODEPORTS (last)
        KUBE-NODEPORTS    one rule per NodePort
        KUBE-SVC-<hash>   "Cluster" policy: masquerade off-cluster sources, then one
                          probabilistic jump per endpoint (session affinity first)
        KUBE-SVL-<hash>   "Local" policy: the same over this node's endpoints
        KUBE-EXT-<hash>   external traffic (NodePort, external IPs, LB IPs)
        KUBE-FW-<hash>    loadBalancerSourceRanges
        KUBE-SEP-<hash>   one endpoint: hairpin masquerade mark, DNAT
        KUBE-MARK-MASQ, KUBE-POSTROUTING: the 0x4000 mark and the MASQUERADE it asks for
filter: KUBE-SERVICES, KUBE-EXTERNAL-SERVICES (REJECT: no endpoints; DROP: no local ones),
        KUBE-NODEPORTS (health check ports), KUBE-FORWARD, KUBE-PROXY-FIREWALL

Rules are rendered in iptables-save's canonical form ([!] -s, [!] -d, -p, the
matches in order, -j; comments always quoted; MARK as --set-xmark; statistic
probabilities as the kernel stores them), so a rendered chain can be compared
with what `iptables-save` prints, for drift detection.

What one service port contributes (`ServicePortRules`) depends on that port
and its endpoints only, so a partial sync renders just the changed ports and
rewrites just their chains. How rules get into the kernel at scale is the
subject of docs/kube-proxy-sync-design.md: `restore_input()` implements its
recommendation (one --noflush transaction; our chains only; a leading `-S`
when many chains are declared, which keeps iptables-nft 1.8's cache
bookkeeping linear).
"""
import functools
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
from kube_proxy.rules import (
    FILTER,
    MASQ_MARK,
    NAT,
    SHARED_CHAINS,
    SHARED_JUMPS,
    canonical_net,
    other_mode_present,
    rule,
)
from kube_proxy.tracker import Sync
from podnet.isolate import one_line
from podnet.kube.endpointslices import ServicePortName
from podnet.net.iptables import chain_rules, declared_chains, quote

log = logging.getLogger("kube_proxy.iptables")

LARGE_CLUSTER_ENDPOINTS = 1000      # above: no per-endpoint comments (kube-proxy's largeClusterMode)
S_TRICK_CHAINS = 500                # declare more chains than this in one restore: lead with `-S`
# Shared chains whose rules are independent of their order (each matches its own
# address:port:protocol) except for a fixed tail: a partial sync edits them with
# `-D <rule>` / `-I <chain> 1 <rule>` instead of rewriting 10,000 rules.
EDITED_CHAINS = {("nat", "KUBE-SERVICES"), ("nat", "KUBE-NODEPORTS"), ("filter", "KUBE-SERVICES"),
                 ("filter", "KUBE-EXTERNAL-SERVICES"), ("filter", "KUBE-NODEPORTS"),
                 ("filter", "KUBE-PROXY-FIREWALL")}
EDIT_LIMIT = 64                     # more changed rules than this (or a tenth of the chain): rewrite it

NAT_BASE = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")
FILTER_BASE = ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-FORWARD",
               "KUBE-PROXY-FIREWALL")
OUR_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")

# Jumps from the built-in chains, ensured once at start (kube-proxy's iptablesJumpChains).
BUILTIN_JUMPS = (
    (FILTER, "INPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
                      '-j KUBE-PROXY-FIREWALL'),
    (FILTER, "INPUT", '-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS'),
    (FILTER, "INPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
                      'portals" -j KUBE-EXTERNAL-SERVICES'),
    (FILTER, "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
                        '-j KUBE-PROXY-FIREWALL'),
    (FILTER, "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    (FILTER, "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
                        '-j KUBE-SERVICES'),
    (FILTER, "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
                        'portals" -j KUBE-EXTERNAL-SERVICES'),
    (FILTER, "OUTPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
                       '-j KUBE-PROXY-FIREWALL'),
    (FILTER, "OUTPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
                       '-j KUBE-SERVICES'),
    (NAT, "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    (NAT, "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    (NAT, "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'),
)


# ---- names ---------------------------------------------------------------------------------

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]     # 10 bits -> 2 characters


def _hash16(text):
    """The first 16 base32 characters of sha256(text), kube-proxy's chain-name hash.
    Done by hand: base64.b32encode is pure Python in 3.11 and was half of rendering time."""
    v = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return (p[v >> 70] + p[(v >> 60) & 1023] + p[(v >> 50) & 1023] + p[(v >> 40) & 1023] +
            p[(v >> 30) & 1023] + p[(v >> 20) & 1023] + p[(v >> 10) & 1023] + p[v & 1023])


@functools.lru_cache(maxsize=1 << 16)
def _proto_hash(name):
    """Cached: a service port's four chain names share it, and it is the same every sync."""
    return _hash16(str(name) + name.protocol.lower())


def service_chain(name):
    """KUBE-SVC-<hash>: the "Cluster" policy chain (kube-proxy's servicePortPolicyClusterChain)."""
    return "KUBE-SVC-" + _proto_hash(name)


def local_chain(name):
    return "KUBE-SVL-" + _proto_hash(name)


def external_chain(name):
    return "KUBE-EXT-" + _proto_hash(name)


def firewall_chain(name):
    return "KUBE-FW-" + _proto_hash(name)


def endpoint_chain(name, endpoint):
    """KUBE-SEP-<hash of "ns/svc:port" + protocol + "ip:port">."""
    return _endpoint_chain(name, endpoint.addr)


@functools.lru_cache(maxsize=1 << 17)
def _endpoint_chain(name, addr):
    return "KUBE-SEP-" + _hash16(str(name) + name.protocol.lower() + addr)


def is_our_chain(chain):
    return chain.startswith(OUR_PREFIXES)


# ---- rule text (rule() itself is in rules.py, shared with the IPVS mode) ----------------------

def probability(n):
    """1/n as the statistic match stores it (a 31-bit fraction) and iptables-save prints it."""
    return "%.11f" % (round(0x80000000 / n) / 0x80000000)


def _recent_mask(family):
    return "255.255.255.255" if family == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


# ---- one service port ------------------------------------------------------------------------

@dataclass(frozen=True)
class ServicePortRules:
    """Everything one service port puts into the tables.

    chains: its own nat chains (SVC, SVL, EXT, FW, SEP), {name: (rules...)};
    the other fields are its rules in the shared chains."""
    chains: dict = field(default_factory=dict)
    nat_services: tuple = ()            # in nat KUBE-SERVICES
    nat_nodeports: tuple = ()           # in nat KUBE-NODEPORTS
    filter_services: tuple = ()         # in filter KUBE-SERVICES
    filter_external: tuple = ()         # in filter KUBE-EXTERNAL-SERVICES
    filter_nodeports: tuple = ()        # in filter KUBE-NODEPORTS
    filter_firewall: tuple = ()         # in filter KUBE-PROXY-FIREWALL


def render_service_port(sp, endpoints, config, comments=True):
    """kube-proxy's per-service-port rules for ServicePort `sp` and its endpoints."""
    name = str(sp.name)
    proto = sp.protocol.lower()
    cats = model.categorize_endpoints(sp, endpoints)
    has_endpoints = cats.has_any
    svc, svl, ext, fw = service_chain(sp.name), local_chain(sp.name), external_chain(sp.name), firewall_chain(sp.name)
    uses_cluster = bool(cats.cluster) and sp.uses_cluster_endpoints
    uses_local = bool(cats.local) and sp.uses_local_endpoints

    internal_chain, has_internal = svc, has_endpoints
    if sp.internal_policy_local:
        internal_chain = svl
        has_internal = has_internal and bool(cats.local)
    external_policy_chain, has_external = svc, has_endpoints
    if sp.external_policy_local:
        external_policy_chain = svl
        has_external = has_external and bool(cats.local)
    uses_ext = has_endpoints and sp.externally_accessible
    uses_fw = has_endpoints and bool(sp.load_balancer_ips) and bool(sp.load_balancer_source_ranges)
    lb_chain = fw if uses_fw else ext

    reject = "REJECT --reject-with " + ("icmp-port-unreachable" if config.family == 4 else "icmp6-port-unreachable")
    if not has_endpoints:
        internal_target = external_target = reject
        internal_comment = external_comment = "%s has no endpoints" % name
    else:
        internal_target = external_target = None
        internal_comment = external_comment = None
        if not has_internal:
            internal_target, internal_comment = "DROP", "%s has no local endpoints" % name
        if not has_external:
            external_target, external_comment = "DROP", "%s has no local endpoints" % name

    nat_services, nat_nodeports = [], []
    f_services, f_external, f_nodeports, f_firewall = [], [], [], []
    chains = {}
    ip = sp.cluster_ip

    if has_internal:
        nat_services.append(rule("KUBE-SERVICES", internal_chain, dst=ip, proto=proto,
                                 comment="%s cluster IP" % name, dport=sp.port))
    else:
        f_services.append(rule("KUBE-SERVICES", internal_target, dst=ip, proto=proto, comment=internal_comment,
                               dport=sp.port))
    for eip in sp.external_ips:
        if has_endpoints:
            nat_services.append(rule("KUBE-SERVICES", ext, dst=eip, proto=proto, comment="%s external IP" % name,
                                     dport=sp.port))
        if not has_external:
            f_external.append(rule("KUBE-EXTERNAL-SERVICES", external_target, dst=eip, proto=proto,
                                   comment=external_comment, dport=sp.port))
    for lbip in sp.load_balancer_ips:
        if has_endpoints:
            nat_services.append(rule("KUBE-SERVICES", lb_chain, dst=lbip, proto=proto,
                                     comment="%s loadbalancer IP" % name, dport=sp.port))
        if uses_fw:
            f_firewall.append(rule("KUBE-PROXY-FIREWALL", "DROP", dst=lbip, proto=proto,
                                   comment="%s traffic not accepted by %s" % (name, fw), dport=sp.port))
    if not has_external:
        for lbip in sp.load_balancer_ips:
            f_external.append(rule("KUBE-EXTERNAL-SERVICES", external_target, dst=lbip, proto=proto,
                                   comment=external_comment, dport=sp.port))
    if sp.node_port:
        if has_endpoints:
            nat_nodeports.append(rule("KUBE-NODEPORTS", ext, proto=proto, comment=name, dport=sp.node_port))
        if not has_external:
            f_external.append(rule("KUBE-EXTERNAL-SERVICES", external_target, proto=proto, comment=external_comment,
                                   matches=("-m", "addrtype", "--dst-type", "LOCAL"), dport=sp.node_port))
    if sp.health_check_node_port:
        f_nodeports.append(rule("KUBE-NODEPORTS", "ACCEPT", proto="tcp",
                                comment="%s health check node port" % name, dport=sp.health_check_node_port))

    # internal traffic: masquerade what does not come from a pod (or everything)
    masq_rule = None
    if has_internal:
        if config.masquerade_all:
            masq_rule = rule(internal_chain, "KUBE-MARK-MASQ", dst=ip, proto=proto,
                             comment="%s cluster IP" % name, dport=sp.port)
        elif config.local_detector:
            masq_rule = [rule(internal_chain, "KUBE-MARK-MASQ", src=cidr, not_src=True, dst=ip, proto=proto,
                              comment="%s cluster IP" % name, dport=sp.port)
                         for cidr in config.cluster_cidr]

    if uses_ext:
        rules = []
        if not sp.external_policy_local:
            rules.append(rule(ext, "KUBE-MARK-MASQ",
                              comment="masquerade traffic for %s external destinations" % name))
        else:
            for cidr in config.cluster_cidr:
                rules.append(rule(ext, svc, src=cidr, comment="pod traffic for %s external destinations" % name))
            rules.append(rule(ext, "KUBE-MARK-MASQ",
                              comment="masquerade LOCAL traffic for %s external destinations" % name,
                              matches=("-m", "addrtype", "--src-type", "LOCAL")))
            rules.append(rule(ext, svc, comment="route LOCAL traffic for %s external destinations" % name,
                              matches=("-m", "addrtype", "--src-type", "LOCAL")))
        if has_external:
            rules.append(rule(ext, external_policy_chain))
        chains[ext] = rules

    if uses_fw:
        rules = []
        allow_from_node = False
        for cidr in sp.load_balancer_source_ranges:
            rules.append(rule(fw, ext, src=cidr, comment="%s loadbalancer IP" % name))
            if config.node_ip and ipaddress.ip_address(config.node_ip) in ipaddress.ip_network(cidr):
                allow_from_node = True
        if allow_from_node:
            for lbip in sp.load_balancer_ips:
                rules.append(rule(fw, ext, src=lbip, comment="%s loadbalancer IP" % name))
        # falling off the end: not DNATed, so KUBE-PROXY-FIREWALL drops it (a comment-only rule, as kube-proxy)
        rules.append(" ".join(["-A", fw, "-m", "comment", "--comment",
                               quote("other traffic to %s will be dropped by KUBE-PROXY-FIREWALL" % name)]))
        chains[fw] = rules

    def policy_chain(chain, eps):
        rules = []
        if chain == internal_chain and masq_rule:
            rules += masq_rule if isinstance(masq_rule, list) else [masq_rule]
        rules += _endpoint_jumps(chain, name, sp, eps, config, comments)
        chains[chain] = rules

    if uses_cluster:
        policy_chain(svc, cats.cluster)
    if uses_local:
        policy_chain(svl, cats.local)

    for ep in cats.all_reachable:
        sep = endpoint_chain(sp.name, ep)
        comment = name if comments else None
        affinity = ()
        if sp.session_affinity:
            affinity = ("-m", "recent", "--set", "--name", sep, "--mask", _recent_mask(config.family), "--rsource")
        chains[sep] = [rule(sep, "KUBE-MARK-MASQ", src=ep.ip, comment=comment),
                       rule(sep, "DNAT --to-destination " + ep.addr, proto=proto, comment=comment,
                            matches=affinity + ("-m", proto))]

    return ServicePortRules(
        chains={k: tuple(v) for k, v in chains.items()}, nat_services=tuple(nat_services),
        nat_nodeports=tuple(nat_nodeports), filter_services=tuple(f_services), filter_external=tuple(f_external),
        filter_nodeports=tuple(f_nodeports), filter_firewall=tuple(f_firewall))


def _endpoint_jumps(chain, name, sp, endpoints, config, comments):
    rules = []
    if sp.session_affinity:
        for ep in endpoints:
            sep = endpoint_chain(sp.name, ep)
            rules.append(rule(chain, sep, comment="%s -> %s" % (name, ep.addr) if comments else None,
                              matches=("-m", "recent", "--rcheck", "--seconds", str(sp.session_affinity_timeout),
                                       "--reap", "--name", sep, "--mask", _recent_mask(config.family),
                                       "--rsource")))
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        stat = ("-m", "statistic", "--mode", "random", "--probability", probability(n - i)) if i < n - 1 else ()
        rules.append(rule(chain, endpoint_chain(sp.name, ep), comment="%s -> %s" % (name, ep.addr) if comments
                          else None, matches=stat))
    return rules


# ---- the whole ruleset -------------------------------------------------------------------------

def base_chains(config):
    """The shared chains' fixed rules: {table: {chain: [rules]}} (per-port rules are added to them)."""
    masq = "MASQUERADE --random-fully"
    mark = "0x%x" % MASQ_MARK
    nat = {
        "KUBE-SERVICES": [], "KUBE-NODEPORTS": [],
        "KUBE-POSTROUTING": ["-A KUBE-POSTROUTING -m mark ! --mark %s/%s -j RETURN" % (mark, mark),
                             "-A KUBE-POSTROUTING -j MARK --set-xmark %s/0x0" % mark,
                             '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
                             '-j ' + masq],
        "KUBE-MARK-MASQ": ["-A KUBE-MARK-MASQ -j MARK --set-xmark %s/%s" % (mark, mark)],
    }
    filt = {chain: [] for chain in FILTER_BASE}
    return {FILTER: filt, NAT: nat}


def nodeport_dispatch(config):
    """The last rule(s) of nat KUBE-SERVICES: to KUBE-NODEPORTS for local addresses."""
    comment = quote("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    if not config.nodeport_addresses:
        if config.family == 6:
            dst = "! -d ::1/128 "
        else:
            dst = "" if config.localhost_nodeports else "! -d 127.0.0.0/8 "
        return ["-A KUBE-SERVICES %s-m comment --comment %s -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
                % (dst, comment)]
    return ["-A KUBE-SERVICES -d %s -m comment --comment %s -j KUBE-NODEPORTS" % (canonical_net(ip), comment)
            for ip in config.nodeport_addresses]


def forward_rules(config):
    mark = "0x%x" % MASQ_MARK
    rules = ["-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"]
    rules.append('-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark %s/%s '
                 '-j ACCEPT' % (mark, mark))
    rules.append('-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
                 '--ctstate RELATED,ESTABLISHED -j ACCEPT')
    return rules


def uses_comments(state):
    """Per-endpoint comments unless the cluster is large (kube-proxy's largeClusterMode)."""
    return sum(len(state.endpoints_for(n)) for n in state.service_ports) <= LARGE_CLUSTER_ENDPOINTS


def _assemble(state, config, port_rules):
    """Render (or take from the cache) every service port in order and collect the
    shared chains' rules; returns the ruleset (see render)."""
    comments = uses_comments(state)
    tables = base_chains(config)
    nat, filt = tables[NAT], tables[FILTER]
    own = {}
    for name in sorted(state.service_ports):
        rendered = None if port_rules is None else port_rules.get(name)
        if rendered is None:
            rendered = render_service_port(state.service_ports[name], state.endpoints_for(name), config, comments)
            if port_rules is not None:
                port_rules[name] = rendered
        nat["KUBE-SERVICES"].extend(rendered.nat_services)
        nat["KUBE-NODEPORTS"].extend(rendered.nat_nodeports)
        filt["KUBE-SERVICES"].extend(rendered.filter_services)
        filt["KUBE-EXTERNAL-SERVICES"].extend(rendered.filter_external)
        filt["KUBE-NODEPORTS"].extend(rendered.filter_nodeports)
        filt["KUBE-PROXY-FIREWALL"].extend(rendered.filter_firewall)
        own.update(rendered.chains)
    nat["KUBE-SERVICES"].extend(nodeport_dispatch(config))
    filt["KUBE-FORWARD"].extend(forward_rules(config))
    for chain in sorted(own):
        nat[chain] = own[chain]
    return {table: {chain: tuple(rules) for chain, rules in chains.items()} for table, chains in tables.items()}


def render(state, config, port_rules=None):
    """The whole desired ruleset: {table: {chain: (rules...)}}, ours only, deterministic order.

    port_rules: an optional cache {ServicePortName: ServicePortRules} of ports rendered
    before (for unchanged ports); it is updated in place."""
    return _assemble(state, config, port_rules)


def full_sync_stream(state, config, port_rules, known, out):
    """A full sync's restore input as chunks, rendered while they are consumed.

    iptables-restore spends ~40% of a 10k-Service full sync parsing; feeding it
    while the ports are still being rendered runs both on their own core, so a
    cold full sync costs about the restore alone. The content is restore_input(new,
    None, stale) reordered so that nothing is referenced before it is declared:
    each port's chains as it is rendered, the shared chains (which jump to them)
    last, then the stale chains of ours (`known` minus the new ones) are flushed
    and deleted. out["ruleset"] receives the ruleset (as render returns it)."""
    many = 2 * len(state.service_ports) > S_TRICK_CHAINS
    base = base_chains(config)
    head = ["*nat"] + (["-S"] if many else []) + [":%s - [0:0]" % c for c in NAT_BASE]
    head += base[NAT]["KUBE-POSTROUTING"] + base[NAT]["KUBE-MARK-MASQ"]
    buf, pending = [head], 0

    def flush():
        text = "".join("\n".join(part) + "\n" for part in buf if part)
        buf.clear()
        return text

    comments = uses_comments(state)
    for name in sorted(state.service_ports):
        rendered = port_rules.get(name)
        if rendered is None:
            rendered = port_rules[name] = render_service_port(state.service_ports[name], state.endpoints_for(name),
                                                              config, comments)
        buf.append([":%s - [0:0]" % c for c in rendered.chains])
        for rules in rendered.chains.values():
            buf.append(rules)
            pending += len(rules)
        if pending >= 4096:
            yield flush()
            pending = 0
    ruleset = _assemble(state, config, port_rules)      # all cached now: only the shared chains are built
    out["ruleset"] = ruleset
    nat, filt = ruleset[NAT], ruleset[FILTER]
    stale_nat = sorted(c for c in known.get(NAT, ()) if c not in nat)
    stale_filter = sorted(c for c in known.get(FILTER, ()) if c not in filt)
    buf.append(list(nat["KUBE-SERVICES"]) + list(nat["KUBE-NODEPORTS"]))
    buf.append([":%s - [0:0]" % c for c in stale_nat] + ["-X %s" % c for c in stale_nat] + ["COMMIT", "*filter"])
    buf.append([":%s - [0:0]" % c for c in FILTER_BASE])
    for chain in FILTER_BASE:
        buf.append(filt[chain])
    buf.append([":%s - [0:0]" % c for c in stale_filter] + ["-X %s" % c for c in stale_filter] + ["COMMIT"])
    yield flush()


# ---- restore input -------------------------------------------------------------------------------

def diff(old, new):
    """Per table: (chains to (re)write, chains to delete) to go from ruleset `old` to `new`."""
    out = {}
    for table in (FILTER, NAT):
        before, after = old.get(table, {}), new.get(table, {})
        write = [c for c, rules in after.items() if before.get(c) != rules]
        delete = [c for c in before if c not in after]
        out[table] = (write, delete)
    return out


def _edits(table, chain, old_rules, new_rules):
    """-D / -I lines turning old_rules into new_rules (as sets, the tail kept), or None to rewrite."""
    if (table, chain) not in EDITED_CHAINS:
        return None
    tail = nodeport_tail = 0
    if chain == "KUBE-SERVICES" and table == NAT:
        tail = nodeport_tail = sum(1 for r in new_rules if r.endswith("-j KUBE-NODEPORTS"))
        if old_rules[len(old_rules) - tail:] != new_rules[len(new_rules) - tail:]:
            return None
    old_list = old_rules[:len(old_rules) - nodeport_tail]
    new_list = new_rules[:len(new_rules) - nodeport_tail]
    old_set, new_set = set(old_list), set(new_list)
    if len(old_set) != len(old_list) or len(new_set) != len(new_list):
        return None
    gone = [r for r in old_list if r not in new_set]
    added = [r for r in new_list if r not in old_set]
    if len(gone) + len(added) > max(EDIT_LIMIT, len(new_list) // 10):
        return None
    prefix = "-A %s " % chain
    return (["-D " + r[3:] for r in gone] +
            ["-I %s 1 %s" % (chain, r[len(prefix):]) for r in reversed(added)])


def restore_input(new, old=None, stale=()):
    """iptables-restore --noflush input that takes the kernel from `old` to `new`.

    old None: a full sync, every chain of `new` is declared (flushed) and written.
    Otherwise only chains whose rules differ are written, and chains gone from
    `new` are flushed and deleted; the shared dispatch chains (EDITED_CHAINS)
    get `-D` / `-I` edits for a few changed rules instead of a rewrite, so
    their order in the kernel may differ from `new` (it does not matter: compare
    them as sets). `stale`: further (table, chain) pairs of ours to delete
    (found in the kernel but in neither ruleset). Chains of others are never
    named. A restore declaring more than S_TRICK_CHAINS chains starts each
    table with `-S` (see docs/kube-proxy-sync-design.md)."""
    changes = diff(old or {}, new) if old is not None else \
        {t: (list(new.get(t, {})), []) for t in (FILTER, NAT)}
    for table, chain in stale:
        if chain not in changes[table][1] and chain not in new.get(table, {}):
            changes[table][1].append(chain)
    lines = []
    for table in (FILTER, NAT):
        write, delete = changes[table]
        if not write and not delete:
            continue
        edits, rewrite = [], []
        for chain in write:
            lines_for = None
            if old is not None and chain in old.get(table, {}):
                lines_for = _edits(table, chain, old[table][chain], new[table][chain])
            if lines_for is None:
                rewrite.append(chain)
            else:
                edits += lines_for
        lines.append("*" + table)
        if len(rewrite) + len(delete) > S_TRICK_CHAINS:
            lines.append("-S")
        lines += [":%s - [0:0]" % c for c in rewrite + delete]
        for chain in rewrite:
            lines += new[table][chain]
        lines += edits
        lines += ["-X %s" % c for c in delete]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


# ---- the proxier ---------------------------------------------------------------------------------

def jump_input(saved_by_table, remove=False, keep=()):
    """Restore input that adds (or removes) the jumps from the built-in chains that are
    missing (or present), and declares our base chains that don't exist yet (declaring
    an existing chain under --noflush would flush it). Empty when nothing is needed.
    keep: jumps (BUILTIN_JUMPS entries) not to remove."""
    lines = []
    base = {FILTER: FILTER_BASE, NAT: NAT_BASE}
    for table in (FILTER, NAT):
        saved = saved_by_table.get(table, "")
        present = set(saved.splitlines())
        body = []
        if not remove:
            body += [":%s - [0:0]" % c for c in base[table] if (":%s " % c) not in saved]
        for t, chain, text in reversed(BUILTIN_JUMPS):     # -I 1 in reverse: they end up in order
            if t != table:
                continue
            line = "-A %s %s" % (chain, text)
            if remove and line in present and (t, chain, text) not in keep:
                body.append("-D %s %s" % (chain, text))
            elif not remove and line not in present:
                body.append("-I %s 1 %s" % (chain, text))
        if body:
            lines += ["*" + table] + body + ["COMMIT"]
    return "\n".join(lines) + "\n" if lines else ""


def parse_saved(saved):
    """iptables-save text of one table -> {chain: (rules...)} of our chains only (the
    shape render() returns), for comparing the kernel with the desired state."""
    return chain_rules(saved, lambda name: name in NAT_BASE or name in FILTER_BASE or is_our_chain(name))


def rules_count(ruleset):
    return {table: sum(len(rules) for rules in chains.values()) for table, chains in ruleset.items()}


# Where each ServicePortRules field lives.
SHARED_FIELDS = (("nat_services", NAT, "KUBE-SERVICES"), ("nat_nodeports", NAT, "KUBE-NODEPORTS"),
                 ("filter_services", FILTER, "KUBE-SERVICES"),
                 ("filter_external", FILTER, "KUBE-EXTERNAL-SERVICES"),
                 ("filter_nodeports", FILTER, "KUBE-NODEPORTS"),
                 ("filter_firewall", FILTER, "KUBE-PROXY-FIREWALL"))


def port_changes_input(changes):
    """iptables-restore --noflush input for a partial sync, straight from what changed:
    changes = [(old ServicePortRules or None, new ServicePortRules or None)].

    Each service port owns its nat chains outright, and its rules in the shared
    chains are its own (they name it), so the transaction is: (re)write the
    port's chains that differ, -D / -I its shared-chain rules that differ, and
    -X its chains that are gone (after the rules that jumped to them). Cost
    is proportional to the change, not to the number of Services: nothing is
    compared or rendered for the 10,000 ports that did not change."""
    write, delete, edits = {}, [], {NAT: [], FILTER: []}
    counts = {NAT: 0, FILTER: 0}
    for old, new in changes:
        old_chains = old.chains if old is not None else {}
        new_chains = new.chains if new is not None else {}
        for chain, rules in new_chains.items():
            if old_chains.get(chain) != rules:
                write[chain] = rules
        delete += [c for c in old_chains if c not in new_chains]
        counts[NAT] += sum(map(len, new_chains.values())) - sum(map(len, old_chains.values()))
        for fld, table, chain in SHARED_FIELDS:
            before = getattr(old, fld) if old is not None else ()
            after = getattr(new, fld) if new is not None else ()
            if before == after:
                continue
            counts[table] += len(after) - len(before)
            after_set, before_set = set(after), set(before)
            prefix = len("-A %s " % chain)
            edits[table] += ["-D " + r[3:] for r in before if r not in after_set]
            edits[table] += ["-I %s 1 %s" % (chain, r[prefix:]) for r in reversed(after) if r not in before_set]
    lines = []
    if edits[FILTER]:
        lines += ["*filter"] + edits[FILTER] + ["COMMIT"]
    if write or delete or edits[NAT]:
        lines.append("*nat")
        lines += [":%s - [0:0]" % c for c in list(write) + delete]
        for rules in write.values():
            lines += rules
        lines += edits[NAT]
        lines += ["-X %s" % c for c in delete]
        lines.append("COMMIT")
    return ("\n".join(lines) + "\n" if lines else ""), counts


def _joined(restore, chunks):
    text = "".join(chunks)
    restore(text)
    return len(text)


def held(rendered, kernel, shared):
    """Whether the kernel (parsed: {table: {chain: rules}}; `shared`: {(table, chain): set of
    rules} of the shared chains) holds all of one port's ServicePortRules."""
    nat = kernel[NAT]
    return (all(nat.get(chain) == rules for chain, rules in rendered.chains.items())
            and all(r in shared[(table, chain)] for fld, table, chain in SHARED_FIELDS for r in getattr(rendered, fld)))


def additive_input(table, rendered, kernel, shared):
    """Restore input for one table that adds what the ServicePortRules in `rendered` need and
    the kernel lacks: their own chains that differ, written whole, and their missing rules
    in the shared chains, inserted. It deletes nothing (what it replaces goes with the
    settling restore_input() afterwards). Returns (text, commit): commit() records in
    `kernel` and `shared` that the text was applied."""
    writes, adds = {}, {}
    for r in rendered:
        if table == NAT:
            for chain, rules in r.chains.items():
                if chain not in writes and kernel[NAT].get(chain) != rules:
                    writes[chain] = rules
        for fld, t, chain in SHARED_FIELDS:
            if t == table:
                have = shared[(t, chain)]
                adds.setdefault(chain, []).extend(x for x in getattr(r, fld) if x not in have)
    adds = {chain: list(dict.fromkeys(rules)) for chain, rules in adds.items() if rules}
    if not writes and not adds:
        return "", lambda: None
    lines = ["*" + table] + (["-S"] if len(writes) > S_TRICK_CHAINS else [])
    lines += [":%s - [0:0]" % c for c in writes]
    for rules in writes.values():
        lines += rules
    for chain, rules in adds.items():
        prefix = len("-A %s " % chain)
        lines += ["-I %s 1 %s" % (chain, r[prefix:]) for r in reversed(rules)]
    lines.append("COMMIT")

    def commit():
        kernel[table].update(writes)
        for chain, rules in adds.items():
            kernel[table][chain] = tuple(rules) + tuple(kernel[table].get(chain, ()))
            shared[(table, chain)].update(rules)
    return "\n".join(lines) + "\n", commit


class IptablesProxier:
    """Applies the tracker's Syncs to the kernel (the current network namespace).

    Keeps `port_rules`, each service port's rendered rules (rendering is pure:
    they stay right until the port or its endpoints change), and `synced`,
    whether the kernel holds what they say. A full sync renders what changed,
    reads our chains back from the kernel and rewrites the ones that differ
    from the desired ruleset (repairing whatever drifted, and taking over an
    earlier run's rules without touching the unchanged ones). A partial
    sync renders and writes only the changed ports (port_changes_input); a
    change touching more than a tenth of the ports is done as a full sync. A
    refused restore is narrowed down to the service ports the kernel refuses
    (_isolate), which are quarantined; everything else is applied in the same
    sync. If that fails too, sync() raises and clears `synced`: the caller marks
    the next sync full."""
    mode = "iptables"

    def __init__(self, config: Config, restore: Callable[[str], object] | None = None,
                 save: Callable[[str], str] | None = None) -> None:
        from podnet.net import iptables as ipt
        self.config = config
        self.ipv6 = config.family == 6
        self._restore: Callable[[str], object] = restore or (lambda text: ipt.restore(text, ipv6=self.ipv6))
        # full syncs stream their input (rendering overlaps iptables-restore's parsing);
        # returns the bytes written. With an injected `restore` (tests), chunks are joined.
        self._restore_stream: Callable[[Iterable[str]], int] = \
            (lambda chunks: _joined(restore, chunks)) if restore else \
            (lambda chunks: ipt.restore_stream(chunks, ipv6=self.ipv6))
        self._save: Callable[[str], str] = save or (lambda table: ipt.save(table, ipv6=self.ipv6))
        self.synced = False
        self.port_rules: dict[ServicePortName, ServicePortRules] = {}
        self.chains: dict[str, set[str]] = {NAT: set(), FILTER: set()}  # ours in the kernel, as of the last sync
        self.rules = {NAT: 0, FILTER: 0}
        self.comments: bool | None = None
        self.chains_written: int | None = None  # by the last full sync: what it found different in the kernel
        self.quarantine = Quarantine()          # service ports whose rules the kernel refused

    def _read_kernel(self):
        return {table: self._save(table) for table in (FILTER, NAT)}

    def setup(self) -> None:
        """Create our base chains and the jumps to them (idempotent; kube-proxy's ensure step)."""
        text = jump_input(self._read_kernel())
        if text:
            self._restore(text)

    def cleanup(self) -> None:
        """Remove every rule and chain of ours (kube-proxy --cleanup, or a switch to another mode).
        While the IPVS mode's rules are there too (rules.other_mode_present), the chains and
        jumps it shares with us (rules.SHARED_CHAINS, rules.SHARED_JUMPS) stay, only our rules
        in them go."""
        saved = self._read_kernel()
        shared_stays = other_mode_present(self.mode, saved)
        keep: dict[str, tuple[str, ...]] = SHARED_CHAINS if shared_stays else {FILTER: (), NAT: ()}
        doomed = {t: [c for c in declared_chains(saved[t]) if (c in (FILTER_BASE if t == FILTER else NAT_BASE)
                                                          or is_our_chain(c)) and c not in keep[t]]
                  for t in (FILTER, NAT)}
        text = jump_input(saved, remove=True, keep=SHARED_JUMPS if shared_stays else ())
        unlink = []
        for table in (FILTER, NAT):       # our rules in the chains that stay (they jump to doomed ones)
            gone = set(doomed[table])
            rules = ["-D " + line[3:] for line in saved[table].splitlines() if line.startswith("-A ")
                     and line.split(" ", 2)[1] in keep[table] and line.rsplit(" -j ", 1)[-1].split(" ")[0] in gone]
            if rules:
                unlink += ["*" + table] + rules + ["COMMIT"]
        if unlink:
            text += "\n".join(unlink) + "\n"
        if text:
            self._restore(text)
        lines = []
        for table in (FILTER, NAT):
            ours = doomed[table]
            if ours:
                lines += ["*" + table] + [":%s - [0:0]" % c for c in ours] + ["-X %s" % c for c in ours] + ["COMMIT"]
        if lines:
            self._restore("\n".join(lines) + "\n")
        self.synced = False
        self.quarantine = Quarantine()

    def sync(self, sync: Sync) -> SyncResult:
        """Apply a Sync; a refused restore is narrowed down to the service ports the kernel
        refuses (_isolate), which are quarantined while everything else is applied."""
        started = time.monotonic()
        sync = self.quarantine.effective(sync)
        state = sync.state
        total = sum(len(state.endpoints_for(n)) for n in state.service_ports)
        comments = total <= LARGE_CLUSTER_ENDPOINTS
        full = (sync.full or not self.synced or comments != self.comments
                or len(sync.changed) > max(EDIT_LIMIT, len(state.service_ports) // 10))
        if comments != self.comments:
            self.port_rules = {}
        self.comments = comments
        found: Isolation[ServicePortName] = Isolation()
        try:
            try:
                written = self._full(state, sync.changed) if full else len(self._partial(state, sync.changed))
            except REFUSED as e:
                log.warning("iptables-restore refused the %s sync: %s; finding the service ports it refuses",
                            "full" if full else "partial", one_line(e))
                found, written = self._isolate(sync)
                found.refused += 1
                full = True
        except Exception:
            self.synced = False
            raise
        self.synced = True
        quarantined = self.quarantine.add(sync, found.bad)
        deleted = clear_stale_udp_flows(sync, self.ipv6)
        return SyncResult(full, time.monotonic() - started, len(sync.changed), written, dict(self.rules), deleted,
                          self.chains_written if full else None, found.refused, quarantined, len(self.quarantine))

    def _isolate(self, sync):
        """After a refused restore: read our chains back (a refused restore may have committed
        its first table), find which of the service ports the kernel does not hold yet it
        refuses (proxier.isolate: each trial adds some ports' rules, one table per
        transaction, nothing deleted), then settle: one restore_input() from what the kernel
        now holds to the desired ruleset with the refused ports at their fallback (what they
        had before, or nothing), deleting what is stale. Returns (Isolation, bytes written).
        Raises when the refusal is nobody's in particular (isolate's control) or the settling
        restore is refused too."""
        state = sync.state
        saved = self._read_kernel()
        jumps = jump_input(saved)
        if jumps:
            self._restore(jumps)
        kernel = {t: dict(parse_saved(saved[t])) for t in (FILTER, NAT)}
        shared = {(t, c): set(kernel[t].get(c, ())) for _, t, c in SHARED_FIELDS}
        rules = self.port_rules
        for name in state.service_ports:
            if name not in rules:
                rules[name] = render_service_port(state.service_ports[name], state.endpoints_for(name), self.config,
                                                  self.comments)
        suspects = [n for n in sorted(state.service_ports) if not held(rules[n], kernel, shared)]
        written = 0

        def trial(names):
            nonlocal written
            for table in (NAT, FILTER):     # one table per transaction: each is atomic
                text, commit = additive_input(table, [rules[n] for n in names], kernel, shared)
                if text:
                    self._restore(text)
                    written += len(text)
                    commit()

        def control():                      # a harmless transaction: KUBE-MARK-MASQ as it is
            mark = base_chains(self.config)[NAT]["KUBE-MARK-MASQ"]
            self._restore("\n".join(["*nat", ":KUBE-MARK-MASQ - [0:0]"] + mark + ["COMMIT"]) + "\n")

        found = isolate(suspects, trial, control)
        bad = [name for name, _ in found.bad]
        for name in bad:
            rules.pop(name, None)           # rendered again from the fallback
        new = render(self.quarantine.fallback_state(sync, bad), self.config, rules)
        text = restore_input(new, kernel)
        if text:
            self._restore(text)
            written += len(text)
        self.chains_written = sum(len(d) + len(w) for w, d in diff(kernel, new).values())
        self.chains = {t: set(new[t]) for t in (FILTER, NAT)}
        self.rules = rules_count(new)
        return found, written

    def _full(self, state, changed):
        """Read our chains back from the kernel, and rewrite those that differ from the
        desired ruleset (drift, or an earlier run's leftovers), deleting ours that are
        not wanted. Reading costs one iptables-save (~2 s at 10k Services here);
        rewriting everything would cost a whole restore over a full table (~8 s), and
        would disturb nothing less. When most chains are missing (a start on an empty
        node) everything is streamed in one transaction instead."""
        for name in [n for n in self.port_rules if n in changed or n not in state.service_ports]:
            del self.port_rules[name]
        saved = self._read_kernel()
        missing_jumps = jump_input(saved)
        if missing_jumps:
            self._restore(missing_jumps)
        kernel = {t: parse_saved(saved[t]) for t in (FILTER, NAT)}
        if len(kernel[NAT]) - len(NAT_BASE) < len(state.service_ports) // 2:     # mostly empty
            out = {}
            known = {t: set(kernel[t]) for t in (FILTER, NAT)}
            written = self._restore_stream(full_sync_stream(state, self.config, self.port_rules, known, out))
            new = out["ruleset"]
            self.chains_written = sum(len(chains) for chains in new.values()) + sum(map(len, known.values()))
        else:
            new = render(state, self.config, self.port_rules)
            text = restore_input(new, kernel)
            if text:
                self._restore(text)
            written = len(text)
            self.chains_written = sum(
                len(d) + sum(1 for c in w if c not in kernel[t] or _edits(t, c, kernel[t][c], new[t][c]) != [])
                for t, (w, d) in diff(kernel, new).items())
        self.chains = {t: set(new[t]) for t in (FILTER, NAT)}
        self.rules = rules_count(new)
        return written

    def _partial(self, state, changed):
        changes = []
        for name in sorted(changed):
            old = self.port_rules.pop(name, None)
            sp = state.service_ports.get(name)
            new = None
            if sp is not None:
                eps = state.endpoints_for(name)
                new = render_service_port(sp, eps, self.config, self.comments)
                self.port_rules[name] = new
            changes.append((old, new))
        text, counts = port_changes_input(changes)
        if text:
            self._restore(text)
        for old, new in changes:
            self.chains[NAT].difference_update(old.chains if old is not None else ())
            self.chains[NAT].update(new.chains if new is not None else ())
        for table, n in counts.items():
            self.rules[table] += n
        return text
