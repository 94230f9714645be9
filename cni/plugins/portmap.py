"""portmap: forward host ports to a container, as a chained plugin (iptables nat).

Reads the container's addresses from prevResult (per family, the first
address of the interface CNI_IFNAME in the sandbox) and
runtimeConfig.portMappings = [{hostPort, containerPort, protocol, hostIP}],
and builds the reference plugin's (containernetworking/plugins 1.1.1) rules
in the nat table, same chains, names and comments, so operators' knowledge
and either plugin's DEL apply:

    PREROUTING, OUTPUT  -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
    CNI-HOSTPORT-DNAT   -m comment "dnat name: .. id: .." -m multiport -p tcp
                        --dports 8080,... -j CNI-DN-<hash>         (one per container)
    CNI-DN-<hash>       -s <pod subnet> -p tcp --dport 8080 -j CNI-HOSTPORT-SETMARK
                        -s 127.0.0.1 -p tcp --dport 8080 -j CNI-HOSTPORT-SETMARK  (IPv4)
                        -p tcp --dport 8080 -j DNAT --to-destination <pod>:80
    CNI-HOSTPORT-SETMARK  -j MARK --set-xmark 0x2000/0x2000      (1 << markMasqBit)
    POSTROUTING (first) -j CNI-HOSTPORT-MASQ
    CNI-HOSTPORT-MASQ   -m mark --mark 0x2000/0x2000 -j MASQUERADE

CNI-DN-<hash> is "CNI-DN-" + sha512(network name + container ID), 28
characters; ADD passes prevResult through unchanged.

How it differs from the reference, deliberately:
- One `iptables-restore --noflush` per family applies an ADD atomically (the
  reference runs ~15 iptables processes). The shared chains are created with
  `-N` only when an iptables-save read just before showed them absent (a
  `:CHAIN` line would flush them), so a racing writer makes the restore fail
  rather than wipe other pods' rules; the plugin then re-reads and retries.
  ADDs in one network namespace are serialised by a lock (an abstract unix
  socket name, scoped to the netns) so that the conflict check below and the
  apply see the same table.
- A host port already mapped by another container (same protocol, same or
  wildcard hostIP, visible as a DNAT rule in a CNI-DN- chain jumped to from
  CNI-HOSTPORT-DNAT) fails the ADD with code 103 naming the other
  container, instead of silently capturing its traffic (the reference is
  last-write-wins). Two entries of one request that map the same host port
  are refused as well (code 7).
- Input is validated before anything is touched (code 7): protocol must be
  tcp, udp or sctp (case-insensitive; missing means tcp, where the reference
  runs `iptables -p ""` and fails half-way), ports 1-65535, hostIP an
  address, conditions strings without control characters. With port
  mappings but no container address in prevResult the ADD fails (the
  reference silently does nothing).
- A failed ADD removes what it made (the other family's rules, too); a
  failed rerun keeps the rules the running container already had.
- DEL needs only network name and container ID (no netns, no prevResult, a
  valid config not even): iptables-save + one restore per family. It also
  deletes the conntrack entries of the mapped UDP host ports whose DNAT rule
  ever matched a packet (the rule counters say), so an established UDP flow
  stops reaching the old container at once; the reference does that on ADD
  only (we do both; ADD skips it when the namespace tracks nothing). This
  goes through ctnetlink: no `conntrack` tool is needed. Like the
  reference, a DEL whose config has no portMappings does nothing.
- CHECK fails when the container's chain is missing (the reference's CHECK
  returns success then) and checks all rules in one `iptables-restore` of
  `-C` lines.
- Comments are cut as the reference's trimComment does for long container
  IDs (253 characters and "...", of which iptables keeps 255): the same rules.
- Conditions iptables-restore cannot take are refused (code 7) before anything
  is touched: an argument longer than 1,000 characters, or more than 4,000 in all.
  (The words themselves are iptables', which judges them: a "-j" may well be the
  value of a --comment.)
- GC (spec 1.1.0; the reference 1.1.1 has none) removes the CNI-DN- chains, and
  the jumps to them, of this network's containers that are not in
  cni.dev/valid-attachments. A chain is this network's when the comment of its
  CNI-HOSTPORT-DNAT jump names the network (and, for a comment not cut short,
  the chain's name is that container's hash). One restore per family.
- masqAll (added after 1.1.1) is not supported.
"""
from __future__ import annotations

