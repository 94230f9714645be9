"""The network config flannel keeps at <prefix>/config, parsed and validated.

    {"Network": "10.244.0.0/16", "SubnetLen": 24, "SubnetMin": "10.244.1.0",
     "SubnetMax": "10.244.254.0", "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}

Defaults as flannel documents them: SubnetLen 24, or two longer than Network
when Network is smaller than a /22; SubnetMin the second subnet (the first
holds the network address); SubnetMax the last one; Backend type "udp".
Anything invalid raises ConfigError with a message an operator can act on;
nothing is applied from a bad config. That includes the backend's options
(BACKEND_OPTIONS: a VNI or port out of range, a flag that is not true/false):
they are checked here, with the rest, so that the daemon waits a bad one out
like any other bad config instead of failing when it builds the backend.
"""
import json

from podnet.net.ip import AF_INET, parse_cidr, parse_ip

BACKENDS = ("vxlan", "host-gw", "udp")

# The options each backend reads: key -> (lowest, highest) for a whole number, or
# bool for a flag. An option that is absent or null takes the backend's default.
# Other keys are ignored, as flannel ignores them.
BACKEND_OPTIONS = {
    "vxlan": {"VNI": (0, 9999999),         # flannel.<VNI> must fit a device name (15 bytes)
              "Port": (0, 65535),          # 0: the default, 8472
              "Learning": bool, "GBP": bool, "DirectRouting": bool},
    "host-gw": {},
    "udp": {"Port": (1, 65535)},
}


class ConfigError(ValueError):
    pass


class NetworkConfig:
    __slots__ = ("network", "subnet_len", "subnet_min", "subnet_max", "backend_type", "backend")

    def __init__(self, network, subnet_len, subnet_min, subnet_max, backend_type, backend):
        self.network = network          # IPNet, masked
        self.subnet_len = subnet_len    # int
        self.subnet_min = subnet_min    # IP: first subnet's network address that may be leased
        self.subnet_max = subnet_max    # IP: last one
        self.backend_type = backend_type
        self.backend = backend          # the Backend object as a dict (Type, VNI, Port, ...)

    def option(self, key, default):
        """A backend option, checked by parse(); `default` if it is absent or null."""
        value = self.backend.get(key)
        return default if value is None else value

    def subnets(self):
        """Every leasable subnet's network address, in order (an iterator)."""
        step = 1 << (32 - self.subnet_len)
        value = self.subnet_min.value
        while value <= self.subnet_max.value:
            yield value
            value += step

    def __repr__(self):
        return "NetworkConfig(%s /%d %s)" % (self.network, self.subnet_len, self.backend_type)


def parse(raw):
    """NetworkConfig from the JSON text (or dict) stored at <prefix>/config."""
    if isinstance(raw, (bytes, str)):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ConfigError("network config is not valid JSON: %s" % e) from None
    if not isinstance(raw, dict):
        raise ConfigError("network config must be a JSON object")
    if "Network" not in raw:
        raise ConfigError("network config has no Network")
    try:
        network = parse_cidr(raw["Network"]).masked()
    except (ValueError, TypeError):
        raise ConfigError("Network %r is not a valid CIDR" % (raw["Network"],)) from None
    if network.family != AF_INET:
        raise ConfigError("Network must be IPv4 (IPv6 networks are not supported yet)")
    default_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
    subnet_len = raw.get("SubnetLen", default_len)
    if not isinstance(subnet_len, int) or isinstance(subnet_len, bool):
        raise ConfigError("SubnetLen must be a number, not %r" % (subnet_len,))
    if not network.prefixlen < subnet_len <= 30:
        raise ConfigError("SubnetLen %d must be longer than the Network's /%d and at most 30 "
                          "(too small a SubnetLen leaves no room for nodes)" % (subnet_len, network.prefixlen))
    step = 1 << (32 - subnet_len)
    first = network.network.value
    last = network.broadcast.value - step + 1

    def bound(key, default):
        if key not in raw:
            return default
        try:
            ip = parse_ip(raw[key])
        except (ValueError, TypeError):
            raise ConfigError("%s %r is not an IPv4 address" % (key, raw[key])) from None
        if not network.contains(ip) or (ip.value - first) % step:
            raise ConfigError("%s %s is not the start of a /%d inside %s" % (key, ip, subnet_len, network))
        return ip.value

    # flannel skips the first subnet by default (it holds the network address).
    subnet_min = bound("SubnetMin", first + step)
    subnet_max = bound("SubnetMax", last)
    if subnet_min > subnet_max:
        raise ConfigError("SubnetMin is after SubnetMax: no subnet can be leased")
    backend = raw.get("Backend") or {"Type": "udp"}
    if not isinstance(backend, dict):
        raise ConfigError("Backend must be an object")
    backend_type = backend.get("Type", "udp")
    if not isinstance(backend_type, str) or backend_type not in BACKENDS:
        raise ConfigError("unknown backend type %r (supported: %s)" % (backend_type, ", ".join(BACKENDS)))
    check_backend_options(backend_type, backend)
    from podnet.net.ip import IP
    return NetworkConfig(network, subnet_len, IP(AF_INET, subnet_min), IP(AF_INET, subnet_max),
                         backend_type, dict(backend))


def check_backend_options(backend_type, options):
    """ConfigError naming the first option of BACKEND_OPTIONS[backend_type] that is wrong."""
    for key, kind in BACKEND_OPTIONS[backend_type].items():
        value = options.get(key)
        if value is None:
            continue
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError("%s %s must be true or false, not %r" % (backend_type, key, value))
            continue
        low, high = kind
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError("%s %s must be a whole number from %d to %d, not %r"
                              % (backend_type, key, low, high, value))
