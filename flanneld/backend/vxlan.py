"""flannel's vxlan backend: one VTEP per node, static entries per remote node.

Like flannel (pkg/backend/vxlan), no L2/L3-miss callbacks: for every remote
lease the kernel gets three static entries, so the datapath needs no daemon at
all once programmed (a restart or crash of flanneld does not disturb pods):

    route   10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink    (proto 77)
    neigh   10.244.2.0 lladdr <remote VtepMAC> dev flannel.1 PERMANENT
    fdb     <remote VtepMAC> dev flannel.1 dst <remote PublicIP> self permanent

The VTEP is `flannel.<VNI>` (VNI 1 by default), UDP port 8472 (flannel's and
Linux's default, not IANA's 4789), local = the public IP, bound to the external
interface, learning off, MTU 50 bytes below the external interface's (the
VXLAN + UDP + IP + inner Ethernet headers). Its address is the subnet's
network address as a /32 (flannel: a source address for host-to-pod traffic,
and no broadcast or prefix route). A VTEP that already exists with the same
VNI, port, local address and device is adopted as it is, MAC included: the
MAC is in the other nodes' FDB and neighbour entries, so keeping it keeps
their entries valid across a restart.
"""
import logging
import os

from flanneld.backend.base import Backend, SkippedLeases
from flanneld.backend.routes import NetlinkOwner, RoutePlan, attempt, diff, routes_by_dst
from podnet.net.ip import AF_INET, IPNet, parse_ip
from podnet.net.netlink import (
    IFLA_VXLAN_ID,
    IFLA_VXLAN_LEARNING,
    IFLA_VXLAN_LINK,
    IFLA_VXLAN_LOCAL,
    IFLA_VXLAN_PORT,
    NUD_PERMANENT,
    mac_bytes,
    mac_str,
)

log = logging.getLogger("flanneld.backend.vxlan")

DEFAULT_VNI = 1
DEFAULT_PORT = 8472          # flannel's (and the Linux driver's) default
ENCAP_OVERHEAD = 50          # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


def parse_mac(text):
    """A VtepMAC from a lease -> canonical lower-case text; ValueError unless unicast."""
    if not isinstance(text, str):
        raise ValueError("VtepMAC %r is not a string" % (text,))
    raw = mac_bytes(text)
    if raw == b"\0" * 6:
        raise ValueError("VtepMAC %s is all zeros" % text)
    if raw[0] & 1:
        raise ValueError("VtepMAC %s is a multicast address" % text)
    return mac_str(raw)