from cni import errors
from cni.errors import CNIError
from cni.iptables_names import MAX_COMMENT_LEN, chain_name, owned_chains, removal_input
from podnet.net.ip import AF_INET, AF_INET6, parse_cidr, parse_ip

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cni.skel import Commands

DNAT_CHAIN = "CNI-HOSTPORT-DNAT"
SETMARK_CHAIN = "CNI-HOSTPORT-SETMARK"
MASQ_CHAIN = "CNI-HOSTPORT-MASQ"
DEFAULT_MARK_BIT = 13           # Kubernetes uses 14 and 15, Calico 20-31
PROTOCOLS = ("tcp", "udp", "sctp")
MULTIPORT_MAX = 15              # ports one `-m multiport` match takes
LOCK_NAME = b"\0podnet-portmap-lock"   # abstract: per network namespace
_ATTEMPTS = 3                   # restore attempts when the table changed under us

_SETMARK_COMMENT = "CNI portfwd masquerade mark"
_COMMENT_PREFIX = "dnat "
MAX_CONDITION_LEN = 1000        # iptables-restore refuses longer words ("Parameter too long!")
MAX_CONDITIONS_LEN = 4000       # and cuts lines at 10 KiB; a rule carries other words too
_MASQ_COMMENT = "CNI portfwd requiring masquerade"
_ENTRY_CHAINS = ("PREROUTING", "OUTPUT")


def _invalid(msg, details=""):
    return CNIError(errors.INVALID_NETCONF, msg, details)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


# ---- configuration ----------------------------------------------------------

class Mapping:
    """One validated portMappings entry."""

    __slots__ = ("host_port", "container_port", "protocol", "host_ip", "family")

    def __init__(self, host_port, container_port, protocol, host_ip, family):
        self.host_port = host_port
        self.container_port = container_port
        self.protocol = protocol
        self.host_ip = host_ip      # canonical text of a specific address, or None
        self.family = family        # family of hostIP (also for 0.0.0.0 / ::), or None

    def __repr__(self):
        return "Mapping(%s %s:%d -> %d)" % (self.protocol, self.host_ip or "*", self.host_port,
                                            self.container_port)


def _field(entry, key):
    """entry[key] as Go's JSON decoder finds it, which the reference relies on: the exact key,
    else one differing only in case. containerd 1.6 sends its Go struct's field names
    ("HostPort", "ContainerPort", "Protocol", "HostIP": its libcni struct has no JSON tags)."""
    if key in entry:
        return entry[key]
    folded = key.lower()
    for name, value in entry.items():
        if isinstance(name, str) and name.lower() == folded:
            return value
    return None


def _port(entry, key, index):
    value = _field(entry, key)
    if not _is_int(value) or not 0 < value <= 65535:
        what = "host" if key == "hostPort" else "container"
        raise _invalid("Invalid %s port number: %s" % (what, "missing" if value is None else repr(value)),
                       "portMappings[%d].%s must be an integer in 1-65535" % (index, key))
    return value


