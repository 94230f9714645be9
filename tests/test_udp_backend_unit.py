"""The udp backend's pure parts, no root: the forwarding table from leases, the
lookup, and the forwarder's two pumps driven by fake TUN and socket calls
(batching for UDP GSO, splitting UDP GRO buffers, coalescing TCP into TSO
packets, the fallbacks when the kernel refuses either)."""
import errno
import logging
import socket
import struct
import sys

import pytest

from flanneld import config as fconfig
from flanneld.backend import backend_class
from flanneld.backend.base import ExternalInterface
from flanneld.backend.udp import (
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    VNET_HDR_LEN,
    VNET_NONE,
    Forwarder,
    UDPBackend,
    _run_mask,
    fold,
    gro_segments,
    ip_checksum,
    lookup,
    pseudo_header_sum,
    route_table,
)
from flanneld.subnet import Lease
from podnet.net.ip import parse_ip, parse_net

A = ("192.168.50.2", 8285)
B = ("192.168.50.3", 8285)


def make_backend(backend=None, mtu=1500):
    raw = {"Network": "10.244.0.0/16", "Backend": backend or {"Type": "udp"}}
    ext = ExternalInterface("eth0", 2, parse_ip("192.168.50.1"), 24, mtu)
    return UDPBackend(fconfig.parse(raw), ext)


def lease(subnet, ip, btype="udp"):
    return Lease(parse_net(subnet), parse_ip(ip), btype)


# ---- leases -> table ----------------------------------------------------------

def test_backend_class_and_mtu():
    assert backend_class("udp") is UDPBackend
    assert make_backend().mtu == 1472
    assert make_backend(mtu=9000).mtu == 8972
    assert make_backend().port == 8285
    assert make_backend({"Type": "udp", "Port": 9999}).port == 9999
    with pytest.raises(ValueError, match="Port"):
        make_backend({"Type": "udp", "Port": "x"})


def test_desired_maps_udp_leases_to_public_ip_and_port():
    b = make_backend({"Type": "udp", "Port": 7000})
    got = b.desired([lease("10.244.2.0/24", "192.168.50.2"), lease("10.244.3.0/24", "192.168.50.3")])
    assert got == {parse_net("10.244.2.0/24"): ("192.168.50.2", 7000),
                   parse_net("10.244.3.0/24"): ("192.168.50.3", 7000)}


def test_desired_skips_unusable_leases_with_one_log_each(caplog):
    b = make_backend()
    b.own = lease("10.244.1.0/24", "192.168.50.1")
    leases = [lease("10.244.2.0/24", "192.168.50.2", "vxlan"),     # another backend
              lease("10.244.3.0/25", "192.168.50.3"),              # wrong length
              lease("10.245.4.0/24", "192.168.50.4"),              # outside the network
              lease("10.244.1.0/24", "192.168.50.1"),              # ourselves
              lease("10.244.5.0/24", "fd00::5"),                   # IPv6 public IP
              lease("10.244.6.0/24", "192.168.50.6")]
    with caplog.at_level(logging.WARNING, logger="flanneld.udp"):
        assert b.desired(leases) == {parse_net("10.244.6.0/24"): ("192.168.50.6", 8285)}
        assert len(caplog.records) == 5
        assert "vxlan" in caplog.records[0].getMessage()
        b.desired(leases)                   # the next sync does not repeat them
        assert len(caplog.records) == 5


def test_sync_swaps_the_table_into_the_engine():
    b = make_backend()
    b.forwarder = Forwarder(1472)
    b.sync([lease("10.244.2.0/24", "192.168.50.2")])
    old = b.forwarder.routes
    assert lookup(old, parse_ip("10.244.2.9").value) == A
    b.sync([lease("10.244.3.0/24", "192.168.50.3")])
    assert b.forwarder.routes is not old            # replaced whole, never mutated
    assert lookup(old, parse_ip("10.244.2.9").value) == A
    assert lookup(b.forwarder.routes, parse_ip("10.244.2.9").value) is None
    assert lookup(b.forwarder.routes, parse_ip("10.244.3.200").value) == B
    b.sync([])
    assert b.forwarder.routes[0] == {}


