"""flannel's udp backend: a TUN device and a userspace forwarder.

Every node has `flannel0`, a TUN device holding <own subnet>.0/<network
prefix> (10.244.1.0/16), so the kernel routes the whole cluster network into
it. The forwarder reads those IP packets, looks up which node holds the
destination's subnet and sends each packet, unchanged, as one UDP datagram to
that node's public IP, port 8285; received datagrams are written back into
the TUN after checking that they are for this node's subnet. The wire format
is flannel's, so our nodes and flannel's udp nodes interoperate.

The engine (Forwarder) runs two threads, one per direction. Python's per
packet cost dominates, so everything that can be batched is:
  - TUN -> UDP: packets are read into one preallocated buffer back to back;
    a run of packets to the same node with equal sizes (the last may be
    shorter) leaves in one sendmsg with UDP_SEGMENT (UDP GSO): the kernel
    cuts it into one datagram per packet, so the wire still carries one IP
    packet per UDP datagram. A batch is sent as soon as the TUN has nothing
    more queued, so a lone packet (a ping) is not delayed.
  - UDP -> TUN: UDP_GRO lets the kernel hand over up to 64 KiB of same-size
    datagrams from one sender in one recvmsg; a cmsg gives the segment size
    and the buffer is split at those boundaries.
  - Userspace GRO for TCP: the TUN is opened with IFF_VNET_HDR, so a run of
    segments of one TCP flow (headers equal but for IDs, lengths, checksums
    and the sequence number, which must be contiguous) is written as ONE TSO
    packet with a virtio_net_hdr (GSO_TCPV4, CHECKSUM_PARTIAL): the kernel
    forwards it into the pod whole, as its own GRO would. This halved the
    receiving node's CPU per packet: without it, each 1.4 KB segment went
    through forwarding and the pod's TCP on its own.
  - 4 MiB socket buffers; a blocking send (backpressure into the TUN queue)
    and a non-blocking receive; poll() only when there is nothing to read;
    os.readv / os.writev bound with functools.partial (no Python frame).
  - The subnet lookup is one dict access keyed by the masked destination.
What stays per packet is one TUN read: reading TSO packets from the TUN would
need the inner TCP checksum of every segment computed here, ~3 us per 1.4 KB
in pure Python, more than the read costs. Without GSO/GRO (old kernels, or a
send/write the kernel refuses) it falls back to one syscall per packet.

Why threads and not a process per direction: both threads drop the GIL in
every syscall, and in a TCP transfer one direction carries data and the other
mostly ACKs, so they rarely compete; a table swap is one attribute
assignment (no IPC), and close() is a join.

Why the TUN is persistent (TUNSETPERSIST), unlike flannel's: flannel's
flannel0 vanishes with the process, taking the 10.244.0.0/16 route along, so
during a restart pod traffic to other nodes is answered "network unreachable"
(or follows a default route out unencapsulated), and node-originated
connections lose their source address. A persistent TUN keeps the device, its
address and route: while no process is attached, packets into it are dropped
(TCP retransmits, connections survive), and the next process adopts the same
device by name (TUNSETIFF attaches to an existing TUN). close() therefore
leaves the device in place, as Backend.close promises for every backend.

Run alone, for tests and benchmarks (inside the node's namespace, or with
--netns to enter it first); see main() for the stdin protocol:

    python -m flanneld.backend.udp --iface eth0 --network 10.244.0.0/16 \\
        --subnet 10.244.1.0/24 --lease 10.244.2.0/24=192.168.50.2
"""
import errno
import functools
import logging
import os
import select
import socket
import struct
import sys
import threading

from flanneld.backend.base import Backend, SkippedLeases

log = logging.getLogger("flanneld.udp")

TUN_NAME = "flannel0"
DEFAULT_PORT = 8285
ENCAP_OVERHEAD = 28             # outer IPv4 (20) + UDP (8) headers

# <linux/udp.h> (the TUN's ioctls are podnet.net.tun's)
SOL_UDP = 17
UDP_SEGMENT = 103               # send: cut the payload into datagrams of this size (GSO)
UDP_GRO = 104                   # receive: coalesced datagrams, cmsg gives the size
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

