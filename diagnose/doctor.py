"""`podnet doctor`: what on this node differs from what podnet's components want, and the
classic misconfigurations that break pod networking.

Pure core: `diagnose(NodeInputs) -> [Finding]`. The inputs are a kernel `Snapshot`
(diagnose/snapshot.py), the flannel leases and this node's subnet.env, and the
cluster's objects; each component's desired state is computed with that component's
own pure functions (flanneld's backend `desired()`, kube-proxy's model and chain names,
the NetworkPolicy model) and compared with the snapshot. Every check runs on its own:
one that raises becomes a finding of its own and the others still run.

Each finding says what is wrong, why it matters, the command that fixes it, its
severity (error: traffic is or will be dropped; warning: fragile or suspicious; info:
worth knowing) and the object it belongs to.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from diagnose.snapshot import Snapshot
from podnet.net.ip import IPNet, parse_cidr, parse_ip

log = logging.getLogger("diagnose.doctor")

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES = (ERROR, WARNING, INFO)
VXLAN_OVERHEAD = 50
IPIP_OVERHEAD = 20
CONNTRACK_FULL = 0.9
LOCK_HELD_LONG = 10.0       # seconds a holder of the xtables lock has run before it is suspect


@dataclass(frozen=True)
class Finding:
    code: str               # stable name of the check, e.g. "flannel-fdb-missing"
    severity: str
    component: str          # kernel | flannel | calico | kube-proxy | network-policy | kubernetes
    what: str
    why: str
    fix: str
    object: str = ""        # the object behind it: a lease, a Service, a NetworkPolicy, a Node

    def line(self) -> str:
        obj = " [%s]" % self.object if self.object else ""
        return "%-7s %s: %s%s\n        why: %s\n        fix: %s" % (
            self.severity.upper(), self.code, self.what, obj, self.why, self.fix)


@dataclass
class FlannelView:
    """flanneld's side of this node: its network, its lease, the others' leases."""
    network: str                    # FLANNEL_NETWORK
    subnet: str                     # FLANNEL_SUBNET (this node's, with the gateway address)
    mtu: int | None = None          # FLANNEL_MTU
    backend_type: str = "vxlan"
    vni: int = 1
    leases: list[Any] = field(default_factory=list)     # flanneld.subnet.Lease, every node's


@dataclass
class NodeInputs:
    snapshot: Snapshot
    node_name: str = ""
    flannel: FlannelView | None = None
    calico: Any = None              # calico_lite.datastore.Snapshot: nodes and block affinities
    objects: dict[str, list[dict[str, Any]]] | None = None     # kind -> objects; None: no source
    kube_mode: bool = False         # Node objects are authoritative (podCIDR expected)

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return list((self.objects or {}).get(kind, ()))


# ---- helpers --------------------------------------------------------------------------------

def _pod_path_links(snap: Snapshot, flannel: FlannelView | None) -> list[str]:
    out = []
    for link in snap.links:
        if link.kind in ("bridge", "vxlan", "ipip") or link.name.startswith(("cali", "flannel.", "tunl")):
            out.append(link.name)
        elif link.master and snap.link(link.master) is not None and snap.link(link.master).kind == "bridge":  # type: ignore[union-attr]
            out.append(link.name)
    return out


def _cluster_cidr(inp: NodeInputs) -> IPNet | None:
    if inp.flannel is not None:
        return parse_cidr(inp.flannel.network).masked()
    return None


# ---- the kernel's classic misconfigurations ----------------------------------------------------

def check_sysctls(inp: NodeInputs) -> list[Finding]:
    s = inp.snapshot.sysctls
    out = []
    if s.ip_forward == 0:
        out.append(Finding("ip-forward-off", ERROR, "kernel", "net.ipv4.ip_forward is 0",
                           "the node does not route: no packet from a pod leaves the node, none reaches a pod "
                           "from another node", "sysctl -w net.ipv4.ip_forward=1"))
    bridges = [l.name for l in inp.snapshot.links if l.kind == "bridge"]
    if bridges and s.bridge_nf_call_iptables != 1:
        state = "absent (br_netfilter not loaded)" if s.bridge_nf_call_iptables is None else "0"
        fix = "modprobe br_netfilter && sysctl -w net.bridge.bridge-nf-call-iptables=1" \
            if s.bridge_nf_call_iptables is None else "sysctl -w net.bridge.bridge-nf-call-iptables=1"
        out.append(Finding("br-netfilter-off", ERROR, "kernel",
                           "net.bridge.bridge-nf-call-iptables is %s with bridge %s" % (state, ", ".join(bridges)),
                           "traffic between pods on one bridge skips iptables/nftables: Service DNAT replies "
                           "and NetworkPolicy are bypassed for same-node pods", fix))
    for dev in _pod_path_links(inp.snapshot, inp.flannel):
        mode = s.effective_rp_filter(dev)
        if mode == 1:
            out.append(Finding("rp-filter-strict", ERROR if dev.startswith("tunl") else WARNING, "kernel",
                               "rp_filter is strict (1) on %s (all=%s, %s=%s)" % (
                                   dev, s.rp_filter.get("all"), dev, s.rp_filter.get(dev)),
                               "a packet whose source is not routed back out of %s is dropped silently: "
                               "asymmetric or encapsulated pod traffic dies here" % dev,
                               "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.%s.rp_filter=2"
                               % dev.replace(".", "/"), dev))
    if s.conntrack_count is not None and s.conntrack_max:
        if s.conntrack_count >= CONNTRACK_FULL * s.conntrack_max:
            out.append(Finding("conntrack-nearly-full", WARNING, "kernel",
                               "conntrack table %d of %d entries" % (s.conntrack_count, s.conntrack_max),
                               "when it is full, new connections are dropped (\"nf_conntrack: table full\")",
                               "sysctl -w net.netfilter.nf_conntrack_max=%d" % (s.conntrack_max * 2)))
    return out


def _forward_policy_drop(saved: str) -> bool:
    in_filter = False
    for line in saved.splitlines():
        if line.startswith("*"):
            in_filter = line == "*filter"
        elif in_filter and line.startswith(":FORWARD "):
            return line.split()[1] == "DROP"
    return False


def _accepts_cluster(saved: str, chain: str, cidr: IPNet | None, depth: int = 0) -> bool:
    from podnet.net.iptables import split_rule
    for line in saved.splitlines():
        if not line.startswith("-A %s " % chain):
            continue
        args = split_rule(line)
        target = args[-1] if len(args) >= 2 and args[-2] in ("-j", "-g") else None
        if target == "ACCEPT":
            nets = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-s", "-d")]
            if any("--ctstate" in a or a == "--mark" for a in args):
                continue
            if not nets:
                return True
            for net in nets:
                try:
                    n = parse_cidr(net if "/" in net else net + "/32").masked()
                except ValueError:
                    continue
                if cidr is None or (n.prefixlen <= cidr.prefixlen and n.contains(cidr.network)):
                    return True
        elif target and target not in ("DROP", "REJECT", "RETURN", "LOG", "MARK") and depth < 3:
            if _accepts_cluster(saved, target, cidr, depth + 1):
                return True
    return False


def check_forward(inp: NodeInputs) -> list[Finding]:
    out = [Finding("nft-forward-drop", WARNING, "kernel", "nft base chain %s is hooked on forward with policy drop"
                   % chain, "pod traffic between nodes passes every forward hook: what this chain's rules do not "
                   "accept is dropped, whatever iptables says (a host firewall such as firewalld, or nftables.conf)",
                   "nft list chain %s, then accept the pod network there (e.g. nft add rule %s ip saddr <cluster "
                   "CIDR> accept, and ip daddr) or set its policy to accept" % (chain, chain))
           for chain in inp.snapshot.nft_forward_drop_chains()]
    saved = inp.snapshot.iptables_save
    if not _forward_policy_drop(saved):
        return out
    cidr = _cluster_cidr(inp)
    if _accepts_cluster(saved, "FORWARD", cidr):
        return out
    net = str(cidr) if cidr else "<cluster CIDR>"
    return out + [Finding("forward-drop", ERROR, "kernel",
                          "the filter FORWARD policy is DROP and no rule accepts the pod network %s" % net,
                          "every forwarded pod packet (to other nodes, to Services' remote endpoints) is dropped",
                          "iptables -A FORWARD -s %s -j ACCEPT && iptables -A FORWARD -d %s -j ACCEPT "
                          "(flanneld adds these in FLANNEL-FWD: restart it)" % (net, net))]


def check_iptables_backends(inp: NodeInputs) -> list[Finding]:
    def rules(text: str) -> int:
        return sum(1 for line in text.splitlines() if line.startswith("-A "))
    legacy, nft = rules(inp.snapshot.iptables_legacy_save), rules(inp.snapshot.iptables_save)
    if legacy and nft and inp.snapshot.iptables_legacy_save != inp.snapshot.iptables_save:
        return [Finding("iptables-both-backends", WARNING, "kernel",
                        "iptables-legacy holds %d rules and iptables-nft %d" % (legacy, nft),
                        "both rule sets apply to every packet: components that use different backends "
                        "cannot see each other's rules, and a DROP in one overrides an ACCEPT in the other",
                        "iptables-legacy-save to review, then clear the stale backend: for t in filter nat mangle "
                        "raw; do iptables-legacy -t $t -F; iptables-legacy -t $t -X; done")]
    return []


def check_xtables_lock(inp: NodeInputs) -> list[Finding]:
    out = []
    for pid, command, age in inp.snapshot.xtables_lock_holders:
        if age >= LOCK_HELD_LONG:
            out.append(Finding("xtables-lock-held", WARNING, "kernel",
                               "pid %d (%s), running for %.0f s, holds the xtables lock" % (pid, command, age),
                               "every iptables-legacy call (kubelet, CNI plugins, kube-proxy) waits for it and "
                               "gives up after its -w timeout", "inspect it (cat /proc/%d/cmdline); kill %d if "
                               "it is stuck" % (pid, pid)))
    return out


def check_mtu(inp: NodeInputs) -> list[Finding]:
    snap = inp.snapshot
    out = []
    for link in snap.links:
        if link.kind != "vxlan" or not link.vxlan_dev:
            continue
        under = snap.link(link.vxlan_dev)
        if under is not None and link.mtu > under.mtu - VXLAN_OVERHEAD:
            out.append(Finding("mtu-encap-too-big", ERROR, "kernel",
                               "%s has MTU %d but its underlay %s has %d (VXLAN needs %d bytes)" % (
                                   link.name, link.mtu, under.name, under.mtu, VXLAN_OVERHEAD),
                               "full-size pod packets no longer fit once encapsulated: they are dropped or "
                               "fragmented, so large transfers between nodes stall",
                               "ip link set %s mtu %d" % (link.name, under.mtu - VXLAN_OVERHEAD), link.name))
        if inp.flannel is not None and inp.flannel.mtu and link.name.startswith("flannel.") \
                and link.mtu != inp.flannel.mtu:
            out.append(Finding("mtu-subnet-env", WARNING, "flannel",
                               "%s has MTU %d, subnet.env says FLANNEL_MTU=%d" % (link.name, link.mtu,
                                                                                  inp.flannel.mtu),
                               "new pods get FLANNEL_MTU from the CNI plugin, not the device's MTU",
                               "restart flanneld (it rewrites subnet.env) or ip link set %s mtu %d"
                               % (link.name, inp.flannel.mtu), link.name))
    tunnel = next((l for l in snap.links if l.name.startswith("flannel.") and l.kind == "vxlan"), None)
    for link in snap.links:
        master = snap.link(link.master) if link.master else None
        if master is None or master.kind != "bridge" or tunnel is None:
            continue
        if link.mtu > tunnel.mtu:
            out.append(Finding("mtu-pod-too-big", ERROR, "kernel",
                               "pod interface %s (on %s) has MTU %d, more than %s's %d" % (
                                   link.name, master.name, link.mtu, tunnel.name, tunnel.mtu),
                               "the pod sends packets the overlay cannot carry: cross-node traffic of full-size "
                               "packets is dropped", "ip link set %s mtu %d (and the pod's eth0)"
                               % (link.name, tunnel.mtu), link.name))
    return out


def check_offload(inp: NodeInputs) -> list[Finding]:
    return [Finding("vxlan-tx-checksum", INFO, "kernel", "TX checksum offload is on for %s" % link.name,
                    "some kernels and NICs corrupt the checksums of NATed VXLAN packets (flannel #1279): "
                    "if Service traffic between nodes times out, turn it off",
                    "ethtool -K %s tx-checksum-ip-generic off" % link.name, link.name)
            for link in inp.snapshot.links if link.kind == "vxlan" and link.tx_checksum]


def check_pod_cidr(inp: NodeInputs) -> list[Finding]:
    if not inp.kube_mode or not inp.node_name:
        return []
    for node in inp.kind("Node"):
        if (node.get("metadata") or {}).get("name") == inp.node_name:
            spec = node.get("spec") or {}
            if spec.get("podCIDR") or spec.get("podCIDRs"):
                return []
            return [Finding("node-no-podcidr", ERROR, "kubernetes", "Node %s has no spec.podCIDR" % inp.node_name,
                            "flanneld (--kube-subnet-mgr) cannot take a subnet: no pod on this node gets an address",
                            "start kube-controller-manager with --allocate-node-cidrs --cluster-cidr=<CIDR>, or "
                            "kubectl patch node %s -p '{\"spec\":{\"podCIDR\":\"<a free /24>\"}}'" % inp.node_name,
                            "Node %s" % inp.node_name)]
    return [Finding("node-missing", WARNING, "kubernetes", "no Node object named %s" % inp.node_name,
                    "nothing assigns this node a pod CIDR", "check --hostname-override / the kubelet's node name",
                    "Node %s" % inp.node_name)]


def _pod_flows(inp: NodeInputs) -> list[tuple[str, str, str, str]]:
    """(source pod address, remote pod address, the device pod packets enter by, the object behind
    the remote subnet) for each remote pod subnet this node knows: one sample flow per subnet."""
    snap = inp.snapshot
    out = []
    if inp.flannel is not None and inp.flannel.subnet:
        own = parse_cidr(inp.flannel.subnet)
        bridge = next((l.name for l in snap.links if l.kind == "bridge" and any(
            a.cidr.split("/")[0] == str(own.ip) for a in snap.addrs_of(l.name))), "cni0")
        src = str(own.network + 2)
        for lease in inp.flannel.leases:
            if lease.subnet != own.masked():
                out.append((src, str(parse_cidr(str(lease.subnet)).network + 2), bridge,
                            "flannel lease %s (node %s)" % (lease.subnet, lease.public_ip)))
    if inp.calico is not None:
        mine = [b for b, owner in inp.calico.blocks.items() if owner == inp.node_name]
        if mine:
            src = str(parse_cidr(str(mine[0])).network + 2)
            for block, owner in sorted(inp.calico.blocks.items(), key=lambda kv: str(kv[0])):
                if owner and owner != inp.node_name:
                    out.append((src, str(parse_cidr(str(block)).network + 2), "",
                                "calico block %s of node %s" % (block, owner)))
    return out


def check_policy_routing(inp: NodeInputs) -> list[Finding]:
    """An ip rule that sends pod traffic to a table other than main, where the overlay's routes are not."""
    from diagnose.snapshot import route_decision, route_lookup, rule_note
    snap = inp.snapshot
    if not any(r.priority not in (0, 32766, 32767) for r in snap.rules):
        return []
    out = []
    seen = set()
    for src, dst, iif, behind in _pod_flows(inp):
        route, rule = route_decision(snap, dst, src, iif or "lo")
        main = route_lookup(snap, dst)
        if not rule_note(rule) or rule is None or rule.priority in seen:
            continue
        if route is not None and main is not None and (route.dev, route.gateway, route.type) == \
                (main.dev, main.gateway, main.type):
            continue
        seen.add(rule.priority)
        chosen = "no route" if route is None else "%s %s%s%s" % (route.type, route.dst, " via %s" % route.gateway
                                                                 if route.gateway else "",
                                                                 " dev %s" % route.dev if route.dev else "")
        out.append(Finding("policy-routing-diverts-pods", ERROR, "kernel",
                           "%s sends pod traffic %s -> %s to %s in table %d, not the main table's route %s" % (
                               rule_note(rule), src, dst, chosen, rule.table,
                               "%s dev %s" % (main.dst, main.dev) if main else "(none)"),
                           "pod packets to that subnet skip the overlay's routes: they are dropped or leave by the "
                           "wrong device", "ip rule del priority %d (or add the overlay's routes to table %d)" % (
                               rule.priority, rule.table), behind))
    return out


