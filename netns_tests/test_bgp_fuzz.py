"""Malformed BGP messages against our speaker, while it keeps serving a healthy BIRD peer.

Our speaker (`python -m calico_lite.reflector`) runs in its own namespace with
two peers: a BIRD route-reflector client (hold 6 s) that announces a prefix
and receives ours, and a passive peer address the fuzzer connects from. Each
case is one fresh TCP connection: the fuzzer (a 2-octet-AS iBGP peer) either
sends the malformed message as its first one (OPEN phase) or completes OPEN /
KEEPALIVE first and sends it on the established session. The messages are
built with scapy.contrib.bgp and then broken: header markers, lengths and
types; OPEN fields; attribute flags, lengths and values; missing and unknown
attributes; truncated and oversized NLRI; malformed AS_PATHs; the graceful
restart capability (RFC 4724) in every shape, and End-of-RIB markers, well-
and ill-formed; scapy's fuzz() of whole packets; random bytes.

After the case, 4096 zero bytes follow: whatever the message made the
speaker expect (a longer body it announced, or the next message), those
zeros complete it and then fail the next header's marker, so every case
ends in a NOTIFICATION and the connection closes - no case waits for a
timer. Cases with one right answer assert the exact (code, subcode); the rest
assert a NOTIFICATION with a defined code. Throughout, the BIRD session must
stay up without a single flap, keep our route and keep giving us its own.

A failing case prints its seed and index; PODNET_FUZZ_SEED replays a run.
"""
import os
import random
import signal
import socket
import struct
import time

import pytest
from test_bgp_interop import Bird, OurSpeaker, bird_client_conf, tail, wait_until

from podnet.net.netns import entered

scapy_bgp = pytest.importorskip("scapy.contrib.bgp")
from scapy.all import fuzz, raw  # noqa: E402
from scapy.contrib.bgp import (  # noqa: E402
    BGPCapGracefulRestart,
    BGPCapMultiprotocol,
    BGPHeader,
    BGPKeepAlive,
    BGPNLRI_IPv4,
    BGPOpen,
    BGPOptParam,
    BGPPAAggregator,
    BGPPAASPath,
    BGPPALocalPref,
    BGPPAMultiExitDisc,
    BGPPANextHop,
    BGPPAOrigin,
    BGPPathAttr,
    BGPUpdate,
)

AS = 64512
NET = "192.168.79"
SPEAKER, BIRD, FUZZER = NET + ".1", NET + ".2", NET + ".3"
OUR_PREFIX, BIRD_PREFIX = "10.79.1.0/26", "10.79.2.0/26"
PADDING = bytes(4096)
CASES_PER_KIND = 112
VALID_CODES = {1, 2, 3, 5}

# RFC 4271 attribute kinds: (type code, flags it must carry, fixed length or None)
KNOWN = {1: (0x40, 1), 2: (0x40, None), 3: (0x40, 4), 4: (0x80, 4), 5: (0x40, 4), 6: (0x40, 0), 7: (0xC0, 6),
         9: (0x80, 4), 10: (0x80, None)}


# ---- messages, built with scapy ------------------------------------------------------------------

def open_msg(version=4, my_as=AS, hold=9, bgp_id=FUZZER, params=None):
    if params is None:      # multiprotocol IPv4 unicast only: a 2-octet-AS speaker
        params = [BGPOptParam(param_type=2, param_value=BGPCapMultiprotocol(afi=1, safi=1))]
    return raw(BGPHeader(type=1) / BGPOpen(version=version, my_as=my_as, hold_time=hold, bgp_id=bgp_id,
                                           opt_params=params))


KEEPALIVE = raw(BGPKeepAlive())     # (scapy: a KEEPALIVE is a header of its own)


def path_attrs():
    """The attributes of a valid iBGP announcement, as scapy objects (fresh each time)."""
    return [BGPPathAttr(type_flags=0x40, type_code=1, attribute=BGPPAOrigin(origin=0)),
            BGPPathAttr(type_flags=0x40, type_code=2, attribute=BGPPAASPath(segments=[])),
            BGPPathAttr(type_flags=0x40, type_code=3, attribute=BGPPANextHop(next_hop=FUZZER)),
            BGPPathAttr(type_flags=0x80, type_code=4, attribute=BGPPAMultiExitDisc(med=0)),
            BGPPathAttr(type_flags=0x40, type_code=5, attribute=BGPPALocalPref(local_pref=100))]


