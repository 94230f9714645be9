"""flannel's host-gw backend: a plain route per remote node, no encapsulation.

    10.244.2.0/24 via 192.168.50.2 dev eth0 proto 77

Pod packets leave the node unchanged, addressed (at L2) to the remote node,
so every node must be on the same L2 segment as the others: a remote whose
public IP is not in the external interface's connected subnet cannot be
reached this way. Its lease is refused with an error naming the problem; the
other nodes keep working. No device, no MTU cost, no BackendData.
"""
import logging

from flanneld.backend.base import Backend, SkippedLeases
from flanneld.backend.routes import NetlinkOwner, routes_by_dst, sync_routes
from podnet.net.ip import AF_INET, IPNet

log = logging.getLogger("flanneld.backend.host_gw")


class HostGWBackend(NetlinkOwner, Backend):
    type = "host-gw"

    def __init__(self, config, ext, netns=None):
        super().__init__(config, ext)
        self.netns = netns
        self.own = None
        self.skipped = SkippedLeases(log)
        self.segment = IPNet(ext.ip, ext.prefixlen).masked()   # what we reach directly

    def __repr__(self):
        return "HostGWBackend(%s)" % (self.ext,)

    def register(self):
        return {}, self.ext.mtu

    def configure(self, own_lease):
        self.own = own_lease     # nothing to put on a device

    def desired(self, remote_leases):
        """{"routes": [{"dst", "via", "dev", "onlink": False}, ...]}."""
        routes, seen = [], set()
        self.skipped.begin()
        for lease in sorted(remote_leases, key=lambda l: (l.subnet.network.value, l.subnet.prefixlen)):
            problem = self._problem(lease, seen)
            if problem:
                self.skipped.skip(lease, *problem)       # logged once, not on every sync
                continue
            seen.add(lease.subnet)
            routes.append({"dst": str(lease.subnet), "via": str(lease.public_ip), "dev": self.ext.name,
                           "onlink": False})
        self.skipped.end()
        return {"routes": routes}

    def _problem(self, lease, seen):
        """None, or (log level, format, args...) saying why the lease is skipped."""
        skip = "skipping lease %s (public IP %s): %s"
        if lease.backend_type != self.type:
            return (logging.WARNING, skip, lease.subnet, lease.public_ip,
                    "backend type %r, not host-gw" % (lease.backend_type,))
        if lease.subnet.family != AF_INET or lease.public_ip.family != AF_INET:
            return (logging.WARNING, skip, lease.subnet, lease.public_ip, "not IPv4")
        network = self.config.network
        if lease.subnet.prefixlen < network.prefixlen or not network.contains(lease.subnet.network):
            return (logging.WARNING, skip, lease.subnet, lease.public_ip, "outside the network %s" % network)
        if self.own is not None and lease.subnet.overlaps(self.own.subnet):
            return (logging.WARNING, skip, lease.subnet, lease.public_ip,
                    "overlaps this node's subnet %s" % self.own.subnet)
        if lease.public_ip == self.ext.ip:
            return (logging.WARNING, skip, lease.subnet, lease.public_ip, "its public IP is this node's")
        if lease.subnet in seen:
            return (logging.WARNING, skip, lease.subnet, lease.public_ip, "a second lease for the same subnet")
        if not self.segment.contains(lease.public_ip):
            return (logging.ERROR, "host-gw requires direct L2 reachability: %s via %s is not on %s's %s",
                    lease.subnet, lease.public_ip, self.ext.name, self.segment)
        return None

    def sync(self, remote_leases):
        """Make our routes match desired(); returns the changes made."""
        want = routes_by_dst(self.desired(remote_leases)["routes"])
        changes = sync_routes(self.nl, want, {self.ext.name: self.ext.index}, log)
        for change in changes:
            log.info("%s", change)
        return changes

    def close(self):
        self.close_netlink()
