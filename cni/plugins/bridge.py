"""bridge: a veth per container, its host side on a Linux bridge, addresses from IPAM.

Behaves as the reference `bridge` plugin (containernetworking/plugins) for the
same config, with these deliberate differences (docs/decisions.md):
- a repeated ADD for an existing container interface re-applies the
  configuration instead of failing (reruns are no-ops);
- a failed ADD undoes what it made (veth, IPAM allocation, masquerade rules,
  and the bridge if this call created it and nothing else uses it);
- DEL removes the masquerade chain even when the container's netns is gone
  (the chain name depends only on network name and container ID);
- masquerade rules are applied in one iptables-restore, not ~9 iptables calls;
- GC (spec 1.1.0) also removes the masquerade chains (and POSTROUTING jumps) of
  this network's attachments not in cni.dev/valid-attachments, found by the
  comment naming network and container, in one restore per family (1.1.1 has
  no GC).
Found by netns_tests/test_conformance.py against Debian's 1.1.1, where ours
keeps the better behaviour (several are bugs fixed upstream since):
- several addresses of one family: all ACCEPTs precede the MASQUERADE (1.1.1
  interleaves them and masquerades traffic to the second subnet), and DEL
  removes every jump (1.1.1 fails deleting the still-referenced chain);
- IPv6 gateway addresses on the bridge get IFA_F_NODAD (1.1.1 runs DAD: the
  gateway is tentative, unusable, for ~1 s after the first ADD);
- the IPAM result's DNS is passed on when the netconf has none (1.1.1 drops
  it: plugins#431, fixed in 1.2.0);
- CHECK matches a result route without "gw" by destination (1.1.1 fails its
  own fresh ADD then);
- veths keep the kernel's default txqueuelen (1.1.1 sets 0: plugins#1100).
"""
from __future__ import annotations

import os
import time

from cni import errors
from cni.container import container_netlink, kernel_error, open_container_netns, roll_back
from cni.errors import CNIError
from cni.invoke import delegate
from cni.iptables_names import chain_name, owned_chains, owner_comment, removal_input
from cni.skel import conf_dns, conf_value
from podnet.net import sysctl
from podnet.net.ip import AF_INET, AF_INET6, IPNet, parse_cidr, parse_ip
from podnet.net.netlink import Netlink, NetlinkError
from podnet.net.netns import entered, open_netns

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cni.skel import Commands

DEFAULT_BRIDGE = "cni0"
_EEXIST = 17


class NetConf:
    """The bridge plugin's part of the network config, validated."""

    def __init__(self, args):
        c = args.conf
        self.name = c["name"]
        self.bridge = conf_value(c, "bridge", str, DEFAULT_BRIDGE)
        self.is_default_gw = conf_value(c, "isDefaultGateway", bool, False)
        self.is_gw = conf_value(c, "isGateway", bool, False) or self.is_default_gw
        self.force_address = conf_value(c, "forceAddress", bool, False)
        self.ip_masq = conf_value(c, "ipMasq", bool, False)
        self.mtu = conf_value(c, "mtu", int, 0)
        self.hairpin = conf_value(c, "hairpinMode", bool, False)
        self.promisc = conf_value(c, "promiscMode", bool, False)
        self.vlan = conf_value(c, "vlan", int, 0)
        self.preserve_default_vlan = conf_value(c, "preserveDefaultVlan", bool, True)
        self.enable_dad = conf_value(c, "enabledad", bool, False)
        self.ipam = conf_value(c, "ipam", dict, {})
        self.ipam_type = conf_value(self.ipam, "type", str, "")
        self.dns = conf_dns(c)
        self.vlans = _vlan_trunk(c.get("vlanTrunk"))
        if not _valid_link_name(self.bridge):
            raise CNIError(errors.INVALID_NETCONF, "invalid bridge name %r" % self.bridge)
        if not 0 <= self.mtu <= 65535:
            raise CNIError(errors.INVALID_NETCONF, "invalid MTU %d" % self.mtu)
        if not 0 <= self.vlan <= 4094:
            raise CNIError(errors.INVALID_NETCONF, "invalid VLAN ID %d (must be between 0 and 4094)" % self.vlan)
        if self.vlan and self.vlans:
            raise CNIError(errors.INVALID_NETCONF, "cannot set vlan and vlanTrunk at the same time")
        if self.hairpin and self.promisc:
            raise CNIError(errors.INVALID_NETCONF, "cannot set hairpin mode and promiscuous mode at the same time")
        # MAC for the container side: CNI_ARGS MAC=, then args.cni.mac, then runtimeConfig.mac.
        self.mac = args.cni_args().get("MAC", "")
        cni = conf_value(conf_value(c, "args", dict, {}), "cni", dict, {}, "args.cni")
        self.mac = conf_value(cni, "mac", str, "", "args.cni.mac") or self.mac
        runtime = conf_value(c, "runtimeConfig", dict, {})
        self.mac = conf_value(runtime, "mac", str, "", "runtimeConfig.mac") or self.mac
        if self.mac:
            _check_mac(self.mac)


