"""One read-only snapshot of a node's kernel networking state, as plain data.

`take()` reads the network namespace it runs in (or `netns`) once, through
podnet/net: links, addresses, routes of every table, neighbours, FDB entries,
the sysctls that decide whether packets pass, the nftables ruleset as JSON,
the iptables rules of both backends, and who holds the xtables lock. Both
`podnet trace` and `podnet doctor` look at the kernel only through a
`Snapshot`, so their answers agree, and their logic is tested on snapshots
written as data (`Snapshot.from_dict`) without root.

Nothing here changes the kernel. A part that cannot be read (a tool missing,
a sysctl the kernel lacks) is left empty and named in `errors`, so one
unreadable part never hides the rest.
"""
from __future__ import annotations

import array
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from podnet.net import iptables, nft
from podnet.net.ip import AF_INET, AF_INET6
from podnet.net.netlink import (
    IFLA_VXLAN_ID,
    IFLA_VXLAN_LEARNING,
    IFLA_VXLAN_LINK,
    IFLA_VXLAN_LOCAL,
    IFLA_VXLAN_LOCAL6,
    IFLA_VXLAN_PORT,
    NTF_SELF,
    RTNH_F_ONLINK,
    Netlink,
)
from podnet.proc import run, which

ROUTE_TYPES = {0: "unspec", 1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
               6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
# rtnetlink protocol numbers (/etc/iproute2/rt_protos): who installed a route.
ROUTE_PROTOCOLS = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra",
                   10: "mrt", 11: "zebra", 12: "bird", 16: "dhcp", 42: "babel", 186: "bgp", 187: "isis",
                   188: "ospf", 189: "rip", 192: "eigrp"}
NUD_STATES = {0x01: "incomplete", 0x02: "reachable", 0x04: "stale", 0x08: "delay", 0x10: "probe",
              0x20: "failed", 0x40: "noarp", 0x80: "permanent", 0x00: "none"}

SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
TOOL_TIMEOUT = 30.0
# a full read of every rule: iptables-save of kube-proxy's nat table grows faster than linearly
# with iptables-nft 1.8.9 here (0.7 s at 1,000 Services, 4.3 s at 3,000, about a minute at
# 10,000; `nft list ruleset` alike), so its bound is a scale's, not a tool call's
FULL_READ_TIMEOUT = 300.0


IPTABLES_NFT_TABLES = ("filter", "nat", "mangle", "raw", "security")


@dataclass(frozen=True)
class LinkState:
    index: int
    name: str
    kind: str                   # "veth", "bridge", "vxlan", "" (a physical or unknown kind)...
    mtu: int
    mac: str
    up: bool
    operstate: str
    master: str = ""            # the bridge (or bond) it is a port of
    vxlan_vni: int | None = None
    vxlan_local: str | None = None
    vxlan_port: int | None = None
    vxlan_learning: bool | None = None
    vxlan_dev: str = ""         # the underlay link the VXLAN device sends through
    tx_checksum: bool | None = None     # None: unknown (the driver does not answer)


@dataclass(frozen=True)
class AddrState:
    dev: str
    cidr: str                   # address with its prefix length, host bits kept: "10.244.1.1/24"
    family: int


@dataclass(frozen=True)
class RouteState:
    family: int
    dst: str                    # the masked prefix: "10.244.2.0/24", "0.0.0.0/0"
    table: int
    type: str                   # ROUTE_TYPES name
    protocol: int
    gateway: str | None = None
    dev: str = ""
    scope: int = 0
    metric: int = 0
    prefsrc: str | None = None
    mtu: int = 0
    onlink: bool = False

    @property
    def protocol_name(self) -> str:
        return ROUTE_PROTOCOLS.get(self.protocol, str(self.protocol))


