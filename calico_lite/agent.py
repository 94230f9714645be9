"""The calico_lite node agent: what Felix and BIRD do on a Calico node, in one process.

    podnet calico agent --etcd-endpoints http://etcd:2379 --node-name node1 --iface eth0
    podnet calico agent ... --role route-reflector      # a dedicated reflector node

On a node it registers the node (its underlay address) in the datastore,
claims a pod block (and writes it to the blocks file the `calico` CNI plugin
reads), announces the block over BGP, and installs what the other nodes
announce as kernel routes (protocol 78): via the underlay when the next hop is
on-link, through tunl0 when IPIP applies (always / cross-subnet). Its own
block gets a blackhole route so that unallocated addresses are not forwarded
anywhere. Peers come from the datastore: every other node (node-to-node mesh)
or the route reflectors (mesh off). On a route-reflector node it claims no
block and installs nothing: it reflects (RFC 4456), every node being its client.

Desired state from inputs, then diff, then apply: peers = f(datastore
snapshot), routes = f(snapshot, BGP best paths); every change of either
re-runs both reconciliations, which change nothing when nothing differs.

A restarted agent adopts the routes its predecessor left in the kernel
and keeps them until BGP says otherwise (every peer has sent its End-of-RIB,
so whatever was not learned again is gone) or --startup-grace passes:
starting from an empty RIB would cut traffic for as long as the sessions take
to come up. When a session is lost, the routes learned over it are kept for
--route-grace seconds (traffic keeps flowing through a peer that only
restarts its agent; the kernel datapath on that peer is intact), as are
routes a session drops before it has sent its whole table (End-of-RIB); an
explicit BGP withdrawal on a synchronised session removes a route at once.

Graceful restart (RFC 4724, --graceful-restart-time, default 120 s; 0 turns
it off): the speaker advertises the capability and keeps the routes of a peer
that restarts, stale, for that peer's restart time. SIGTERM withdraws
nothing: routes and blackholes stay in the kernel, and the sessions are
closed without a NOTIFICATION, so that peers doing graceful restart keep our
block for our restart time. The next agent finds its predecessor's routes,
says so in its OPEN (R bit: restarted; F bit: forwarding state kept),
announces the same block, then End-of-RIB, and the peers drop only what it
did not announce again. Without graceful restart a peer drops our block when
the session closes.

Metrics and health (calico_lite/metrics.py): --prometheus-metrics-enabled
(-host, -port 9091) and --health-enabled (-host, -port 9099), Felix's flags
and FELIX_* variables: BGP sessions, resets and prefixes per peer, our routes
in the kernel; /healthz (the loop goes round), /readyz (every session
Established and the kernel's routes reconciled once).
"""
import argparse
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("calico_lite.agent")

DEFAULT_BLOCKS_FILE = "/run/calico-lite/blocks"


def desired_peers(snapshot, me, hold_time=9, port=179, md5_password=None, graceful_restart=True):
    """{address: PeerConfig} this node should have, from the datastore snapshot (pure)."""
    from calico_lite.bgp.session import PeerConfig
    config = snapshot.config
    my_as = me.asn(config)
    my_ip = str(me.address)
    reflectors = [n for n in snapshot.nodes.values() if n.is_route_reflector and n.name != me.name]
    workers = [n for n in snapshot.nodes.values() if not n.is_route_reflector and n.name != me.name]
    if me.is_route_reflector:
        peers = [(n, True) for n in workers] + [(n, False) for n in reflectors]
    elif config.node_to_node_mesh:
        peers = [(n, False) for n in workers]
    else:
        peers = [(n, False) for n in reflectors]
    out = {}
    for node, client in peers:
        address = str(node.address)
        out[address] = PeerConfig(address, node.asn(config), rr_client=client, hold_time=hold_time,
                                  local_address=my_ip, port=port, md5_password=md5_password,
                                  connect_retry=1.0, graceful_restart=graceful_restart)
        if my_as != out[address].remote_as and client:
            raise ValueError("route reflector clients must be in our AS")
    return out


