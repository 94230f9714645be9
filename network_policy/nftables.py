"""The NetworkPolicy dataplane: one nftables table of our own, `inet podnet-network-policy`,
rendered from the model (network_policy/model.py) and kept in sync with one `nft -f -`
transaction per sync. No other table is ever named.

Layout (every name is ours; `<H>` is 12 base32 characters of the sha256 of a set's meaning):
  forward-egress (filter, forward hook, priority -10), forward-ingress (priority -5):
      ct state established,related accept        replies and flows already let through
      ip saddr . ip daddr @self-pods accept      a pod reaching itself (hairpin through a Service)
      ip saddr vmap @egress-pods                 this node's isolated pods -> jump egress-ns-<ns>
      (ingress: daddr and @ingress-pods; IPv6: ip6 and the *6 sets and maps)
    `accept` ends only that base chain: the packet goes on to the next one and to everyone
    else's (kube-proxy's filter chains at 0, flannel's, calico_lite's); `drop` is final.
  output-egress (filter, output hook, priority -10), output-ingress (priority -5): the same,
    but the dispatch only takes a packet whose policed side is one of this node's pods and
    whose source is not an address of the node:
      ip saddr . ip saddr @self-pods fib saddr type != local ip saddr vmap @egress-pods
      (ingress: ip daddr . ip daddr @self-pods fib saddr type != local ip daddr vmap @ingress-pods)
  egress-ns-<ns>, ingress-ns-<ns>:                one per namespace with policies of that direction
      ip saddr @pods-<H> jump egress-<ns>/<name>  per policy: its target pods -> its chain
      limit rate 10/second log group 100 prefix "egress <ns>"   (NFLOG, rate-limited)
      counter name "egress-drops" drop            nothing allowed it
  egress-<ns>/<name>, ingress-<ns>/<name>:        one per policy and direction: a rule per
      (peer, port) of each of its rules, `accept`; what matches none returns
  pods-<H> / pods6-<H>        addresses of the pods of a PodSet (a target or a pod peer), shared
                              by every policy with the same selectors
  cidr-<H> / cidr6-<H>        an ipBlock minus its excepts, as disjoint prefixes (interval set)
  port-<proto>-<name> / port6-...  (address . protocol . port) of every pod's container port of
                              that name: a named port is `ip daddr . meta l4proto . th dport @port-...`
  ingress-pods, egress-pods (+6)   verdict maps: this node's isolated pods -> their namespace chain
  self-pods (+6)              (address . address) of this node's pods
  counters ingress-drops, egress-drops

So a pod added, deleted or relabelled changes set and map elements only; a policy changes
its own chains, its namespace's chain (one jump per policy) and the sets only it used.

Why the output hook: kube-proxy's IPVS mode delivers a pod's packet to a ClusterIP locally
(the address is on kube-ipvs0); IPVS takes it at LOCAL_IN, rewrites the destination and
sends it on through LOCAL_OUT (ip_vs_nat_xmit -> NF_HOOK(NF_INET_LOCAL_OUT), no input
device), so it never crosses the forward hook: without the output chains a client's egress
policy, and the ingress policy of a backend on the client's node, would be bypassed. The
output hook also carries the node's own traffic, which no policy judges (kubelet's probes,
hostNetwork pods): its source is an address of the node (`fib saddr type local`), while
what IPVS forwards keeps the client's. The `@self-pods` test (a pod's address twice: no new
set) comes first so that the node's traffic that involves none of its pods, most of it,
never pays the fib lookup; the dispatch maps only hold this node's pods anyway. The
iptables and nftables modes DNAT in prerouting and forward: their packets never reach the
output chains, and the forward chains are what they were.

Why no `ct state invalid drop`: the base chains see all forwarded traffic of the node, and a
pod that no policy isolates must pass exactly as without us; for an isolated pod a packet
conntrack calls invalid is judged by the policy rules like any packet of a new flow, which
lets through only what the policies allow anyway.

Costs (nft 1.0.6, see podnet/net/nft.py): `add chain T C { rules }`, `flush chain`,
`add set T S { type ...; elements = { ... } }` (which adds elements to an existing set) need
only nft's table list; `add element`, `delete element` and any `delete` make nft list every
chain of every table first, which on a node with kube-proxy's rules at 10,000 Services costs
0.4 s. A chain written in the cheap form must name sets nft knows, so every set its rules
use is declared (`add set T S { type ...; }`, a no-op when it exists) in the same
transaction. So a partial sync:
  - adds elements with `add set ... elements`;
  - removes elements by rewriting the sets that lost some (`flush set` + `add set` with the
    whole content: nft then lists only the sets), unless that would rewrite more than
    REWRITE_LIMIT elements, in which case it pays nft's listing once with `delete element`;
  - leaves the chains and sets nobody uses any more flushed (empty, unreferenced, harmless)
    until a transaction pays the listing anyway, a full sync, or STALE_LIMIT of them pile up.
A full sync (at start, after a failure, or when asked) lists our chains and sets, then
rewrites the whole table in one transaction (flush table, flush every set, declare
everything, delete what is no longer ours): atomic, so a restarted agent takes its
predecessor's table over with no moment where a pod is open or closed wrongly.

A transaction the kernel refuses changes nothing (nft transactions are atomic). The sync
then falls back to a full one; if that is refused too, the kernel is asked to check (nft -c,
nothing applied) whole tables holding halves of the policies, under a scratch name, to find
the policies it refuses on their own (bisection: about 1 + 1.5 log2(n) checks for one bad
policy among n). Those are quarantined: their chains and jumps are left out (the pods they
select stay isolated by them, so the failure closes rather than opens) until the policy
changes, and the rest is applied.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from types import MappingProxyType

from network_policy.model import (
    DIRECTIONS,
    EGRESS,
    EGRESS_PODS,
    INGRESS,
    INGRESS_PODS,
    LOCAL_PODS,
    IPBlock,
    Local,
    PodSet,
    Policy,
    PolicyModel,
    PortSet,
)
from podnet.isolate import isolate as bisect
from podnet.isolate import one_line

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import Any

    from network_policy.model import Changes, Key, PortMatch, SetRef

    ChainBody = tuple[tuple[str, ...], frozenset[SetRef]]      # a chain's rules and the sets they use

log = logging.getLogger("network_policy.nftables")

TABLE = "podnet-network-policy"     # family inet
CHECK_TABLE = "podnet-network-policy-check"     # what bisection has the kernel check (nft -c): never created
FAMILY = "inet"
BASE_CHAINS = {EGRESS: ("forward-egress", -10), INGRESS: ("forward-ingress", -5)}
OUTPUT_CHAINS = {EGRESS: ("output-egress", -10), INGRESS: ("output-ingress", -5)}     # what IPVS forwards
# (name, hook, priority, direction) of every base chain, in write order
EVERY_BASE_CHAIN = tuple((chains[d][0], hook, chains[d][1], d)
                         for hook, chains in (("forward", BASE_CHAINS), ("output", OUTPUT_CHAINS)) for d in DIRECTIONS)
COUNTERS = {INGRESS: "ingress-drops", EGRESS: "egress-drops"}
REWRITE_LIMIT = 20000       # elements a partial sync rewrites to avoid `delete element` (see above)
STALE_LIMIT = 500           # flushed chains and sets left waiting for deletion
NAME_MAX = 240              # nft refuses names of 256 characters and more
COMMENT_MAX = 120


# ---- names ----------------------------------------------------------------------------------------

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _hash12(text: str) -> str:
    """The first 12 characters of base32(sha256(text)): 60 bits, no collision among any
    number of sets a cluster has."""
    v = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 4
    return "".join(_B32[(v >> shift) & 31] for shift in range(55, -1, -5))


def ns_chain(direction: str, namespace: str) -> str:
    return "%s-ns-%s" % (direction, namespace)


def policy_chain(direction: str, namespace: str, name: str) -> str:
    """"ingress-<ns>/<name>", or with a hash and cut when that is too long for nft."""
    chain = "%s-%s/%s" % (direction, namespace, name)
    if len(chain) <= NAME_MAX:
        return chain
    return ("%s-%s-%s/%s" % (direction, _hash12(chain), namespace, name))[:NAME_MAX]


def _family_words(family: int) -> tuple[str, str]:
    return ("ip", "ipv4_addr") if family == 4 else ("ip6", "ipv6_addr")


@dataclass(frozen=True)
class SetSpec:
    """One nftables set or map of ours: kind "set" or "map", key types, flags, a comment."""
    name: str
    kind: str
    types: tuple[str, ...]
    flags: tuple[str, ...] = ()
    comment: str = ""

    @property
    def declaration(self) -> str:
        text = "type %s%s;" % (" . ".join(self.types), " : verdict" if self.kind == "map" else "")
        if self.flags:
            text += " flags %s;" % ",".join(self.flags)
        if self.comment:
            text += ' comment "%s";' % self.comment
        return text

    @property
    def signature(self) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """What must agree with the kernel's set of this name (a comment may differ)."""
        return (self.kind, self.types, tuple(sorted(self.flags)))


