"""What the backends share: routes they own, plain-data diffs, the netlink socket.

The route machinery itself (read our routes, diff, apply in two phases) is
podnet.net.routes, shared with calico-lite; here it is bound to flanneld's
ROUTE_PROTOCOL and logger. A route, as data:

    {"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "flannel.1", "onlink": True}

A backend owns exactly the IPv4 unicast routes of the main table that carry
ROUTE_PROTOCOL; any other route (kernel, DHCP, an operator's) is never
touched, even for a destination it also covers.
"""
import logging

from flanneld.backend.base import ROUTE_PROTOCOL
from podnet.net import routes as _routes
from podnet.net.netlink import Netlink
from podnet.net.routes import attempt, diff, routes_by_dst  # noqa: F401 (the backends' API)

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


def read_routes(nl):
    """flanneld's routes as data: ({dst: {"via", "dev", "onlink"}}, [duplicates to delete])."""
    return _routes.read_routes(nl, ROUTE_PROTOCOL)


class RoutePlan(_routes.RoutePlan):
    """podnet.net.routes.RoutePlan for flanneld's routes (IPv4 unicast, ROUTE_PROTOCOL)."""

    def __init__(self, nl, want):
        super().__init__(nl, want, ROUTE_PROTOCOL)

    def remove(self, logger=log):
        return super().remove(logger)

    def add(self, dev_index, logger=log):
        return super().add(dev_index, logger)


def sync_routes(nl, want, dev_index, logger=log):
    """Make our routes equal `want`; returns the changes made ([] if none were needed)."""
    return _routes.sync_routes(nl, want, dev_index, ROUTE_PROTOCOL, logger)