def interface_address(iface):
    """(ip/prefixlen, mtu) of the interface's first IPv4 address."""
    from podnet.net.ip import AF_INET
    from podnet.net.netlink import Netlink
    with Netlink() as nl:
        link = nl.link(iface)
        if link is None:
            raise ValueError("no interface %s" % iface)
        addrs = [a for a in nl.addrs(link.index, AF_INET) if a.scope == 0]
        if not addrs:
            raise ValueError("interface %s has no IPv4 address" % iface)
        return "%s/%d" % (addrs[0].net.ip, addrs[0].net.prefixlen), link.mtu


def write_blocks_file(path, blocks):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join("%s\n" % b for b in blocks))
    os.replace(tmp, path)


class Agent:
    def __init__(self, datastore, node_name, iface, role="node", blocks_file=DEFAULT_BLOCKS_FILE,
                 hold_time=9, route_grace=5.0, port=179, md5_password=None, clock=time.monotonic,
                 startup_grace=30.0, graceful_restart_time=120):
        self.ds = datastore
        self.node_name = node_name
        self.iface = iface
        self.role = role
        self.blocks_file = blocks_file
        self.hold_time = hold_time
        self.route_grace = route_grace
        self.startup_grace = startup_grace
        self.graceful_restart_time = graceful_restart_time     # 0: no graceful restart
        self.restarted = False      # a previous run left its routes in the kernel
        self.adopted = {}           # prefix -> expiry of a route adopted from that run, until BGP settles it
        self.want_peers = ()        # the peer addresses of the last reconciliation
        self.port = port
        self.md5_password = md5_password
        self.clock = clock
        self.me = None
        self.mtu = 1500
        self.speaker = None
        self.snapshot = None
        self.learned = {}           # prefix -> next hop (BGP best paths, from the speaker's thread)
        self.held = {}              # prefix -> (next hop, expiry): learned over a session that went down
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.announced = set()
        self.ipip_ready = False
        from calico_lite.metrics import Metrics, kernel_routes
        self.metrics = Metrics(lambda: self.speaker, lambda: len(self.announced),
                               kernel_routes if role != "route-reflector" else None, clock=clock)

    # ---- start-up ----

    def register(self):
        from calico_lite.datastore import Node
        ip, self.mtu = interface_address(self.iface)
        while self.ds.get_config() is None and not self.stopping.is_set():
            log.info("waiting for the calico-lite config in the datastore")
            self.metrics.beat()
            self.stopping.wait(1.0)
        old = self.ds.get_node(self.node_name)
        self.me = Node(self.node_name, ip, old.as_number if old else None, self.role,
                       old.rr_cluster_id if old and self.role == "route-reflector" else None)
        if old != self.me:
            self.ds.put_node(self.me)
        if not self.me.is_route_reflector:
            block = self.ds.allocate_block(self.node_name)
            log.info("node %s (%s): block %s", self.node_name, ip, block)
        else:
            log.info("route reflector %s (%s), cluster id %s", self.node_name, ip,
                     self.me.rr_cluster_id or self.me.address)

    def adopt_kernel_routes(self):
        """Hold the routes a previous run installed (see the module docstring)."""
        from calico_lite.routes import ROUTE_PROTOCOL
        from podnet.net.netlink import Netlink
        from podnet.net.routes import RTN_BLACKHOLE, RTN_UNICAST, read_routes
        with Netlink() as nl:
            have, _ = read_routes(nl, ROUTE_PROTOCOL, types=(RTN_UNICAST, RTN_BLACKHOLE))
        expiry = self.clock() + self.startup_grace
        # any route of ours (a learned one, or our block's blackhole) means this is a restart and the
        # kernel kept forwarding meanwhile: the R and F bits of graceful restart
        self.restarted = bool(have)
        with self.lock:
            for dst, route in have.items():
                if route.get("via") and dst not in self.learned:
                    self.held[dst] = (route["via"], expiry)
                    self.adopted[dst] = expiry
        if self.held:
            log.info("holding %d routes of the previous run for up to %.0f s", len(self.held), self.startup_grace)

    def start_speaker(self):
        from calico_lite.bgp.speaker import Speaker
        config = self.ds.get_config()
        self.speaker = Speaker(self.me.asn(config), str(self.me.address), listen_address=str(self.me.address),
                               port=self.port,
                               cluster_id=self.me.rr_cluster_id if self.me.is_route_reflector else None,
                               restart_time=self.graceful_restart_time or None,
                               restarting=self.restarted, forwarding=self.restarted)
        if self.restarted and self.graceful_restart_time:
            log.info("restarted with forwarding state kept: graceful restart (R and F bits) towards every peer")
        self.speaker.subscribe(self._on_best)
        self.speaker.subscribe_sessions(self._on_session)
        self.speaker.subscribe_end_of_rib(self._on_end_of_rib)
        self.speaker.start_in_thread()

    # ---- what the speaker reports (its thread) ----

    def _on_best(self, prefix, route):
        with self.lock:
            if route is None or route.peer is None:
                old = self.learned.pop(prefix, None)
                if old is not None and self._not_synced(old[1]):
                    self.held[prefix] = (old[0], self.clock() + self.route_grace)
            else:
                self.learned[prefix] = (str(route.next_hop), route.peer)
                self.held.pop(prefix, None)
                self.adopted.pop(prefix, None)
        self.wake.set()

    def _not_synced(self, peer):
        """Whether the peer's word is not final: its session is down, or it has not sent its
        whole table yet (no End-of-RIB on this session); not if it was de-configured."""
        from calico_lite.bgp.session import ESTABLISHED
        try:
            return self.speaker.state(peer) != ESTABLISHED or not self.speaker.synced(peer)
        except KeyError:
            return False            # de-configured: its routes go at once

    def _on_end_of_rib(self, peer):
        self.wake.set()

    def _on_session(self, address, old_state, new_state, reason):
        if new_state == "Established" or old_state == "Established":
            log.info("BGP session with %s: %s -> %s%s", address, old_state, new_state,
                     " (%s)" % reason if reason else "")

    # ---- the datastore (a thread) ----

    def _watch_datastore(self):
        revision = None
        while not self.stopping.is_set():
            try:
                snap = self.ds.snapshot()
                if snap.revision != revision:
                    revision = snap.revision
                    self.snapshot = snap
                    self.wake.set()
                self.ds.wait_for_change(revision, 5.0)
            except Exception as e:      # etcd down: the datapath stays; retry
                log.warning("datastore: %s; retrying", e)
                self.stopping.wait(1.0)

    # ---- reconciling ----

    def reconcile(self):
        snap = self.snapshot
        if snap is None or snap.config is None:
            return
        if not self.me.is_route_reflector:
            # our blocks are in the RIB before any session exists, so that the first table every
            # peer gets (and the End-of-RIB after it) already holds them
            self._reconcile_announcements(snap)
        self._reconcile_peers(snap)
        if not self.me.is_route_reflector:
            self._reconcile_routes(snap)

    def _reconcile_peers(self, snap):
        want = desired_peers(snap, self.me, self.hold_time, self.port, self.md5_password,
                             graceful_restart=bool(self.graceful_restart_time))
        self.want_peers = tuple(want)
        have = {p.address: p for p in self.speaker.peers()}
        for address, config in have.items():
            if want.get(address) != config:
                log.info("removing BGP peer %s", address)
                self.speaker.remove_peer(address)
        for address, config in want.items():
            if have.get(address) != config:
                log.info("adding BGP peer %s (AS %d%s)", address, config.remote_as,
                         ", route reflector client" if config.rr_client else "")
                self.speaker.add_peer(config)

    def _reconcile_announcements(self, snap):
        blocks = {str(b) for b in snap.blocks_of(self.node_name)}
        if blocks != self.announced:
            write_blocks_file(self.blocks_file, sorted(blocks))
        for block in sorted(blocks - self.announced):
            self.speaker.announce(block)
        for block in sorted(self.announced - blocks):
            self.speaker.withdraw(block)
        self.announced = blocks

    def routes_to_keep(self):
        """{prefix: next hop} to route now: BGP's best paths, plus the routes held (of lost or not
        yet synchronised sessions, or adopted from the previous run) that have not expired."""
        now = self.clock()
        with self.lock:
            for prefix in [p for p, (_, expiry) in self.held.items() if expiry <= now]:
                log.info("route to %s: not learned again in time; removing it", prefix)
                del self.held[prefix]
                self.adopted.pop(prefix, None)
            if self.adopted and self.want_peers and all(self.speaker.synced(p) for p in self.want_peers):
                # every peer has sent its whole table: what the previous run had and BGP does not is gone
                for prefix, expiry in self.adopted.items():
                    if self.held.get(prefix, (None, None))[1] == expiry:
                        log.info("route to %s: not in any peer's table (End-of-RIB from every peer); removing it",
                                 prefix)
                        del self.held[prefix]
                self.adopted = {}
            learned = {p: hop for p, (hop, _) in self.held.items()}
            learned.update({p: hop for p, (hop, _) in self.learned.items()})
        return learned

    def _reconcile_routes(self, snap):
        from calico_lite import routes
        from podnet.net.ip import AF_INET, IP
        from podnet.net.netlink import Netlink
        learned = self.routes_to_keep()
        problems = []
        want = routes.desired_routes(self.me, snap.nodes, learned, snap.config.ipip_mode,
                                     own_blocks=snap.blocks_of(self.node_name), underlay_dev=self.iface,
                                     problems=problems)
        with Netlink() as nl:
            if routes.uses_ipip(want) and not self.ipip_ready:
                blocks = snap.blocks_of(self.node_name)
                # tunl0 takes the block's second address (host-local never hands it out), so
                # that what the node itself sends through the tunnel has a routable source
                address = "%s/32" % IP(AF_INET, blocks[0].network.value + 1) if blocks else None
                try:
                    routes.setup_ipip(nl, self.mtu, address)
                    self.ipip_ready = True
                except routes.IPIPUnavailable as e:
                    log.error("IPIP is needed but unavailable: %s", e)
            routes.sync(nl, want, self.iface, log)
        self.metrics.routes_synced()

    def next_wake(self):
        with self.lock:
            expiries = [expiry for _, expiry in self.held.values()]
        return max(0.05, min(expiries) - self.clock()) if expiries else 5.0

    # ---- running ----

    def run(self):
        self.register()
        if not self.me.is_route_reflector:
            self.adopt_kernel_routes()
        self.start_speaker()
        threading.Thread(target=self._watch_datastore, name="datastore", daemon=True).start()
        try:
            while not self.stopping.is_set():
                self.metrics.beat()
                self.wake.wait(self.next_wake())
                self.wake.clear()
                if self.stopping.is_set():
                    break
                try:
                    self.reconcile()
                except Exception:
                    self.metrics.reconcile_failed()
                    log.exception("reconcile failed; retrying")
                    self.stopping.wait(1.0)
                    self.wake.set()
        finally:
            # without a NOTIFICATION: peers doing graceful restart keep our routes until we are back
            self.speaker.stop_thread(graceful=bool(self.graceful_restart_time))

    def stop(self, *_):
        self.stopping.set()
        self.wake.set()