RULE_ACTIONS = {1: "lookup", 2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable", 8: "prohibit"}


@dataclass(frozen=True)
class RuleState:
    """One `ip rule`: the packets it selects and the table they are looked up in."""
    family: int
    priority: int
    table: int
    action: str = "lookup"      # RULE_ACTIONS name
    src: str | None = None      # a prefix, "10.244.1.0/24"; None: from all
    dst: str | None = None
    iif: str = ""
    oif: str = ""
    fwmark: int = 0
    fwmask: int = 0
    invert: bool = False

    def text(self) -> str:
        words = ["%d:" % self.priority] + (["not"] if self.invert else [])
        words += ["from", self.src or "all"]
        if self.dst:
            words += ["to", self.dst]
        if self.fwmark or self.fwmask:
            words += ["fwmark", "%#x/%#x" % (self.fwmark, self.fwmask)]
        if self.iif:
            words += ["iif", self.iif]
        if self.oif:
            words += ["oif", self.oif]
        words += [self.action] + ([str(self.table)] if self.action == "lookup" else [])
        return " ".join(words)


@dataclass(frozen=True)
class NeighState:
    dev: str
    dst: str
    lladdr: str | None
    state: str                  # NUD_STATES name, "|"-joined when several bits are set


@dataclass(frozen=True)
class FdbState:
    dev: str
    mac: str
    dst: str | None             # the remote VTEP of a VXLAN entry; None for a bridge port's
    state: str
    self_entry: bool            # NTF_SELF: in the device's own table (VXLAN), not the bridge's
    master: str = ""


@dataclass(frozen=True)
class Sysctls:
    ip_forward: int | None = None
    ipv6_forwarding: int | None = None
    rp_filter: dict[str, int] = field(default_factory=dict)        # "all", "default", then per link
    bridge_nf_call_iptables: int | None = None                     # None: br_netfilter absent here
    bridge_nf_call_ip6tables: int | None = None
    conntrack_count: int | None = None
    conntrack_max: int | None = None

    def effective_rp_filter(self, dev: str) -> int | None:
        """The rp_filter mode the kernel applies on `dev`: the larger of "all" and the link's own."""
        own = self.rp_filter.get(dev)
        every = self.rp_filter.get("all")
        if own is None and every is None:
            return None
        return max(own or 0, every or 0)


@dataclass(frozen=True)
class IpvsRealServer:
    """One real server of an IPVS virtual server (`ipvsadm -a`)."""
    address: str
    port: int
    weight: int = 1             # 0: draining (kube-proxy's graceful removal), takes no new connections
    fwd: int = 0                # forwarding method (IP_VS_CONN_F_*): 0 masquerade, 2 tunnel, 3 direct routing
    active: int = 0             # connections IPVS counts as active / inactive
    inactive: int = 0


@dataclass(frozen=True)
class IpvsVirtualServer:
    """One IPVS virtual server (`ipvsadm -A`) with its real servers."""
    protocol: str               # TCP | UDP | SCTP
    address: str
    port: int
    scheduler: str = "rr"
    flags: int = 0              # 0x1: persistent (kube-proxy's ClientIP affinity)
    timeout: int = 0            # persistence timeout, seconds
    real_servers: tuple[IpvsRealServer, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    links: tuple[LinkState, ...] = ()
    addrs: tuple[AddrState, ...] = ()
    routes: tuple[RouteState, ...] = ()
    neighbours: tuple[NeighState, ...] = ()
    fdb: tuple[FdbState, ...] = ()
    rules: tuple[RuleState, ...] = ()               # ip rules; () when not read (main table only)
    sysctls: Sysctls = field(default_factory=Sysctls)
    nft_ruleset: tuple[dict[str, Any], ...] = ()    # `nft -j list ruleset`, the metainfo entry dropped
    iptables_save: str = ""                         # the configured iptables (iptables-nft here)
    ip6tables_save: str = ""
    iptables_legacy_save: str = ""                  # the legacy backend's rules, if the tool exists
    xtables_lock_holders: tuple[tuple[int, str, float], ...] = ()   # (pid, command, seconds it has run)
    ipvs: tuple[IpvsVirtualServer, ...] = ()        # IPVS's virtual servers; () when the kernel has no IPVS
    errors: tuple[str, ...] = ()                    # parts that could not be read, and why

    # ---- lookups the commands share ----
    def link(self, name: str) -> LinkState | None:
        for link in self.links:
            if link.name == name:
                return link
        return None

    def addrs_of(self, dev: str) -> list[AddrState]:
        return [a for a in self.addrs if a.dev == dev]

    def routes_in(self, table: int = 254, family: int | None = AF_INET) -> list[RouteState]:
        return [r for r in self.routes if r.table == table and (family is None or r.family == family)]

    def fdb_of(self, dev: str) -> list[FdbState]:
        return [f for f in self.fdb if f.dev == dev]

    def neighbours_of(self, dev: str) -> list[NeighState]:
        return [n for n in self.neighbours if n.dev == dev]

    def nft_tables(self) -> list[tuple[str, str]]:
        return [(o["table"]["family"], o["table"]["name"]) for o in self.nft_ruleset if "table" in o]

    def nft_chains(self) -> list[dict[str, Any]]:
        return [o["chain"] for o in self.nft_ruleset if "chain" in o]

    def nft_rules(self, family: str | None = None, table: str | None = None,
                  chain: str | None = None) -> list[dict[str, Any]]:
        return [o["rule"] for o in self.nft_ruleset if "rule" in o
                and (family is None or o["rule"]["family"] == family)
                and (table is None or o["rule"]["table"] == table)
                and (chain is None or o["rule"]["chain"] == chain)]

    def nft_forward_drop_chains(self) -> list[str]:
        """Base chains hooked on forward whose policy is drop, outside iptables-nft's own tables
        (those are judged from iptables-save): another firewall's, as "family table chain"."""
        return ["%s %s %s" % (c["family"], c["table"], c["name"]) for c in self.nft_chains()
                if c.get("hook") == "forward" and c.get("policy") == "drop"
                and not (c.get("family") in ("ip", "ip6") and c.get("table") in IPTABLES_NFT_TABLES)]

    def nft_sets(self, family: str | None = None, table: str | None = None) -> list[dict[str, Any]]:
        out = []
        for o in self.nft_ruleset:
            body = o.get("set") or o.get("map")
            if body is not None and (family is None or body["family"] == family) \
                    and (table is None or body["table"] == table):
                out.append(body)
        return out

    # ---- as data ----
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        """The inverse of to_dict; missing keys take their defaults (tests write only what they need)."""
        return cls(
            links=tuple(LinkState(**x) for x in data.get("links", ())),
            addrs=tuple(AddrState(**x) for x in data.get("addrs", ())),
            routes=tuple(RouteState(**x) for x in data.get("routes", ())),
            neighbours=tuple(NeighState(**x) for x in data.get("neighbours", ())),
            fdb=tuple(FdbState(**x) for x in data.get("fdb", ())),
            rules=tuple(RuleState(**x) for x in data.get("rules", ())),
            sysctls=Sysctls(**data.get("sysctls", {})),
            nft_ruleset=tuple(data.get("nft_ruleset", ())),
            iptables_save=data.get("iptables_save", ""),
            ip6tables_save=data.get("ip6tables_save", ""),
            iptables_legacy_save=data.get("iptables_legacy_save", ""),
            xtables_lock_holders=tuple((int(h[0]), str(h[1]), float(h[2]) if len(h) > 2 else 0.0)
                                      for h in data.get("xtables_lock_holders", ())),
            ipvs=tuple(IpvsVirtualServer(**dict(v, real_servers=tuple(IpvsRealServer(**r)
                                                                      for r in v.get("real_servers", ()))))
                       for v in data.get("ipvs", ())),
            errors=tuple(data.get("errors", ())),
        )


# ---- route lookups, as the kernel makes them (trace and doctor share them) ----------

def route_lookup(snap: Snapshot, ip: str, table: int = 254) -> RouteState | None:
    """The longest-prefix route for `ip` in one `table` (lowest metric among equals)."""
    addr = ipaddress.ip_address(ip)
    best: tuple[int, int, RouteState] | None = None
    for route in snap.routes:
        if route.table != table or route.type in ("broadcast", "multicast"):
            continue
        try:
            net = ipaddress.ip_network(route.dst, strict=False)
        except ValueError:
            continue
        if net.version != addr.version or addr not in net:
            continue
        key = (net.prefixlen, -route.metric)
        if best is None or key > best[:2]:
            best = (key[0], key[1], route)
    return best[2] if best else None


def _rule_selects(rule: RuleState, src: str, dst: str, iif: str) -> bool:
    """Whether an ip rule selects a packet src -> dst that came in by `iif` ("lo": made on this node).
    Packets are taken as unmarked and not bound to an oif (a forwarded pod packet is both)."""
    if rule.src and not src:        # a lookup whose source is not known: source-specific rules don't apply
        return False
    hit = True
    for prefix, ip in ((rule.src, src), (rule.dst, dst)):
        if prefix and prefix not in ("0.0.0.0/0", "::/0"):
            try:
                hit = hit and bool(ip) and ipaddress.ip_address(ip) in ipaddress.ip_network(prefix, strict=False)
            except ValueError:
                hit = False
    if rule.iif and rule.iif != iif:
        hit = False
    if rule.oif or (rule.fwmark & rule.fwmask) != 0:
        hit = False
    return hit != rule.invert


def route_decision(snap: Snapshot, dst: str, src: str = "", iif: str = "lo"
                   ) -> tuple[RouteState | None, RuleState | None]:
    """The route the kernel picks for src -> dst arriving by `iif`, following the ip rules in
    priority order (each `lookup` rule's table; a `throw` route or no match goes on to the next
    rule), and the rule that chose it. Without rules in the snapshot: the main table."""
    family = 6 if ":" in dst else 4
    rules = sorted((r for r in snap.rules if (r.family == AF_INET6) == (family == 6)), key=lambda r: r.priority)
    if not rules:
        return route_lookup(snap, dst), None
    i = 0
    while i < len(rules):
        rule = rules[i]
        i += 1
        if not _rule_selects(rule, src, dst, iif):
            continue
        if rule.action in ("blackhole", "unreachable", "prohibit"):
            return RouteState(AF_INET6 if family == 6 else AF_INET, "0.0.0.0/0" if family == 4 else "::/0",
                              rule.table, rule.action, 0), rule
        if rule.action != "lookup":
            continue
        if rule.table == 255:
            local = local_route(snap, dst)
            if local is not None:
                return local, rule
            continue
        route = route_lookup(snap, dst, rule.table)
        if route is not None and route.type != "throw":
            return route, rule
    return None, None


def rule_note(rule: RuleState | None) -> str:
    """How a route was chosen, when not by the default `lookup main` rule."""
    if rule is None or (rule.table == 254 and rule.action == "lookup" and not (rule.src or rule.dst or rule.iif)):
        return ""
    return "ip rule %s" % rule.text()


def local_route(snap: Snapshot, ip: str) -> RouteState | None:
    """The `local` table's route for ip: an address of this node."""
    for route in snap.routes:
        if route.table == 255 and route.type == "local" and route.dst.split("/")[0] == ip:
            return route
    return None


# ---- reading the kernel ------------------------------------------------------

def _nud(state: int) -> str:
    if state in NUD_STATES:
        return NUD_STATES[state]
    return "|".join(name for bit, name in NUD_STATES.items() if bit and state & bit)


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack("=I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def tx_checksum(dev: str) -> bool | None:
    """Whether `dev` offloads TX checksums (`ethtool -k`'s tx-checksumming), through the
    SIOCETHTOOL ioctl; None when the driver does not say."""
    value = array.array("I", [ETHTOOL_GTXCSUM, 0])
    ifreq = struct.pack("16sP", dev.encode()[:15], value.buffer_info()[0])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
    except OSError:
        return None
    return bool(value[1])


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def process_age(pid: int) -> float:
    """Seconds process `pid` has been running (0.0 if /proc does not say)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    # field 22 of stat (starttime, in clock ticks since boot) is the 20th after the command
    return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))


def read_sysctls(link_names: list[str]) -> Sysctls:
    rp = {}
    for name in ["all", "default"] + link_names:
        value = _read_int("/proc/sys/net/ipv4/conf/%s/rp_filter" % name)
        if value is not None:
            rp[name] = value
    return Sysctls(
        ip_forward=_read_int("/proc/sys/net/ipv4/ip_forward"),
        ipv6_forwarding=_read_int("/proc/sys/net/ipv6/conf/all/forwarding"),
        rp_filter=rp,
        bridge_nf_call_iptables=_read_int("/proc/sys/net/bridge/bridge-nf-call-iptables"),
        bridge_nf_call_ip6tables=_read_int("/proc/sys/net/bridge/bridge-nf-call-ip6tables"),
        conntrack_count=_read_int("/proc/sys/net/netfilter/nf_conntrack_count"),
        conntrack_max=_read_int("/proc/sys/net/netfilter/nf_conntrack_max"),
    )


def _save_all(tool: str, errors: list[str]) -> str:
    """Every table one iptables-save binary shows ('' when the tool is missing)."""
    if which(tool) is None:
        return ""
    try:
        proc = run([tool], timeout=FULL_READ_TIMEOUT)
    except (OSError, TimeoutError) as e:
        errors.append("%s: %s" % (tool, e))
        return ""
    if proc.returncode != 0:
        errors.append("%s: %s" % (tool, proc.stderr.decode(errors="replace").strip()[:300]))
    return proc.stdout.decode(errors="replace")


def read_ipvs(errors: list[str]) -> tuple[IpvsVirtualServer, ...]:
    """IPVS's virtual servers and their real servers, over generic netlink. A kernel without
    ip_vs has none, which is no error (its genl family is not even asked for: asking would make
    the kernel load the module); ip_vs present but unreadable (not root, say) is one."""
    from podnet.net.ipvs import Ipvs, IpvsUnavailable
    if not os.path.exists("/proc/net/ip_vs"):
        return ()
    try:
        with Ipvs() as ipvs:
            table = ipvs.table()
    except IpvsUnavailable:
        return ()
    except (OSError, TimeoutError) as e:
        errors.append("ipvs: %s" % e)
        return ()
    return tuple(IpvsVirtualServer(svc.protocol, svc.address, svc.port, svc.scheduler, svc.flags, svc.timeout,
                                   tuple(IpvsRealServer(d.address, d.port, d.weight, d.fwd, d.active, d.inactive)
                                         for _, d in sorted(dests.items())))
                 for _, (svc, dests) in sorted(table.items()))


@dataclass(frozen=True)
class RuleScope:
    """The rules one question needs, instead of every rule: at 10,000 Services a full read
    (`iptables-save`, `nft list ruleset`) takes most of a minute here, one chain a few ms.
    iptables/ip6tables: (table, chain, follow); nft: (kind, family, table, name, follow), kind
    chain, map or set; `follow`: the user chains its rules jump or go to are read too (never for a
    dispatch chain such as KUBE-SERVICES, which reaches every Service). nft_chain_families: the
    families whose chain lists (hooks and policies, no rules) are read."""
    iptables: tuple[tuple[str, str, bool], ...] = ()
    ip6tables: tuple[tuple[str, str, bool], ...] = ()
    nft: tuple[tuple[str, str, str, str, bool], ...] = ()
    nft_chain_families: tuple[str, ...] = ()
    ipvs: bool = True


MAX_SCOPED_CHAINS = 256     # a bound on what following jumps may read
# targets that are not chains (iptables -S of them would only fail)
IPTABLES_TARGETS = frozenset({"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "SNAT", "MASQUERADE", "MARK", "LOG",
                              "CONNMARK", "NOTRACK", "CT", "TRACE", "NFLOG", "REDIRECT", "TPROXY", "NFQUEUE",
                              "CHECKSUM", "TCPMSS", "CLASSIFY", "SET", "AUDIT", "QUEUE"})


def scoped_iptables(tool: str, wanted: tuple[tuple[str, str, bool], ...], errors: list[str]) -> str:
    """The chains asked for (and what they jump to, when followed), as iptables-save text."""
    if not wanted or which(tool) is None:
        return ""
    tables: dict[str, dict[str, list[str]]] = {}
    queue = list(wanted)
    seen: set[tuple[str, str]] = set()
    while queue and len(seen) < MAX_SCOPED_CHAINS:
        table, chain, follow = queue.pop(0)
        if (table, chain) in seen:
            continue
        seen.add((table, chain))
        try:
            proc = run([tool, "-w", "5", "-t", table, "-S", chain], timeout=TOOL_TIMEOUT)
        except (OSError, TimeoutError) as e:
            errors.append("%s -t %s -S %s: %s" % (tool, table, chain, e))
            continue
        if proc.returncode != 0:        # no such chain: the trace says what is missing
            continue
        lines = proc.stdout.decode(errors="replace").splitlines()
        tables.setdefault(table, {})[chain] = lines
        if follow:
            for line in lines:
                target = (iptables.jump_target(iptables.split_rule(line)) or "") if line.startswith("-A ") else ""
                if target and target not in IPTABLES_TARGETS:
                    queue.append((table, target, True))
    out = []
    for table, chains in tables.items():
        out.append("*%s" % table)
        for chain, lines in chains.items():
            head = lines[0].split() if lines else []
            out.append(":%s %s [0:0]" % (chain, head[2] if head[:1] == ["-P"] and len(head) > 2 else "-"))
        for lines in chains.values():
            out += [line for line in lines if line.startswith("-A ")]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def _nft_targets(obj: Any) -> list[str]:
    """The chains a rule's expressions jump or go to (verdict maps included)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("jump", "goto") and isinstance(value, dict) and "target" in value:
                found.append(str(value["target"]))
            else:
                found += _nft_targets(value)
    elif isinstance(obj, list):
        for value in obj:
            found += _nft_targets(value)
    return found


def scoped_nft(scope: RuleScope, errors: list[str]) -> list[dict[str, Any]]:
    """The nft objects asked for, as `nft -j list ruleset` would hold them (a table entry for
    each table something was found in, chains once)."""
    out: list[dict[str, Any]] = []
    chains: set[tuple[str, str, str]] = set()
    tables: list[tuple[str, str]] = []

    def keep(objs: list[dict[str, Any]]) -> None:
        for obj in objs:
            body = next(iter(obj.values()))
            if not isinstance(body, dict):
                continue
            where = (str(body.get("family", "")), str(body.get("table", body.get("name", ""))))
            if "table" in obj:
                where = (str(body.get("family", "")), str(body.get("name", "")))
            elif where not in tables:
                tables.append(where)
            if "chain" in obj:
                key = (where[0], where[1], str(body.get("name", "")))
                if key in chains:
                    continue
                chains.add(key)
            out.append(obj)
    for family in scope.nft_chain_families:
        try:
            keep(nft.list_json("chains", family))
        except (nft.NftError, OSError, TimeoutError, ValueError) as e:
            errors.append("nft list chains %s: %s" % (family, e))
    queue = list(scope.nft)
    seen: set[tuple[str, str, str, str]] = set()
    absent: set[tuple[str, str]] = set()
    while queue and len(seen) < MAX_SCOPED_CHAINS:
        kind, family, table, name, follow = queue.pop(0)
        if (kind, family, table, name) in seen or (family, table) in absent:
            continue
        seen.add((kind, family, table, name))
        try:
            objs = nft.list_json(kind, family, table, name)
        except (nft.NftError, OSError, TimeoutError, ValueError) as e:
            # not there: the trace says what is missing; a missing table answers for all its objects
            if "No such file" in str(e) and (family, table) not in tables:
                absent.add((family, table))
            continue
        keep(objs)
        if follow and kind == "chain":
            for obj in objs:
                if "rule" in obj:
                    queue += [("chain", family, table, target, True) for target in _nft_targets(obj["rule"])]
    return [{"table": {"family": f, "name": t}} for f, t in tables] + out


def read_nft_ruleset(errors: list[str]) -> list[dict[str, Any]]:
    """What `nft -j list ruleset` would say, minus the rules of iptables-nft's own tables (their
    chains, hooks and policies kept): those tables are read as iptables-save text anyway, and
    nft's JSON of kube-proxy's iptables nat table costs about a minute at 10,000 Services here,
    against ~1 s for the chain list and each other table on its own."""
    try:
        chains = nft.list_json("chains", timeout=FULL_READ_TIMEOUT)
    except (nft.NftError, OSError, TimeoutError, ValueError) as e:
        errors.append("nft list chains: %s" % e)
        return []
    tables: list[tuple[str, str]] = []
    for obj in chains:
        body = obj.get("chain") or {}
        where = (str(body.get("family", "")), str(body.get("table", "")))
        if where not in tables:
            tables.append(where)
    out: list[dict[str, Any]] = []
    for family, table in tables:
        if family in ("ip", "ip6") and table in IPTABLES_NFT_TABLES:
            out.append({"table": {"family": family, "name": table}})
            out += [o for o in chains if (o["chain"].get("family"), o["chain"].get("table")) == (family, table)]
            continue
        try:
            out += nft.list_json("table", family, table, timeout=FULL_READ_TIMEOUT)
        except (nft.NftError, OSError, TimeoutError, ValueError) as e:
            errors.append("nft list table %s %s: %s" % (family, table, e))
    return out


def read_kernel(errors: list[str], with_rules: bool = True, scope: RuleScope | None = None) -> Snapshot:
    """Read the namespace this thread is in."""
    with Netlink() as nl:
        raw_links = nl.links()
        names = {link.index: link.name for link in raw_links}
        links = []
        for link in raw_links:
            vx: dict[str, Any] = {}
            if link.kind == "vxlan":
                d = link.info_data
                local = d.get(IFLA_VXLAN_LOCAL) or d.get(IFLA_VXLAN_LOCAL6)
                if local is not None:
                    fam = AF_INET if len(local) == 4 else AF_INET6
                    vx["vxlan_local"] = socket.inet_ntop(fam, local)
                vx["vxlan_vni"] = _u32(d.get(IFLA_VXLAN_ID))
                port = d.get(IFLA_VXLAN_PORT)
                vx["vxlan_port"] = struct.unpack("!H", port[:2])[0] if port else None
                learning = d.get(IFLA_VXLAN_LEARNING)
                vx["vxlan_learning"] = bool(learning[0]) if learning else None
                vx["vxlan_dev"] = names.get(_u32(d.get(IFLA_VXLAN_LINK)) or 0, "")
            links.append(LinkState(
                index=link.index, name=link.name, kind=link.kind, mtu=link.mtu, mac=link.mac, up=link.up,
                operstate=link.operstate, master=names.get(link.master, ""),
                tx_checksum=tx_checksum(link.name) if link.kind == "vxlan" else None, **vx))
        addrs = [AddrState(dev=names.get(a.index, str(a.index)), cidr=str(a.net), family=a.net.family)
                 for a in nl.addrs()]
        routes = []
        for family in (AF_INET, AF_INET6):
            for r in nl.routes(family=family, table=None):
                routes.append(RouteState(
                    family=r.family, dst=str(r.dst.masked()), table=r.table,
                    type=ROUTE_TYPES.get(r.type, str(r.type)), protocol=r.protocol,
                    gateway=str(r.gateway) if r.gateway is not None else None,
                    dev=names.get(r.oif, "") if r.oif else "", scope=r.scope, metric=r.priority,
                    prefsrc=str(r.prefsrc) if r.prefsrc is not None else None, mtu=r.mtu,
                    onlink=bool(r.flags & RTNH_F_ONLINK)))
        neighbours = [NeighState(dev=names.get(n.index, str(n.index)), dst=str(n.dst), lladdr=n.lladdr,
                                 state=_nud(n.state))
                      for family in (AF_INET, AF_INET6) for n in nl.neighbours(family=family)
                      if n.dst is not None]
        fdb = [FdbState(dev=names.get(f.index, str(f.index)), mac=f.lladdr or "",
                        dst=str(f.dst) if f.dst is not None else None, state=_nud(f.state),
                        self_entry=bool(f.flags & NTF_SELF), master=names.get(f.master or 0, ""))
               for f in nl.fdb()]
        rules = [RuleState(family=r.family, priority=r.priority, table=r.table,
                           action=RULE_ACTIONS.get(r.action, str(r.action)),
                           src=str(r.src.masked()) if r.src is not None else None,
                           dst=str(r.dst.masked()) if r.dst is not None else None,
                           iif=r.iifname, oif=r.oifname, fwmark=r.fwmark, fwmask=r.fwmask, invert=r.invert)
                 for family in (AF_INET, AF_INET6) for r in nl.rules(family)]
    sysctls = read_sysctls([link.name for link in links])
    ruleset: list[dict[str, Any]] = []
    saved = saved6 = legacy = ""
    ipvs: tuple[IpvsVirtualServer, ...] = ()
    if scope is not None:
        ruleset = scoped_nft(scope, errors)
        saved = scoped_iptables("iptables", scope.iptables, errors)
        saved6 = scoped_iptables("ip6tables", scope.ip6tables, errors)
        ipvs = read_ipvs(errors) if scope.ipvs else ()
    elif with_rules:
        ruleset = read_nft_ruleset(errors)
        saved = _save_all("iptables-save", errors)
        saved6 = _save_all("ip6tables-save", errors)
        if os.path.realpath(which("iptables-save") or "").endswith("legacy"):
            legacy = saved
        else:
            legacy = _save_all("iptables-legacy-save", errors)
        ipvs = read_ipvs(errors)
    holders = [(pid, command, process_age(pid)) for pid, command in iptables.lock_holders(iptables.lock_path())]
    return Snapshot(links=tuple(links), addrs=tuple(addrs), routes=tuple(routes), neighbours=tuple(neighbours),
                    fdb=tuple(fdb), rules=tuple(rules), sysctls=sysctls, nft_ruleset=tuple(ruleset),
                    iptables_save=saved, ip6tables_save=saved6, iptables_legacy_save=legacy,
                    xtables_lock_holders=tuple(holders), ipvs=ipvs, errors=tuple(errors))


def take(netns: str | None = None, with_rules: bool = True, scope: RuleScope | None = None) -> Snapshot:
    """A snapshot of the namespace this process is in, or of `netns` (a path such as
    /run/netns/x); `with_rules=False` skips nft and iptables (the costly part at scale), a
    `scope` reads only the rules it names."""
    errors: list[str] = []
    if netns is None:
        return read_kernel(errors, with_rules, scope)
    from podnet.net.netns import entered
    with entered(netns):
        return read_kernel(errors, with_rules, scope)


CLUSTER_KINDS = ("Service", "EndpointSlice", "NetworkPolicy", "Pod", "Namespace", "Node")


def cluster_objects(manifests: str | None = None, kubeconfig: str | None = None,
                    kinds: tuple[str, ...] = CLUSTER_KINDS) -> dict[str, list[dict[str, Any]]]:
    """The cluster's objects of `kinds`, listed once from the daemons' own sources: a manifests
    directory, or the API (kubeconfig; in a pod, its service account)."""
    out: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    if manifests is not None:
        from podnet.kube.events import RELIST, Event
        from podnet.kube.manifests import ManifestSource
        events: list[Event] = []
        ManifestSource(manifests, events.append, kinds=kinds).scan()
        for event in events:
            if event.type == RELIST:
                out[event.kind] = list(event.obj)
            else:
                out.setdefault(event.kind, []).append(event.obj)
        return out
    from podnet.kube.api import KubeApiSource
    source = KubeApiSource(lambda event: None, kubeconfig=kubeconfig, kinds=kinds)
    for kind in kinds:
        out[kind], _ = source.list(kind)
    return out


def rules_in_legacy(saved: str) -> int:
    """How many rules (`-A` lines) an iptables-save text holds."""
    return sum(1 for line in saved.splitlines() if line.startswith("-A "))