# ---- flannel: leases -> routes, neighbours, FDB ----------------------------------------------

@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """An agent's logger silenced while its own code computes what doctor compares (that agent
    reports its bad objects itself), and restored afterwards: doctor is also a library."""
    log_ = logging.getLogger(logger)
    was = log_.disabled
    log_.disabled = True
    try:
        yield
    finally:
        log_.disabled = was


def flannel_desired(view: FlannelView, snap: Snapshot) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """(flanneld's backend's desired() for the remote leases, the VTEP's name)."""
    from flanneld.backend import backend_class
    from flanneld.backend.base import ExternalInterface
    from flanneld.config import parse
    backend_conf: dict[str, Any] = {"Type": view.backend_type}
    if view.backend_type == "vxlan":
        backend_conf["VNI"] = view.vni
    config = parse(json.dumps({"Network": view.network, "Backend": backend_conf}))
    own_subnet = parse_cidr(view.subnet).masked()
    own = next((l for l in view.leases if l.subnet == own_subnet), None)
    vtep = "flannel.%d" % view.vni
    dev = snap.link(vtep)
    ext_name = dev.vxlan_dev if dev is not None and dev.vxlan_dev else ""
    ext_ip = own.public_ip if own is not None else parse_ip("0.0.0.0")
    if not ext_name and own is not None:
        ext_name = next((a.dev for a in snap.addrs if a.cidr.split("/")[0] == str(own.public_ip)), "")
    under = snap.link(ext_name)
    ext = ExternalInterface(ext_name, under.index if under else 0, ext_ip, 24, under.mtu if under else 1500)
    backend: Any = backend_class(view.backend_type)(config, ext)
    backend.own = own
    backend.mac = dev.mac if dev is not None else None
    remote = [l for l in view.leases if l.subnet != own_subnet]
    with quiet("flanneld"):             # desired() logs skipped leases: the daemon's job
        return backend.desired(remote), vtep


