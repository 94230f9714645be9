"""calico: pure L3 pod networking, Calico's way: a veth per pod and host routes, no bridge.

Per attachment:
  host side   cali<11 hex>  (sha1 of "<container id>.<ifname>", as Calico names by
                             workload), MAC ee:ee:ee:ee:ee:ee, no address, up,
                             proxy_arp=1 (proxy_delay 0), forwarding=1, rp_filter=1
                             (a pod can only send from its own addresses)
              route         <pod ip>/32 dev cali... scope link
  pod side    <ifname>      <pod ip>/32, up
                            169.254.1.1 lladdr ee:ee:ee:ee:ee:ee PERMANENT (no ARP round trip
                                                                  for the gateway on first packet)
                            default via 169.254.1.1 dev <ifname> onlink
  IPv6 (if IPAM returns one): <ip>/128, default via fe80::ecee:eeff:feee:eeee (the
  host side's EUI-64 link-local address), proxy_ndp=1 on the host side.
Every packet of the pod goes to the node, which routes it: to another local
pod by its /32, to remote blocks by the routes the calico-lite agent (or
BIRD) installs.

Config (a network config or one plugin of a conflist):
    {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
     "mtu": 1480,                                     optional (IPIP: underlay MTU - 20); 0/absent = 1500
     "nodeBlocksFile": "/run/calico-lite/blocks",     optional, this default
     "ipam": {"type": "host-local", "subnet": "useNodeBlock", "dataDir": "..."}}
IPAM is delegated like the bridge plugin does. With "subnet": "useNodeBlock"
(or host-local with neither subnet nor ranges) the range is filled in from
the node's blocks, which the agent writes to nodeBlocksFile, one CIDR per
line ('#' comments): all blocks form one range set, so a pod gets one IPv4
address from whichever block has room. A missing file on ADD is error 11
(try again later); DEL, CHECK and GC work without it. Any other `ipam`
section (explicit ranges, another IPAM plugin) is passed on unchanged.
host-local never hands out a block's first, second (its "gateway") and last
address: 61 pod addresses per /26; the second is free for tunl0.

Deliberate behaviour (as the bridge plugin): ADD is idempotent (a rerun
re-applies the same attachment), a failed ADD removes the veth and releases
the address, DEL is idempotent and works without the netns.
"""
from __future__ import annotations

import os

from cni import errors
from cni.container import container_netlink, kernel_error, open_container_netns, roll_back
from cni.errors import CNIError
from cni.invoke import delegate
from cni.skel import conf_dns, conf_path, conf_value
from podnet.net import sysctl
from podnet.net.ip import AF_INET, AF_INET6, IPNet, parse_cidr, parse_ip
from podnet.net.netlink import RT_SCOPE_LINK, Netlink, NetlinkError
from podnet.net.netns import entered

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cni.skel import Commands

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY4 = "169.254.1.1"
GATEWAY6 = "fe80::ecee:eeff:feee:eeee"     # link-local of HOST_MAC (modified EUI-64)
DEFAULT_BLOCKS_FILE = "/run/calico-lite/blocks"
USE_NODE_BLOCK = "useNodeBlock"
# for DEL/CHECK/GC when the blocks are unknown: host-local ignores ranges then
_PLACEHOLDER_RANGE = "169.254.1.0/30"
_EEXIST, _ENODEV, _ESRCH = 17, 19, 3


# ---- names ---------------------------------------------------------------------

def _sha1_hex(data):
    # hashlib costs ~4.5 ms to import (it loads OpenSSL's _hashlib); the builtin _sha1 ~0.05 ms.
    try:
        from _sha1 import sha1
    except ImportError:       # an interpreter built without it
        from hashlib import sha1
    return sha1(data).hexdigest()


def host_veth_name(container_id, ifname):
    """'cali' + the first 11 hex digits of sha1('<container id>.<ifname>'): 15 characters."""
    return "cali" + _sha1_hex(("%s.%s" % (container_id, ifname)).encode())[:11]


# ---- config ----------------------------------------------------------------------

