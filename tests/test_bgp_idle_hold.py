"""Idle hold after a session reset, and one warning a minute for a misconfigured peer (no root).

`IdleHold` is plain arithmetic on clock readings and is checked on its own.
Then a scripted peer on loopback that our speaker connects to: each connection
follows a script (refuse us with a wrong AS, or establish and hang up), and
the times our speaker comes back are measured. The speaker's clock is
injected, so "a minute later" for the warnings takes no time.
"""
import asyncio
import logging
import time

from test_bgp_session import AS, eventually, run_async

from calico_lite.bgp import messages as m
from calico_lite.bgp.session import IDLE, IdleHold, PeerConfig
from calico_lite.bgp.speaker import Speaker

SPEAKER, PEER = "127.0.0.1", "127.0.0.2"


def test_idle_hold_doubles_up_to_its_cap_and_starts_over_after_a_stable_session():
    hold = IdleHold(1.0, 8.0, 60.0)
    assert hold.remaining(0) == 0                       # nothing failed yet: connect at once
    assert hold.failed(0) == 1.0 and hold.remaining(0.25) == 0.75 and hold.remaining(5) == 0
    assert [hold.failed(t) for t in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 8.0, 8.0]
    assert hold.failed(20, up_since=10) == 8.0         # up for 10 s only: still flapping
    assert hold.failed(100, up_since=40) == 1.0        # up for a minute: starts over
    assert hold.failed(101, jitter=0.75) == 1.5         # the wait imposed carries the jitter
    assert hold.remaining(101) == 1.5
    never = IdleHold(0.0, 0.0, 60.0)                     # 0 turns it off
    assert never.failed(0) == 0 and never.remaining(0) == 0


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class ScriptedPeer:
    """A BGP peer at PEER that our speaker connects to; connection i follows script[i]
    ("wrong-as": answers with AS 65000; ("up", seconds): establishes, then hangs up;
    "up": establishes and stays). Records when each connection arrived."""

    def __init__(self, script):
        self.script = list(script)
        self.arrivals = []
        self.server = None
        self.port = None
        self.writers = []

    async def start(self):
        self.server = await asyncio.start_server(self._serve, PEER, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        self.arrivals.append(time.monotonic())
        self.writers.append(writer)
        step = self.script[min(len(self.arrivals), len(self.script)) - 1]
        try:
            header = await reader.readexactly(19)
            length, _ = m.parse_header(header)
            await reader.readexactly(length - 19)
            if step == "wrong-as":
                writer.write(m.Open(asn=65000, hold_time=9, router_id="10.0.0.2").encode())
                await reader.read(4096)             # its NOTIFICATION, then its FIN
                return
            writer.write(m.Open(asn=AS, hold_time=9, router_id="10.0.0.2").encode() + m.KEEPALIVE_BYTES)
            if isinstance(step, tuple):
                await asyncio.sleep(step[1])
                return
            while await reader.read(4096):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def gaps(self):
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    async def stop(self):
        self.server.close()
        for w in self.writers:
            w.close()


def speaker_towards(peer, clock, **kw):
    speaker = Speaker(AS, "10.0.0.1", listen_address=SPEAKER, port=None, clock=clock)
    kw.setdefault("connect_retry", 0.05)
    speaker.add_peer(PeerConfig(PEER, AS, port=peer.port, local_address=SPEAKER, hold_time=9, **kw))
    return speaker


def warnings_about(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


@run_async(timeout=30)
async def test_wrong_as_backs_off_doubling_and_warns_once_a_minute(caplog):
    caplog.set_level(logging.DEBUG, logger="calico_lite.bgp")
    peer = await ScriptedPeer(["wrong-as"]).start()
    clock = FakeClock()
    speaker = speaker_towards(peer, clock, idle_hold_time=0.1, idle_hold_max=0.4)
    await speaker.start()
    states = set()
    speaker.subscribe_sessions(lambda address, old, new, reason: states.add(new))
    await eventually(lambda: len(peer.arrivals) >= 6, timeout=10, what="six attempts")
    gaps = peer.gaps()[:5]
    # each wait: the idle hold (0.1, 0.2, 0.4, 0.4, 0.4 times a 0.75-1 jitter) after ConnectRetry (0.05)
    for gap, hold in zip(gaps, (0.1, 0.2, 0.4, 0.4, 0.4)):
        assert 0.75 * hold <= gap <= hold + 0.05 + 0.25, gaps
    assert IDLE in states                               # the FSM sits in Idle while it holds
    # six refusals within the same (fake) minute: one warning; the rest went to debug
    assert len(warnings_about(caplog, "bad peer AS")) == 1
    assert "peer says AS 65000" in speaker.peer_status()[0]["last_error"]
    clock.now += 61
    await eventually(lambda: len(warnings_about(caplog, "bad peer AS")) == 2, timeout=5, what="the next warning")
    assert "more like this in the last 61s" in warnings_about(caplog, "bad peer AS")[1].getMessage()
    await speaker.stop()
    await peer.stop()


@run_async(timeout=30)
async def test_after_a_reset_the_speaker_waits_before_reconnecting_and_a_stable_session_resets_the_wait():
    # refused twice (the wait grows to 0.4), then a session that stays up 0.5 s (stable after 0.3)
    # and hangs up, then a session that stays
    peer = await ScriptedPeer(["wrong-as", "wrong-as", ("up", 0.5), ("up", 0.1), "up"]).start()
    speaker = speaker_towards(peer, time.monotonic, idle_hold_time=0.2, idle_hold_max=5.0, idle_hold_stable=0.3)
    await speaker.start()
    await eventually(lambda: len(peer.arrivals) == 5, timeout=10, what="five connections")
    await eventually(lambda: speaker.established_count() == 1, what="the last session")
    gaps = peer.gaps()
    assert 0.75 * 0.2 <= gaps[0] <= 0.2 + 0.3 and 0.75 * 0.4 <= gaps[1] <= 0.4 + 0.3, gaps
    # the session that lasted 0.5 s went down: the wait started over at 0.2 (not 0.8) ...
    assert 0.5 + 0.75 * 0.2 <= gaps[2] <= 0.5 + 0.2 + 0.3, gaps
    # ... and the one that lasted 0.1 s doubled it: a reset is a failure like any other
    assert 0.1 + 0.75 * 0.4 <= gaps[3] <= 0.1 + 0.4 + 0.3, gaps
    await speaker.stop()
    await peer.stop()