def _comment(text: str) -> str:
    text = text.replace('"', "'")
    return text if len(text) <= COMMENT_MAX else text[:COMMENT_MAX - 3] + "..."


_LOCAL_NAMES = {LOCAL_PODS: "self-pods", INGRESS_PODS: "ingress-pods", EGRESS_PODS: "egress-pods"}


@functools.lru_cache(maxsize=1 << 16)
def set_specs(ref: SetRef) -> Mapping[int, SetSpec]:
    """{family: SetSpec} of the nftables sets that hold `ref`'s elements (cached: a sha256 per
    set name adds up over a full render)."""
    out: dict[int, SetSpec] = {}
    if isinstance(ref, IPBlock):
        families: tuple[int, ...] = (ref.family,)
    else:
        families = (4, 6)
    for family in families:
        six = "6" if family == 6 else ""
        _, addr = _family_words(family)
        if isinstance(ref, PodSet):
            spec = SetSpec("pods%s-%s" % (six, _hash12(ref.canonical)), "set", (addr,), comment=_comment(str(ref)))
        elif isinstance(ref, IPBlock):
            spec = SetSpec("cidr%s-%s" % (six, _hash12(ref.canonical)), "set", (addr,), ("interval",),
                           _comment(str(ref)))
        elif isinstance(ref, PortSet):
            spec = SetSpec("port%s-%s-%s" % (six, ref.protocol.lower(), ref.name), "set",
                           (addr, "inet_proto", "inet_service"), comment=_comment("named port %s" % ref))
        elif ref == LOCAL_PODS:
            spec = SetSpec(_LOCAL_NAMES[ref] + six, "set", (addr, addr), comment="this node's pods, twice")
        else:
            spec = SetSpec(_LOCAL_NAMES[ref] + six, "map", (addr,),
                           comment="this node's pods isolated for %s" % ref.what)
        out[family] = spec
    return MappingProxyType(out)