def parse_mapping(entry, index):
    if not isinstance(entry, dict):
        raise _invalid("portMappings[%d] is not an object" % index)
    host_port = _port(entry, "hostPort", index)
    container_port = _port(entry, "containerPort", index)
    protocol = _field(entry, "protocol")
    if protocol is None or protocol == "":
        protocol = "tcp"
    if not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
        raise _invalid("Unknown protocol %r in portMappings[%d]" % (protocol, index),
                       "protocol must be tcp, udp or sctp")
    host_ip = _field(entry, "hostIP")
    family = None
    if host_ip is not None and host_ip != "":
        try:
            ip = parse_ip(host_ip)
        except ValueError:
            raise _invalid("Invalid hostIP %r in portMappings[%d]" % (host_ip, index)) from None
        family = ip.family
        host_ip = str(ip) if ip.value else None     # 0.0.0.0 / ::: any address of that family
    else:
        host_ip = None
    return Mapping(host_port, container_port, protocol.lower(), host_ip, family)


def _conditions(conf, key):
    value = conf.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _invalid("%s must be a list of strings" % key)
    for arg in value:
        if any(ord(c) < 32 or ord(c) == 127 for c in arg):
            raise _invalid("%s: control character in argument %r" % (key, arg))
        if len(arg) > MAX_CONDITION_LEN:
            raise _invalid("%s: an argument is too long for iptables (%d characters, at most %d)"
                           % (key, len(arg), MAX_CONDITION_LEN))
    if sum(len(arg) + 3 for arg in value) > MAX_CONDITIONS_LEN:
        raise _invalid("%s: too long for iptables (at most %d characters in all)" % (key, MAX_CONDITIONS_LEN))
    return value


def _check_chain_name(name):
    if not isinstance(name, str) or not 0 < len(name) <= 28 or name.startswith("-") \
            or any(c.isspace() or c in "\"'\\!" or ord(c) < 32 for c in name):
        raise _invalid("invalid externalSetMarkChain %r" % (name,))
    return name


class PortMapConf:
    """portmap's part of the network config.

    strict=False (DEL) never fails on its input: a DEL must be able to clean
    up after an ADD that refused it (it needs only name and container ID).
    """

    def __init__(self, args, strict=True):
        c = args.conf
        self.name = c["name"]
        self.container_id = args.container_id
        self.chain = chain_name(self.name, self.container_id, "DN-")
        self.valid = True           # everything parsed (always, when strict)
        self.snat, self.mark, self.external = True, "", None
        self.conditions = {AF_INET: [], AF_INET6: []}
        self.raw_mappings, self.mappings = [], []
        self.prev, self.ips = None, {}      # ips: family -> IPNet of the container
        for part in (self._options, self._mappings, self._prev_result):
            try:
                part(args, c, strict)
            except CNIError:
                if strict:
                    raise
                self.valid = False
        if not self.valid:
            self.raw_mappings = self.raw_mappings or [None]    # unknown: clean up anyway
        self.setmark_chain = self.external or SETMARK_CHAIN

    def _options(self, args, c, strict):
        snat = c.get("snat")
        if snat is not None and not isinstance(snat, bool):
            raise _invalid("snat must be a boolean, not %r" % (snat,))
        self.snat = True if snat is None else snat
        mark_bit, external = c.get("markMasqBit"), c.get("externalSetMarkChain")
        if mark_bit is not None and external is not None:
            raise _invalid("Cannot specify externalSetMarkChain and markMasqBit")
        if mark_bit is None:
            mark_bit = DEFAULT_MARK_BIT
        if not _is_int(mark_bit) or not 0 <= mark_bit <= 31:
            raise _invalid("MasqMarkBit must be between 0 and 31", "markMasqBit is %r" % (mark_bit,))
        self.mark = "%#x/%#x" % (1 << mark_bit, 1 << mark_bit)
        self.external = _check_chain_name(external) if external is not None else None
        self.conditions = {AF_INET: _conditions(c, "conditionsV4"),
                           AF_INET6: _conditions(c, "conditionsV6")}

    def _mappings(self, args, c, strict):
        runtime = c.get("runtimeConfig")
        if runtime is not None and not isinstance(runtime, dict):
            raise _invalid("runtimeConfig must be an object")
        raw = (runtime or {}).get("portMappings")
        if raw is not None and not isinstance(raw, list):
            raise _invalid("runtimeConfig.portMappings must be a list")
        self.raw_mappings = raw or []
        for i, entry in enumerate(self.raw_mappings):
            try:
                self.mappings.append(parse_mapping(entry, i))
            except CNIError:
                if strict:
                    raise
                self.valid = False
        if strict:
            for family in (AF_INET, AF_INET6):
                _check_duplicates(self.for_family(family))

    def _prev_result(self, args, c, strict):
        prev = c.get("prevResult")
        if prev is not None:
            from cni.types import from_version
            self.prev = from_version(prev, args.version)
            self.ips = container_ips(self.prev, args.ifname)

    def for_family(self, family):
        """The mappings that apply to one family (a hostIP restricts to its own)."""
        return [m for m in self.mappings if m.family is None or m.family == family]

    def comment(self):
        """As the reference's (253 characters and "..." when longer), as iptables keeps it."""
        text = '%sname: "%s" id: "%s"' % (_COMMENT_PREFIX, self.name, self.container_id)
        return text if len(text) <= MAX_COMMENT_LEN else (text[:253] + "...")[:MAX_COMMENT_LEN]


