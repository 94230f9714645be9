"""network_policy/nftables.py without a kernel: names, rule text, the full and partial
transactions, quarantine, and two independent checks of the whole:

- an interpreter of the rule text we write (the few forms render_table uses) runs packets
  through the rendered tables of both nodes, and must agree with the model's reference
  evaluator (verdict) on random clusters;
- FakeKernel, a stand-in for `nft -f` that applies our transactions as the kernel would
  (and refuses what nft or the kernel refuses: unknown sets in the cheap forms, busy chains,
  existing map keys...), so that the table a run of partial syncs leaves must equal what a
  full render says, on random change sequences.

The real kernel is exercised by netns_tests/test_network_policy_dataplane.py.
"""
import copy
import ipaddress
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_network_policy_model import (
    NODE_IPS,
    POLICY_SPEC,
    Cluster,
    clusters,
    labels_strategy,
    load,
    ns_obj,
    pod_obj,
    pol_obj,
    sel,
)

from network_policy import model as m
from network_policy import nftables as nt
from podnet.net.nft import NftError

T = nt.TABLE
HEAD = "inet " + T


# ---- a stand-in kernel ---------------------------------------------------------------------------

class Refused(NftError):
    pass


def _body_parts(body):
    """'type a . b : verdict; flags interval; comment "..."; elements = { x, y }' -> (kind?, types, flags, elements)."""
    tm = re.search(r"type ([^;]+?)( : verdict)?;", body)
    types = tuple(t.strip() for t in tm.group(1).split(" . ")) if tm else None
    fm = re.search(r"flags ([^;]+);", body)
    flags = tuple(sorted(fm.group(1).split(","))) if fm else ()
    em = re.search(r"elements = \{ (.*) \}", body)
    elements = [e.strip() for e in em.group(1).split(",")] if em else []
    return types, bool(tm and tm.group(2)), flags, elements


