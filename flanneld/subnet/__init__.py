"""Subnet leases: what a node holds, as plain data, and how the keys are named.

flannel's etcd layout (kept, so operators' tools and habits apply):
    <prefix>/config                      the network config (flanneld.config)
    <prefix>/subnets/10.244.3.0-24       one lease per node, with a TTL:
        {"PublicIP": "192.168.50.3", "BackendType": "vxlan",
         "BackendData": {"VtepMAC": "c2:..."}}
"""
import json

from podnet.etcd import net_from_key, net_key_name
from podnet.net.ip import IPNet, parse_ip

DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_TTL = 24 * 3600


class Lease:
    """One node's lease. Equality covers what the datapath depends on."""

    __slots__ = ("subnet", "public_ip", "backend_type", "backend_data", "expiration")

    def __init__(self, subnet, public_ip, backend_type, backend_data=None, expiration=None):
        self.subnet = subnet                  # IPNet (masked)
        self.public_ip = public_ip            # IP
        self.backend_type = backend_type      # "vxlan" | "host-gw" | "udp"
        self.backend_data = backend_data or {}
        self.expiration = expiration          # unix time, or None if unknown

    def key(self, prefix=DEFAULT_PREFIX):
        return subnet_key(prefix, self.subnet)

    def value(self):
        """The JSON stored in etcd, byte-compatible with flannel's."""
        out = {"PublicIP": str(self.public_ip), "BackendType": self.backend_type}
        if self.backend_data:
            out["BackendData"] = self.backend_data
        return json.dumps(out, separators=(",", ":"))

    def __eq__(self, other):
        return isinstance(other, Lease) and (self.subnet, self.public_ip, self.backend_type,
                                             self.backend_data) == (other.subnet, other.public_ip,
                                                                    other.backend_type, other.backend_data)

    def __hash__(self):
        return hash((self.subnet, self.public_ip))

    def __repr__(self):
        return "Lease(%s -> %s %s)" % (self.subnet, self.public_ip, self.backend_type)


class LeaseError(ValueError):
    pass


def subnet_key(prefix, subnet):
    return "%s/subnets/%s" % (prefix.rstrip("/"), net_key_name(subnet))


def subnet_from_key(key):
    """'/coreos.com/network/subnets/10.244.3.0-24' -> IPNet (masked), or LeaseError."""
    try:
        return net_from_key(key).masked()
    except ValueError:
        raise LeaseError("not a subnet key: %r" % key) from None


def parse_lease(key, value, expiration=None):
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


def choose_subnet(config, taken, pick=None):
    """A free subnet of `config` not in `taken` (a set of IPNet), or None.

    flannel picks at random among the free ones so that concurrent nodes rarely
    collide (the etcd create is still atomic); `pick` chooses from the list
    (default: random.choice) so tests can be deterministic.
    """
    taken_values = {t.network.value for t in taken}
    free = [v for v in config.subnets() if v not in taken_values]
    if not free:
        return None
    if pick is None:
        import random
        pick = random.choice
    from podnet.net.ip import AF_INET, IP
    return IPNet(IP(AF_INET, pick(free)), config.subnet_len)