class NetConf:
    """The calico plugin's part of the network config, validated."""

    def __init__(self, args):
        c = args.conf
        self.name = c["name"]
        self.mtu = conf_value(c, "mtu", int, 0)
        if self.mtu and not 68 <= self.mtu <= 65535:
            raise CNIError(errors.INVALID_NETCONF, "invalid MTU %d (68 to 65535, or 0 for the default)" % self.mtu)
        self.blocks_file = conf_path(c, "nodeBlocksFile", DEFAULT_BLOCKS_FILE)
        self.ipam = conf_value(c, "ipam", dict, {})
        self.ipam_type = conf_value(self.ipam, "type", str, "")
        if not self.ipam_type:
            raise CNIError(errors.INVALID_NETCONF, "calico needs an IPAM plugin: ipam.type is missing")
        self.dns = conf_dns(c)
        subnet = self.ipam.get("subnet")
        self.use_node_block = subnet == USE_NODE_BLOCK or (
            self.ipam_type == "host-local" and not subnet and not self.ipam.get("ranges"))
        if self.use_node_block and self.ipam.get("ranges"):
            raise CNIError(errors.INVALID_NETCONF, "ipam: subnet %r and ranges cannot be used together" % subnet)


def parse_blocks(text, path="blocks"):
    """The node's blocks file -> [IPNet] (masked), in file order, without duplicates."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            net = parse_cidr(line)
        except ValueError:
            raise CNIError(errors.INVALID_NETCONF, "%s line %d: not a CIDR: %r" % (path, lineno, line)) from None
        if net.ip != net.network:
            raise CNIError(errors.INVALID_NETCONF, "%s line %d: %s has host bits set" % (path, lineno, line))
        if net.prefixlen > net.ip.bits - 2:
            raise CNIError(errors.INVALID_NETCONF, "%s line %d: block %s is too small" % (path, lineno, line))
        if net not in out:
            out.append(net)
    return out


def load_blocks(path):
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise CNIError(errors.TRY_AGAIN_LATER, "the node's blocks are not known yet: %s does not exist "
                       "(is the calico-lite agent running on this node?)" % path) from None
    except OSError as e:
        raise CNIError(errors.IO_FAILURE, "failed to read %s: %s" % (path, e.strerror)) from None
    blocks = parse_blocks(text, path)
    if not blocks:
        raise CNIError(errors.TRY_AGAIN_LATER, "%s lists no block for this node yet" % path)
    return blocks


def ipam_netconf(conf, args, need_blocks):
    """What to send the IPAM plugin: None for our own stdin unchanged, else a dict
    with the node's blocks as host-local's range set."""
    if not conf.use_node_block:
        return None
    try:
        blocks = load_blocks(conf.blocks_file)
    except CNIError:
        if need_blocks:
            raise
        blocks = [parse_cidr(_PLACEHOLDER_RANGE)]
    v4 = [{"subnet": str(b)} for b in blocks if b.family == AF_INET]
    v6 = [{"subnet": str(b)} for b in blocks if b.family == AF_INET6]
    ipam = {k: v for k, v in conf.ipam.items() if k != "subnet"}
    ipam["ranges"] = [s for s in (v4, v6) if s]
    out = dict(args.conf)
    out["ipam"] = ipam
    return out


# ---- helpers ---------------------------------------------------------------------

def _pair(host, cont, host_name, ifname):
    """(host link, container link) if host_name and the container's ifname are one veth pair."""
    h = host.link(host_name)
    c = cont.link(ifname)
    if h is None or c is None or h.kind != "veth" or c.kind != "veth":
        return None
    if h.peer_index != c.index or c.peer_index != h.index or c.link_netnsid is None:
        return None
    return h, c


def _host_sysctls(name, families):
    if AF_INET in families:
        sysctl.write("net/ipv4/ip_forward", "1")      # first: writing it resets every conf/*/forwarding
        sysctl.write("net/ipv4/conf/%s/forwarding" % name, "1")
        sysctl.write("net/ipv4/conf/%s/proxy_arp" % name, "1")
        sysctl.try_write("net/ipv4/neigh/%s/proxy_delay" % name, "0")
        sysctl.write("net/ipv4/conf/%s/rp_filter" % name, "1")
    if AF_INET6 in families:
        sysctl.write("net/ipv6/conf/all/forwarding", "1")
        sysctl.try_write("net/ipv6/conf/%s/disable_ipv6" % name, "0")
        sysctl.try_write("net/ipv6/conf/%s/accept_ra" % name, "0")
        sysctl.try_write("net/ipv6/conf/%s/accept_dad" % name, "0")
        sysctl.write("net/ipv6/conf/%s/proxy_ndp" % name, "1")
        sysctl.write("net/ipv6/conf/%s/forwarding" % name, "1")