def update_msg(attrs=None, nlri=("10.79.3.0/26",), withdrawn=()):
    return raw(BGPHeader(type=2) / BGPUpdate(
        withdrawn_routes=[BGPNLRI_IPv4(prefix=p) for p in withdrawn],
        path_attr=path_attrs() if attrs is None else attrs,
        nlri=[BGPNLRI_IPv4(prefix=p) for p in nlri]))


def update_with_raw_attrs(attr_bytes, nlri=b"\x1a\x0a\x4f\x03\x00"):
    body = struct.pack("!H", 0) + struct.pack("!H", len(attr_bytes)) + attr_bytes + nlri
    return struct.pack("!16sHB", b"\xff" * 16, 19 + len(body), 2) + body


def raw_attr(flags, code, value):
    return struct.pack("!BBB", flags, code, len(value)) + value


def valid_attr_bytes(skip=()):
    return b"".join(raw(a) for a in path_attrs() if a.type_code not in skip)


# ---- the cases -----------------------------------------------------------------------------------
# Each: (name, established?, payload, expected (code, subcode) or None for "any defined NOTIFICATION")

def header_cases(rng, established):
    base = KEEPALIVE if established else open_msg()
    for _ in range(CASES_PER_KIND // 4):
        marker = bytearray(base[:16])
        marker[rng.randrange(16)] ^= 1 << rng.randrange(8)
        yield "marker", established, bytes(marker) + base[16:], (1, 1)
        length = rng.choice([rng.randrange(0, 19), rng.randrange(4097, 65536)])
        yield "length %d" % length, established, base[:16] + struct.pack("!H", length) + base[18:], (1, 2)
        msg_type = rng.choice([0] + list(range(6, 256)))
        yield "type %d" % msg_type, established, base[:18] + bytes([msg_type]) + base[19:], (1, 3)
        extra = rng.randrange(1, 40)        # a KEEPALIVE must be exactly 19 bytes
        yield "keepalive+%d" % extra, established, struct.pack("!16sHB", b"\xff" * 16, 19 + extra, 4) + bytes(extra), \
            (1, 2)


def open_cases(rng):
    for _ in range(CASES_PER_KIND // 5):
        yield "version", False, open_msg(version=rng.choice([0, 1, 2, 3, 5, 255])), (2, 1)
        yield "peer AS", False, open_msg(my_as=rng.choice([1, 64511, 64513, 65535])), (2, 2)
        yield "hold", False, open_msg(hold=rng.choice([1, 2])), (2, 6)
        yield "bgp id", False, open_msg(bgp_id=rng.choice(["0.0.0.0", SPEAKER])), (2, 3)
        ptype = rng.choice([1, 3, 4, 200, 254])
        params = [BGPOptParam(param_type=ptype, param_value=b"\x01\x00")]
        yield "opt param %d" % ptype, False, open_msg(params=params), (2, 4)
        # unknown capabilities must not be fatal: the session comes up, the padding then fails the marker
        code = rng.choice([3, 9, 66, 99, 131, 200, 255])
        cap = bytes([code, 3]) + bytes(rng.randrange(256) for _ in range(3))
        yield "capability %d" % code, False, open_msg(params=[
            BGPOptParam(param_type=2, param_value=BGPCapMultiprotocol(afi=1, safi=1)),
            BGPOptParam(param_type=2, param_value=cap)]), None
        yield "update in OpenSent", False, update_msg(), (5, 1)


def attribute_cases(rng):
    flag_choices = [0x00, 0x40, 0x80, 0xC0, 0x60, 0xA0, 0xE0]
    for _ in range(CASES_PER_KIND // 8):
        # flags that contradict the attribute's kind
        code = rng.choice(list(KNOWN))
        want, size = KNOWN[code]
        flags = rng.choice([f for f in flag_choices if f & 0xC0 != want or (f & 0x20 and want != 0xC0)])
        value = bytes(size if size is not None else 4) if code != 3 else bytes([192, 168, 79, 3])
        if code == 2:
            value = b""
        attr = raw_attr(flags, code, value)
        yield "flags 0x%02x on %d" % (flags, code), True, update_with_raw_attrs(valid_attr_bytes({code}) + attr), \
            (3, 4, attr)
        # lengths that contradict fixed-size attributes
        code = rng.choice([c for c, (_, s) in KNOWN.items() if s is not None])
        want, size = KNOWN[code]
        bad_len = rng.choice([n for n in range(12) if n != size])
        attr = raw_attr(want, code, bytes([1]) * bad_len)
        yield "length %d of %d" % (bad_len, code), True, update_with_raw_attrs(valid_attr_bytes({code}) + attr), \
            (3, 5, attr)
        # ORIGIN values
        value = rng.randrange(3, 256)
        attr = raw_attr(0x40, 1, bytes([value]))
        yield "origin %d" % value, True, update_with_raw_attrs(valid_attr_bytes({1}) + attr), (3, 6, attr)
        # NEXT_HOP values no host can use
        hop = bytes([rng.choice([0, 224, 239, 240, 255])]) + bytes(rng.randrange(256) for _ in range(3))
        attr = raw_attr(0x40, 3, hop)
        yield "next hop %s" % socket.inet_ntoa(hop), True, update_with_raw_attrs(valid_attr_bytes({3}) + attr), \
            (3, 8, attr)
        # a well-known attribute missing
        code = rng.choice([1, 2, 3])
        yield "missing %d" % code, True, update_with_raw_attrs(valid_attr_bytes({code})), (3, 3, bytes([code]))
        # an unknown well-known attribute
        code = rng.choice([0, 11, 12, 13, 19, 21, 40, 99, 128, 200, 255])
        attr = raw_attr(0x40, code, b"\x01\x02")
        yield "unknown well-known %d" % code, True, update_with_raw_attrs(valid_attr_bytes() + attr), (3, 2, attr)
        # a duplicated attribute, or one overrunning the attribute field
        yield "duplicate", True, update_with_raw_attrs(valid_attr_bytes() + raw(path_attrs()[0])), (3, 1)
        cut = valid_attr_bytes() + raw_attr(0xC0, 200, b"x" * 10)[:rng.randrange(1, 12)]
        yield "overrun", True, update_with_raw_attrs(cut, nlri=b""), (3, 1)


def nlri_and_path_cases(rng):
    for _ in range(CASES_PER_KIND // 5):
        plen = rng.randrange(33, 256)
        yield "prefix length %d" % plen, True, update_with_raw_attrs(valid_attr_bytes(), bytes([plen, 10, 0, 0, 0])), \
            (3, 10)
        plen = rng.randrange(9, 33)
        have = rng.randrange(0, (plen + 7) // 8)
        yield "truncated /%d" % plen, True, update_with_raw_attrs(valid_attr_bytes(), bytes([plen]) + bytes(have)), \
            (3, 10)
        body = struct.pack("!H", 0) + struct.pack("!H", 0) + b""
        withdrawn = bytes([rng.randrange(33, 256), 1, 2, 3, 4])
        wd_body = struct.pack("!H", len(withdrawn)) + withdrawn + struct.pack("!H", 0)
        yield "withdrawn prefix", True, struct.pack("!16sHB", b"\xff" * 16, 19 + len(wd_body), 2) + wd_body, (3, 10)
        long_wd = struct.pack("!H", rng.randrange(10, 4000)) + body[2:]
        yield "withdrawn length", True, struct.pack("!16sHB", b"\xff" * 16, 19 + len(long_wd), 2) + long_wd, (3, 1)
        seg = rng.choice([
            struct.pack("!BBH", rng.choice([0, 5, 6, 200]), 1, 65001),     # segment type
            struct.pack("!BB", 2, 0),                                        # empty segment
            struct.pack("!BBH", 2, rng.randrange(2, 50), 65001),              # count overruns
            struct.pack("!BBHB", 2, 1, 65001, 2),                             # half a header left
        ])
        attr = raw_attr(0x40, 2, seg)
        yield "as path", True, update_with_raw_attrs(valid_attr_bytes({2}) + attr), (3, 11)


def graceful_restart_cases(rng):
    """The Graceful Restart capability and End-of-RIB: what is well-formed is accepted (the padding
    then fails the marker: (1, 1)), what is not fails exactly."""
    mp = BGPOptParam(param_type=2, param_value=BGPCapMultiprotocol(afi=1, safi=1))
    for _ in range(CASES_PER_KIND // 4):
        entries = [BGPCapGracefulRestart.GRTuple(afi=rng.choice([1, 2, 25, 16388]), safi=rng.choice([1, 2, 4, 128]),
                                                 flags=rng.randrange(256)) for _ in range(rng.randrange(0, 4))]
        cap = BGPCapGracefulRestart(restart_flags=rng.randrange(16), restart_time=rng.randrange(4096),
                                    entries=entries)
        yield "graceful restart capability", False, open_msg(params=[mp, BGPOptParam(param_type=2,
                                                                                     param_value=cap)]), (1, 1)
        # a length that is not 2 + 4n: not readable, so kept as an unknown capability (not fatal)
        n = rng.choice([0, 1, 3, 4, 5, 7, 9])
        odd = bytes([64, n]) + bytes(rng.randrange(256) for _ in range(n))
        yield "graceful restart capability of %d bytes" % n, False, open_msg(params=[
            mp, BGPOptParam(param_type=2, param_value=odd)]), (1, 1)
        # End-of-RIB, both shapes, any family: accepted quietly
        afi, safi = rng.choice([(1, 1), (2, 1), (1, 2), (25, 65)])
        mp_unreach = raw_attr(0x80, 15, struct.pack("!HB", afi, safi))
        yield "end-of-rib %d/%d" % (afi, safi), True, update_with_raw_attrs(mp_unreach, nlri=b""), (1, 1)
        yield "end-of-rib", True, update_with_raw_attrs(b"", nlri=b""), (1, 1)
        # ... but an MP_UNREACH_NLRI with the wrong flags, or cut short, is no marker
        flags = rng.choice([0x00, 0x40, 0xC0, 0xA0])
        attr = raw_attr(flags, 15, b"\x00\x01\x01")
        yield "end-of-rib flags 0x%02x" % flags, True, update_with_raw_attrs(attr, nlri=b""), (3, 4, attr)
        cut = raw_attr(0x80, 15, b"\x00\x01"[:rng.randrange(0, 3)])
        yield "end-of-rib truncated", True, update_with_raw_attrs(cut, nlri=b""), (3, 9)


def random_cases(rng):
    for _ in range(CASES_PER_KIND):
        n = rng.randrange(1, 300)
        yield "random %d bytes" % n, True, bytes(rng.randrange(256) for _ in range(n)), None
    for _ in range(CASES_PER_KIND):
        # a valid header around a random body
        n = rng.randrange(4, 200)
        yield "random update body", True, struct.pack("!16sHB", b"\xff" * 16, 19 + n, 2) + \
            bytes(rng.randrange(256) for _ in range(n)), None
    for _ in range(CASES_PER_KIND):
        # scapy's own fuzzing of path attributes inside an otherwise valid UPDATE
        attrs = path_attrs()
        i = rng.randrange(len(attrs))
        attrs[i] = fuzz(BGPPathAttr(type_code=attrs[i].type_code, attribute=attrs[i].attribute))
        try:
            payload = update_msg(attrs)
        except Exception:       # scapy could not build this one
            continue
        yield "scapy fuzz attr %d" % i, True, payload, None
    for _ in range(CASES_PER_KIND // 2):
        try:
            payload = raw(fuzz(BGPHeader(type=2) / BGPUpdate()))
        except Exception:
            continue
        yield "scapy fuzz update", True, payload, None
    for _ in range(CASES_PER_KIND // 2):
        try:
            payload = raw(fuzz(BGPHeader(type=1) / BGPOpen()))
        except Exception:
            continue
        yield "scapy fuzz open", False, payload, None
    for _ in range(CASES_PER_KIND // 2):
        agg = BGPPathAttr(type_flags=0xC0, type_code=7, attribute=BGPPAAggregator(aggregator_asn=65001,
                                                                                 speaker_address="192.0.2.1"))
        msg = bytearray(update_msg(path_attrs() + [agg]))
        msg[rng.randrange(19, len(msg))] = rng.randrange(256)       # one byte of the body flipped
        yield "flipped byte", True, bytes(msg), None


def all_cases(seed):
    rng = random.Random(seed)
    kinds = [header_cases(rng, False), header_cases(rng, True), open_cases(rng), attribute_cases(rng),
             nlri_and_path_cases(rng), graceful_restart_cases(rng), random_cases(rng)]
    return [case for kind in kinds for case in kind]


# ---- the fuzzing peer ------------------------------------------------------------------------------

class FuzzPeer:
    """Blocking TCP connections from the fuzzer's namespace to the speaker, one per case."""

    def __init__(self, ns):
        self.ns = ns

    def connect(self):
        with entered(self.ns.path):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.bind((FUZZER, 0))
        sock.connect((SPEAKER, 179))
        return sock

    @staticmethod
    def read_message(sock, buf):
        """(type, body) of the next message, parsed independently of the speaker's codec; None at EOF."""
        while True:
            if len(buf) >= 19:
                length, msg_type = struct.unpack_from("!HB", buf, 16)
                if buf[:16] != b"\xff" * 16 or length < 19:
                    raise AssertionError("the speaker sent a malformed message: %r" % bytes(buf[:19]))
                if len(buf) >= length:
                    body = bytes(buf[19:length])
                    del buf[:length]
                    return msg_type, body
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buf.extend(chunk)

    def run(self, payload, established):
        """Send `payload` (after OPEN/KEEPALIVE if `established`) and the padding; the NOTIFICATION back."""
        sock = self.connect()
        buf = bytearray()
        try:
            if established:
                sock.sendall(open_msg() + KEEPALIVE)
            try:
                sock.sendall(payload + PADDING)
            except (BrokenPipeError, ConnectionResetError):
                pass                # it already closed: the NOTIFICATION is waiting for us
            while True:
                msg = self.read_message(sock, buf)
                if msg is None:
                    return None
                if msg[0] == 3:
                    return msg[1][0], msg[1][1], msg[1][2:]
        finally:
            sock.close()


# ---- the test ---------------------------------------------------------------------------------------

def test_fuzzed_peer_gets_notifications_while_bird_is_served(lab):
    seed = int(os.environ.get("PODNET_FUZZ_SEED") or random.randrange(1 << 30))
    cases = all_cases(seed)
    assert len(cases) >= 1000, len(cases)
    underlay = lab.underlay(NET + ".0/24")
    speaker_ns, bird_ns, fuzz_ns = (lab.node(n, underlay, ip) for n, ip in
                                    (("speaker", SPEAKER), ("bird", BIRD), ("fuzzer", FUZZER)))
    speaker = OurSpeaker(speaker_ns, "speaker", SPEAKER, SPEAKER, announce=[OUR_PREFIX],
                         peers=["%s,client,hold=6" % BIRD, "%s,passive,hold=9" % FUZZER])
    bird = Bird(bird_ns, "bird", bird_client_conf(BIRD, SPEAKER, [BIRD_PREFIX]))

    def bird_healthy():
        return bird.protocol_state("reflector") == "Established" and OUR_PREFIX in bird.routes()

    def diag():
        return "%s\n%s" % (tail(speaker.log), tail(bird.log))
    wait_until(lambda: bird_healthy() and BIRD_PREFIX in speaker.routes(), 15, "the BIRD session", diag)
    since = bird.cmd("show", "protocols", "reflector").splitlines()[-1].split()[4]

    peer = FuzzPeer(fuzz_ns)
    started = time.monotonic()
    failures = []
    for i, (name, established, payload, expected) in enumerate(cases):
        try:
            got = peer.run(payload, established)
        except OSError as e:
            got = e
        if isinstance(got, OSError) or got is None:
            failures.append("case %d %s: no NOTIFICATION (%s), payload %s" % (i, name, got, payload[:64].hex()))
        elif expected is None:
            if got[0] not in VALID_CODES:
                failures.append("case %d %s: NOTIFICATION %s" % (i, name, got[:2]))
        elif got[:len(expected)] != expected:
            failures.append("case %d %s: NOTIFICATION %s, expected %s" % (i, name, got, expected))
        if len(failures) > 10:
            break
        if i % 100 == 99:           # the healthy peer, during the run
            assert speaker.proc.poll() is None, "the speaker died at case %d:\n%s" % (i, tail(speaker.log))
            assert bird_healthy(), "BIRD lost its session or our route at case %d:\n%s" % (i, diag())
    elapsed = time.monotonic() - started
    print("fuzz seed %d: %d cases in %.1fs" % (seed, len(cases), elapsed))
    assert not failures, "seed %d (PODNET_FUZZ_SEED to replay):\n%s" % (seed, "\n".join(failures))
    # the healthy peer never noticed: same session, both routes still there, no flap on our side
    assert speaker.proc.poll() is None
    assert bird_healthy()
    assert bird.cmd("show", "protocols", "reflector").splitlines()[-1].split()[4] == since
    wait_until(lambda: BIRD_PREFIX in speaker.routes(), 2, "BIRD's prefix in the speaker's dump", diag)
    bird_status = next(p for p in speaker.state()["peers"] if p["address"] == BIRD)
    assert bird_status["state"] == "Established" and bird_status["flaps"] == 0
    os.kill(speaker.proc.pid, signal.SIGTERM)
    speaker.proc.wait(10)
    speaker_ns.processes.remove(speaker.proc)
