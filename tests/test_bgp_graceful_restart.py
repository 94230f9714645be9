"""Graceful restart (RFC 4724) in the speaker, both roles, over loopback TCP (no root).

A scripted peer (test_bgp_session.RawPeer) advertises the capability, loses its
connection in each of the ways the RFC covers, and comes back; the speaker
must keep its routes (stale) without a single withdrawal reaching its
subscribers, then drop exactly what was not re-announced when End-of-RIB
arrives, or everything when a timer bounds the wait. Between two speakers,
a graceful stop and a restarted process with the R and F bits.
"""
import asyncio
import time

from test_bgp_session import AS, P1, P2, P3, Node, RawPeer, eventually, nodes, run_async, speaker_with_raw_peer

from calico_lite.bgp import messages as m
from calico_lite.bgp.speaker import Speaker

GR = m.GracefulRestart(restart_time=30, families=((1, 1, True),))
RESTARTED = m.GracefulRestart(restart_time=30, restarting=True, families=((1, 1, True),))


class Changes:
    """Every Loc-RIB change the speaker reports, as (prefix, next hop or None)."""

    def __init__(self, node):
        self.seen = []
        node.speaker.subscribe(lambda prefix, route: self.seen.append((prefix, route and route.next_hop)))

    def withdrawals(self, prefix=None):
        return [p for p, hop in self.seen if hop is None and prefix in (None, p)]


def status(node, raw):
    return next(p for p in node.speaker.peer_status() if p["address"] == raw.address)


async def lose_connection(node, raw):
    raw.close()         # a FIN, no NOTIFICATION: to the speaker, the connection is lost
    await eventually(lambda: not node.established(raw), what="the speaker to see the loss")


@run_async()
async def test_lost_session_keeps_routes_stale_until_end_of_rib():
    node, raw = await speaker_with_raw_peer()
    changes = Changes(node)
    their_open = await raw.establish(node, graceful_restart=GR)
    # we advertise the capability: restart time, IPv4 unicast, no R bit on a first start
    assert their_open.graceful_restart == m.GracefulRestart(120, False, ((1, 1, False),))
    raw.announce(P1)
    raw.announce(P2)
    await eventually(lambda: {P1, P2} <= set(node.best))
    await lose_connection(node, raw)
    await asyncio.sleep(0.2)
    assert {P1, P2} <= set(node.best) and changes.withdrawals() == []
    assert status(node, raw)["stale"] == 2
    # back, with the R bit (it restarted) and the F bit (it kept forwarding)
    raw2 = RawPeer(2)
    assert (await raw2.establish(node, graceful_restart=RESTARTED)).graceful_restart is not None
    assert not node.speaker.synced(raw.address)
    raw2.announce(P1, med=7)             # re-announced: replaces its stale route
    await eventually(lambda: node.best[P1].attrs.med == 7, what="the new route to replace the stale one")
    assert P2 in node.best and status(node, raw)["stale"] == 1
    ends = []
    node.speaker.subscribe_end_of_rib(ends.append)
    raw2.send(m.encode_end_of_rib())
    await eventually(lambda: P2 not in node.best, what="End-of-RIB to drop what was not re-announced")
    assert changes.withdrawals() == [P2] and ends == [raw.address] and node.speaker.synced(raw.address)
    assert status(node, raw)["stale"] == 0 and node.best[P1].peer == raw.address
    raw2.close()
    await node.speaker.stop()


@run_async()
async def test_stale_routes_go_when_the_peer_does_not_come_back_in_its_restart_time():
    node, raw = await speaker_with_raw_peer()
    changes = Changes(node)
    await raw.establish(node, graceful_restart=m.GracefulRestart(restart_time=1, families=((1, 1, True),)))
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    t = time.monotonic()
    await lose_connection(node, raw)
    await eventually(lambda: P1 not in node.best, timeout=3, what="the restart time to run out")
    assert 0.8 < time.monotonic() - t < 2.0
    assert changes.withdrawals() == [P1]
    await node.speaker.stop()


