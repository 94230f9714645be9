"""podnet.net.ipvs message encoding and decoding, and the dummy link request (no kernel needed)."""
import errno
import struct

import pytest

from podnet.net import ipvs
from podnet.net.ip import AF_INET, AF_INET6
from podnet.net.netlink import (
    F_CREATE,
    F_EXCL,
    IFLA_IFNAME,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MTU,
    RTM_NEWLINK,
    Netlink,
    NetlinkError,
    attr,
    nested,
    parse_attrs,
)


def top(body):
    """genl header + attributes -> (cmd, version, {attr: payload})."""
    cmd, version, _ = struct.unpack_from("=BBH", body)
    return cmd, version, parse_attrs(body, 4)


def test_service_message_carries_every_attribute_a_new_service_needs():
    svc = ipvs.Service("TCP", "10.96.0.10", 80, "lc", ipvs.F_PERSISTENT, 60)
    cmd, version, attrs = top(ipvs.service_message(ipvs.CMD_NEW_SERVICE, svc, full=True))
    assert (cmd, version) == (ipvs.CMD_NEW_SERVICE, 1)
    a = parse_attrs(attrs[ipvs.CMD_ATTR_SERVICE])
    assert struct.unpack("=H", a[ipvs.SVC_ATTR_AF])[0] == AF_INET
    assert struct.unpack("=H", a[ipvs.SVC_ATTR_PROTOCOL])[0] == 6
    assert a[ipvs.SVC_ATTR_ADDR] == bytes([10, 96, 0, 10]) + b"\0" * 12        # union nf_inet_addr
    assert a[ipvs.SVC_ATTR_PORT] == b"\x00\x50"                                 # network order
    assert a[ipvs.SVC_ATTR_SCHED_NAME] == b"lc\0"
    assert struct.unpack("=II", a[ipvs.SVC_ATTR_FLAGS]) == (ipvs.F_PERSISTENT, 0xFFFFFFFF)
    assert struct.unpack("=I", a[ipvs.SVC_ATTR_TIMEOUT])[0] == 60
    assert a[ipvs.SVC_ATTR_NETMASK] == b"\xff\xff\xff\xff"                      # /32 persistence


def test_service_key_alone_for_delete_and_ipv6_netmask_is_a_prefix_length():
    svc = ipvs.Service("UDP", "fd00::a", 53)
    _, _, attrs = top(ipvs.service_message(ipvs.CMD_DEL_SERVICE, svc))
    a = parse_attrs(attrs[ipvs.CMD_ATTR_SERVICE])
    assert set(a) == {ipvs.SVC_ATTR_AF, ipvs.SVC_ATTR_PROTOCOL, ipvs.SVC_ATTR_ADDR, ipvs.SVC_ATTR_PORT}
    assert struct.unpack("=H", a[ipvs.SVC_ATTR_AF])[0] == AF_INET6
    assert len(a[ipvs.SVC_ATTR_ADDR]) == 16 and a[ipvs.SVC_ATTR_ADDR][-1] == 0x0A
    full = parse_attrs(top(ipvs.service_message(ipvs.CMD_NEW_SERVICE, svc, full=True))[2][ipvs.CMD_ATTR_SERVICE])
    assert struct.unpack("=I", full[ipvs.SVC_ATTR_NETMASK])[0] == 128


def test_dest_message_names_its_service_and_masquerades_with_weight():
    svc = ipvs.Service("TCP", "10.96.0.10", 80)
    cmd, _, attrs = top(ipvs.dest_message(ipvs.CMD_NEW_DEST, svc, ipvs.Dest("10.244.1.2", 8080, weight=0)))
    assert cmd == ipvs.CMD_NEW_DEST
    assert parse_attrs(attrs[ipvs.CMD_ATTR_SERVICE])[ipvs.SVC_ATTR_PORT] == b"\x00\x50"
    d = parse_attrs(attrs[ipvs.CMD_ATTR_DEST])
    assert d[ipvs.DEST_ATTR_ADDR][:4] == bytes([10, 244, 1, 2])
    assert d[ipvs.DEST_ATTR_PORT] == struct.pack("!H", 8080)
    assert struct.unpack("=I", d[ipvs.DEST_ATTR_FWD_METHOD])[0] == ipvs.FWD_MASQ
    assert struct.unpack("=I", d[ipvs.DEST_ATTR_WEIGHT])[0] == 0
    for kind in (ipvs.DEST_ATTR_U_THRESH, ipvs.DEST_ATTR_L_THRESH):
        assert struct.unpack("=I", d[kind])[0] == 0
    deleted = parse_attrs(top(ipvs.dest_message(ipvs.CMD_DEL_DEST, svc, ipvs.Dest("10.244.1.2", 8080),
                                                full=False))[2][ipvs.CMD_ATTR_DEST])
    assert set(deleted) == {ipvs.DEST_ATTR_ADDR, ipvs.DEST_ATTR_PORT}