def check_flannel(inp: NodeInputs) -> list[Finding]:
    view = inp.flannel
    if view is None:
        return []
    snap = inp.snapshot
    want, vtep = flannel_desired(view, snap)
    by_gateway = {str(l.subnet.network): l for l in view.leases}
    by_dst = {str(l.subnet): l for l in view.leases}

    def owner(lease: Any) -> str:
        return "flannel lease %s (node %s)" % (lease.subnet, lease.public_ip) if lease is not None else ""

    out = []
    if view.backend_type == "vxlan":
        dev = snap.link(vtep)
        if dev is None:
            return [Finding("flannel-vtep-missing", ERROR, "flannel", "the VXLAN device %s does not exist" % vtep,
                            "no pod traffic leaves for other nodes", "restart flanneld (it creates %s)" % vtep, vtep)]
        if not dev.up:
            out.append(Finding("flannel-vtep-down", ERROR, "flannel", "%s is down" % vtep,
                               "no pod traffic leaves for other nodes", "ip link set %s up" % vtep, vtep))
    main = snap.routes_in(254)
    for r in want.get("routes", ()):
        have = [x for x in main if x.dst == r["dst"]]
        right = [x for x in have if x.gateway == r["via"] and x.dev == r["dev"]]
        if not right:
            lease = by_dst.get(r["dst"])
            now = "; the kernel has %s" % ", ".join("via %s dev %s" % (x.gateway, x.dev) for x in have) if have else ""
            out.append(Finding("flannel-route-missing", ERROR, "flannel",
                               "route %s via %s dev %s is missing%s" % (r["dst"], r["via"], r["dev"], now),
                               "pods on this node cannot reach the pods of %s" % owner(lease),
                               "ip route replace %s via %s dev %s%s (or restart flanneld)" % (
                                   r["dst"], r["via"], r["dev"], " onlink" if r.get("onlink") else ""),
                               owner(lease)))
    wanted_dsts = {r["dst"] for r in want.get("routes", ())}
    devs = {r["dev"] for r in want.get("routes", ())} | ({vtep} if view.backend_type == "vxlan" else set())
    own = str(parse_cidr(view.subnet).masked())
    for x in main:
        if x.dev in devs and x.gateway and x.dst not in wanted_dsts and x.dst != own \
                and parse_cidr(view.network).masked().contains(parse_cidr(x.dst).network):
            out.append(Finding("flannel-route-foreign", WARNING, "flannel",
                               "route %s via %s dev %s belongs to no lease" % (x.dst, x.gateway, x.dev),
                               "traffic to those addresses goes to a node that no longer holds the subnet",
                               "ip route del %s via %s dev %s" % (x.dst, x.gateway, x.dev)))
    neighbours = snap.neighbours_of(vtep)
    for n in want.get("neighbours", ()):
        if not any(h.dst == n["ip"] and (h.lladdr or "").lower() == n["mac"].lower() and "permanent" in h.state
                   for h in neighbours):
            lease = by_gateway.get(n["ip"])
            out.append(Finding("flannel-neighbour-missing", ERROR, "flannel",
                               "neighbour %s lladdr %s dev %s is missing" % (n["ip"], n["mac"], n["dev"]),
                               "the inner frame to %s has no destination MAC: traffic to its pods is dropped "
                               "(flannel answers no ARP on %s)" % (owner(lease), vtep),
                               "ip neigh replace %s lladdr %s dev %s nud permanent" % (n["ip"], n["mac"], n["dev"]),
                               owner(lease)))
    fdb = snap.fdb_of(vtep)
    for f in want.get("fdb", ()):
        if not any(h.mac.lower() == f["mac"].lower() and h.dst == f["dst"] for h in fdb):
            lease = next((l for l in view.leases if str(l.public_ip) == f["dst"]), None)
            out.append(Finding("flannel-fdb-missing", ERROR, "flannel",
                               "FDB entry %s dst %s dev %s is missing" % (f["mac"], f["dst"], f["dev"]),
                               "the kernel does not know which node owns VTEP %s: VXLAN packets to %s are not "
                               "sent" % (f["mac"], owner(lease)),
                               "bridge fdb replace %s dev %s dst %s self permanent" % (f["mac"], f["dev"], f["dst"]),
                               owner(lease)))
    wanted_fdb = {(f["mac"].lower(), f["dst"]) for f in want.get("fdb", ())}
    for h in fdb:
        if h.dst is not None and h.mac != "00:00:00:00:00:00" and (h.mac.lower(), h.dst) not in wanted_fdb:
            out.append(Finding("flannel-fdb-foreign", WARNING, "flannel",
                               "FDB entry %s dst %s dev %s belongs to no lease" % (h.mac, h.dst, vtep),
                               "frames for that MAC go to a node that is no longer part of the overlay",
                               "bridge fdb del %s dev %s dst %s self" % (h.mac, vtep, h.dst)))
    return out