def test_route_table_is_keyed_by_the_masked_destination():
    table, mask = route_table({parse_net("10.244.2.0/24"): A, parse_net("10.244.3.0/24"): B})
    assert mask == 0xFFFFFF00
    assert table == {parse_ip("10.244.2.0").value: A, parse_ip("10.244.3.0").value: B}
    for ip, want in (("10.244.2.0", A), ("10.244.2.255", A), ("10.244.3.17", B),
                     ("10.244.4.1", None), ("10.245.2.1", None), ("0.0.0.0", None)):
        assert lookup((table, mask), parse_ip(ip).value) == want, ip
    assert route_table({}) == ({}, 0xFFFFFFFF)
    with pytest.raises(ValueError):
        route_table({parse_net("10.244.2.0/24"): A, parse_net("10.244.4.0/23"): B})


def test_gro_segments():
    assert gro_segments(4000, 1400) == [(0, 1400), (1400, 2800), (2800, 4000)]
    assert gro_segments(2800, 1400) == [(0, 1400), (1400, 2800)]
    assert gro_segments(100, 1400) == [(0, 100)]
    assert gro_segments(100, 0) == [(0, 100)]


def test_checksums():
    # RFC 1071's example header (a classic): 4500 0073 0000 4000 4011 [b861] c0a8 0001 c0a8 00c7
    hdr = bytearray.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert ip_checksum(hdr) == 0xB861
    assert fold(0x1FFFF) == 1 and fold(0xFFFF) == 0xFFFF
    src, dst = parse_ip("10.0.0.1").value, parse_ip("10.0.0.2").value
    assert pseudo_header_sum(src, dst, 6, 20) == 0x0A00 + 0x0001 + 0x0A00 + 0x0002 + 6 + 20


# ---- packets ---------------------------------------------------------------------

