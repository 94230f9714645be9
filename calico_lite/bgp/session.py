"""BGP sessions: the RFC 4271 finite state machine on asyncio streams.

One `Session` per configured peer. It owns the TCP connections to that peer
(normally one; two while a connection collision is being resolved, §6.8) and
reports to a handler (the speaker) when the session becomes Established,
receives an UPDATE or ROUTE-REFRESH, and goes down.

States: Idle (stopped), Connect (our TCP connect in progress), Active (waiting:
for the peer to connect, or for the ConnectRetry timer), OpenSent,
OpenConfirm, Established; the session shows the most advanced state of its
connections. Timers: ConnectRetry (with the RFC's 0.75-1.0 jitter), hold
(the smaller of both proposals, 0 = none, expiry sends code 4) and keepalive
(hold / 3 unless configured lower). Every protocol error sends the
NOTIFICATION that messages.BGPError carries, then the connection is closed
gracefully (FIN after the NOTIFICATION, not an RST that could discard it).

Idle hold (RFC 4271's DampPeerOscillations, GoBGP's IdleHoldTimeAfterReset,
BIRD's error wait time): after the session goes down, or a connection fails
with a NOTIFICATION before reaching Established, no new connection is opened
for `idle_hold_time` seconds, doubling with every further failure up to
`idle_hold_max`, and starting over once a session has stayed up for
`idle_hold_stable` seconds. (A failed TCP connect is no such failure: it
retries after ConnectRetry.) Connections the peer opens are still accepted
while we hold: the peer's own timers pace those, and a restarting peer must
find us listening. Such failures before Established are logged as a warning
once per WARN_INTERVAL per peer (then "N more like this"), not once per try.

Graceful restart (RFC 4724): with `graceful_restart` on, our OPEN carries the
capability the speaker gives (`restart`: restart time, R and F bits). When an
established session whose peer advertised the capability for IPv4 unicast
ends by the loss of its TCP connection, its hold timer, or a new OPEN from
the peer (which then replaces it), the handler's down() is told so (its
`restart` argument is the peer's capability) and may keep the peer's routes
as stale; a NOTIFICATION either way ends it the ordinary way (routes go).
"""
import asyncio
import dataclasses
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass

from calico_lite.bgp.messages import (
    AFI_IPV4,
    CEASE,
    CEASE_ADMIN_SHUTDOWN,
    CEASE_COLLISION,
    FSM_ERROR,
    FSM_IN_ESTABLISHED,
    FSM_IN_OPENCONFIRM,
    FSM_IN_OPENSENT,
    HEADER_LEN,
    HOLD_TIMER_EXPIRED,
    KEEPALIVE,
    KEEPALIVE_BYTES,
    NOTIFICATION,
    OPEN,
    ROUTE_REFRESH,
    SAFI_UNICAST,
    UPDATE,
    BGPError,
    Open,
    Update,
    check_open,
    decode_body,
    decode_open,
    decode_update,
    ip_key,
    ip_to_bytes,
    parse_header,
)

log = logging.getLogger("calico_lite.bgp")

IDLE, CONNECT, ACTIVE = "Idle", "Connect", "Active"
OPENSENT, OPENCONFIRM, ESTABLISHED = "OpenSent", "OpenConfirm", "Established"
_RANK = {IDLE: 0, ACTIVE: 1, CONNECT: 1, OPENSENT: 2, OPENCONFIRM: 3, ESTABLISHED: 4}

OPEN_HOLD_TIME = 240        # hold timer while waiting for the peer's OPEN ("a large value", RFC 4271 §8)
LINGER = 1.0                # seconds to wait for the peer's FIN after our NOTIFICATION
STOP_LINGER = 0.2           # the same when we are stopping
WARN_INTERVAL = 60.0        # seconds between warnings about one peer's failing connections
REPLACE_WAIT = 1.0          # seconds a new connection waits for the established one it replaces to wind up

# TCP MD5 signatures (RFC 2385): <linux/tcp.h>
TCP_MD5SIG = 14
TCP_MD5SIG_MAXKEYLEN = 80


