"""The reference plugins' iptables chain names, shared by our plugins.

containernetworking/plugins names a container's chains "CNI-" + a prefix
("" for bridge/ptp masquerade, "DN-" for portmap DNAT) + the hex sha512 of
network name + container ID, cut to 28 characters (iptables allows 28 for a
chain name). Using the same names lets either implementation clean up after
the other.
"""
from __future__ import annotations

MAX_CHAIN_LEN = 28


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