def ip_packet(dst, size, src="10.244.1.2", proto=17, ident=0):
    """An IPv4 packet of `size` bytes (valid header, zero payload)."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, ident, 0x4000, 64, proto, 0,
                                socket.inet_aton(src), socket.inet_aton(dst)))
    struct.pack_into("!H", hdr, 10, ip_checksum(hdr))
    return bytes(hdr) + bytes(size - 20)


def tcp_packet(seq, payload, src="10.244.1.2", dst="10.244.2.2", flags=0x10, ack=1000, win=502,
               ts=(111, 222), ident=0, sport=40000, dport=5201):
    opts = struct.pack("!BBBBII", 1, 1, 8, 10, *ts) if ts else b""
    thl = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, win, 0xBEEF, 0) + opts
    total = 20 + len(tcp) + len(payload)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000, 64, 6, 0,
                                socket.inet_aton(src), socket.inet_aton(dst)))
    struct.pack_into("!H", hdr, 10, ip_checksum(hdr))
    return bytes(hdr) + tcp + payload


class FakeTun:
    """readv: hands out the queued packets, then BlockingIOError; wait() stops after `rounds`."""

    def __init__(self, rounds, hdr_len=0):
        self.rounds = [list(r) for r in rounds]     # packets, one list per wake-up
        self.queue = self.rounds.pop(0) if self.rounds else []
        self.hdr_len = hdr_len

    def readv(self, iov):
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "empty")
        pkt = self.queue.pop(0)
        if self.hdr_len:
            iov[0][:] = bytes(self.hdr_len)
        slot = iov[-1]
        slot[:len(pkt)] = pkt
        return self.hdr_len + len(pkt)

    def wait(self):
        if not self.rounds:
            return False
        self.queue = self.rounds.pop(0)
        return True


class FakeSocket:
    def __init__(self, fail_gso=None):
        self.sent = []          # (payload bytes, segment size or None, address)
        self.fail_gso = fail_gso

    def sendmsg(self, buffers, anc, flags, address):
        data = b"".join(bytes(b) for b in buffers)
        seg = None
        for level, kind, value in anc:
            assert (level, kind) == (SOL_UDP, UDP_SEGMENT)
            seg = struct.unpack("=H", value)[0]
            if self.fail_gso:
                raise OSError(self.fail_gso, "refused")
        self.sent.append((data, seg, address))
        return len(data)


def pump_tun(fwd, rounds, sock=None, hdr_len=0):
    tun = FakeTun(rounds, hdr_len)
    sock = sock or FakeSocket()
    fwd.pump_tun(tun.readv, sock.sendmsg, tun.wait, hdr_len)
    return sock.sent


def forwarder(gso=True, vnet=False):
    fwd = Forwarder(1472, gso=gso, vnet=vnet)
    fwd.set_routes(*route_table({parse_net("10.244.2.0/24"): A, parse_net("10.244.3.0/24"): B}))
    fwd.set_local(parse_net("10.244.1.0/24"))
    return fwd


# ---- TUN -> UDP: batching --------------------------------------------------------

def test_equal_packets_to_one_node_leave_in_one_gso_send():
    pkts = [ip_packet("10.244.2.%d" % (i + 2), 1400) for i in range(5)]
    sent = pump_tun(forwarder(), [pkts])
    assert sent == [(b"".join(pkts), 1400, A)]


def test_a_lone_packet_is_sent_at_once_without_gso():
    pkt = ip_packet("10.244.2.2", 84)
    fwd = forwarder()
    assert pump_tun(fwd, [[pkt], [pkt]]) == [(pkt, None, A), (pkt, None, A)]
    assert fwd.stats.tun_packets == 2 and fwd.stats.sends == 2 and fwd.stats.gso_sends == 0


def test_batches_break_at_another_node_and_at_a_bigger_packet():
    a1, a2 = ip_packet("10.244.2.2", 1400), ip_packet("10.244.2.3", 1400)
    b1 = ip_packet("10.244.3.2", 1400)
    small, big = ip_packet("10.244.2.2", 60), ip_packet("10.244.2.2", 1000)
    sent = pump_tun(forwarder(), [[a1, a2, b1, small, big, big]])
    assert sent == [(a1 + a2, 1400, A), (b1, None, B), (small, None, A), (big + big, 1000, A)]


def test_a_shorter_packet_ends_the_batch_as_its_last_segment():
    full, short = ip_packet("10.244.2.2", 1400), ip_packet("10.244.2.2", 500)
    after = ip_packet("10.244.2.2", 1400)
    sent = pump_tun(forwarder(), [[full, full, short, after]])
    assert sent == [(full + full + short, 1400, A), (after, None, A)]


def test_batches_respect_the_segment_count_and_64k():
    small = ip_packet("10.244.2.2", 100)
    sent = pump_tun(forwarder(), [[small] * 70])
    assert [len(d) // 100 for d, _, _ in sent] == [64, 6]
    full = ip_packet("10.244.2.2", 1472)
    sent = pump_tun(forwarder(), [[full] * 50])
    counts = [len(d) // 1472 for d, _, _ in sent]
    assert counts == [44, 6]            # 44 * 1472 = 64768 <= 65507 < 45 * 1472
    assert all(len(d) <= 65507 for d, _, _ in sent)


def test_the_batch_buffer_wraps_without_corrupting_packets():
    # Alternating destinations: every packet starts a new batch further along the buffer.
    pkts = [ip_packet("10.244.%d.2" % (2 + i % 2), 1472, ident=i) for i in range(400)]
    sent = pump_tun(forwarder(), [pkts])
    assert [d for d, _, _ in sent] == pkts


def test_no_route_and_non_ipv4_are_dropped_and_counted():
    fwd = forwarder()
    ipv6 = bytes([0x60]) + bytes(59)
    truncated = ip_packet("10.244.2.2", 1400)[:1000]
    sent = pump_tun(fwd, [[ip_packet("10.244.9.2", 100), ipv6, truncated, b"\x45" * 10,
                           ip_packet("10.244.2.2", 100)]])
    assert sent == [(ip_packet("10.244.2.2", 100), None, A)]
    assert fwd.stats.no_route == 1 and fwd.stats.tun_dropped == 3


def test_without_gso_every_packet_is_its_own_send():
    pkts = [ip_packet("10.244.2.2", 1400)] * 3
    assert pump_tun(forwarder(gso=False), [pkts]) == [(p, None, A) for p in pkts]


def test_a_refused_gso_send_falls_back_to_one_datagram_per_packet():
    fwd = forwarder()
    pkts = [ip_packet("10.244.2.2", 1400)] * 3
    sock = FakeSocket(fail_gso=errno.EIO)
    sent = pump_tun(fwd, [pkts, pkts], sock)
    assert sent == [(p, None, A) for p in pkts + pkts]
    assert fwd.max_segments == 1


def test_a_new_table_applies_from_the_next_batch():
    fwd = forwarder()
    tun = FakeTun([[ip_packet("10.244.2.2", 100)], [ip_packet("10.244.2.2", 100)]])
    sock = FakeSocket()

    def wait():
        fwd.set_routes(*route_table({parse_net("10.244.2.0/24"): B}))
        return tun.wait()
    fwd.pump_tun(tun.readv, sock.sendmsg, wait)
    assert [addr for _, _, addr in sock.sent] == [A, B]


def test_reads_past_the_virtio_header():
    pkts = [ip_packet("10.244.2.2", 1400)] * 2
    assert pump_tun(forwarder(vnet=True), [pkts], hdr_len=VNET_HDR_LEN) == [(pkts[0] * 2, 1400, A)]


# ---- UDP -> TUN: GRO splitting, filtering, TCP coalescing ------------------------------

class FakeUDP:
    """recvmsg_into: one coalesced buffer per call (with a UDP_GRO cmsg if seg given)."""

    def __init__(self, datagrams):
        self.datagrams = list(datagrams)    # (bytes, seg or None)

    def recvmsg_into(self, buffers, ancsize, flags):
        assert flags & socket.MSG_DONTWAIT
        if not self.datagrams:
            raise BlockingIOError(errno.EAGAIN, "empty")
        data, seg = self.datagrams.pop(0)
        buffers[0][:len(data)] = data
        anc = [(SOL_UDP, UDP_GRO, struct.pack("=i", seg))] if seg else []
        return len(data), anc, 0, ("192.168.50.2", 8285)


def pump_udp(fwd, datagrams, fail_tso=False):
    written = []

    def writev(parts):
        data = b"".join(bytes(p) for p in parts)
        if fail_tso and data[1] == 1:       # gso_type TCPV4
            raise OSError(errno.EINVAL, "no")
        written.append(data)
    udp = FakeUDP(datagrams)
    fwd.pump_udp(udp.recvmsg_into, writev, lambda: False)
    return written


def test_gro_buffers_are_split_at_the_segment_size():
    pkts = [ip_packet("10.244.1.%d" % i, 1000, src="10.244.2.2") for i in range(2, 5)]
    last = ip_packet("10.244.1.9", 300, src="10.244.2.2")
    fwd = forwarder()
    written = pump_udp(fwd, [(b"".join(pkts) + last, 1000), (pkts[0], None)])
    assert written == pkts + [last, pkts[0]]
    assert fwd.stats.recvs == 2 and fwd.stats.delivered == 5


def test_only_packets_for_our_subnet_reach_the_tun():
    ours, theirs = ip_packet("10.244.1.2", 200), ip_packet("10.244.3.2", 200)
    bogus = b"\x60" + bytes(199)            # IPv6
    liar = bytearray(ip_packet("10.244.1.2", 200))
    liar[2:4] = struct.pack("!H", 5000)     # claims more than it has
    fwd = forwarder()
    written = pump_udp(fwd, [(ours + theirs + bogus + bytes(liar), 200), (b"\x45" * 12, None)])
    assert written == [ours]
    assert fwd.stats.foreign == 1 and fwd.stats.malformed == 3


def test_with_vnet_every_packet_gets_a_plain_virtio_header():
    pkt = ip_packet("10.244.1.2", 200, proto=1)
    assert pump_udp(forwarder(vnet=True), [(pkt, None)]) == [VNET_NONE + pkt]


def flow(n, mss=1400, start=5000, **kw):
    return [tcp_packet(start + i * mss, bytes([i]) * mss, dst="10.244.1.2", ident=i, **kw)
            for i in range(n)]


def check_tso(data, segments, mss, psh=False):
    """`data` is one TSO write of `segments` (the original packets): check every field."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("=BBHHHH", data)
    assert (flags, gso_type, gso_size, csum_start, csum_offset) == (1, 1, mss, 20, 16)
    pkt = data[VNET_HDR_LEN:]
    first = segments[0]
    hl = 20 + (first[32] >> 4) * 4
    assert hdr_len == hl
    payload = b"".join(s[hl:] for s in segments)
    assert pkt[hl:] == payload
    assert struct.unpack_from("!H", pkt, 2)[0] == len(pkt) == hl + len(payload)
    assert ip_checksum(pkt[:10] + b"\0\0" + pkt[12:20]) == struct.unpack_from("!H", pkt, 10)[0]
    src, dst = struct.unpack_from("!II", pkt, 12)
    assert struct.unpack_from("!H", pkt, 36)[0] == pseudo_header_sum(src, dst, 6, len(pkt) - 20)
    assert pkt[24:28] == first[24:28]       # the first sequence number
    assert bool(pkt[33] & 0x08) == psh
    # Everything else as in the first segment.
    assert pkt[:2] + pkt[4:10] + pkt[12:33] == first[:2] + first[4:10] + first[12:33]
    assert pkt[34:36] + pkt[38:hl] == first[34:36] + first[38:hl]