def _pod_nets(ips):
    """IPAM's addresses as host-length IPNets (/32, /128), in order."""
    out = []
    for ipc in ips:
        net = parse_cidr(ipc["address"])
        out.append(IPNet(net.ip, net.ip.bits))
    return out


def _configure_pod(cont, ns_fd, ifname, nets):
    link = cont.link(ifname)
    families = {n.family for n in nets}
    if AF_INET6 in families:
        with entered(ns_fd):
            for dev in ("lo", ifname):
                sysctl.try_write("net/ipv6/conf/%s/disable_ipv6" % dev, "0")
            sysctl.try_write("net/ipv6/conf/%s/accept_dad" % ifname, "0")
            sysctl.try_write("net/ipv6/conf/%s/accept_ra" % ifname, "0")
    for net in nets:
        try:
            cont.add_addr(link.index, net, nodad=True)
        except NetlinkError as e:
            if e.errno != _EEXIST:
                raise kernel_error("failed to add %s to %s" % (net, ifname), e) from None
    if not link.up:
        cont.set_link(link.index, up=True)
    routes = []
    for family, gw, zero in ((AF_INET, GATEWAY4, "0.0.0.0/0"), (AF_INET6, GATEWAY6, "::/0")):
        if family not in families:
            continue
        gw_ip = parse_ip(gw)
        cont.set_neighbour(link.index, gw_ip, HOST_MAC)
        cont.add_route(parse_cidr(zero), gateway=gw_ip, oif=link.index, onlink=family == AF_INET,
                       replace=True)
        routes.append({"dst": zero, "gw": gw})
    return link, routes


# ---- ADD ------------------------------------------------------------------------------

def cmd_add(args):
    conf = NetConf(args)
    ipam_conf = ipam_netconf(conf, args, need_blocks=True)
    host_name = host_veth_name(args.container_id, args.ifname)
    ns_fd = open_container_netns(args.netns)
    undo, sockets = [], []
    try:
        cont = container_netlink(ns_fd, args.netns)
        sockets.append(cont)
        host = Netlink()
        sockets.append(host)
        pair = _pair(host, cont, host_name, args.ifname)
        fresh = pair is None
        if fresh:
            if cont.link(args.ifname) is not None:
                raise CNIError(errors.INVALID_ENV, "container veth name provided (%s) already exists" % args.ifname)
            stale = host.link(host_name)
            if stale is not None:       # left by an earlier sandbox of this container: not in use
                host.del_link(stale.index)
            try:
                host.add_veth(host_name, args.ifname, peer_netns_fd=ns_fd, mtu=conf.mtu)
            except NetlinkError as e:
                raise kernel_error("failed to create veth pair %s/%s" % (host_name, args.ifname), e) from None
            undo.append(lambda: _delete_link(host, host_name))
        ipam = delegate(conf.ipam_type, "ADD", args, ipam_conf)
        # A rerun got back the address the running pod holds: never release it on failure.
        if fresh:
            undo.append(lambda: delegate(conf.ipam_type, "DEL", args, ipam_conf))
        if not ipam["ips"]:
            raise CNIError(errors.INTERNAL, "IPAM plugin returned missing IP config")
        nets = _pod_nets(ipam["ips"])
        _host_sysctls(host_name, {n.family for n in nets})     # before up: no DAD, no RAs
        hlink = host.link(host_name)
        if hlink.mac != HOST_MAC or not hlink.up:
            host.set_link(hlink.index, mac=HOST_MAC if hlink.mac != HOST_MAC else None, up=True)
        clink, routes = _configure_pod(cont, ns_fd, args.ifname, nets)
        for net in nets:
            host.add_route(net, oif=hlink.index, scope=RT_SCOPE_LINK, replace=True)

        result = {"interfaces": [{"name": host_name, "mac": HOST_MAC},
                                 {"name": args.ifname, "mac": clink.mac, "sandbox": args.netns}],
                  "ips": [{"address": str(n), "interface": 1,
                           "gateway": GATEWAY4 if n.family == AF_INET else GATEWAY6} for n in nets],
                  "routes": routes,
                  "dns": conf.dns or ipam.get("dns") or {}}
        if conf.mtu:
            result["interfaces"][1]["mtu"] = conf.mtu
        undo.clear()
        return result
    except NetlinkError as e:
        raise kernel_error("calico ADD failed", e) from None
    finally:
        roll_back(undo)
        for sock in sockets:
            sock.close()
        os.close(ns_fd)


