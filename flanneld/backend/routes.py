"""What the backends share: routes they own, plain-data diffs, the netlink socket.

Desired and actual kernel state are both plain data in the same shape, so the
diff is pure (and unit-tested without root); only `read_routes` and the
`apply` steps of a backend touch the kernel.

A route, as data:  {"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "flannel.1", "onlink": True}

A backend owns exactly the IPv4 routes of the main table that carry
ROUTE_PROTOCOL; any other route (kernel, DHCP, an operator's) is never
touched, even for a destination it also covers.
"""
import logging

from flanneld.backend.base import ROUTE_PROTOCOL
from podnet.net.ip import AF_INET, parse_cidr, parse_ip
from podnet.net.netlink import RTN_UNICAST, RTNH_F_ONLINK, Netlink, NetlinkError

log = logging.getLogger("flanneld.backend")


class NetlinkOwner:
    """Mixin: `self.nl`, a rtnetlink socket in the backend's network namespace.

    A backend talks to the namespace given as `netns` (a path such as
    /var/run/netns/x or /proc/PID/ns/net), or by default the one the process
    runs in (the daemon runs inside the node's namespace). The socket is opened
    on first use, so constructing a backend and calling desired() touches no
    kernel state; close() closes it.
    """

    _nl = None
    netns = None

    @property
    def nl(self):
        if self._nl is None:
            self._nl = Netlink(netns=self.netns)
        return self._nl

    def in_netns(self):
        """A context manager running its block in the backend's namespace (for
        sysctl writes and spawned tools, which follow the calling thread)."""
        if self.netns is None:
            import contextlib
            return contextlib.nullcontext()
        from podnet.net.netns import entered
        return entered(self.netns)

    def close_netlink(self):
        if self._nl is not None:
            self._nl.close()
            self._nl = None


# ---- pure ----------------------------------------------------------------------

def diff(have, want):
    """Two {key: value} maps -> (keys to remove, {key: value} to set).

    A key whose value differs is only set (an add-or-replace), not removed first.
    """
    remove = sorted(k for k in have if k not in want)
    put = {k: v for k, v in want.items() if have.get(k) != v}
    return remove, put


def routes_by_dst(routes):
    """[route dicts] -> {dst: route dict without dst}, the diffable form."""
    return {r["dst"]: {k: v for k, v in r.items() if k != "dst"} for r in routes}


# ---- the kernel ------------------------------------------------------------------

def read_routes(nl):
    """Our routes as data: ({dst: route dict without dst}, [duplicates to delete]).

    Link names are resolved from one link dump; a route through a link that is
    gone keeps its index as "dev" (it cannot match, so it is replaced).
    Duplicates (a second route of ours for a dst, other metric) are returned
    separately as kernel Route objects.
    """
    names = {link.index: link.name for link in nl.links()}
    have, extra = {}, []
    for r in nl.routes(AF_INET):
        if r.protocol != ROUTE_PROTOCOL or r.type != RTN_UNICAST:
            continue
        dst = str(r.dst)
        if dst in have or r.priority:
            extra.append(r)
            continue
        have[dst] = {"via": str(r.gateway) if r.gateway is not None else None,
                     "dev": names.get(r.oif, r.oif),
                     "onlink": bool(r.flags & RTNH_F_ONLINK)}
    return have, extra


class RoutePlan:
    """Our routes in the kernel against `want` ({dst: {"via", "dev", "onlink"}}):
    read once, then applied in two phases so a caller can put other changes
    in between (the vxlan backend adds a route only after its neighbour and
    FDB entries). Each phase returns the list of changes it made; a change the
    kernel refuses is logged and left for the next sync.
    """

    def __init__(self, nl, want):
        self.nl = nl
        self.have, self.extra = read_routes(nl)
        self.stale, self.put = diff(self.have, want)

    def remove(self, logger=log):
        changes = []
        for r in self.extra:
            if attempt(logger, "delete duplicate route %s" % r.dst, self.nl.del_route, r.dst,
                       gateway=r.gateway, oif=r.oif, priority=r.priority, protocol=ROUTE_PROTOCOL):
                changes.append("del route %s (duplicate, metric %d)" % (r.dst, r.priority))
        for dst in self.stale:
            if attempt(logger, "delete route %s" % dst, self.nl.del_route, parse_cidr(dst),
                       protocol=ROUTE_PROTOCOL):
                changes.append("del route %s%s" % (dst, _route_text(self.have[dst])))
        return changes

    def add(self, dev_index, logger=log):
        """dev_index maps the link names used in `want` to ifindexes."""
        changes = []
        for dst, r in sorted(self.put.items()):
            via = parse_ip(r["via"]) if r.get("via") else None
            text = "set route %s%s" % (dst, _route_text(r))
            if attempt(logger, text, self.nl.add_route, parse_cidr(dst), gateway=via,
                       oif=dev_index[r["dev"]], protocol=ROUTE_PROTOCOL,
                       onlink=bool(r.get("onlink")), replace=True):
                changes.append(text)
        return changes


def sync_routes(nl, want, dev_index, logger=log):
    """Make our routes equal `want`; returns the changes made ([] if none were needed)."""
    plan = RoutePlan(nl, want)
    return plan.remove(logger) + plan.add(dev_index, logger)


def _route_text(r):
    return "%s dev %s%s" % (" via %s" % r["via"] if r.get("via") else "", r["dev"],
                            " onlink" if r.get("onlink") else "")


def attempt(logger, what, func, *args, **kw):
    """func(*args, **kw); True, or False with the kernel's refusal logged as "failed to <what>"."""
    try:
        func(*args, **kw)
        return True
    except NetlinkError as e:
        logger.error("failed to %s: %s", what, e)
        return False