class FakeKernel:
    """What `nft -f` would make of the dataplane's transactions, for our table(s) only."""

    def __init__(self):
        self.tables = {}            # name -> {"chains": {name: [rules]}, "base": {name: spec}, "sets": {name: dict}}
        self.applied = []
        self.refuse = None          # a substring: any transaction containing it is refused
        self.counters = {"ingress-drops": 0, "egress-drops": 0}

    # -- the runner interface --
    def apply(self, text):
        self._run(text, keep=True)
        self.applied.append(text)

    def check(self, text):
        self._run(text, keep=False)

    def list_json(self, *what, terse=False):
        table = self.tables.get(T)
        if what[:1] == ("counters",):
            if table is None:
                raise Refused("No such file or directory")
            return [{"counter": {"family": "inet", "table": T, "name": n, "packets": v}} for n, v in self.counters.items()]
        if table is None:
            return []
        if what[0] == "chains":
            out = []
            for n in table["chains"]:
                chain = {"family": "inet", "table": T, "name": n}
                if n in table["base"]:
                    hook, prio = re.search(r"hook (\S+) priority (-?\d+)", table["base"][n]).groups()
                    chain.update(type="filter", hook=hook, prio=int(prio))
                out.append({"chain": chain})
            return out
        kind = what[0][:-1]
        out = []
        for name, s in table["sets"].items():
            if s["kind"] == kind:
                entry = {"family": "inet", "table": T, "name": name, "type": s["types"][0] if len(s["types"]) == 1 else list(s["types"])}
                if s["flags"]:
                    entry["flags"] = list(s["flags"])
                out.append({kind: entry})
        return out

    # -- applying --
    def _run(self, text, keep):
        if self.refuse and self.refuse in text:
            raise Refused("Error: Could not process rule: Operation not supported")
        saved = copy.deepcopy(self.tables)
        try:
            self._commands(text)
        except Refused:
            self.tables = saved
            raise
        if not keep:
            self.tables = saved

    def _commands(self, text):
        # nft fetches the whole ruleset first only for these; otherwise sets must be declared in the text
        self.full_cache = bool(re.search(r"^(delete |add element )", text, re.M))
        self.declared = set()
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            mt = re.match(r"^table inet (\S+) \{$", line)
            if mt:
                j = lines.index("}", i)
                self._block(mt.group(1), lines[i + 1:j])
                i = j + 1
                continue
            self._command(line)
            i += 1

    def _table(self, name):
        if name not in self.tables:
            raise Refused("No such file or directory: table %s" % name)
        return self.tables[name]

    def _command(self, line):
        if mt := re.match(r"^add table inet (\S+)", line):
            self.tables.setdefault(mt.group(1), {"chains": {}, "base": {}, "sets": {}})
        elif mt := re.match(r"^delete table inet (\S+)$", line):
            self._table(mt.group(1))
            del self.tables[mt.group(1)]
        elif mt := re.match(r"^flush table inet (\S+)$", line):
            for rules in self._table(mt.group(1))["chains"].values():
                rules.clear()
        elif re.match(r"^add counter inet \S+ \S+$", line):
            pass
        elif mt := re.match(r"^flush (set|map) inet (\S+) (\S+)$", line):
            self._set(mt.group(2), mt.group(3))["elements"].clear()
        elif mt := re.match(r"^delete (set|map) inet (\S+) (\S+)$", line):
            table = self._table(mt.group(2))
            self._set(mt.group(2), mt.group(3))
            if any("@%s " % mt.group(3) in r + " " for rules in table["chains"].values() for r in rules):
                raise Refused("Device or resource busy: set %s" % mt.group(3))
            del table["sets"][mt.group(3)]
        elif mt := re.match(r"^(add) (set|map) inet (\S+) (\S+) \{ (.*) \}$", line):
            self._add_set(mt.group(3), mt.group(2), mt.group(4), mt.group(5))
        elif mt := re.match(r"^add chain inet (\S+) (\S+) \{ (.*) \}$", line):
            body = mt.group(3).strip()
            rules = [r.strip() for r in body.rstrip(";").split("; ")] if body else []
            self._add_chain(mt.group(1), mt.group(2), rules)
        elif mt := re.match(r"^flush chain inet (\S+) (\S+)$", line):
            table = self._table(mt.group(1))
            if mt.group(2) not in table["chains"]:
                raise Refused("No such file or directory: chain %s" % mt.group(2))
            table["chains"][mt.group(2)].clear()
        elif mt := re.match(r"^delete chain inet (\S+) (\S+)$", line):
            table = self._table(mt.group(1))
            name = mt.group(2)
            if name not in table["chains"]:
                raise Refused("No such file or directory: chain %s" % name)
            if self._chain_referenced(table, name):
                raise Refused("Device or resource busy: chain %s" % name)
            del table["chains"][name]
            table["base"].pop(name, None)
        elif mt := re.match(r"^delete element inet (\S+) (\S+) \{ (.*) \}$", line):
            s = self._set(mt.group(1), mt.group(2))
            for key in mt.group(3).split(", "):
                found = [e for e in s["elements"] if e == key or e.startswith(key + " : ")]
                if not found:
                    raise Refused("No such file or directory: element %s" % key)
                s["elements"].discard(found[0])
        else:
            raise AssertionError("FakeKernel does not know %r" % line)

    def _set(self, table, name):
        t = self._table(table)
        if name not in t["sets"]:
            raise Refused("No such file or directory: set %s" % name)
        return t["sets"][name]

    @staticmethod
    def _chain_referenced(table, name):
        for rules in table["chains"].values():
            if any(r.endswith("jump " + name) for r in rules):
                return True
        return any(e.endswith(" : jump " + name) for s in table["sets"].values() for e in s["elements"])

    def _add_set(self, table, kind, name, body):
        t = self._table(table)
        types, is_map, flags, elements = _body_parts(body)
        assert types is not None and is_map == (kind == "map"), body
        s = t["sets"].get(name)
        if s is None:
            s = t["sets"][name] = {"kind": kind, "types": types, "flags": flags, "elements": set()}
        elif (s["kind"], s["types"], s["flags"]) != (kind, types, flags):
            raise Refused("File exists: set %s declared differently" % name)
        self.declared.add(name)
        for e in elements:
            if kind == "map":
                key, _, verdict = e.partition(" : ")
                target = verdict.split()[-1]
                if target not in t["chains"]:
                    raise Refused("No such file or directory: chain %s" % target)
                if any(x.startswith(key + " : ") and x != e for x in s["elements"]):
                    raise Refused("File exists: %s" % key)
            s["elements"].add(e)

    def _check_rule(self, table, rule):
        t = self.tables[table]
        for ref in re.findall(r"@(\S+)", rule):
            if ref not in t["sets"]:
                raise Refused("No such file or directory: set %s" % ref)
            if not self.full_cache and ref not in self.declared:
                raise Refused("nft does not know set %s (not declared in this transaction)" % ref)
        mt = re.search(r"jump (\S+)$", rule)
        if mt and mt.group(1) not in t["chains"]:
            raise Refused("No such file or directory: chain %s" % mt.group(1))

    def _add_chain(self, table, name, rules, spec=None):
        t = self._table(table)
        chain = t["chains"].setdefault(name, [])
        if spec is not None:
            if name in t["base"] and t["base"][name] != spec:
                raise Refused("File exists: base chain %s" % name)
            t["base"][name] = spec
        for rule in rules:
            self._check_rule(table, rule)
            chain.append(rule)

    def _block(self, table, lines):
        self._command("add table inet %s" % table)
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            if mt := re.match(r"^(set|map) (\S+) \{ (.*) \}$", line):
                self._add_set(table, mt.group(1), mt.group(2), mt.group(3))
                i += 1
                continue
            mt = re.match(r"^chain (\S+) \{$", line)
            assert mt, line
            j = i + 1
            body = []
            while lines[j].strip() != "}":
                body.append(lines[j].strip())
                j += 1
            spec = body.pop(0) if body and body[0].startswith("type ") else None
            self._add_chain(table, mt.group(1), body, spec)
            i = j + 1

    # -- what it holds --
    def state(self):
        """Our table as (chains, sets) with the stale (empty, unreferenced) ones left out."""
        t = self.tables.get(T)
        if t is None:
            return None
        chains = {n: list(r) for n, r in t["chains"].items()
                  if r or n in t["base"] or self._chain_referenced(t, n)}
        used = {ref for rules in t["chains"].values() for r in rules for ref in re.findall(r"@(\S+)", r)}
        sets = {n: set(s["elements"]) for n, s in t["sets"].items() if n in used or s["elements"]}
        return chains, sets


def rendered_state(table):
    """render_table()'s Table as FakeKernel.state() shows a table."""
    chains = {n: list(r) for n, r in table.chains.items()}
    for name, hook, _, d in nt.EVERY_BASE_CHAIN:
        chains[name] = list(nt.base_chain_rules(d, hook))
    sets = {n: set(table.elements.get(n, ())) for n in table.sets}
    used = {ref for rules in chains.values() for r in rules for ref in re.findall(r"@(\S+)", r)}
    return chains, {n: e for n, e in sets.items() if n in used or e}


# ---- an interpreter of the rules we write ----------------------------------------------------------------

class Packet:
    def __init__(self, src, dst, proto, port):
        self.src, self.dst, self.proto, self.port = src, dst, proto.lower(), port
        self.family = 6 if ":" in src else 4


