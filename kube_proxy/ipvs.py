"""IPVS mode: Services as IPVS virtual servers, kube-proxy's layout (pkg/proxy/ipvs).

What the kernel holds, per node:

  kube-ipvs0      a dummy device, kept down, carrying every ClusterIP, external IP and
                  load-balancer IP as a /32 (/128): the kernel then takes them as local
                  (a local route exists even for a down device) and IPVS, hooked on
                  LOCAL_IN, gets their packets
  IPVS            one virtual server per ClusterIP / external IP / LB IP and per NodePort
                  on each node address (or each --nodeport-addresses IP), port and protocol;
                  the ready endpoints as real servers (masquerading, weight 1); session
                  affinity as persistence (flag + timeout, netmask /32); --ipvs-scheduler
  ipsets          KUBE-CLUSTER-IP, KUBE-LOOP-BACK, KUBE-NODE-PORT-*, KUBE-LOAD-BALANCER*,
                  KUBE-EXTERNAL-IP*, KUBE-HEALTH-CHECK-NODE-PORT, KUBE-IPVS-IPS, and
                  KUBE-NO-ENDPOINTS (ours: Services without endpoints, rejected at once)
  iptables        a few rules matching those sets: masquerade marks (KUBE-SERVICES,
                  KUBE-NODE-PORT, KUBE-LOAD-BALANCER -> KUBE-MARK-MASQ -> KUBE-POSTROUTING),
                  hairpin (KUBE-LOOP-BACK), the VIP access filter (KUBE-IPVS-FILTER), LB
                  source ranges (KUBE-PROXY-FIREWALL, KUBE-SOURCE-RANGES-FIREWALL)

Desired state is plain data: `render_port()` turns one service port and its
endpoints into a `PortIPVS` (its virtual servers with real servers, addresses
to bind, set members), `Aggregate` sums ports up (refcounted: two ports may
share an address), `render_rules()` gives the iptables rules, and
`ipset_restore_input()` / `rules_restore_input()` the text for the two tools.
All of that is pure and unit-tested (tests/test_kube_proxy_ipvs.py).

`IpvsProxier` applies it. A full sync dumps the IPVS table over generic netlink
(podnet.net.ipvs), the addresses of kube-ipvs0, `ipset save` and
`iptables-save`, and changes only what differs (a rerun changes nothing). A
partial sync renders only the changed ports and touches only their virtual
servers, addresses and set members; the iptables rules depend only on which
sets are empty, so they are rarely rewritten.

Graceful removal (kube-proxy's graceful termination): a TCP real server that
is no longer wanted but still has connections gets weight 0 (no new
connections) and is deleted once drained or after `grace_period`; UDP and
SCTP ones are deleted at once (net.ipv4.vs.expire_nodest_conn=1 ends their
flows). A background thread (setup() starts it) reaps them between syncs.
"""
import ipaddress
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kube_proxy import model
from kube_proxy.proxier import REFUSED, Config, Quarantine, SyncResult, clear_stale_udp_flows, isolate
from kube_proxy.rules import FILTER, MASQ_MARK, NAT, SHARED_CHAINS, SHARED_JUMPS, other_mode_present, rule
from kube_proxy.tracker import Sync
from podnet.isolate import one_line
from podnet.kube.endpointslices import Endpoint, ServicePortName
from podnet.net.iptables import chain_rules, declared_chains

log = logging.getLogger("kube_proxy.ipvs")

DUMMY = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
GRACE_PERIOD = 300.0            # seconds a drained-but-busy real server may keep connections
GRACEFUL_INTERVAL = 10.0        # how often the background thread looks at terminating real servers
MAX_ISOLATION_ROUNDS = 8        # full re-syncs one sync may take to quarantine the ports the kernel refuses
SYSCTLS = (("net/ipv4/vs/conntrack", 1), ("net/ipv4/vs/expire_nodest_conn", 1),
           ("net/ipv4/vs/expire_quiescent_template", 1), ("net/ipv4/ip_forward", 1))

# ---- ipsets ----------------------------------------------------------------------------------

LOOP_BACK, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL = ("KUBE-LOOP-BACK", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP",
                                                         "KUBE-EXTERNAL-IP-LOCAL")
LB, LB_FW, LB_LOCAL = "KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER-FW", "KUBE-LOAD-BALANCER-LOCAL"
LB_SOURCE_IP, LB_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-IP", "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT = {"TCP": "KUBE-NODE-PORT-TCP", "UDP": "KUBE-NODE-PORT-UDP", "SCTP": "KUBE-NODE-PORT-SCTP-HASH"}
NODE_PORT_LOCAL = {"TCP": "KUBE-NODE-PORT-LOCAL-TCP", "UDP": "KUBE-NODE-PORT-LOCAL-UDP",
                   "SCTP": "KUBE-NODE-PORT-LOCAL-SCTP-HASH"}
HEALTH_CHECK, IPVS_IPS, NO_ENDPOINTS = "KUBE-HEALTH-CHECK-NODE-PORT", "KUBE-IPVS-IPS", "KUBE-NO-ENDPOINTS"

