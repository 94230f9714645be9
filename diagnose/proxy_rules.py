"""Where the kernel sends one Service port, in whichever mode kube-proxy runs.

`service_rules(snapshot, spn, sp)` reads a diagnose.snapshot.Snapshot and answers, as plain
data (`ServiceRules`), which mode holds the port (iptables, nftables, ipvs, or none), what
catches its ClusterIP:port (the nat KUBE-SERVICES rule, the `service-ips` map element, the
virtual server), and the endpoints ("ip:port") each of its policy chains DNATs or forwards
to, each with the exact rule:

  iptables   KUBE-SVC-<hash> (Cluster policy) and KUBE-SVL-<hash> (Local) jump to KUBE-SEP-<hash>
             chains, each with one `-j DNAT --to-destination ip:port` rule (iptables-save line)
  nftables   table ip/ip6 kube-proxy: service-<hash>-ns/name/proto/port and local-<...> go to
             endpoint-<...> chains, each with `dnat to ip:port` (the rule as `nft -f` takes it,
             printed from `nft -j list ruleset`'s JSON as `nft list` prints it)
  ipvs       the virtual server ClusterIP:port (and those of NodePorts, external and LB IPs),
             its real servers as `ipvsadm -a -t VIP:PORT -r IP:PORT -m -w 1`

Chain names come from kube_proxy's own naming functions, so they agree with what the
proxier writes by construction. One function per mode (`iptables_rules`, `nftables_rules`,
`ipvs_rules`) and the dispatcher; `active_modes()` says which modes' rules a node holds at
all, `stale_objects()` which per-Service chains or virtual servers belong to no Service port.

A snapshot is indexed once, on first use, and the index kept while the snapshot lives: the
nftables table and the virtual servers as dictionaries, the iptables nat table searched for
the few chains one trace asks about (~4 ms a search at 10,000 Services, 13 MB of text) and
split into chains once when more are asked (doctor): a Service costs dictionary lookups then,
never a scan of the 170k lines.
"""
from __future__ import annotations

import gc
import json
import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from diagnose.snapshot import IpvsVirtualServer, Snapshot
from kube_proxy import iptables as kp_iptables
from kube_proxy import nftables as kp_nftables
from kube_proxy.rules import MODE_CHAINS, NAT
from podnet.kube.endpointslices import Endpoint, ServicePortName

IPTABLES, NFTABLES, IPVS, NONE = "iptables", "nftables", "ipvs", "none"
MODES = (IPTABLES, NFTABLES, IPVS)
CLUSTER, LOCAL = "cluster", "local"
IPVS_DUMMY = "kube-ipvs0"           # kube_proxy.ipvs.DUMMY: the device IPVS mode binds Service IPs to
IPVS_PERSISTENT = 0x1               # podnet.net.ipvs.F_PERSISTENT

# kube_proxy's naming functions (untyped there), typed here once
_PortNamer = Callable[[ServicePortName], str]
_EndpointNamer = Callable[[ServicePortName, Endpoint], str]
IPT_SERVICE: _PortNamer = kp_iptables.service_chain
IPT_LOCAL: _PortNamer = kp_iptables.local_chain
IPT_ENDPOINT: _EndpointNamer = kp_iptables.endpoint_chain
NFT_SERVICE: _PortNamer = kp_nftables.service_chain
NFT_LOCAL: _PortNamer = kp_nftables.local_chain
NFT_ENDPOINT: _EndpointNamer = kp_nftables.endpoint_chain
NFT_IS_PORT_CHAIN: Callable[[str], bool] = kp_nftables.is_port_chain


# ---- the answer --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One endpoint the kernel sends to, and the rule that does it."""
    addr: str           # "10.244.1.5:8080" ("[fd00::5]:8080")
    rule: str           # iptables-save line, nft rule (`add rule ip kube-proxy CHAIN ...`), ipvsadm line
    chain: str = ""     # the endpoint chain (KUBE-SEP-..., endpoint-...); "" for an IPVS real server
    weight: int = 1     # IPVS: 0 while a real server drains (no new connections)


@dataclass(frozen=True)
class Dispatch:
    """One policy chain of a Service port (or, in IPVS mode, one virtual server)."""
    policy: str                     # CLUSTER | LOCAL: the traffic policy whose endpoints it holds
    name: str                       # KUBE-SVC-..., service-..., or the virtual server "TCP 10.96.0.10:80"
    present: bool                   # the kernel holds it
    targets: tuple[Target, ...] = ()

    def addrs(self) -> dict[str, Target]:
        """{"ip:port": Target} of the endpoints new connections go to."""
        return {t.addr: t for t in self.targets if t.weight > 0}