class Interpreter:
    """Runs a packet of a new connection through our base chains of one hook, as nftables
    would; `local`: the node's own addresses (what `fib saddr type local` says)."""

    def __init__(self, chains, sets, interval=(), local=()):
        self.chains, self.sets, self.interval, self.local = chains, sets, set(interval), set(local)

    def member(self, name, value):
        elements = self.sets.get(name, set())
        if name in self.interval:
            return any(ipaddress.ip_address(value) in ipaddress.ip_network(e) for e in elements)
        return value in elements

    def chain(self, name, pkt):
        for rule in self.chains[name]:
            verdict = self.rule(rule, pkt)
            if verdict is not None:
                return verdict
        return None

    def accepts(self, pkt, hook="forward"):
        return all(self.chain(name, pkt) != "drop" for name, h, _, _ in nt.EVERY_BASE_CHAIN if h == hook)

    def rule(self, rule, pkt):
        words = rule.split()
        i = 0
        addr = {"saddr": pkt.src, "daddr": pkt.dst}
        while i < len(words):
            w = words[i]
            if w == "ct":                                   # ct state established,related accept
                return None
            if w in ("ip", "ip6"):
                if (w == "ip") != (pkt.family == 4):
                    return None
                if words[i + 2] == "." and words[i + 3] == w:          # ip saddr . ip daddr @S
                    if not self.member(words[i + 5][1:], "%s . %s" % (addr[words[i + 1]], addr[words[i + 4]])):
                        return None
                    i += 6
                elif words[i + 2] == "." and words[i + 3] == "meta":   # ip daddr . meta l4proto . th dport @S
                    if not self.member(words[i + 8][1:], "%s . %s . %d" % (addr[words[i + 1]], pkt.proto, pkt.port)):
                        return None
                    i += 9
                elif words[i + 2] == "vmap":                            # ip daddr vmap @M
                    key = addr[words[i + 1]]
                    for e in self.sets.get(words[i + 3][1:], ()):
                        k, _, verdict = e.partition(" : ")
                        if k == key:
                            return self.chain(verdict.split()[1], pkt)
                    return None
                else:                                                   # ip saddr @S
                    if not self.member(words[i + 2][1:], addr[words[i + 1]]):
                        return None
                    i += 3
            elif w in ("tcp", "udp", "sctp"):
                if pkt.proto != w:
                    return None
                lo, _, hi = words[i + 2].partition("-")
                if not int(lo) <= pkt.port <= int(hi or lo):
                    return None
                i += 3
            elif w == "fib":                                # fib saddr type != local
                assert words[i + 1:i + 5] == ["saddr", "type", "!=", "local"], rule
                if pkt.src in self.local:
                    return None
                i += 5
            elif w == "meta":
                if pkt.proto != words[i + 2]:
                    return None
                i += 3
            elif w == "limit":                              # limit ... log ... prefix "..." (no verdict)
                return None
            elif w == "counter":
                return words[-1]
            elif w == "jump":
                return self.chain(words[i + 1], pkt)
            elif w in ("accept", "drop"):
                return w
            else:
                raise AssertionError("interpreter does not know %r in %r" % (w, rule))
        return None


def interpreter(table, local=()):
    chains, sets = rendered_state(table)
    return Interpreter(chains, sets, [n for n, s in table.sets.items() if "interval" in s.flags], local)


# ---- names and rule text -----------------------------------------------------------------------------------

def policy(ns, name, spec):
    return m.parse_policy(pol_obj(ns, name, spec))


def test_names():
    assert nt.policy_chain("ingress", "x", "allow-web") == "ingress-x/allow-web"
    long = nt.policy_chain("ingress", "n" * 63, "p" * 253)
    assert len(long) == nt.NAME_MAX and long.startswith("ingress-") and "/" in long
    assert long != nt.policy_chain("ingress", "n" * 63, "p" * 252 + "q")
    assert nt.ns_chain("egress", "x") == "egress-ns-x"
    target = policy("x", "p", {"podSelector": sel(app="web")}).target
    specs = nt.set_specs(target)
    assert specs[4].name.startswith("pods-") and specs[6].name == "pods6-" + specs[4].name[5:]
    assert specs[4].declaration == 'type ipv4_addr; comment "pods app=web in namespace x";'
    # names are part of what a restarted agent takes over: they must not drift between versions
    assert nt._hash12("ns x; pods app=web") == "4T63RSSLRYRL" and specs[4].name == "pods-4T63RSSLRYRL"
    assert nt.set_specs(m.PortSet("http", "TCP"))[6] == nt.SetSpec(
        "port6-tcp-http", "set", ("ipv6_addr", "inet_proto", "inet_service"), comment="named port port http/TCP")
    assert nt.set_specs(m.IPBlock("10.0.0.0/8")).keys() == {4}
    assert nt.set_specs(m.INGRESS_PODS)[4].declaration.startswith("type ipv4_addr : verdict;")


def test_policy_chain_rules():
    p = policy("x", "p", {"podSelector": {}, "ingress": [
        {"from": [{"podSelector": sel(app="a")}, {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
         "ports": [{"port": 80}, {"port": 90, "endPort": 99, "protocol": "UDP"}, {"port": "http"}, {"protocol": "SCTP"}]},
        {}]})
    name, rules, refs = nt.render_policy_chain(p, "ingress")
    pods, pods6 = (s.name for s in nt.set_specs(p.ingress[0].peers[0]).values())
    cidr = nt.set_specs(p.ingress[0].peers[1])[4].name
    assert name == "ingress-x/p"
    assert rules == (
        "ip saddr @%s tcp dport 80 accept" % pods, "ip6 saddr @%s tcp dport 80 accept" % pods6,
        "ip saddr @%s udp dport 90-99 accept" % pods, "ip6 saddr @%s udp dport 90-99 accept" % pods6,
        "ip saddr @%s ip daddr . meta l4proto . th dport @port-tcp-http accept" % pods,
        "ip6 saddr @%s ip6 daddr . meta l4proto . th dport @port6-tcp-http accept" % pods6,
        "ip saddr @%s meta l4proto sctp accept" % pods, "ip6 saddr @%s meta l4proto sctp accept" % pods6,
        "ip saddr @%s tcp dport 80 accept" % cidr, "ip saddr @%s udp dport 90-99 accept" % cidr,
        "ip saddr @%s ip daddr . meta l4proto . th dport @port-tcp-http accept" % cidr,
        "ip saddr @%s meta l4proto sctp accept" % cidr,
        "accept")
    assert refs == {p.ingress[0].peers[0], p.ingress[0].peers[1], m.PortSet("http", "TCP")}


def test_egress_rules_match_the_destination():
    p = policy("x", "p", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"podSelector": sel(app="db")}], "ports": [{"port": "sql"}]}, {"ports": [{"port": 53, "protocol": "UDP"}]}]})
    _, rules, _ = nt.render_policy_chain(p, "egress")
    pods = nt.set_specs(p.egress[0].peers[0])[4].name
    assert rules[0] == "ip daddr @%s ip daddr . meta l4proto . th dport @port-tcp-sql accept" % pods
    assert rules[2:] == ("udp dport 53 accept",)
    assert nt.render_policy_chain(policy("x", "q", {"podSelector": {}, "ingress": []}), "ingress")[1] == ()