# name: (type, comment of the rules that match it)
SETS = {
    LOOP_BACK: ("hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    CLUSTER_IP: ("hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    EXTERNAL_IP: ("hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    EXTERNAL_IP_LOCAL: ("hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    LB: ("hash:ip,port", "Kubernetes service lb portal"),
    LB_FW: ("hash:ip,port", "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    LB_LOCAL: ("hash:ip,port", "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    LB_SOURCE_IP: ("hash:ip,port,ip", "Kubernetes service load balancer ip + port + source IP for packet "
                                      "filter purpose"),
    LB_SOURCE_CIDR: ("hash:ip,port,net", "Kubernetes service load balancer ip + port + source cidr for packet "
                                         "filter purpose"),
    NODE_PORT["TCP"]: ("bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    NODE_PORT_LOCAL["TCP"]: ("bitmap:port", "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    NODE_PORT["UDP"]: ("bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    NODE_PORT_LOCAL["UDP"]: ("bitmap:port", "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    NODE_PORT["SCTP"]: ("hash:ip,port", "Kubernetes nodeport SCTP port for masquerade purpose with type "
                                        "hash ip:port"),
    NODE_PORT_LOCAL["SCTP"]: ("hash:ip,port", "Kubernetes nodeport SCTP port with externalTrafficPolicy=local "
                                              "with type hash ip:port"),
    HEALTH_CHECK: ("bitmap:port", "Kubernetes health check node port"),
    IPVS_IPS: ("hash:ip", "IPVS service ip"),
    NO_ENDPOINTS: ("hash:ip,port", "Kubernetes service ip + port without endpoints"),
}


def create_line(name, family=4):
    kind = SETS[name][0]
    if kind == "bitmap:port":
        return "create %s bitmap:port range 0-65535" % name
    return "create %s %s family %s hashsize 1024 maxelem 65536" % (name, kind, "inet" if family == 4 else "inet6")


def ip_port(ip, protocol, port):
    """A hash:ip,port member as `ipset save` prints it: "10.96.0.10,tcp:80"."""
    return "%s,%s:%d" % (ip, protocol.lower(), port)


def _canonical_ip(ip):
    return str(ipaddress.ip_address(ip))


def _canonical_net(cidr):
    net = ipaddress.ip_network(cidr, strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


# ---- virtual servers ----------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class VirtualServer:
    """One IPVS virtual server as we want it; `dests` are (ip, port) real servers, weight 1."""
    protocol: str
    address: str
    port: int
    scheduler: str = DEFAULT_SCHEDULER
    timeout: int = 0                    # ClientIP affinity: persistence timeout (seconds)
    dests: frozenset = frozenset()

    @property
    def key(self):
        return (self.protocol, self.address, self.port)

    def service(self):
        """As podnet.net.ipvs.Service (what the kernel is told)."""
        from podnet.net.ipvs import F_PERSISTENT, Service
        return Service(self.protocol, self.address, self.port, self.scheduler,
                       F_PERSISTENT if self.timeout else 0, self.timeout)


@dataclass(frozen=True)
class PortIPVS:
    """What one service port puts into the kernel (and nothing else does for it)."""
    servers: tuple = ()                 # (VirtualServer, ...)
    addresses: tuple = ()               # IPs on kube-ipvs0
    members: tuple = ()                 # ((set name, member), ...)
    no_node_access: tuple = ()          # (lb ip, protocol, port): LB IPs the node itself may not use


def render_port(sp, endpoints, config, node_ips=(), local_ips=frozenset(), scheduler=DEFAULT_SCHEDULER):
    """kube-proxy's IPVS objects for ServicePort `sp`.

    node_ips: the addresses NodePorts answer on; local_ips: every address of
    the node outside kube-ipvs0 (an external or LB IP that is one of them is
    not bound again)."""
    proto = sp.protocol.lower()
    cats = model.categorize_endpoints(sp, endpoints)
    timeout = sp.session_affinity_timeout
    members, servers, addresses, no_access = [], [], [], []

    def dests_for(local_policy):
        # kube-proxy: Local policy -> the local endpoints, or (none here) the cluster ones
        # (so that pods of this node still reach the Service)
        eps = (cats.local or cats.cluster) if local_policy else cats.cluster
        return frozenset((ep.ip, ep.port) for ep in eps)

    # hairpin: a local endpoint reaching itself through the Service is masqueraded
    for ep in endpoints:
        if ep.is_local:
            members.append((LOOP_BACK, "%s,%s:%d,%s" % (ep.ip, proto, ep.port, ep.ip)))

    members.append((CLUSTER_IP, ip_port(sp.cluster_ip, proto, sp.port)))
    servers.append(VirtualServer(sp.protocol, sp.cluster_ip, sp.port, scheduler, timeout,
                                 dests_for(sp.internal_policy_local)))
    addresses.append(sp.cluster_ip)
    frontends = [sp.cluster_ip]

    for ip in sp.external_ips:
        members.append((EXTERNAL_IP_LOCAL if sp.external_policy_local else EXTERNAL_IP, ip_port(ip, proto, sp.port)))
        servers.append(VirtualServer(sp.protocol, ip, sp.port, scheduler, timeout,
                                     dests_for(sp.external_policy_local)))
        if ip not in local_ips:
            addresses.append(ip)
        frontends.append(ip)

    for ip in sp.load_balancer_ips:
        entry = ip_port(ip, proto, sp.port)
        members.append((LB, entry))
        if sp.external_policy_local:
            members.append((LB_LOCAL, entry))
        if sp.load_balancer_source_ranges:
            members.append((LB_FW, entry))
            allow_node = False
            for cidr in sp.load_balancer_source_ranges:
                members.append((LB_SOURCE_CIDR, "%s,%s" % (entry, _canonical_net(cidr))))
                if config.node_ip and ipaddress.ip_address(config.node_ip) in ipaddress.ip_network(cidr):
                    allow_node = True
            if allow_node:      # the node may reach its own LB IP (e.g. a route that loops back)
                members.append((LB_SOURCE_IP, "%s,%s" % (entry, ip)))
            else:
                no_access.append((ip, proto, sp.port))
        servers.append(VirtualServer(sp.protocol, ip, sp.port, scheduler, timeout,
                                     dests_for(sp.external_policy_local)))
        if ip not in local_ips:
            addresses.append(ip)
        frontends.append(ip)

    if sp.node_port and node_ips:
        if sp.protocol == "SCTP":
            entries = [ip_port(ip, proto, sp.node_port) for ip in node_ips]
        else:
            entries = [str(sp.node_port)]
        members += [(NODE_PORT[sp.protocol], e) for e in entries]
        if sp.external_policy_local:
            members += [(NODE_PORT_LOCAL[sp.protocol], e) for e in entries]
        for ip in node_ips:
            servers.append(VirtualServer(sp.protocol, ip, sp.node_port, scheduler, timeout,
                                         dests_for(sp.external_policy_local)))

    if sp.health_check_node_port:
        members.append((HEALTH_CHECK, str(sp.health_check_node_port)))

    if not cats.has_any:        # nothing anywhere: refuse at once (filter KUBE-IPVS-FILTER)
        members += [(NO_ENDPOINTS, ip_port(ip, proto, sp.port)) for ip in frontends]
        if sp.node_port:
            members += [(NO_ENDPOINTS, ip_port(ip, proto, sp.node_port)) for ip in node_ips]

    return PortIPVS(tuple(servers), tuple(dict.fromkeys(addresses)), tuple(dict.fromkeys(members)),
                    tuple(no_access))


# ---- the sum of all ports ---------------------------------------------------------------------------

class Aggregate:
    """Every port's PortIPVS summed up, refcounted so that one port can be added or
    removed (a partial sync) and the kernel objects it touched recomputed.

    A virtual server key claimed by two ports (two Services on one external IP and
    port: a conflict the API allows) goes to the first port name in sort order."""

    def __init__(self):
        self.ports = {}                         # ServicePortName -> PortIPVS
        self.vs_owners = {}                     # key -> {name: VirtualServer}
        self.addresses = Counter()
        self.members = {name: Counter() for name in SETS}
        self.no_node_access = Counter()

    def add(self, name, port):
        self.ports[name] = port
        for vs in port.servers:
            self.vs_owners.setdefault(vs.key, {})[name] = vs
        self.addresses.update(port.addresses)
        for set_name, member in port.members:
            self.members[set_name][member] += 1
        self.no_node_access.update(port.no_node_access)

    def remove(self, name):
        port = self.ports.pop(name, None)
        if port is None:
            return None
        for vs in port.servers:
            owners = self.vs_owners[vs.key]
            owners.pop(name, None)
            if not owners:
                del self.vs_owners[vs.key]
        self.addresses.subtract(port.addresses)
        for addr in port.addresses:
            if self.addresses[addr] <= 0:
                del self.addresses[addr]
        for set_name, member in port.members:
            counter = self.members[set_name]
            counter[member] -= 1
            if counter[member] <= 0:
                del counter[member]
        self.no_node_access.subtract(port.no_node_access)
        for entry in port.no_node_access:
            if self.no_node_access[entry] <= 0:
                del self.no_node_access[entry]
        return port

    def server(self, key):
        owners = self.vs_owners.get(key)
        return owners[min(owners)] if owners else None

    def servers(self):
        return {key: owners[min(owners)] for key, owners in self.vs_owners.items()}

    def set_members(self):
        """{set: frozenset(members)}, KUBE-IPVS-IPS (the bound addresses) included."""
        out = {name: frozenset(c) for name, c in self.members.items()}
        out[IPVS_IPS] = frozenset(_canonical_ip(a) for a in self.addresses)
        return out

    def nonempty(self):
        out = {name for name, c in self.members.items() if c}
        if self.addresses:
            out.add(IPVS_IPS)
        return frozenset(out)


# ---- iptables -------------------------------------------------------------------------------------------

NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ")
FILTER_CHAINS = ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL",
                 "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER")
# Chains the iptables mode has too (same names) are rules.SHARED_CHAINS: cleanup() leaves
# them to it when it is there. Chains only this mode has:
OWN_CHAINS = {NAT: ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"),
              FILTER: ("KUBE-NODE-PORT", "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER")}
# Jumps from the built-in chains: (table, chain, rule text after "-A <chain> "); those the
# iptables mode has too are rules.SHARED_JUMPS (cleanup() keeps them while it is there).
JUMPS = (
    (NAT, "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    (NAT, "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    (NAT, "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'),
    (FILTER, "INPUT", '-m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER'),
    (FILTER, "INPUT", '-m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL'),
    (FILTER, "INPUT", '-m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT'),
    (FILTER, "FORWARD", '-m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL'),
    (FILTER, "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    (FILTER, "OUTPUT", '-m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER'),
)


def _match_set(set_name, dirs, negate=False):
    return ("-m", "set") + (("!",) if negate else ()) + ("--match-set", set_name, dirs)


def _set_rule(chain, set_name, dirs, jump, proto=None, src=None, not_src=False, extra=(), comment=True):
    return rule(chain, jump, src=src, not_src=not_src, proto=proto,
                comment=SETS[set_name][1] if comment else None, matches=_match_set(set_name, dirs) + tuple(extra))


def render_rules(nonempty, config, no_node_access=()):
    """The IPVS mode's iptables rules, {table: {chain: (rules...)}}, in iptables-save's
    canonical form. Depends only on which sets have members (and the flags)."""
    mark = "0x%x" % MASQ_MARK
    lo = "::1/128" if config.family == 6 else "127.0.0.0/8"
    nat = {c: [] for c in NAT_CHAINS}
    filt = {c: [] for c in FILTER_CHAINS}

    svc = nat["KUBE-SERVICES"]
    svc.append("-A KUBE-SERVICES -s %s -j RETURN" % lo)
    if LOOP_BACK in nonempty:
        nat["KUBE-POSTROUTING"].append(_set_rule("KUBE-POSTROUTING", LOOP_BACK, "dst,dst,src", "MASQUERADE"))
    if LB in nonempty:
        svc.append(_set_rule("KUBE-SERVICES", LB, "dst,dst", "KUBE-LOAD-BALANCER"))
    if LB_LOCAL in nonempty:
        nat["KUBE-LOAD-BALANCER"].append(_set_rule("KUBE-LOAD-BALANCER", LB_LOCAL, "dst,dst", "RETURN"))
    for proto in ("TCP", "UDP", "SCTP"):
        dirs = "dst,dst" if proto == "SCTP" else "dst"
        if NODE_PORT_LOCAL[proto] in nonempty:
            nat["KUBE-NODE-PORT"].append(_set_rule("KUBE-NODE-PORT", NODE_PORT_LOCAL[proto], dirs, "RETURN",
                                                   proto=proto.lower()))
        if NODE_PORT[proto] in nonempty:
            nat["KUBE-NODE-PORT"].append(_set_rule("KUBE-NODE-PORT", NODE_PORT[proto], dirs, "KUBE-MARK-MASQ",
                                                   proto=proto.lower()))
    if LB_FW in nonempty:
        filt["KUBE-PROXY-FIREWALL"].append(_set_rule("KUBE-PROXY-FIREWALL", LB_FW, "dst,dst",
                                                     "KUBE-SOURCE-RANGES-FIREWALL"))
    for name in (LB_SOURCE_CIDR, LB_SOURCE_IP):
        if name in nonempty:
            filt["KUBE-SOURCE-RANGES-FIREWALL"].append(_set_rule("KUBE-SOURCE-RANGES-FIREWALL", name,
                                                                 "dst,dst,src", "RETURN"))
    if CLUSTER_IP in nonempty:
        if config.masquerade_all:
            svc.append(_set_rule("KUBE-SERVICES", CLUSTER_IP, "dst,dst", "KUBE-MARK-MASQ"))
        elif config.cluster_cidr:
            # off-cluster sources to a Service IP are masqueraded (the reply must come back here)
            svc += [_set_rule("KUBE-SERVICES", CLUSTER_IP, "dst,dst", "KUBE-MARK-MASQ", src=cidr, not_src=True)
                    for cidr in config.cluster_cidr]
        else:
            # no pod CIDR known: at least the node's own connections (whose source is then a VIP)
            svc.append(_set_rule("KUBE-SERVICES", CLUSTER_IP, "src,dst", "KUBE-MARK-MASQ"))
    external_only = ("-m", "physdev", "!", "--physdev-is-in", "-m", "addrtype", "!", "--src-type", "LOCAL")
    to_local = ("-m", "addrtype", "--dst-type", "LOCAL")
    if EXTERNAL_IP in nonempty:
        svc.append(_set_rule("KUBE-SERVICES", EXTERNAL_IP, "dst,dst", "KUBE-MARK-MASQ"))
    for name in (EXTERNAL_IP, EXTERNAL_IP_LOCAL):
        if name in nonempty:
            svc.append(_set_rule("KUBE-SERVICES", name, "dst,dst", "ACCEPT", extra=external_only))
            svc.append(_set_rule("KUBE-SERVICES", name, "dst,dst", "ACCEPT", extra=to_local))
    svc.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    nat["KUBE-LOAD-BALANCER"].append("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ")
    for name in (CLUSTER_IP, LB):       # IPVS takes these: no further nat rule may claim them
        if name in nonempty:
            svc.append(_set_rule("KUBE-SERVICES", name, "dst,dst", "ACCEPT", comment=False))
    nat["KUBE-POSTROUTING"] += [
        "-A KUBE-POSTROUTING -m mark ! --mark %s/%s -j RETURN" % (mark, mark),
        "-A KUBE-POSTROUTING -j MARK --set-xmark %s/0x0" % mark,
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        + " --random-fully"]
    nat["KUBE-MARK-MASQ"].append("-A KUBE-MARK-MASQ -j MARK --set-xmark %s/%s" % (mark, mark))

    filt["KUBE-SOURCE-RANGES-FIREWALL"].append("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    for ip, proto, port in sorted(no_node_access):
        filt["KUBE-IPVS-OUT-FILTER"].append(
            "-A KUBE-IPVS-OUT-FILTER -s %s -m ipvs --vproto %d --vaddr %s --vport %d -j DROP"
            % (_host(ip), {"tcp": 6, "udp": 17, "sctp": 132}[proto], ip, port))
    filt["KUBE-FORWARD"] += [
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark %s/%s -j ACCEPT'
        % (mark, mark),
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        '--ctstate RELATED,ESTABLISHED -j ACCEPT']
    filt["KUBE-NODE-PORT"].append(_set_rule("KUBE-NODE-PORT", HEALTH_CHECK, "dst", "ACCEPT"))
    flt = filt["KUBE-IPVS-FILTER"]
    if NO_ENDPOINTS in nonempty:
        flt.append(rule("KUBE-IPVS-FILTER", "REJECT --reject-with " + ("icmp-port-unreachable" if config.family == 4
                                                                        else "icmp6-port-unreachable"),
                        comment=SETS[NO_ENDPOINTS][1],
                        matches=("-m", "conntrack", "--ctstate", "NEW") + _match_set(NO_ENDPOINTS, "dst,dst")))
    for name, dirs in ((LB, "dst,dst"), (CLUSTER_IP, "dst,dst"), (EXTERNAL_IP, "dst,dst"),
                       (EXTERNAL_IP_LOCAL, "dst,dst"), (HEALTH_CHECK, "dst")):
        flt.append(_set_rule("KUBE-IPVS-FILTER", name, dirs, "RETURN", comment=False))
    # anything else to a Service IP (another port of it) must not reach the node's own sockets
    flt.append(rule("KUBE-IPVS-FILTER", "REJECT --reject-with " + ("icmp-port-unreachable" if config.family == 4
                                                                    else "icmp6-port-unreachable"),
                    matches=("-m", "conntrack", "--ctstate", "NEW") + _match_set(IPVS_IPS, "dst")))
    return {NAT: {c: tuple(r) for c, r in nat.items()}, FILTER: {c: tuple(r) for c, r in filt.items()}}


def _host(ip):
    return "%s/%d" % (ip, 128 if ":" in ip else 32)


def rules_count(rules):
    return {table: sum(len(r) for r in chains.values()) for table, chains in rules.items()}


def rules_restore_input(new, old=None):
    """iptables-restore --noflush input rewriting the chains of `new` that differ from `old`
    ({table: {chain: rules}}, e.g. parsed from the kernel); '' when nothing differs."""
    lines = []
    for table in (FILTER, NAT):
        before = (old or {}).get(table, {})
        write = [c for c, rules in new.get(table, {}).items() if before.get(c) != rules]
        if not write:
            continue
        lines.append("*" + table)
        lines += [":%s - [0:0]" % c for c in write]
        for chain in write:
            lines += new[table][chain]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def parse_saved(saved, table):
    """iptables-save text of one table -> {chain: (rules...)} of this mode's chains."""
    ours = NAT_CHAINS if table == NAT else FILTER_CHAINS
    return chain_rules(saved, ours.__contains__)


def _declared(saved):
    return set(declared_chains(saved))


def jumps_input(saved_by_table):
    """Restore input declaring our missing chains and inserting our missing jumps ('' if none)."""
    lines = []
    for table, ours in ((FILTER, FILTER_CHAINS), (NAT, NAT_CHAINS)):
        saved = saved_by_table.get(table, "")
        declared, present = _declared(saved), set(saved.splitlines())
        body = [":%s - [0:0]" % c for c in ours if c not in declared]
        for t, chain, text in reversed(JUMPS):
            if t == table and "-A %s %s" % (chain, text) not in present:
                body.append("-I %s 1 %s" % (chain, text))
        if body:
            lines += ["*" + table] + body + ["COMMIT"]
    return "\n".join(lines) + "\n" if lines else ""


def _references_ours(line):
    """Whether a rule in a shared chain is this mode's: it matches one of our sets or jumps
    to one of our own chains."""
    parts = line.split()
    if "--match-set" in parts and parts[parts.index("--match-set") + 1] in SETS:
        return True
    return "-j" in parts and parts[parts.index("-j") + 1] in ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER",
                                                             "KUBE-SOURCE-RANGES-FIREWALL")


def cleanup_input(saved_by_table):
    """Restore inputs removing this mode's rules and chains from iptables-save texts: first the
    rules that jump to our chains or match our sets, then (a second transaction: iptables-nft
    refuses to delete a chain in the transaction that deletes its last reference) our chains.
    [] when nothing of ours is there.

    When the iptables mode is there too (a switch back to it, or its restart, runs
    our cleanup), the chains both modes use keep everything but our rules in them."""
    shared_stays = other_mode_present("ipvs", saved_by_table)
    unlink, delete = [], []
    for table in (FILTER, NAT):
        saved = saved_by_table.get(table, "")
        declared, present = _declared(saved), saved.splitlines()
        body = []
        for t, chain, text in JUMPS:
            line = "-A %s %s" % (chain, text)
            if t == table and line in present and not (shared_stays and (t, chain, text) in SHARED_JUMPS):
                body.append("-D %s %s" % (chain, text))
        doomed = [c for c in OWN_CHAINS[table] if c in declared]
        if shared_stays:
            body += ["-D " + line[3:] for line in present if line.startswith("-A ")
                     and line.split(" ", 2)[1] in SHARED_CHAINS[table] and _references_ours(line)]
        else:
            doomed += [c for c in SHARED_CHAINS[table] if c in declared]
        if body:
            unlink += ["*" + table] + body + ["COMMIT"]
        if doomed:
            delete += ["*" + table] + [":%s - [0:0]" % c for c in doomed] + ["-X %s" % c for c in doomed] + ["COMMIT"]
    return ["\n".join(lines) + "\n" for lines in (unlink, delete) if lines]


# ---- ipsets ----------------------------------------------------------------------------------------------

def parse_ipset_save(text):
    """`ipset save` output -> {set: set(members)} for our sets (others are ignored)."""
    out = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[1] in SETS:
            if parts[0] == "create":
                out.setdefault(parts[1], set())
            elif parts[0] == "add" and len(parts) == 3:
                out.setdefault(parts[1], set()).add(parts[2].split(" ", 1)[0])
    return out


def ipset_restore_input(new, old, family=4):
    """`ipset restore -exist` input taking our sets from `old` ({set: members}, missing sets
    absent) to `new`; additions first (rules may already match them), then deletions."""
    creates = [create_line(name, family) for name in SETS if name not in old]
    adds, dels = [], []
    for name in SETS:
        want, have = new.get(name, frozenset()), old.get(name, frozenset())
        adds += ["add %s %s" % (name, m) for m in sorted(want - have)]
        dels += ["del %s %s" % (name, m) for m in sorted(have - want)]
    lines = creates + adds + dels
    return "\n".join(lines) + "\n" if lines else ""


# ---- kernel access (one place, so tests can replace it) ------------------------------------------------------

class Kernel:
    """The IPVS mode's view of the kernel in the current network namespace."""

    def __init__(self, family=4):
        self.family = family
        self.ipv6 = family == 6

    def ipvs(self):
        from podnet.net.ipvs import Ipvs
        return Ipvs()

    def netlink(self):
        from podnet.net.netlink import Netlink
        return Netlink()

    def iptables_save(self, table):
        from podnet.net import iptables
        return iptables.save(table, ipv6=self.ipv6)

    def iptables_restore(self, text):
        from podnet.net import iptables
        iptables.restore(text, ipv6=self.ipv6)

    def ipset(self, args, text=""):
        from podnet.proc import run
        proc = run(["ipset"] + list(args), text.encode())
        if proc.returncode != 0:
            raise RuntimeError("ipset %s failed: %s" % (" ".join(args), proc.stderr.decode(errors="replace").strip()))
        return proc.stdout.decode()

    def sysctl(self, name, value):
        from podnet.net import sysctl
        sysctl.write(name, value)


# ---- fault isolation ----------------------------------------------------------------------------------------

class PortsRefused(Exception):
    """The kernel refused objects of these service ports: [(name, error)]."""

    def __init__(self, bad):
        super().__init__(", ".join("%s: %s" % item for item in bad))
        self.bad = bad


def _kernel_refusal(e):
    """Whether an error from a netlink request is the kernel refusing that one object (EINVAL,
    EEXIST, ...), rather than a timeout or a kernel without IPVS."""
    from podnet.net.ipvs import IpvsUnavailable
    return isinstance(e, OSError) and e.errno is not None and not isinstance(e, (TimeoutError, IpvsUnavailable))


def member_owners(agg):
    """{(set, member): {service port}} of every set member the aggregate wants."""
    owners = {}
    for name, port in agg.ports.items():
        for item in port.members:
            owners.setdefault(item, set()).add(name)
        for addr in port.addresses:
            owners.setdefault((IPVS_IPS, _canonical_ip(addr)), set()).add(name)
    return owners


# ---- the proxier ----------------------------------------------------------------------------------------------

@dataclass
class Applied:
    """What we know the kernel holds (as of the last sync)."""
    servers: dict = field(default_factory=dict)     # key -> (Service, {(ip, port): weight})
    addresses: set = field(default_factory=set)
    members: dict = field(default_factory=dict)     # set -> set(members)
    rules: dict = field(default_factory=dict)       # {table: {chain: rules}}


class IpvsProxier:
    """Applies the tracker's Syncs with IPVS (the current network namespace).

    scheduler: --ipvs-scheduler (rr, lc, sh, ...); grace_period: how long a removed
    real server with connections keeps weight 0 before it is deleted anyway;
    graceful_interval: how often setup()'s background thread reaps drained real
    servers (None: no thread; they are reaped at each sync)."""
    mode = "ipvs"

    def __init__(self, config: Config, scheduler: str | None = None, grace_period: float = GRACE_PERIOD,
                 graceful_interval: float | None = GRACEFUL_INTERVAL, kernel: Kernel | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.scheduler = scheduler or config.ipvs_scheduler or DEFAULT_SCHEDULER
        self.grace_period = grace_period
        self.graceful_interval = graceful_interval
        self.kernel = kernel or Kernel(config.family)
        self.clock = clock
        self.agg = Aggregate()
        # ServicePortName -> (ServicePort, endpoints) rendered
        self.inputs: dict[ServicePortName, tuple[model.ServicePort, tuple[Endpoint, ...]]] = {}
        self.applied = Applied()
        self.terminating: dict[tuple[tuple[str, str, int], tuple[str, int]], float] = {}  # (vs key, dest) -> since
        self.node_ips: tuple[str, ...] = ()
        self.local_ips: frozenset[str] = frozenset()
        self.synced = False
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.quarantine = Quarantine()          # service ports whose objects the kernel refused

    # ---- setup / cleanup ----

    def setup(self) -> None:
        """Check IPVS, set the sysctls it needs, create kube-ipvs0, our ipsets, chains and jumps
        (idempotent). A kernel without IPVS ends the process with one clear line."""
        from podnet.net.ipvs import IpvsUnavailable
        try:
            self.kernel.ipvs().close()
        except IpvsUnavailable as e:
            raise SystemExit("podnet kube-proxy: --proxy-mode ipvs: %s" % e.strerror) from None
        for name, value in SYSCTLS:
            self.kernel.sysctl(name, value)
        with self.kernel.netlink() as nl:
            self._ensure_dummy(nl)
        self._ensure_sets()
        text = jumps_input({t: self.kernel.iptables_save(t) for t in (FILTER, NAT)})
        if text:
            self.kernel.iptables_restore(text)
        if self.graceful_interval and (self._thread is None or not self._thread.is_alive()):
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._graceful_loop, name="ipvs-graceful", daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()

    def cleanup(self) -> None:
        """Remove every virtual server, kube-ipvs0, our chains, jumps and ipsets. Safe on a
        kernel without IPVS (nothing of ours can be there) and with the iptables mode's
        rules present (it keeps the chains it shares with us)."""
        from podnet.net.ipvs import IpvsUnavailable
        self.stop()
        had_services = False
        try:
            with self.kernel.ipvs() as ipvs:
                if ipvs.services():
                    had_services = True
                    ipvs.flush()
        except IpvsUnavailable:
            pass
        with self.kernel.netlink() as nl:
            link = nl.link(DUMMY)
            if link is not None:
                nl.del_link(link.index)
        try:
            existing = set(self.kernel.ipset(["list", "-n"]).split())
        except (OSError, RuntimeError) as e:       # no ipset tool, or no ipset in the kernel
            log.debug("ipset: %s", e)
            existing = set()
        ours = [name for name in SETS if name in existing]
        if link is None and not ours and not had_services:
            # IPVS mode was never here (setup() always makes kube-ipvs0 and the sets): skip
            # reading the tables back, which costs ~2 s at 10k Services on every proxy start
            self.synced = False
            return
        for text in cleanup_input({t: self.kernel.iptables_save(t) for t in (FILTER, NAT)}):
            self.kernel.iptables_restore(text)
        if ours:
            self.kernel.ipset(["restore", "-exist"], "".join("destroy %s\n" % n for n in ours))
        self.agg, self.inputs, self.applied, self.terminating = Aggregate(), {}, Applied(), {}
        self.synced = False
        self.quarantine = Quarantine()

    def _ensure_dummy(self, nl):
        link = nl.link(DUMMY)
        if link is None:
            nl.add_dummy(DUMMY)
            link = nl.link(DUMMY)
        return link

    def _ensure_sets(self):
        existing = set(self.kernel.ipset(["list", "-n"]).split())
        missing = [create_line(name, self.config.family) for name in SETS if name not in existing]
        if missing:
            self.kernel.ipset(["restore", "-exist"], "\n".join(missing) + "\n")

    # ---- syncing ----

    def sync(self, sync: Sync) -> SyncResult:
        """Apply a Sync. When the kernel refuses a service port's objects (a virtual server,
        real server or address over netlink, its ipset members: PortsRefused), those ports
        are quarantined and a full sync (which reads the kernel back, so whatever the
        interrupted one did is taken into account) applies everything else, with them at
        their fallback."""
        started = self.clock()
        sync = self.quarantine.effective(sync)
        full = sync.full or not self.synced
        bad: list[tuple[ServicePortName, str]] = []
        refused = 0
        with self.lock:
            try:
                state = sync.state
                while True:
                    try:
                        ops = self._full(state) if full else self._partial(state, sync.changed)
                        break
                    except PortsRefused as e:
                        refused += 1
                        new = [item for item in e.bad if item[0] not in dict(bad)]
                        if not new or refused > MAX_ISOLATION_ROUNDS:
                            raise RuntimeError("the kernel keeps refusing service ports' objects: %s" % e) from None
                        bad += new
                        log.warning("the kernel refused objects of %s: a full sync without them",
                                    ", ".join(str(name) for name, _ in e.bad))
                        state = self.quarantine.fallback_state(sync, [name for name, _ in bad])
                        full = True
            except Exception:
                self.synced = False
                raise
            self.synced = True
        quarantined = self.quarantine.add(sync, bad)
        deleted = clear_stale_udp_flows(sync, self.config.family == 6)
        # chains_written: what a full sync found different (virtual and real servers, addresses,
        # set members, restores); 0 means the kernel held exactly the desired state
        return SyncResult(full, self.clock() - started, len(sync.changed), rules=rules_count(self.applied.rules),
                          conntrack_deleted=deleted, chains_written=ops if full else None, refused=refused,
                          quarantined=quarantined, in_quarantine=len(self.quarantine))

    def _restore_members(self, text):
        """`ipset restore -exist` of add/del lines; when refused, find the service ports whose
        lines it refuses (proxier.isolate; re-applying a line is harmless with -exist) and
        raise PortsRefused."""
        try:
            self.kernel.ipset(["restore", "-exist"], text)
            return
        except REFUSED:
            pass
        owners = member_owners(self.agg)
        by_port, common = {}, []
        for line in text.splitlines():
            parts = line.split(" ", 2)
            names = owners.get((parts[1], parts[2].split(" ", 1)[0])) if parts[0] == "add" and len(parts) == 3 else None
            if names:
                for name in names:
                    by_port.setdefault(name, []).append(line)
            else:
                common.append(line)         # creates, deletions: nobody's in particular

        def trial(names):
            lines = common + [line for name in names for line in by_port[name]]
            self.kernel.ipset(["restore", "-exist"], "\n".join(dict.fromkeys(lines)) + "\n")

        def control():
            if common:
                self.kernel.ipset(["restore", "-exist"], "\n".join(common) + "\n")
            else:
                self.kernel.ipset(["list", "-n"])

        found = isolate(sorted(by_port), trial, control)
        if found.bad:
            raise PortsRefused(found.bad)
        self.kernel.ipset(["restore", "-exist"], text)      # every part went through: the whole must

    def _guarded(self, key_names, request, *args):
        """Run one netlink request for an object of `key_names` (service ports); the kernel
        refusing it raises PortsRefused naming them."""
        try:
            return request(*args)
        except OSError as e:
            if not _kernel_refusal(e) or not key_names:
                raise
            raise PortsRefused([(name, one_line(e)) for name in sorted(key_names)]) from None

    def _render(self, name, state):
        sp, eps = state.service_ports[name], state.endpoints_for(name)
        self.inputs[name] = (sp, eps)
        return render_port(sp, eps, self.config, self.node_ips, self.local_ips, self.scheduler)

    def _node_addresses(self, nl):
        """(addresses NodePorts answer on, every address outside kube-ipvs0)."""
        from podnet.net.ip import AF_INET, AF_INET6
        dummy = nl.link(DUMMY)
        fam = AF_INET if self.config.family == 4 else AF_INET6
        local = [str(a.net.ip) for a in nl.addrs(family=fam) if dummy is None or a.index != dummy.index]
        if self.config.nodeport_addresses:
            node = tuple(self.config.nodeport_addresses)
        else:
            usable = {ip for ip in local if not (ipaddress.ip_address(ip).is_loopback or
                                                 ipaddress.ip_address(ip).is_link_local)}
            node = tuple(sorted(usable, key=ipaddress.ip_address))
        return node, frozenset(local)

    def _full(self, state):
        """Render every port (unchanged ones from the cache), read the kernel back, and
        change what differs from the desired state."""
        ops = 0
        with self.kernel.netlink() as nl, self.kernel.ipvs() as ipvs:
            dummy = self._ensure_dummy(nl)
            addresses = self._node_addresses(nl)
            cache, inputs = self.agg.ports, self.inputs
            if addresses != (self.node_ips, self.local_ips):
                cache = {}
                self.node_ips, self.local_ips = addresses
            self.agg, self.inputs = Aggregate(), {}
            for name in sorted(state.service_ports):
                port = cache.get(name)
                if port is not None and inputs.get(name) == (state.service_ports[name], state.endpoints_for(name)):
                    self.inputs[name] = inputs[name]
                else:
                    port = self._render(name, state)
                self.agg.add(name, port)

            # ipsets first: the rules written below may match members added here
            want = self.agg.set_members()
            text = ipset_restore_input(want, parse_ipset_save(self.kernel.ipset(["save"])), self.config.family)
            if text:
                self._restore_members(text)
                ops += text.count("\n")
            self.applied.members = {name: set(members) for name, members in want.items()}

            # virtual servers and their real servers
            table = ipvs.table()
            desired = self.agg.servers()
            self.applied.servers = {}
            now = self.clock()
            for key in sorted(desired):
                ops += self._guarded(self.agg.vs_owners.get(key), self._apply_server, ipvs, key, desired[key],
                                     table.get(key), now)
            for key in sorted(set(table) - set(desired)):
                ipvs.del_service(table[key][0])
                ops += 1
            for key in {key for key, _ in self.terminating} - set(desired):
                self._forget_terminating(key)

            ops += self._apply_addresses(nl, dummy, self._bound(nl, dummy), set(self.agg.addresses))

            # iptables: our chains and jumps where missing, then the chains whose rules differ
            saved = {t: self.kernel.iptables_save(t) for t in (FILTER, NAT)}
            rules = render_rules(self.agg.nonempty(), self.config, tuple(self.agg.no_node_access))
            for text in (jumps_input(saved), rules_restore_input(rules, {t: parse_saved(saved[t], t) for t in saved})):
                if text:
                    self.kernel.iptables_restore(text)
                    ops += 1
            self.applied.rules = rules
            ops += self._reap(ipvs, self.clock())
        return ops

    def _partial(self, state, changed):
        """Only the changed ports: their virtual servers, addresses and set members (the
        iptables rules only if a set became empty or non-empty)."""
        ops = 0
        touched_vs, touched_addr, touched = set(), set(), {}
        for name in sorted(changed):
            old = self.agg.remove(name)
            self.inputs.pop(name, None)
            new = None
            if name in state.service_ports:
                new = self._render(name, state)
                self.agg.add(name, new)
            for port in (old, new):
                if port is not None:
                    touched_vs.update(vs.key for vs in port.servers)
                    touched_addr.update(port.addresses)
                    for set_name, member in port.members:
                        touched.setdefault(set_name, set()).add(member)
        if touched_addr:
            touched.setdefault(IPVS_IPS, set()).update(_canonical_ip(a) for a in touched_addr)

        want = self.agg.set_members()
        adds, dels = [], []
        for name in SETS:
            applied = self.applied.members.setdefault(name, set())
            for member in sorted(touched.get(name, ())):
                if member in want[name] and member not in applied:
                    adds.append("add %s %s" % (name, member))
                    applied.add(member)
                elif member not in want[name] and member in applied:
                    dels.append("del %s %s" % (name, member))
                    applied.discard(member)
        if adds or dels:
            self._restore_members("\n".join(adds + dels) + "\n")
            ops += len(adds) + len(dels)

        with self.kernel.ipvs() as ipvs:
            now = self.clock()
            for key in sorted(touched_vs):
                want_vs, have = self.agg.server(key), self.applied.servers.get(key)
                if want_vs is None:
                    if have is not None:
                        ipvs.del_service(have[0])
                        del self.applied.servers[key]
                        self._forget_terminating(key)
                        ops += 1
                    continue
                kernel = None if have is None else (have[0], {d.key: d for d in ipvs.dests(have[0])})
                ops += self._guarded(self.agg.vs_owners.get(key), self._apply_server, ipvs, key, want_vs, kernel,
                                     now)
            if touched_addr:
                with self.kernel.netlink() as nl:
                    dummy = self._ensure_dummy(nl)
                    bound = set(self.applied.addresses)
                    want_addr = (bound - touched_addr) | {a for a in touched_addr if self.agg.addresses.get(a)}
                    ops += self._apply_addresses(nl, dummy, bound, want_addr)
            rules = render_rules(self.agg.nonempty(), self.config, tuple(self.agg.no_node_access))
            text = rules_restore_input(rules, self.applied.rules)
            if text:
                self.kernel.iptables_restore(text)
                ops += 1
            self.applied.rules = rules
            ops += self._reap(ipvs, self.clock())
        return ops

    def _apply_server(self, ipvs, key, want, kernel, now):
        """Make virtual server `key` as `want` says. kernel: (Service, {dest key: Dest}) as
        dumped, or None. Returns the number of changes."""
        ops = 0
        svc = want.service()
        if kernel is None:
            ipvs.add_service(svc)
            current = {}
            ops += 1
        else:
            current = kernel[1]
            if kernel[0].settings() != svc.settings():
                ipvs.update_service(svc)
                ops += 1
        from podnet.net.ipvs import Dest
        weights = {}
        for ip, port in sorted(want.dests):
            have = current.get((ip, port))
            if have is None:
                ipvs.add_dest(svc, Dest(ip, port))
                ops += 1
            elif have.weight != 1:
                ipvs.update_dest(svc, Dest(ip, port))
                ops += 1
            self.terminating.pop((key, (ip, port)), None)
            weights[(ip, port)] = 1
        for dkey, dest in current.items():
            if dkey in want.dests:
                continue
            if want.protocol != "TCP" or dest.connections == 0:
                ipvs.del_dest(svc, dest)
                self.terminating.pop((key, dkey), None)
                ops += 1
                continue
            if dest.weight != 0:
                ipvs.update_dest(svc, Dest(dest.address, dest.port, weight=0))
                ops += 1
            self.terminating.setdefault((key, dkey), now)
            weights[dkey] = 0
        self.applied.servers[key] = (svc, weights)
        return ops

    def _forget_terminating(self, key):
        for item in [t for t in self.terminating if t[0] == key]:
            del self.terminating[item]

    def _reap(self, ipvs, now):
        """Delete terminating real servers that are drained or past the grace period."""
        ops = 0
        by_vs = {}
        for (key, dkey), since in self.terminating.items():
            by_vs.setdefault(key, []).append((dkey, since))
        for key, items in by_vs.items():
            have = self.applied.servers.get(key)
            if have is None:
                self._forget_terminating(key)
                continue
            svc = have[0]
            dests = {d.key: d for d in ipvs.dests(svc)}
            for dkey, since in items:
                dest = dests.get(dkey)
                if dest is None:
                    self.terminating.pop((key, dkey), None)
                    have[1].pop(dkey, None)
                    continue
                if dest.connections == 0 or now - since >= self.grace_period:
                    ipvs.del_dest(svc, dest)
                    self.terminating.pop((key, dkey), None)
                    have[1].pop(dkey, None)
                    ops += 1
        return ops

    def reap_terminating(self):
        """One pass of graceful removal (what the background thread does); returns deletions."""
        with self.lock:
            if not self.terminating:
                return 0
            with self.kernel.ipvs() as ipvs:
                return self._reap(ipvs, self.clock())

    def _graceful_loop(self):
        while not self._stop.wait(self.graceful_interval):
            try:
                self.reap_terminating()
            except Exception as e:          # keep trying: the next sync also reaps
                log.warning("graceful removal of real servers: %s", e)

    def _bound(self, nl, dummy):
        from podnet.net.ip import AF_INET, AF_INET6
        fam = AF_INET if self.config.family == 4 else AF_INET6
        return {str(a.net.ip) for a in nl.addrs(index=dummy.index, family=fam)}

    def _apply_addresses(self, nl, dummy, bound, want):
        """Bind `want` on kube-ipvs0 (/32 or /128, no prefix route), unbind the rest of `bound`."""
        from podnet.net.ip import IPNet, parse_ip
        ops = 0
        want = {_canonical_ip(a) for a in want}
        bound = {_canonical_ip(a) for a in bound}
        for addr in sorted(want - bound):
            ip = parse_ip(addr)
            try:
                nl.add_addr(dummy.index, IPNet(ip, ip.bits), nodad=ip.version == 6, noprefixroute=True)
            except OSError as e:
                if e.errno != 17:       # EEXIST: bound meanwhile
                    owners = sorted(n for n, port in self.agg.ports.items()
                                    if addr in {_canonical_ip(a) for a in port.addresses})
                    if _kernel_refusal(e) and owners:
                        raise PortsRefused([(name, one_line(e)) for name in owners]) from None
                    raise
            ops += 1
        for addr in sorted(bound - want):
            ip = parse_ip(addr)
            try:
                nl.del_addr(dummy.index, IPNet(ip, ip.bits))
            except OSError as e:
                if e.errno not in (99, 19):    # EADDRNOTAVAIL / ENODEV: already gone
                    raise
            ops += 1
        self.applied.addresses = want
        return ops
