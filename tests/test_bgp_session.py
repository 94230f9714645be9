"""BGP sessions and speakers over loopback TCP, in one asyncio loop per test (no root).

Speakers bind distinct 127.0.0.x addresses, since a peer is recognised by its
address. A "raw peer" is a scripted BGP speaker on a bare stream, to send what
a real one never would and to watch exactly what comes back.
"""
import asyncio
import functools
import socket
import struct
import threading
import time

import pytest

from calico_lite.bgp import messages as m
from calico_lite.bgp.messages import PathAttributes
from calico_lite.bgp.session import ESTABLISHED, PeerConfig, set_md5
from calico_lite.bgp.speaker import Speaker

AS = 64512
P1, P2, P3, P4 = "10.65.1.0/26", "10.65.2.0/26", "10.65.3.0/26", "10.65.4.0/26"


def run_async(timeout=20):
    """Run the test coroutine in a fresh loop, failing it after `timeout` seconds."""
    def wrap(func):
        @functools.wraps(func)
        def runner(*args, **kwargs):
            asyncio.run(asyncio.wait_for(func(*args, **kwargs), timeout))
        return runner
    return wrap


async def eventually(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        await asyncio.sleep(0.01)


class Node:
    """A Speaker on 127.0.0.<n> that records its Loc-RIB changes."""

    def __init__(self, n, asn=AS, cluster_id=None):
        self.address = "127.0.0.%d" % n
        self.router_id = "10.0.0.%d" % n
        self.speaker = Speaker(asn, self.router_id, listen_address=self.address, port=0, cluster_id=cluster_id)
        self.best = {}
        self.speaker.subscribe(self._changed)

    def _changed(self, prefix, route):
        if route is None:
            self.best.pop(prefix, None)
        else:
            self.best[prefix] = route

    def peer_config(self, other, **kw):
        """How this node should configure `other` (a Node or RawPeer) as a peer."""
        kw.setdefault("remote_as", getattr(other, "asn", AS))
        kw.setdefault("hold_time", 9)
        kw.setdefault("connect_retry", 0.3)
        return PeerConfig(other.address, port=other.port, local_address=self.address, **kw)

    @property
    def port(self):
        return self.speaker.port

    def established(self, other):
        return self.speaker.state(other.address) == ESTABLISHED


async def nodes(*specs):
    out = []
    for spec in specs:
        node = Node(*spec) if isinstance(spec, tuple) else Node(spec)
        await node.speaker.start()
        out.append(node)
    return out


def connect(a, b, a_kw=None, b_kw=None):
    """Configure a and b as peers of each other."""
    a.speaker.add_peer(a.peer_config(b, **(a_kw or {})))
    b.speaker.add_peer(b.peer_config(a, **(b_kw or {})))


async def stop_all(*ns):
    await asyncio.gather(*(n.speaker.stop() for n in ns))


class RawPeer:
    """A hand-driven peer at 127.0.0.<n>."""

    def __init__(self, n, asn=AS, router_id=None):
        self.address = "127.0.0.%d" % n
        self.asn = asn
        self.router_id = router_id or "10.0.0.%d" % n
        self.port = 179         # only used when a speaker would connect to us (it is passive towards us)
        self.reader = self.writer = None
        self.four_octet = True

    async def connect(self, node):
        sock = socket.socket()
        sock.bind((self.address, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (node.address, node.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        return self

    def send(self, data):
        self.writer.write(data)

    async def read(self, timeout=5.0):
        """The next message, decoded; None at EOF."""
        try:
            async with asyncio.timeout(timeout):
                header = await self.reader.readexactly(19)
                length, msg_type = m.parse_header(header)
                body = await self.reader.readexactly(length - 19)
        except asyncio.IncompleteReadError:
            return None
        return m.decode_body(msg_type, body, self.four_octet)

    async def read_until(self, kind, timeout=5.0):
        while True:
            msg = await self.read(timeout)
            if msg is None or isinstance(msg, kind):
                return msg

    async def read_announcement(self, timeout=5.0):
        """The next UPDATE that announces something (skipping End-of-RIB and withdrawals)."""
        while True:
            msg = await self.read_until(m.Update, timeout)
            if msg is None or msg.nlri:
                return msg

    def open_message(self, hold=9, four_octet=True, asn=None, graceful_restart=None):
        return m.Open(asn=self.asn if asn is None else asn, hold_time=hold, router_id=self.router_id,
                      four_octet_as=four_octet, graceful_restart=graceful_restart)

    async def establish(self, node, hold=9, four_octet=True, graceful_restart=None):
        """Connect, exchange OPEN and KEEPALIVE; returns the speaker's OPEN."""
        await self.connect(node)
        self.four_octet = four_octet
        self.send(self.open_message(hold, four_octet, graceful_restart=graceful_restart).encode())
        their_open = await self.read()
        assert isinstance(their_open, m.Open), their_open
        self.send(m.KEEPALIVE_BYTES)
        assert isinstance(await self.read(), m.Keepalive)
        await eventually(lambda: node.established(self), what="the speaker to reach Established")
        return their_open

    def announce(self, prefix, **attrs):
        attrs.setdefault("as_path", () if self.asn == AS else ((m.AS_SEQUENCE, (self.asn,)),))
        attrs.setdefault("next_hop", self.address)
        self.send(m.encode_update((), PathAttributes(**attrs), [prefix], self.four_octet))

    async def notification(self, timeout=5.0):
        msg = await self.read_until(m.Notification, timeout)
        assert msg is not None, "connection closed without a NOTIFICATION"
        return msg.code, msg.subcode

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ---- speakers with each other -------------------------------------------------------------

@run_async()
async def test_routes_flow_withdraw_and_go_with_the_session():
    a, b = await nodes(1, 2)
    connect(a, b)
    a.speaker.announce(P1)
    await eventually(lambda: P1 in b.best, what="P1 at b")
    route = b.best[P1]
    assert route.next_hop == a.address and route.peer == a.address and not route.is_local
    assert route.attrs.local_pref == 100 and route.attrs.as_path == ()
    assert b.speaker.adj_rib_in(a.address)[P1] == route
    assert a.speaker.adj_rib_out(b.address)[P1].next_hop == a.address
    assert a.best[P1].is_local
    a.speaker.withdraw(P1)
    await eventually(lambda: P1 not in b.best, what="the withdrawal")
    a.speaker.announce(P1, med=5)
    await eventually(lambda: P1 in b.best and b.best[P1].attrs.med == 5)
    t = time.monotonic()
    await a.speaker.stop()
    await eventually(lambda: P1 not in b.best, timeout=1, what="session loss to withdraw P1")
    assert time.monotonic() - t < 0.5
    assert "Cease" in b.speaker.peer_status()[0]["last_error"] or "cease" in b.speaker.peer_status()[0]["last_error"]
    # the peer comes back (same address, new process): the session and the route return
    a2 = Node(1)
    await a2.speaker.start()
    a2.speaker.add_peer(a2.peer_config(b))
    a2.speaker.announce(P1)
    await eventually(lambda: P1 in b.best, what="P1 after the restart")
    await stop_all(a2, b)


@run_async()
async def test_route_reflection_rfc4456():
    rr, c1, c2, n1, n2 = await nodes(1, 2, 3, 4, 5)
    for client in (c1, c2):
        connect(rr, client, a_kw={"rr_client": True})
    for non_client in (n1, n2):
        connect(rr, non_client)
    for node, prefix in ((c1, P1), (c2, P2), (n1, P3), (n2, P4)):
        node.speaker.announce(prefix)
    await eventually(lambda: set(c1.best) == {P1, P2, P3, P4}, what="c1 to learn everything")
    await eventually(lambda: set(c2.best) == {P1, P2, P3, P4}, what="c2 to learn everything")
    # non-clients get client routes, never each other's
    await eventually(lambda: set(n1.best) == {P1, P2, P3}, what="n1: clients' routes and its own")
    await eventually(lambda: set(n2.best) == {P1, P2, P4}, what="n2: clients' routes and its own")
    await asyncio.sleep(0.2)
    assert P4 not in n1.best and P3 not in n2.best
    r = c1.best[P2]
    assert r.next_hop == c2.address                 # next hop unchanged on reflection
    assert r.attrs.originator_id == c2.router_id and r.attrs.cluster_list == (rr.router_id,)
    r = c2.best[P3]
    assert r.next_hop == n1.address and r.attrs.originator_id == n1.router_id
    r = n1.best[P1]
    assert r.next_hop == c1.address and r.attrs.originator_id == c1.router_id
    # the reflector's own view: client routes with no reflection attributes
    assert rr.best[P1].attrs.originator_id is None and rr.best[P1].peer == c1.address
    # a client that goes away is withdrawn everywhere
    await c2.speaker.stop()
    await eventually(lambda: P2 not in c1.best and P2 not in n1.best and P2 not in n2.best,
                     what="c2's prefix to be withdrawn everywhere")
    await stop_all(rr, c1, n1, n2)


@run_async()
async def test_cluster_id_and_loop_prevention():
    rr, c1, c2 = (await nodes(1, 2, 3))
    rr.speaker.cluster_id = "10.99.0.1"
    for client in (c1, c2):
        connect(rr, client, a_kw={"rr_client": True})
    c1.speaker.announce(P1)
    await eventually(lambda: P1 in c2.best)
    assert c2.best[P1].attrs.cluster_list == ("10.99.0.1",)
    # c1 never takes its own route back (it is not even sent back to it)
    await asyncio.sleep(0.1)
    assert c1.best[P1].is_local and rr.speaker.adj_rib_out(c1.address) == {}
    await stop_all(rr, c1, c2)


@run_async()
async def test_ibgp_split_horizon_without_reflection():
    a, b, c = await nodes(1, 2, 3)
    connect(a, b)
    connect(b, c)
    a.speaker.announce(P1)
    c.speaker.announce(P3)
    await eventually(lambda: {P1, P3} <= set(b.best))
    await asyncio.sleep(0.2)
    assert P1 not in c.best and P3 not in a.best
    await stop_all(a, b, c)


@run_async()
async def test_ebgp_with_four_octet_as():
    a = Node(1, asn=4200000001)
    b = Node(2, asn=65002)
    for n in (a, b):
        await n.speaker.start()
    a.speaker.add_peer(a.peer_config(b, remote_as=65002))
    b.speaker.add_peer(b.peer_config(a, remote_as=4200000001))
    a.speaker.announce(P1, local_pref=300)
    await eventually(lambda: P1 in b.best)
    r = b.best[P1]
    assert r.attrs.as_path == ((m.AS_SEQUENCE, (4200000001,)),) and r.next_hop == a.address
    assert r.attrs.local_pref == 100                    # ours to set on eBGP routes
    # b re-advertises nothing back to a (its AS is on the path), but its own route goes out prepended
    b.speaker.announce(P2)
    await eventually(lambda: P2 in a.best)
    assert a.best[P2].attrs.as_path == ((m.AS_SEQUENCE, (65002,)),)
    assert P1 not in b.speaker.adj_rib_out(a.address)
    await stop_all(a, b)


@run_async()
async def test_connection_collision_keeps_one_session():
    a, b = await nodes(1, 2)
    connect(a, b, {"connect_retry": 0.2}, {"connect_retry": 0.2})
    await eventually(lambda: a.established(b) and b.established(a))
    await asyncio.sleep(0.5)
    assert a.established(b) and b.established(a)
    assert a.speaker.peer_status()[0]["flaps"] == 0 and b.speaker.peer_status()[0]["flaps"] == 0
    await stop_all(a, b)


@run_async()
async def test_md5_signed_sessions():
    try:
        probe = socket.socket()
        set_md5(probe, "127.0.0.2", "secret")
        probe.close()
    except OSError as e:
        pytest.skip("TCP MD5 signatures unavailable: %s" % e)
    a, b, c = await nodes(1, 2, 3)
    connect(a, b, {"md5_password": "s3cret, with comma"}, {"md5_password": "s3cret, with comma", "passive": True})
    await eventually(lambda: a.established(b) and b.established(a), what="the MD5 session")
    # a wrong key: TCP never completes, the session never comes up
    connect(a, c, {"md5_password": "one"}, {"md5_password": "two"})
    await asyncio.sleep(1.0)
    assert not a.established(c) and not c.established(a)
    await stop_all(a, b, c)


@run_async()
async def test_speaker_in_a_thread():
    a, b = Node(1), Node(2)
    got = threading.Event()
    b.speaker.subscribe(lambda prefix, route: got.set() if route is not None else None)
    a.speaker.start_in_thread()
    b.speaker.start_in_thread()
    try:
        # driven from this (non-loop) thread, as a threaded agent would
        a.speaker.add_peer(a.peer_config(b))
        b.speaker.add_peer(b.peer_config(a))
        a.speaker.announce(P1)
        await asyncio.get_running_loop().run_in_executor(None, got.wait, 5)
        assert got.is_set()
    finally:
        a.speaker.stop_thread()
        b.speaker.stop_thread()


def test_peers_seen_from_another_thread_before_the_loop_applies_them():
    """An agent reconciling twice in a row (from its own thread) must not add a peer twice:
    two sessions to one peer fight each other (with graceful restart, BIRD takes each new
    connection for a restart of the old one, forever)."""
    a = Node(1)
    a.speaker.start_in_thread()
    release = threading.Event()
    try:
        a.speaker._loop.call_soon_threadsafe(release.wait, 5)     # the loop is busy: nothing applied yet
        config = a.peer_config(Node(2))
        a.speaker.add_peer(config)
        assert a.speaker.peers() == [config]
        with pytest.raises(ValueError):
            a.speaker.add_peer(config)
        a.speaker.remove_peer(config.address)
        assert a.speaker.peers() == []
        with pytest.raises(KeyError):
            a.speaker.remove_peer(config.address)
        a.speaker.add_peer(config)
        release.set()
        deadline = time.monotonic() + 5
        while len(a.speaker._peers) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(a.speaker._peers) == [config.address]
    finally:
        release.set()
        a.speaker.stop_thread()


# ---- a scripted peer -------------------------------------------------------------------------------

async def speaker_with_raw_peer(raw_kw=None, **peer_kw):
    node, = await nodes(1)
    raw = RawPeer(2, **(raw_kw or {}))
    peer_kw.setdefault("passive", True)
    node.speaker.add_peer(node.peer_config(raw, **peer_kw))
    return node, raw


@run_async()
async def test_negotiated_hold_time_keepalives_and_hold_timer_expiry():
    node, raw = await speaker_with_raw_peer()
    their_open = await raw.establish(node, hold=3)
    assert their_open.hold_time == 9 and their_open.asn == AS and their_open.router_id == node.router_id
    assert node.speaker._peers[raw.address].session.hold_time == 3
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    # now silence: keepalives keep coming every second, then the hold timer fires
    t = time.monotonic()
    keepalives = 0
    while True:
        msg = await raw.read(6)
        if isinstance(msg, m.Keepalive):
            keepalives += 1
        elif isinstance(msg, m.Notification):
            break
    elapsed = time.monotonic() - t
    assert (msg.code, msg.subcode) == (4, 0)
    assert 2.5 < elapsed < 4.5 and keepalives >= 2
    await eventually(lambda: P1 not in node.best, timeout=0.5)
    raw.close()
    await node.speaker.stop()


@run_async()
async def test_hold_time_zero_means_no_keepalives():
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node, hold=0)
    assert node.speaker._peers[raw.address].session.hold_time == 0
    with pytest.raises(TimeoutError):
        await raw.read_until(m.Keepalive, 0.6)
    assert node.established(raw)
    raw.close()
    await node.speaker.stop()


@pytest.mark.parametrize("make, expected", [
    (lambda raw: struct.pack("!16sHB", b"\x00" * 16, 19, 4), (1, 1)),
    (lambda raw: struct.pack("!16sHB", b"\xff" * 16, 19, 9), (1, 3)),
    (lambda raw: struct.pack("!16sHB", b"\xff" * 16, 5000, 1), (1, 2)),
    (lambda raw: m.Open(asn=AS, hold_time=9, router_id="10.0.0.2", version=3).encode(), (2, 1)),
    (lambda raw: raw.open_message(asn=65000).encode(), (2, 2)),
    (lambda raw: raw.open_message(hold=2).encode(), (2, 6)),
    (lambda raw: m.Open(asn=AS, hold_time=9, router_id="0.0.0.0").encode(), (2, 3)),
    (lambda raw: m.Open(asn=AS, hold_time=9, router_id="10.0.0.1").encode(), (2, 3)),    # the speaker's own id
    (lambda raw: m.KEEPALIVE_BYTES, (5, 1)),
])
@run_async()
async def test_open_phase_errors(make, expected):
    node, raw = await speaker_with_raw_peer()
    await raw.connect(node)
    raw.send(make(raw))
    assert await raw.notification() == expected
    assert await raw.read() is None         # and the connection is closed
    assert not node.established(raw)
    await node.speaker.stop()


@run_async()
async def test_unexpected_message_in_openconfirm():
    node, raw = await speaker_with_raw_peer()
    await raw.connect(node)
    raw.send(raw.open_message().encode())
    raw.send(m.encode_update())
    assert await raw.notification() == (5, 2)
    await node.speaker.stop()


@run_async()
async def test_update_error_resets_the_session_and_withdraws_its_routes():
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node)
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    bad_origin = struct.pack("!BBBB", 0x40, m.ORIGIN, 1, 9)
    attrs = bad_origin + PathAttributes(next_hop=raw.address).encode()[4:]
    raw.send(m.encode_update((), None, ["10.65.9.0/26"], encoded_attrs=attrs))
    assert await raw.notification() == (3, 6)
    await eventually(lambda: P1 not in node.best, timeout=1)
    await node.speaker.stop()


@run_async()
async def test_treat_as_withdraw_when_configured():
    node, raw = await speaker_with_raw_peer(treat_as_withdraw=True)
    await raw.establish(node)
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    attrs = struct.pack("!BBBB", 0x40, m.ORIGIN, 1, 9) + PathAttributes(next_hop=raw.address).encode()[4:]
    raw.send(m.encode_update((), None, [P1], encoded_attrs=attrs))
    await eventually(lambda: P1 not in node.best, timeout=1, what="treat-as-withdraw")
    assert node.established(raw)
    await node.speaker.stop()


@run_async()
async def test_ebgp_path_must_start_with_the_peers_as():
    node, raw = await speaker_with_raw_peer(raw_kw={"asn": 65001}, remote_as=65001)
    await raw.establish(node)
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    # a withdrawal of P1 in the same message as the bad path must not be applied either
    bad = PathAttributes(as_path=((m.AS_SEQUENCE, (65002, 65001)),), next_hop=raw.address)
    raw.send(m.encode_update([P1], bad, [P2]))
    assert await raw.notification() == (3, 11)
    assert P2 not in node.best
    await node.speaker.stop()


@run_async()
async def test_two_octet_peer_sees_as_trans_and_as4_path():
    node = Node(1, asn=4200000001)
    await node.speaker.start()
    raw = RawPeer(2, asn=65001)
    node.speaker.add_peer(node.peer_config(raw, remote_as=65001, passive=True))
    their_open = await raw.establish(node, four_octet=False)
    assert their_open.my_as_field == m.AS_TRANS and their_open.asn == 4200000001
    node.speaker.announce(P1)
    update = await raw.read_announcement()
    assert update.attrs.as_path == ((m.AS_SEQUENCE, (4200000001,)),)     # merged back by our decoder
    # the 2-octet peer passes on a path through a 4-octet AS it does not know
    path = PathAttributes(as_path=((m.AS_SEQUENCE, (65001, m.AS_TRANS)),), next_hop=raw.address).encode(False)
    as4 = struct.pack("!BBB", 0xC0, m.AS4_PATH, 6) + struct.pack("!BBI", m.AS_SEQUENCE, 1, 4200000099)
    raw.send(m.encode_update((), None, [P2], four_octet=False, encoded_attrs=path + as4))
    await eventually(lambda: P2 in node.best)
    assert node.best[P2].attrs.as_path == ((m.AS_SEQUENCE, (65001, 4200000099)),)
    await node.speaker.stop()


@run_async()
async def test_a_peer_without_ipv4_unicast_is_sent_nothing():
    node, raw = await speaker_with_raw_peer()
    node.speaker.announce(P1)
    await raw.connect(node)
    raw.send(m.Open(asn=AS, hold_time=9, router_id=raw.router_id, afi_safi=((2, 1),)).encode())   # IPv6 only
    assert isinstance(await raw.read(), m.Open)
    raw.send(m.KEEPALIVE_BYTES)
    assert isinstance(await raw.read(), m.Keepalive)
    await eventually(lambda: node.established(raw))
    with pytest.raises(TimeoutError):
        await raw.read_until(m.Update, 0.3)
    await node.speaker.stop()


@run_async()
async def test_route_refresh_resends_the_table():
    node, raw = await speaker_with_raw_peer()
    node.speaker.announce(P1)
    open_ = await raw.establish(node)
    assert open_.route_refresh
    first = await raw.read_until(m.Update)
    assert first.nlri == (P1,)
    assert await raw.read_until(m.Update) == m.Update(end_of_rib=(1, 1))     # End-of-RIB after the table (RFC 4724)
    raw.send(m.RouteRefresh().encode())
    again = await raw.read_until(m.Update)
    assert again.nlri == (P1,)
    await node.speaker.stop()


@run_async()
async def test_unknown_peers_are_refused():
    node, _ = await speaker_with_raw_peer()
    stranger = RawPeer(9)
    await stranger.connect(node)
    stranger.send(stranger.open_message().encode())
    assert await stranger.read() is None
    await node.speaker.stop()


@run_async()
async def test_remove_peer_sends_cease_and_withdraws():
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node)
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    await node.speaker.remove_peer(raw.address)
    assert await raw.notification() == (6, 3)
    assert P1 not in node.best and node.speaker.peers() == []
    await node.speaker.stop()


@run_async()
async def test_unknown_transitive_attribute_is_reflected_with_partial_bit():
    rr, client = await nodes(1, 3)
    raw = RawPeer(2)
    rr.speaker.add_peer(rr.peer_config(raw, passive=True, rr_client=True))
    connect(rr, client, a_kw={"rr_client": True})
    await raw.establish(rr)
    raw.announce(P1, other=((0xC0, 250, b"opaque"),))
    await eventually(lambda: P1 in client.best)
    assert client.best[P1].attrs.other == ((0xE0, 250, b"opaque"),)
    assert client.best[P1].attrs.originator_id == raw.router_id
    await stop_all(rr, client)


@pytest.mark.parametrize("our_id_higher", [True, False])
@run_async()
async def test_collision_resolution_closes_the_right_connection(our_id_higher):
    """Both sides connect at once; the connection opened by the higher BGP identifier stays."""
    node, = await nodes(1)                                # router id 10.0.0.1
    raw = RawPeer(2, router_id="10.0.0.0" if our_id_higher else "10.0.0.9")
    accepted = asyncio.Queue()
    server = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), raw.address, 0)
    raw.port = server.sockets[0].getsockname()[1]
    node.speaker.add_peer(node.peer_config(raw, connect_retry=30))
    # the connection the speaker opened: read its OPEN, say nothing yet
    their_reader, their_writer = await asyncio.wait_for(accepted.get(), 5)
    outgoing = RawPeer(2, router_id=raw.router_id)
    outgoing.reader, outgoing.writer = their_reader, their_writer
    assert isinstance(await outgoing.read(), m.Open)
    outgoing.send(outgoing.open_message().encode())
    assert isinstance(await outgoing.read(), m.Keepalive)         # that one is in OpenConfirm now
    # and ours, opened towards the speaker
    await raw.connect(node)
    raw.send(raw.open_message().encode())
    if our_id_higher:
        # the speaker keeps the connection it opened and closes ours
        assert await raw.notification() == (6, 7)
        outgoing.send(m.KEEPALIVE_BYTES)
        await eventually(lambda: node.established(raw))
    else:
        # the speaker keeps our connection and closes the one it opened
        assert await outgoing.notification() == (6, 7)
        assert isinstance(await raw.read(), m.Open)
        raw.send(m.KEEPALIVE_BYTES)
        assert isinstance(await raw.read(), m.Keepalive)
        await eventually(lambda: node.established(raw))
    server.close()
    await node.speaker.stop()
