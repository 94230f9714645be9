"""A BGP route reflector (RFC 4456) as its own process, on calico_lite's speaker.

    python -m calico_lite.reflector --router-id 192.168.50.1 --as 64512 --listen 192.168.50.1 \\
        --peer 192.168.50.2,client --peer 192.168.50.3,client,md5=secret --peers-from-file peers.txt

A peer is ADDR[,client][,passive][,as=N][,port=N][,hold=N][,local=ADDR][,next-hop-self][,md5=PASSWORD]:
`client` makes it a route-reflector client; `passive` waits for it to connect;
`as` defaults to ours (iBGP); md5 comes last and takes the rest of the spec,
so the password may contain commas. A peers file holds one spec per line
(# comments); SIGHUP re-reads it and adds, removes or re-creates the peers
that changed. Without client peers the process is a plain iBGP/eBGP speaker,
which --announce makes useful for tests and for originating a few prefixes.

Without --listen it accepts connections on this node's address only, never
on every address the host has (see node_address(): the router id when it is
one of this host's addresses, else the source address of the route towards
the first --peer, else that of the default route).

Graceful restart (RFC 4724) is on (capability advertised, peers' routes kept
stale across their restarts for their restart time, bounded by --stale-time);
--graceful-restart-time 0 turns it off. After a session reset the process
waits --idle-hold-time before reconnecting, doubling with each further
failure up to --idle-hold-max.

--prometheus-metrics-enabled and --health-enabled (Felix's names, with their
FELIX_* variables: calico_lite/metrics.py) serve /metrics (sessions, resets,
prefixes received and advertised per peer), /healthz (the event loop runs)
and /readyz (every session Established).

Session changes are logged (Established, down with the reason). --dump-file
keeps a JSON snapshot of the sessions and the Loc-RIB (rewritten shortly after
every change, and on SIGUSR1), for operators and tests. SIGTERM/SIGINT send
Cease (administrative shutdown) to every peer and exit.
"""
import argparse
import logging
import os
import signal
import sys

log = logging.getLogger("calico_lite.reflector")

DUMP_DELAY = 0.1        # seconds: changes closer together than this share one dump


def parse_peer(spec, local_as, hold_time=90, connect_retry=5.0, **defaults):
    """A PeerConfig from ADDR[,client][,passive][,as=N][,port=N][,hold=N][,local=ADDR][,next-hop-self][,md5=...].
    `defaults`: more PeerConfig fields for every peer (graceful_restart, stale_time, idle_hold_*)."""
    from calico_lite.bgp.session import PeerConfig
    head, sep, md5 = spec.strip().partition(",md5=")
    items = [i.strip() for i in head.split(",")]
    kw = {"address": items[0], "remote_as": local_as, "hold_time": hold_time, "connect_retry": connect_retry,
          **defaults}
    if sep:
        kw["md5_password"] = md5
    for item in items[1:]:
        key, _, value = item.partition("=")
        if item == "client":
            kw["rr_client"] = True
        elif item == "passive":
            kw["passive"] = True
        elif item == "next-hop-self":
            kw["next_hop_self"] = True
        elif key in ("as", "port", "hold") and value.isdigit():
            kw[{"as": "remote_as", "port": "port", "hold": "hold_time"}[key]] = int(value)
        elif key == "local" and value:
            kw["local_address"] = value
        else:
            raise ValueError("peer %r: unknown option %r" % (spec, item))
    try:
        return PeerConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError("peer %r: %s" % (spec, e)) from None


def read_peers_file(path, local_as, hold_time, connect_retry, **defaults):
    peers = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                peers.append(parse_peer(line, local_as, hold_time, connect_retry, **defaults))
    return peers


def _is_local_address(address):
    """Whether `address` is one of this host's (network namespace's) addresses: it can be bound."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def _source_towards(address):
    """The source address the kernel picks for packets to `address` (None if it has no route).
    A connected UDP socket asks the routing table; nothing is sent."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 179))
        except OSError:
            return None
        source = sock.getsockname()[0]
    return None if source == "0.0.0.0" else source


DEFAULT_ROUTE_PROBE = "192.0.2.1"       # TEST-NET-1 (RFC 5737): only ever reached through a default route


def node_address(router_id, peers=()):
    """(address, how it was found): the address to accept BGP connections on by default.

    1. the router id, when it is one of this host's addresses (the usual setup:
       calico_lite's agents and rendered BIRD configs use the node address);
    2. else the source address of the route towards the first peer (the
       address that peer sees our connections come from, so the one it dials);
    3. else the source address of the default route.
    ValueError if none applies: --listen must say."""
    if _is_local_address(router_id):
        return router_id, "the router id is an address of this host"
    for peer in peers[:1]:
        source = _source_towards(peer)
        if source:
            return source, "the source address of the route to peer %s" % peer
    source = _source_towards(DEFAULT_ROUTE_PROBE)
    if source:
        return source, "the source address of the default route"
    raise ValueError("cannot tell this node's address (router id %s is not one of this host's addresses, and there "
                     "is no route to a peer nor a default route): give --listen" % router_id)