# ---- calico_lite: the datastore's blocks -> BGP-learned routes (protocol 78) ----------------------

def check_calico(inp: NodeInputs) -> list[Finding]:
    store = inp.calico
    if store is None or store.config is None:
        return []
    from calico_lite.routes import ROUTE_PROTOCOL, desired_routes
    me = store.nodes.get(inp.node_name)
    if me is None:
        return [Finding("calico-node-missing", ERROR, "calico", "node %s is not registered in the datastore"
                        % inp.node_name, "no block is claimed for its pods and no peer learns its routes",
                        "start the agent: podnet calico agent --node-name %s ..." % inp.node_name,
                        "calico node %s" % inp.node_name)]
    snap = inp.snapshot
    underlay = next((a.dev for a in snap.addrs if a.cidr == me.ip), "eth0")
    owners = {}
    learned = {}
    for block, owner in store.blocks.items():
        node = store.nodes.get(owner) if owner else None
        if node is None or owner == inp.node_name or node.is_route_reflector:
            continue
        learned[str(block)] = str(node.address)
        owners[str(block)] = node
    gateway = next((r.gateway for r in snap.routes_in(254) if r.dst == "0.0.0.0/0" and r.gateway), None)
    want = desired_routes(me, store.nodes, learned, store.config.ipip_mode, own_blocks=store.blocks_of(me.name),
                          underlay_dev=underlay, underlay_gateway=gateway)
    have = {r.dst: r for r in snap.routes_in(254) if r.protocol == ROUTE_PROTOCOL}
    out = []
    for r in want:
        got = have.get(r["dst"])
        node = owners.get(r["dst"])
        obj = "block %s of node %s (BGP next hop %s)" % (r["dst"], node.name, node.address) if node else \
            "block %s of this node" % r["dst"]
        if got is None:
            why = ("pods here cannot reach the pods of node %s: the BGP session that carries its block is down, "
                   "or the route was withdrawn or deleted" % node.name) if node else \
                "traffic to unused addresses of our block leaks to the default route"
            fix = "check the BGP sessions (podnet calico agent's /metrics, calico_lite_bgp_session_state) and " \
                  "restart the agent; by hand: ip route replace %s%s proto %d" % (
                      r["dst"] if r.get("type") != "blackhole" else "blackhole " + r["dst"],
                      " via %s dev %s%s" % (r["via"], r["dev"], " onlink" if r.get("onlink") else "")
                      if r.get("via") else "", ROUTE_PROTOCOL)
            out.append(Finding("calico-route-missing", ERROR, "calico", "route %s is missing" % r["dst"], why, fix,
                               obj))
        elif r.get("via") and (got.gateway != r["via"] or got.dev != r["dev"]):
            out.append(Finding("calico-route-wrong", ERROR, "calico",
                               "route %s goes via %s dev %s, the datastore says via %s dev %s" % (
                                   r["dst"], got.gateway, got.dev, r["via"], r["dev"]),
                               "traffic for that block goes to the wrong node", "restart the agent", obj))
    wanted = {r["dst"] for r in want}
    for dst in sorted(set(have) - wanted):
        out.append(Finding("calico-route-foreign", WARNING, "calico",
                           "route %s (protocol %d) belongs to no block in the datastore" % (dst, ROUTE_PROTOCOL),
                           "traffic to it goes to a node that no longer owns it",
                           "ip route del %s proto %d" % (dst, ROUTE_PROTOCOL)))
    return out