@dataclass(frozen=True)
class ServiceRules:
    """What the kernel does with one Service port in one mode."""
    mode: str                       # IPTABLES | NFTABLES | IPVS | NONE
    port: ServicePortName
    entry: str = ""                 # the rule / map element / virtual server catching ClusterIP:port
    entry_to: str = ""              # the chain (or virtual server) the entry sends to
    cluster: Dispatch | None = None
    local: Dispatch | None = None
    external: tuple[Dispatch, ...] = ()     # IPVS: the NodePort, external and LB IP virtual servers

    @property
    def holds(self) -> bool:
        return bool(self.entry) or any(d is not None and d.present for d in (self.cluster, self.local, *self.external))

    @property
    def dispatches(self) -> tuple[Dispatch, ...]:
        return tuple(d for d in (self.cluster, self.local, *self.external) if d is not None)

    def path(self, local_policy: bool, frontend: tuple[str, int] | None = None) -> Dispatch | None:
        """The dispatch a new connection goes through: under the Local policy (`local_policy`)
        or the Cluster one, to the ClusterIP or (`frontend`: address, port) to a NodePort or
        external address. iptables and nftables send both through the policy chain; IPVS has a
        virtual server per address, holding that address's policy's endpoints."""
        if self.mode != IPVS:
            return self.local if local_policy else self.cluster
        if frontend is not None:
            name = vs_name(self.port.protocol, *frontend)
            return next((d for d in self.external if d.name == name), None)
        return self.cluster or self.local


def vs_name(protocol: str, address: str, port: int) -> str:
    """A virtual server as `ipvsadm -L -n` names it: "TCP 10.96.0.10:80"."""
    return "%s %s" % (protocol, _hostport(address, port))


def _hostport(ip: str, port: int) -> str:
    return ("[%s]:%d" if ":" in ip else "%s:%d") % (ip, port)


# ---- indexing a snapshot once -------------------------------------------------------------------

_SERVICES_RULE = re.compile(r"^-A KUBE-SERVICES -d (\S+?)/(?:32|128) -p (\S+) .*--dport (\d+) -j (\S+)$")
_COMMENT = re.compile(r'--comment (?:"((?:[^"\\]|\\.)*)"|(\S+))')
_POLICY_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-")