def parse_announce(spec):
    """PREFIX[,next_hop=ADDR] -> (prefix, next hop or None)."""
    from calico_lite.bgp.messages import ip_to_bytes, normalize_prefix
    prefix, _, rest = spec.partition(",")
    next_hop = None
    if rest:
        key, _, value = rest.partition("=")
        if key != "next_hop":
            raise ValueError("announce %r: unknown option %r" % (spec, rest))
        ip_to_bytes(value)
        next_hop = value
    return normalize_prefix(prefix), next_hop


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="calico_lite.reflector", description=__doc__.split("\n\n")[0])
    p.add_argument("--router-id", required=True, help="our BGP identifier (dotted quad)")
    p.add_argument("--as", dest="local_as", type=int, required=True, help="our AS number")
    p.add_argument("--listen", default=None,
                   help="address to accept BGP connections on (default: this node's address: the router id if "
                        "it is an address of this host, else the source address towards the first --peer, else "
                        "that of the default route; 0.0.0.0 means every address)")
    p.add_argument("--port", type=int, default=179, help="TCP port (default: %(default)s)")
    p.add_argument("--cluster-id", default=None, help="route reflector CLUSTER_ID (default: the router id)")
    p.add_argument("--peer", action="append", default=[], metavar="SPEC", help="a peer (repeatable): "
                   "ADDR[,client][,passive][,as=N][,port=N][,hold=N][,local=ADDR][,next-hop-self][,md5=PASSWORD]")
    p.add_argument("--peers-from-file", metavar="FILE", help="more peers, one SPEC per line; re-read on SIGHUP")
    p.add_argument("--hold-time", type=int, default=90, help="proposed hold time in seconds (default: %(default)s)")
    p.add_argument("--connect-retry", type=float, default=5.0,
                   help="seconds between connection attempts (default: %(default)s)")
    p.add_argument("--graceful-restart-time", type=int, default=120, metavar="SECONDS",
                   help="graceful restart (RFC 4724) time to advertise, 1..4095; 0 turns graceful restart off "
                        "(default: %(default)s)")
    p.add_argument("--stale-time", type=float, default=360.0, metavar="SECONDS",
                   help="keep a restarting peer's routes at most this long (default: %(default)s)")
    p.add_argument("--idle-hold-time", type=float, default=1.0, metavar="SECONDS",
                   help="wait this long before reconnecting after a session reset or a refused attempt, "
                        "doubling with each further failure (default: %(default)s)")
    p.add_argument("--idle-hold-max", type=float, default=60.0, metavar="SECONDS",
                   help="the longest such wait (default: %(default)s)")
    p.add_argument("--announce", action="append", default=[], metavar="PREFIX[,next_hop=ADDR]",
                   help="originate this prefix (repeatable)")
    p.add_argument("--dump-file", help="keep a JSON snapshot of sessions and routes here")
    p.add_argument("-v", "--verbose", action="store_true", help="log every state and route change")
    from calico_lite import metrics
    metrics.add_flags(p)
    args = p.parse_args(argv)
    from calico_lite.bgp.messages import ip_to_bytes
    if not 0 <= args.graceful_restart_time <= 4095:
        p.error("--graceful-restart-time must be 0..4095")
    args.peer_defaults = {"graceful_restart": args.graceful_restart_time > 0, "stale_time": args.stale_time,
                          "idle_hold_time": args.idle_hold_time,
                          "idle_hold_max": max(args.idle_hold_max, args.idle_hold_time)}
    try:
        ip_to_bytes(args.router_id)
        if args.cluster_id:
            ip_to_bytes(args.cluster_id)
        if args.listen:
            ip_to_bytes(args.listen)
        args.peer_configs = [parse_peer(s, args.local_as, args.hold_time, args.connect_retry, **args.peer_defaults)
                             for s in args.peer]
        args.announcements = [parse_announce(s) for s in args.announce]
    except ValueError as e:
        p.error(str(e))
    return args


def route_summary(route):
    a = route.attrs
    return {"prefix": route.prefix, "next_hop": a.next_hop, "peer": route.peer, "origin": a.origin,
            "as_path": a.as_numbers(), "local_pref": route.local_pref, "med": a.med,
            "originator_id": a.originator_id, "cluster_list": list(a.cluster_list)}