# ---- kube-proxy (every mode): Services and EndpointSlices -> the chains or virtual servers ----------

def check_kube_proxy(inp: NodeInputs) -> list[Finding]:
    if inp.objects is None:
        return []
    from diagnose import proxy_rules
    from kube_proxy.model import build_state, categorize_endpoints
    with quiet("kube_proxy"):           # bad objects are the daemon's to report
        state = build_state(inp.kind("Service"), inp.kind("EndpointSlice"), hostname=inp.node_name or None)
    modes = proxy_rules.active_modes(inp.snapshot)
    out = []
    for spn, sp in sorted(state.service_ports.items(), key=lambda kv: str(kv[0])):
        eps = state.endpoints_for(spn)
        cats = categorize_endpoints(sp, eps)
        svc = "Service %s/%s port %s" % (spn.namespace, spn.name, spn.port or sp.port)
        if not any(ep.ready for ep in eps):
            why = "%d endpoint(s), none ready: %s" % (len(eps), ", ".join(
                "%s (%s)" % (ep.addr, "terminating" if ep.terminating else "not ready") for ep in eps)) \
                if eps else "its EndpointSlices list no endpoint"
            out.append(Finding("service-no-ready-endpoints", WARNING, "kube-proxy",
                               "%s (%s:%d) has no ready endpoints" % (svc, sp.cluster_ip, sp.port),
                               "%s; connections to it are rejected" % why,
                               "kubectl -n %s get endpointslices -l kubernetes.io/service-name=%s; check the pods' "
                               "readiness probes and the Service's selector" % (spn.namespace, spn.name), svc))
        # (kube-proxy's IPVS mode sends such traffic to the cluster's endpoints instead: no drop there)
        if sp.external_policy_local and sp.externally_accessible and cats.has_any and not cats.local \
                and modes != (proxy_rules.IPVS,):
            out.append(Finding("service-no-local-endpoints", WARNING, "kube-proxy",
                               "%s has externalTrafficPolicy Local and no endpoint on node %s" % (
                                   svc, inp.node_name or "?"),
                               "NodePort / load-balancer traffic arriving at this node is dropped (by design: the "
                               "load balancer's health check on port %d should steer around it)"
                               % sp.health_check_node_port,
                               "run an endpoint on this node, or set externalTrafficPolicy: Cluster", svc))
        for mode in modes:
            rules = proxy_rules.service_rules(inp.snapshot, spn, sp, mode)
            for dispatch, wanted in proxy_rules.wanted(rules, sp, cats):
                have = dispatch.addrs()
                want = {ep.addr: ep for ep in wanted}
                for addr in sorted(set(have) - set(want)):
                    out.append(Finding("kube-proxy-stale-endpoint", ERROR, "kube-proxy",
                                       "%s (%s mode) sends to %s, which is not a usable endpoint in its "
                                       "EndpointSlices: %s" % (dispatch.name, mode, addr, have[addr].rule),
                                       "some connections to %s go to a backend that is gone or not ready" % svc,
                                       "restart kube-proxy (it rewrites the Service's %s)" % _proxy_objects(mode),
                                       svc))
                for addr, ep in sorted(want.items()):
                    if addr not in have:
                        out.append(Finding("kube-proxy-endpoint-missing", ERROR, "kube-proxy",
                                           "%s (%s mode) has no rule for endpoint %s (%s)" % (
                                               dispatch.name, mode, addr,
                                               proxy_rules.endpoint_rule_name(rules, dispatch, ep)),
                                           "endpoint %s of %s receives no traffic" % (addr, svc),
                                           "restart kube-proxy (it rewrites the Service's %s)" % _proxy_objects(mode),
                                           svc))
    for mode in modes:
        for name in proxy_rules.stale_objects(inp.snapshot, mode, state.service_ports.items()):
            out.append(Finding("kube-proxy-stale-service", WARNING, "kube-proxy",
                               "%s %s belongs to no Service port (%s mode)" % (
                                   "virtual server" if mode == proxy_rules.IPVS else "chain", name, mode),
                               "rules of a deleted Service may still capture its old %s" % (
                                   "address" if mode == proxy_rules.IPVS else "ClusterIP"),
                               "restart kube-proxy (a full sync removes stale %s)" % _proxy_objects(mode)))
    return out


