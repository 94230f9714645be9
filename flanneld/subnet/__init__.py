"""Subnet leases: what a node holds, as plain data, and how the keys are named.

flannel's etcd layout (kept, so operators' tools and habits apply):
    <prefix>/config                      the network config (flanneld.config)
    <prefix>/subnets/10.244.3.0-24       one lease per node, with a TTL:
        {"PublicIP": "192.168.50.3", "BackendType": "vxlan",
         "BackendData": {"VtepMAC": "c2:..."}}

SubnetManager is what the daemon needs from wherever leases are kept (etcd:
flanneld.subnet.etcd.EtcdSubnetManager; the Kubernetes Node objects next);
each manager implements it without inheriting from it.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, Protocol

from podnet.etcd import net_from_key, net_key_name
from podnet.net.ip import AF_INET, IP, IPNet, parse_ip

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Collection, Iterable, Iterator, Sequence

    from flanneld.config import NetworkConfig

DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_TTL = 24 * 3600

# A lease's BackendData: the backend's JSON object (vxlan: {"VNI": 1, "VtepMAC": "..."}).
BackendData = dict[str, Any]


class Lease:
    """One node's lease. Equality covers what the datapath depends on."""

    __slots__ = ("subnet", "public_ip", "backend_type", "backend_data", "expiration")

    subnet: IPNet
    public_ip: IP
    backend_type: str
    backend_data: BackendData
    expiration: float | None

    def __init__(self, subnet: IPNet, public_ip: IP, backend_type: str, backend_data: BackendData | None = None,
                 expiration: float | None = None) -> None:
        self.subnet = subnet                  # IPNet (masked)
        self.public_ip = public_ip            # IP
        self.backend_type = backend_type      # "vxlan" | "host-gw" | "udp"
        self.backend_data = backend_data or {}
        self.expiration = expiration          # unix time, or None if unknown

    def key(self, prefix: str = DEFAULT_PREFIX) -> str:
        return subnet_key(prefix, self.subnet)

    def value(self) -> str:
        """The JSON stored in etcd, byte-compatible with flannel's."""
        out: dict[str, Any] = {"PublicIP": str(self.public_ip), "BackendType": self.backend_type}
        if self.backend_data:
            out["BackendData"] = self.backend_data
        return json.dumps(out, separators=(",", ":"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lease) and (self.subnet, self.public_ip, self.backend_type,
                                             self.backend_data) == (other.subnet, other.public_ip,
                                                                    other.backend_type, other.backend_data)

    def __hash__(self) -> int:
        return hash((self.subnet, self.public_ip))

    def __repr__(self) -> str:
        return "Lease(%s -> %s %s)" % (self.subnet, self.public_ip, self.backend_type)


class LeaseError(ValueError):
    pass


# What watch_leases yields: a lease created or changed, the subnet of one deleted
# or expired, or the complete set after events may have been missed.
LeaseEvent = tuple[Literal["put"], Lease] | tuple[Literal["delete"], IPNet] | tuple[Literal["resync"], list[Lease]]


class SubnetManager(Protocol):
    """Where the leases live, as the daemon uses it (in its order: config, lease,
    list + watch, renew). Every method may be called from any thread."""

    def get_network_config(self) -> NetworkConfig:
        """The network config; ConfigError if it is invalid, another error if it
        cannot be read (yet): the daemon logs either and asks again."""
        ...

    def acquire_lease(self, public_ip: IP, backend_type: str, backend_data: BackendData,
                      ttl: int = DEFAULT_TTL) -> Lease:
        """This node's lease, with its expiration: the subnet `public_ip` already
        holds (a restarted node gets it back), else a free one, taken atomically."""
        ...

    def list_leases(self) -> tuple[list[Lease], int]:
        """(every valid lease, the revision to watch from); malformed ones are skipped."""
        ...

    def watch_leases(self, revision: int, stop_event: threading.Event) -> Iterator[LeaseEvent]:
        """Events after `revision` until stop_event is set; ("resync", leases)
        whenever some may have been missed. Outages are retried, not raised."""
        ...

    def renew_lease(self, lease: Lease) -> Lease:
        """The same lease (subnet, public IP, backend) with a later expiration."""
        ...


def subnet_key(prefix: str, subnet: IPNet) -> str:
    return "%s/subnets/%s" % (prefix.rstrip("/"), net_key_name(subnet))


def subnet_from_key(key: str) -> IPNet:
    """'/coreos.com/network/subnets/10.244.3.0-24' -> IPNet (masked), or LeaseError."""
    try:
        return net_from_key(key).masked()
    except ValueError:
        raise LeaseError("not a subnet key: %r" % key) from None


def parse_lease(key: str, value: str | bytes, expiration: float | None = None) -> Lease:
    """A Lease from an etcd key and its JSON value; LeaseError if malformed."""
    subnet = subnet_from_key(key)
    try:
        data = json.loads(value)
        public_ip = parse_ip(data["PublicIP"])
        backend_type = data.get("BackendType", "")
        backend_data = data.get("BackendData") or {}
        if not isinstance(backend_data, dict):
            raise ValueError("BackendData is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise LeaseError("malformed lease %s: %s" % (key, e)) from None
    return Lease(subnet, public_ip, backend_type, backend_data, expiration)


# flannel's allocateSubnet walks from SubnetMin and picks at random among the
# first 100 free subnets it meets.
CANDIDATES = 100


def free_subnets(config: NetworkConfig, taken: Iterable[IPNet], limit: int = CANDIDATES) -> list[int]:
    """The network addresses of the first `limit` free subnets of `config`, from
    SubnetMin up to SubnetMax, in order. A subnet is free unless it overlaps one
    in `taken` (a lease of another length too, as flannel's Overlaps).

    Never lists the network: each taken subnet becomes a run of blocked candidate
    indices, the runs are sorted, and the free ones are read off between them, so
    time and memory grow with len(taken) and `limit`, not with the network
    (0.0.0.0/0 in /30s is 2^30 candidates)."""
    shift = 32 - config.subnet_len
    low = config.subnet_min.value
    count = ((config.subnet_max.value - low) >> shift) + 1     # candidates; SubnetMin is aligned
    end = low + (count << shift)                               # one past the last candidate's addresses
    blocked = []
    for t in taken:
        if t.family != AF_INET:
            continue
        first = t.network.value
        last = first + (1 << (32 - t.prefixlen)) - 1
        if last < low or first >= end:
            continue
        blocked.append((max(first - low, 0) >> shift, (min(last, end - 1) - low) >> shift))
    blocked.sort()
    out: list[int] = []
    index = 0
    for a, b in blocked:
        while index < a and len(out) < limit:
            out.append(low + (index << shift))
            index += 1
        if len(out) >= limit:
            return out
        index = max(index, b + 1)
    while index < count and len(out) < limit:
        out.append(low + (index << shift))
        index += 1
    return out


def choose_subnet(config: NetworkConfig, taken: Collection[IPNet],
                  pick: Callable[[Sequence[int]], int] | None = None) -> IPNet | None:
    """A free subnet of `config` (overlapping nothing in `taken`), or None if there is none.

    As flannel: one of the first CANDIDATES free subnets from SubnetMin, at random,
    so that nodes starting together rarely race for the same one (the etcd create
    is atomic anyway) while the leases stay packed at the start of the range.
    `pick` chooses from that list (default: random.choice), so tests can be
    deterministic. Cost: free_subnets(), whatever the size of the network.
    """
    free = free_subnets(config, taken)
    if not free:
        return None
    if pick is None:
        import random
        pick = random.choice
    return IPNet(IP(AF_INET, pick(free)), config.subnet_len)