def set_md5(sock, address, password):
    """Install the RFC 2385 key for `address` on `sock` (password None or "" removes it).

    struct tcp_md5sig { struct __kernel_sockaddr_storage tcpm_addr; (128 bytes)
                        __u8 tcpm_flags; __u8 tcpm_prefixlen; __u16 tcpm_keylen;
                        int tcpm_ifindex; __u8 tcpm_key[80]; }
    On a listening socket the key covers connections from that address, and
    accepted sockets inherit it.
    """
    key = (password or "").encode()
    if len(key) > TCP_MD5SIG_MAXKEYLEN:
        raise ValueError("TCP MD5 password longer than %d bytes" % TCP_MD5SIG_MAXKEYLEN)
    sockaddr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + ip_to_bytes(address)
    value = (sockaddr.ljust(128, b"\0") + struct.pack("=BBHi", 0, 0, len(key), 0)
             + key.ljust(TCP_MD5SIG_MAXKEYLEN, b"\0"))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, value)


@dataclass
class PeerConfig:
    """One neighbour.

    address, remote_as: who the peer is (iBGP when remote_as is ours).
    passive: never connect out, only accept the peer's connection.
    rr_client: the peer is a route-reflector client of ours (RFC 4456).
    md5_password: TCP MD5 signature key (RFC 2385), on both listening and connecting sockets.
    hold_time: proposed hold time, 0 or >= 3 seconds; keepalive defaults to a third of the negotiated one.
    local_address: source address for our connections (and so the default next hop towards this peer).
    next_hop_self: None = automatic (our address for our own routes and towards eBGP peers),
                   True = always our address (not for reflected routes), False = keep next hops towards eBGP too.
    port: the peer's TCP port.  connect_retry: seconds between connection attempts.
    treat_as_withdraw: handle UPDATE errors RFC 7606 allows it for by withdrawing the
                   message's prefixes instead of resetting the session (default off: RFC 4271).
    graceful_restart: advertise the Graceful Restart capability (RFC 4724) to this peer and
                   keep its routes, marked stale, when it restarts (if it advertises it too).
    stale_time:    upper bound, seconds, on keeping the peer's stale routes: while it is away
                   (at most its own restart time) and again once it is back, until its End-of-RIB.
    idle_hold_time, idle_hold_max, idle_hold_stable: the wait after a failure (see the
                   module docstring), its cap, and how long a session must stay up for the
                   next failure to start from idle_hold_time again.
    """
    address: str
    remote_as: int
    passive: bool = False
    rr_client: bool = False
    md5_password: str | None = None
    hold_time: int = 90
    local_address: str | None = None
    next_hop_self: bool | None = None
    port: int = 179
    connect_retry: float = 5.0
    keepalive: float | None = None
    treat_as_withdraw: bool = False
    graceful_restart: bool = True
    stale_time: float = 360.0
    idle_hold_time: float = 1.0
    idle_hold_max: float = 60.0
    idle_hold_stable: float = 60.0

    def __post_init__(self):
        ip_to_bytes(self.address)
        if self.local_address is not None:
            ip_to_bytes(self.local_address)
        if not 1 <= int(self.remote_as) <= 0xFFFFFFFF:
            raise ValueError("remote AS %r out of range" % self.remote_as)
        if self.hold_time != 0 and not 3 <= self.hold_time <= 65535:
            raise ValueError("hold time must be 0 or 3..65535 seconds, not %r" % self.hold_time)
        if self.md5_password is not None and len(self.md5_password.encode()) > TCP_MD5SIG_MAXKEYLEN:
            raise ValueError("TCP MD5 password longer than %d bytes" % TCP_MD5SIG_MAXKEYLEN)
        if self.connect_retry <= 0:
            raise ValueError("connect_retry must be positive")
        if self.stale_time < 0:
            raise ValueError("stale_time must not be negative")
        if not 0 <= self.idle_hold_time <= self.idle_hold_max or self.idle_hold_stable < 0:
            raise ValueError("idle hold: need 0 <= idle_hold_time <= idle_hold_max and idle_hold_stable >= 0")


class IdleHold:
    """The wait before reconnecting after failures, as plain arithmetic on a clock's readings.

    failed(now, up_since, jitter) records a failure (up_since: when the session
    that just went down had come up, None for an attempt that never got there)
    and returns the new wait: `initial` after a success that lasted `stable`
    seconds (or at first), else twice the previous one, at most `maximum`; the
    wait imposed is that times `jitter` (RFC 4271 §10 jitters timers by 0.75-1).
    remaining(now) is what is left of it.
    """
    __slots__ = ("initial", "maximum", "stable", "current", "until")

    def __init__(self, initial, maximum, stable):
        self.initial, self.maximum, self.stable = initial, maximum, stable
        self.current = 0.0          # the last wait imposed (0: no failure since the last stable session)
        self.until = None           # clock reading before which we do not connect

    def failed(self, now, up_since=None, jitter=1.0):
        if up_since is not None and now - up_since >= self.stable:
            self.current = 0.0
        self.current = min(self.maximum, self.current * 2 if self.current else self.initial)
        wait = self.current * jitter
        self.until = now + wait
        return wait

    def remaining(self, now):
        return 0.0 if self.until is None else max(0.0, self.until - now)