class _IptablesIndex:
    """The nat table of one iptables-save text: kube-proxy's chains and the ClusterIP dispatch.

    A few lookups (one trace) search the text for the chains asked about: a search of 13 MB
    (10,000 Services) takes ~4 ms, splitting the table into chains ~200 ms. Past FULL_AFTER
    lookups, or for questions about every chain (doctor), the table is split once."""
    FULL_AFTER = 100

    def __init__(self, saved: str) -> None:
        self.text = saved
        self.regions: list[tuple[int, int]] = []        # the nat table's lines: [start, end), each after a "\n"
        self.heads: list[tuple[int, int]] = []          # ... up to its first rule: the chain declarations
        pos = 0 if saved.startswith("*nat\n") else _after(saved.find("\n*nat\n"))
        while pos >= 0:
            start = pos + len("*nat")                   # the "\n" ending the table's header
            end = saved.find("\nCOMMIT", start)
            end = len(saved) if end < 0 else end + 1
            self.regions.append((start, end))
            first_rule = saved.find("\n-A ", start, end)
            self.heads.append((start, end if first_rule < 0 else first_rule + 1))
            pos = _after(saved.find("\n*nat\n", end))
        self.lookups = 0
        self._declared: set[str] | None = None
        self._chains: dict[str, list[str]] = {}
        self._entries: dict[tuple[str, str, int], tuple[str, str]] = {}
        self._by_comment: dict[str, list[str]] | None = None

    def _find_lines(self, head: str, regions: list[tuple[int, int]] | None = None) -> Iterator[str]:
        """Every line starting with `head` (which starts with "\\n"), searched in the text."""
        for start, end in self.regions if regions is None else regions:
            pos = self.text.find(head, start, end)
            while pos >= 0:
                stop = self.text.find("\n", pos + 1, end)
                stop = end if stop < 0 else stop
                yield self.text[pos + 1:stop]
                pos = self.text.find(head, stop, end)

    # ---- the whole table, once ----
    def _full(self) -> set[str]:
        if self._declared is not None:
            return self._declared
        declared: set[str] = set()
        chains, entries = self._chains, self._entries
        # 60,000 new lists would have the collector walk the whole heap (the snapshot, the
        # cluster's objects) again and again: half the time of the split. They hold strings only.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for start, end in self.regions:
                for line in self.text[start + 1:end].splitlines():
                    if line.startswith(":"):
                        declared.add(line[1:line.find(" ")] if " " in line else line[1:])
                    elif line.startswith("-A KUBE-"):
                        chain = line[3:line.find(" ", 3)]
                        if chain == "KUBE-SERVICES":
                            found = _services_rule(line)
                            if found is not None:
                                entries.setdefault(found[0], (line, found[1]))
                        elif chain.startswith(("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-")):
                            chains.setdefault(chain, []).append(line)
        finally:
            if collecting:
                gc.enable()
        self._declared = declared
        return declared

    def _searching(self) -> bool:
        """Whether to search the text (few lookups so far) rather than split it up."""
        if self._declared is not None:
            return False
        self.lookups += 1
        if self.lookups <= self.FULL_AFTER:
            return True
        self._full()
        return False

    def declared(self) -> set[str]:
        return self._full()

    # ---- lookups ----
    def present(self, chain: str, rules: list[str] | None = None) -> bool:
        """Whether `chain` is declared or has rules (`rules`: its rules, when known)."""
        if rules:
            return True
        if self._searching():
            declared = next(self._find_lines("\n:%s " % chain, self.heads), None) is not None
            return declared or (rules is None and bool(self.rules(chain)))
        assert self._declared is not None
        return chain in self._declared or chain in self._chains

    def rules(self, chain: str) -> list[str]:
        if not self._searching():
            return self._chains.get(chain, [])
        return list(self._find_lines("\n-A %s " % chain))     # to the end: hand-written rules may not be together

    def entry(self, ip: str, proto: str, port: int) -> tuple[str, str]:
        """The nat KUBE-SERVICES rule catching ip:port/proto, and the chain it jumps to."""
        if not self._searching():
            return self._entries.get((ip, proto, port), ("", ""))
        for line in self._find_lines("\n-A KUBE-SERVICES -d %s/%d -p %s " % (ip, 128 if ":" in ip else 32, proto)):
            found = _services_rule(line)
            if found is not None and found[0] == (ip, proto, port):
                return line, found[1]
        return "", ""

    def dispatch(self, policy: str, chain: str) -> Dispatch:
        targets: list[Target] = []
        seen: set[str] = set()
        rules = self.rules(chain)
        for line in rules:
            sep = _jump_target(line)
            if sep.startswith("KUBE-SEP-") and sep not in seen:     # affinity rules jump there too
                seen.add(sep)
                targets.extend(self.endpoint(sep))
        return Dispatch(policy, chain, self.present(chain, rules), tuple(targets))

    def endpoint(self, sep: str) -> list[Target]:
        for line in self.rules(sep):
            _, found, rest = line.partition(" --to-destination ")
            if found and " -j DNAT" in line:
                return [Target(rest.split(" ", 1)[0], line, sep)]
        return []

    def commented(self, comment: str) -> list[str]:
        """KUBE-SEP chains whose DNAT rule carries `comment` (kube-proxy comments them with the
        service port's name, unless the cluster is large)."""
        if self._by_comment is None:
            self._full()
            self._by_comment = {}
            for chain, lines in self._chains.items():
                if not chain.startswith("KUBE-SEP-"):
                    continue
                for line in lines:
                    m = _COMMENT.search(line) if " -j DNAT" in line else None
                    if m is not None:
                        text = m.group(1).replace('\\"', '"') if m.group(1) is not None else m.group(2)
                        self._by_comment.setdefault(text, []).append(chain)
        return self._by_comment.get(comment, [])

    def holds_mode(self, mode: str) -> bool:
        """Whether chains only `mode` (iptables or ipvs) creates are declared here."""
        own, prefixes = MODE_CHAINS[mode]
        declared = self._full()
        return any(c in declared for c in own[NAT]) or bool(prefixes) and any(c.startswith(prefixes) for c in declared)