def test_a_tcp_run_is_written_as_one_tso_packet():
    segs = flow(5)
    fwd = forwarder(vnet=True)
    written = pump_udp(fwd, [(b"".join(segs), 1452)])
    assert len(written) == 1
    check_tso(written[0], segs, 1400)
    assert fwd.stats.coalesced == 1 and fwd.stats.delivered == 5


def test_a_short_or_psh_segment_closes_the_run():
    segs = flow(3)
    short = tcp_packet(5000 + 3 * 1400, b"z" * 600, dst="10.244.1.2", flags=0x18)   # PSH, ACK
    after = flow(2, start=5000 + 3 * 1400 + 600)
    # Two receives (a GRO buffer holds equal segments but for the last).
    written = pump_udp(forwarder(vnet=True), [(b"".join(segs + [short]), 1452), (b"".join(after), 1452)])
    assert len(written) == 2
    check_tso(written[0], segs + [short], 1400, psh=True)
    check_tso(written[1], after, 1400)
    # A PSH in the middle of a buffer closes the run there; the rest starts a new one.
    pushed = tcp_packet(5000 + 2 * 1400, b"p" * 1400, dst="10.244.1.2", flags=0x18, ident=2)
    more = flow(2, start=5000 + 3 * 1400)
    written = pump_udp(forwarder(vnet=True), [(b"".join(segs[:2] + [pushed] + more), 1452)])
    assert len(written) == 2
    check_tso(written[0], segs[:2] + [pushed], 1400, psh=True)
    check_tso(written[1], more, 1400)