def build_parser():
    """`podnet calico agent`'s flags (Felix's metrics and health flags included)."""
    p = argparse.ArgumentParser(prog="podnet calico agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--etcd-endpoints", default="http://127.0.0.1:2379")
    p.add_argument("--etcd-prefix", default=None)
    p.add_argument("--node-name", default=os.uname().nodename)
    p.add_argument("--iface", default="eth0", help="the underlay interface (its address is the node's)")
    p.add_argument("--role", choices=("node", "route-reflector"), default="node")
    p.add_argument("--blocks-file", default=DEFAULT_BLOCKS_FILE, help="read by the calico CNI plugin")
    p.add_argument("--hold-time", type=int, default=9, help="BGP hold time, seconds (default 9)")
    p.add_argument("--route-grace", type=float, default=5.0,
                   help="keep routes of a lost session this long (seconds)")
    p.add_argument("--startup-grace", type=float, default=30.0,
                   help="keep the previous run's routes this long unless BGP replaces them (seconds)")
    p.add_argument("--graceful-restart-time", type=int, default=120, metavar="SECONDS",
                   help="BGP graceful restart (RFC 4724): how long peers keep our routes while we restart, "
                        "1..4095; 0 turns graceful restart off (default 120)")
    p.add_argument("--bgp-port", type=int, default=179)
    p.add_argument("--md5-password", default=None, help="TCP MD5 on every session")
    p.add_argument("-v", "--verbose", action="store_true")
    from calico_lite import metrics
    metrics.add_flags(p)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["reflector"]:
        from calico_lite.reflector import main as reflector_main
        return reflector_main(argv[1:])
    if argv[:1] == ["bird-config"]:
        return bird_config_main(argv[1:])
    if argv[:1] == ["agent"]:
        argv = argv[1:]
    p = build_parser()
    opts = p.parse_args(argv)
    if not 0 <= opts.graceful_restart_time <= 4095:
        p.error("--graceful-restart-time must be 0..4095")
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from calico_lite import metrics
    from calico_lite.datastore import DEFAULT_PREFIX, Datastore
    ds = Datastore(opts.etcd_endpoints.split(","), prefix=opts.etcd_prefix or DEFAULT_PREFIX)
    agent = Agent(ds, opts.node_name, opts.iface, opts.role, opts.blocks_file, opts.hold_time, opts.route_grace,
                  opts.bgp_port, opts.md5_password, startup_grace=opts.startup_grace,
                  graceful_restart_time=opts.graceful_restart_time)
    try:
        metrics.start_servers(opts, agent.metrics, "calico-agent")
    except OSError as e:
        log.error("metrics or health endpoint: %s", e)
        return 1
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.run()
    log.info("stopped; routes stay in the kernel")
    return 0


