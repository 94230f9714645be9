"""podnet.net.netlink and podnet.net.tun without a kernel: the messages a request
sends (captured in place of the socket) and how canned answers are read back.
The same calls against the real kernel: netns_tests/test_netlink.py."""
import errno
import struct
import types

import pytest

from podnet.net import netlink as nlmod
from podnet.net import tun
from podnet.net.ip import AF_INET, AF_INET6, parse_cidr, parse_ip
from podnet.net.netlink import (
    F_CREATE,
    F_EXCL,
    IFLA_IFNAME,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MTU,
    RTA_DST,
    RTA_GATEWAY,
    RTA_OIF,
    RTA_TABLE,
    RTM_GETROUTE,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    Netlink,
    attr,
    parse_attrs,
    u32,
)


def capturing(answers=()):
    """A Netlink whose request() records (msgtype, flags, body) and returns `answers`."""
    sent = []
    nl = Netlink.__new__(Netlink)
    nl.request = lambda msgtype, flags, body: sent.append((msgtype, flags, body)) or list(answers)
    return nl, sent


def rtmsg(family, dst_len, table=254, protocol=4, scope=0, rtype=1, flags=0):
    return nlmod._RTMSG.pack(family, dst_len, 0, 0, table, protocol, scope, rtype, flags)


# ---- route lookup ---------------------------------------------------------------------

def test_route_get_asks_for_one_address_and_reads_the_answer():
    dst = parse_ip("10.1.0.7")
    answer = (rtmsg(AF_INET, 32, rtype=nlmod.RTN_UNICAST) + attr(RTA_TABLE, struct.pack("=I", 254))
              + attr(RTA_DST, dst.packed()) + u32(RTA_OIF, 3)
              + attr(RTA_GATEWAY, parse_ip("10.1.0.1").packed()))
    nl, sent = capturing([(RTM_NEWROUTE, answer)])
    route = nl.route_get(dst)
    (msgtype, flags, body), = sent
    assert msgtype == RTM_GETROUTE and flags == 0          # not a dump (request() adds REQUEST|ACK)
    # what the portmap plugin packed by hand before: rtmsg for a /32, then RTA_DST
    assert body == struct.pack("=BBBBBBBBI", AF_INET, 32, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, dst.packed())
    assert parse_attrs(body, nlmod._RTMSG.size) == {RTA_DST: dst.packed()}
    assert (route.oif, route.dst, route.gateway, route.table) == (3, parse_cidr("10.1.0.7/32"),
                                                                  parse_ip("10.1.0.1"), 254)


def test_route_get_ipv6_and_no_answer():
    dst = parse_ip("fd00::9")
    nl, sent = capturing([])
    assert nl.route_get(dst) is None
    (_, _, body), = sent
    assert body[:2] == bytes([AF_INET6, 128]) and parse_attrs(body, 12)[RTA_DST] == dst.packed()


def test_route_without_oif_reads_oif_0():
    nl, _ = capturing([(RTM_NEWROUTE, rtmsg(AF_INET, 32, rtype=nlmod.RTN_BLACKHOLE)
                        + attr(RTA_DST, parse_ip("10.9.9.9").packed()))])
    route = nl.route_get(parse_ip("10.9.9.9"))
    assert route.oif == 0 and route.type == nlmod.RTN_BLACKHOLE and route.gateway is None


def test_routes_dump_keeps_one_table():
    main = rtmsg(AF_INET, 16) + attr(RTA_DST, parse_ip("10.2.0.0").packed()) + u32(RTA_OIF, 2)
    local = rtmsg(AF_INET, 32, table=255, rtype=nlmod.RTN_LOCAL) + attr(RTA_DST, parse_ip("10.1.0.2").packed())
    big = rtmsg(AF_INET, 0, table=252) + u32(RTA_TABLE, 1000) + u32(RTA_OIF, 2)
    dump = [(RTM_NEWROUTE, p) for p in (main, local, big)]
    nl, sent = capturing(dump)
    (r,) = nl.routes()
    assert (r.dst, r.oif, r.table, r.protocol) == (parse_cidr("10.2.0.0/16"), 2, 254, 4)
    assert sent[0][:2] == (RTM_GETROUTE, nlmod.F_DUMP)
    nl, _ = capturing(dump)
    (r,) = nl.routes(table=1000)
    assert r.dst == parse_cidr("0.0.0.0/0") and r.table == 1000
    nl, _ = capturing(dump)
    assert [r.table for r in nl.routes(table=None)] == [254, 255, 1000]