def _family_of(element: Any) -> int:
    first = element if isinstance(element, str) else element[0]
    return 6 if ":" in first else 4


def element_text(ref: SetRef, element: Any) -> str:
    if isinstance(ref, PortSet):
        return "%s . %s . %d" % (element[0], element[1].lower(), element[2])
    if ref == LOCAL_PODS:
        return "%s . %s" % (element, element)
    if isinstance(ref, Local):
        return "%s : jump %s" % (element[0], ns_chain(ref.what, element[1]))
    return str(element)


def element_key_text(ref: SetRef, element: Any) -> str:
    """What `delete element` names: the key alone (a map element without its verdict)."""
    if isinstance(ref, Local) and ref != LOCAL_PODS:
        return str(element[0])
    return element_text(ref, element)


def elements_by_set(ref: SetRef, elements: Iterable[Any], keys_only: bool = False) -> dict[str, list[str]]:
    """{nft set name: [element text, sorted]} of `ref`'s elements split by family."""
    specs = set_specs(ref)
    out: dict[str, list[str]] = {}
    seen_keys: set[str] = set()
    for element in sorted(elements):
        spec = specs.get(_family_of(element))
        if spec is None:
            continue
        if isinstance(ref, Local) and ref != LOCAL_PODS:
            # one verdict per address: two local pods claiming one address (a stale object) -> the first
            if element[0] in seen_keys:
                continue
            seen_keys.add(element[0])
        text = element_key_text(ref, element) if keys_only else element_text(ref, element)
        out.setdefault(spec.name, []).append(text)
    return out


# ---- chains -------------------------------------------------------------------------------------------

def _peer_match(peer: PodSet | IPBlock | None, family: int | None, field_: str) -> str:
    if peer is None:
        return ""
    assert family is not None
    ipx, _ = _family_words(family)
    return "%s %s @%s" % (ipx, field_, set_specs(peer)[family].name)


def _port_match(port: PortMatch | None, family: int | None) -> str:
    if port is None:
        return ""
    if isinstance(port, PortSet):
        assert family is not None
        ipx, _ = _family_words(family)
        return "%s daddr . meta l4proto . th dport @%s" % (ipx, set_specs(port)[family].name)
    proto = port.protocol.lower()
    if port.port is None:
        return "meta l4proto %s" % proto
    if port.end_port is not None and port.end_port != port.port:
        return "%s dport %d-%d" % (proto, port.port, port.end_port)
    return "%s dport %d" % (proto, port.port)


def _families(peer: PodSet | IPBlock | None, port: PortMatch | None) -> tuple[int | None, ...]:
    """The families a (peer, port) pair needs a rule for; (None,): one rule for both."""
    wanted = None
    if isinstance(peer, IPBlock):
        wanted = {peer.family}
    elif peer is not None:
        wanted = {4, 6}
    if isinstance(port, PortSet):
        wanted = {4, 6} if wanted is None else wanted
    if wanted is None:
        return (None,)
    return tuple(sorted(wanted))


def render_policy_chain(policy: Policy, direction: str) -> tuple[str, tuple[str, ...], frozenset[SetRef]]:
    """(chain name, rules, sets the rules use) of one policy's rules of one direction."""
    peer_field = "saddr" if direction == INGRESS else "daddr"
    rules: list[str] = []
    refs: set[SetRef] = set()
    for rule in policy.rules(direction) or ():
        peers: Sequence[PodSet | IPBlock | None] = rule.peers or (None,)
        ports: Sequence[PortMatch | None] = rule.ports or (None,)
        for peer in peers:
            for port in ports:
                for family in _families(peer, port):
                    words = [w for w in (_peer_match(peer, family, peer_field), _port_match(port, family)) if w]
                    line = " ".join(words + ["accept"])
                    if line not in rules:
                        rules.append(line)
                if peer is not None:
                    refs.add(peer)
                if isinstance(port, PortSet):
                    refs.add(port)
    return policy_chain(direction, policy.namespace, policy.name), tuple(rules), frozenset(refs)