class Reflector:
    """The process around a Speaker: peers from arguments and file, signals, logging, dumps."""

    def __init__(self, args):
        import asyncio

        from calico_lite.bgp.speaker import Speaker
        self.args = args
        self.listen_reason = "--listen"
        if args.listen is None:
            args.listen, self.listen_reason = node_address(args.router_id, [c.address for c in args.peer_configs])
        self.speaker = Speaker(args.local_as, args.router_id, listen_address=args.listen, port=args.port,
                               cluster_id=args.cluster_id,
                               restart_time=args.graceful_restart_time if args.graceful_restart_time else None)
        self.stopping = asyncio.Event()
        from calico_lite.metrics import Metrics
        self.metrics = Metrics(lambda: self.speaker, lambda: len(args.announcements))
        self._dump_handle = None
        self._file_peers = {}       # address -> PeerConfig that came from --peers-from-file

    def on_session(self, address, old, new, reason):
        if "Established" in (old, new):
            log.info("sessions established: %d of %d", self.speaker.established_count(), len(self.speaker.peers()))
        self.schedule_dump()

    def on_best(self, prefix, route):
        if self.args.verbose:
            log.debug("best %s: %s", prefix, "withdrawn" if route is None else
                      "via %s from %s" % (route.next_hop, route.peer or "us"))
        self.schedule_dump()

    def schedule_dump(self):
        if self.args.dump_file and self._dump_handle is None:
            self._dump_handle = self.loop.call_later(DUMP_DELAY, self.dump)

    def dump(self):
        import json
        self._dump_handle = None
        state = {"router_id": self.args.router_id, "as": self.args.local_as, "listen": self.args.listen,
                 "port": self.speaker.port,
                 "pid": os.getpid(), "peers": self.speaker.peer_status(),
                 "routes": [route_summary(r) for _, r in sorted(self.speaker.best_routes().items())]}
        tmp = self.args.dump_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, self.args.dump_file)

    def _heartbeat(self):
        """The event loop runs (for /healthz): a beat every second, from the loop itself."""
        self.metrics.beat()
        if not self.stopping.is_set():
            self.loop.call_later(1.0, self._heartbeat)

    def load_peers_file(self):
        path = self.args.peers_from_file
        try:
            wanted = {c.address: c for c in read_peers_file(path, self.args.local_as, self.args.hold_time,
                                                            self.args.connect_retry, **self.args.peer_defaults)}
        except (OSError, ValueError) as e:
            log.error("peers file %s not (re)loaded: %s", path, e)
            return
        configured = {c.address for c in self.speaker.peers()}
        for address, old in list(self._file_peers.items()):
            if wanted.get(address) != old:
                self.speaker.remove_peer(address)
                del self._file_peers[address]
                configured.discard(address)
                log.info("peer %s removed (peers file)", address)
        for address, config in wanted.items():
            if address in self._file_peers:
                continue
            if address in configured:
                log.warning("peer %s in %s is already given by --peer: ignored", address, path)
                continue
            self.speaker.add_peer(config)
            self._file_peers[address] = config
            log.info("peer %s added (peers file)%s", address, ", route reflector client" if config.rr_client else "")

    async def run(self):
        import asyncio
        self.loop = asyncio.get_running_loop()
        speaker = self.speaker
        speaker.subscribe_sessions(self.on_session)
        speaker.subscribe(self.on_best)
        for config in self.args.peer_configs:
            speaker.add_peer(config)
        await speaker.start()
        if self.args.peers_from_file:
            self.load_peers_file()
        for prefix, next_hop in self.args.announcements:
            speaker.announce(prefix, next_hop)
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        if self.args.peers_from_file:
            loop.add_signal_handler(signal.SIGHUP, self.load_peers_file)
        if self.args.dump_file:
            loop.add_signal_handler(signal.SIGUSR1, self.dump)
            self.dump()
        clients = sum(1 for c in speaker.peers() if c.rr_client)
        log.info("route reflector %s AS %d: %d peers (%d clients), cluster id %s; listening on %s:%d (%s)",
                 self.args.router_id, self.args.local_as, len(speaker.peers()), clients,
                 self.args.cluster_id or self.args.router_id, self.args.listen, speaker.port, self.listen_reason)
        self._heartbeat()
        from calico_lite import metrics
        servers = metrics.start_servers(self.args, self.metrics, "calico-reflector")
        await self.stopping.wait()
        for server in servers:
            server.shutdown()
            server.server_close()
        log.info("stopping: sending Cease to every peer")
        await speaker.stop()
        if self.args.dump_file:
            self.dump()


def _import_asyncio_without_tls():
    """Import asyncio without the ssl module, which asyncio loads eagerly: ~4.5 MiB of
    resident OpenSSL a BGP process never uses. Only where asyncio is not loaded
    yet, i.e. in a process of its own (ssl itself stays importable afterwards)."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def main(argv=None):
    """Entry point of the reflector process: parse argv, run until SIGTERM/SIGINT; exit code."""
    _import_asyncio_without_tls()
    import asyncio
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        reflector = Reflector(args)
    except ValueError as e:         # no node address to listen on
        log.error("%s", e)
        return 2
    try:
        asyncio.run(reflector.run())
    except OSError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
