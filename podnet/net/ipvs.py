"""IPVS (the kernel's L4 load balancer) over generic netlink, standard library only.

IPVS is a generic netlink family named "IPVS": its numeric id is assigned at
run time, so the first request asks the genl controller for it. A kernel
without ip_vs has no such family: that is `IpvsUnavailable`, one clear
message instead of an errno.

What kube-proxy's IPVS mode needs, and nothing more:
  virtual servers (services): add / update / delete / dump / flush;
  real servers (destinations) of one virtual server: add / update / delete / dump,
  the dump carrying the active and inactive connection counts that graceful
  removal waits on.

Messages are built by pure functions (`service_attrs`, `dest_attrs`,
`genl_header`, ...) so their encoding is unit-tested without a kernel; the
`Ipvs` socket class only sends them.
"""
from __future__ import annotations

import struct

from podnet.net.ip import AF_INET, AF_INET6, inet_ntop, inet_pton
from podnet.net.netlink import F_DUMP, Netlink, NetlinkError, attr, nested, parse_attrs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
FAMILY_NAME = "IPVS"
GENL_VERSION = 1

# commands
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST, CMD_GET_DEST = 5, 6, 7, 8
CMD_GET_INFO = 15
CMD_FLUSH = 17

# top-level attributes
CMD_ATTR_SERVICE, CMD_ATTR_DEST = 1, 2

# service attributes
SVC_ATTR_AF, SVC_ATTR_PROTOCOL, SVC_ATTR_ADDR, SVC_ATTR_PORT = 1, 2, 3, 4
SVC_ATTR_FWMARK, SVC_ATTR_SCHED_NAME, SVC_ATTR_FLAGS, SVC_ATTR_TIMEOUT = 5, 6, 7, 8
SVC_ATTR_NETMASK, SVC_ATTR_STATS = 9, 10

# destination attributes
DEST_ATTR_ADDR, DEST_ATTR_PORT, DEST_ATTR_FWD_METHOD, DEST_ATTR_WEIGHT = 1, 2, 3, 4
DEST_ATTR_U_THRESH, DEST_ATTR_L_THRESH = 5, 6
DEST_ATTR_ACTIVE_CONNS, DEST_ATTR_INACT_CONNS, DEST_ATTR_PERSIST_CONNS = 7, 8, 9
DEST_ATTR_STATS, DEST_ATTR_ADDR_FAMILY = 10, 11

# statistics (IPVS_STATS_ATTR_*), u32 except the byte counters (u64)
STATS_CONNS, STATS_INPKTS, STATS_OUTPKTS, STATS_INBYTES, STATS_OUTBYTES = 1, 2, 3, 4, 5

# service flags; HASHED is the kernel's own bookkeeping, reported in dumps only
F_PERSISTENT = 0x1
F_HASHED = 0x2
F_ONEPACKET = 0x4
F_SCHED1, F_SCHED2, F_SCHED3 = 0x8, 0x10, 0x20

# forwarding methods (IP_VS_CONN_F_*)
FWD_MASQ, FWD_LOCALNODE, FWD_TUNNEL, FWD_DROUTE = 0, 1, 2, 3
FWD_MASK = 0x7

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
_ENOENT, _ESRCH, _EEXIST = 2, 3, 17

_GENL = struct.Struct("=BBH")


class IpvsUnavailable(OSError):
    """The kernel has no IPVS (the ip_vs module is not built, loaded or loadable)."""


# ---- plain data ------------------------------------------------------------------------