def render_ns_chain(direction: str, namespace: str, policies: Iterable[Policy], log_group: int,
                    log_rate: str) -> tuple[str, tuple[str, ...], frozenset[SetRef]]:
    """(chain name, rules, sets used) of a namespace's dispatch to its policies of `direction`."""
    addr_field = "daddr" if direction == INGRESS else "saddr"
    rules: list[str] = []
    refs: set[SetRef] = set()
    for policy in policies:
        target = policy.target
        refs.add(target)
        chain = policy_chain(direction, policy.namespace, policy.name)
        for family, spec in set_specs(target).items():
            rules.append("%s %s @%s jump %s" % (_family_words(family)[0], addr_field, spec.name, chain))
    rules.append('limit rate %s log group %d prefix "%s %s"' % (log_rate, log_group, direction, namespace))
    rules.append('counter name "%s" drop' % COUNTERS[direction])
    return ns_chain(direction, namespace), tuple(rules), frozenset(refs)


def base_chain_rules(direction: str, hook: str = "forward") -> tuple[str, ...]:
    addr_field = "daddr" if direction == INGRESS else "saddr"
    dispatch = INGRESS_PODS if direction == INGRESS else EGRESS_PODS
    rules = ["ct state established,related accept"]
    for family in (4, 6):
        ipx, _ = _family_words(family)
        local = set_specs(LOCAL_PODS)[family].name
        rules.append("%s saddr . %s daddr @%s accept" % (ipx, ipx, local))
        vmap = "%s %s vmap @%s" % (ipx, addr_field, set_specs(dispatch)[family].name)
        if hook == "output":
            # one of this node's pods on our side, sent on by the node (IPVS), not from the node itself
            vmap = "%s %s . %s %s @%s fib saddr type != local %s" % (ipx, addr_field, ipx, addr_field, local, vmap)
        rules.append(vmap)
    return tuple(rules)


def base_rule_count() -> int:
    return sum(len(base_chain_rules(direction, hook)) for _, hook, _, direction in EVERY_BASE_CHAIN)


# ---- the whole table as plain data ----------------------------------------------------------------------

@dataclass
class Table:
    """Our table as plain data: chains (policy chains, then namespace chains, in write
    order) with their rules, the sets each uses, and every set and map with its elements."""
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    chain_refs: dict[str, frozenset[SetRef]] = field(default_factory=dict)
    policy_chains: dict[tuple[Key, str], str] = field(default_factory=dict)
    sets: dict[str, SetSpec] = field(default_factory=dict)
    elements: dict[str, list[str]] = field(default_factory=dict)
    refs: set[SetRef] = field(default_factory=set)
    policies: int = 0

    @property
    def rules(self) -> int:
        return sum(map(len, self.chains.values())) + base_rule_count()

    @property
    def element_count(self) -> int:
        return sum(map(len, self.elements.values()))


LOCALS = (LOCAL_PODS, INGRESS_PODS, EGRESS_PODS)


def render_table(model: PolicyModel, left_out: Iterable[Key] = (), only: Iterable[Key] | None = None,
                 log_group: int = 100, log_rate: str = "10/second") -> Table:
    """The whole table for the model's state: every policy but those `left_out` (or, with
    `only`, just those), the namespace chains of every namespace with policies of a
    direction, the sets those chains use, and the local maps and sets."""
    skip = set(left_out)
    keep = set(only) if only is not None else None
    table = Table()
    rendered: set[Key] = set()
    ns_chains: list[tuple[str, tuple[str, ...], frozenset[SetRef]]] = []
    for direction in DIRECTIONS:
        for namespace in sorted(model.namespaces_with(direction)):
            chosen = [p for p in model.policies_in(namespace) if p.rules(direction) is not None
                      and p.key not in skip and (keep is None or p.key in keep)]
            for policy in chosen:
                name, rules, refs = render_policy_chain(policy, direction)
                table.chains[name] = rules
                table.chain_refs[name] = refs
                table.policy_chains[(policy.key, direction)] = name
                rendered.add(policy.key)
            ns_chains.append(render_ns_chain(direction, namespace, chosen, log_group, log_rate))
    for name, rules, refs in ns_chains:
        table.chains[name] = rules
        table.chain_refs[name] = refs
    table.policies = len(rendered)
    for refs in table.chain_refs.values():
        table.refs.update(refs)
    for ref in sorted(table.refs, key=lambda r: r.canonical) + list(LOCALS):
        for spec in set_specs(ref).values():
            table.sets[spec.name] = spec
        for name, texts in elements_by_set(ref, model.elements(ref)).items():
            table.elements[name] = texts
    return table


# ---- transactions ----------------------------------------------------------------------------------------

