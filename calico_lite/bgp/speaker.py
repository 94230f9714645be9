"""A BGP speaker: sessions, RIBs and route reflection, driven by the node agent.

    speaker = Speaker(64512, "192.168.50.2")
    speaker.subscribe(lambda prefix, route: ...)      # Loc-RIB best-path changes
    await speaker.start()                            # listen; connect to peers
    speaker.add_peer(PeerConfig("192.168.50.1", 64512))
    speaker.announce("10.65.3.0/26")                 # next hop: our address on each session
    speaker.withdraw("10.65.3.0/26")
    await speaker.stop()

Callbacks run in the speaker's event loop, once per changed prefix, with the
new best Route or None (the prefix is gone). Loss of a session withdraws its
routes at once, unless graceful restart keeps them (below); damping or a
grace delay is the agent's business. Nothing here touches the kernel: the
agent installs routes from the callbacks.

Graceful restart (RFC 4724), both roles. We advertise the capability (restart
time `restart_time`; R bit when `restarting`, i.e. this process replaced one
that had sessions; F bit for IPv4 unicast when `forwarding`, i.e. the
forwarding state survived that) and send End-of-RIB after the initial table.
As the receiving speaker: when a session whose peer advertised the capability
for IPv4 unicast is lost (TCP connection, hold timer, or a new OPEN from the
peer), its routes stay in the RIB, marked stale, for the peer's restart time
(at most the peer's stale_time). Nothing changes for anyone in the meantime.
When the peer is back: if its new OPEN does not carry the F bit for IPv4
unicast, the stale routes go at once; otherwise each route it announces or
withdraws replaces its stale one, and its End-of-RIB removes whatever stale
routes are left (or stale_time does, if it never sends one). A second loss
before that End-of-RIB first drops what the interrupted session did not
re-announce (as BIRD does). subscribe_end_of_rib() reports each peer's
End-of-RIB; synced() says whether a peer's current session has sent its
whole table (its End-of-RIB, or it never promised one: no capability).
stop(graceful=True) closes the sessions without a NOTIFICATION, so that peers
keep our routes while we restart.

The speaker advertises only its best path per prefix. Towards iBGP peers
it follows RFC 4456: a peer configured rr_client=True is a route reflector
client; routes from clients go to every other peer, routes from non-clients
only to clients, and without any client iBGP routes are not re-advertised
to iBGP peers (split horizon).

Every public method may be called from another thread once the loop runs
(e.g. after start_in_thread()): it is then handed to the loop thread.
"""
import asyncio
import logging
import socket
import threading
import time

from calico_lite.bgp.messages import (
    AFI_IPV4,
    AS_SEQUENCE,
    CEASE_PEER_DECONFIGURED,
    MALFORMED_AS_PATH,
    ORIGIN_IGP,
    SAFI_UNICAST,
    UPDATE_ERROR,
    BGPError,
    GracefulRestart,
    PathAttributes,
    encode_end_of_rib,
    ip_to_bytes,
    normalize_prefix,
    pack_updates,
)
from calico_lite.bgp.rib import ExportPolicy, Rib, Route, Source, export_attributes, import_attributes, local_source
from calico_lite.bgp.session import ESTABLISHED, PeerConfig, Session, set_md5

log = logging.getLogger("calico_lite.bgp")

__all__ = ["Speaker", "PeerConfig", "Route", "PathAttributes"]

END_OF_RIB = encode_end_of_rib(AFI_IPV4, SAFI_UNICAST)     # an UPDATE with nothing in it (RFC 4724 §2)
_ANNOUNCE_ATTRS = {"origin", "med", "local_pref", "as_path", "atomic_aggregate", "aggregator"}


class _Peer:
    """What the speaker keeps per configured peer."""
    __slots__ = ("config", "session", "source", "policy", "adj_out", "pending", "end_of_rib", "stale",
                 "stale_timer", "synced")

    def __init__(self, config, session):
        self.config = config
        self.session = session
        self.source = None      # rib.Source of the current established session
        self.policy = None      # rib.ExportPolicy for it
        self.adj_out = {}       # prefix -> PathAttributes last advertised
        self.pending = set()    # prefixes whose advertisement must be re-evaluated
        self.end_of_rib = False     # End-of-RIB still to follow the initial table
        self.stale = None       # rib.Source of a lost session whose routes graceful restart keeps
        self.stale_timer = None     # asyncio.TimerHandle that drops them
        self.synced = False     # the current session sent its End-of-RIB (or will never send one)