def _valid_link_name(name):
    """What the kernel's dev_valid_name() takes (and no NUL, which netlink would cut at)."""
    return (0 < len(name.encode("utf-8")) <= 15 and name not in (".", "..")
            and not any(ch in "/:\0" or ch.isspace() for ch in name))


def _vlan_trunk(trunk):
    if trunk is None:
        return []
    if not isinstance(trunk, list):
        raise CNIError(errors.INVALID_NETCONF, "vlanTrunk must be a list")
    vids = set()
    for item in trunk:
        if not isinstance(item, dict):
            raise CNIError(errors.INVALID_NETCONF, "vlanTrunk entries must be objects")
        lo, hi, one = item.get("minID"), item.get("maxID"), item.get("id")
        if (lo is None) != (hi is None):
            raise CNIError(errors.INVALID_NETCONF, "minID and maxID should be configured simultaneously")
        for v in (lo, hi, one):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 4094):
                raise CNIError(errors.INVALID_NETCONF, "incorrect trunk VLAN ID %r" % (v,))
        if lo is not None:
            if hi < lo:
                raise CNIError(errors.INVALID_NETCONF, "minID is greater than maxID in trunk parameter")
            vids.update(range(lo, hi + 1))
        if one is not None:
            vids.add(one)
    return sorted(vids)


def _check_mac(mac):
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise CNIError(errors.INVALID_NETCONF, "invalid MAC address %r" % mac)


# ---- masquerade -------------------------------------------------------------

def _comment(network, container_id):
    """The reference's comment, cut to the 255 characters iptables keeps of it (the reference
    hands iptables the whole text; a restore line refuses words over 1,024 characters)."""
    return owner_comment(network, container_id)


def _iptables(action, *a, **kw):
    """An iptables save/restore call with the spec's errors: a refusal is code 101, a
    lock or process timeout "try again later" (11)."""
    from podnet.net import iptables
    try:
        return action(*a, **kw)
    except TimeoutError as e:
        raise CNIError(errors.TRY_AGAIN_LATER, "iptables did not finish: %s" % e) from None
    except iptables.IptablesError as e:
        raise CNIError(errors.KERNEL, "masquerade rules: %s" % e) from None


def masq_restore_input(chain, comment, nets):
    """Rules that masquerade traffic from `nets` (one family) leaving their subnets."""
    from podnet.net.iptables import quote
    c = "-m comment --comment " + quote(comment)
    multicast = "224.0.0.0/4" if nets[0].family == AF_INET else "ff00::/8"
    host_len = 32 if nets[0].family == AF_INET else 128
    lines = ["*nat", ":%s - [0:0]" % chain]
    for net in nets:
        lines.append("-A POSTROUTING -s %s/%d %s -j %s" % (net.ip, host_len, c, chain))
    for net in nets:
        lines.append("-A %s -d %s %s -j ACCEPT" % (chain, net.masked(), c))
    lines.append("-A %s ! -d %s %s -j MASQUERADE" % (chain, multicast, c))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def setup_masq(network, container_id, nets):
    from podnet.net import iptables
    chain = chain_name(network, container_id)
    for family in (AF_INET, AF_INET6):
        fam_nets = [n for n in nets if n.family == family]
        if fam_nets:
            _iptables(iptables.restore, masq_restore_input(chain, _comment(network, container_id), fam_nets),
                      ipv6=family == AF_INET6)