class Service:
    """One virtual server, keyed by (protocol, address, port)."""
    __slots__ = ("protocol", "address", "port", "scheduler", "flags", "timeout", "netmask", "family", "stats")
    protocol: str
    address: str
    port: int
    scheduler: str
    flags: int
    timeout: int
    netmask: int
    family: int
    stats: dict[int, int]

    def __init__(self, protocol: str, address: str, port: int, scheduler: str = "rr", flags: int = 0,
                 timeout: int = 0, netmask: int | None = None, stats: dict[int, int] | None = None) -> None:
        self.protocol = protocol                # "TCP" | "UDP" | "SCTP"
        self.address = address                  # text form
        self.port = port
        self.scheduler = scheduler
        self.flags = flags & ~F_HASHED
        self.timeout = timeout                  # persistence timeout, seconds (F_PERSISTENT)
        self.family = AF_INET6 if ":" in address else AF_INET
        self.netmask = netmask if netmask is not None else default_netmask(self.family)
        self.stats = stats or {}

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.protocol, self.address, self.port)

    def settings(self) -> tuple[str, int, int, int]:
        """What SET_SERVICE can change: compared to tell whether an update is due."""
        return (self.scheduler, self.flags, self.timeout, self.netmask)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Service) and self.key == other.key and self.settings() == other.settings()

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return "Service(%s %s:%d %s flags=%#x timeout=%d)" % (self.protocol, self.address, self.port,
                                                              self.scheduler, self.flags, self.timeout)


class Dest:
    """One real server of a virtual server, keyed by (address, port)."""
    __slots__ = ("address", "port", "weight", "fwd", "active", "inactive", "persistent", "stats")
    address: str
    port: int
    weight: int
    fwd: int
    active: int
    inactive: int
    persistent: int
    stats: dict[int, int]

    def __init__(self, address: str, port: int, weight: int = 1, fwd: int = FWD_MASQ, active: int = 0,
                 inactive: int = 0, persistent: int = 0, stats: dict[int, int] | None = None) -> None:
        self.address = address
        self.port = port
        self.weight = weight
        self.fwd = fwd
        self.active = active                    # connections counted as active (TCP ESTABLISHED...)
        self.inactive = inactive                # the others (TIME_WAIT, UDP...)
        self.persistent = persistent            # persistence templates pointing here
        self.stats = stats or {}

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    @property
    def connections(self) -> int:
        return self.active + self.inactive

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dest) and (self.key, self.weight, self.fwd) == (other.key, other.weight, other.fwd)

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return "Dest(%s:%d weight=%d active=%d inactive=%d)" % (self.address, self.port, self.weight,
                                                                self.active, self.inactive)


def default_netmask(family: int) -> int:
    """Persistence granularity: one client address (ipvsadm's default)."""
    return 0xFFFFFFFF if family == AF_INET else 128


# ---- encoding (pure) ----------------------------------------------------------------------

def genl_header(cmd: int, version: int = GENL_VERSION) -> bytes:
    return _GENL.pack(cmd, version, 0)


def _addr16(family: int, address: str) -> bytes:
    """An address as the kernel's union nf_inet_addr: 16 bytes, IPv4 in the first 4."""
    raw = inet_pton(family, address)
    return raw + b"\0" * (16 - len(raw))


