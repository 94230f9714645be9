"""Address ranges, range sets and the round-robin order host-local allocates in.

Pure: this module parses and validates the ranges of an `ipam` config and
orders candidate addresses; ipam.store does the file I/O and ipam.host_local
ties the two together. Semantics follow the reference host-local plugin
(containernetworking/plugins, backend/allocator), including its error texts,
with three deliberate differences: a gateway outside its subnet is rejected
(1.1.1 accepts it, later releases reject it); the network address and
IPv4 broadcast address are never handed out even when an explicit
rangeStart/rangeEnd includes them; and, for allocation, a range reaching
into link-local, multicast, loopback or IPv4-mapped addresses is refused
(unusable_reason; 1.1.1 allocates from all of them but IPv4-mapped).

A range set is a list of ranges of one address family; each range set yields
one address per ADD. Addresses are podnet.net.ip.IP values (family + int).
"""
from cni import errors
from cni.errors import CNIError
from cni.types import version_tuple
from podnet.net.ip import AF_INET, AF_INET6, IP, parse_cidr, parse_ip


def ip_string(ip):
    """`ip` as Go's net.IP.String() prints it: the reference's store file names.

    inet_ntop agrees except for IPv6 addresses with an IPv4 tail: ::a.b.c.d,
    which Go prints in hex (::102:304), and ::ffff:a.b.c.d, which Go prints
    as plain a.b.c.d. Store files must be named identically or the two
    plugins could hand out one address twice.
    """
    text = str(ip)
    if ip.family == AF_INET or "." not in text:
        return text
    if ip.value >> 32 == 0xFFFF:      # IPv4-mapped: Go prints the IPv4 address
        return str(IP(AF_INET, ip.value & 0xFFFFFFFF))
    words = [(ip.value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best, best_len, run_start = -1, 1, -1
    for i, w in enumerate(words + [1]):   # the sentinel closes a trailing run
        if w == 0:
            if run_start < 0:
                run_start = i
        elif run_start >= 0:
            if i - run_start > best_len:
                best, best_len = run_start, i - run_start
            run_start = -1
    if best < 0:
        return ":".join("%x" % w for w in words)
    head = ":".join("%x" % w for w in words[:best])
    tail = ":".join("%x" % w for w in words[best + best_len:])
    return head + "::" + tail


def parse_addr(text):
    """An address from config or args; IPv4-mapped IPv6 becomes IPv4 as in Go."""
    try:
        ip = parse_ip(text)
    except ValueError:
        raise ValueError("invalid IP address: %s" % (text,)) from None
    if ip.family == AF_INET6 and ip.value >> 32 == 0xFFFF:
        return IP(AF_INET, ip.value & 0xFFFFFFFF)
    return ip


class Range:
    """A run of addresses start..end (inclusive) inside `subnet`, with a gateway."""

    __slots__ = ("subnet", "start", "end", "gateway", "family", "skip")

    def __init__(self, subnet, start, end, gateway):
        self.subnet = subnet
        self.start = start
        self.end = end
        self.gateway = gateway
        self.family = subnet.family
        # Values never handed out even inside start..end: the gateway, the
        # network address and (IPv4) the broadcast address.
        skip = {gateway.value, subnet.network.value}
        if self.family == AF_INET:
            skip.add(subnet.broadcast.value)
        self.skip = skip

    def contains(self, ip):
        return ip.family == self.family and self.start.value <= ip.value <= self.end.value

    def overlaps(self, other):
        return (self.family == other.family and self.start.value <= other.end.value
                and other.start.value <= self.end.value)

    def reserved_reason(self, ip):
        """Why `ip` (inside this range) may not be handed out, or None."""
        if ip.value == self.gateway.value:
            return "subnet's gateway"
        if ip.value == self.subnet.network.value:
            return "the network address of %s" % self.subnet
        if ip.value in self.skip:
            return "the broadcast address of %s" % self.subnet
        return None

    def __str__(self):
        return "%s-%s" % (ip_string(self.start), ip_string(self.end))

    def __repr__(self):
        return "Range(%s in %s gw %s)" % (self, self.subnet, self.gateway)


class RangeSet:
    """Ranges of one family that together supply one address per container."""

    __slots__ = ("ranges", "family")

    def __init__(self, ranges):
        self.ranges = ranges
        self.family = ranges[0].family

    def range_for(self, ip):
        for r in self.ranges:
            if r.contains(ip):
                return r
        return None

    def contains(self, ip):
        return self.range_for(ip) is not None

    def overlaps(self, other):
        return any(a.overlaps(b) for a in self.ranges for b in other.ranges)

    def available(self, used):
        """How many addresses are left to hand out, given `used` (int values of
        this set's family): arithmetic on the range bounds, whatever their size."""
        left = 0
        for r in self.ranges:
            lo, hi = r.start.value, r.end.value
            left += hi - lo + 1 - sum(1 for v in r.skip if lo <= v <= hi)
            left -= sum(1 for v in used if lo <= v <= hi and v not in r.skip)
        return left

    def ordered(self, last=None):
        """(range, int value) pairs in round-robin order, each address once.

        Starts just after `last` (the previously allocated address) when it
        lies in this set, else at the first range's start; walks the ranges
        in order and wraps around, so `last` itself comes at the very end.
        """
        ranges = self.ranges
        k, first = 0, ranges[0].start.value
        if last is not None:
            for i, r in enumerate(ranges):
                if r.contains(last):
                    if last.value < r.end.value:
                        k, first = i, last.value + 1
                    else:
                        k = (i + 1) % len(ranges)
                        first = ranges[k].start.value
                    break
        r = ranges[k]
        for v in range(first, r.end.value + 1):
            yield r, v
        for j in range(1, len(ranges)):
            r2 = ranges[(k + j) % len(ranges)]
            for v in range(r2.start.value, r2.end.value + 1):
                yield r2, v
        for v in range(r.start.value, first):
            yield r, v

    def free(self, used, last=None):
        """Allocatable addresses in round-robin order, as (range, IP).

        `used` is a set of int values (of this set's family) already taken;
        the caller may add to it while iterating (e.g. after losing a race).
        """
        family = self.family
        for r, v in self.ordered(last):
            if v not in used and v not in r.skip:
                yield r, IP(family, v)

    def __str__(self):
        return ",".join(str(r) for r in self.ranges)

    def __repr__(self):
        return "RangeSet(%s)" % self


def parse_range(obj):
    """One range object -> Range; ValueError with the reason if invalid."""
    if not isinstance(obj, dict):
        raise ValueError("a range must be an object with a subnet, got %s" % json_kind(obj))
    text = obj.get("subnet")
    if not text:
        raise ValueError("range has no subnet")
    try:
        subnet = parse_cidr(text)
    except ValueError:
        raise ValueError("invalid CIDR address: %s" % (text,)) from None
    if subnet.ip != subnet.network:
        raise ValueError("Network has host bits set. For a subnet mask of length %d "
                         "the network address is %s" % (subnet.prefixlen, subnet.network))
    # At least two addresses besides the network address, as the reference wants.
    if subnet.prefixlen > subnet.ip.bits - 2:
        raise ValueError("Network %s too small to allocate from" % subnet)

    gateway = _field(obj, "gateway", subnet, "gateway")
    if gateway is None:
        gateway = subnet.network + 1
    start = _field(obj, "rangeStart", subnet, "RangeStart")
    if start is None:
        start = subnet.network + 1
    end = _field(obj, "rangeEnd", subnet, "RangeEnd")
    if end is None:
        # IPv4: the address before broadcast; IPv6 (no broadcast): the last one.
        end = subnet.broadcast
        if subnet.family == AF_INET:
            end = end - 1
    if start.value > end.value:
        raise ValueError("RangeStart %s is after RangeEnd %s" % (start, end))
    return Range(subnet, start, end, gateway)


def _field(obj, key, subnet, label):
    text = obj.get(key)
    if text is None or text == "":
        return None
    ip = parse_addr(text)
    if not subnet.contains(ip):
        raise ValueError("%s %s not in network %s" % (label, ip, subnet))
    return ip


def parse_range_set(obj):
    """A list of range objects -> RangeSet; ValueError if invalid."""
    if not isinstance(obj, list):
        raise ValueError("a range set must be a list of ranges, got %s" % json_kind(obj))
    if not obj:
        raise ValueError("empty range set")
    ranges = []
    for item in obj:
        r = parse_range(item)
        if ranges and r.family != ranges[0].family:
            raise ValueError("mixed address families")
        ranges.append(r)
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            if a.overlaps(b):
                raise ValueError("subnets %s and %s overlap" % (a, b))
    return RangeSet(ranges)


def parse_range_sets(ipam, runtime_ranges=None, cni_version="1.1.0", for_allocation=False):
    """All range sets of an `ipam` config, in allocation order.

    As the reference: runtimeConfig.ipRanges first, then the legacy single
    range (ipam.subnet/rangeStart/rangeEnd/gateway), then ipam.ranges.
    Raises CNIError(INVALID_NETCONF) on any invalid or overlapping range, and
    with for_allocation also on a range no pod address may come from
    (unusable_reason).
    """
    raw = []
    if runtime_ranges:
        if not isinstance(runtime_ranges, list):
            raise _invalid("runtimeConfig.ipRanges must be a list of range sets")
        raw.extend(runtime_ranges)
    if ipam.get("subnet") not in (None, ""):
        raw.append([{k: ipam.get(k) for k in ("subnet", "rangeStart", "rangeEnd", "gateway")}])
    ranges = ipam.get("ranges")
    if ranges is not None:
        if not isinstance(ranges, list):
            raise _invalid("ipam.ranges must be a list of range sets, got %s" % json_kind(ranges))
        raw.extend(ranges)
    if not raw:
        raise _invalid("no IP ranges specified")

    sets = []
    for i, obj in enumerate(raw):
        try:
            sets.append(parse_range_set(obj))
        except ValueError as e:
            raise _invalid("invalid range set %d: %s" % (i, e)) from None
        if for_allocation:
            for r in sets[-1].ranges:
                reason = unusable_reason(r)
                if reason:
                    raise _invalid("invalid range set %d: %s" % (i, reason))

    # Spec 0.2.0 and older results carry one ip4 and one ip6 only.
    families = [s.family for s in sets]
    if (families.count(AF_INET) > 1 or families.count(AF_INET6) > 1) \
            and version_tuple(cni_version or "0.1.0") < (0, 3, 0):
        raise _invalid("CNI version %s does not support more than 1 address per family"
                       % cni_version)
    for i, a in enumerate(sets):
        for j in range(i + 1, len(sets)):
            if a.overlaps(sets[j]):
                raise _invalid("range set %d overlaps with %d" % (i, j))
    return sets


# Blocks no pod address may come from (family, network, prefix length, what):
# the reference 1.1.1 hands them out (all but IPv4-mapped, which it refuses with
# 999), and the pod is left with an address the kernel treats as special.
_UNUSABLE = (
    (AF_INET, 0xA9FE0000, 16, "IPv4 link-local addresses (169.254.0.0/16)"),
    (AF_INET, 0xE0000000, 4, "IPv4 multicast addresses (224.0.0.0/4)"),
    (AF_INET, 0x7F000000, 8, "IPv4 loopback addresses (127.0.0.0/8)"),
    (AF_INET6, 0xFE80 << 112, 10, "IPv6 link-local addresses (fe80::/10)"),
    (AF_INET6, 0xFF << 120, 8, "IPv6 multicast addresses (ff00::/8)"),
    (AF_INET6, 0xFFFF << 32, 96, "IPv4-mapped IPv6 addresses (::ffff:0:0/96)"),
    (AF_INET6, 1, 128, "the IPv6 loopback address (::1)"),
)


def unusable_reason(r):
    """Why range `r` cannot give pods their addresses, or None: its start..end
    reaches into link-local, multicast, loopback or IPv4-mapped addresses."""
    for family, network, plen, what in _UNUSABLE:
        if family != r.family:
            continue
        host = (1 << (r.subnet.ip.bits - plen)) - 1
        if r.start.value <= network | host and network <= r.end.value:
            if family == AF_INET6 and plen == 96 and r.subnet.prefixlen >= 96:
                v4 = IP(AF_INET, r.subnet.network.value & 0xFFFFFFFF)
                return ("subnet %s is made of %s; for IPv4 write %s/%d"
                        % (r.subnet, what, v4, r.subnet.prefixlen - 96))
            return "range %s reaches into %s, which cannot be a pod's address" % (r, what)
    return None


def _invalid(msg):
    return CNIError(errors.INVALID_NETCONF, msg)


def json_kind(value):
    """What a JSON value is, for messages: "a boolean", "a list"..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")