def _after(newline: int) -> int:
    """The position after a "\n" found at `newline`, or -1 if none was found."""
    return newline + 1 if newline >= 0 else -1


def _services_rule(line: str) -> tuple[tuple[str, str, int], str] | None:
    """A nat KUBE-SERVICES rule -> ((ip, proto, port), jump target), or None if it is not a
    rule for one address and port."""
    m = _SERVICES_RULE.match(line)
    return ((m.group(1), m.group(2), int(m.group(3))), m.group(4)) if m is not None else None


def _jump_target(line: str) -> str:
    _, found, rest = line.rpartition(" -j ")
    return rest.split(" ", 1)[0] if found else ""


class _NftIndex:
    """kube-proxy's table of one family in `nft -j list ruleset`: its chains, rules, dispatch map."""

    def __init__(self, ruleset: Iterable[dict[str, Any]], family: str) -> None:
        self.family = family
        self.present = False
        self.chains: set[str] = set()
        self.rules: dict[str, list[dict[str, Any]]] = {}
        self.entries: dict[tuple[str, str, int], str] = {}      # service-ips key -> its verdict's chain
        table = kp_nftables.TABLE
        for obj in ruleset:
            kind, body = next(iter(obj.items()))
            if not isinstance(body, dict) or body.get("family") != family or body.get("table", body.get("name")) \
                    != table:
                continue
            if kind == "table":
                self.present = True
            elif kind == "chain":
                self.chains.add(body["name"])
            elif kind == "rule":
                self.rules.setdefault(body["chain"], []).append(body)
            elif kind == "map" and body.get("name") == kp_nftables.SERVICE_IPS:
                for key, verdict in body.get("elem", ()):
                    if isinstance(key, dict) and "elem" in key:
                        key = key["elem"].get("val")
                    parts = key.get("concat") if isinstance(key, dict) else None
                    target = _verdict_target(verdict)
                    if parts and len(parts) == 3 and target:
                        self.entries[(str(parts[0]), str(parts[1]), int(parts[2]))] = target

    def dispatch(self, policy: str, chain: str) -> Dispatch:
        targets: list[Target] = []
        seen: set[str] = set()
        for rule in self.rules.get(chain, ()):
            exprs = rule.get("expr", ())
            ep = _verdict_target(exprs[-1]) if exprs else ""
            if ep.startswith("endpoint-") and ep not in seen:       # affinity rules go there too
                seen.add(ep)
                targets.extend(self._endpoint(ep))
        return Dispatch(policy, chain, chain in self.chains, tuple(targets))

    def _endpoint(self, chain: str) -> list[Target]:
        for rule in self.rules.get(chain, ()):
            for expr in rule.get("expr", ()):
                dnat = expr.get("dnat") if isinstance(expr, dict) else None
                if isinstance(dnat, dict) and "addr" in dnat:
                    addr = str(dnat["addr"])
                    addr = _hostport(addr, int(dnat["port"])) if "port" in dnat else addr
                    return [Target(addr, self.rule_text(rule), chain)]
        return []

    def rule_text(self, rule: dict[str, Any]) -> str:
        return "add rule %s %s %s %s" % (self.family, kp_nftables.TABLE, rule["chain"], nft_rule_text(rule))


def _verdict_target(expr: Any) -> str:
    if isinstance(expr, dict):
        for verdict in ("goto", "jump"):
            body = expr.get(verdict)
            if isinstance(body, dict):
                return str(body.get("target", ""))
    return ""


class _IpvsIndex:
    def __init__(self, servers: Iterable[IpvsVirtualServer]) -> None:
        self.servers: dict[tuple[str, str, int], IpvsVirtualServer] = {}
        self.by_port: dict[tuple[str, int], list[IpvsVirtualServer]] = {}
        for vs in servers:
            self.servers[(vs.protocol, vs.address, vs.port)] = vs
            self.by_port.setdefault((vs.protocol, vs.port), []).append(vs)

    def dispatch(self, policy: str, protocol: str, address: str, port: int) -> Dispatch:
        vs = self.servers.get((protocol, address, port))
        if vs is None:
            return Dispatch(policy, vs_name(protocol, address, port), False)
        return Dispatch(policy, vs_name(protocol, address, port), True,
                        tuple(Target(_hostport(rs.address, rs.port), ipvsadm_real_server(vs, rs.address, rs.port,
                                                                                        rs.weight, rs.fwd),
                                     weight=rs.weight) for rs in vs.real_servers))