@dataclass
class Kernel:
    """What our table holds in the kernel: chain names (with (hook, priority) of base chains)
    and set and map signatures. Empty when the table does not exist."""
    chains: dict[str, tuple[str, int] | None] = field(default_factory=dict)
    sets: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)


def _head(table_name: str) -> str:
    return "%s %s" % (FAMILY, table_name)


def _set_block(spec: SetSpec, elements: Sequence[str]) -> str:
    body = spec.declaration
    if elements:
        body += " elements = { %s }" % ", ".join(elements)
    return "\t%s %s { %s }\n" % (spec.kind, spec.name, body)


def _chain_block(name: str, rules: Sequence[str], spec: str | None = None) -> str:
    lines = ([spec] if spec else []) + list(rules)
    return "\tchain %s {\n%s\t}\n" % (name, "".join("\t\t%s\n" % r for r in lines))


def base_chain_spec(direction: str, hook: str = "forward") -> str:
    chains = OUTPUT_CHAINS if hook == "output" else BASE_CHAINS
    return "type filter hook %s priority %d; policy accept;" % (hook, chains[direction][1])


def full_text(table: Table, kernel: Kernel | None = None, table_name: str = TABLE) -> str:
    """The full-sync transaction: the table rewritten in place. `kernel`: what exists now
    (None: nothing; a check of a scratch table). Sets and base chains whose kind, type or
    hook differ from ours are deleted and declared anew; whatever of ours is no longer
    wanted is deleted at the end."""
    kernel = kernel or Kernel()
    head = _head(table_name)
    out = ['add table %s { comment "podnet NetworkPolicy agent"; }\n' % head, "flush table %s\n" % head]
    for counter in COUNTERS.values():
        out.append("add counter %s %s\n" % (head, counter))
    base = {name: (hook, prio) for name, hook, prio, _ in EVERY_BASE_CHAIN}
    for name, have in sorted(kernel.sets.items()):
        spec = table.sets.get(name)
        if spec is None:
            continue
        if have != spec.signature:
            out.append("delete %s %s %s\n" % (have[0], head, name))
        else:
            out.append("flush %s %s %s\n" % (spec.kind, head, name))
    for name, hook in sorted(kernel.chains.items()):
        if name in base and hook != base[name]:
            out.append("delete chain %s %s\n" % (head, name))
    out.append("table %s {\n" % head)
    # sets, the chains using them, the maps whose verdicts jump to the chains, the base chains
    for name, spec in table.sets.items():
        if spec.kind == "set":
            out.append(_set_block(spec, table.elements.get(name, ())))
    for name, rules in table.chains.items():
        out.append(_chain_block(name, rules))
    for name, spec in table.sets.items():
        if spec.kind == "map":
            out.append(_set_block(spec, table.elements.get(name, ())))
    for name, at, _, direction in EVERY_BASE_CHAIN:
        out.append(_chain_block(name, base_chain_rules(direction, at), base_chain_spec(direction, at)))
    out.append("}\n")
    for name in sorted(kernel.chains):
        if name not in table.chains and name not in base:
            out.append("delete chain %s %s\n" % (head, name))
    for name, have in sorted(kernel.sets.items()):
        if name not in table.sets:
            out.append("delete %s %s %s\n" % (have[0], head, name))
    return "".join(out)


def cleanup_text() -> str:
    """Delete our table (adding it first makes that idempotent)."""
    return "add table %s\ndelete table %s\n" % (_head(TABLE), _head(TABLE))


def parse_kernel(chains: Iterable[Mapping[str, Any]], sets: Iterable[Mapping[str, Any]]) -> Kernel:
    """`nft -j list chains inet` and `nft -j -t list sets|maps inet` objects -> our table's Kernel."""
    kernel = Kernel()
    for obj in chains:
        chain = obj.get("chain")
        if not chain or chain.get("table") != TABLE or chain.get("family") != FAMILY:
            continue
        kernel.chains[chain["name"]] = (chain["hook"], int(chain.get("prio", 0))) if "hook" in chain else None
    for obj in sets:
        for kind in ("set", "map"):
            s = obj.get(kind)
            if not s or s.get("table") != TABLE or s.get("family") != FAMILY:
                continue
            types = s.get("type")
            types = tuple(types) if isinstance(types, list) else (str(types),)
            flags = s.get("flags") or []
            flags = [flags] if isinstance(flags, str) else flags
            kernel.sets[s["name"]] = (kind, types, tuple(sorted(flags)))
    return kernel


# ---- the dataplane ----------------------------------------------------------------------------------------

@dataclass
class SyncResult:
    full: bool
    seconds: float
    policies: int           # policies rendered (the quarantined left out)
    chains: int             # chains in the table, base chains included
    rules: int
    sets: int               # sets and maps
    elements: int
    changed: int            # chains and sets this sync wrote (a full sync: all of them)
    quarantined: tuple[Key, ...]


