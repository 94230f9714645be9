"""What the two iptables-based modes (iptables.py, ipvs.py) share: rule text in
iptables-save's canonical form, kube-proxy's masquerade mark, and the chains
and jumps both of them use under the same names.

Both modes write KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ (nat) and
KUBE-FORWARD, KUBE-PROXY-FIREWALL (filter), jumped to from the built-in chains
with the same rule text (kube-proxy does the same). So a mode's cleanup, which
runs when another mode starts (server.cleanup_other_modes) or restarts, must
leave those chains and jumps in place while the other mode's rules are in the
kernel, removing only its own rules from them. `other_mode_present()` says
whether they are: each mode is recognised by chains only it creates, listed
here, so that neither mode module names the other's chains.
"""
import functools
import ipaddress

from podnet.net.iptables import declared_chains, quote

NAT, FILTER = "nat", "filter"
MASQ_MARK = 0x4000                  # kube-proxy's --iptables-masquerade-bit 14

# Chains both modes create and fill.
SHARED_CHAINS = {NAT: ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"),
                 FILTER: ("KUBE-FORWARD", "KUBE-PROXY-FIREWALL")}
# Jumps from the built-in chains that both modes insert, same text: (table, chain, rule after "-A <chain> ").
SHARED_JUMPS = ((FILTER, "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
                (NAT, "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
                (NAT, "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
                (NAT, "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'))

# What shows that a mode's rules are in the kernel: chains only that mode creates, per table
# (and name prefixes of its per-service chains). tests/test_kube_proxy_iptables.py checks
# that these are the modes' own names.
MODE_CHAINS: dict[str, tuple[dict[str, tuple[str, ...]], tuple[str, ...]]] = {
    "iptables": ({NAT: ("KUBE-NODEPORTS",), FILTER: ("KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS")},
                 ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")),
    "ipvs": ({t: ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-IPVS-FILTER") for t in (NAT, FILTER)}, ()),
}


def other_mode_present(mode: str, saved_by_table: dict[str, str]) -> bool:
    """Whether an iptables-based mode other than `mode` has its own chains in these
    iptables-save texts ({table: text}): then the shared chains and jumps are in use."""
    for other, (chains, prefixes) in MODE_CHAINS.items():
        if other == mode:
            continue
        for table, names in chains.items():
            declared = set(declared_chains(saved_by_table.get(table, "")))
            if any(n in declared for n in names) or (prefixes and any(c.startswith(prefixes) for c in declared)):
                return True
    return False


@functools.lru_cache(maxsize=4096)
def canonical_net(ip_or_cidr: str) -> str:
    """An address or CIDR as iptables-save prints it after -s / -d ("10.0.0.1/32")."""
    if "/" in ip_or_cidr:
        return str(ipaddress.ip_network(ip_or_cidr, strict=False))
    return "%s/%d" % (ip_or_cidr, 128 if ":" in ip_or_cidr else 32)


def rule(chain: str, jump: str, src: str | None = None, dst: str | None = None, proto: str | None = None,
         comment: str | None = None, matches: tuple[str, ...] = (), not_src: bool = False, not_dst: bool = False,
         dport: int | None = None) -> str:
    """One rule in iptables-save's canonical order."""
    parts = ["-A", chain]
    if src:
        parts += (["!"] if not_src else []) + ["-s", canonical_net(src)]
    if dst:
        parts += (["!"] if not_dst else []) + ["-d", canonical_net(dst)]
    if proto:
        parts += ["-p", proto]
    if comment is not None:
        parts += ["-m", "comment", "--comment", quote(comment)]
    parts += list(matches)
    if dport is not None:
        parts += ["-m", str(proto), "--dport", str(dport)]
    parts += ["-j", jump]
    return " ".join(parts)