class _Index:
    """Everything of one snapshot the modes read, each part built when first asked for."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = weakref.ref(snap)
        self._iptables: dict[int, _IptablesIndex] = {}
        self._nft: dict[int, _NftIndex] = {}
        self._ipvs: _IpvsIndex | None = None

    def _snapshot(self) -> Snapshot:
        snap = self.snap()
        assert snap is not None
        return snap

    def iptables(self, family: int) -> _IptablesIndex:
        if family not in self._iptables:
            snap = self._snapshot()
            self._iptables[family] = _IptablesIndex(snap.ip6tables_save if family == 6 else snap.iptables_save)
        return self._iptables[family]

    def nft(self, family: int) -> _NftIndex:
        if family not in self._nft:
            self._nft[family] = _NftIndex(self._snapshot().nft_ruleset, "ip6" if family == 6 else "ip")
        return self._nft[family]

    def ipvs(self) -> _IpvsIndex:
        if self._ipvs is None:
            self._ipvs = _IpvsIndex(self._snapshot().ipvs)
        return self._ipvs


_CACHE: dict[int, _Index] = {}
_CACHE_SIZE = 8


def _index(snap: Snapshot) -> _Index:
    """The snapshot's index, built once; keyed by id() and checked by a weak reference (a
    snapshot holds dicts, so it is not hashable; an id may be reused after it dies)."""
    idx = _CACHE.get(id(snap))
    if idx is not None and idx.snap() is snap:
        return idx
    for key in [k for k, v in _CACHE.items() if v.snap() is None]:
        del _CACHE[key]
    while len(_CACHE) >= _CACHE_SIZE:
        del _CACHE[next(iter(_CACHE))]
    idx = _CACHE[id(snap)] = _Index(snap)
    return idx


def _family(sp: Any) -> int:
    return 6 if ":" in sp.cluster_ip else 4


# ---- one function per mode ---------------------------------------------------------------------

def iptables_rules(snap: Snapshot, spn: ServicePortName, sp: Any) -> ServiceRules:
    """kube-proxy's iptables mode: nat KUBE-SERVICES -> KUBE-SVC / KUBE-SVL -> KUBE-SEP DNAT."""
    idx = _index(snap).iptables(_family(sp))
    svc, svl = IPT_SERVICE(spn), IPT_LOCAL(spn)
    line, to = idx.entry(sp.cluster_ip, sp.protocol.lower(), sp.port)
    cluster, local = idx.dispatch(CLUSTER, svc), idx.dispatch(LOCAL, svl)
    if to and to not in (svc, svl) and to.startswith(_POLICY_PREFIXES) and idx.present(to):
        # the ClusterIP is caught by a chain of another name (rules another writer made): the
        # kernel follows the rule, and so does this answer
        found = idx.dispatch(LOCAL if sp.internal_policy_local else CLUSTER, to)
        cluster, local = (cluster, found) if sp.internal_policy_local else (found, local)
    elif not (line or cluster.present or local.present):
        seps = idx.commented(str(spn))
        if seps:        # only endpoint chains, found by kube-proxy's comment on their DNAT rules
            targets = tuple(t for sep in seps for t in idx.endpoint(sep))
            found = Dispatch(LOCAL if sp.internal_policy_local else CLUSTER,
                             "KUBE-SEP chains of %s" % spn, True, targets)
            cluster, local = (cluster, found) if sp.internal_policy_local else (found, local)
    return ServiceRules(IPTABLES, spn, line, to, cluster, local)


def nftables_rules(snap: Snapshot, spn: ServicePortName, sp: Any) -> ServiceRules:
    """kube-proxy's nftables mode: @service-ips -> service- / local- chain -> endpoint- dnat."""
    family = _family(sp)
    idx = _index(snap).nft(family)
    if not idx.present:
        return ServiceRules(NFTABLES, spn)
    svc, svl = NFT_SERVICE(spn), NFT_LOCAL(spn)
    proto = sp.protocol.lower()
    to = idx.entries.get((sp.cluster_ip, proto, sp.port), "")
    entry = ""
    if to:
        entry = "add element %s %s %s { %s . %s . %d : goto %s }" % (
            idx.family, kp_nftables.TABLE, kp_nftables.SERVICE_IPS, sp.cluster_ip, proto, sp.port, to)
    cluster, local = idx.dispatch(CLUSTER, svc), idx.dispatch(LOCAL, svl)
    if to and to not in (svc, svl) and to in idx.chains and NFT_IS_PORT_CHAIN(to):
        found = idx.dispatch(LOCAL if sp.internal_policy_local else CLUSTER, to)
        cluster, local = (cluster, found) if sp.internal_policy_local else (found, local)
    return ServiceRules(NFTABLES, spn, entry, to, cluster, local)