class NftRunner:
    """How the dataplane reaches nft: podnet.net.nft by default; tests inject their own."""

    def apply(self, text: str) -> None:
        from podnet.net import nft
        nft.apply(text)

    def check(self, text: str) -> None:
        from podnet.net import nft
        nft.check(text)

    def list_json(self, *what: str, terse: bool = False) -> list[dict[str, Any]]:
        from podnet.net import nft
        return nft.list_json(*what, terse=terse)


def _refused() -> tuple[type[BaseException], ...]:
    from podnet.net.nft import NftError
    return (NftError,)


def isolate(suspects: Sequence[Key], trial: Callable[[list[Key]], object],
            control: Callable[[], object]) -> list[tuple[Key, str]]:
    """The suspects the kernel refuses on their own (podnet.isolate.isolate: bisection); if
    nothing passed, control() (a table with no policies) tells refused policies from a
    kernel that refuses everything: refused too, the first error is raised."""
    return bisect(suspects, trial, _refused(), control).bad


class _Transaction:
    """A partial sync's commands, in the order they are added, and how many objects they write."""

    def __init__(self, head: str) -> None:
        self.head = head
        self.lines: list[str] = []
        self.declared: set[str] = set()
        self.changed = 0
        self.pays_listing = False       # a command that makes nft list the whole ruleset first

    def declare(self, spec: SetSpec) -> None:
        """Make a set known to nft (a no-op for the kernel when it exists)."""
        if spec.name not in self.declared:
            self.declared.add(spec.name)
            self.lines.append("add %s %s %s { %s }\n" % (spec.kind, self.head, spec.name, spec.declaration))

    def write_set(self, spec: SetSpec, elements: Sequence[str], flush: bool) -> None:
        """Add `elements` (after emptying the set when `flush`), declaring it."""
        self.changed += 1
        if flush:
            self.lines.append("flush %s %s %s\n" % (spec.kind, self.head, spec.name))
        self.declared.add(spec.name)
        body = spec.declaration + (" elements = { %s }" % ", ".join(elements) if elements else "")
        self.lines.append("add %s %s %s { %s }\n" % (spec.kind, self.head, spec.name, body))

    def delete_elements(self, name: str, keys: Sequence[str]) -> None:
        self.changed += 1
        self.pays_listing = True
        self.lines.append("delete element %s %s { %s }\n" % (self.head, name, ", ".join(keys)))

    def write_chain(self, name: str, rules: Sequence[str], flush: bool) -> None:
        self.changed += 1
        if flush:
            self.lines.append("flush chain %s %s\n" % (self.head, name))
        self.lines.append("add chain %s %s { %s }\n" % (self.head, name, "".join(r + "; " for r in rules).rstrip()))

    def flush(self, kind: str, name: str) -> None:
        self.changed += 1
        self.lines.append("flush %s %s %s\n" % (kind, self.head, name))

    def delete(self, kind: str, name: str) -> None:
        self.pays_listing = True
        self.lines.append("delete %s %s %s\n" % (kind, self.head, name))

    def text(self) -> str:
        return "".join(self.lines)