def test_namespace_and_base_chains():
    a = policy("x", "a", {"podSelector": sel(app="a"), "ingress": []})
    name, rules, refs = nt.render_ns_chain("ingress", "x", [a], 7, "5/minute")
    pods, pods6 = (s.name for s in nt.set_specs(a.target).values())
    assert name == "ingress-ns-x" and refs == {a.target}
    assert rules == ("ip daddr @%s jump ingress-x/a" % pods, "ip6 daddr @%s jump ingress-x/a" % pods6,
                     'limit rate 5/minute log group 7 prefix "ingress x"', 'counter name "ingress-drops" drop')
    assert nt.base_chain_rules("egress") == (
        "ct state established,related accept", "ip saddr . ip daddr @self-pods accept", "ip saddr vmap @egress-pods",
        "ip6 saddr . ip6 daddr @self-pods6 accept", "ip6 saddr vmap @egress-pods6")
    assert nt.base_chain_spec("egress") == "type filter hook forward priority -10; policy accept;"
    assert nt.base_chain_spec("ingress") == "type filter hook forward priority -5; policy accept;"
    assert nt.base_chain_rules("ingress", "forward") == nt.base_chain_rules("ingress") == (
        "ct state established,related accept", "ip saddr . ip daddr @self-pods accept", "ip daddr vmap @ingress-pods",
        "ip6 saddr . ip6 daddr @self-pods6 accept", "ip6 daddr vmap @ingress-pods6")


def test_output_chains_take_only_what_the_node_sends_on_for_its_pods():
    """IPVS sends a pod's packet on through the output hook: the same dispatch as on forward,
    taken only by one of this node's pods on the policed side with a source the node does
    not own (the node's own traffic is never judged); established first, as on forward."""
    assert nt.EVERY_BASE_CHAIN == (
        ("forward-ingress", "forward", -5, "ingress"), ("forward-egress", "forward", -10, "egress"),
        ("output-ingress", "output", -5, "ingress"), ("output-egress", "output", -10, "egress"))
    assert nt.base_chain_rules("egress", "output") == (
        "ct state established,related accept", "ip saddr . ip daddr @self-pods accept",
        "ip saddr . ip saddr @self-pods fib saddr type != local ip saddr vmap @egress-pods",
        "ip6 saddr . ip6 daddr @self-pods6 accept",
        "ip6 saddr . ip6 saddr @self-pods6 fib saddr type != local ip6 saddr vmap @egress-pods6")
    assert nt.base_chain_rules("ingress", "output") == (
        "ct state established,related accept", "ip saddr . ip daddr @self-pods accept",
        "ip daddr . ip daddr @self-pods fib saddr type != local ip daddr vmap @ingress-pods",
        "ip6 saddr . ip6 daddr @self-pods6 accept",
        "ip6 daddr . ip6 daddr @self-pods6 fib saddr type != local ip6 daddr vmap @ingress-pods6")
    assert nt.base_chain_spec("egress", "output") == "type filter hook output priority -10; policy accept;"
    assert nt.base_chain_spec("ingress", "output") == "type filter hook output priority -5; policy accept;"
    # the full text holds all four, forward's exactly as before
    c = Cluster()
    c.ns("x")
    c.pod("x", "a", "10.0.0.1", {"app": "a"})
    c.policy("x", "p", {"podSelector": {}, "ingress": []})
    text = nt.full_text(nt.render_table(c.model))
    for name, hook, _, d in nt.EVERY_BASE_CHAIN:
        block = "\tchain %s {\n\t\t%s\n%s\t}\n" % (name, nt.base_chain_spec(d, hook),
                                                  "".join("\t\t%s\n" % r for r in nt.base_chain_rules(d, hook)))
        assert block in text, name
    assert "\tchain forward-ingress {\n\t\ttype filter hook forward priority -5; policy accept;\n" \
           "\t\tct state established,related accept\n\t\tip saddr . ip daddr @self-pods accept\n" \
           "\t\tip daddr vmap @ingress-pods\n" in text
    # node1's own addresses reaching its isolated pod through output: not judged; the same packet
    # from another pod (sent on by IPVS): judged
    interp = interpreter(nt.render_table(c.model), local=["192.168.0.1", "10.0.0.254"])
    assert interp.accepts(Packet("192.168.0.1", "10.0.0.1", "TCP", 80), "output")
    assert interp.accepts(Packet("10.0.0.254", "10.0.0.1", "TCP", 80), "output")
    assert not interp.accepts(Packet("10.0.9.9", "10.0.0.1", "TCP", 80), "output")
    assert not interp.accepts(Packet("10.0.9.9", "10.0.0.1", "TCP", 80), "forward")


def test_element_text():
    assert nt.elements_by_set(m.LOCAL_PODS, ["10.0.0.1", "fd00::1"]) == {
        "self-pods": ["10.0.0.1 . 10.0.0.1"], "self-pods6": ["fd00::1 . fd00::1"]}
    assert nt.elements_by_set(m.INGRESS_PODS, [("10.0.0.1", "x"), ("10.0.0.1", "y")]) == {
        "ingress-pods": ["10.0.0.1 : jump ingress-ns-x"]}       # one verdict per address
    assert nt.elements_by_set(m.INGRESS_PODS, [("10.0.0.1", "x")], keys_only=True) == {"ingress-pods": ["10.0.0.1"]}
    assert nt.elements_by_set(m.PortSet("http", "TCP"), [("fd00::1", "TCP", 80)]) == {
        "port6-tcp-http": ["fd00::1 . tcp . 80"]}
    block = m.IPBlock("fd00::/64", ("fd00::/65",))
    assert nt.elements_by_set(block, block.prefixes) == {nt.set_specs(block)[6].name: ["fd00::8000:0:0:0/65"]}