def test_runs_break_on_any_header_difference():
    base = flow(2)
    cases = {
        "gap in sequence": tcp_packet(5000 + 3 * 1400, b"x" * 1400, dst="10.244.1.2"),
        "new timestamp": tcp_packet(5000 + 2 * 1400, b"x" * 1400, dst="10.244.1.2", ts=(112, 222)),
        "other ack": tcp_packet(5000 + 2 * 1400, b"x" * 1400, dst="10.244.1.2", ack=2000),
        "window": tcp_packet(5000 + 2 * 1400, b"x" * 1400, dst="10.244.1.2", win=600),
        "other flow": tcp_packet(5000 + 2 * 1400, b"x" * 1400, dst="10.244.1.2", sport=40001),
        "FIN": tcp_packet(5000 + 2 * 1400, b"x" * 1400, dst="10.244.1.2", flags=0x11),
    }
    for name, third in cases.items():
        written = pump_udp(forwarder(vnet=True), [(b"".join(base) + third, 1452)])
        assert len(written) == 2, name
        check_tso(written[0], base, 1400)
        assert written[1] == VNET_NONE + third, name


def test_what_is_never_coalesced():
    no_ts = flow(3, ts=None)                                    # no options: a 40-byte header
    syn = [tcp_packet(1, b"", dst="10.244.1.2", flags=0x02)]
    bare_acks = [tcp_packet(1, b"", dst="10.244.1.2")] * 3
    written = pump_udp(forwarder(vnet=True), [(b"".join(no_ts), 1440), (syn[0], None),
                                              (b"".join(bare_acks), 52)])
    check_tso(written[0], no_ts, 1400)
    assert written[1:] == [VNET_NONE + p for p in syn + bare_acks]
    # Without a virtio header nothing is coalesced.
    segs = flow(3)
    assert pump_udp(forwarder(vnet=False), [(b"".join(segs), 1452)]) == segs


def test_a_refused_tso_write_falls_back_to_the_original_packets():
    segs = flow(4)
    fwd = forwarder(vnet=True)
    written = pump_udp(fwd, [(b"".join(segs), 1452), (b"".join(segs), 1452)], fail_tso=True)
    assert written == [VNET_NONE + s for s in segs + segs]
    assert fwd.coalesce is False


def test_run_mask_leaves_out_exactly_the_fields_that_change():
    mask, tshift, sshift, pshift = _run_mask(52)
    raw = mask.to_bytes(52, "big")
    varying = {2, 3, 4, 5, 10, 11, 24, 25, 26, 27, 36, 37}
    for i, byte in enumerate(raw):
        want = 0 if i in varying else (0xF7 if i == 33 else 0xFF)
        assert byte == want, i
    h = int.from_bytes(tcp_packet(0x01020304, b"x" * 10, flags=0x18)[:52], "big")
    assert (h >> tshift) & 0xFFFF == 62 and (h >> sshift) & 0xFFFFFFFF == 0x01020304
    assert (h >> pshift) & 1 == 1


@pytest.mark.skipif(sys.byteorder != "little", reason="the GRO cmsg is host-endian")
def test_gro_cmsg_is_read_host_endian():
    pkt = ip_packet("10.244.1.2", 700)
    assert len(pump_udp(forwarder(), [(pkt * 2, 700)])) == 2
