"""flannel's iptables rules: --ip-masq masquerading and the FORWARD accept rules.

The layout of flannel >= 0.20 (pkg/trafficmngr/iptables), so operators and
tools see what they know:

    nat     POSTROUTING -> FLANNEL-POSTRTG   (comment "flanneld masq")
      RETURN      marked by kube-proxy for its own masquerade (0x4000/0x4000): no double NAT
      RETURN      -s <our subnet> -d <network>     pod -> pod: keep the pod IP
      RETURN      -s <network> -d <our subnet>     pod -> our pod
      RETURN      ! -s <network> -d <our subnet>   outside -> our pod (e.g. NodePort): keep the client IP
      MASQUERADE  -s <network> ! -d 224.0.0.0/4    pod -> outside: the node's IP (not multicast)
      MASQUERADE  ! -s <network> -d <network>      host/outside -> another node's pod: a source
                                                   address that node can answer
    filter  FORWARD -> FLANNEL-FWD   (comment "flanneld forward")
      ACCEPT      -s <network>;  ACCEPT  -d <network>
                  so pods are forwarded even where the FORWARD policy is DROP

Rules are rendered in iptables-save's own spelling, so comparing them with
what the kernel has is a plain text comparison. apply() runs at most one
`iptables-restore --noflush` per table and nothing at all when everything is
already in place: the chains are ours, so declaring them in the restore input
(which flushes them) and listing their rules is the whole update, even after
the subnet or network changed; the jump into each is added only when missing
(read with iptables-save first), and extra copies are deleted.
"""
import logging

from podnet.net import iptables

log = logging.getLogger("flanneld.ipmasq")

POSTRTG = "FLANNEL-POSTRTG"
FWD = "FLANNEL-FWD"
KUBE_PROXY_MARK = "0x4000/0x4000"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
MULTICAST = "224.0.0.0/4"

# table -> (built-in chain, our chain, comment)
TABLES = {"nat": ("POSTROUTING", POSTRTG, MASQ_COMMENT), "filter": ("FORWARD", FWD, FWD_COMMENT)}


def _comment(text):
    return "-m comment --comment %s" % iptables.quote(text)


def jump_rule(table):
    """The rule (iptables-save spelling) jumping from the built-in chain to ours."""
    builtin, chain, comment = TABLES[table]
    return "-A %s %s -j %s" % (builtin, _comment(comment), chain)


def _rule(chain, *parts):
    """One rule from (option, network) matches and a tail, spelled as iptables-save
    prints it: a match on a /0 is no match at all and is not written; a negated
    /0 matches no packet, so the whole rule is left out (None). iptables-nft
    refuses `! -s 0.0.0.0/0` outright; a Network of 0.0.0.0/0 needs both."""
    words = ["-A", chain]
    for part in parts:
        if isinstance(part, str):
            words.append(part)
            continue
        option, net = part
        if net.prefixlen == 0:
            if option.startswith("!"):
                return None
            continue
        words += [option, str(net)]
    return " ".join(words)


def _rules(*rules):
    out = []
    for rule in rules:
        if rule is not None and rule not in out:
            out.append(rule)
    return out


def masq_rules(network, subnet, random_fully=True):
    """FLANNEL-POSTRTG's rules for the cluster `network` and this node's `subnet` (IPNets)."""
    c = _comment(MASQ_COMMENT)
    masq = "MASQUERADE --random-fully" if random_fully else "MASQUERADE"
    net, sub = network.masked(), subnet.masked()
    return _rules(
        "-A %s -m mark --mark %s %s -j RETURN" % (POSTRTG, KUBE_PROXY_MARK, c),
        _rule(POSTRTG, ("-s", sub), ("-d", net), c, "-j RETURN"),
        _rule(POSTRTG, ("-s", net), ("-d", sub), c, "-j RETURN"),
        _rule(POSTRTG, ("! -s", net), ("-d", sub), c, "-j RETURN"),
        _rule(POSTRTG, ("-s", net), "! -d", MULTICAST, c, "-j", masq),
        _rule(POSTRTG, ("! -s", net), ("-d", net), c, "-j", masq),
    )


def forward_rules(network):
    """FLANNEL-FWD's rules: accept what comes from or goes to the cluster network."""
    c = _comment(FWD_COMMENT)
    net = network.masked()
    return _rules(_rule(FWD, ("-s", net), c, "-j ACCEPT"), _rule(FWD, ("-d", net), c, "-j ACCEPT"))


def chain_rules(saved, chain):
    """The rules of `chain` in iptables-save output, in order."""
    prefix = "-A %s " % chain
    return [line for line in saved.splitlines() if line.startswith(prefix)]


def render(table, saved, rules):
    """Restore input making our chain of `table` hold exactly `rules` (with one
    jump to it), given the table as iptables-save printed it; None if it does already."""
    builtin, chain, _ = TABLES[table]
    jump = jump_rule(table)
    jumps = [line for line in saved.splitlines() if line == jump]
    if iptables.chain_exists(saved, chain) and chain_rules(saved, chain) == rules and len(jumps) == 1:
        return None
    lines = ["*" + table, ":%s - [0:0]" % chain]      # declared: created or flushed
    lines += ["-D" + line[2:] for line in jumps[1:]]   # extra copies of the jump
    if not jumps:
        lines.append(jump)
    lines += rules
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_removal(table, saved):
    """Restore input deleting our jump(s) and chain from `table`; None if there is nothing."""
    builtin, chain, _ = TABLES[table]
    jumps = [line for line in iptables.rules_referencing(saved, chain) if not line.startswith("-A %s " % chain)]
    exists = iptables.chain_exists(saved, chain)
    if not jumps and not exists:
        return None
    lines = ["*" + table]
    lines += ["-D" + line[2:] for line in jumps]
    if exists:
        lines += ["-F " + chain, "-X " + chain]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _in(netns):
    if netns is None:
        import contextlib
        return contextlib.nullcontext()
    from podnet.net.netns import entered
    return entered(netns)


def apply(network, subnet, netns=None, masquerade=True, forward=True, random_fully=True):
    """Install (or bring up to date) the rules; returns the tables changed ([] if none).

    netns: run iptables in that network namespace (a path) instead of the
    caller's; the daemon, running inside the node's namespace, passes nothing.
    """
    wanted = []
    if masquerade:
        wanted.append(("nat", masq_rules(network, subnet, random_fully)))
    if forward:
        wanted.append(("filter", forward_rules(network)))
    changed = []
    with _in(netns):
        for table, rules in wanted:
            text = render(table, iptables.save(table), rules)
            if text is not None:
                iptables.restore(text)
                changed.append(table)
                log.info("iptables %s: %s updated for network %s, subnet %s", table, TABLES[table][1],
                         network, subnet)
    return changed


def remove(netns=None):
    """Delete both chains and the jumps into them (cleanup, e.g. in tests)."""
    with _in(netns):
        for table in TABLES:
            text = render_removal(table, iptables.save(table))
            if text is not None:
                iptables.restore(text)
