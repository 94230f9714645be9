"""Which interface and address flanneld uses for traffic between nodes (flannel's rules).

    ext = find_external_interface(ifaces=["eth1", "10.0.0.5"], regexes=["^ens"],
                                  can_reach="192.168.50.1", public_ip=None)

The rules are flannel's (main.go and pkg/ipmatch), written down in
docs/operator-guide.md ("Which interface flanneld uses"):

1. With none of --iface, --iface-regex, --iface-can-reach: the interface of the
   first IPv4 default route (an error if there is none, or if that route has no
   single outgoing interface); with --public-ip, the interface that holds that
   address instead.
2. Otherwise, in this order, the first that matches wins (a miss is logged and the
   next one is tried):
   - each --iface: an IPv4 address (the interface holding exactly that address, and
     that address) or an interface name;
   - each --iface-regex (Python `re.search`, i.e. unanchored like Go's MatchString):
     first against the usable addresses of every interface in index order (the first
     address that matches: that interface and that address), then against the names;
   - --iface-can-reach: the route the kernel would use to that address (`ip route
     get`): its outgoing interface and its preferred source address.
   Nothing matched: an error naming what was asked and what exists.
3. The address, unless a rule above picked one: the interface's first usable IPv4
   address, "usable" meaning global unicast or link-local (not loopback, multicast,
   0.0.0.0 or broadcast) and not deprecated, preferring global over link-local,
   permanent (configured) over dynamic, primary over secondary, in the kernel's
   order otherwise.
4. The public IP other nodes reach this node at (and VXLAN's local address) is
   --public-ip when given, else that address. An interface with MTU 0 is refused.

The rules are pure functions over plain data (`Iface`, lists of routes), unit-tested
without a kernel; `find_external_interface` reads the data from rtnetlink.
"""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, NamedTuple

from flanneld.backend.base import ExternalInterface
from podnet.net.ip import AF_INET, IP, parse_ip

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from podnet.net.netlink import Netlink

log = logging.getLogger("flanneld.iface")

# ifa_flags (linux/if_addr.h); for IPv4, TEMPORARY is SECONDARY's bit
IFA_F_SECONDARY = 0x01
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80


class Addr(NamedTuple):
    ip: IP
    prefixlen: int
    flags: int = IFA_F_PERMANENT


class Iface(NamedTuple):
    ifindex: int
    name: str
    mtu: int
    addrs: tuple[Addr, ...]         # every IPv4 address, in the kernel's order


class Route(NamedTuple):
    """What the rules need of a route: its destination length and outgoing interface."""
    prefixlen: int
    oif: int


class NoInterface(LookupError):
    """No interface matches what was asked for."""


def _ipv4_int(ip: IP) -> int:
    return ip.value if ip.family == AF_INET else -1


def is_link_local(ip: IP) -> bool:
    return ip.family == AF_INET and ip.value >> 16 == 0xA9FE          # 169.254.0.0/16


def is_global_unicast(ip: IP) -> bool:
    """Go's net.IP.IsGlobalUnicast for IPv4: anything but 0.0.0.0, 255.255.255.255,
    loopback, multicast and link-local (private ranges included)."""
    v = _ipv4_int(ip)
    if v < 0:
        return False
    return not (v == 0 or v == 0xFFFFFFFF or v >> 24 == 127 or v >> 28 == 0xE or is_link_local(ip))


def usable_addrs(iface: Iface) -> list[Addr]:
    """The addresses rule 3 chooses from, best first (a stable sort: the kernel's order
    stands among equals)."""
    ok = [a for a in iface.addrs if (is_global_unicast(a.ip) or is_link_local(a.ip))
          and not a.flags & IFA_F_DEPRECATED]
    return sorted(ok, key=lambda a: (is_link_local(a.ip), not a.flags & IFA_F_PERMANENT,
                                     bool(a.flags & IFA_F_SECONDARY)))


def _describe(ifaces: Iterable[Iface]) -> str:
    return ", ".join("%s:[%s]" % (i.name, " ".join(str(a.ip) for a in usable_addrs(i))) for i in ifaces)


def by_name_or_ip(ifaces: Sequence[Iface], want: str) -> tuple[Iface, IP | None]:
    """--iface: (the interface, the address when `want` is one)."""
    try:
        ip = parse_ip(want)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.family != AF_INET:
            raise NoInterface("%s is not an IPv4 address" % want)
        for iface in ifaces:
            if any(a.ip == ip for a in iface.addrs):
                return iface, ip
        raise NoInterface("no interface has the address %s" % want)
    for iface in ifaces:
        if iface.name == want:
            return iface, None
    raise NoInterface("no interface is named %s" % want)


def by_regex(ifaces: Sequence[Iface], pattern: str) -> tuple[Iface, IP | None]:
    """--iface-regex: the first usable address that matches (by interface index), else
    the first interface name that matches."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise NoInterface("could not compile the regex %r: %s" % (pattern, e)) from None
    ordered = sorted(ifaces, key=lambda i: i.ifindex)
    for iface in ordered:
        for a in usable_addrs(iface):
            if regex.search(str(a.ip)):
                return iface, a.ip
    for iface in ordered:
        if regex.search(iface.name):
            return iface, None
    raise NoInterface("could not match pattern %s to any of the available network interfaces (%s)"
                      % (pattern, _describe(ordered)))


def by_route(ifaces: Sequence[Iface], oif: int, prefsrc: IP | None, target: str) -> tuple[Iface, IP | None]:
    """--iface-can-reach: the route lookup's outgoing interface and source address."""
    for iface in ifaces:
        if iface.ifindex == oif and oif > 0:
            return iface, prefsrc
    raise NoInterface("the route to %s leaves through no interface (index %d)" % (target, oif))


