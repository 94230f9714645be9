"""IP addresses and prefixes as integers.

The standard `ipaddress` module costs ~4 ms to import (it pulls in `re` and
`functools`); CNI plugins need only parsing, formatting and a little arithmetic,
so this module does that on plain ints with the C-level inet_pton/inet_ntop.
"""
from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = ["AF_INET", "AF_INET6", "IP", "IPNet", "parse_ip", "parse_cidr", "parse_net"]

_BITS = {AF_INET: 32, AF_INET6: 128}


class IP:
    """One address: family and integer value. Immutable, hashable, ordered."""

    __slots__ = ("family", "value")
    family: int
    value: int

    def __init__(self, family: int, value: int) -> None:
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("IP is immutable")

    @property
    def bits(self) -> int:
        return _BITS[self.family]

    @property
    def version(self) -> int:
        return 4 if self.family == AF_INET else 6

    def packed(self) -> bytes:
        return self.value.to_bytes(self.bits // 8, "big")

    def __add__(self, n: int) -> IP:
        value = self.value + n
        if not 0 <= value < (1 << self.bits):
            raise ValueError("address out of range")
        return IP(self.family, value)

    def __sub__(self, n: int) -> IP:
        return self.__add__(-n)

    def __str__(self) -> str:
        if self.family == AF_INET6 and 0xFFFF < self.value <= 0xFFFFFFFF:
            # glibc prints ::/96 in the deprecated IPv4-compatible form
            # (::1.2.3.4); RFC 5952, Go and `ipaddress` write hex (::102:304).
            return "::%x:%x" % (self.value >> 16, self.value & 0xFFFF)
        return inet_ntop(self.family, self.packed())

    def __repr__(self) -> str:
        return "IP(%s)" % self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IP) and self.family == other.family and self.value == other.value

    def __lt__(self, other: IP) -> bool:
        return (self.family, self.value) < (other.family, other.value)

    def __le__(self, other: IP) -> bool:
        return (self.family, self.value) <= (other.family, other.value)

    def __hash__(self) -> int:
        return hash((self.family, self.value))


class IPNet:
    """An address with a prefix length, e.g. 10.1.2.3/24 (host bits are kept)."""

    __slots__ = ("ip", "prefixlen")
    ip: IP
    prefixlen: int

    def __init__(self, ip: IP, prefixlen: int) -> None:
        if not 0 <= prefixlen <= ip.bits:
            raise ValueError("prefix length %d out of range" % prefixlen)
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "prefixlen", prefixlen)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("IPNet is immutable")

    @property
    def family(self) -> int:
        return self.ip.family

    @property
    def version(self) -> int:
        return self.ip.version

    @property
    def hostmask(self) -> int:
        return (1 << (self.ip.bits - self.prefixlen)) - 1

    @property
    def network(self) -> IP:
        """The first address of the prefix."""
        return IP(self.ip.family, self.ip.value & ~self.hostmask)

    @property
    def broadcast(self) -> IP:
        """The last address of the prefix."""
        return IP(self.ip.family, self.ip.value | self.hostmask)

    @property
    def netmask(self) -> IP:
        return IP(self.ip.family, ((1 << self.ip.bits) - 1) ^ self.hostmask)

    def masked(self) -> IPNet:
        """The prefix itself, host bits cleared (10.1.2.3/24 -> 10.1.2.0/24)."""
        return IPNet(self.network, self.prefixlen)

    def contains(self, ip: IP) -> bool:
        return ip.family == self.ip.family and (ip.value & ~self.hostmask) == self.network.value

    def overlaps(self, other: IPNet) -> bool:
        return self.contains(other.network) or other.contains(self.network)

    def size(self) -> int:
        return self.hostmask + 1

    def __str__(self) -> str:
        return "%s/%d" % (self.ip, self.prefixlen)

    def __repr__(self) -> str:
        return "IPNet(%s)" % self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IPNet) and self.ip == other.ip and self.prefixlen == other.prefixlen

    def __hash__(self) -> int:
        return hash((self.ip, self.prefixlen))


def parse_ip(text: str) -> IP:
    """'10.0.0.1' or 'fd00::1' -> IP; ValueError on anything else."""
    if not isinstance(text, str) or not text:
        raise ValueError("invalid IP address %r" % (text,))
    family = AF_INET6 if ":" in text else AF_INET
    try:
        packed = inet_pton(family, text)
    except OSError:
        raise ValueError("invalid IP address %r" % text) from None
    if family == AF_INET and text.count(".") != 3:
        raise ValueError("invalid IP address %r" % text)
    return IP(family, int.from_bytes(packed, "big"))


def parse_cidr(text: str) -> IPNet:
    """'10.1.2.3/24' -> IPNet keeping the host bits (Go's net.ParseCIDR keeps both)."""
    if not isinstance(text, str) or "/" not in text:
        raise ValueError("invalid CIDR address %r" % (text,))
    addr, _, plen = text.partition("/")
    ip = parse_ip(addr)
    # ASCII digits only (str.isdigit also takes '٢٤' and '²'); leading zeros
    # are fine, as for Go's net.ParseCIDR ("/024", "/0024").
    digits = plen.lstrip("0") or "0"
    if not (plen.isascii() and plen.isdigit()) or len(digits) > 3 or int(digits) > ip.bits:
        raise ValueError("invalid CIDR address %r" % text)
    return IPNet(ip, int(digits))


def parse_net(text: str) -> IPNet:
    """Parse a CIDR and clear its host bits (what a subnet field means)."""
    return parse_cidr(text).masked()