SOCKET_BUFFER = 4 << 20
# The TUN's queue (the kernel's default is 500 packets): where a pod's TCP
# bursts wait for the engine. At 500 a bulk stream overflowed it and lost ~4%
# of its packets (retransmitted, through the engine again); 1000 packets is
# ~6 ms at 2 Gbit/s.
TUN_TXQLEN = 1000
MAX_SEGMENTS = 64               # UDP_MAX_SEGMENTS is 64 on older kernels (128 on newer)
MAX_BATCH_BYTES = 65535 - ENCAP_OVERHEAD   # one IPv4 UDP payload
RECV_BUFFER = 65536

# virtio_net_hdr (<linux/virtio_net.h>), in front of every packet on a TUN with IFF_VNET_HDR
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VNET_HDR_LEN = 10
VNET_NONE = bytes(VNET_HDR_LEN)     # a plain packet, checksums as they are

_IPV4 = struct.Struct("!BxH12xI")   # version/IHL, total length, destination
_IP4 = struct.Struct("!BBHHHBBHII")     # the whole IPv4 header
_TCP = struct.Struct("!IIIHHHH")        # ports, seq, ack, offset+flags, window, checksum, urgent
_VNET = struct.Struct("=BBHHHH")        # flags, gso type, header len, gso size, csum start, csum offset
_U16 = struct.Struct("=H")
_U16BE = struct.Struct("!H")
_ADDRS = struct.Struct("!II")
_IPHDR_WORDS = struct.Struct("!10H")


def prefix_mask(prefixlen):
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


def route_table(desired):
    """{IPNet: (ip, port)} (all of one prefix length) -> (table, mask) for the engine:
    {masked destination int: (ip, port)}, looked up as table.get(dst & mask)."""
    lengths = {net.prefixlen for net in desired}
    if len(lengths) > 1:
        raise ValueError("subnets of different lengths: %s" % sorted(lengths))
    mask = prefix_mask(lengths.pop()) if lengths else 0xFFFFFFFF
    return {net.network.value: remote for net, remote in desired.items()}, mask


def lookup(routes, dst):
    """The (ip, port) for a destination address (an int), or None."""
    table, mask = routes
    return table.get(dst & mask)


def fold(s):
    """The 16-bit one's complement sum of a larger sum of 16-bit words."""
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return s


def ip_checksum(buf, off=0):
    """The IPv4 header checksum of the 20 bytes at off (their checksum field must be 0)."""
    return ~fold(sum(_IPHDR_WORDS.unpack_from(buf, off))) & 0xFFFF