def ipvs_rules(snap: Snapshot, spn: ServicePortName, sp: Any) -> ServiceRules:
    """kube-proxy's IPVS mode: a virtual server per Service address and port, its real servers.
    The ClusterIP's follows the internal traffic policy (`cluster` or `local`); NodePort,
    external and LB IP ones the external policy (`external`)."""
    idx = _index(snap).ipvs()
    internal = LOCAL if sp.internal_policy_local else CLUSTER
    vip = idx.dispatch(internal, sp.protocol, sp.cluster_ip, sp.port)
    vs = idx.servers.get((sp.protocol, sp.cluster_ip, sp.port))
    entry = ipvsadm_virtual_server(vs) if vs is not None else ""
    external_policy = LOCAL if sp.external_policy_local else CLUSTER
    external = [idx.dispatch(external_policy, sp.protocol, ip, sp.port)
                for ip in (*sp.external_ips, *sp.load_balancer_ips)]
    if sp.node_port:
        external += [idx.dispatch(external_policy, sp.protocol, found.address, found.port)
                     for found in idx.by_port.get((sp.protocol, sp.node_port), ()) if found.address != sp.cluster_ip]
    return ServiceRules(IPVS, spn, entry, vip.name if vs is not None else "",
                        vip if internal == CLUSTER else None, vip if internal == LOCAL else None, tuple(external))


_READERS = {IPTABLES: iptables_rules, NFTABLES: nftables_rules, IPVS: ipvs_rules}


def service_rules(snap: Snapshot, spn: ServicePortName, sp: Any, mode: str | None = None) -> ServiceRules:
    """What the kernel sends Service port `spn` (`sp`: its kube_proxy.model.ServicePort) to: in
    `mode`, or in the first mode (iptables, nftables, ipvs) whose rules hold it; mode NONE when
    none does."""
    if mode is not None:
        return _READERS[mode](snap, spn, sp)
    for reader in _READERS.values():
        found = reader(snap, spn, sp)
        if found.holds:
            return found
    return ServiceRules(NONE, spn)


# ---- the node as a whole -------------------------------------------------------------------------

def active_modes(snap: Snapshot) -> tuple[str, ...]:
    """The modes whose rules this node holds, each told by what only it creates: iptables' own
    nat chains, the `kube-proxy` nftables table, IPVS virtual servers or kube-ipvs0."""
    idx = _index(snap)
    out = []
    if idx.iptables(4).holds_mode(IPTABLES) or idx.iptables(6).holds_mode(IPTABLES):
        out.append(IPTABLES)
    if idx.nft(4).present or idx.nft(6).present:
        out.append(NFTABLES)
    if snap.ipvs or snap.link(IPVS_DUMMY) is not None or idx.iptables(4).holds_mode(IPVS) \
            or idx.iptables(6).holds_mode(IPVS):
        out.append(IPVS)
    return tuple(out)


def rules_read(snap: Snapshot) -> bool:
    """Whether the snapshot holds any rules at all (a snapshot taken without them holds none)."""
    return bool(snap.iptables_save or snap.ip6tables_save or snap.nft_ruleset or snap.ipvs)


def stale_objects(snap: Snapshot, mode: str, ports: Iterable[tuple[ServicePortName, Any]],
                  family: int = 4) -> list[str]:
    """The mode's per-Service policy chains (iptables KUBE-SVC/KUBE-SVL, nftables service-/local-)
    or virtual servers of IP `family` in the kernel that belong to none of `ports` ((name,
    ServicePort) pairs of that family)."""
    idx = _index(snap)
    ports = list(ports)
    if mode == IPTABLES:
        known = {f(spn) for spn, _ in ports for f in (IPT_SERVICE, IPT_LOCAL)}
        return sorted(c for c in idx.iptables(family).declared() if c.startswith(_POLICY_PREFIXES) and c not in known)
    if mode == NFTABLES:
        known = {f(spn) for spn, _ in ports for f in (NFT_SERVICE, NFT_LOCAL)}
        return sorted(c for c in idx.nft(family).chains
                      if c.startswith(("service-", "local-")) and NFT_IS_PORT_CHAIN(c) and c not in known)
    if mode == IPVS:
        addresses = {(sp.protocol, ip, sp.port) for _, sp in ports
                     for ip in (sp.cluster_ip, *sp.external_ips, *sp.load_balancer_ips)}
        node_ports = {(sp.protocol, sp.node_port) for _, sp in ports if sp.node_port}
        return sorted(vs_name(*key) for key in idx.ipvs().servers if (":" in key[1]) == (family == 6)
                      and key not in addresses and (key[0], key[2]) not in node_ports)
    return []