def _check_duplicates(mappings):
    seen = []
    for m in mappings:
        for other in seen:
            if (other.protocol == m.protocol and other.host_port == m.host_port
                    and (other.host_ip is None or m.host_ip is None or other.host_ip == m.host_ip)):
                raise _invalid("portMappings map host port %s/%d twice" % (m.protocol, m.host_port),
                               "%r and %r" % (other, m))
        seen.append(m)


def container_ips(result, ifname):
    """family -> IPNet: per family the first address on the sandbox interface
    `ifname` (addresses of other interfaces are skipped, as the reference)."""
    out = {}
    ifaces = result["interfaces"]
    for ipc in result["ips"]:
        try:
            net = parse_cidr(ipc["address"])
        except ValueError:
            raise CNIError(errors.DECODING_FAILURE, "prevResult: invalid address %r" % ipc["address"]) from None
        if net.family in out:
            continue
        index = ipc.get("interface")
        if index is not None and 0 <= index < len(ifaces):
            iface = ifaces[index]
            if iface.get("name") != ifname or not iface.get("sandbox"):
                continue
        out[net.family] = net
    return out


# ---- rules ------------------------------------------------------------------

def _arg(text):
    """One argument for restore input: quoted when it would not survive as a word."""
    from podnet.net.iptables import quote
    if text and not any(c.isspace() or c in "\"'\\" for c in text):
        return text
    return quote(text)


def shared_rules(conf):
    """(chain, rules) of the shared chains this config needs, rules as iptables-save prints them."""
    out = []
    if conf.snat and conf.external is None:
        out.append((SETMARK_CHAIN, ['-A %s -m comment --comment "%s" -j MARK --set-xmark %s'
                                    % (SETMARK_CHAIN, _SETMARK_COMMENT, conf.mark)]))
        out.append((MASQ_CHAIN, ["-A %s -m mark --mark %s -j MASQUERADE" % (MASQ_CHAIN, conf.mark)]))
    out.append((DNAT_CHAIN, []))
    return out


def jump_rules(conf):
    """(rule as iptables-save prints it, how to add it) of the jumps into the shared chains."""
    out = []
    if conf.snat and conf.external is None:
        rule = '-A POSTROUTING -m comment --comment "%s" -j %s' % (_MASQ_COMMENT, MASQ_CHAIN)
        out.append((rule, "-I POSTROUTING 1" + rule[len("-A POSTROUTING"):]))   # before bridge/ptp masquerade
    for entry in _ENTRY_CHAINS:
        rule = "-A %s -m addrtype --dst-type LOCAL -j %s" % (entry, DNAT_CHAIN)
        out.append((rule, rule))
    return out