def test_full_text_takes_over_what_the_kernel_has():
    c = Cluster()
    c.ns("x")
    c.pod("x", "a", "10.0.0.1", {"app": "a"})
    c.policy("x", "p", {"podSelector": sel(app="a"), "ingress": [{"from": [{"podSelector": sel(app="b")}]}]})
    table = nt.render_table(c.model)
    target = nt.set_specs(c.model.policies[("x", "p")].target)[4].name
    kernel = nt.Kernel(chains={"forward-egress": ("forward", -10), "forward-ingress": ("forward", 0),
                               "output-ingress": ("forward", -5), "ingress-ns-x": None, "ingress-old/gone": None},
                       sets={target: ("set", ("ipv4_addr",), ()), "ingress-pods": ("map", ("ipv4_addr",), ()),
                             "pods-GONE": ("set", ("ipv4_addr",), ()), "self-pods": ("set", ("ipv4_addr",), ())})
    text = nt.full_text(table, kernel)
    lines = text.splitlines()
    assert lines[:2] == ['add table %s { comment "podnet NetworkPolicy agent"; }' % HEAD, "flush table %s" % HEAD]
    assert "flush set %s %s" % (HEAD, target) in lines and "flush map %s ingress-pods" % HEAD in lines
    assert "delete set %s self-pods" % HEAD in lines            # its type differs from ours: declared anew
    assert "delete chain %s forward-ingress" % HEAD in lines    # its priority differs
    assert "delete chain %s forward-egress" % HEAD not in lines
    assert "delete chain %s output-ingress" % HEAD in lines     # its hook differs (output-egress is new)
    assert "delete chain %s output-egress" % HEAD not in lines
    assert lines[-2:] == ["delete chain %s ingress-old/gone" % HEAD, "delete set %s pods-GONE" % HEAD]
    block = lines[lines.index("table %s {" % HEAD):lines.index("}")]
    kinds = [line.split()[0] for line in block[1:] if line.startswith("\t") and not line.startswith("\t\t")
             and line.strip() != "}"]
    # sets, then chains, then the maps (their verdicts jump to the chains), then the base chains
    assert kinds == sorted(kinds, key=["set", "chain", "map"].index)[:kinds.index("map")] + ["map"] * 4 + ["chain"] * 4
    # the same, applied over that kernel state
    fake = FakeKernel()
    fake.apply("table %s {\n\tset %s { type ipv4_addr; elements = { 10.9.9.9 } }\n"
               "\tset pods-GONE { type ipv4_addr; }\n\tset self-pods { type ipv4_addr; }\n"
               "\tchain ingress-ns-x {\n\t}\n\tchain ingress-old/gone {\n\t\tip saddr @pods-GONE accept\n\t}\n"
               "\tmap ingress-pods { type ipv4_addr : verdict; elements = { 10.9.9.9 : jump ingress-ns-x } }\n"
               "\tchain forward-egress {\n\t\ttype filter hook forward priority -10; policy accept;\n\t}\n"
               "\tchain forward-ingress {\n\t\ttype filter hook forward priority 0; policy accept;\n\t}\n"
               "\tchain output-ingress {\n\t\ttype filter hook forward priority -5; policy accept;\n\t}\n}\n"
               % (HEAD, target))
    assert nt.parse_kernel(fake.list_json("chains", "inet"), fake.list_json("sets", "inet") +
                           fake.list_json("maps", "inet")) == kernel
    fake.apply(text)
    assert fake.state() == rendered_state(table)
    assert set(fake.tables[T]["sets"]) == set(table.sets)


def test_parse_kernel():
    chains = [{"chain": {"family": "inet", "table": T, "name": "forward-egress", "type": "filter", "hook": "forward",
                         "prio": -10, "policy": "accept"}},
              {"chain": {"family": "inet", "table": T, "name": "ingress-ns-x"}},
              {"chain": {"family": "inet", "table": "other", "name": "mine"}},
              {"chain": {"family": "ip", "table": T, "name": "not-inet"}}]
    sets = [{"set": {"family": "inet", "table": T, "name": "c", "type": "ipv4_addr", "flags": ["interval"]}},
            {"set": {"family": "inet", "table": T, "name": "p", "type": ["ipv4_addr", "inet_proto", "inet_service"]}},
            {"map": {"family": "inet", "table": T, "name": "m", "type": "ipv4_addr", "map": "verdict"}},
            {"set": {"family": "inet", "table": "other", "name": "o", "type": "ipv4_addr"}}]
    k = nt.parse_kernel(chains, sets)
    assert k.chains == {"forward-egress": ("forward", -10), "ingress-ns-x": None}
    assert k.sets == {"c": ("set", ("ipv4_addr",), ("interval",)),
                      "p": ("set", ("ipv4_addr", "inet_proto", "inet_service"), ()), "m": ("map", ("ipv4_addr",), ())}
    assert nt.cleanup_text() == "add table %s\ndelete table %s\n" % (HEAD, HEAD)


# ---- the dataplane against FakeKernel ----------------------------------------------------------------------

def xyz_cluster():
    c = Cluster()
    for i, ns in enumerate("xyz"):
        c.ns(ns, ns=ns)
        for j, name in enumerate("abc"):
            c.pod(ns, name, "10.0.%d.%d" % (i, j + 1), {"pod": name}, node="node%d" % (j % 2 + 1),
                  ports=[{"name": "http", "containerPort": 80}])
    return c


@pytest.fixture
def env():
    c = xyz_cluster()
    fake = FakeKernel()
    dp = nt.NftablesDataplane(c.model, runner=fake)
    return c, fake, dp


def synced_equal(c, fake, dp):
    assert fake.state() == rendered_state(nt.render_table(c.model, dp.quarantine))