def teardown_masq(network, container_id, families=(AF_INET, AF_INET6), nets=None):
    """Remove the container's chain and every rule jumping to it; no-op if absent.

    With `nets` (the container's addresses, known while its link exists) the
    exact rules are known, so one blind restore does it; only if that fails
    (rules already gone, or changed by hand) is the table read and diffed.
    """
    from podnet.net import iptables
    chain = chain_name(network, container_id)
    comment = iptables.quote(_comment(network, container_id))
    for family in families:
        ipv6 = family == AF_INET6
        host_len = 128 if ipv6 else 32
        fam_nets = [n for n in nets or () if n.family == family]
        if fam_nets:
            lines = ["*nat", ":%s - [0:0]" % chain]
            lines += ["-D POSTROUTING -s %s/%d -m comment --comment %s -j %s" % (n.ip, host_len, comment, chain)
                      for n in fam_nets]
            lines += ["-X %s" % chain, "COMMIT"]
            try:
                _iptables(iptables.restore, "\n".join(lines) + "\n", ipv6=ipv6)
                continue
            except CNIError as e:
                if e.code != errors.KERNEL:
                    raise
        saved = _iptables(iptables.save, "nat", ipv6=ipv6)
        if not iptables.chain_exists(saved, chain):
            continue
        lines = ["*nat", ":%s - [0:0]" % chain]
        lines += ["-D" + rule[2:] for rule in iptables.rules_jumping_to(saved, chain)
                  if not rule.startswith("-A %s " % chain)]
        lines += ["-X %s" % chain, "COMMIT"]
        _iptables(iptables.restore, "\n".join(lines) + "\n", ipv6=ipv6)


def stale_masq_chains(saved, network, valid_ids):
    """This network's masquerade chains (jumped to from POSTROUTING with a comment naming
    the network) whose container is not one of `valid_ids`."""
    keep = {chain_name(network, cid) for cid in valid_ids}
    return [chain for chain in owned_chains(saved, "POSTROUTING", network, "", "")
            if chain not in keep and not chain.startswith(("CNI-HOSTPORT-", "CNI-DN-"))]


def gc_restore_input(saved, chains):
    """One transaction removing `chains` and their POSTROUTING jumps; None if nothing to do."""
    return removal_input(saved, chains)


def gc_masq(network, valid_ids):
    """Remove the masquerade chains of attachments not valid any more, per family one restore
    (re-read and retried once if the table changed in between)."""
    from podnet.net import iptables
    for ipv6 in (False, True):
        for attempt in range(2):
            saved = _iptables(iptables.save, "nat", ipv6=ipv6)
            text = gc_restore_input(saved, stale_masq_chains(saved, network, valid_ids))
            if text is None:
                break
            try:
                _iptables(iptables.restore, text, ipv6=ipv6)
                break
            except CNIError as e:
                if attempt or e.code != errors.KERNEL:
                    raise


# ---- ADD --------------------------------------------------------------------

def _ensure_bridge(host, conf):
    """The bridge link, created if needed. Returns (link, created_now)."""
    created = False
    try:
        host.add_bridge(conf.bridge, mtu=conf.mtu, vlan_filtering=bool(conf.vlan or conf.vlans))
        created = True
    except NetlinkError as e:
        if e.errno != _EEXIST:
            raise kernel_error("could not add %r" % conf.bridge, e) from None
    br = host.link(conf.bridge)
    if br is None:
        raise CNIError(errors.KERNEL, "could not look up %r" % conf.bridge)
    if br.kind != "bridge":
        raise CNIError(errors.INVALID_NETCONF, "%r already exists but is not a bridge" % conf.bridge)
    if conf.promisc and not br.promisc:
        host.set_link(br.index, promisc=True)
    # We own the routes on the bridge; router advertisements must not add any.
    sysctl.try_write("net/ipv6/conf/%s/accept_ra" % conf.bridge, "0")
    if not br.up:
        host.set_link(br.index, up=True)
    return br, created