def _proxy_objects(mode: str) -> str:
    return "virtual servers" if mode == "ipvs" else "chains"


# ---- NetworkPolicy: which of this node's pods are isolated, and the kernel's maps ----------------

def check_network_policy(inp: NodeInputs) -> list[Finding]:
    policies = inp.kind("NetworkPolicy")
    if inp.objects is None or not policies:
        return []
    from network_policy import nftables as np_nft
    from network_policy.model import (
        EGRESS_PODS,
        INGRESS_PODS,
        PolicyModel,
        parse_namespace,
        parse_pod,
        parse_policy,
    )
    model = PolicyModel(inp.node_name)
    for obj in inp.kind("Namespace"):
        try:
            ns = parse_namespace(obj)
            model.set_namespace(ns.name, ns)
        except ValueError:
            continue
    for obj in inp.kind("Pod"):
        try:
            pod = parse_pod(obj)
        except ValueError:
            continue
        if pod is not None:
            model.set_pod((pod.namespace, pod.name), pod)
    for obj in policies:
        try:
            policy = parse_policy(obj)
        except ValueError:
            continue
        model.set_policy(policy.key, policy)
    out = []
    pods_by_ip = {ip: p for p in model.pods() for ip in getattr(p, "ips", ())}
    kernel_sets = {s["name"]: s for s in inp.snapshot.nft_sets(np_nft.FAMILY, np_nft.TABLE)}
    table_present = (np_nft.FAMILY, np_nft.TABLE) in inp.snapshot.nft_tables()
    for ref, direction in ((INGRESS_PODS, "ingress"), (EGRESS_PODS, "egress")):
        elements = model.elements(ref)
        for ip, namespace in sorted(elements):
            pod = pods_by_ip.get(ip)
            selecting = [p.name for p in model.policies_in(namespace) if direction in p.directions
                         and _selects(p, pod)]
            who = "Pod %s/%s" % (namespace, pod.name) if pod is not None else "pod %s in %s" % (ip, namespace)
            out.append(Finding("pod-isolated-%s" % direction, INFO, "network-policy",
                               "%s (%s) is isolated for %s by NetworkPolicy %s" % (
                                   who, ip, direction, ", ".join(selecting) or "?"),
                               "only what those policies allow passes %s; the rest is dropped" % (
                                   "into it" if direction == "ingress" else "out of it"),
                               "podnet network-policy explain to see which rule allows a connection",
                               "NetworkPolicy %s/%s" % (namespace, ",".join(selecting))))
        if not table_present:
            continue
        have: set[str] = set()
        for name in np_nft.set_specs(ref)[4].name, np_nft.set_specs(ref)[6].name:
            for elem in kernel_sets.get(name, {}).get("elem", ()) or ():
                key = elem[0] if isinstance(elem, list) else elem
                if isinstance(key, dict) and "elem" in key:
                    key = key["elem"].get("val")
                if isinstance(key, str):
                    have.add(key)
        want = {ip for ip, _ in elements}
        for ip in sorted(want - have):
            out.append(Finding("network-policy-element-missing", ERROR, "network-policy",
                               "%s is not in the %s-pods map of table inet %s" % (ip, direction, np_nft.TABLE),
                               "the pod is not policed for %s: traffic its policies deny passes" % direction,
                               "restart the NetworkPolicy agent (podnet network-policy)"))
        for ip in sorted(have - want):
            out.append(Finding("network-policy-element-foreign", ERROR, "network-policy",
                               "%s is in the %s-pods map but no policy isolates it" % (ip, direction),
                               "its %s traffic is policed by a stale verdict" % direction,
                               "restart the NetworkPolicy agent (podnet network-policy)"))
    out += _egress_dns(inp, model, pods_by_ip)
    if not table_present and out:
        out.append(Finding("network-policy-table-missing", ERROR, "network-policy",
                           "NetworkPolicies select pods here but table inet %s does not exist" % np_nft.TABLE,
                           "no policy is enforced on this node", "start the NetworkPolicy agent (podnet "
                           "network-policy)"))
    return out