def default_route_iface(ifaces: Sequence[Iface], routes: Iterable[Route]) -> Iface:
    """The interface of the first IPv4 default route."""
    for route in routes:
        if route.prefixlen == 0:
            if route.oif <= 0:
                raise NoInterface("found a default route but could not determine its interface")
            for iface in ifaces:
                if iface.ifindex == route.oif:
                    return iface
            raise NoInterface("the default route's interface (index %d) does not exist" % route.oif)
    raise NoInterface("unable to find a default route")


def external(iface: Iface, addr: IP | None, public_ip: str | None) -> ExternalInterface:
    """Rules 3 and 4: the ExternalInterface of a chosen interface (and address)."""
    if addr is None:
        usable = usable_addrs(iface)
        if not usable:
            raise NoInterface("failed to find an IPv4 address for interface %s" % iface.name)
        addr = usable[0].ip
    if iface.mtu == 0:
        raise NoInterface("failed to determine the MTU of interface %s" % iface.name)
    prefixlen = next((a.prefixlen for a in iface.addrs if a.ip == addr), 32)
    ip = addr
    if public_ip:
        try:
            ip = parse_ip(public_ip)
        except ValueError:
            raise NoInterface("invalid public IP address: %s" % public_ip) from None
        if ip.family != AF_INET:
            raise NoInterface("invalid public IP address: %s is not IPv4" % public_ip)
    return ExternalInterface(iface.name, iface.ifindex, ip, prefixlen, iface.mtu)


def choose(ifaces: Sequence[Iface], routes: Iterable[Route], route_get: Callable[[IP], tuple[int, IP | None]],
           names: Sequence[str] = (), regexes: Sequence[str] = (), can_reach: str | None = None,
           public_ip: str | None = None) -> ExternalInterface:
    """The whole rule set (see the module's docstring) over plain data; NoInterface if nothing fits.
    `route_get(ip)` is the kernel's route lookup: (outgoing interface index, preferred source)."""
    if not names and not regexes and not can_reach:
        if public_ip:
            iface, addr = by_name_or_ip(ifaces, public_ip)
        else:
            iface, addr = default_route_iface(ifaces, routes), None
        return external(iface, addr, public_ip)
    misses = []
    for want in names:
        try:
            iface, addr = by_name_or_ip(ifaces, want)
            return external(iface, addr, public_ip)
        except NoInterface as e:
            log.info("could not find a valid interface matching %s: %s", want, e)
            misses.append("--iface %s: %s" % (want, e))
    for pattern in regexes:
        try:
            iface, addr = by_regex(ifaces, pattern)
            return external(iface, addr, public_ip)
        except NoInterface as e:
            log.info("could not find a valid interface matching %s: %s", pattern, e)
            misses.append("--iface-regex %s: %s" % (pattern, e))
    if can_reach:
        try:
            try:
                target = parse_ip(can_reach)
            except ValueError:
                raise NoInterface("not an IP address") from None
            if target.family != AF_INET:
                raise NoInterface("not an IPv4 address")
            oif, prefsrc = route_get(target)
            iface, addr = by_route(ifaces, oif, prefsrc, can_reach)
            return external(iface, addr, public_ip)
        except (NoInterface, OSError) as e:
            log.info("could not find a valid interface matching --iface-can-reach %s: %s", can_reach, e)
            misses.append("--iface-can-reach %s: %s" % (can_reach, e))
    raise NoInterface("failed to find an interface that matches the interfaces and/or regexes provided (%s)"
                      % "; ".join(misses))


# ---- the kernel's side ------------------------------------------------------------------

def read_interfaces(nl: Netlink) -> list[Iface]:
    """Every link with its IPv4 addresses, in index order."""
    addrs: dict[int, list[Addr]] = {}
    for a in nl.addrs(family=AF_INET):
        addrs.setdefault(a.index, []).append(Addr(a.net.ip, a.net.prefixlen, a.flags))
    return [Iface(link.index, link.name, link.mtu, tuple(addrs.get(link.index, ())))
            for link in sorted(nl.links(), key=lambda link: link.index)]


def read_routes(nl: Netlink) -> list[Route]:
    return [Route(r.dst.prefixlen, r.oif or 0) for r in nl.routes(AF_INET)]


def find_external_interface(names: Sequence[str] = (), regexes: Sequence[str] = (), can_reach: str | None = None,
                            public_ip: str | None = None, netns: str | None = None) -> ExternalInterface:
    """choose() over this namespace's links, addresses and routes (`netns`: another's)."""
    from podnet.net.netlink import Netlink
    with Netlink(netns=netns) as nl:
        def route_get(ip: IP) -> tuple[int, IP | None]:
            route = nl.route_get(ip)
            if route is None:
                raise NoInterface("no route to %s" % ip)
            return route.oif or 0, route.prefsrc
        ext = choose(read_interfaces(nl), read_routes(nl), route_get, names, regexes, can_reach, public_ip)
    log.info("using interface %s (index %d, MTU %d), public IP %s", ext.name, ext.index, ext.mtu, ext.ip)
    return ext
