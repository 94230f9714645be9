"""The node agent's kernel routes: BGP-learned blocks -> routes, IPIP device.

Pure part, `desired_routes`: from this node, the cluster's nodes, the routes
the BGP speaker learned ({prefix: next hop}), the IPIP mode and this node's
blocks, the routes the kernel should have, as plain data
(podnet.net.routes' shape):

    10.65.0.64/26 via 192.168.50.2 dev eth0                 next hop on our underlay subnet
    10.65.0.128/26 via 192.168.60.3 dev tunl0 onlink        IPIP: always, or cross-subnet when
                                                            the next hop is off our subnet
    10.65.0.0/26 blackhole                                  our own block: addresses no pod holds
                                                            are dropped here, not sent to the default route

Pods' own /32 routes (the CNI plugin's, via their cali devices) are more
specific than the blackhole and are not ours: the agent owns only the routes
carrying ROUTE_PROTOCOL (78, "podnet calico-lite"), so `sync` can delete
whatever it no longer wants without touching anything else.

IPIP applies only towards a next hop that is a cluster node (the endpoint of
its tunl0); a route learned from any other router (a ToR peer) is plain.
A next hop off our subnet with IPIP not applying needs an underlay router to
forward it: it goes via `underlay_gateway` if one is given, else it is
skipped with a warning (the kernel would refuse it anyway).

Kernel part:
    setup_ipip(nl, underlay_mtu, address=None)  tunl0 up, MTU underlay-20, rp_filter loose
    sync(nl, want, underlay_dev)                one dump of routes and links, then only the changes

The agent calls, after every change of learned routes, nodes or blocks:
    want = desired_routes(me, nodes, learned, config.ipip_mode, own_blocks=blocks)
    sync(nl, want, "eth0")
"""
import logging

from podnet.net.ip import AF_INET, IPNet, parse_cidr, parse_ip
from podnet.net.routes import RTN_BLACKHOLE, RTN_UNICAST, routes_by_dst, sync_routes

log = logging.getLogger("calico_lite.routes")

ROUTE_PROTOCOL = 78          # "podnet calico-lite" in route listings (flanneld has 77)
IPIP_DEVICE = "tunl0"
IPIP_OVERHEAD = 20           # the outer IPv4 header
IPIP_MODES = ("always", "cross-subnet", "never")


def _net(value):
    if isinstance(value, IPNet):
        return value
    return parse_cidr(value)


def _ip(value):
    return parse_ip(value) if isinstance(value, str) else value


def _addr_subnet(node):
    """(underlay IP, underlay subnet) of a datastore Node or anything with .ip as 'a.b.c.d/n'."""
    net = _net(node.ip)
    return net.ip, net.masked()


def ipip_applies(mode, next_hop, local_subnet):
    """Whether traffic towards a node at next_hop is encapsulated in this mode."""
    if mode == "always":
        return True
    if mode == "cross-subnet":
        return not local_subnet.contains(next_hop)
    if mode == "never":
        return False
    raise ValueError("IPIP mode must be one of %s, not %r" % ("|".join(IPIP_MODES), mode))


def desired_routes(this_node, nodes, learned, ipip_mode, local_subnet=None, own_blocks=(),
                   underlay_dev="eth0", underlay_gateway=None, problems=None):
    """The routes this node's kernel should hold, as [route dict] sorted by dst.

    this_node:   datastore.Node (its .ip, "192.168.50.1/24", gives our address and subnet)
    nodes:       the cluster's Nodes (iterable or {name: Node}); which next hops are nodes
    learned:     {prefix: next hop} from BGP (str or IPNet -> str or IP)
    ipip_mode:   "always" | "cross-subnet" | "never"
    local_subnet: our underlay subnet (default: from this_node.ip)
    own_blocks:  our blocks (blackholed)
    underlay_gateway: a router for next hops off our subnet when IPIP does not apply
    problems:    a list to which (prefix, reason) is appended for each skipped route
    """
    if ipip_mode not in IPIP_MODES:
        raise ValueError("IPIP mode must be one of %s, not %r" % ("|".join(IPIP_MODES), ipip_mode))
    my_ip, my_subnet = _addr_subnet(this_node)
    local_subnet = _net(local_subnet).masked() if local_subnet is not None else my_subnet
    if isinstance(nodes, dict):
        nodes = nodes.values()
    node_ips = {_addr_subnet(n)[0] for n in nodes}
    own = sorted({_net(b).masked() for b in own_blocks}, key=lambda b: (b.network.value, b.prefixlen))
    gateway = _ip(underlay_gateway) if underlay_gateway is not None else None
    routes = {}

    def skip(prefix, reason):
        log.warning("not routing %s: %s", prefix, reason)
        if problems is not None:
            problems.append((str(prefix), reason))

    for block in own:
        routes[str(block)] = {"dst": str(block), "type": "blackhole"}
    for prefix, hop in sorted(((_net(p).masked(), _ip(h)) for p, h in learned.items()),
                              key=lambda x: (x[0].network.value, x[0].prefixlen)):
        if prefix.family != AF_INET or hop is None or hop.family != AF_INET:
            skip(prefix, "not IPv4")
            continue
        if str(prefix) in routes:
            # (a covering aggregate, or a more specific prefix inside our block,
            # is routed normally: the most specific route wins in the kernel)
            skip(prefix, "it is this node's own block")
            continue
        if hop == my_ip:
            skip(prefix, "its next hop is this node")
            continue
        if hop in node_ips and ipip_applies(ipip_mode, hop, local_subnet):
            routes[str(prefix)] = {"dst": str(prefix), "via": str(hop), "dev": IPIP_DEVICE, "onlink": True}
        elif local_subnet.contains(hop):
            routes[str(prefix)] = {"dst": str(prefix), "via": str(hop), "dev": underlay_dev, "onlink": False}
        elif gateway is not None:
            routes[str(prefix)] = {"dst": str(prefix), "via": str(gateway), "dev": underlay_dev, "onlink": False}
        else:
            skip(prefix, "next hop %s is off %s and IPIP does not apply (mode %s%s)"
                 % (hop, local_subnet, ipip_mode, "" if hop in node_ips else ", not a cluster node"))
    return [routes[k] for k in sorted(routes, key=lambda d: (_net(d).network.value, _net(d).prefixlen))]