def bird_config_main(argv):
    """`podnet calico bird-config --node NAME`: the BIRD 2 configuration for a node, from the datastore."""
    p = argparse.ArgumentParser(prog="podnet calico bird-config")
    p.add_argument("--etcd-endpoints", default="http://127.0.0.1:2379")
    p.add_argument("--node", required=True)
    p.add_argument("--iface", default="eth0")
    p.add_argument("--output", "-o", default="-")
    p.add_argument("--graceful-restart-time", type=int, default=None, metavar="SECONDS",
                   help="BGP graceful restart time, 1..4095 (default: BIRD's, 120); 0 turns graceful restart off")
    p.add_argument("--debug-protocols", default=None, metavar="CLASSES",
                   help='a "debug protocols" line: all, or comma-separated states,routes,filters,interfaces,'
                        'events,packets')
    opts = p.parse_args(argv)
    from calico_lite.bird import render
    from calico_lite.datastore import Datastore
    debug = opts.debug_protocols
    if debug and debug not in ("all", "off"):
        debug = [c.strip() for c in debug.split(",") if c.strip()]
    gr_time = opts.graceful_restart_time
    text = render.render_config(Datastore(opts.etcd_endpoints.split(",")).snapshot(), opts.node,
                                underlay_if=opts.iface, graceful_restart=gr_time != 0,
                                graceful_restart_time=gr_time or None, debug_protocols=debug)
    if opts.output == "-":
        sys.stdout.write(text)
    else:
        render.write_atomic(opts.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