@run_async()
async def test_our_stale_time_caps_the_peers_restart_time_and_the_wait_for_end_of_rib():
    node, raw = await speaker_with_raw_peer(stale_time=0.5)
    await raw.establish(node, graceful_restart=m.GracefulRestart(restart_time=4095, families=((1, 1, True),)))
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    t = time.monotonic()
    await lose_connection(node, raw)
    await eventually(lambda: P1 not in node.best, timeout=2, what="stale_time to cap the restart time")
    assert time.monotonic() - t < 1.2
    # back, announcing something else, but never saying End-of-RIB: stale_time bounds that too
    await raw.establish(node, graceful_restart=GR)
    raw.announce(P2)
    await eventually(lambda: P2 in node.best)
    await lose_connection(node, raw)
    raw3 = RawPeer(2)
    await raw3.establish(node, graceful_restart=GR)
    t = time.monotonic()
    await eventually(lambda: P2 not in node.best, timeout=2, what="stale_time to end the wait for End-of-RIB")
    assert time.monotonic() - t < 1.2
    await node.speaker.stop()


@run_async()
async def test_coming_back_without_the_f_bit_drops_stale_routes_at_once():
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node, graceful_restart=GR)
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    await lose_connection(node, raw)
    await asyncio.sleep(0.1)
    assert P1 in node.best
    raw2 = RawPeer(2)
    await raw2.establish(node, graceful_restart=m.GracefulRestart(30, True, ((1, 1, False),)))
    await eventually(lambda: P1 not in node.best, timeout=1, what="stale routes to go (forwarding state lost)")
    await node.speaker.stop()


@run_async()
async def test_hold_timer_expiry_is_a_restart_but_a_notification_is_not():
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node, hold=3, graceful_restart=GR)
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    assert await raw.notification(6) == (4, 0)          # silent: the hold timer fires
    await eventually(lambda: not node.established(raw))
    assert P1 in node.best and status(node, raw)["stale"] == 1
    raw.close()
    # back, then a Cease: an orderly goodbye, so its routes go (and the stale ones with them)
    raw2 = RawPeer(2)
    await raw2.establish(node, graceful_restart=RESTARTED)
    raw2.announce(P2)
    await eventually(lambda: P2 in node.best)
    raw2.send(m.Notification(m.CEASE, m.CEASE_ADMIN_SHUTDOWN).encode())
    await eventually(lambda: P1 not in node.best and P2 not in node.best, timeout=1, what="Cease to drop everything")
    await node.speaker.stop()


@run_async()
async def test_a_new_open_while_established_replaces_the_session_as_a_restart():
    node, raw = await speaker_with_raw_peer()
    changes = Changes(node)
    await raw.establish(node, graceful_restart=GR)
    raw.announce(P1)
    raw.announce(P2)
    await eventually(lambda: {P1, P2} <= set(node.best))
    # the peer restarted without its old connection being torn down (e.g. its host rebooted)
    raw2 = RawPeer(2)
    await raw2.establish(node, graceful_restart=RESTARTED)
    assert await raw.read_until(m.Notification, 2) is None       # the old one is closed without a word
    raw2.announce(P1)
    raw2.send(m.encode_end_of_rib())
    await eventually(lambda: P2 not in node.best, what="End-of-RIB on the new session")
    assert node.best[P1].peer == raw.address and changes.withdrawals() == [P2]
    assert status(node, raw)["flaps"] == 1
    await node.speaker.stop()


@run_async()
async def test_a_new_open_without_the_capability_is_still_a_collision():
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node, graceful_restart=GR)
    raw2 = RawPeer(2)
    await raw2.connect(node)
    raw2.send(raw2.open_message().encode())
    assert await raw2.notification() == (6, 7)
    assert node.established(raw)
    await node.speaker.stop()


@run_async()
async def test_peers_that_do_not_list_ipv4_unicast_lose_their_routes_with_the_session():
    # "aware" only (BIRD's default): a capability without families
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node, graceful_restart=m.GracefulRestart(120, False, ()))
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    await lose_connection(node, raw)
    await eventually(lambda: P1 not in node.best, timeout=0.5, what="the routes to go at once")
    await node.speaker.stop()
    # and a peer configured without graceful restart gets no capability and keeps nothing
    node, raw = await speaker_with_raw_peer(graceful_restart=False)
    assert (await raw.establish(node, graceful_restart=GR)).graceful_restart is None
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    await lose_connection(node, raw)
    await eventually(lambda: P1 not in node.best, timeout=0.5, what="the routes to go at once")
    await node.speaker.stop()