def uses_ipip(routes):
    return any(r.get("dev") == IPIP_DEVICE for r in routes)


# ---- the kernel ----------------------------------------------------------------------

def sync(nl, want, underlay_dev="eth0", logger=log):
    """Make our routes (ROUTE_PROTOCOL, IPv4 main table) equal `want` ([route dicts]);
    returns the changes made, [] on a rerun. Routes via a device that does not
    exist (tunl0 on a kernel without ipip) are logged and left for the next sync."""
    dev_index = {link.name: link.index for link in nl.links()}
    want_map = routes_by_dst(want)
    missing = {r.get("dev") for r in want_map.values() if r.get("dev")} - set(dev_index)
    for dev in sorted(missing):
        logger.error("device %s does not exist: its routes are left out for now", dev)
        want_map = {d: r for d, r in want_map.items() if r.get("dev") != dev}
    changes = sync_routes(nl, want_map, dev_index, ROUTE_PROTOCOL, logger,
                          types=(RTN_UNICAST, RTN_BLACKHOLE))
    for change in changes:
        logger.info("%s", change)
    return changes


class IPIPUnavailable(RuntimeError):
    """The kernel has no IPIP support (no tunl0, and an ipip link cannot be made)."""


def setup_ipip(nl, underlay_mtu, address=None, netns=None):
    """tunl0 up with MTU underlay_mtu - 20 (and `address`, an IPNet or CIDR, if given:
    e.g. the first address of our block, so that packets the node itself sends
    through the tunnel have a source the other side routes back to us).

    tunl0 is the ipip fallback device the kernel creates in every namespace
    when it has ipip; if absent it is created. Its rp_filter is set to loose
    (2): decapsulated packets come from remote pods and nodes whose reverse
    path is not always tunl0 (a node's own address is reached via the
    underlay), and the effective value is max(all, tunl0), so loose wins over
    a strict `all`. `netns` is where nl lives (for the sysctl), None for ours.
    Returns the tunl0 Link; IPIPUnavailable if the kernel lacks ipip.
    """
    from podnet.net.netlink import NetlinkError
    link = nl.link(IPIP_DEVICE)
    if link is None:
        try:
            nl.add_ipip(IPIP_DEVICE)      # no fixed endpoints, as the fallback tunl0
        except NetlinkError as e:
            if e.errno != 17:       # EEXIST: made meanwhile
                raise IPIPUnavailable("cannot create %s (kernel without ipip?): %s" % (IPIP_DEVICE, e)) from None
        link = nl.link(IPIP_DEVICE)
        if link is None:
            raise IPIPUnavailable("%s did not appear" % IPIP_DEVICE)
    if link.kind and link.kind != "ipip":
        raise IPIPUnavailable("%s exists but is a %s link, not ipip" % (IPIP_DEVICE, link.kind))
    mtu = underlay_mtu - IPIP_OVERHEAD
    if link.mtu != mtu:
        nl.set_link(link.index, mtu=mtu)
    if address is not None:
        net = _net(address)
        net = IPNet(net.ip, 32)
        have = [a.net for a in nl.addrs(link.index, AF_INET)]
        for old in have:
            if old != net:
                nl.del_addr(link.index, old)
        if net not in have:
            nl.add_addr(link.index, net)
    _rp_filter_loose(netns)
    if not link.up:
        nl.set_link(link.index, up=True)
    return nl.link(IPIP_DEVICE)


def _rp_filter_loose(netns):
    from podnet.net import sysctl
    if netns is None:
        sysctl.write("net/ipv4/conf/%s/rp_filter" % IPIP_DEVICE, "2")
        return
    from podnet.net.netns import entered
    with entered(netns):
        sysctl.write("net/ipv4/conf/%s/rp_filter" % IPIP_DEVICE, "2")