def wanted(rules: ServiceRules, sp: Any, cats: Any) -> list[tuple[Dispatch, tuple[Endpoint, ...]]]:
    """Each dispatch the mode writes for this port, with the endpoints it puts there
    (`cats`: kube_proxy.model.categorize_endpoints of the port): the Cluster chain with the
    cluster endpoints when the port uses them, the Local chain with the local ones; in IPVS
    mode every virtual server, a Local one with the local endpoints or, none being here, the
    cluster ones (kube_proxy.ipvs.render_port)."""
    out: list[tuple[Dispatch, tuple[Endpoint, ...]]] = []
    if rules.mode == IPVS:
        for d in rules.dispatches:
            out.append((d, tuple(cats.local or cats.cluster) if d.policy == LOCAL else tuple(cats.cluster)))
        return out
    if rules.cluster is not None and sp.uses_cluster_endpoints:
        out.append((rules.cluster, tuple(cats.cluster)))
    if rules.local is not None and sp.uses_local_endpoints:
        out.append((rules.local, tuple(cats.local)))
    return out


def endpoint_rule_name(rules: ServiceRules, dispatch: Dispatch, ep: Endpoint) -> str:
    """What would carry `ep` in `dispatch`: its endpoint chain, or its `ipvsadm -a` line."""
    if rules.mode == IPTABLES:
        return IPT_ENDPOINT(rules.port, ep)
    if rules.mode == NFTABLES:
        return NFT_ENDPOINT(rules.port, ep)
    protocol, _, hostport = dispatch.name.partition(" ")
    return "ipvsadm -a %s %s -r %s -m -w 1" % (_IPVSADM_PROTO.get(protocol, "-t"), hostport, ep.addr)


# ---- rule text ----------------------------------------------------------------------------------------

_IPVSADM_PROTO = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}
_IPVSADM_FWD = {0: "-m", 2: "-i", 3: "-g"}


def ipvsadm_virtual_server(vs: IpvsVirtualServer) -> str:
    """`ipvsadm -A -t 10.96.0.10:80 -s rr [-p TIMEOUT]`."""
    text = "ipvsadm -A %s %s -s %s" % (_IPVSADM_PROTO.get(vs.protocol, "-t"), _hostport(vs.address, vs.port),
                                        vs.scheduler)
    return text + (" -p %d" % vs.timeout if vs.flags & IPVS_PERSISTENT else "")


def ipvsadm_real_server(vs: IpvsVirtualServer, address: str, port: int, weight: int = 1, fwd: int = 0) -> str:
    """`ipvsadm -a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1`."""
    return "ipvsadm -a %s %s -r %s %s -w %d" % (_IPVSADM_PROTO.get(vs.protocol, "-t"), _hostport(vs.address, vs.port),
                                                _hostport(address, port), _IPVSADM_FWD.get(fwd, "-m"), weight)


# nft's JSON (libnftables-json(5)) back to the text `nft list` prints, for the expressions
# kube-proxy's table uses; anything else is shown as its JSON.

_BARE_META = {"iif", "oif", "iifname", "oifname", "iiftype", "oiftype"}     # the others print as "meta KEY"
_HEX_KEYS = {"mark"}
_DEFAULT_REJECT = {"ip": "icmp", "ip6": "icmpv6"}      # what a bare `reject` is in each family