def _describe_restart(cap):
    if cap is None:
        return None
    return {"restart_time": cap.restart_time, "restarting": cap.restarting,
            "forwarding": cap.forwarding(AFI_IPV4, SAFI_UNICAST)}


class _SessionEvents:
    """The handler a Session reports to, kept off the Speaker's public surface."""
    __slots__ = ("established", "down", "update", "refresh_requested", "state_changed")

    def __init__(self, speaker):
        self.established = speaker._on_established
        self.down = speaker._on_down
        self.update = speaker._on_update
        self.refresh_requested = speaker._on_refresh_request
        self.state_changed = speaker._on_state_change


class Speaker:
    def __init__(self, local_as, router_id, listen_address="0.0.0.0", port=179, cluster_id=None,
                 on_best_change=None, restart_time=120, restarting=False, forwarding=False,
                 clock=time.monotonic):
        """local_as: our AS (1..2^32-1); router_id: our BGP identifier (dotted quad).
        listen_address/port: where peers connect to us (port=None: do not listen,
        port=0: any free port, see .port after start()).
        cluster_id: the route reflector CLUSTER_ID (default: router_id).
        on_best_change: optional first subscriber, see subscribe().
        restart_time: the graceful restart time we advertise (0..4095 s), None: no
        graceful restart at all (no capability; peers' routes go with their sessions).
        restarting, forwarding: the R bit, and the F bit for IPv4 unicast, of our
        first OPEN to each peer (see the module docstring).
        clock: monotonic seconds (for the sessions' idle hold and warnings)."""
        if not 1 <= int(local_as) <= 0xFFFFFFFF:
            raise ValueError("AS %r out of range" % local_as)
        ip_to_bytes(router_id)
        if cluster_id is not None:
            ip_to_bytes(cluster_id)
        self.restart_capability = None if restart_time is None else GracefulRestart(
            int(restart_time), bool(restarting), ((AFI_IPV4, SAFI_UNICAST, bool(forwarding)),))
        self.clock = clock
        self.local_as = int(local_as)
        self.router_id = router_id
        self.cluster_id = cluster_id
        self.listen_address = listen_address
        self.port = port
        self.rib = Rib()
        self._local = local_source(router_id, self.local_as)
        self._peers = {}                # address -> _Peer (the loop's)
        # address -> PeerConfig as the callers see it: add_peer/remove_peer update it at once, in
        # their own thread, while the loop applies them later; so a caller that adds a peer and
        # asks peers() again before the loop ran still sees it (and cannot add it twice)
        self._configs = {}
        self._configs_lock = threading.Lock()
        self._retiring = {}             # Session -> _Peer removed but not yet closed
        self._subscribers = []
        self._session_subscribers = []
        self._eor_subscribers = []
        if on_best_change is not None:
            self._subscribers.append(on_best_change)
        self._loop = None
        self._server = None
        self._listen_sock = None
        self._flush_scheduled = False
        self._encoded = {}              # (PathAttributes, four_octet) -> bytes, for one flush
        self._thread = None
        self._stop_graceful = False

    # ---- life cycle ----------------------------------------------------------------

    async def start(self):
        """Open the listening socket and start every configured session."""
        self._loop = asyncio.get_running_loop()
        if self.port is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.listen_address, self.port))
                sock.listen(128)
                sock.setblocking(False)
                for peer in self._peers.values():
                    if peer.config.md5_password:
                        set_md5(sock, peer.config.address, peer.config.md5_password)
            except BaseException:
                sock.close()
                raise
            self._listen_sock = sock
            self.port = sock.getsockname()[1]
            self._server = await asyncio.start_server(self._accepted, sock=sock)
        for peer in self._peers.values():
            peer.session.start()
        log.info("BGP speaker AS %d router id %s %s", self.local_as, self.router_id,
                 "listening on %s:%d" % (self.listen_address, self.port) if self._server else "not listening")

    async def stop(self, graceful=False):
        """Cease every session (administrative shutdown) and stop listening.

        graceful=True: close the sessions without a NOTIFICATION instead, so
        that peers doing graceful restart keep our routes until we are back."""
        if self._server is not None:
            self._server.close()
            self._server = None
        await asyncio.gather(*(p.session.stop(notify=not graceful) for p in self._peers.values()),
                             return_exceptions=True)
        for peer in self._peers.values():
            if peer.stale_timer is not None:
                peer.stale_timer.cancel()
                peer.stale_timer = None
        if self._listen_sock is not None:
            self._listen_sock.close()
            self._listen_sock = None

    def start_in_thread(self, timeout=10):
        """Run the speaker in its own event loop in a daemon thread (for agents that are not asyncio)."""
        started = threading.Event()
        failure = []

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop(graceful=self._stop_graceful))
            loop.close()

        self._thread = threading.Thread(target=run, name="bgp-speaker", daemon=True)
        self._thread.start()
        started.wait(timeout)
        if failure:
            raise failure[0]

    def stop_thread(self, timeout=10, graceful=False):
        """Stop the loop start_in_thread() runs (and the speaker: stop(graceful))."""
        if self._thread is not None:
            self._stop_graceful = graceful
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._thread = None

    def _accepted(self, reader, writer):
        """A TCP connection on our port: hand it to the session of the peer with that address."""
        peername = writer.get_extra_info("peername")
        peer = self._peers.get(peername[0]) if peername else None
        if peer is None:
            log.info("connection from %s refused: not a configured peer", peername and peername[0])
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer.session.accept(reader, writer)

    def _in_loop(self, func, *args):
        """Run func now if we are in the loop's thread (or there is no loop yet), else hand it over."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return func(*args)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return func(*args)
        loop.call_soon_threadsafe(func, *args)
        return None

    # ---- peers ---------------------------------------------------------------------

    def add_peer(self, config):
        """Configure a peer (PeerConfig); started at once if the speaker runs."""
        if not isinstance(config, PeerConfig):
            raise TypeError("add_peer wants a PeerConfig")
        with self._configs_lock:
            if config.address in self._configs:
                raise ValueError("peer %s is already configured" % config.address)
            self._configs[config.address] = config
        return self._in_loop(self._add_peer, config)

    def _add_peer(self, config):
        peer = _Peer(config, Session(config, self.local_as, self.router_id, _SessionEvents(self),
                                     restart=self.restart_capability, clock=self.clock))
        self._peers[config.address] = peer
        if self._listen_sock is not None and config.md5_password:
            set_md5(self._listen_sock, config.address, config.md5_password)
        if self._loop is not None:
            peer.session.start()

    def remove_peer(self, address):
        """Cease the session (peer de-configured) and forget the peer; its routes are withdrawn.

        In the loop's thread this returns an awaitable that finishes when the
        session is closed."""
        with self._configs_lock:
            if self._configs.pop(address, None) is None:
                raise KeyError("no peer %s" % address)
        return self._in_loop(self._remove_peer, address)

    def _remove_peer(self, address):
        peer = self._peers.pop(address, None)
        if peer is None:
            return None
        if self._listen_sock is not None and peer.config.md5_password:
            set_md5(self._listen_sock, address, None)
        if self._loop is None:
            return None
        self._retiring[peer.session] = peer
        peer.pending = set()
        self._drop_stale(peer, "the peer is de-configured")

        async def retire():
            try:
                await peer.session.stop(CEASE_PEER_DECONFIGURED)
            finally:
                self._retiring.pop(peer.session, None)
        return self._loop.create_task(retire())

    def peers(self):
        """[PeerConfig] configured (by the add_peer and remove_peer calls made so far)."""
        with self._configs_lock:
            return list(self._configs.values())

    def peer_status(self):
        """One dict per peer: address, state, remote_as, router_id, rr_client, since (epoch
        seconds, when Established), flaps, last_error, received, advertised, stale (prefix
        counts), synced (see synced()), graceful_restart (the peer's capability of the
        current session: restart_time, restarting, forwarding; None)."""
        out = []
        for address, peer in self._peers.items():
            s = peer.session
            up = s.state == ESTABLISHED
            out.append({
                "address": address, "state": s.state, "remote_as": peer.config.remote_as,
                "router_id": s.peer_open.router_id if up else None, "rr_client": peer.config.rr_client,
                "since": s.established_at if up else None, "flaps": s.flaps, "last_error": s.last_error,
                "received": self.rib.prefix_count(peer.source) if up and peer.source else 0,
                "advertised": len(peer.adj_out),
                "stale": self.rib.prefix_count(peer.stale) if peer.stale is not None else 0,
                "synced": up and peer.synced,
                "graceful_restart": _describe_restart(s.peer_open.graceful_restart) if up else None,
            })
        return out

    def synced(self, address):
        """Whether the peer's current session is established and has sent its whole table: its
        End-of-RIB arrived, or it advertised no graceful restart (which promises one)."""
        peer = self._peers.get(address)
        return peer is not None and peer.session.state == ESTABLISHED and peer.synced

    def state(self, address):
        return self._peers[address].session.state

    def established_count(self):
        return sum(1 for p in self._peers.values() if p.session.state == ESTABLISHED)

    # ---- our own routes ------------------------------------------------------------

    def announce(self, prefix, next_hop=None, **attrs):
        """Originate `prefix` ("10.65.3.0/26"). next_hop None: our address on each session.
        attrs: origin, med, local_pref, as_path (list of AS numbers), atomic_aggregate,
        aggregator ((asn, address)). Announcing again replaces the previous attributes."""
        unknown = set(attrs) - _ANNOUNCE_ATTRS
        if unknown:
            raise TypeError("unknown route attributes: %s" % ", ".join(sorted(unknown)))
        prefix = normalize_prefix(prefix)
        if next_hop is not None:
            ip_to_bytes(next_hop)
        path = attrs.pop("as_path", None)
        attributes = PathAttributes(origin=attrs.pop("origin", ORIGIN_IGP), next_hop=next_hop,
                                    as_path=((AS_SEQUENCE, tuple(path)),) if path else (), **attrs)
        return self._in_loop(self._update_local, Route(prefix, attributes, self._local))

    def withdraw(self, prefix):
        """Stop originating `prefix` (no-op if we did not)."""
        return self._in_loop(self._withdraw_local, normalize_prefix(prefix))

    def _update_local(self, route):
        self._propagate([self.rib.update(route)])

    def _withdraw_local(self, prefix):
        self._propagate([self.rib.remove(self._local, prefix)])

    # ---- the Loc-RIB ---------------------------------------------------------------

    def subscribe(self, callback):
        """callback(prefix, route_or_None) on every Loc-RIB best-path change; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def subscribe_end_of_rib(self, callback):
        """callback(address) when a peer's End-of-RIB for IPv4 unicast arrives; returns an unsubscribe function."""
        self._eor_subscribers.append(callback)
        return lambda: self._eor_subscribers.remove(callback) if callback in self._eor_subscribers else None

    def subscribe_sessions(self, callback):
        """callback(address, old_state, new_state, reason) on every session state change."""
        self._session_subscribers.append(callback)
        return lambda: self._session_subscribers.remove(callback) if callback in self._session_subscribers else None

    def best(self, prefix):
        return self.rib.best(normalize_prefix(prefix))

    def best_routes(self):
        """{prefix: Route}: the Loc-RIB now (e.g. for an agent's full resync)."""
        return self.rib.best_routes()

    def adj_rib_in(self, address):
        peer = self._peers.get(address)
        return self.rib.adj_rib_in(peer.source) if peer and peer.source else {}

    def adj_rib_out(self, address):
        """{prefix: PathAttributes} last advertised to the peer."""
        peer = self._peers.get(address)
        return dict(peer.adj_out) if peer else {}

    # ---- what sessions report (through _SessionEvents) ---------------------------------

    def _peer_of(self, session):
        peer = self._peers.get(session.address)
        if peer is not None and peer.session is session:
            return peer
        return self._retiring.get(session)

    def _reflecting_cluster_id(self):
        # CLUSTER_LIST loop detection applies when we reflect (RFC 4456 §8).
        if self.cluster_id is not None:
            return self.cluster_id
        if any(p.config.rr_client for p in self._peers.values()):
            return self.router_id
        return None

    def _on_established(self, session):
        peer = self._peer_of(session)
        if peer is None:
            return
        cfg = peer.config
        peer.source = Source(cfg.address, session.peer_open.router_id, cfg.remote_as, session.ibgp, cfg.rr_client)
        restart = session.peer_open.graceful_restart
        # a capability (any) promises End-of-RIB (RFC 4724 §2); without it the table has no end to wait for
        peer.synced = restart is None
        if peer.stale is not None:
            if not (cfg.graceful_restart and restart is not None and restart.forwarding(AFI_IPV4, SAFI_UNICAST)):
                self._drop_stale(peer, "it came back without keeping its forwarding state (no F bit)")
            else:
                self._arm_stale_timer(peer, cfg.stale_time, "no End-of-RIB within %gs of its return" % cfg.stale_time)
        peer.adj_out = {}
        peer.policy = None      # without IPv4 unicast in common nothing is sent to it
        if session.peer_open.ipv4_unicast:
            peer.policy = ExportPolicy(peer.source, session.ibgp, cfg.rr_client, cfg.remote_as,
                                       session.local_address, cfg.next_hop_self)
            peer.pending = set(self.rib.prefixes())
            # RFC 4724 §2 recommends End-of-RIB after the initial table even without graceful
            # restart; it also wakes BIRD, which otherwise holds its own first UPDATE back until
            # something arrives from us (seconds, with an empty table here).
            peer.end_of_rib = True
            self._schedule_flush()

    def _on_down(self, session, reason, restart=None):
        peer = self._peer_of(session)
        if peer is None:
            return
        source, peer.source, peer.policy = peer.source, None, None
        peer.adj_out = {}
        peer.pending = set()
        peer.synced = False
        if source is None:
            return
        wait = min(restart.restart_time, peer.config.stale_time) if restart is not None else 0
        if peer.stale is not None:
            # lost again before its End-of-RIB: what the interrupted session did not re-announce goes
            self._drop_stale(peer, "it restarted again before its End-of-RIB" if wait else None)
        if not wait or self._peers.get(peer.config.address) is not peer:      # (no restart, or being removed)
            self._propagate(self.rib.remove_source(source))
            return
        peer.stale = source
        log.info("peer %s: graceful restart: keeping its %d routes, stale, for up to %gs", peer.config.address,
                 self.rib.prefix_count(source), wait)
        self._arm_stale_timer(peer, wait, "it did not come back within %gs" % wait)

    def _arm_stale_timer(self, peer, delay, why):
        if peer.stale_timer is not None:
            peer.stale_timer.cancel()
        peer.stale_timer = self._loop.call_later(delay, self._drop_stale, peer, why, peer.stale)

    def _drop_stale(self, peer, why, which=None):
        """Remove the peer's stale routes (all of them: none are wanted any longer)."""
        stale = peer.stale
        if stale is None or (which is not None and which is not stale):
            return
        if peer.stale_timer is not None:
            peer.stale_timer.cancel()
        peer.stale, peer.stale_timer = None, None
        count = self.rib.prefix_count(stale)
        if why and count:
            log.info("peer %s: dropping its %d stale routes: %s", peer.config.address, count, why)
        self._propagate(self.rib.remove_source(stale))

    def _on_end_of_rib(self, peer, family):
        if family != (AFI_IPV4, SAFI_UNICAST):
            return
        peer.synced = True
        if peer.stale is not None:
            self._drop_stale(peer, "not re-announced before its End-of-RIB")
            log.info("peer %s: graceful restart done (End-of-RIB)", peer.config.address)
        for callback in list(self._eor_subscribers):
            try:
                callback(peer.config.address)
            except Exception:
                log.exception("End-of-RIB callback failed")

    def _on_update(self, session, update):
        peer = self._peer_of(session)
        if peer is None or peer.source is None:
            return
        if update.end_of_rib is not None:
            self._on_end_of_rib(peer, update.end_of_rib)
            return
        source = peer.source
        rib = self.rib
        announced = update.announced()
        if announced and not session.ibgp and update.attrs.neighbour_as != peer.config.remote_as:
            # RFC 4271 §6.3: an external peer's path must start with its own AS (checked before
            # anything of the message touches the RIB)
            raise BGPError(UPDATE_ERROR, MALFORMED_AS_PATH,
                           reason="AS_PATH does not start with the peer's AS %d" % peer.config.remote_as)
        changes = [rib.remove(source, prefix) for prefix in update.withdrawn]
        if announced:
            cluster_id = self._reflecting_cluster_id()
            imported = {}
            for prefix, attrs in announced:
                kept = imported.get(attrs, False)
                if kept is False:
                    kept = imported[attrs] = import_attributes(attrs, source, self.local_as, self.router_id,
                                                               cluster_id)
                if kept is None:
                    changes.append(rib.remove(source, prefix))
                else:
                    changes.append(rib.update(Route(prefix, kept, source)))
        stale = peer.stale
        if stale is not None:
            # the new session's word replaces the stale route; removing it only after the new
            # route is in keeps the prefix from being withdrawn in between
            for prefix in update.withdrawn:
                changes.append(rib.remove(stale, prefix))
            for prefix, _ in announced:
                changes.append(rib.remove(stale, prefix))
        self._propagate(changes)

    def _on_refresh_request(self, session, message):
        peer = self._peer_of(session)
        if peer is None or peer.policy is None or message.subtype != 0 \
                or (message.afi, message.safi) != (AFI_IPV4, SAFI_UNICAST):
            return
        peer.adj_out = {}
        peer.pending = set(self.rib.prefixes())
        self._schedule_flush()

    def _on_state_change(self, session, old, new):
        for callback in list(self._session_subscribers):
            try:
                callback(session.address, old, new, session.last_error)
            except Exception:
                log.exception("session callback failed")

    # ---- propagation ---------------------------------------------------------------

    def _propagate(self, changes):
        changed = False
        for change in changes:
            if change is None:
                continue
            changed = True
            for callback in list(self._subscribers):
                try:
                    callback(change.prefix, change.new)
                except Exception:
                    log.exception("best-path callback failed for %s", change.prefix)
            for peer in self._peers.values():
                if peer.policy is not None:
                    peer.pending.add(change.prefix)
        if changed:
            self._schedule_flush()

    def _schedule_flush(self):
        # One flush per loop iteration: a burst of changes (a full table from a
        # new peer) goes out as few, full UPDATE messages.
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self):
        self._flush_scheduled = False
        exported = {}           # (route, export class, is the peer's own route) -> attributes
        self._encoded = {}
        for peer in self._peers.values():
            if peer.policy is None or not (peer.pending or peer.end_of_rib):
                peer.pending.clear()
                continue
            policy = peer.policy
            klass = policy.cache_key()
            withdrawn, announce = [], {}
            for prefix in sorted(peer.pending):
                best = self.rib.best(prefix)
                new = None
                if best is not None:
                    key = (best, klass, best.source is policy.source)
                    if key in exported:
                        new = exported[key]
                    else:
                        new = exported[key] = export_attributes(best, policy, self.local_as, self.router_id,
                                                                self.cluster_id)
                old = peer.adj_out.get(prefix)
                if new == old:
                    continue
                if new is None:
                    del peer.adj_out[prefix]
                    withdrawn.append(prefix)
                else:
                    peer.adj_out[prefix] = new
                    announce.setdefault(new, []).append(prefix)
            peer.pending.clear()
            messages = pack_updates(withdrawn, announce, peer.session.four_octet, self._encoded) \
                if withdrawn or announce else []
            if peer.end_of_rib:
                peer.end_of_rib = False
                messages.append(END_OF_RIB)
            if messages:
                peer.session.send(b"".join(messages))
        self._encoded = {}