# ---- links ------------------------------------------------------------------------

def test_add_ipip_asks_for_link_kind_ipip():
    nl, sent = capturing()
    nl.add_ipip("tunl0")
    (msgtype, flags, body), = sent
    assert msgtype == RTM_NEWLINK and flags == F_CREATE | F_EXCL
    # byte for byte what calico_lite/routes.py packed by hand before
    assert body == (struct.pack("=BxHiII", 0, 0, 0, 0, 0) + attr(IFLA_IFNAME, "tunl0")
                    + nlmod.nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"ipip")))
    nl, sent = capturing()
    nl.add_ipip("ipip1", mtu=1480)
    a = parse_attrs(sent[0][2], 16)
    assert a[IFLA_IFNAME] == b"ipip1\0" and struct.unpack("=I", a[IFLA_MTU])[0] == 1480
    assert parse_attrs(a[IFLA_LINKINFO]) == {IFLA_INFO_KIND: b"ipip"}


# ---- TUN ----------------------------------------------------------------------------

def test_ifreq_layout():
    raw = tun.ifreq("flannel0", tun.IFF_TUN | tun.IFF_NO_PI)
    assert len(raw) == 40 and raw[:16] == b"flannel0" + b"\0" * 8
    assert struct.unpack_from("=H", raw, 16)[0] == 0x1001
    assert tun.ifreq_name(raw) == "flannel0"
    assert tun.ifreq_name(tun.ifreq("x" * 15, 0)) == "x" * 15


class FakeKernel:
    """/dev/net/tun and its ioctls, recorded; TUNSETIFF answers with `name` or raises `error`."""

    def __init__(self, name=None, error=None):
        self.calls, self.closed = [], []
        self.name, self.error = name, error
        self.os = types.SimpleNamespace(O_RDWR=2, O_CLOEXEC=0o2000000, open=self.open, close=self.closed.append)
        self.fcntl = types.SimpleNamespace(ioctl=self.ioctl)

    def open(self, path, flags):
        self.calls.append(("open", path, flags))
        return 42

    def ioctl(self, fd, request, arg):
        self.calls.append((request, arg))
        if request == tun.TUNSETIFF:
            if self.error:
                raise OSError(self.error, "Device or resource busy")
            return tun.ifreq(self.name, struct.unpack_from("=H", arg, 16)[0]) if self.name else arg
        return 0


@pytest.fixture
def kernel(monkeypatch):
    def make(**kw):
        k = FakeKernel(**kw)
        monkeypatch.setattr(tun, "os", k.os)
        monkeypatch.setattr(tun, "fcntl", k.fcntl)
        return k
    return make


def test_open_tun_flags_persist_and_name(kernel):
    k = kernel(name="tun7")                       # e.g. the kernel filled in "tun%d"
    assert tun.open_tun("tun%d", persist=True, vnet=True) == (42, "tun7")
    (_, path, _), (req, ifr), persist = k.calls
    assert path == "/dev/net/tun" and req == tun.TUNSETIFF
    assert ifr == tun.ifreq("tun%d", tun.IFF_TUN | tun.IFF_NO_PI | tun.IFF_VNET_HDR)
    assert persist == (tun.TUNSETPERSIST, 1) and k.closed == []
    k = kernel()
    assert tun.open_tun("t0") == (42, "t0")
    assert k.calls[1] == (tun.TUNSETIFF, tun.ifreq("t0", tun.IFF_TUN | tun.IFF_NO_PI))
    assert k.calls[2] == (tun.TUNSETPERSIST, 0)


def test_open_tun_busy_is_explained_and_closes_the_fd(kernel):
    k = kernel(error=errno.EBUSY)
    with pytest.raises(OSError) as e:
        tun.open_tun("flannel0", busy_hint="another process holds it (a flanneld still running?)")
    assert e.value.errno == errno.EBUSY
    assert str(e.value) == ("[Errno 16] cannot open TUN flannel0: Device or resource busy: "
                            "another process holds it (a flanneld still running?)")
    assert k.closed == [42] and len(k.calls) == 2     # no TUNSETPERSIST