class _PeerNotified(Exception):
    """The peer sent a NOTIFICATION: the connection ends, nothing is sent back."""

    def __init__(self, notification):
        self.notification = notification
        super().__init__(notification.describe())


class _Connection:
    """One TCP connection to the peer and where its own FSM stands."""
    __slots__ = ("reader", "writer", "outgoing", "state", "peer_open", "hold", "keepalive",
                 "four_octet", "task", "abort_reason", "abort_silently", "local_address")

    def __init__(self, reader, writer, outgoing):
        self.reader, self.writer, self.outgoing = reader, writer, outgoing
        self.state = OPENSENT
        self.peer_open = None
        self.hold = OPEN_HOLD_TIME
        self.keepalive = None
        self.four_octet = False
        self.task = None
        self.abort_reason = None
        self.abort_silently = False     # aborted without a NOTIFICATION (replaced, or a graceful stop)
        sockname = writer.get_extra_info("sockname")
        self.local_address = sockname[0] if sockname else None

    def send(self, data):
        if not self.writer.is_closing():
            self.writer.write(data)

    async def read(self, timeout):
        """(type, body) of the next message; TimeoutError if none arrives within `timeout` (None: wait)."""
        async with asyncio.timeout(timeout):
            header = await self.reader.readexactly(HEADER_LEN)
            length, msg_type = parse_header(header)
            body = await self.reader.readexactly(length - HEADER_LEN) if length > HEADER_LEN else b""
        return msg_type, body