def _u16(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=H", value))


def _u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def service_key_attrs(svc: Service) -> bytes:
    """The attributes that name a virtual server (enough for DEL, GET and as a dest's parent)."""
    return (_u16(SVC_ATTR_AF, svc.family) + _u16(SVC_ATTR_PROTOCOL, PROTOCOLS[svc.protocol])
            + attr(SVC_ATTR_ADDR, _addr16(svc.family, svc.address))
            + attr(SVC_ATTR_PORT, struct.pack("!H", svc.port)))


def service_attrs(svc: Service) -> bytes:
    """A full virtual server (NEW/SET_SERVICE): key, scheduler, flags/mask, timeout, netmask."""
    return (service_key_attrs(svc) + attr(SVC_ATTR_SCHED_NAME, svc.scheduler)
            + attr(SVC_ATTR_FLAGS, struct.pack("=II", svc.flags, 0xFFFFFFFF))
            + _u32(SVC_ATTR_TIMEOUT, svc.timeout)
            + attr(SVC_ATTR_NETMASK, struct.pack("!I" if svc.family == AF_INET else "=I", svc.netmask)))


def dest_attrs(dest: Dest, family: int, full: bool = True) -> bytes:
    """A real server (NEW/SET_DEST with full=True; DEL_DEST needs only address and port)."""
    out = attr(DEST_ATTR_ADDR, _addr16(family, dest.address)) + attr(DEST_ATTR_PORT, struct.pack("!H", dest.port))
    if full:
        out += (_u32(DEST_ATTR_FWD_METHOD, dest.fwd & FWD_MASK) + _u32(DEST_ATTR_WEIGHT, dest.weight)
                + _u32(DEST_ATTR_U_THRESH, 0) + _u32(DEST_ATTR_L_THRESH, 0)
                + _u16(DEST_ATTR_ADDR_FAMILY, family))
    return out


def service_message(cmd: int, svc: Service, full: bool = False) -> bytes:
    return genl_header(cmd) + nested(CMD_ATTR_SERVICE, service_attrs(svc) if full else service_key_attrs(svc))


def dest_message(cmd: int, svc: Service, dest: Dest, full: bool = True) -> bytes:
    return (genl_header(cmd) + nested(CMD_ATTR_SERVICE, service_key_attrs(svc))
            + nested(CMD_ATTR_DEST, dest_attrs(dest, svc.family, full)))


def family_request(name: str = FAMILY_NAME) -> bytes:
    return genl_header(CTRL_CMD_GETFAMILY) + attr(CTRL_ATTR_FAMILY_NAME, name)


# ---- decoding (pure) -----------------------------------------------------------------------

def _stats(raw: bytes) -> dict[int, int]:
    out: dict[int, int] = {}
    for kind, value in parse_attrs(raw).items():
        if len(value) == 4:
            out[kind] = struct.unpack("=I", value)[0]
        elif len(value) == 8:
            out[kind] = struct.unpack("=Q", value)[0]
    return out


def _addr_text(family: int, raw: bytes) -> str:
    return inet_ntop(family, raw[:4] if family == AF_INET else raw[:16])


def parse_service(payload: bytes) -> Service | None:
    """A GET_SERVICE answer (after the genl header) -> Service, or None for fwmark services."""
    top = parse_attrs(payload, _GENL.size)
    a = parse_attrs(top.get(CMD_ATTR_SERVICE, b""))
    if SVC_ATTR_ADDR not in a or SVC_ATTR_PORT not in a:
        return None
    family = struct.unpack("=H", a[SVC_ATTR_AF])[0]
    proto = PROTOCOL_NAMES.get(struct.unpack("=H", a[SVC_ATTR_PROTOCOL])[0], "?")
    flags = struct.unpack_from("=I", a[SVC_ATTR_FLAGS])[0] if SVC_ATTR_FLAGS in a else 0
    netmask = None
    if SVC_ATTR_NETMASK in a:
        netmask = struct.unpack("!I" if family == AF_INET else "=I", a[SVC_ATTR_NETMASK])[0]
    sched = a.get(SVC_ATTR_SCHED_NAME, b"").split(b"\0", 1)[0].decode()
    return Service(proto, _addr_text(family, a[SVC_ATTR_ADDR]), struct.unpack("!H", a[SVC_ATTR_PORT])[0],
                   sched, flags, struct.unpack("=I", a[SVC_ATTR_TIMEOUT])[0] if SVC_ATTR_TIMEOUT in a else 0,
                   netmask, _stats(a[SVC_ATTR_STATS]) if SVC_ATTR_STATS in a else None)


def parse_dest(payload: bytes, family: int) -> Dest:
    """A GET_DEST answer -> Dest (the address family is the dest's own if the kernel says so)."""
    top = parse_attrs(payload, _GENL.size)
    a = parse_attrs(top.get(CMD_ATTR_DEST, b""))

    def u32(kind: int) -> int:
        return struct.unpack("=I", a[kind])[0] if kind in a else 0
    if DEST_ATTR_ADDR_FAMILY in a:
        family = struct.unpack("=H", a[DEST_ATTR_ADDR_FAMILY])[0]
    return Dest(_addr_text(family, a[DEST_ATTR_ADDR]), struct.unpack("!H", a[DEST_ATTR_PORT])[0],
                u32(DEST_ATTR_WEIGHT), u32(DEST_ATTR_FWD_METHOD) & FWD_MASK, u32(DEST_ATTR_ACTIVE_CONNS),
                u32(DEST_ATTR_INACT_CONNS), u32(DEST_ATTR_PERSIST_CONNS),
                _stats(a[DEST_ATTR_STATS]) if DEST_ATTR_STATS in a else None)


def parse_family_id(answers: Iterable[tuple[int, bytes]]) -> int | None:
    for _, payload in answers:
        a = parse_attrs(payload, _GENL.size)
        if CTRL_ATTR_FAMILY_ID in a:
            return struct.unpack("=H", a[CTRL_ATTR_FAMILY_ID][:2])[0]
    return None


# ---- the socket --------------------------------------------------------------------------------

class Ipvs(Netlink):
    """One generic netlink socket talking to IPVS in the current (or given) network namespace.

    Raises IpvsUnavailable when the kernel has no IPVS. `ops` counts the
    requests that changed something (a sync reports it; a rerun makes none)."""

    def __init__(self, netns: str | int | None = None) -> None:
        super().__init__(netns=netns, protocol=NETLINK_GENERIC)
        self.ops = 0
        try:
            self.family = self._resolve(FAMILY_NAME)
        except BaseException:
            self.close()
            raise

    def _resolve(self, name: str) -> int:
        try:
            answers = self.request(GENL_ID_CTRL, 0, family_request(name))
        except NetlinkError as e:
            if e.errno == _ENOENT:
                raise IpvsUnavailable(e.errno, "this kernel has no IPVS (ip_vs): the generic netlink "
                                               "family %r does not exist (load the ip_vs module)" % name) from None
            raise
        family = parse_family_id(answers)
        if family is None:
            raise IpvsUnavailable(_ENOENT, "this kernel has no IPVS (ip_vs): no id for %r" % name)
        return family

    def _do(self, body: bytes, dump: bool = False) -> list[tuple[int, bytes]]:
        if not dump:
            self.ops += 1
        return self.request(self.family, F_DUMP if dump else 0, body)

    # ---- virtual servers ----
    def services(self) -> list[Service]:
        out = []
        for _, payload in self._do(genl_header(CMD_GET_SERVICE), dump=True):
            svc = parse_service(payload)
            if svc is not None:
                out.append(svc)
        return out

    def add_service(self, svc: Service) -> None:
        self._do(service_message(CMD_NEW_SERVICE, svc, full=True))

    def update_service(self, svc: Service) -> None:
        self._do(service_message(CMD_SET_SERVICE, svc, full=True))

    def del_service(self, svc: Service) -> None:
        """Delete a virtual server and its real servers; a missing one is not an error."""
        try:
            self._do(service_message(CMD_DEL_SERVICE, svc))
        except NetlinkError as e:
            if e.errno not in (_ESRCH, _ENOENT):
                raise

    def flush(self) -> None:
        """Delete every virtual server of this network namespace."""
        self._do(genl_header(CMD_FLUSH))

    # ---- real servers ----
    def dests(self, svc: Service) -> list[Dest]:
        return [parse_dest(p, svc.family) for _, p in
                self.request(self.family, F_DUMP, genl_header(CMD_GET_DEST) +
                             nested(CMD_ATTR_SERVICE, service_key_attrs(svc)))]

    def add_dest(self, svc: Service, dest: Dest) -> None:
        self._do(dest_message(CMD_NEW_DEST, svc, dest))

    def update_dest(self, svc: Service, dest: Dest) -> None:
        self._do(dest_message(CMD_SET_DEST, svc, dest))

    def del_dest(self, svc: Service, dest: Dest) -> None:
        """Delete a real server; a missing one is not an error."""
        try:
            self._do(dest_message(CMD_DEL_DEST, svc, dest, full=False))
        except NetlinkError as e:
            if e.errno not in (_ENOENT, _ESRCH):
                raise

    def table(self) -> dict[tuple[str, str, int], tuple[Service, dict[tuple[str, int], Dest]]]:
        """{service key: (Service, {dest key: Dest})}: the whole IPVS table, one dump per service."""
        return {svc.key: (svc, {d.key: d for d in self.dests(svc)}) for svc in self.services()}