def pseudo_header_sum(src, dst, proto, length):
    """Folded, not inverted, sum of the IPv4 pseudo header: what the checksum
    field holds in a CHECKSUM_PARTIAL packet (the kernel adds header and data)."""
    return fold((src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + length)


_masks: dict[int, tuple[int, int, int, int]] = {}     # header length -> _run_mask(hl)


def _run_mask(hl):
    """For TCP/IPv4 headers of hl bytes read as one big-endian int: the mask of
    what must be equal across a TSO run (not the total length, IP ID, the two
    checksums, the sequence number, PSH), and the shifts of total length,
    sequence number and the PSH bit."""
    got = _masks.get(hl)
    if got is None:
        bits = 8 * hl
        mask = (1 << bits) - 1
        for start, size in ((2, 2), (4, 2), (10, 2), (24, 4), (36, 2)):
            mask &= ~(((1 << 8 * size) - 1) << (bits - 8 * (start + size)))
        mask &= ~(0x08 << (bits - 8 * 34))
        got = _masks[hl] = (mask, bits - 32, bits - 8 * 28, bits - 8 * 34 + 3)
    return got


def gro_segments(n, seg):
    """[(start, end)] of the packets in an n-byte buffer coalesced at `seg` bytes."""
    if seg <= 0:
        seg = n
    return [(off, min(off + seg, n)) for off in range(0, n, seg)]


class Stats:
    """Counters, updated by the engine threads per batch (not per packet where avoidable)."""

    __slots__ = ("tun_packets", "sends", "gso_sends", "no_route", "tun_dropped", "send_errors", "send_dropped",
                 "recvs", "delivered", "coalesced", "foreign", "malformed", "write_errors")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class Forwarder:
    """TUN <-> UDP, one thread per direction. I/O goes through the callables handed
    to pump_tun / pump_udp, so the batching logic runs in unit tests on fakes."""

    def __init__(self, mtu, gso=True, vnet=False):
        self.mtu = mtu
        self.max_segments = MAX_SEGMENTS if gso else 1
        self.vnet = vnet                    # the TUN fd carries virtio_net_hdr
        self.coalesce = vnet                # write TCP runs as TSO packets
        self.routes = ({}, 0xFFFFFFFF)      # (table, mask), replaced whole by set_routes
        self.local = (0, 0xFFFFFFFF)        # (own subnet, mask): what UDP -> TUN delivers
        self.stats = Stats()
        self.stopping = False
        self.threads = []
        self._wake_r = self._wake_w = None

    def set_routes(self, table, mask):
        self.routes = (table, mask)         # one assignment: atomic for the engine threads

    def set_local(self, subnet):
        self.local = (subnet.network.value, prefix_mask(subnet.prefixlen))

    # ---- TUN -> UDP ----

    def pump_tun(self, readv, sendmsg, wait, hdr_len=0):
        """Until stopped: read packets, batch them, send.

        readv(buffers) reads one packet as os.readv on the (non-blocking) TUN
        does, raising BlockingIOError when nothing is queued; the first
        hdr_len bytes (a virtio_net_hdr) go to a scratch buffer.
        sendmsg(buffers, ancdata, flags, address) as a socket's; wait() blocks
        until there is more to read and returns False when the engine stops.

        Packets land back to back in `buf` from `start`; the batch is
        [start, fill): `count` packets for `dest`, all `seg` bytes long except
        perhaps the last, which then closes the batch.
        """
        mtu = self.mtu
        max_segments = self.max_segments
        size = MAX_BATCH_BYTES + 2 * mtu + 4096
        buf = bytearray(size)
        mv = memoryview(buf)
        wrap_at = size - MAX_BATCH_BYTES - mtu  # a batch starting later is moved to 0 first
        unpack = _IPV4.unpack_from
        stats = self.stats
        send = self._send
        table, mask = self.routes
        iov = [bytearray(hdr_len), None] if hdr_len else [None]
        start = fill = count = seg = 0
        dest = None
        while True:
            iov[-1] = mv[fill:fill + mtu]
            try:
                n = readv(iov) - hdr_len
            except BlockingIOError:
                if count:
                    send(sendmsg, mv[start:fill], seg, count, dest)
                    start = fill = count = 0
                    max_segments = self.max_segments
                if self.stopping or not wait():
                    return
                table, mask = self.routes
                continue
            except OSError as e:
                if not self.stopping:
                    log.error("reading %s failed (%s): forwarding to other nodes stops", TUN_NAME,
                              e.strerror)
                return
            if n < 20:
                stats.tun_dropped += 1
                continue
            vihl, total, dst = unpack(buf, fill)
            if vihl >> 4 != 4 or total != n:
                stats.tun_dropped += 1      # IPv6 (router solicitations...) or truncated
                continue
            remote = table.get(dst & mask)
            if remote is None:
                stats.no_route += 1
                continue
            if count:
                if remote == dest and n <= seg:
                    fill += n
                    count += 1
                    if n < seg or count >= max_segments or fill - start + seg > MAX_BATCH_BYTES:
                        send(sendmsg, mv[start:fill], seg, count, dest)
                        start = fill = count = 0
                        if self.stopping:
                            return
                        table, mask = self.routes
                        max_segments = self.max_segments
                    continue
                # Another node or a bigger packet: send the batch, this packet starts the next.
                send(sendmsg, mv[start:fill], seg, count, dest)
                if self.stopping:
                    return
                max_segments = self.max_segments
                if fill > wrap_at:
                    buf[0:n] = mv[fill:fill + n]    # no overlap: fill > wrap_at >= mtu >= n
                    fill = 0
                start = fill
            dest = remote
            seg = n
            count = 1
            fill += n
            if max_segments == 1:
                send(sendmsg, mv[start:fill], seg, 1, dest)
                start = fill = count = 0

    def _send(self, sendmsg, data, seg, count, dest):
        stats = self.stats
        stats.tun_packets += count
        sends = stats.sends             # what the per-packet fallback sent before a failure
        try:
            if count == 1:
                sendmsg((data,), (), 0, dest)
                stats.sends += 1
                return
            if self.max_segments > 1:
                try:
                    sendmsg((data,), ((SOL_UDP, UDP_SEGMENT, _U16.pack(seg)),), 0, dest)
                    stats.sends += 1
                    stats.gso_sends += 1
                    return
                except OSError as e:
                    # EIO: the route's device cannot checksum-offload; EINVAL:
                    # path MTU below the segment; ENOPROTOOPT: no UDP GSO at all.
                    log.warning("UDP GSO send to %s:%d failed (%s): sending one datagram per "
                                "packet from now on", dest[0], dest[1], e.strerror)
                    self.max_segments = 1
            for start, end in gro_segments(len(data), seg):
                sendmsg((data[start:end],), (), 0, dest)
                stats.sends += 1
        except OSError as e:
            # ENOBUFS, EHOSTUNREACH (no ARP answer), ENETUNREACH...: these packets are lost.
            stats.send_errors += 1
            stats.send_dropped += count - (stats.sends - sends)
            if stats.send_errors == 1 or stats.send_errors % 10000 == 0:
                log.warning("send to %s:%d failed (%s; %d so far)", dest[0], dest[1], e.strerror,
                            stats.send_errors)

    # ---- UDP -> TUN ----

    def pump_udp(self, recvmsg_into, writev, wait):
        """Until stopped: receive (coalesced) datagrams, write the inner packets to the TUN.

        recvmsg_into(buffers, ancbufsize, flags) as a socket's, raising
        BlockingIOError when nothing is queued; writev(buffers) writes one
        packet (the buffers concatenated) to the TUN, a virtio_net_hdr first
        when self.vnet.

        With self.coalesce (needs vnet), consecutive TCP segments of one flow
        (same headers but for the sequence number, contiguous, ACK and at most
        PSH set) are written as one TSO packet of up to 64 KiB that the kernel
        forwards whole into the pod (userspace GRO); everything else is written
        as it came.
        """
        buf = bytearray(RECV_BUFFER)
        mv = memoryview(buf)
        bufs = (mv,)
        ancsize = socket.CMSG_SPACE(4)
        unpack_ip = _IP4.unpack_from
        unpack_tcp = _TCP.unpack_from
        from_bytes = int.from_bytes
        stats = self.stats
        local, lmask = self.local
        head = (VNET_NONE,) if self.vnet else ()
        trunc = socket.MSG_TRUNC
        dontwait = socket.MSG_DONTWAIT
        write_one = self._write_one
        write_run = self._write_run
        # The TCP run being collected: r_count segments from offset r_off, headers
        # r_hl bytes long and equal to r_h under r_mask, r_mss payload bytes each
        # (the last may be shorter), r_payload in all; `parts` the buffers to write.
        r_count = r_off = r_hl = r_mss = r_h = r_mask = r_payload = next_seq = 0
        r_tshift = r_sshift = r_pshift = 0
        parts = None
        while True:
            try:
                n, anc, flags, _ = recvmsg_into(bufs, ancsize, dontwait)
            except BlockingIOError:
                if self.stopping or not wait():
                    return
                local, lmask = self.local
                continue
            except OSError as e:
                if e.errno == errno.EBADF or self.stopping:
                    return
                stats.malformed += 1
                continue
            stats.recvs += 1
            if flags & trunc:
                stats.malformed += 1
                continue
            seg = n
            for level, kind, data in anc:
                if kind == UDP_GRO and level == SOL_UDP:
                    seg = int.from_bytes(data[:4], sys.byteorder) or n
            coalesce = self.coalesce
            off = 0
            while off < n:
                end = off + seg
                if end > n:
                    end = n
                if r_count:
                    # The next segment of the run? Equal headers but for the
                    # lengths, IDs, checksums, sequence number and PSH.
                    if end - off >= r_hl:
                        h = from_bytes(buf[off:off + r_hl], "big")
                        if not (h ^ r_h) & r_mask:
                            total = (h >> r_tshift) & 0xFFFF
                            plen = total - r_hl
                            if (h >> r_sshift) & 0xFFFFFFFF == next_seq and 0 < plen <= r_mss \
                                    and total <= end - off:
                                parts.append(mv[off + r_hl:off + total])
                                r_payload += plen
                                r_count += 1
                                next_seq = (next_seq + plen) & 0xFFFFFFFF
                                psh = (h >> r_pshift) & 1
                                if plen < r_mss or psh or r_hl + r_payload + r_mss > 65535:
                                    write_run(writev, buf, r_off, r_hl, r_mss, parts, r_payload, r_count,
                                              psh, head, seg)
                                    r_count = 0
                                off = end
                                continue
                    write_run(writev, buf, r_off, r_hl, r_mss, parts, r_payload, r_count, 0, head, seg)
                    r_count = 0
                if end - off < 20:
                    stats.malformed += 1
                    off = end
                    continue
                vihl, _, total, _, frag, _, proto, _, _, dst = unpack_ip(buf, off)
                if vihl >> 4 != 4 or total > end - off or total < 20:
                    stats.malformed += 1
                elif dst & lmask != local:
                    stats.foreign += 1      # not for our subnet: never injected
                elif coalesce and proto == 6 and vihl == 0x45 and not frag & 0x3FFF and total >= 40:
                    seq, offflags = unpack_tcp(buf, off + 20)[1:4:2]
                    hl = 20 + ((offflags >> 10) & 0x3C)
                    plen = total - hl
                    if plen > 0 and hl >= 40 and offflags & 0xFF == 0x10:   # ACK only, with data
                        r_count, r_off, r_hl, r_mss, r_payload = 1, off, hl, plen, plen
                        r_h = from_bytes(buf[off:off + hl], "big")
                        r_mask, r_tshift, r_sshift, r_pshift = _run_mask(hl)
                        next_seq = (seq + plen) & 0xFFFFFFFF
                        parts = [None, mv[off:off + total]]
                    else:
                        write_one(writev, head, mv[off:off + total])
                else:
                    write_one(writev, head, mv[off:off + total])
                off = end
            if r_count:
                write_run(writev, buf, r_off, r_hl, r_mss, parts, r_payload, r_count, 0, head, seg)
                r_count = 0
            if self.stopping:
                return

    def _write_one(self, writev, head, packet):
        try:
            writev(head + (packet,))
            self.stats.delivered += 1
        except OSError:
            self.stats.write_errors += 1

    def _write_run(self, writev, buf, first, hl, mss, parts, payload, count, psh, head, seg):
        """Write a run of TCP segments: alone if one, else as one TSO packet."""
        if count == 1:
            self._write_one(writev, head, parts[1])
            return
        saved = bytes(buf[first:first + hl])
        total = hl + payload
        # IPv4 header: the total length, then the header checksum (ip_rcv checks it).
        _U16BE.pack_into(buf, first + 2, total)
        _U16BE.pack_into(buf, first + 10, 0)
        _U16BE.pack_into(buf, first + 10, ip_checksum(buf, first))
        if psh:
            buf[first + 33] |= 0x08
        # TCP checksum: the pseudo-header sum only (CHECKSUM_PARTIAL, as a TSO packet has it).
        src, dst = _ADDRS.unpack_from(buf, first + 12)
        _U16BE.pack_into(buf, first + 36, pseudo_header_sum(src, dst, 6, total - 20))
        parts[0] = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hl, mss, 20, 16)
        try:
            writev(parts)
            self.stats.delivered += count
            self.stats.coalesced += 1
            return
        except OSError as e:
            log.warning("writing a TSO packet to the TUN failed (%s): no more coalescing", e.strerror)
            self.coalesce = False
        # Undo: the first packet as it came, then each one on its own.
        buf[first:first + hl] = saved
        self._write_one(writev, head, parts[1])
        for i in range(1, count):       # consecutive datagrams of the receive buffer
            off = first + i * seg
            total = _U16BE.unpack_from(buf, off + 2)[0]
            self._write_one(writev, head, memoryview(buf)[off:off + total])

    # ---- threads ----

    def start(self, tun_fd, sock):
        """Run both directions on these (already configured) descriptors."""
        if self.threads:
            return
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(tun_fd, False)
        # partial: C-level callables, no Python frame per packet.
        readv = functools.partial(os.readv, tun_fd)
        writev = functools.partial(os.writev, tun_fd)
        tun_wait = self._waiter(tun_fd)
        udp_wait = self._waiter(sock.fileno())

        def run(target, *args):
            try:
                target(*args)
            except Exception:
                log.exception("udp forwarder thread %s failed", threading.current_thread().name)

        self.threads = [
            threading.Thread(target=run, args=(self.pump_tun, readv, sock.sendmsg, tun_wait,
                                                     VNET_HDR_LEN if self.vnet else 0),
                             name="udp-tun-to-udp", daemon=True),
            threading.Thread(target=run, args=(self.pump_udp, sock.recvmsg_into, writev, udp_wait),
                             name="udp-udp-to-tun", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def alive(self):
        """Both directions running (a thread that failed has logged why)."""
        return bool(self.threads) and all(t.is_alive() for t in self.threads)

    def _waiter(self, fd):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)

        def wait():
            events = poller.poll()
            if self.stopping:
                return False
            for _, ev in events:
                if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    log.error("forwarder descriptor %d failed (poll events %#x): stopping", fd, ev)
                    return False
            return True
        return wait

    def stop(self, timeout=5.0):
        self.stopping = True
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout)
            if t.is_alive():
                log.error("forwarder thread %s did not stop", t.name)
        self.threads = []
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None