def test_first_sync_is_full_then_partial(env):
    c, fake, dp = env
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})
    r = dp.sync()
    assert r.full and r.policies == 1 and r.quarantined == () and r.chains == 6
    assert r.rules == 2 + 4 + 4 * 5 and r.sets == 10 and r.elements == 1 + 1 + 6 + 1   # target, peer, local pods, the map
    synced_equal(c, fake, dp)
    r = dp.sync()
    assert not r.full and r.changed == 0 and dp.last_text == "" and len(fake.applied) == 1   # nothing to do: no nft run


def test_a_pod_change_writes_elements_only_in_cheap_forms(env):
    c, fake, dp = env
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}],
                                                                    "ports": [{"port": "http"}]}]})
    dp.sync()
    c.pod("y", "b", "10.0.1.2", {"pod": "b"}, node="node1")        # not in x: no set of x gains it
    c.pod("x", "c", "10.0.0.3", {"pod": "b"}, node="node1", ports=[{"name": "http", "containerPort": 8080}])
    r = dp.sync()
    assert not r.full
    text = dp.last_text
    assert " chain " not in text and "delete" not in text and "add element" not in text
    assert "10.0.0.3 . tcp . 8080" in text and "10.0.0.3 . tcp . 80\b" not in text
    synced_equal(c, fake, dp)
    c.delete_pod("x", "b")                           # a member leaves: its sets are rewritten, no `delete`
    dp.sync()
    assert " chain " not in dp.last_text and "delete" not in dp.last_text and "flush set" in dp.last_text
    synced_equal(c, fake, dp)


def test_many_removals_pay_one_listing_with_delete_element(env, monkeypatch):
    c, fake, dp = env
    monkeypatch.setattr(nt, "REWRITE_LIMIT", 2)
    c.policy("x", "p", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    c.policy("x", "q", {"podSelector": {}, "ingress": [{"from": [{"podSelector": sel(pod="nobody")}]}]})
    dp.sync()
    c.model.set_policy(("x", "q"), None)             # its chain and set go stale: flushed, left
    dp.sync()
    assert "delete" not in dp.last_text and dp.stale_chains == {"ingress-x/q"}
    for ns in "yz":
        c.delete_pod(ns, "a")
    dp.sync()
    text = dp.last_text
    assert "delete element %s pods-" % HEAD in text and "flush set" not in text
    assert "delete chain %s ingress-x/q" % HEAD in text          # the listing is paid: stale objects go too
    assert dp.stale_chains == set() and dp.stale_sets == {}
    synced_equal(c, fake, dp)


def test_policy_changes_touch_their_own_chains(env):
    c, fake, dp = env
    c.policy("x", "a", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})
    dp.sync()
    c.policy("x", "b", {"podSelector": sel(pod="b"), "ingress": [{"ports": [{"port": 80}]}]})
    dp.sync()
    text = dp.last_text
    assert "add chain %s ingress-x/b { tcp dport 80 accept; }" % HEAD in text
    assert "flush chain %s ingress-ns-x" % HEAD in text and "ingress-x/a {" not in text
    assert "delete" not in text
    synced_equal(c, fake, dp)
    c.policy("x", "b", {"podSelector": sel(pod="b"), "ingress": [{"ports": [{"port": 81}]}]})
    dp.sync()
    assert "flush chain %s ingress-x/b" % HEAD in dp.last_text and "ingress-ns-x" not in dp.last_text
    synced_equal(c, fake, dp)
    c.model.set_policy(("x", "a"), None)
    c.model.set_policy(("x", "b"), None)
    r = dp.sync()
    assert "delete" not in dp.last_text and r.chains == 4 and r.policies == 0
    assert dp.stale_chains == {"ingress-x/a", "ingress-x/b", "ingress-ns-x"}
    synced_equal(c, fake, dp)
    c.policy("x", "a", {"podSelector": sel(pod="a"), "ingress": []})     # a stale chain in use again
    dp.sync()
    assert dp.stale_chains == {"ingress-x/b"}
    synced_equal(c, fake, dp)
    r = dp.sync(full=True)                           # a full sync deletes what is stale
    assert r.full and "delete chain %s ingress-x/b" % HEAD in dp.last_text
    synced_equal(c, fake, dp)
    assert set(fake.tables[T]["chains"]) == {"forward-egress", "forward-ingress", "output-egress", "output-ingress",
                                             "ingress-ns-x", "ingress-x/a"}


def test_stale_objects_are_deleted_when_they_pile_up(env, monkeypatch):
    c, fake, dp = env
    monkeypatch.setattr(nt, "STALE_LIMIT", 8)
    for name in "abcd":
        c.policy("x", name, {"podSelector": sel(pod=name), "ingress": []})
    dp.sync()
    for name in "ab":
        c.model.set_policy(("x", name), None)
    dp.sync()
    assert "delete" not in dp.last_text and len(dp.stale_chains) + len(dp.stale_sets) == 2 + 4
    c.model.set_policy(("x", "c"), None)
    dp.sync()
    assert dp.last_text.count("delete chain") == 3 and dp.last_text.count("delete set") == 6
    assert dp.stale_chains == set() and dp.stale_sets == {}
    synced_equal(c, fake, dp)


def test_restart_takes_the_table_over(env):
    c, fake, dp = env
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})
    c.policy("y", "q", {"podSelector": {}, "policyTypes": ["Egress"]})
    dp.sync()
    before = fake.state()
    c.model.set_policy(("y", "q"), None)             # the new agent's view differs a little
    dp2 = nt.NftablesDataplane(c.model, runner=fake)
    r = dp2.sync()
    assert r.full
    assert dp2.last_text.count("\n") and "delete chain %s egress-y/q" % HEAD in dp2.last_text
    assert len(fake.applied) == 2                    # one transaction: no moment with an empty table
    synced_equal(c, fake, dp2)
    assert before != fake.state()