class Session:
    """The FSM for one peer. `handler` gets:
        established(session), down(session, reason, restart), update(session, Update),
        refresh_requested(session, RouteRefresh), state_changed(session, old, new)
    update() may raise BGPError to reset the session with that NOTIFICATION.
    down()'s `restart` is the peer's GracefulRestart capability when the session
    ended in a way RFC 4724 lets the routes outlive (see the module docstring),
    else None.

    restart: the GracefulRestart capability to advertise (None: none); once a
    session with this peer has been established, later OPENs clear the R bit
    and set the F bits (this process went on running: nothing was lost).
    clock: monotonic seconds, for the idle hold and the rate of warnings.
    """

    def __init__(self, config, local_as, router_id, handler, restart=None, clock=time.monotonic):
        self.config = config
        self.local_as = local_as
        self.router_id = router_id
        self.handler = handler
        self.restart = restart
        self.clock = clock
        self.state = IDLE
        self.ibgp = config.remote_as == local_as
        self.established_at = None      # time.time() the session last came up
        self.flaps = 0                  # times it left Established
        self.last_error = None          # why it last went down (text)
        self.idle_hold = IdleHold(config.idle_hold_time, config.idle_hold_max, config.idle_hold_stable)
        self._up_since = None           # clock() when the session last came up
        self._ever_established = False
        self._holding = False           # waiting out the idle hold
        self._warned_at = None          # clock() of the last warning about a failed attempt
        self._warned_reason = None
        self._suppressed = 0            # failures not warned about since then
        self._conns = []
        self._established = None
        self._connect_task = None
        self._connecting = False
        self._running = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._background = set()

    def __repr__(self):
        return "<Session %s %s>" % (self.config.address, self.state)

    @property
    def address(self):
        return self.config.address

    # -- what the established connection negotiated --
    @property
    def peer_open(self):
        return self._established.peer_open if self._established else None

    @property
    def four_octet(self):
        return self._established.four_octet if self._established else False

    @property
    def local_address(self):
        return self._established.local_address if self._established else None

    @property
    def hold_time(self):
        return self._established.hold if self._established else None

    # -- control --
    def start(self):
        if self._running:
            return
        self._running = True
        if not self.config.passive:
            self._connect_task = asyncio.get_running_loop().create_task(self._connect_loop())
        self._refresh_state()

    async def stop(self, subcode=CEASE_ADMIN_SHUTDOWN, data=b"", notify=True):
        """Send Cease (subcode) on every connection, close them, go Idle.

        notify=False closes them without a NOTIFICATION (FIN only): to the peer
        that is the loss of the connection, which graceful restart lets our
        routes outlive (RFC 4724), where a Cease would make it drop them."""
        self._running = False
        conns = list(self._conns)
        for conn in conns:
            self._abort(conn, BGPError(CEASE, subcode, data, reason="" if notify else "stopping for a restart"),
                        silently=not notify)
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
            self._connect_task = None
        await asyncio.gather(*(c.task for c in conns if c.task is not None), return_exceptions=True)
        if self._background:
            # Peers normally answer our Cease with a FIN at once; do not wait out LINGER for those that do not.
            _, pending = await asyncio.wait(list(self._background), timeout=STOP_LINGER)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._refresh_state()

    def accept(self, reader, writer):
        """A connection the peer opened (the speaker's listener matched its address)."""
        if not self._running:
            writer.close()
            return
        self._spawn(_Connection(reader, writer, outgoing=False))

    def send(self, data):
        """Bytes for the established connection (UPDATEs); dropped if there is none."""
        if self._established is not None:
            self._established.send(data)

    # -- connecting --
    async def _connect_loop(self):
        delay = random.uniform(0, 0.05)     # spread simultaneous starts a little
        while True:
            await asyncio.sleep(delay)
            delay = self.config.connect_retry * random.uniform(0.75, 1.0)
            await self._no_connections()
            hold = self.idle_hold.remaining(self.clock())
            if hold > 0:
                log.debug("peer %s: idle hold: next connection in %.1fs", self.address, hold)
                self._holding = True
                self._refresh_state()
                try:
                    await asyncio.sleep(hold)
                finally:
                    self._holding = False
                await self._no_connections()
            self._connecting = True
            self._refresh_state()
            try:
                reader, writer = await asyncio.wait_for(self._open_connection(), self.config.connect_retry)
            except (OSError, asyncio.TimeoutError) as e:
                log.debug("peer %s: connect failed: %s", self.address, e)
                continue
            finally:
                self._connecting = False
                self._refresh_state()
            conn = self._spawn(_Connection(reader, writer, outgoing=True))
            await asyncio.wait([conn.task])     # not gather: cancelling us must not cancel the connection

    async def _no_connections(self):
        while self._conns:
            # The peer's own connection is being served: no second one unless it ends.
            self._idle.clear()
            await self._idle.wait()

    async def _open_connection(self):
        cfg = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if cfg.md5_password:
                set_md5(sock, cfg.address, cfg.md5_password)
            if cfg.local_address:
                sock.bind((cfg.local_address, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().sock_connect(sock, (cfg.address, cfg.port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    def _spawn(self, conn):
        self._conns.append(conn)
        self._idle.clear()
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._refresh_state()
        return conn

    # -- the FSM of one connection --
    def _open_message(self):
        return Open(asn=self.local_as, hold_time=self.config.hold_time, router_id=self.router_id,
                    graceful_restart=self._restart_capability())

    def _restart_capability(self):
        cap = self.restart
        if cap is None or not self.config.graceful_restart:
            return None
        if self._ever_established:
            cap = dataclasses.replace(cap, restarting=False, families=tuple((a, s, True) for a, s, _ in cap.families))
        return cap

    def _peer_restarts(self, conn):
        """The peer's GracefulRestart capability if RFC 4724 applies to `conn`'s session, else None."""
        if not self.config.graceful_restart or self._restart_capability() is None or conn.peer_open is None:
            return None
        cap = conn.peer_open.graceful_restart
        return cap if cap is not None and cap.covers(AFI_IPV4, SAFI_UNICAST) else None

    async def _serve(self, conn):
        reason = None
        keepalive_task = None
        notify = received = None
        restartable = False     # the way it ended lets graceful restart keep the routes
        try:
            conn.send(self._open_message().encode())
            msg_type, body = await conn.read(OPEN_HOLD_TIME)
            if msg_type == NOTIFICATION:
                raise _PeerNotified(decode_body(msg_type, body))
            if msg_type != OPEN:
                raise BGPError(FSM_ERROR, FSM_IN_OPENSENT, reason="expected OPEN")
            peer_open = decode_open(body)
            check_open(peer_open, self.config.remote_as, self.router_id, self.ibgp)
            replaced = self._resolve_collision(conn, peer_open)
            if replaced is not None and replaced.task is not None:
                # its routes must be marked stale before this session's arrive
                await asyncio.wait([replaced.task], timeout=REPLACE_WAIT)
            conn.peer_open = peer_open
            conn.four_octet = peer_open.four_octet_as
            conn.hold = min(self.config.hold_time, peer_open.hold_time)
            if conn.hold:
                conn.keepalive = min(self.config.keepalive or conn.hold / 3, conn.hold / 3)
                keepalive_task = asyncio.get_running_loop().create_task(self._keepalives(conn))
            conn.send(KEEPALIVE_BYTES)
            conn.state = OPENCONFIRM
            self._refresh_state()
            msg_type, body = await conn.read(conn.hold or OPEN_HOLD_TIME)
            if msg_type == NOTIFICATION:
                raise _PeerNotified(decode_body(msg_type, body))
            if msg_type != KEEPALIVE:
                raise BGPError(FSM_ERROR, FSM_IN_OPENCONFIRM, reason="expected KEEPALIVE")
            conn.state = ESTABLISHED
            self._established = conn
            self.established_at = time.time()
            self._up_since = self.clock()
            self._ever_established = True
            self._refresh_state()
            log.info("peer %s: Established (AS %d, router id %s, hold %ds%s)", self.address, peer_open.asn,
                     peer_open.router_id, conn.hold, "" if conn.four_octet else ", 2-octet AS")
            self.handler.established(self)
            await self._established_loop(conn)
        except BGPError as e:
            notify, reason = e, "sent NOTIFICATION: " + e.describe()
        except asyncio.CancelledError:
            if conn.abort_reason is None:
                raise
            if conn.abort_silently:
                reason, restartable = "closed without NOTIFICATION: " + conn.abort_reason.describe(), True
            else:
                notify = conn.abort_reason
                reason = "closed: " + notify.describe()
        except TimeoutError:
            notify = BGPError(HOLD_TIMER_EXPIRED)
            reason = "hold timer expired" if conn.state != OPENSENT else "no OPEN within %ds" % OPEN_HOLD_TIME
            restartable = True
        except _PeerNotified as e:
            received = e.notification
            reason = "received NOTIFICATION: " + received.describe()
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            reason = "connection lost" + (" (%s)" % e if isinstance(e, OSError) else "")
            restartable = True
        except Exception as e:        # a bug must cost this session, not the speaker
            log.exception("peer %s: internal error", self.address)
            notify, reason = BGPError(CEASE, 0, reason="internal error"), "internal error: %r" % e
        finally:
            if keepalive_task is not None:
                keepalive_task.cancel()
            self._finish(conn, notify, reason, received, restartable)

    async def _established_loop(self, conn):
        hold = conn.hold or None
        while True:
            msg_type, body = await conn.read(hold)
            if msg_type == UPDATE:
                try:
                    update = decode_update(body, conn.four_octet)
                except BGPError as e:
                    if e.withdraw is None or not self.config.treat_as_withdraw:
                        raise
                    log.warning("peer %s: %s: treating as withdraw of %d prefixes", self.address,
                                e.describe(), len(e.withdraw))
                    update = Update(withdrawn=e.withdraw)
                self.handler.update(self, update)
            elif msg_type == KEEPALIVE:
                pass
            elif msg_type == ROUTE_REFRESH:
                self.handler.refresh_requested(self, decode_body(msg_type, body))
            elif msg_type == NOTIFICATION:
                raise _PeerNotified(decode_body(msg_type, body))
            else:
                raise BGPError(FSM_ERROR, FSM_IN_ESTABLISHED, reason="unexpected OPEN")

    async def _keepalives(self, conn):
        while True:
            await asyncio.sleep(conn.keepalive)
            conn.send(KEEPALIVE_BYTES)

    def _resolve_collision(self, conn, peer_open):
        """Keep one connection per peer (RFC 4271 §6.8): the one opened by the higher BGP identifier.

        An OPEN with the Graceful Restart capability while a session is
        established means the peer restarted (RFC 4724 §4.2): the old session
        is closed (no NOTIFICATION: its TCP connection is presumably dead) as a
        restart, and this connection carries on. Returns that old connection, if any."""
        replaced = None
        for other in list(self._conns):
            if other is conn:
                continue
            if other.state == ESTABLISHED:
                if peer_open.graceful_restart is not None and self._restart_capability() is not None:
                    log.info("peer %s: new OPEN while established: the peer restarted", self.address)
                    self._abort(other, BGPError(CEASE, CEASE_COLLISION, reason="the peer opened a new session"),
                                silently=True)
                    replaced = other
                    continue
                raise BGPError(CEASE, CEASE_COLLISION, reason="a session is already established")
            if other.outgoing == conn.outgoing:
                loser = other           # the peer opened a second connection: the older one is stale
            else:
                ours, theirs = ip_key(self.router_id), ip_key(peer_open.router_id)
                if ours == theirs:      # possible between ASes (RFC 6286 §2.3): the larger AS decides
                    ours, theirs = self.local_as, peer_open.asn
                keep_outgoing = ours > theirs
                loser = conn if conn.outgoing != keep_outgoing else other
            if loser is conn:
                raise BGPError(CEASE, CEASE_COLLISION, reason="connection collision")
            self._abort(other, BGPError(CEASE, CEASE_COLLISION, reason="connection collision"))
        return replaced

    def _abort(self, conn, error, silently=False):
        """End another connection's task; it sends `error` as its NOTIFICATION on the way out
        (or, silently, only closes the connection)."""
        if conn.task is not None and not conn.task.done() and conn.abort_reason is None:
            conn.abort_reason = error
            conn.abort_silently = silently
            conn.task.cancel()

    def _finish(self, conn, notify, reason, received=None, restartable=False):
        """Wrap up a connection: `notify` is the BGPError to send, `received` the peer's Notification."""
        was_established = conn is self._established
        if notify is not None:
            conn.send(notify.notification().encode())
        self._close_gracefully(conn)
        if conn in self._conns:
            self._conns.remove(conn)
        if not self._conns:
            self._idle.set()
        now = self.clock()
        if was_established:
            self._established = None
            self.flaps += 1
            self.last_error = reason
            restart = self._peer_restarts(conn) if restartable and self._running else None
            wait = self.idle_hold.failed(now, self._up_since, random.uniform(0.75, 1.0)) if self._running else 0
            log.info("peer %s: session down: %s%s", self.address, reason,
                     "; reconnecting in %.1fs at the earliest" % wait if wait and not self.config.passive else "")
            conn.state = IDLE
            self._refresh_state()
            self.handler.down(self, reason, restart)
        else:
            if reason:
                # A protocol error before Established (e.g. a wrong AS) is worth an operator's eye;
                # collisions and failed connection attempts are routine.
                code = notify.code if notify is not None else received.code if received is not None else CEASE
                if code == CEASE:
                    log.debug("peer %s: connection ended before Established: %s", self.address, reason)
                else:
                    self.last_error = reason
                    self._failed_attempt(now, reason)
            conn.state = IDLE
            self._refresh_state()

    def _failed_attempt(self, now, reason):
        """Back off (idle hold) and warn, at most once per WARN_INTERVAL for the same reason."""
        wait = self.idle_hold.failed(now, None, random.uniform(0.75, 1.0))
        if self._warned_at is not None and now - self._warned_at < WARN_INTERVAL and reason == self._warned_reason:
            self._suppressed += 1
            log.debug("peer %s: connection ended before Established: %s", self.address, reason)
            return
        more = ""
        if self._suppressed:
            more = " (%d more like this in the last %.0fs)" % (self._suppressed, now - self._warned_at)
        log.warning("peer %s: connection ended before Established: %s%s; next attempt in %.1fs at the earliest",
                    self.address, reason, more, wait)
        self._warned_at, self._warned_reason, self._suppressed = now, reason, 0

    def _close_gracefully(self, conn):
        """FIN after what we sent, read until the peer's FIN (or LINGER), then close.

        Closing at once with unread input would make the kernel send an RST,
        which may discard a NOTIFICATION still in flight.
        """
        writer = conn.writer
        if writer.is_closing():
            return
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._drain_and_close(conn.reader, writer))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _drain_and_close(reader, writer):
        try:
            async with asyncio.timeout(LINGER):
                while await reader.read(65536):
                    pass
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _refresh_state(self):
        if self._conns:
            new = max((c.state for c in self._conns), key=_RANK.__getitem__)
        elif not self._running:
            new = IDLE
        elif self._connecting:
            new = CONNECT
        elif self._holding:
            new = IDLE
        else:
            new = ACTIVE
        old, self.state = self.state, new
        if old != new:
            log.debug("peer %s: %s -> %s", self.address, old, new)
            self.handler.state_changed(self, old, new)