@run_async()
async def test_a_second_restart_before_end_of_rib_drops_what_was_not_re_announced():
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node, graceful_restart=GR)
    for prefix in (P1, P2, P3):
        raw.announce(prefix)
    await eventually(lambda: {P1, P2, P3} <= set(node.best))
    await lose_connection(node, raw)
    raw2 = RawPeer(2)
    await raw2.establish(node, graceful_restart=RESTARTED)
    raw2.announce(P1)
    await eventually(lambda: status(node, raw)["stale"] == 2)
    await lose_connection(node, raw2)            # gone again, before its End-of-RIB
    await eventually(lambda: P2 not in node.best and P3 not in node.best, timeout=1)
    assert P1 in node.best and status(node, raw)["stale"] == 1
    await node.speaker.stop()


@run_async()
async def test_removing_the_peer_drops_its_stale_routes():
    node, raw = await speaker_with_raw_peer()
    await raw.establish(node, graceful_restart=GR)
    raw.announce(P1)
    await eventually(lambda: P1 in node.best)
    await lose_connection(node, raw)
    await asyncio.sleep(0.1)
    assert P1 in node.best
    await node.speaker.remove_peer(raw.address)
    assert P1 not in node.best
    await node.speaker.stop()


@run_async()
async def test_end_of_rib_follows_our_table_and_a_peer_without_the_capability_is_synced_at_once():
    node, raw = await speaker_with_raw_peer()
    node.speaker.announce(P1)
    await raw.establish(node)
    assert (await raw.read_announcement()).nlri == (P1,)
    assert await raw.read_until(m.Update) == m.Update(end_of_rib=(1, 1))
    assert node.speaker.synced(raw.address)       # it promised no End-of-RIB: nothing to wait for
    await node.speaker.stop()


@run_async(timeout=30)
async def test_graceful_stop_and_a_restarted_speaker_lose_nothing():
    a, b = await nodes(1, 2)
    changes = Changes(b)
    a.speaker.add_peer(a.peer_config(b))
    b.speaker.add_peer(b.peer_config(a, idle_hold_time=0.1))
    a.speaker.announce(P1)
    a.speaker.announce(P2)
    await eventually(lambda: {P1, P2} <= set(b.best), what="a's routes at b")
    await eventually(lambda: b.speaker.synced(a.address))
    await a.speaker.stop(graceful=True)           # no Cease: b keeps a's routes
    await eventually(lambda: not b.established(a))
    assert b.speaker.peer_status()[0]["last_error"] == "connection lost"
    await asyncio.sleep(0.3)
    assert {P1, P2} <= set(b.best) and b.speaker.peer_status()[0]["stale"] == 2
    # the new process: R bit (it restarted) and F bit (forwarding state kept); it announces P1 only
    a2 = Node(1)
    a2.speaker = Speaker(AS, a.router_id, listen_address=a.address, port=0, restarting=True, forwarding=True)
    await a2.speaker.start()
    a2.speaker.add_peer(a2.peer_config(b))
    a2.speaker.announce(P1)
    await eventually(lambda: b.established(a2), what="the restarted speaker's session")
    assert b.speaker.peer_status()[0]["graceful_restart"] == {"restart_time": 120, "restarting": True,
                                                                "forwarding": True}
    await eventually(lambda: P2 not in b.best, what="End-of-RIB from a2 to drop P2")
    assert P1 in b.best and b.best[P1].next_hop == a.address
    assert changes.withdrawals() == [P2]              # P1 never left b's Loc-RIB
    await asyncio.gather(a2.speaker.stop(), b.speaker.stop())


@run_async()
async def test_our_r_bit_is_cleared_and_f_bit_set_once_the_session_was_up():
    node, = await nodes(1)
    node.speaker.restart_capability = m.GracefulRestart(60, True, ((1, 1, False),))
    raw = RawPeer(2)
    node.speaker.add_peer(node.peer_config(raw, passive=True))
    assert (await raw.establish(node, graceful_restart=GR)).graceful_restart == \
        m.GracefulRestart(60, True, ((1, 1, False),))
    await lose_connection(node, raw)
    again = await RawPeer(2).establish(node, graceful_restart=GR)
    # the process went on running: it did not restart, and its forwarding state never went away
    assert again.graceful_restart == m.GracefulRestart(60, False, ((1, 1, True),))
    await node.speaker.stop()