def _time(seconds: int) -> str:
    """nft's duration: 60 -> "1m", 10800 -> "3h", 90 -> "1m30s"."""
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append("%d%s" % (seconds // size, unit))
            seconds %= size
    return "".join(out) or "0s"


def _is_hex(expr: Any) -> bool:
    if isinstance(expr, dict):
        for key in ("meta", "ct"):
            body = expr.get(key)
            if isinstance(body, dict) and body.get("key") in _HEX_KEYS:
                return True
        for op in ("&", "|", "^"):
            if op in expr:
                return _is_hex(expr[op][0])
    return False


def _value(v: Any, hexa: bool = False) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return "0x%08x" % v if hexa else str(v)
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return ",".join(_value(x, hexa) for x in v)
    if not isinstance(v, dict) or len(v) != 1:
        return json.dumps(v, sort_keys=True)
    kind, body = next(iter(v.items()))
    if kind == "payload" and "field" in body:
        return "%s %s" % (body["protocol"], body["field"])
    if kind == "meta":
        return body["key"] if body["key"] in _BARE_META else "meta %s" % body["key"]
    if kind == "ct":
        return "ct %s" % body["key"]
    if kind == "numgen":
        return "numgen %s mod %d" % (body["mode"], body["mod"]) + (" offset %d" % body["offset"]
                                                                   if body.get("offset") else "")
    if kind == "fib":
        flags = body.get("flags", [])
        return "fib %s %s" % (" . ".join(flags if isinstance(flags, list) else [flags]), body["result"])
    if kind == "prefix":
        return "%s/%d" % (body["addr"], body["len"])
    if kind == "range":
        return "%s-%s" % (_value(body[0], hexa), _value(body[1], hexa))
    if kind == "concat":
        return " . ".join(_value(x, hexa) for x in body)
    if kind == "set":
        items = body if isinstance(body, list) else [body]
        return "{ %s }" % ", ".join(_value(x, hexa) for x in items)
    if kind in ("&", "|", "^"):
        h = _is_hex(body[0])
        return "%s %s %s" % (_value(body[0], h), kind, _value(body[1], h))
    if kind == "elem":
        text = _value(body["val"], hexa)
        if "timeout" in body:
            text += " timeout %s" % _time(int(body["timeout"]))
        return text
    return json.dumps(v, sort_keys=True)


def _statement(expr: dict[str, Any], family: str) -> str:
    kind, body = next(iter(expr.items()))
    if kind == "match":
        left, right, op = body["left"], body["right"], body["op"]
        hexa = _is_hex(left)
        binop = isinstance(left, dict) and any(k in left for k in ("&", "|", "^"))
        words = [_value(left, hexa)]
        if op not in ("==", "in") or binop:
            words.append(op)
        words.append(_value(right, hexa))
        return " ".join(words)
    if kind in ("jump", "goto"):
        return "%s %s" % (kind, body["target"])
    if kind in ("accept", "drop", "return", "continue") and body is None:
        return kind
    if kind == "reject":
        kind_of, code = (body or {}).get("type", ""), (body or {}).get("expr", "")
        if not body or (code == "port-unreachable" and kind_of == _DEFAULT_REJECT.get(family, "icmpx")):
            return "reject"
        return "reject with tcp reset" if kind_of == "tcp reset" else "reject with %s %s" % (kind_of, code)
    if kind in ("dnat", "snat"):
        addr = str(body.get("addr", ""))
        where = _hostport(addr, int(body["port"])) if "port" in body else addr
        return "%s %sto %s" % (kind, body["family"] + " " if "family" in body else "", where)
    if kind == "masquerade":
        flags = (body or {}).get("flags", [])
        flags = flags if isinstance(flags, list) else [flags]
        return " ".join(["masquerade"] + [f.replace("_", "-") for f in flags])
    if kind == "counter":
        return "counter packets %d bytes %d" % (body.get("packets", 0), body.get("bytes", 0))
    if kind == "mangle":
        hexa = _is_hex(body["key"])
        return "%s set %s" % (_value(body["key"], hexa), _value(body["value"], hexa))
    if kind == "vmap":
        return "%s vmap %s" % (_value(body["key"]), _value(body["data"]))
    if kind == "set" and isinstance(body, dict) and "op" in body:
        return "%s %s { %s }" % (body["op"], body["set"], _value(body["elem"]))
    return json.dumps(expr, sort_keys=True)


def nft_rule_text(rule: dict[str, Any]) -> str:
    """One rule of `nft -j list ruleset` as `nft list ruleset` prints it (its statements)."""
    family = str(rule.get("family", "ip"))
    text = " ".join(_statement(e, family) for e in rule.get("expr", ()) if isinstance(e, dict) and e)
    if rule.get("comment"):
        text += ' comment "%s"' % rule["comment"]
    return text
