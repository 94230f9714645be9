"""Routes an agent owns, as plain data: read, diff, apply.

An agent marks every route it installs with its own route protocol number
(flanneld 77, calico-lite 78; `ip route show proto N` lists them). It owns
exactly the routes of one family in the main table that carry that number;
any other route (kernel, DHCP, an operator's, another agent's) is never
touched, even for a destination it also covers.

A route, as data (the dst is the key of the diffable map):
    {"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "flannel.1", "onlink": True}
    {"dst": "10.65.1.0/26", "type": "blackhole"}

Desired and actual state are maps of the same shape, so the diff is pure
(unit-tested without root); only `read_routes` and `RoutePlan`'s two apply
phases touch the kernel.
"""
from __future__ import annotations

import logging

from podnet.net.ip import AF_INET, parse_cidr, parse_ip
from podnet.net.netlink import RT_SCOPE_UNIVERSE, RTN_BLACKHOLE, RTN_UNICAST, RTNH_F_ONLINK, NetlinkError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any, TypeVar

    from podnet.net.netlink import Netlink, Route

    V = TypeVar("V")
    RouteDict = dict[str, Any]      # {"dst"?, "via", "dev", "onlink"} or {"dst"?, "type"}: see above

TYPE_NAMES = {RTN_UNICAST: "unicast", RTN_BLACKHOLE: "blackhole"}
TYPES = {name: number for number, name in TYPE_NAMES.items()}

log = logging.getLogger("podnet.net.routes")


# ---- pure ----------------------------------------------------------------------

def diff(have: Mapping[str, V], want: Mapping[str, V]) -> tuple[list[str], dict[str, V]]:
    """Two {key: value} maps -> (keys to remove, {key: value} to set).

    A key whose value differs is only set (an add-or-replace), not removed first.
    """
    remove = sorted(k for k in have if k not in want)
    put = {k: v for k, v in want.items() if have.get(k) != v}
    return remove, put


def routes_by_dst(routes: Iterable[RouteDict]) -> dict[str, RouteDict]:
    """[route dicts] -> {dst: route dict without dst}, the diffable form."""
    return {r["dst"]: {k: v for k, v in r.items() if k != "dst"} for r in routes}


def route_text(r: RouteDict) -> str:
    """' via X dev Y onlink' or ' blackhole': a route dict (without dst) for logs."""
    if r.get("type", "unicast") != "unicast":
        return " " + r["type"]
    return "%s dev %s%s" % (" via %s" % r["via"] if r.get("via") else "", r["dev"],
                            " onlink" if r.get("onlink") else "")


# ---- the kernel ------------------------------------------------------------------

def read_routes(nl: Netlink, protocol: int, family: int = AF_INET,
                types: tuple[int, ...] = (RTN_UNICAST,)) -> tuple[dict[str, RouteDict], list[Route]]:
    """Our routes as data: ({dst: route dict without dst}, [duplicates to delete]).

    Unicast routes read back as {"via", "dev", "onlink"}, others (of `types`)
    as {"type": name}. Link names are resolved from one link dump; a route
    through a link that is gone keeps its index as "dev" (it cannot match, so
    it is replaced). Duplicates (a second route of ours for a dst, other
    metric or type) are returned separately as kernel Route objects.
    """
    names = {link.index: link.name for link in nl.links()}
    have: dict[str, RouteDict] = {}
    extra: list[Route] = []
    for r in nl.routes(family):
        if r.protocol != protocol or r.type not in types:
            continue
        dst = str(r.dst)
        if dst in have or r.priority:
            extra.append(r)
            continue
        if r.type == RTN_UNICAST:
            have[dst] = {"via": str(r.gateway) if r.gateway is not None else None,
                         "dev": names.get(r.oif, r.oif),
                         "onlink": bool(r.flags & RTNH_F_ONLINK)}
        else:
            have[dst] = {"type": TYPE_NAMES.get(r.type, r.type)}
    return have, extra


class RoutePlan:
    """Our routes in the kernel against `want` ({dst: route dict without dst}):
    read once, then applied in two phases so a caller can put other changes
    in between (e.g. neighbour entries before the routes that use them). Each
    phase returns the list of changes it made; a change the kernel refuses is
    logged and left for the next sync.
    """

    def __init__(self, nl: Netlink, want: Mapping[str, RouteDict], protocol: int, family: int = AF_INET,
                 types: tuple[int, ...] = (RTN_UNICAST,)) -> None:
        self.nl = nl
        self.protocol = protocol
        self.have, self.extra = read_routes(nl, protocol, family, types)
        self.stale, self.put = diff(self.have, want)

    def remove(self, logger: logging.Logger = log) -> list[str]:
        changes = []
        for r in self.extra:
            if attempt(logger, "delete duplicate route %s" % r.dst, self.nl.del_route, r.dst,
                       gateway=r.gateway, oif=r.oif, priority=r.priority, protocol=self.protocol):
                changes.append("del route %s (duplicate, metric %d)" % (r.dst, r.priority))
        for dst in self.stale:
            if attempt(logger, "delete route %s" % dst, self.nl.del_route, parse_cidr(dst),
                       protocol=self.protocol):
                changes.append("del route %s%s" % (dst, route_text(self.have[dst])))
        return changes

    def add(self, dev_index: Mapping[str, int], logger: logging.Logger = log) -> list[str]:
        """dev_index maps the link names used in `want` to ifindexes.

        A dst whose kernel route has another type (unicast <-> blackhole) is
        deleted first: a replace cannot change the type of a route.
        """
        changes = []
        for dst, r in sorted(self.put.items()):
            text = "set route %s%s" % (dst, route_text(r))
            kind = r.get("type", "unicast")
            old = self.have.get(dst)
            if old is not None and old.get("type", "unicast") != kind:
                attempt(logger, "delete route %s" % dst, self.nl.del_route, parse_cidr(dst),
                        protocol=self.protocol)
            if kind != "unicast":
                ok = attempt(logger, text, self.nl.add_route, parse_cidr(dst), protocol=self.protocol,
                             scope=RT_SCOPE_UNIVERSE, rtype=TYPES[kind], replace=True)
            else:
                via = parse_ip(r["via"]) if r.get("via") else None
                ok = attempt(logger, text, self.nl.add_route, parse_cidr(dst), gateway=via,
                             oif=dev_index[r["dev"]], protocol=self.protocol,
                             onlink=bool(r.get("onlink")), replace=True)
            if ok:
                changes.append(text)
        return changes


def sync_routes(nl: Netlink, want: Mapping[str, RouteDict], dev_index: Mapping[str, int], protocol: int,
                logger: logging.Logger = log, family: int = AF_INET,
                types: tuple[int, ...] = (RTN_UNICAST,)) -> list[str]:
    """Make our routes equal `want`; returns the changes made ([] if none were needed)."""
    plan = RoutePlan(nl, want, protocol, family, types)
    return plan.remove(logger) + plan.add(dev_index, logger)


def attempt(logger: logging.Logger, what: str, func: Callable[..., object], *args: Any, **kw: Any) -> bool:
    """func(*args, **kw); True, or False with the kernel's refusal logged as "failed to <what>"."""
    try:
        func(*args, **kw)
        return True
    except NetlinkError as e:
        logger.error("failed to %s: %s", what, e)
        return False