# ---- interrupted dumps (NLM_F_DUMP_INTR) ------------------------------------------------

class FakeDumpSocket:
    """A netlink socket that answers the n-th request with rounds[n]: a list of
    datagrams, each a list of (type, flags, payload) messages carrying the request's
    sequence number. A request sent before the previous answer was read to its end
    is an error (the rest of an interrupted dump must be drained first)."""

    def __init__(self, rounds):
        self.rounds = list(rounds)
        self.sent = []
        self.queue = []

    def send(self, data):
        assert not self.queue, "a new request before the previous answer was read to its end"
        self.sent.append(data)
        _, _, _, seq, _ = nlmod._HDR.unpack_from(data)
        for datagram in self.rounds.pop(0):
            chunk = b""
            for mtype, mflags, payload in datagram:
                length = 16 + len(payload)
                chunk += nlmod._HDR.pack(length, mtype, mflags, seq, 0) + payload + b"\0" * (-length & 3)
            self.queue.append(chunk)
        return len(data)

    def recv_into(self, buf):
        chunk = self.queue.pop(0)
        buf[:len(chunk)] = chunk
        return len(chunk)

    def close(self):
        pass


def fake_netlink(rounds, cls=Netlink):
    nl = cls.__new__(cls)
    nl.sock = FakeDumpSocket(rounds)
    nl.seq = 0
    nl._buf = bytearray(1 << 16)
    return nl


MULTI, INTR = nlmod.F_MULTI, 0x10
DONE = (nlmod.NLMSG_DONE, MULTI, b"\0\0\0\0")


def link_msg(index, name, flags=MULTI):
    return (RTM_NEWLINK, flags, nlmod._IFINFO.pack(0, 0, index, 0, 0) + attr(IFLA_IFNAME, name))


def test_an_interrupted_dump_is_read_to_its_end_and_asked_again():
    nl = fake_netlink([
        [[link_msg(1, "lo"), link_msg(2, "eth0", MULTI | INTR)], [link_msg(3, "gone")], [DONE]],
        [[link_msg(1, "lo"), link_msg(4, "flannel.1"), DONE]],
    ])
    assert [(l.index, l.name) for l in nl.links()] == [(1, "lo"), (4, "flannel.1")]   # the second, whole snapshot
    first, second = nl.sock.sent
    assert first[4:8] == second[4:8] and first[16:] == second[16:]          # the same request, a new sequence number
    assert nlmod._HDR.unpack_from(second)[2] & nlmod.F_DUMP == nlmod.F_DUMP


def test_the_interrupted_flag_on_the_done_message_counts_too():
    intr_done = (nlmod.NLMSG_DONE, MULTI | INTR, b"\0\0\0\0")
    nl = fake_netlink([[[link_msg(1, "lo"), intr_done]], [[link_msg(1, "lo"), link_msg(2, "eth0"), DONE]]])
    assert [l.name for l in nl.links()] == ["lo", "eth0"] and len(nl.sock.sent) == 2


def test_a_dump_interrupted_every_time_fails_clearly_after_5_attempts():
    always = [[[link_msg(1, "lo", MULTI | INTR), DONE]]] * 6
    nl = fake_netlink(always)
    with pytest.raises(nlmod.NetlinkError) as e:
        nl.routes()
    assert e.value.errno == errno.EINTR
    assert len(nl.sock.sent) == 5
    assert "interrupted 5 times" in str(e.value) and "changed while it was being read" in str(e.value)


def test_conntrack_and_ipvs_dumps_share_the_retry():
    from podnet.net import conntrack, ipvs
    nfgen = b"\2\0\0\0"
    ct = fake_netlink([[[(0x100, MULTI | INTR, nfgen), DONE]], [[DONE]]], cls=conntrack.Conntrack)
    assert ct.entries() == [] and len(ct.sock.sent) == 2
    vs = fake_netlink([[[(30, MULTI | INTR, ipvs.genl_header(1)), DONE]], [[DONE]]], cls=ipvs.Ipvs)
    vs.family, vs.ops = 30, 0
    assert vs.services() == [] and len(vs.sock.sent) == 2