def _create_veth(host, cont, ns_fd, conf, ifname):
    """Create the pair with the container end directly in the container netns."""
    for _ in range(4):
        host_name = "veth" + os.urandom(4).hex()
        try:
            host.add_veth(host_name, ifname, peer_netns_fd=ns_fd, mtu=conf.mtu, peer_mac=conf.mac or None)
            return host_name
        except NetlinkError as e:
            if e.errno != _EEXIST:
                raise kernel_error("failed to create veth pair", e) from None
            if cont.link(ifname) is not None:
                raise CNIError(errors.INVALID_ENV,
                               "container veth name provided (%s) already exists" % ifname) from None
            # else: the random host-side name collided; draw another one
    raise CNIError(errors.KERNEL, "failed to find a free host veth name")


def _existing_attachment(host, cont, br, ifname):
    """The host veth of an earlier ADD of this same attachment, or None."""
    link = cont.link(ifname)
    if link is None:
        return None
    # peer_index is an index in the peer's own netns: only a veth whose peer is in
    # another netns (link_netnsid set) and points back at it can be our pair;
    # else an unrelated veth could alias any bridge port with that index.
    peer = None
    if link.kind == "veth" and link.peer_index and link.link_netnsid is not None:
        peer = host.link(index=link.peer_index)
    if peer is None or peer.kind != "veth" or peer.master != br.index \
            or peer.peer_index != link.index or peer.link_netnsid is None:
        raise CNIError(errors.INVALID_ENV, "container veth name provided (%s) already exists" % ifname)
    return peer.name


def _gateways(result, conf):
    """Fill in gateways and default routes as the reference does; return bridge addresses."""
    bridge_nets = []
    default_done = set()
    for ipc in result["ips"]:
        net = parse_cidr(ipc["address"])
        ipc["interface"] = 2
        if not ipc.get("gateway") and conf.is_gw:
            ipc["gateway"] = str(net.network + 1)
        if conf.is_default_gw and net.family not in default_done:
            zero = "0.0.0.0/0" if net.family == AF_INET else "::/0"
            if not any(r.get("dst") == zero and r.get("gw") for r in result["routes"]):
                result["routes"].append({"dst": zero, "gw": ipc.get("gateway")})
            default_done.add(net.family)
        if conf.is_gw:
            bridge_nets.append(IPNet(parse_ip(ipc["gateway"]), net.prefixlen))
    return bridge_nets


def _configure_container(cont, ns_fd, ifname, result, conf):
    """Addresses, link up and routes inside the container, as the reference's ConfigureIface."""
    link = cont.link(ifname)
    with entered(ns_fd):   # sysctls under /proc/sys/net are per netns at open time
        if conf.enable_dad:
            sysctl.try_write("net/ipv6/conf/%s/enhanced_dad" % ifname, "1")
            sysctl.try_write("net/ipv6/conf/%s/accept_dad" % ifname, "1")
        else:
            sysctl.try_write("net/ipv6/conf/%s/accept_dad" % ifname, "0")
        sysctl.try_write("net/ipv4/conf/%s/arp_notify" % ifname, "1")
        if any(":" in ipc["address"] for ipc in result["ips"]):
            for dev in ("lo", ifname):
                sysctl.try_write("net/ipv6/conf/%s/disable_ipv6" % dev, "0")
    gw = {}
    for ipc in result["ips"]:
        net = parse_cidr(ipc["address"])
        try:
            cont.add_addr(link.index, net, nodad=not conf.enable_dad)
        except NetlinkError as e:
            if e.errno != _EEXIST:
                raise kernel_error("failed to add IP addr %s to %r" % (net, ifname), e) from None
        if ipc.get("gateway"):
            gw.setdefault(net.family, parse_ip(ipc["gateway"]))
    cont.set_link(link.index, up=True)
    if AF_INET6 in gw:
        _settle_addresses(cont, link.index)
    for route in result["routes"]:
        dst = parse_cidr(route["dst"])
        via = parse_ip(route["gw"]) if route.get("gw") else gw.get(dst.family)
        try:
            cont.add_route(dst, gateway=via, oif=link.index, mtu=route.get("mtu") or 0,
                           advmss=route.get("advmss") or 0, priority=route.get("priority") or 0)
        except NetlinkError as e:
            if e.errno != _EEXIST:
                raise kernel_error("failed to add route %s via %s" % (dst, via), e) from None
    return link