def kernel_service(flags=ipvs.F_HASHED, sched=b"rr\0", timeout=0):
    """A GET_SERVICE answer as the kernel writes it."""
    a = (attr(ipvs.SVC_ATTR_AF, struct.pack("=H", AF_INET)) + attr(ipvs.SVC_ATTR_PROTOCOL, struct.pack("=H", 17))
         + attr(ipvs.SVC_ATTR_ADDR, bytes([10, 96, 0, 16]) + b"\0" * 12) + attr(ipvs.SVC_ATTR_PORT, b"\x00\x35")
         + attr(ipvs.SVC_ATTR_SCHED_NAME, sched) + attr(ipvs.SVC_ATTR_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF))
         + attr(ipvs.SVC_ATTR_TIMEOUT, struct.pack("=I", timeout))
         + attr(ipvs.SVC_ATTR_NETMASK, b"\xff\xff\xff\xff")
         + nested(ipvs.SVC_ATTR_STATS, attr(ipvs.STATS_CONNS, struct.pack("=I", 7))
                  + attr(ipvs.STATS_INBYTES, struct.pack("=Q", 1 << 40))))
    return ipvs.genl_header(ipvs.CMD_NEW_SERVICE) + nested(ipvs.CMD_ATTR_SERVICE, a)


def test_parse_service_drops_the_kernels_hashed_flag_and_reads_stats():
    svc = ipvs.parse_service(kernel_service())
    assert svc.key == ("UDP", "10.96.0.16", 53) and svc.scheduler == "rr"
    assert svc.flags == 0 and svc.netmask == 0xFFFFFFFF
    assert svc.stats == {ipvs.STATS_CONNS: 7, ipvs.STATS_INBYTES: 1 << 40}
    # what we would ask for compares equal to what the kernel reports
    assert svc == ipvs.Service("UDP", "10.96.0.16", 53)
    sticky = ipvs.parse_service(kernel_service(ipvs.F_HASHED | ipvs.F_PERSISTENT, b"sh\0", 30))
    assert sticky.settings() == ("sh", ipvs.F_PERSISTENT, 30, 0xFFFFFFFF)
    assert sticky != ipvs.Service("UDP", "10.96.0.16", 53)


def test_parse_dest_reads_connection_counts():
    a = (attr(ipvs.DEST_ATTR_ADDR, bytes([10, 244, 2, 3]) + b"\0" * 12) + attr(ipvs.DEST_ATTR_PORT, b"\x1f\x90")
         + attr(ipvs.DEST_ATTR_FWD_METHOD, struct.pack("=I", ipvs.FWD_MASQ))
         + attr(ipvs.DEST_ATTR_WEIGHT, struct.pack("=I", 0))
         + attr(ipvs.DEST_ATTR_ACTIVE_CONNS, struct.pack("=I", 3))
         + attr(ipvs.DEST_ATTR_INACT_CONNS, struct.pack("=I", 4))
         + attr(ipvs.DEST_ATTR_PERSIST_CONNS, struct.pack("=I", 1))
         + attr(ipvs.DEST_ATTR_ADDR_FAMILY, struct.pack("=H", AF_INET)))
    d = ipvs.parse_dest(ipvs.genl_header(ipvs.CMD_NEW_DEST) + nested(ipvs.CMD_ATTR_DEST, a), AF_INET)
    assert (d.key, d.weight, d.active, d.inactive, d.persistent) == (("10.244.2.3", 8080), 0, 3, 4, 1)
    assert d.connections == 7


def test_family_lookup_and_the_error_of_a_kernel_without_ipvs():
    body = ipvs.family_request()
    cmd, _, attrs = top(body)
    assert cmd == ipvs.CTRL_CMD_GETFAMILY and attrs[ipvs.CTRL_ATTR_FAMILY_NAME] == b"IPVS\0"
    answer = ipvs.genl_header(1) + attr(ipvs.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 0x1c))
    assert ipvs.parse_family_id([(ipvs.GENL_ID_CTRL, answer)]) == 0x1c

    client = ipvs.Ipvs.__new__(ipvs.Ipvs)

    def no_family(msgtype, flags, body):
        assert msgtype == ipvs.GENL_ID_CTRL
        raise NetlinkError(errno.ENOENT, "No such file or directory")
    client.request = no_family
    with pytest.raises(ipvs.IpvsUnavailable) as e:
        client._resolve("IPVS")
    assert "this kernel has no IPVS (ip_vs)" in str(e.value) and e.value.errno == errno.ENOENT


def test_add_dummy_asks_for_link_kind_dummy():
    sent = []
    nl = Netlink.__new__(Netlink)
    nl.request = lambda msgtype, flags, body: sent.append((msgtype, flags, body)) or []
    nl.add_dummy("kube-ipvs0", mtu=1500)
    (msgtype, flags, body), = sent
    assert msgtype == RTM_NEWLINK and flags == F_CREATE | F_EXCL
    a = parse_attrs(body, 16)
    assert a[IFLA_IFNAME] == b"kube-ipvs0\0" and struct.unpack("=I", a[IFLA_MTU])[0] == 1500
    assert parse_attrs(a[IFLA_LINKINFO])[IFLA_INFO_KIND] == b"dummy"