DNS_SERVICE = ("kube-system", "kube-dns")     # the cluster DNS Service's conventional name (CoreDNS keeps it)


def _dns_endpoints(inp: NodeInputs) -> list[tuple[str, str, int]]:
    """(address, protocol, port) of the cluster DNS's endpoints, from its EndpointSlices."""
    namespace, name = DNS_SERVICE
    out = []
    for obj in inp.kind("EndpointSlice"):
        meta = obj.get("metadata") or {}
        if meta.get("namespace") != namespace or (meta.get("labels") or {}).get("kubernetes.io/service-name") != name:
            continue
        ports = [(p.get("protocol", "TCP"), int(p["port"])) for p in obj.get("ports") or () if p.get("port")]
        for ep in obj.get("endpoints") or ():
            if (ep.get("conditions") or {}).get("ready", True) is False:
                continue
            out += [(addr, proto, port) for addr in ep.get("addresses") or () for proto, port in ports]
    return out


def _egress_dns(inp: NodeInputs, model: Any, pods_by_ip: dict[str, Any]) -> list[Finding]:
    """Egress isolation that forgets DNS: the most common NetworkPolicy mistake (a default-deny
    egress policy without a rule for port 53), which breaks every name lookup of the pod."""
    from network_policy.model import EGRESS_PODS
    endpoints = [e for e in _dns_endpoints(inp) if e[1] == "UDP"]
    if not endpoints:
        return []
    out = []
    for ip, namespace in sorted(model.elements(EGRESS_PODS)):
        pod = pods_by_ip.get(ip)
        if pod is None or (inp.node_name and pod.node and pod.node != inp.node_name):
            continue
        denied = [(addr, v) for addr, proto, port in endpoints
                  for v in [model.verdict(ip, addr, proto, port)] if not v.allowed]
        if len(denied) < len(endpoints):
            continue            # some DNS endpoint answers it
        verdict = denied[0][1]
        policies = ", ".join("%s/%s" % key for key in verdict.isolated_by)
        who = "Pod %s/%s" % (namespace, pod.name)
        out.append(Finding("pod-egress-blocks-dns", WARNING, "network-policy",
                           "%s (%s) may not reach the cluster DNS (%s/%s, UDP %s): %s" % (
                               who, ip, DNS_SERVICE[0], DNS_SERVICE[1],
                               ", ".join(sorted({"%s:%d" % (a, p) for a, _, p in endpoints})), verdict.reason),
                           "every name lookup of the pod times out, so it cannot find the Services its "
                           "policies do allow", "add an egress rule to %s's policy allowing UDP and TCP port 53 to "
                           "namespace %s (namespaceSelector kubernetes.io/metadata.name: %s)" % (
                               policies or who, DNS_SERVICE[0], DNS_SERVICE[0]),
                           ", ".join("NetworkPolicy %s/%s" % key for key in verdict.isolated_by) or who))
    return out