def dnat_rules(conf, family, cnet):
    """The container chain's rules, exactly as iptables-save prints them."""
    v6 = family == AF_INET6
    host_len = 128 if v6 else 32
    source = "%s/%d" % (cnet.masked().ip, cnet.prefixlen)     # the pod's subnet, as the reference
    target = ("[%s]:" if v6 else "%s:") % cnet.ip
    rules = []
    for m in conf.for_family(family):
        base = "-p %s -m %s --dport %d" % (m.protocol, m.protocol, m.host_port)
        if m.host_ip:
            base = "-d %s/%d %s" % (m.host_ip, host_len, base)
        if conf.snat:
            rules.append("-A %s -s %s %s -j %s" % (conf.chain, source, base, conf.setmark_chain))
            if not v6:
                rules.append("-A %s -s 127.0.0.1/32 %s -j %s" % (conf.chain, base, conf.setmark_chain))
        rules.append("-A %s %s -j DNAT --to-destination %s%d" % (conf.chain, base, target, m.container_port))
    unique = []
    for rule in rules:          # an identical rule is added once (the reference's InsertUnique)
        if rule not in unique:
            unique.append(rule)
    return unique


def entry_rules(conf, family):
    """CNI-HOSTPORT-DNAT -> container chain, in the reference's argument order.

    Like the reference, the multiport lists hold the host ports of all
    mappings of a protocol, also those whose hostIP is of the other family.
    """
    by_proto = {}
    for m in conf.mappings:
        by_proto.setdefault(m.protocol, []).append(str(m.host_port))
    comment = _arg(conf.comment())
    conditions = " ".join(_arg(a) for a in conf.conditions[family])
    rules = []
    for proto in sorted(by_proto):
        ports = by_proto[proto]
        for i in range(0, len(ports), MULTIPORT_MAX):
            rule = "-A %s -m comment --comment %s -m multiport -p %s --destination-ports %s" % (
                DNAT_CHAIN, comment, proto, ",".join(ports[i:i + MULTIPORT_MAX]))
            if conditions:
                rule += " " + conditions
            rules.append(rule + " -j " + conf.chain)
    return rules


def add_restore_input(conf, family, cnet, saved):
    """Restore input that makes the table `saved` hold this container's mappings."""
    from podnet.net.iptables import chain_exists, rules_jumping_to
    lines = set(saved.splitlines())
    out = ["*nat"]
    for chain, rules in shared_rules(conf):
        if not chain_exists(saved, chain):
            out.append("-N " + chain)       # fails if it appeared meanwhile: never flushes it
        out += [r for r in rules if r not in lines]
    out += [add for rule, add in jump_rules(conf) if rule not in lines]
    # A repeated ADD: drop the old jumps to our chain, then rebuild the chain.
    out += ["-D" + r[2:] for r in rules_jumping_to(saved, conf.chain)
            if not r.startswith("-A %s " % conf.chain)]
    out.append(":%s - [0:0]" % conf.chain)
    out += dnat_rules(conf, family, cnet)
    out += entry_rules(conf, family)
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def diff_del_input(saved, chains):
    """Removal of `chains` and every rule jumping to them, from a table read, as one
    transaction; None if none exist."""
    return removal_input(saved, chains)


def mapped_ports(saved, own_chain):
    """[(protocol, host port, host IP or None, chain, comment)] of the other containers'
    DNAT rules that are live (their chain is jumped to from CNI-HOSTPORT-DNAT)."""
    from podnet.net.iptables import jump_target, split_rule
    owners = {}
    dnats = []
    for line in saved.splitlines():
        if line.startswith("-A %s " % DNAT_CHAIN):
            args = split_rule(line)
            target = jump_target(args)
            if target is not None:
                comment = args[args.index("--comment") + 1] if "--comment" in args else ""
                owners.setdefault(target, comment)
        elif line.startswith("-A CNI-DN-") and " -j DNAT " in line:
            dnats.append(split_rule(line))
    out = []
    for args in dnats:
        chain = args[1]
        if chain == own_chain or chain not in owners or "-p" not in args or "--dport" not in args:
            continue
        host_ip = args[args.index("-d") + 1].split("/")[0] if "-d" in args else None
        try:
            port = int(args[args.index("--dport") + 1])
        except ValueError:
            continue
        out.append((args[args.index("-p") + 1], port, host_ip, chain, owners[chain]))
    return out