def _delete_link(nl, name):
    link = nl.link(name)
    if link is not None:
        nl.del_link(link.index)


# ---- DEL ------------------------------------------------------------------------------

def cmd_del(args):
    conf = NetConf(args)
    host_name = host_veth_name(args.container_id, args.ifname)
    host = Netlink()
    try:
        _delete_link(host, host_name)       # its peer and the /32 route go with it
    except NetlinkError as e:
        if e.errno != _ENODEV:
            raise kernel_error("failed to delete %s" % host_name, e) from None
    finally:
        host.close()
    delegate(conf.ipam_type, "DEL", args, ipam_netconf(conf, args, need_blocks=False))
    return None


# ---- CHECK ----------------------------------------------------------------------------

def cmd_check(args):
    from cni.types import from_version
    conf = NetConf(args)
    prev = args.conf.get("prevResult")      # the input first, before IPAM is asked anything
    if not prev:
        raise CNIError(errors.INVALID_NETCONF, "Required prevResult missing")
    result = from_version(prev, args.version)
    ns_fd = open_container_netns(args.netns)
    try:
        delegate(conf.ipam_type, "CHECK", args, ipam_netconf(conf, args, need_blocks=False))
        host_name = host_veth_name(args.container_id, args.ifname)
        cont = container_netlink(ns_fd, args.netns)
        host = Netlink()
        pair = _pair(host, cont, host_name, args.ifname)
        if pair is None:
            raise CNIError(errors.INVALID_NETCONF, "veth pair %s / %s in %s not found"
                           % (host_name, args.ifname, args.netns))
        hlink, clink = pair
        if not hlink.up or not clink.up:
            raise CNIError(errors.INVALID_NETCONF, "%s is down" % (host_name if not hlink.up else args.ifname))
        have = {a.net for a in cont.addrs(clink.index)}
        host_routes = {(r.dst, r.oif) for f in (AF_INET, AF_INET6) for r in host.routes(f)}
        cont_routes = [r for f in (AF_INET, AF_INET6) for r in cont.routes(f)]
        for ipc in result["ips"]:
            net = parse_cidr(ipc["address"])
            net = IPNet(net.ip, net.ip.bits)
            if net not in have:
                raise CNIError(errors.INVALID_NETCONF, "address %s is missing on %s" % (net, args.ifname))
            if (net, hlink.index) not in host_routes:
                raise CNIError(errors.INVALID_NETCONF, "host route %s dev %s is missing" % (net, host_name))
        for r in result["routes"]:
            dst = parse_cidr(r["dst"]).masked()
            gw = parse_ip(r["gw"]) if r.get("gw") else None
            if not any(k.dst == dst and (gw is None or k.gateway == gw) and k.oif == clink.index
                       for k in cont_routes):
                raise CNIError(errors.INVALID_NETCONF, "route %s%s is missing in the pod"
                               % (dst, " via %s" % gw if gw else ""))
        if sysctl.read("net/ipv4/conf/%s/proxy_arp" % host_name) != "1" and \
                any(":" not in ipc["address"] for ipc in result["ips"]):
            raise CNIError(errors.INVALID_NETCONF, "proxy_arp is off on %s" % host_name)
        host.close()
        cont.close()
    finally:
        os.close(ns_fd)
    return None


def cmd_gc(args):
    conf = NetConf(args)
    delegate(conf.ipam_type, "GC", args, ipam_netconf(conf, args, need_blocks=False))


def cmd_status(args):
    conf = NetConf(args)
    if conf.use_node_block:
        try:
            load_blocks(conf.blocks_file)
        except CNIError as e:               # no blocks yet: not ready for ADDs
            raise CNIError(errors.LIMITED_CONNECTIVITY, e.msg) from None
    delegate(conf.ipam_type, "STATUS", args, ipam_netconf(conf, args, need_blocks=False))


COMMANDS: Commands = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def main() -> None:
    from cni.skel import run_plugin
    run_plugin(COMMANDS, about="podnet calico plugin")