def test_a_refused_partial_sync_falls_back_to_a_full_one(env):
    c, fake, dp = env
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": []})
    dp.sync()
    fake.tables[T]["chains"]["ingress-ns-x"].clear()                # someone edited our table
    del fake.tables[T]["chains"]["ingress-x/p"]
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{}]})
    r = dp.sync()                                   # "flush chain ingress-x/p" is refused: rewrite it all
    assert r.full and r.quarantined == ()
    synced_equal(c, fake, dp)
    # drift a partial sync cannot see (a set emptied behind our back) waits for the next full sync
    fake.tables[T]["sets"]["self-pods"]["elements"].clear()
    dp.sync(full=True)
    synced_equal(c, fake, dp)


def test_quarantine_finds_the_refused_policy_and_applies_the_rest(env, monkeypatch):
    c, fake, dp = env
    for name in ("a", "b", "c", "d", "e"):
        c.policy("x", "p" + name, {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod=name)}]}]})
    c.policy("y", "deny", {"podSelector": {}, "ingress": []})
    fake.refuse = "ingress-x/pc"                     # the kernel refuses whatever names this chain
    r = dp.sync()
    assert r.full and r.quarantined == (("x", "pc"),) and r.policies == 5
    assert fake.state() is not None and "ingress-x/pc" not in fake.state()[0]
    assert "ingress-x/pd" in fake.state()[0] and "ingress-y/deny" in fake.state()[0]
    # fails closed: x/a stays isolated, only the quarantined policy's allowances are missing
    assert ("10.0.0.1", "x") in c.model.elements(m.INGRESS_PODS)
    assert any(e.startswith("10.0.0.1 : ") for e in fake.tables[T]["sets"]["ingress-pods"]["elements"])
    synced_equal(c, fake, dp)
    # unchanged, it stays out of partial and full syncs
    c.pod("x", "c", "10.0.0.3", {"pod": "c"}, node="node1")
    assert dp.sync().quarantined == (("x", "pc"),) and dp.sync(full=True).quarantined == (("x", "pc"),)
    # changed, it is tried again: still refused -> quarantined again; fixed -> applied
    c.policy("x", "pc", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="zz")}]}]})
    assert dp.sync().quarantined == (("x", "pc"),)
    fake.refuse = None
    c.policy("x", "pc", {"podSelector": sel(pod="a"), "ingress": []})
    r = dp.sync()
    assert r.quarantined == () and "ingress-x/pc" in fake.state()[0]
    synced_equal(c, fake, dp)
    c.policy("x", "pz", {"podSelector": sel(pod="a"), "ingress": []})
    fake.refuse = "ingress-x/pz"
    assert dp.sync().quarantined == (("x", "pz"),)
    c.model.set_policy(("x", "pz"), None)            # deleted: out of quarantine
    assert dp.sync().quarantined == ()


def test_a_kernel_that_refuses_everything_blames_nobody(env):
    c, fake, dp = env
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": []})
    fake.refuse = "add table"
    with pytest.raises(NftError):
        dp.sync()
    assert dp.quarantine == {} and not dp.synced
    fake.refuse = None
    assert dp.sync().full


def test_cleanup_and_drop_counts(env):
    c, fake, dp = env
    assert dp.drop_counts() == {"ingress": 0, "egress": 0}          # no table yet
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": []})
    dp.sync()
    fake.counters["ingress-drops"] = 7
    assert dp.drop_counts() == {"ingress": 7, "egress": 0}
    dp.cleanup()
    assert T not in fake.tables and not dp.synced
    dp.cleanup()                                     # absent: no error
    assert dp.sync().full


def test_isolate_finds_every_refused_suspect():
    def trial_for(bad):
        def trial(group):
            hit = [k for k in group if k in bad]
            if hit:
                raise Refused("refused %s" % hit[0][1])
        return trial
    keys = [("x", "p%02d" % i) for i in range(40)]
    assert nt.isolate(keys, trial_for({keys[7]}), lambda: None) == [(keys[7], "refused p07")]
    found = nt.isolate(keys, trial_for({keys[0], keys[33], keys[39]}), lambda: None)
    assert [k for k, _ in found] == [keys[0], keys[33], keys[39]]
    assert nt.isolate(keys, trial_for(set()), lambda: None) == []

    def refuse_everything():
        raise Refused("everything")
    with pytest.raises(Refused, match="refused p00"):      # nothing passed and the control fails too
        nt.isolate(keys[:1], trial_for({keys[0]}), refuse_everything)


# ---- whole-system properties ----------------------------------------------------------------------------------

PROBES = (("TCP", 80), ("TCP", 81), ("UDP", 53), ("UDP", 80), ("TCP", 53), ("SCTP", 80))
EXTERNAL = ("10.0.0.7", "10.0.0.12", "192.0.2.1", "fd00::7", "192.168.0.1", "192.168.0.2")


def ipvs_path(src, src_pod, dst_pod):
    """[(node, hook)] a new connection meets when a Service in kube-proxy's IPVS mode chose
    endpoint dst: output on the node whose IPVS sent it on (the client pod's, the node's own
    for its traffic, the endpoint's for an outside client of its NodePort), then forward on
    the endpoint's node when that is another."""
    sender = src_pod.node if src_pod else {ip: n for n, ip in NODE_IPS.items()}.get(
        src, dst_pod.node if dst_pod else "node1")
    path = [(sender, "output")]
    if dst_pod is not None and dst_pod.node != sender:
        path.append((dst_pod.node, "forward"))
    return path