def check_conflicts(conf, family, saved):
    taken = mapped_ports(saved, conf.chain)
    for m in conf.for_family(family):
        for proto, port, host_ip, chain, comment in taken:
            if proto == m.protocol and port == m.host_port and (
                    host_ip is None or m.host_ip is None or host_ip == m.host_ip):
                raise CNIError(errors.HOST_PORT_IN_USE,
                               "host port %s/%d%s is already mapped by another container"
                               % (m.protocol, m.host_port, " on " + m.host_ip if m.host_ip else ""),
                               "chain %s (%s)" % (chain, comment or "no comment"))


# ---- the kernel -------------------------------------------------------------

def _lock(timeout=30.0):
    """A lock serialising portmap ADDs within this network namespace: binding an
    abstract unix socket name, which the kernel scopes to the netns and frees
    when the socket closes, even if the process dies. Returns the socket;
    closing it unlocks. No file is left anywhere."""
    import _socket
    import time
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.bind(LOCK_NAME)
            return sock
        except OSError as e:
            if e.errno != 98:      # EADDRINUSE: another ADD holds it
                sock.close()
                raise
        if time.monotonic() > deadline:
            sock.close()
            raise CNIError(errors.TRY_AGAIN_LATER, "portmap: another ADD held the lock for %ds" % timeout)
        time.sleep(0.002)


def _save(family, counters=False):
    from podnet.net import iptables
    try:
        return iptables.save("nat", ipv6=family == AF_INET6, counters=counters)
    except TimeoutError as e:
        raise CNIError(errors.TRY_AGAIN_LATER, "could not read the nat table: %s" % e) from None
    except (iptables.IptablesError, OSError) as e:
        raise CNIError(errors.KERNEL, "could not read the nat table: %s" % e) from None


def _apply(conf, family, cnet, saved):
    """Render against `saved` and restore; on failure re-read and retry."""
    from podnet.net import iptables
    for attempt in range(_ATTEMPTS):
        if attempt:
            saved = _save(family)
            check_conflicts(conf, family, saved)
        text = add_restore_input(conf, family, cnet, saved)
        try:
            _restore(text, family)
            return
        except iptables.IptablesError as e:
            refused = refused_conditions(conf, family, text, str(e))
            if refused is not None:
                raise refused from None
            error = e
    raise CNIError(errors.KERNEL, "could not add the port mappings: %s" % error)


def _failed_line(message):
    """The input line number an iptables-restore error names ("line 3 failed", "Error
    occurred at line: 3"), or 0."""
    for marker in ("line ", "line: "):
        at = message.find(marker)
        words = message[at + len(marker):].split() if at >= 0 else []
        digits = words[0].rstrip(":") if words else ""
        if digits.isdigit():
            return int(digits)
    return 0


def refused_conditions(conf, family, text, message):
    """INVALID_NETCONF if the restore of `text` failed on a rule carrying this family's
    conditions (iptables judges their words: its refusal is the config's fault); else None."""
    conditions = conf.conditions[family]
    line = _failed_line(message)
    lines = text.splitlines()
    if not conditions or not 0 < line <= len(lines) or not lines[line - 1].startswith("-A %s " % DNAT_CHAIN):
        return None
    key = "conditionsV6" if family == AF_INET6 else "conditionsV4"
    return _invalid("iptables refused the rule with %s: %s" % (key, message.splitlines()[0][:200]),
                    " ".join(conditions)[:500])