def _selects(policy: Any, pod: Any) -> bool:
    if pod is None:
        return True
    try:
        return bool(policy.pod_selector.matches(pod.label_map))
    except AttributeError:
        return True


# ---- all of it ---------------------------------------------------------------------------------

CHECKS = (check_sysctls, check_forward, check_iptables_backends, check_xtables_lock, check_mtu, check_offload,
          check_pod_cidr, check_policy_routing, check_flannel, check_calico, check_kube_proxy, check_network_policy)


def diagnose(inp: NodeInputs) -> list[Finding]:
    out: list[Finding] = []
    for check in CHECKS:
        try:
            out += check(inp)
        except Exception as e:      # one broken check must not hide the others' findings
            log.exception("%s failed", check.__name__)
            out.append(Finding("check-failed", WARNING, "doctor", "%s could not run: %s" % (check.__name__, e),
                               "its part of the node was not examined", "report it with the snapshot (--json)"))
    for problem in inp.snapshot.errors:
        out.append(Finding("snapshot-incomplete", WARNING, "doctor", "could not read: %s" % problem,
                           "checks that need it may miss problems", "run doctor as root inside the node"))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(out, key=lambda f: order[f.severity])


def render_text(findings: list[Finding]) -> str:
    if not findings:
        return "no findings: the node's kernel state matches what podnet wants\n"
    counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
    head = "%d error(s), %d warning(s), %d note(s)" % (counts[ERROR], counts[WARNING], counts[INFO])
    return "\n".join([f.line() for f in findings] + [head]) + "\n"


def render_json(findings: list[Finding]) -> str:
    return json.dumps({"findings": [asdict(f) for f in findings],
                       "errors": sum(1 for f in findings if f.severity == ERROR)}, indent=2) + "\n"


# ---- gathering the inputs (the only impure part) --------------------------------------------------

def read_subnet_env(path: str) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.strip().partition("=")
            if sep:
                out[key] = value
    return out


def flannel_view(subnet_file: str, etcd_endpoints: str | None, etcd_prefix: str = "/coreos.com/network",
                 nodes: list[dict[str, Any]] | None = None) -> FlannelView:
    """flanneld's side of this node: subnet.env, and the leases from etcd, or (flanneld
    --kube-subnet-mgr, no etcd) from the Node objects' annotations."""
    env = read_subnet_env(subnet_file)
    leases: list[Any] = []
    backend_type, vni = "vxlan", 1
    if not etcd_endpoints and nodes:
        from flanneld.subnet.kube import leases_of_nodes
        leases = leases_of_nodes(nodes)
        own = next((l for l in leases if env.get("FLANNEL_SUBNET") and
                    l.subnet == parse_cidr(env["FLANNEL_SUBNET"]).masked()), None)
        if own is not None:
            backend_type = own.backend_type or backend_type
            data = own.backend_data if isinstance(own.backend_data, dict) else {}
            vni = int(data.get("VNI", vni) or vni)
    if etcd_endpoints:
        from flanneld.subnet.etcd import EtcdSubnetManager
        manager = EtcdSubnetManager(etcd_endpoints, prefix=etcd_prefix, timeout=5.0)
        leases, _ = manager.list_leases()
        config = manager.get_network_config()
        backend_type, vni = config.backend_type, int(config.option("VNI", 1))
    mtu = int(env["FLANNEL_MTU"]) if env.get("FLANNEL_MTU", "").isdigit() else None
    return FlannelView(network=env.get("FLANNEL_NETWORK", ""), subnet=env.get("FLANNEL_SUBNET", ""), mtu=mtu,
                       backend_type=backend_type, vni=vni, leases=leases)


def main(opts: Any) -> int:
    from diagnose import snapshot as snapshot_mod
    snap = snapshot_mod.take()
    objects = None
    if opts.manifests or opts.kubeconfig:
        objects = snapshot_mod.cluster_objects(manifests=opts.manifests, kubeconfig=opts.kubeconfig)
    flannel = None
    if opts.subnet_file:
        try:
            flannel = flannel_view(opts.subnet_file, opts.etcd_endpoints,
                                   nodes=(objects or {}).get("Node") or None)
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("flannel state not read: %s", e)
    calico = None
    if opts.calico_etcd_endpoints:
        from calico_lite.datastore import Datastore
        try:
            calico = Datastore(opts.calico_etcd_endpoints).snapshot()
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("calico datastore not read: %s", e)
    inp = NodeInputs(snapshot=snap, node_name=opts.hostname_override or "", flannel=flannel, calico=calico,
                     objects=objects,
                     kube_mode=bool(objects and objects.get("Node")))
    findings = diagnose(inp)
    print(render_json(findings) if opts.json else render_text(findings), end="")
    return 1 if any(f.severity == ERROR for f in findings) else 0


def add_arguments(p: Any) -> None:
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("--manifests", default=None, help="a directory of manifests instead of the API")
    p.add_argument("--hostname-override", default=None, help="this node's name (Pods' spec.nodeName)")
    p.add_argument("--subnet-file", default=None, help="flannel's subnet.env (/run/flannel/subnet.env)")
    p.add_argument("--etcd-endpoints", default=None, help="flannel's etcd (its leases)")
    p.add_argument("--calico-etcd-endpoints", default=None, help="calico_lite's datastore (its blocks)")
    p.add_argument("--json", action="store_true", help="findings as JSON")