def _settle_addresses(cont, index, timeout=10.0):
    """Wait until no address of the link is tentative (DAD running) or DAD-failed.

    As the reference's ConfigureIface does when there is an IPv6 gateway:
    with enabledad the addresses (link-local too) go through DAD, ~1 s, and
    the pod must not get its interface while its IPv6 address is unusable.
    Without enabledad nothing is tentative and this is one address dump.
    Like the reference, gives up silently after `timeout` seconds.
    """
    from podnet.net.netlink import IFA_F_DADFAILED, IFA_F_TENTATIVE
    deadline = time.monotonic() + timeout
    while any(a.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) for a in cont.addrs(index)):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _ensure_addr(host, link, net, force):
    """Put a gateway address on the bridge (or its VLAN interface), like the reference."""
    for a in host.addrs(link.index, net.family):
        if a.net == net:
            return
        if net.family == AF_INET or a.net.contains(net.ip) or net.contains(a.net.ip):
            if a.net.ip.family == AF_INET6 and a.scope == 253:
                continue   # link-local addresses never conflict
            if not force:
                raise CNIError(errors.INVALID_NETCONF,
                               "%r already has an IP address different from %s" % (link.name, net))
            host.del_addr(link.index, a.net)
    try:
        host.add_addr(link.index, net, nodad=True)
    except NetlinkError as e:
        if e.errno != _EEXIST:
            raise kernel_error("could not add IP address to %r" % link.name, e) from None
    # Pin the bridge MAC: otherwise it follows the lowest port MAC as ports come and go.
    host.set_link(link.index, mac=link.mac)


def _vlan_gateway(host, br, conf):
    """The `<bridge>.<vid>` interface that carries the gateway address on a VLAN."""
    name = "%s.%d" % (conf.bridge, conf.vlan)
    link = host.link(name)
    if link is None:
        port = "veth" + os.urandom(4).hex()
        host.add_veth(port, name, mtu=conf.mtu)
        port_link = host.link(port)
        host.set_link(port_link.index, master=br.index, up=True)
        _tag_port(host, port_link.index, conf)
        link = host.link(name)
        host.set_link(link.index, up=True)
    return link


def _tag_port(host, index, conf):
    if (conf.vlan or conf.vlans) and not conf.preserve_default_vlan:
        try:
            host.bridge_vlan_del(index, 1)
        except NetlinkError:
            pass   # the port had no default VLAN
    if conf.vlan:
        host.bridge_vlan_add(index, conf.vlan, pvid=True, untagged=True)
    for vid in conf.vlans:
        host.bridge_vlan_add(index, vid)