def random_mac():
    """A random locally administered unicast MAC (as flannel's mac.NewHardwareAddr)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return mac_str(bytes(raw))


def _u32(data):
    return int.from_bytes(data[:4], "little")


class VXLANBackend(NetlinkOwner, Backend):
    type = "vxlan"

    def __init__(self, config, ext, netns=None):
        super().__init__(config, ext)
        self.netns = netns
        # The options were checked with the rest of the config (flanneld.config.BACKEND_OPTIONS).
        self.vni = config.option("VNI", DEFAULT_VNI)
        self.port = config.option("Port", 0) or DEFAULT_PORT
        self.learning = config.option("Learning", False)
        for unsupported in ("GBP", "DirectRouting"):
            if config.option(unsupported, False):
                log.warning("vxlan option %s is not supported; ignoring it", unsupported)
        self.name = "flannel.%d" % self.vni
        self.mtu = ext.mtu - ENCAP_OVERHEAD
        self.index = None        # the VTEP's ifindex once registered
        self.mac = None          # and its MAC
        self.own = None          # our lease, once configure()d
        self.skipped = SkippedLeases(log)

    def __repr__(self):
        return "VXLANBackend(%s vni %d port %d on %s)" % (self.name, self.vni, self.port, self.ext)

    # ---- the VTEP ----

    def register(self):
        nl = self.nl
        link = nl.link(self.name)
        keep_mac = None
        if link is not None:
            why = self._incompatible(link)
            if why is None:
                log.info("adopting existing VTEP %s (MAC %s)", self.name, link.mac)
                if link.mtu != self.mtu:
                    log.info("%s: MTU %d -> %d", self.name, link.mtu, self.mtu)
                    nl.set_link(link.index, mtu=self.mtu)
                self._set(nl.link(self.name))
                return self._backend_data(), self.mtu
            log.warning("%s exists with an incompatible configuration (%s): recreating it",
                        self.name, why)
            if link.kind == "vxlan":
                keep_mac = link.mac
            nl.del_link(link.index)
        mac = keep_mac or self.mac or random_mac()     # self.mac: a VTEP we had before vanished
        nl.add_vxlan(self.name, self.vni, local=self.ext.ip, port=self.port, dev_index=self.ext.index,
                     learning=self.learning, mtu=self.mtu, mac=mac)
        log.info("created VTEP %s: vni %d port %d local %s dev %s MAC %s MTU %d", self.name, self.vni,
                 self.port, self.ext.ip, self.ext.name, mac, self.mtu)
        self._set(nl.link(self.name))
        from podnet.net import sysctl
        with self.in_netns():
            # slash form: the dot in "flannel.1" is part of the name, not a separator
            sysctl.try_write("net/ipv6/conf/%s/accept_ra" % self.name, 0)
        return self._backend_data(), self.mtu

    def _backend_data(self):
        # flannel's vxlanLeaseAttrs, same field order: {"VNI":1,"VtepMAC":"..."}
        return {"VNI": self.vni, "VtepMAC": self.mac}

    def _set(self, link):
        self.index, self.mac = link.index, link.mac

    def _incompatible(self, link):
        """Why an existing link cannot serve as our VTEP, or None if it can."""
        if link.kind != "vxlan":
            return "it is a %s device" % (link.kind or "non-vxlan")
        data = link.info_data
        vni = _u32(data[IFLA_VXLAN_ID]) if IFLA_VXLAN_ID in data else None
        if vni != self.vni:
            return "VNI %s, want %d" % (vni, self.vni)
        port = int.from_bytes(data[IFLA_VXLAN_PORT], "big") if IFLA_VXLAN_PORT in data else None
        if port != self.port:
            return "port %s, want %d" % (port, self.port)
        local = data.get(IFLA_VXLAN_LOCAL)
        if local is None or local != self.ext.ip.packed():
            return "local %s, want %s" % (
                ".".join(str(b) for b in local) if local else "unset", self.ext.ip)
        dev = _u32(data[IFLA_VXLAN_LINK]) if IFLA_VXLAN_LINK in data else 0
        if dev and dev != self.ext.index:
            return "device index %d, want %d (%s)" % (dev, self.ext.index, self.ext.name)
        learning = bool(data.get(IFLA_VXLAN_LEARNING, b"\0")[0])
        if learning != self.learning:
            return "learning %s, want %s" % ("on" if learning else "off", "on" if self.learning else "off")
        return None

    def configure(self, own_lease):
        """The subnet's network address as a /32 on the VTEP (nothing else), link up."""
        if self.index is None:
            raise RuntimeError("register() before configure()")
        self.own = own_lease
        nl = self.nl
        want = IPNet(own_lease.subnet.network, 32)
        present = False
        for a in nl.addrs(index=self.index, family=AF_INET):
            if a.net == want:
                present = True
            else:
                log.info("%s: removing stale address %s", self.name, a.net)
                nl.del_addr(self.index, a.net)
        if not present:
            nl.add_addr(self.index, want)
            log.info("%s: address %s", self.name, want)
        nl.set_link(self.index, up=True)

    # ---- remote leases ----

    def desired(self, remote_leases):
        """{"routes": [...], "neighbours": [...], "fdb": [...]}, each a list of dicts.

        Leases of another backend type, or unusable ones (no valid VtepMAC, not
        IPv4, outside the network, ours, a duplicate), are skipped, logged once
        (SkippedLeases).
        """
        routes, neighbours, fdb = [], [], []
        seen_subnets, seen_macs = set(), {}
        self.skipped.begin()
        for lease in sorted(remote_leases, key=lambda l: (l.subnet.network.value, l.subnet.prefixlen)):
            try:
                mac = self._check(lease, seen_subnets, seen_macs)
            except ValueError as e:
                self.skipped.skip(lease, logging.WARNING, "skipping lease %s (public IP %s): %s",
                                  lease.subnet, lease.public_ip, e)
                continue
            seen_subnets.add(lease.subnet)
            seen_macs[mac] = lease.subnet
            gateway = str(lease.subnet.network)
            routes.append({"dst": str(lease.subnet), "via": gateway, "dev": self.name, "onlink": True})
            neighbours.append({"ip": gateway, "mac": mac, "dev": self.name})
            fdb.append({"mac": mac, "dst": str(lease.public_ip), "dev": self.name})
        self.skipped.end()
        return {"routes": routes, "neighbours": neighbours, "fdb": fdb}

    def _check(self, lease, seen_subnets, seen_macs):
        """The lease's VtepMAC, or ValueError saying why the lease is unusable."""
        if lease.backend_type != self.type:
            raise ValueError("backend type %r, not vxlan" % (lease.backend_type,))
        if lease.subnet.family != AF_INET or lease.public_ip.family != AF_INET:
            raise ValueError("not IPv4")
        network = self.config.network
        if lease.subnet.prefixlen < network.prefixlen or not network.contains(lease.subnet.network):
            raise ValueError("subnet is outside the network %s" % network)
        if self.own is not None and lease.subnet.overlaps(self.own.subnet):
            raise ValueError("overlaps this node's subnet %s" % self.own.subnet)
        if lease.public_ip == self.ext.ip:
            raise ValueError("its public IP is this node's")
        if lease.subnet in seen_subnets:
            raise ValueError("a second lease for the same subnet")
        data = lease.backend_data if isinstance(lease.backend_data, dict) else {}
        if "VtepMAC" not in data:
            raise ValueError("no VtepMAC in its BackendData")
        mac = parse_mac(data["VtepMAC"])
        if mac == self.mac:
            raise ValueError("VtepMAC %s is this node's own" % mac)
        if mac in seen_macs:
            raise ValueError("VtepMAC %s is already used by %s" % (mac, seen_macs[mac]))
        return mac

    def sync(self, remote_leases):
        """Make routes, neighbours and FDB entries match desired(); returns the changes.

        Only state on our VTEP (and routes with ROUTE_PROTOCOL) is read and
        changed: entries of vanished leases are removed. If the VTEP itself has
        gone, it is created again (same MAC) and configured first.
        """
        self._ensure_vtep()
        want = self.desired(remote_leases)
        nl, index = self.nl, self.index
        routes = RoutePlan(nl, routes_by_dst(want["routes"]))

        # Neighbours: ours are the permanent ones; an entry the kernel made
        # itself (incomplete, stale...) is replaced where we want one, else left to age.
        neigh_have = {str(n.dst): n.lladdr for n in nl.neighbours(AF_INET, index=index)
                      if n.dst is not None and n.state & NUD_PERMANENT}
        neigh_stale, neigh_put = diff(neigh_have, {n["ip"]: n["mac"] for n in want["neighbours"]})

        fdb_have = {}
        for e in nl.fdb(index):
            if e.dst is not None:
                fdb_have.setdefault(e.lladdr, []).append(str(e.dst))
        fdb_stale, fdb_put = diff(fdb_have, {e["mac"]: [e["dst"]] for e in want["fdb"]})

        # Removals first (a route before the entries it uses), then additions in
        # flannel's order: neighbour, FDB and the route last, so the kernel never
        # tries to resolve the gateway itself.
        changes = routes.remove(log)
        for ip in neigh_stale:
            if attempt(log, "delete neighbour %s" % ip, nl.del_neighbour, index, parse_ip(ip)):
                changes.append("del neigh %s dev %s" % (ip, self.name))
        for mac in fdb_stale:
            for dst in fdb_have[mac]:
                if attempt(log, "delete FDB entry %s dst %s" % (mac, dst), nl.del_fdb, index, mac, parse_ip(dst)):
                    changes.append("del fdb %s dst %s dev %s" % (mac, dst, self.name))
        for ip, mac in sorted(neigh_put.items()):
            if attempt(log, "set neighbour %s lladdr %s" % (ip, mac), nl.set_neighbour, index, parse_ip(ip), mac):
                changes.append("set neigh %s lladdr %s dev %s" % (ip, mac, self.name))
        for mac, (dst,) in sorted(fdb_put.items()):
            if attempt(log, "set FDB entry %s dst %s" % (mac, dst), nl.set_fdb, index, mac, parse_ip(dst)):
                changes.append("set fdb %s dst %s dev %s" % (mac, dst, self.name))
        changes += routes.add({self.name: index}, log)
        for change in changes:
            log.info("%s", change)
        return changes

    def _ensure_vtep(self):
        """Re-make the VTEP (adopting one of that name, else creating it with our
        MAC) and its address if it has disappeared since register(); configure it
        again if it was set down or lost its address."""
        if self.index is None:
            raise RuntimeError("register() before sync()")
        link = self.nl.link(index=self.index)
        if link is not None and link.name == self.name:
            if self.own is not None:
                want = IPNet(self.own.subnet.network, 32)
                if not link.up or not any(a.net == want for a in self.nl.addrs(index=self.index, family=AF_INET)):
                    log.warning("VTEP %s is %s: configuring it again", self.name,
                                "down" if not link.up else "missing its address %s" % want)
                    self.configure(self.own)
            return
        log.error("VTEP %s (index %d) has disappeared: setting it up again", self.name, self.index)
        mac = self.mac
        self.register()
        if self.mac != mac:
            log.error("%s now has MAC %s, not %s: this node's lease must be updated", self.name, self.mac, mac)
        if self.own is not None:
            self.configure(self.own)

    def close(self):
        self.close_netlink()