# ---- the TUN device and the socket ---------------------------------------------

def open_tun(name=TUN_NAME, persist=True, vnet=True):
    """Create the TUN `name`, or attach to an existing one (a persistent TUN a
    previous daemon left); returns the fd. EBUSY: another process holds it.
    vnet: every packet read or written carries a virtio_net_hdr (IFF_VNET_HDR)."""
    from podnet.net import tun
    fd, _ = tun.open_tun(name, persist=persist, vnet=vnet,
                         busy_hint="another process holds it (a flanneld still running?)")
    return fd


def open_socket(ip, port):
    """The UDP socket bound to ip:port, with big buffers; returns (sock, gso, gro)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((ip, port))
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:     # needs CAP_NET_ADMIN; the plain one is capped by net.core.*mem_max
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        gso = _try_setsockopt(sock, UDP_SEGMENT, 0)     # probe: 0 means "no GSO by default"
        gro = _try_setsockopt(sock, UDP_GRO, 1)
    except BaseException:
        sock.close()
        raise
    return sock, gso, gro


def _try_setsockopt(sock, opt, value):
    try:
        sock.setsockopt(SOL_UDP, opt, value)
        return True
    except OSError:
        return False


# ---- the backend --------------------------------------------------------------

class UDPBackend(Backend):
    type = "udp"

    def __init__(self, config, ext, offload=True, tun_name=TUN_NAME):
        super().__init__(config, ext)
        self.port = config.option("Port", DEFAULT_PORT)     # checked by flanneld.config
        self.offload = offload          # False: no GSO/GRO (benchmarks compare)
        self.tun_name = tun_name
        self.mtu = ext.mtu - ENCAP_OVERHEAD
        self.tun_fd = None
        self.tun_index = 0
        self.sock = None
        self.gso = self.gro = False
        self.own = None
        self.forwarder = None
        self._current = {}              # the last desired() applied
        self.skipped = SkippedLeases(log)
        self.tun_reopened = 0           # times flannel0 was found deleted and opened again

    def stats(self):
        """The forwarder's counters as flanneld's metrics read them, in packets: tx (from the
        TUN, handed to the socket), rx (written to the TUN), the syscalls that carried them,
        and drops by reason. The engine counts per batch, so reading them costs nothing there."""
        st = self.forwarder.stats if self.forwarder is not None else Stats()
        return {
            "tx_packets": st.tun_packets - st.send_dropped,
            "tx_sends": st.sends,                   # sendmsg calls (a GSO send carries up to 64 packets)
            "tx_gso_sends": st.gso_sends,
            "rx_packets": st.delivered,
            "rx_receives": st.recvs,                # recvmsg calls (a GRO receive carries many)
            "rx_coalesced_writes": st.coalesced,    # TSO writes of a TCP run
            "drops_no_route": st.no_route,          # to a subnet no lease holds
            "drops_not_ipv4": st.tun_dropped,       # from the TUN: IPv6, truncated
            "drops_send_error": st.send_dropped,
            "drops_foreign": st.foreign,            # received for a subnet not ours: never injected
            "drops_malformed": st.malformed,
            "drops_write_error": st.write_errors,
            "send_errors": st.send_errors,          # failed sendmsg calls
            "tun_reopened": self.tun_reopened,
        }

    def _netlink(self):
        from podnet.net.netlink import Netlink
        return Netlink()

    def _open_tun(self):
        """Open (or create) the TUN, with our MTU and queue length."""
        self.tun_fd = open_tun(self.tun_name, vnet=self.offload)
        with self._netlink() as nl:
            link = nl.link(self.tun_name)
            self.tun_index = link.index
            self._set_mtu(nl, link)

    def _set_mtu(self, nl, link):
        if link.mtu != self.mtu or link.txqlen < TUN_TXQLEN:
            nl.set_link(link.index, mtu=self.mtu, txqlen=max(link.txqlen, TUN_TXQLEN))

    def register(self):
        try:
            self._open_tun()
            self.sock, gso, gro = open_socket(str(self.ext.ip), self.port)
        except BaseException:
            self.close()
            raise
        self.gso, self.gro = gso and self.offload, gro and self.offload
        if gro and not self.offload:
            self.sock.setsockopt(SOL_UDP, UDP_GRO, 0)
        self.forwarder = Forwarder(self.mtu, gso=self.gso, vnet=self.offload)
        log.info("udp backend: %s (index %d, mtu %d), %s:%d, UDP GSO %s, UDP GRO %s, TCP coalescing %s",
                 self.tun_name, self.tun_index, self.mtu, self.ext.ip, self.port,
                 "on" if self.gso else "off", "on" if self.gro else "off",
                 "on" if self.offload else "off")
        return {}, self.mtu

    def configure(self, own_lease):
        from podnet.net.ip import AF_INET, IPNet
        self.own = own_lease
        want = IPNet(own_lease.subnet.network, self.config.network.prefixlen)
        with self._netlink() as nl:
            present = [a.net for a in nl.addrs(self.tun_index, family=AF_INET)]
            for net in present:
                if net != want:     # an earlier lease's address
                    log.info("removing stale address %s from %s", net, self.tun_name)
                    nl.del_addr(self.tun_index, net)
            if want not in present:
                nl.add_addr(self.tun_index, want)
            nl.set_link(self.tun_index, up=True)
        self.forwarder.set_local(own_lease.subnet)
        self.forwarder.start(self.tun_fd, self.sock)

    def desired(self, remote_leases):
        """{remote subnet IPNet: (public ip str, port)} for the udp leases that can be used."""
        from podnet.net.ip import AF_INET
        out = {}
        self.skipped.begin()
        for lease in remote_leases:
            subnet = lease.subnet.masked()
            why = None
            if lease.backend_type != self.type:
                why = "backend type %r, not udp" % lease.backend_type
            elif subnet.family != AF_INET or lease.public_ip.family != AF_INET:
                why = "not IPv4"
            elif subnet.prefixlen != self.config.subnet_len:
                why = "not a /%d" % self.config.subnet_len
            elif not self.config.network.contains(subnet.network):
                why = "outside the network %s" % self.config.network
            elif self.own is not None and subnet == self.own.subnet.masked():
                why = "our own subnet"
            if why:
                self.skipped.skip(lease, logging.WARNING, "skipping lease %s -> %s: %s", subnet, lease.public_ip, why)
                continue
            out[subnet] = (str(lease.public_ip), self.port)
        self.skipped.end()
        return out

    def _ensure_tun(self):
        """flannel0 deleted by hand (or a forwarder thread gone): open the TUN again, give it
        MTU, address and up (the route to the network comes with the address), and restart
        the forwarder on it, same socket, same counters. Set down, stripped of its address or
        of its MTU: configure it again. Nothing is done when everything is in place."""
        from podnet.net.ip import AF_INET, IPNet
        if self.tun_fd is None or self.forwarder is None:
            return          # not registered (unit tests of the table) or closed: nothing to heal
        with self._netlink() as nl:
            link = nl.link(index=self.tun_index)
            gone = link is None or link.name != self.tun_name
            if not gone and (self.own is None or self.forwarder.alive()):
                if self.own is None:
                    return
                want = IPNet(self.own.subnet.network, self.config.network.prefixlen)
                addrs = [a.net for a in nl.addrs(self.tun_index, family=AF_INET)]
                if link.up and addrs == [want] and link.mtu == self.mtu:
                    return
                log.warning("%s is %s: configuring it again", self.tun_name,
                            "down" if not link.up else "without its MTU %d" % self.mtu if link.mtu != self.mtu
                            else "not holding just its address %s" % want)
                self._set_mtu(nl, link)
        if not gone and self.forwarder.alive():
            self.configure(self.own)
            return
        if gone:
            log.error("%s (index %d) has disappeared: opening it again", self.tun_name, self.tun_index)
        else:
            log.error("the udp forwarder has stopped: opening %s again and restarting it", self.tun_name)
        self.forwarder.stop()
        os.close(self.tun_fd)
        self.tun_fd = None
        self._open_tun()
        self.tun_reopened += 1
        if self.own is not None:
            self.configure(self.own)
            log.info("%s is back (index %d): forwarding again", self.tun_name, self.tun_index)

    def sync(self, remote_leases):
        self._ensure_tun()
        want = self.desired(remote_leases)
        for subnet in sorted(set(self._current) - set(want), key=str):
            log.info("udp: route %s removed", subnet)
        for subnet, remote in sorted(want.items(), key=lambda kv: str(kv[0])):
            if self._current.get(subnet) != remote:
                log.info("udp: route %s -> %s:%d", subnet, remote[0], remote[1])
        self.forwarder.set_routes(*route_table(want))
        self._current = want

    def close(self):
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.tun_fd is not None:
            os.close(self.tun_fd)       # persistent: the device, address and route stay
            self.tun_fd = None


# ---- standalone runner -------------------------------------------------------------

def external_interface(name):
    """ExternalInterface of link `name`: its first IPv4 global address."""
    from flanneld.backend.base import ExternalInterface
    from podnet.net.ip import AF_INET
    from podnet.net.netlink import Netlink
    with Netlink() as nl:
        link = nl.link(name)
        if link is None:
            raise SystemExit("no interface %s" % name)
        addrs = [a for a in nl.addrs(link.index, family=AF_INET) if a.scope == 0]
        if not addrs:
            raise SystemExit("%s has no IPv4 address" % name)
        return ExternalInterface(name, link.index, addrs[0].net.ip, addrs[0].net.prefixlen, link.mtu)


def parse_leases(items):
    """["10.244.2.0/24=192.168.50.2", ...] or [["10.244.2.0/24", "192.168.50.2", "udp"], ...]."""
    from flanneld.subnet import Lease
    from podnet.net.ip import parse_ip, parse_net
    out = []
    for item in items:
        if isinstance(item, str):
            subnet, _, ip = item.partition("=")
            item = [subnet, ip]
        btype = item[2] if len(item) > 2 else "udp"
        out.append(Lease(parse_net(item[0]), parse_ip(item[1]), btype))
    return out


def main(argv=None):
    """Run one node's udp backend with hand-made leases (no etcd).

    Prints `ready {"mtu":..,"ifindex":..,"gso":..,"gro":..}` once forwarding.
    Then reads JSON lines on stdin:
        {"leases": [["10.244.2.0/24", "192.168.50.2"], ...]}   -> sync (the full set)
        {"stats": true}                                      -> prints `stats {...}`
    and stops (close(): threads joined, flannel0 stays) on EOF, SIGTERM or SIGINT.
    """
    import argparse
    import json
    import signal
    p = argparse.ArgumentParser(prog="python -m flanneld.backend.udp", description=main.__doc__.split("\n")[0])
    p.add_argument("--netns", help="enter this network namespace first (path, e.g. /var/run/netns/x)")
    p.add_argument("--iface", default="eth0", help="the external interface (default: %(default)s)")
    p.add_argument("--network", required=True, help="the cluster network, e.g. 10.244.0.0/16")
    p.add_argument("--subnet-len", type=int, default=24)
    p.add_argument("--subnet", required=True, help="this node's subnet, e.g. 10.244.1.0/24")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--lease", action="append", default=[], help="SUBNET=PUBLIC_IP of a remote node")
    p.add_argument("--no-offload", action="store_true", help="no UDP GSO/GRO")
    p.add_argument("-v", "--verbose", action="store_true")
    opts = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s udp: %(message)s")
    if opts.netns:
        # Before any thread or socket exists: threads started later share the namespace.
        from podnet.net.netns import open_netns, setns
        fd = open_netns(opts.netns)
        setns(fd)
        os.close(fd)
    from flanneld import config as fconfig
    from flanneld.subnet import Lease
    from podnet.net.ip import parse_net

    def stop(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)

    config = fconfig.parse({"Network": opts.network, "SubnetLen": opts.subnet_len,
                            "Backend": {"Type": "udp", "Port": opts.port}})
    ext = external_interface(opts.iface)
    backend = UDPBackend(config, ext, offload=not opts.no_offload)
    try:
        _, mtu = backend.register()
        backend.configure(Lease(parse_net(opts.subnet), ext.ip, "udp"))
        backend.sync(parse_leases(opts.lease))
        print("ready " + json.dumps({"mtu": mtu, "ifindex": backend.tun_index, "gso": backend.gso,
                                     "gro": backend.gro, "pid": os.getpid()}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            msg = json.loads(line)
            if "leases" in msg:
                backend.sync(parse_leases(msg["leases"]))
                print("synced %d" % len(backend._current), flush=True)
            if msg.get("stats"):
                stats = backend.forwarder.stats.as_dict()
                stats["alive"] = backend.forwarder.alive()
                stats["backend"] = backend.stats()
                print("stats " + json.dumps(stats), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