def teardown(conf, family):
    """Remove this container's chain and the rules jumping to it; a no-op if absent.

    Returns the host ports of the chain's UDP DNAT rules that ever matched a
    packet: only for those can conntrack hold flows sent to the container.
    """
    from podnet.net import iptables
    old_snat = chain_name(conf.name, conf.container_id, "SN-")   # made by old reference versions
    for attempt in range(2):
        saved, packets = iptables.split_counters(_save(family, counters=True))
        udp_used = _udp_ports_used(packets, (conf.chain,))
        text = diff_del_input(saved, (conf.chain, old_snat))
        if text is None:
            return udp_used
        try:
            _restore(text, family)
            return udp_used
        except iptables.IptablesError as e:
            if attempt:
                raise CNIError(errors.KERNEL, "could not remove the port mappings: %s" % e) from None


def _udp_ports_used(packets, chains):
    """Host ports of the UDP DNAT rules of `chains` that ever matched a packet."""
    from podnet.net.iptables import split_rule
    heads = tuple("-A %s " % chain for chain in chains)
    used = set()
    for rule, n in packets.items():
        if n and heads and rule.startswith(heads) and " -p udp " in rule and " -j DNAT " in rule:
            args = split_rule(rule)
            if "--dport" in args:
                try:
                    used.add(int(args[args.index("--dport") + 1]))
                except (ValueError, IndexError):
                    pass
    return used


def _restore(text, family):
    """iptables-restore; a lock or process timeout is "try again later" (code 11)."""
    from podnet.net import iptables
    try:
        iptables.restore(text, ipv6=family == AF_INET6)
    except TimeoutError as e:
        raise CNIError(errors.TRY_AGAIN_LATER, "iptables-restore did not finish: %s" % e) from None


def stale_chains(saved, network, valid_ids):
    """This network's CNI-DN- chains (jumped to from CNI-HOSTPORT-DNAT with a comment
    naming the network) whose container is not one of `valid_ids`."""
    keep = {chain_name(network, cid, "DN-") for cid in valid_ids}
    owned = owned_chains(saved, DNAT_CHAIN, network, _COMMENT_PREFIX, "DN-")
    return [chain for chain in owned if chain not in keep]


def _routable_host_if(ip):
    """The name of the interface the node routes `ip` through, or None."""
    from podnet.net.netlink import Netlink, NetlinkError
    try:
        with Netlink() as nl:
            route = nl.route_get(ip)
            if route is not None and route.oif:
                link = nl.link(index=route.oif)
                return link.name if link else None
    except (NetlinkError, OSError):
        pass
    return None


def _flush_udp_conntrack(conf, families, ports=None):
    """Best effort, as the reference: failures are reported on stderr only."""
    if ports is None:
        ports = {m.host_port for m in conf.mappings if m.protocol == "udp"}
    if not ports:
        return
    try:
        from podnet.net.conntrack import delete_by_dst_port
        delete_by_dst_port("udp", ports, families)
    except OSError as e:
        import sys
        sys.stderr.write("portmap: could not delete stale UDP conntrack entries: %s\n" % e)


# ---- commands ---------------------------------------------------------------