class NftablesDataplane:
    """Keeps our table in the current network namespace equal to what `model` wants.

    Knows between syncs what the kernel holds (the chains with their rules, which sets are
    in use and by which chains, the flushed ones waiting for deletion); a start or a
    failure makes the next sync full, which reads that back from the kernel."""

    def __init__(self, model: PolicyModel, log_group: int = 100, log_rate: str = "10/second",
                 runner: NftRunner | None = None) -> None:
        self.model = model
        self.log_group = log_group
        self.log_rate = log_rate
        self.nft = runner or NftRunner()
        self.synced = False
        self.chains: dict[str, tuple[str, ...]] = {}
        self.chain_refs: dict[str, frozenset[SetRef]] = {}
        self.policy_chains: dict[tuple[Key, str], str] = {}
        self.users: dict[SetRef, set[str]] = {}         # sets in use -> the chains using them
        self.stale_chains: set[str] = set()
        self.stale_sets: dict[str, SetSpec] = {}
        self.quarantine: dict[Key, tuple[Policy, str]] = {}     # refused policy -> (the object, the error)
        self.last_text = ""                 # the last transaction applied (tests read it)

    # ---- public ----

    def sync(self, full: bool = False) -> SyncResult:
        started = time.monotonic()
        self._release_changed()
        if full or not self.synced:
            changed = self._full()
            full = True
        else:
            try:
                changed = self._partial()
            except _refused() as e:
                log.warning("nft refused a partial sync (%s); rewriting the whole table", one_line(e))
                self.synced = False
                changed = self._full()
                full = True
        return self._result(full, time.monotonic() - started, changed)

    def cleanup(self) -> None:
        """Delete exactly our table (nothing when it is absent)."""
        self.nft.apply(cleanup_text())
        self.synced = False
        self.chains, self.chain_refs, self.policy_chains, self.users = {}, {}, {}, {}
        self.stale_chains, self.stale_sets = set(), {}

    def drop_counts(self) -> dict[str, int]:
        """Packets each direction's namespace chains dropped, from our named counters
        (0 when the table does not exist)."""
        out = {d: 0 for d in DIRECTIONS}
        try:
            objects = self.nft.list_json("counters", "table", FAMILY, TABLE)
        except _refused():
            return out
        names = {v: k for k, v in COUNTERS.items()}
        for obj in objects:
            counter = obj.get("counter")
            if counter and counter.get("table") == TABLE and counter.get("name") in names:
                out[names[counter["name"]]] = int(counter.get("packets", 0))
        return out

    # ---- quarantine ----

    def _release_changed(self) -> None:
        """A quarantined policy that changed (or went) is tried again."""
        for key, (policy, _) in list(self.quarantine.items()):
            if self.model.policies.get(key) != policy:
                log.info("policy %s/%s changed: trying it again", *key)
                del self.quarantine[key]

    # ---- full ----

    def _read_kernel(self) -> Kernel:
        chains = self.nft.list_json("chains", FAMILY)
        sets = self.nft.list_json("sets", FAMILY, terse=True) + self.nft.list_json("maps", FAMILY, terse=True)
        return parse_kernel(chains, sets)

    def _render(self, left_out: Iterable[Key] = (), only: Iterable[Key] | None = None) -> Table:
        return render_table(self.model, left_out, only, self.log_group, self.log_rate)

    def _full(self) -> int:
        self.synced = False
        self.model.take_changes()       # the whole state is written: what changed is in it
        kernel = self._read_kernel()
        table = self._render(self.quarantine)
        text = full_text(table, kernel)
        try:
            self.nft.apply(text)
        except _refused() as e:
            log.warning("nft refused the full sync (%s); finding the policies it refuses", one_line(e))
            self._bisect()
            table = self._render(self.quarantine)
            text = full_text(table, kernel)
            self.nft.apply(text)
        self.last_text = text
        self.chains = dict(table.chains)
        self.chain_refs = dict(table.chain_refs)
        self.policy_chains = dict(table.policy_chains)
        self.users = {}
        for chain, refs in table.chain_refs.items():
            for ref in refs:
                self.users.setdefault(ref, set()).add(chain)
        self.stale_chains, self.stale_sets = set(), {}
        self.synced = True
        return len(table.chains) + len(EVERY_BASE_CHAIN) + len(table.sets)

    def _bisect(self) -> None:
        suspects = sorted(k for k in self.model.policies if k not in self.quarantine)

        def trial(keys: list[Key]) -> None:
            self.nft.check(full_text(self._render(self.quarantine, only=keys), None, CHECK_TABLE))

        def control() -> None:
            self.nft.check(full_text(self._render(self.quarantine, only=()), None, CHECK_TABLE))

        for key, error in isolate(suspects, trial, control):
            log.error("policy %s/%s quarantined: nft refuses its rules: %s", key[0], key[1], error)
            self.quarantine[key] = (self.model.policies[key], error)

    # ---- partial ----

    def _changed_chains(self, changes: Changes) -> tuple[dict[str, ChainBody], set[str]]:
        """The chains the changed policies and their namespaces want now ({name: (rules, sets)}),
        and those no longer wanted. Updates policy_chains."""
        model = self.model
        wanted: dict[str, ChainBody] = {}
        gone: set[str] = set()
        namespaces: set[tuple[str, str]] = set()
        for key in sorted(changes.policies):
            policy = model.policies.get(key)
            for direction in DIRECTIONS:
                namespaces.add((direction, key[0]))
                old = self.policy_chains.pop((key, direction), None)
                if policy is not None and policy.rules(direction) is not None and key not in self.quarantine:
                    name, rules, refs = render_policy_chain(policy, direction)
                    wanted[name] = (rules, refs)
                    self.policy_chains[(key, direction)] = name
                if old is not None:
                    gone.add(old)
        with_policies = {d: model.namespaces_with(d) for d in DIRECTIONS}
        for direction, namespace in sorted(namespaces):
            chain = ns_chain(direction, namespace)
            if namespace in with_policies[direction]:
                chosen = [p for p in model.policies_in(namespace)
                          if p.rules(direction) is not None and p.key not in self.quarantine]
                _, rules, refs = render_ns_chain(direction, namespace, chosen, self.log_group, self.log_rate)
                wanted[chain] = (rules, refs)
            elif chain in self.chains:
                gone.add(chain)
        return wanted, gone - set(wanted)

    def _partial(self) -> int:
        self.synced = False             # until the kernel has taken it
        changes = self.model.take_changes()
        model = self.model
        wanted, gone = self._changed_chains(changes)

        # which sets come into use and which fall out of it
        users = {ref: set(chains) for ref, chains in self.users.items()}
        for chain in sorted(set(wanted) | gone):
            for ref in self.chain_refs.get(chain, ()):
                if ref in users:
                    users[ref].discard(chain)
            for ref in wanted[chain][1] if chain in wanted else ():
                users.setdefault(ref, set()).add(chain)
        live = {r for r, chains in users.items() if chains}
        came = live - set(self.users)
        went = set(self.users) - live

        # element changes of the sets in use before and after (the Local ones always are)
        adds: dict[SetRef, list[Any]] = {}
        losers: dict[SetRef, list[Any]] = {}
        resets: set[SetRef] = set()
        for ref, delta in changes.elements.items():
            if ref in came or (ref not in live and not isinstance(ref, Local)):
                continue
            if delta.reset:
                resets.add(ref)
                continue
            if delta.added:
                adds[ref] = sorted(delta.added)
            if delta.removed:
                losers[ref] = sorted(delta.removed)
        rewrite = sum(model.size(ref) for ref in losers) <= REWRITE_LIMIT
        txn = _Transaction(_head(TABLE))

        def elements(refs: Iterable[SetRef]) -> None:
            for ref in sorted(refs, key=lambda r: r.canonical):
                specs = set_specs(ref)
                if ref in came:
                    for name, texts in elements_by_set(ref, model.elements(ref)).items():
                        txn.write_set(_spec_named(specs, name), texts, flush=name in self.stale_sets)
                    for spec in specs.values():
                        txn.declare(spec)
                elif ref in resets or (ref in losers and rewrite):
                    # rewritten whole: flush + add need no listing of the ruleset, `delete element` does
                    current = elements_by_set(ref, model.elements(ref))
                    lost = {s.name for s in specs.values()} if ref in resets else set(elements_by_set(ref, losers[ref]))
                    for spec in specs.values():
                        if spec.name in lost:
                            txn.write_set(spec, current.get(spec.name, []), flush=True)
                    for name, texts in elements_by_set(ref, adds.get(ref, ())).items():
                        if name not in lost:        # a family that only gained elements: just those
                            txn.write_set(_spec_named(specs, name), texts, flush=False)
                else:
                    for name, keys in elements_by_set(ref, losers.get(ref, ()), keys_only=True).items():
                        txn.delete_elements(name, keys)
                    for name, texts in elements_by_set(ref, adds.get(ref, ())).items():
                        txn.write_set(_spec_named(specs, name), texts, flush=False)

        touched = came | set(adds) | set(losers) | resets
        elements(r for r in touched if not isinstance(r, Local))
        # every set the chains written here name must be known to nft in this transaction
        for _, refs in wanted.values():
            for ref in refs:
                for spec in set_specs(ref).values():
                    txn.declare(spec)
        for chain, (rules, _) in wanted.items():
            if self.chains.get(chain) != rules or chain in self.stale_chains:
                txn.write_chain(chain, rules, flush=chain in self.chains or chain in self.stale_chains)
        elements(r for r in touched if isinstance(r, Local))       # after the chains their verdicts jump to
        for chain in sorted(gone):
            txn.flush("chain", chain)
        stale_sets = dict(self.stale_sets)
        for ref in sorted(went, key=lambda r: r.canonical):
            for spec in set_specs(ref).values():
                txn.flush(spec.kind, spec.name)
                stale_sets[spec.name] = spec
        for ref in came:
            for spec in set_specs(ref).values():
                stale_sets.pop(spec.name, None)
        stale_chains = (self.stale_chains | gone) - set(wanted)
        if (stale_chains or stale_sets) and (txn.pays_listing or len(stale_chains) + len(stale_sets) >= STALE_LIMIT):
            for chain in sorted(stale_chains):
                txn.delete("chain", chain)
            for name, spec in sorted(stale_sets.items()):
                txn.delete(spec.kind, name)
            stale_chains, stale_sets = set(), {}
        text = txn.text()
        if text:
            self.nft.apply(text)
        self.last_text = text
        # the kernel has it: adopt
        for chain in gone:
            self.chains.pop(chain, None)
            self.chain_refs.pop(chain, None)
        for chain, (rules, refs) in wanted.items():
            self.chains[chain] = rules
            self.chain_refs[chain] = refs
        self.users = {r: chains for r, chains in users.items() if chains}
        self.stale_chains, self.stale_sets = stale_chains, stale_sets
        self.synced = True
        return txn.changed

    # ---- counts ----

    def _result(self, full: bool, seconds: float, changed: int) -> SyncResult:
        locals_ = sum(self.model.size(r) for r in LOCALS)
        elements = locals_ + sum(self.model.size(r) for r in self.users)
        sets = len(LOCALS) * 2 + sum(len(set_specs(r)) for r in self.users)
        rules = sum(map(len, self.chains.values())) + base_rule_count()
        policies = len({key for key, _ in self.policy_chains})
        return SyncResult(full, seconds, policies, len(self.chains) + len(EVERY_BASE_CHAIN), rules, sets, elements,
                          changed, tuple(sorted(self.quarantine)))


def _spec_named(specs: Mapping[int, SetSpec], name: str) -> SetSpec:
    for spec in specs.values():
        if spec.name == name:
            return spec
    raise KeyError(name)