def cmd_add(args):
    conf = NetConf(args)
    ns_fd = open_container_netns(args.netns)
    undo = []
    try:
        cont = container_netlink(ns_fd, args.netns)
        host = Netlink()
        br, br_created = _ensure_bridge(host, conf)
        if br_created:
            undo.append(lambda: _delete_bridge_if_unused(host, conf.bridge))
        host_name = _existing_attachment(host, cont, br, args.ifname)
        fresh = host_name is None
        if fresh:
            host_name = _create_veth(host, cont, ns_fd, conf, args.ifname)
            undo.append(lambda: _delete_link(cont, args.ifname))
        hveth = host.link(host_name)
        if fresh:
            host.set_link(hveth.index, master=br.index, up=True)
            if conf.hairpin:
                host.set_bridge_port(hveth.index, hairpin=True)
            _tag_port(host, hveth.index, conf)
        cont_link = cont.link(args.ifname)

        result = {"interfaces": [{"name": br.name, "mac": br.mac},
                                 {"name": host_name, "mac": hveth.mac},
                                 {"name": args.ifname, "mac": cont_link.mac, "sandbox": args.netns}],
                  "ips": [], "routes": [], "dns": {}}
        if conf.ipam_type:
            ipam = delegate(conf.ipam_type, "ADD", args)
            # A rerun got back the address the existing attachment holds: a failure
            # now must not release it (nor its masquerade rules) under the running pod.
            if fresh:
                undo.append(lambda: delegate(conf.ipam_type, "DEL", args))
            if not ipam["ips"]:
                raise CNIError(errors.INTERNAL, "IPAM plugin returned missing IP config")
            result["ips"], result["routes"], result["dns"] = ipam["ips"], ipam["routes"], ipam["dns"]
            bridge_nets = _gateways(result, conf)
            _configure_container(cont, ns_fd, args.ifname, result, conf)
            if conf.is_gw:
                gw_link = br
                if conf.vlan:
                    gw_link = _vlan_gateway(host, br, conf)
                    result["interfaces"].append({"name": gw_link.name, "mac": gw_link.mac})
                for net in bridge_nets:
                    _ensure_addr(host, gw_link, net, conf.force_address)
                for family in {n.family for n in bridge_nets}:
                    sysctl.write("net/ipv4/ip_forward" if family == AF_INET
                                 else "net/ipv6/conf/all/forwarding", "1")
            if conf.ip_masq:
                nets = [parse_cidr(ipc["address"]) for ipc in result["ips"]]
                if fresh:
                    undo.append(lambda: teardown_masq(conf.name, args.container_id, {n.family for n in nets}, nets))
                    setup_masq(conf.name, args.container_id, nets)
                else:   # a rerun: replace rather than append a second set of rules
                    teardown_masq(conf.name, args.container_id, {n.family for n in nets}, nets)
                    setup_masq(conf.name, args.container_id, nets)
        else:
            cont.set_link(cont_link.index, up=True)

        hveth = _wait_port_up(host, host_name)
        result["interfaces"][1]["mac"] = hveth.mac
        result["interfaces"][0]["mac"] = host.link(conf.bridge).mac
        if conf.dns:
            result["dns"] = conf.dns
        undo.clear()
        return result
    except NetlinkError as e:
        raise kernel_error("bridge ADD failed", e) from None
    finally:
        roll_back(undo)
        os.close(ns_fd)


def _wait_port_up(host, name):
    for delay in (0, 0.005, 0.05, 0.5, 1.0):
        time.sleep(delay)
        link = host.link(name)
        if link is None:
            raise CNIError(errors.KERNEL, "host veth %s disappeared" % name)
        if link.operstate == "up":
            return link
    raise CNIError(errors.KERNEL, "bridge port in error state: %s" % link.operstate)


def _delete_link(nl, name):
    link = nl.link(name)
    if link is not None:
        nl.del_link(link.index)


def _delete_bridge_if_unused(host, name):
    br = host.link(name)
    if br is not None and not any(l.master == br.index for l in host.links()):
        host.del_link(br.index)


# ---- DEL --------------------------------------------------------------------

def cmd_del(args):
    conf = NetConf(args)
    families = (AF_INET, AF_INET6)
    nets = []
    if args.netns:
        try:
            ns_fd = open_netns(args.netns)
        except FileNotFoundError:
            ns_fd = None     # the sandbox is gone, and with it the veth pair
        except OSError as e:
            raise CNIError(errors.INVALID_ENV, "failed to open netns %r: %s" % (args.netns, e.strerror)) from None
        if ns_fd is not None:
            try:
                cont = container_netlink(ns_fd, args.netns)
                link = cont.link(args.ifname)
                if link is not None:
                    nets = [a.net for a in cont.addrs(link.index) if a.scope != 253]
                    families = tuple(f for f in (AF_INET, AF_INET6) if any(n.family == f for n in nets)) or families
                    cont.del_link(link.index)
                cont.close()
            except NetlinkError as e:
                if e.errno != 19:
                    raise kernel_error("failed to delete %r" % args.ifname, e) from None
            finally:
                os.close(ns_fd)
    if conf.ipam_type:
        delegate(conf.ipam_type, "DEL", args)
        if conf.ip_masq:
            teardown_masq(conf.name, args.container_id, families, nets)
    return None


# ---- CHECK ------------------------------------------------------------------

