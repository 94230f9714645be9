"""The reference plugins' iptables chain names and comments, shared by our plugins.

containernetworking/plugins names a container's chains "CNI-" + a prefix
("" for bridge/ptp masquerade, "DN-" for portmap DNAT) + the hex sha512 of
network name + container ID, cut to 28 characters (iptables allows 28 for a
chain name). Using the same names lets either implementation clean up after
the other. The rules that jump to such a chain carry a comment naming network
and container (`name: "<net>" id: "<id>"`, portmap's with a "dnat " in front),
which is how GC tells the chains of one network apart without knowing the IDs.

Rules are read from iptables-save text with podnet.net.iptables (jump_target,
rules_jumping_to, rules_referencing): a rule's target is its last `-j`/`-g`.
"""
from __future__ import annotations

MAX_CHAIN_LEN = 28
MAX_COMMENT_LEN = 255       # what the comment match stores (iptables cuts longer ones)


def chain_name(network: str, container_id: str, prefix: str = "") -> str:
    """"CNI-<prefix><hex sha512(network + container_id)>", 28 characters long."""
    try:
        from _sha512 import sha512
    except ImportError:          # Python >= 3.12
        from _sha2 import sha512
    head = "CNI-" + prefix
    if len(head) >= MAX_CHAIN_LEN:
        raise ValueError("chain name prefix %r too long" % prefix)
    return (head + sha512((network + container_id).encode()).hexdigest())[:MAX_CHAIN_LEN]


def owner_comment(network: str, container_id: str, prefix: str = "") -> str:
    """'<prefix>name: "<network>" id: "<id>"' (Go's %q of names that need no escapes),
    cut to what iptables stores, so the rule we write is the rule iptables-save shows."""
    return ('%sname: "%s" id: "%s"' % (prefix, network, container_id))[:MAX_COMMENT_LEN]


def owned_chains(saved: str, entry_chain: str, network: str, comment_prefix: str,
                 chain_prefix: str) -> dict[str, str]:
    """{chain: container ID or ""} of the chains `entry_chain` jumps to whose rule's comment
    names `network`, as '<comment_prefix>name: "<network>" id: "<id>"' (owner_comment).

    A comment cut short (a long ID: iptables keeps 255 characters) gives "" for the ID.
    A whole one is trusted only if the chain is that container's (chain_name(network, id,
    chain_prefix)): a rule made by hand that merely looks like ours is not taken."""
    from podnet.net.iptables import jump_target, split_rule
    head = '%sname: "%s" id: "' % (comment_prefix, network)
    start = "-A %s " % entry_chain
    out: dict[str, str] = {}
    for line in saved.splitlines():
        if not line.startswith(start) or "--comment" not in line:
            continue
        args = split_rule(line)
        target = jump_target(args)
        if target is None or not target.startswith("CNI-" + chain_prefix) or target in out:
            continue
        comment = args[args.index("--comment") + 1]
        if len(comment) >= MAX_COMMENT_LEN:     # cut (perhaps with the reference's "..")
            kept = comment.rstrip(".")
            if not (comment.startswith(head) or head.startswith(kept)):
                continue
            out[target] = ""
        elif comment.startswith(head) and comment.endswith('"') and len(comment) > len(head):
            container_id = comment[len(head):-1]
            if chain_name(network, container_id, chain_prefix) == target:
                out[target] = container_id
    return out


def removal_input(saved: str, chains: list[str] | tuple[str, ...]) -> str | None:
    """nat restore input removing `chains` and every rule jumping to them, as one
    transaction (the table read as `saved`); None if none of them exists."""
    from podnet.net.iptables import chain_exists, rules_jumping_to
    out = ["*nat"]
    found = False
    for chain in chains:
        refs = rules_jumping_to(saved, chain)
        if not refs and not chain_exists(saved, chain):
            continue
        found = True
        out += ["-D" + rule[2:] for rule in refs]
        out += [":%s - [0:0]" % chain, "-X " + chain]
    if not found:
        return None
    out.append("COMMIT")
    return "\n".join(out) + "\n"