def cmd_add(args):
    conf = PortMapConf(args)
    if conf.prev is None:
        raise _invalid("must be called as chained plugin", "prevResult is missing")
    if not conf.mappings:
        return conf.prev
    if not conf.ips:
        raise _invalid("prevResult has no address of interface %s in the sandbox to forward to"
                       % args.ifname)
    from podnet.net.iptables import chain_exists
    families = sorted(conf.ips)
    lock = _lock()
    created = []        # families where this ADD made the chain: undone if a later step fails
    try:
        saved = {f: _save(f) for f in families}
        for f in families:          # all checks before any change
            check_conflicts(conf, f, saved[f])
        for f in families:
            if not chain_exists(saved[f], conf.chain):
                created.append(f)   # (a failed rerun keeps what the running pod uses)
            _apply(conf, f, conf.ips[f], saved[f])
        if conf.snat and AF_INET in conf.ips:
            # Let 127.0.0.1 leave through the pods' interface (localhost -> hostPort).
            ifname = _routable_host_if(conf.ips[AF_INET].ip)
            if ifname:
                from podnet.net import sysctl
                try:
                    sysctl.write("net/ipv4/conf/%s/route_localnet" % ifname, "1")
                except OSError as e:
                    raise CNIError(errors.KERNEL, "unable to enable route_localnet on %s: %s"
                                   % (ifname, e.strerror)) from None
    except BaseException:
        for f in created:
            try:
                teardown(conf, f)
            except Exception:       # report the original error
                pass
        raise
    finally:
        lock.close()
    # After the rules: new packets of a stale UDP flow now take the new path.
    _flush_udp_conntrack(conf, families)
    return conf.prev


def cmd_del(args):
    conf = PortMapConf(args, strict=False)
    if not conf.raw_mappings:
        return None
    used = {f: teardown(conf, f) for f in (AF_INET, AF_INET6)}
    families = [f for f in used if used[f]]
    if families:    # UDP flows went to the container: stop them reaching it at once
        _flush_udp_conntrack(conf, families, ports=set().union(*used.values()))
    return None


def cmd_gc(args):
    """Remove the port mappings of this network's attachments that are not valid any more
    (spec 1.1.0 GC): their CNI-DN- chains and the jumps to them, one restore per family."""
    from cni.skel import valid_attachments
    from podnet.net import iptables
    network = args.conf["name"]
    valid = {cid for cid, _ in valid_attachments(args.conf)}
    used = {}
    for family in (AF_INET, AF_INET6):
        for attempt in range(2):      # the table changed between read and write: read again
            saved, packets = iptables.split_counters(_save(family, counters=True))
            owned = owned_chains(saved, DNAT_CHAIN, network, _COMMENT_PREFIX, "DN-")
            stale = stale_chains(saved, network, valid)
            # chains of older reference versions, for the containers whose ID the comment holds
            old = [chain_name(network, owned[c], "SN-") for c in stale if owned[c]]
            text = diff_del_input(saved, stale + old)
            if text is None:
                break
            try:
                _restore(text, family)
                used[family] = _udp_ports_used(packets, stale)
                break
            except iptables.IptablesError as e:
                if attempt:
                    raise CNIError(errors.KERNEL, "could not remove stale port mappings: %s" % e) from None
    families = [f for f in used if used[f]]
    if families:    # UDP flows went to those containers: stop them reaching the addresses
        _flush_udp_conntrack(None, families, ports=set().union(*used.values()))
    return None


def cmd_check(args):
    from podnet.net import iptables
    conf = PortMapConf(args)
    if conf.prev is None:
        raise _invalid("Required prevResult missing")
    if not conf.mappings:
        return None
    for family in sorted(conf.ips):
        rules = dnat_rules(conf, family, conf.ips[family]) + entry_rules(conf, family)
        for _, shared in shared_rules(conf):
            rules += shared
        rules += [rule for rule, _ in jump_rules(conf)]
        text = "*nat\n" + "".join("-C" + r[2:] + "\n" for r in rules) + "COMMIT\n"
        try:
            _restore(text, family)
        except iptables.IptablesError as e:
            raise _invalid("portmap rules of %s (IPv%d) not found" % (conf.chain, 6 if family == AF_INET6 else 4),
                           _failed_rule(str(e), rules)) from None
    return None


def _failed_rule(message, rules):
    """The rule a `-C` restore stopped at ("line N failed"), else the tool's message."""
    line = _failed_line(message)
    if 2 <= line < len(rules) + 2:
        return "missing: " + rules[line - 2]
    return message


COMMANDS: Commands = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc}


def main() -> None:
    from cni.skel import run_plugin
    run_plugin(COMMANDS, about="podnet portmap plugin")