def cmd_check(args):
    from cni.types import from_version
    conf = NetConf(args)
    prev = args.conf.get("prevResult")      # the input first, before IPAM is asked anything
    if not prev:
        raise CNIError(errors.INVALID_NETCONF, "Required prevResult missing")
    result = from_version(prev, args.version)
    ns_fd = open_container_netns(args.netns)
    try:
        if conf.ipam_type:
            delegate(conf.ipam_type, "CHECK", args)
        host = Netlink()
        cont = container_netlink(ns_fd, args.netns)
        by_name = {i.get("name"): i for i in result["interfaces"]}
        br_if = by_name.get(conf.bridge)
        if br_if is None or br_if.get("sandbox"):
            raise CNIError(errors.INVALID_NETCONF,
                           "CNI created bridge %s in host namespace was not found" % conf.bridge)
        br = host.link(conf.bridge)
        if br is None or br.kind != "bridge":
            raise CNIError(errors.INVALID_NETCONF, "Interface %s does not have link type of bridge" % conf.bridge)
        if br_if.get("mac") and br_if["mac"] != br.mac:
            raise CNIError(errors.INVALID_NETCONF,
                           "Bridge interface %s Mac doesn't match: %s" % (br.name, br_if["mac"]))
        if br.promisc != conf.promisc:
            raise CNIError(errors.INVALID_NETCONF, "Bridge interface %s configured Promisc Mode %s doesn't "
                           "match current state" % (br.name, conf.promisc))
        c_if = by_name.get(args.ifname)
        if c_if is None or c_if.get("sandbox") != args.netns:
            raise CNIError(errors.INVALID_NETCONF, "Sandbox in prevResult %s doesn't match configured netns: %s"
                           % ((c_if or {}).get("sandbox"), args.netns))
        c_link = cont.link(args.ifname)
        if c_link is None or c_link.kind != "veth":
            raise CNIError(errors.INVALID_NETCONF, "CNI created interface in container %s not found" % args.ifname)
        if c_if.get("mac") and c_if["mac"] != c_link.mac:
            raise CNIError(errors.INVALID_NETCONF, "Interface %s Mac %s doesn't match container Mac: %s"
                           % (args.ifname, c_if["mac"], c_link.mac))
        peer = host.link(index=c_link.peer_index)
        if peer is None or peer.master != br.index or peer.peer_index != c_link.index:
            raise CNIError(errors.INVALID_NETCONF, "CNI veth created for bridge %s was not found" % conf.bridge)
        _check_ips_and_routes(cont, c_link, result)
    finally:
        os.close(ns_fd)
    return None


def _check_ips_and_routes(cont, link, result):
    have = {(a.net.ip, a.net.prefixlen) for a in cont.addrs(link.index)}
    for ipc in result["ips"]:
        net = parse_cidr(ipc["address"])
        if (net.ip, net.prefixlen) not in have:
            raise CNIError(errors.INVALID_NETCONF, "Failed to match addr %s on interface %s" % (net, link.name))
    routes = cont.routes(AF_INET) + cont.routes(AF_INET6)
    for r in result["routes"]:
        dst = parse_cidr(r["dst"]).masked()
        gw = parse_ip(r["gw"]) if r.get("gw") else None
        if not any(k.dst == dst and (gw is None or k.gateway == gw) for k in routes):
            raise CNIError(errors.INVALID_NETCONF, "Failed to find a route for %s" % dst)


def cmd_gc(args):
    """GC (spec 1.1.0): the masquerade chains of attachments not in cni.dev/valid-attachments
    (whether ipMasq is on now or not: it may have been when they were made), then IPAM's GC.
    Both run; the first failure is reported."""
    from cni.skel import valid_attachments
    conf = NetConf(args)
    valid = {cid for cid, _ in valid_attachments(args.conf)}
    failure = None
    try:
        gc_masq(conf.name, valid)
    except CNIError as e:
        failure = e
    if conf.ipam_type:
        try:
            delegate(conf.ipam_type, "GC", args)
        except CNIError as e:
            failure = failure or e
    if failure is not None:
        raise failure


def cmd_status(args):
    conf = NetConf(args)
    if conf.ipam_type:
        delegate(conf.ipam_type, "STATUS", args)


COMMANDS: Commands = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def main() -> None:
    from cni.skel import run_plugin
    run_plugin(COMMANDS, about="podnet bridge plugin")