def compare_with_verdict(namespaces, pods, policies):
    """Routed pod to pod (forward on both nodes) and through IPVS (ipvs_path): the rendered
    rules decide as verdict() does."""
    models = {n: load(n, namespaces, pods, policies) for n in ("node1", "node2")}
    interp = {n: interpreter(nt.render_table(models[n]), local=[NODE_IPS[n]]) for n in models}
    model = models["node1"]
    addresses = sorted({p["ip"] for o in pods for p in o["status"]["podIPs"]} | set(EXTERNAL))
    for src in addresses:
        for dst in addresses:
            if src == dst or (":" in src) != (":" in dst):
                continue
            src_pod, dst_pod = model._pod_at(src), model._pod_at(dst)
            if src_pod and dst in src_pod.host_ips:
                continue                    # IPVS delivers an endpoint on the node itself locally: no hook of ours
            from_own_node = dst_pod and src in dst_pod.host_ips     # through forward: never (INPUT/OUTPUT)
            nodes = {p.node for p in (src_pod, dst_pod) if p is not None}
            for proto, port in PROBES:
                want = model.verdict(src, dst, proto, port)
                pkt = Packet(src, dst, proto, port)
                if not from_own_node:
                    got = all(interp[n].accepts(pkt) for n in nodes)
                    assert got == want.allowed, (src, dst, proto, port, want)
                got = all(interp[n].accepts(pkt, hook) for n, hook in ipvs_path(src, src_pod, dst_pod))
                assert got == want.allowed, ("ipvs", src, dst, proto, port, want)
        for node, ip in NODE_IPS.items():           # the node's own traffic, anywhere: never judged
            if (":" in src) == (":" in ip) and src != ip:
                assert all(interp[node].accepts(Packet(ip, src, proto, port), "output") for proto, port in PROBES)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_rendered_rules_agree_with_the_reference_evaluator(cluster):
    compare_with_verdict(*cluster)


def test_rendered_rules_agree_on_the_upstream_layout():
    """x, y, z with a, b, c and a few upstream-style policies, the whole 9x9 matrix per probe."""
    namespaces = [ns_obj(n, ns=n) for n in "xyz"]
    pods = [pod_obj(ns, p, "10.0.0.%d" % (i * 3 + j + 1), {"pod": p}, node="node%d" % (j % 2 + 1),
                    ports=[{"name": "serve-80-tcp", "containerPort": 80}, {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}],
                    host_ip=NODE_IPS["node%d" % (j % 2 + 1)])
            for i, ns in enumerate("xyz") for j, p in enumerate("abc")]
    policies = [
        pol_obj("x", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        pol_obj("x", "allow-dns", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
        pol_obj("x", "a-from-y", {"podSelector": sel(pod="a"), "ingress": [{"from": [
            {"namespaceSelector": sel(ns="y"), "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}],
            "ports": [{"port": "serve-80-tcp"}, {"port": 81, "protocol": "UDP"}]}]}),
        pol_obj("x", "b-to-z", {"podSelector": sel(pod="b"), "egress": [{"to": [{"namespaceSelector": sel(ns="z")}],
                                                                       "ports": [{"port": 80, "endPort": 81}]}]}),
        pol_obj("y", "cidr", {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/28", "except": ["10.0.0.0/30"]}}]}]}),
    ]
    compare_with_verdict(namespaces, pods, policies)


@st.composite
def change_runs(draw):
    """A cluster and a sequence of changes to it, applied between syncs."""
    namespaces, pods, policies = draw(clusters())
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["relabel", "delete-pod", "readd-pod", "ns-labels", "policy", "delete-policy",
                                     "full"]))
        if kind in ("relabel", "delete-pod", "readd-pod"):
            steps.append((kind, draw(st.sampled_from(pods)), draw(labels_strategy({"app": ["a", "b"], "tier": ["w"]}))))
        elif kind == "ns-labels":
            steps.append((kind, draw(st.sampled_from(namespaces)), draw(labels_strategy({"team": ["t1", "t2"], "env": ["p"]}))))
        elif kind in ("policy", "delete-policy"):
            target = draw(st.sampled_from(policies)) if policies and draw(st.booleans()) else None
            steps.append((kind, target, draw(POLICY_SPEC)))
        else:
            steps.append((kind, None, None))
    return namespaces, pods, policies, steps


def apply_step(model, step, counter):
    kind, obj, extra = step
    if kind == "relabel":
        o = copy.deepcopy(obj)
        o["metadata"]["labels"] = extra
        model.set_pod((o["metadata"]["namespace"], o["metadata"]["name"]), m.parse_pod(o))
    elif kind == "delete-pod":
        model.set_pod((obj["metadata"]["namespace"], obj["metadata"]["name"]), None)
    elif kind == "readd-pod":
        model.set_pod((obj["metadata"]["namespace"], obj["metadata"]["name"]), m.parse_pod(obj))
    elif kind == "ns-labels":
        name = obj["metadata"]["name"]
        model.set_namespace(name, m.parse_namespace(ns_obj(name, **extra)))
    elif kind == "policy":
        if obj is None:
            counter[0] += 1
            obj = pol_obj("x", "new%d" % counter[0], extra)
        o = copy.deepcopy(obj)
        o["spec"] = extra
        model.set_policy((o["metadata"]["namespace"], o["metadata"]["name"]), m.parse_policy(o))
    elif kind == "delete-policy" and obj is not None:
        model.set_policy((obj["metadata"]["namespace"], obj["metadata"]["name"]), None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(change_runs(), st.sampled_from([nt.REWRITE_LIMIT, 0]))
def test_partial_syncs_leave_what_a_full_render_says(run, rewrite_limit):
    namespaces, pods, policies, steps = run
    model = load("node1", namespaces, pods, policies)
    fake = FakeKernel()
    dp = nt.NftablesDataplane(model, runner=fake)
    saved = nt.REWRITE_LIMIT
    nt.REWRITE_LIMIT = rewrite_limit
    try:
        assert dp.sync().full
        counter = [0]
        for step in steps:
            apply_step(model, step, counter)
            r = dp.sync(full=step[0] == "full")
            assert r.full == (step[0] == "full"), "a partial sync was refused: %s" % dp.last_text
            assert r.quarantined == ()
            assert fake.state() == rendered_state(nt.render_table(model)), (step, dp.last_text)
            if step[0] in ("relabel", "delete-pod", "readd-pod", "ns-labels"):
                # no chain written (a stale one may be deleted when `delete element` pays nft's listing)
                assert "add chain" not in dp.last_text and "flush chain" not in dp.last_text
    finally:
        nt.REWRITE_LIMIT = saved
