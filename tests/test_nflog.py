"""podnet/net/nflog.py: NFLOG messages and the packets in them, parsed from real bytes.

The two datagrams below are what this machine's kernel (6.18) sent to an
NflogListener in a network namespace when nftables rules `tcp dport 81 log
group 7 prefix "ingress x"` and `udp dport 53 log group 7 prefix "egress y"` in
an output chain logged a TCP SYN to 127.0.0.1:81 and a UDP datagram to
[fd00::1]:53 (recorded once with recv(); the listener's bind against the live
kernel is tested in netns_tests/test_network_policy_daemon.py). Other packets are
built with scapy, an independent encoder.
"""
import struct

import pytest

from podnet.net import nflog
from podnet.net.netlink import attr, parse_attrs

KERNEL_TCP4 = bytes.fromhex(
    "840000000004000000000000000000000200000708000100080003000e000a00696e67726573732078000000080005000000000108"
    "000b000000000008000e0000000000400009004500003cf1aa400040064b0f7f0000017f000001b35a0051ed3b90ff00000000a002"
    "ffd7fe3000000204ffd70402080ad8050d85000000000103030a")
KERNEL_UDP6 = bytes.fromhex(
    "7c0000000004000000000000000000000a0000070800010086dd03000d000a00656772657373207900000000080005000000000108"
    "000b000000000008000e0000000000370009006005751b000b1140fd000000000000000000000000000001fd000000000000000000"
    "000000000001c50a0035000bfa1f68690a00")

scapy_all = pytest.importorskip("scapy.all")
IP, IPv6, TCP, UDP, ICMP = scapy_all.IP, scapy_all.IPv6, scapy_all.TCP, scapy_all.UDP, scapy_all.ICMP


def _one(datagram):
    messages = list(nflog.parse_messages(datagram))
    assert len(messages) == 1
    mtype, _, payload = messages[0]
    assert mtype == nflog.PACKET_MSG
    return nflog.parse_packet_message(payload)


def test_a_tcp_syn_the_kernel_logged():
    logged = _one(KERNEL_TCP4)
    assert logged.prefix == "ingress x"
    assert logged.hook == 3                     # NF_INET_LOCAL_OUT: the rule was in an output chain
    assert (logged.indev, logged.outdev) == (0, 1)      # out through lo (ifindex 1)
    assert logged.packet == nflog.Packet(4, 6, "127.0.0.1", "127.0.0.1", 45914, 81)
    assert logged.packet.protocol_name == "TCP"
    assert logged.length == 60


def test_a_udp6_datagram_the_kernel_logged():
    logged = _one(KERNEL_UDP6)
    assert logged.prefix == "egress y"
    assert logged.packet == nflog.Packet(6, 17, "fd00::1", "fd00::1", 50442, 53)


def test_the_kernels_bytes_agree_with_scapy():
    payload = next(nflog.parse_messages(KERNEL_TCP4))[2]
    data = parse_attrs(payload, 4)[nflog.NFULA_PAYLOAD]
    pkt = IP(data)
    assert (pkt.src, pkt.dst, pkt[TCP].sport, pkt[TCP].dport) == ("127.0.0.1", "127.0.0.1", 45914, 81)


def _message(packet_bytes, prefix="ingress ns", family=2, hook=2):
    body = struct.pack("=BBH", family, 0, 0)
    body += attr(nflog.NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800 if family == 2 else 0x86DD, hook))
    body += attr(nflog.NFULA_PREFIX, prefix)
    body += attr(nflog.NFULA_IFINDEX_INDEV, struct.pack("!I", 4))
    body += attr(nflog.NFULA_IFINDEX_OUTDEV, struct.pack("!I", 7))
    body += attr(nflog.NFULA_PAYLOAD, packet_bytes)
    header = struct.pack("=IHHII", 16 + len(body), nflog.PACKET_MSG, 0, 0, 0)
    return header + body


@pytest.mark.parametrize("packet, expected", [
    (IP(src="10.244.1.2", dst="10.244.2.3") / TCP(sport=40000, dport=8080), (4, 6, "10.244.1.2", "10.244.2.3", 40000, 8080)),
    (IP(src="10.244.1.2", dst="10.244.2.3") / UDP(sport=5353, dport=53), (4, 17, "10.244.1.2", "10.244.2.3", 5353, 53)),
    (IP(src="10.0.0.1", dst="10.0.0.2", options=[scapy_all.IPOption_NOP()] * 4) / TCP(sport=1, dport=2),
     (4, 6, "10.0.0.1", "10.0.0.2", 1, 2)),                 # options: ports after the longer header
    (IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, code=0), (4, 1, "10.0.0.1", "10.0.0.2", 8, 0)),
    (IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=3, dport=443), (6, 6, "fd00::1", "fd00::2", 3, 443)),
    (IPv6(src="fd00::1", dst="fd00::2") / scapy_all.IPv6ExtHdrHopByHop() / UDP(sport=9, dport=10),
     (6, 17, "fd00::1", "fd00::2", 9, 10)),                 # an extension header walked
    (IPv6(src="fd00::1", dst="fd00::2") / scapy_all.ICMPv6EchoRequest(), (6, 58, "fd00::1", "fd00::2", 128, 0)),
])
def test_packets_built_by_scapy(packet, expected):
    logged = _one(_message(bytes(packet)))
    assert logged.prefix == "ingress ns" and (logged.indev, logged.outdev, logged.hook) == (4, 7, 2)
    assert logged.packet == nflog.Packet(*expected)


def test_later_fragments_and_short_packets_carry_no_ports():
    later = IP(src="10.0.0.1", dst="10.0.0.2", frag=100, proto=6) / (b"\0" * 8)
    assert nflog.parse_ip(bytes(later)) == nflog.Packet(4, 6, "10.0.0.1", "10.0.0.2")
    v6_later = IPv6(src="fd00::1", dst="fd00::2") / scapy_all.IPv6ExtHdrFragment(offset=10, nh=17) / (b"\0" * 8)
    assert nflog.parse_ip(bytes(v6_later)) == nflog.Packet(6, 17, "fd00::1", "fd00::2")
    truncated = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2))[:22]     # copy range cut
    assert nflog.parse_ip(truncated) == nflog.Packet(4, 6, "10.0.0.1", "10.0.0.2")
    assert nflog.parse_ip(b"") is None
    assert nflog.parse_ip(b"\x45" + b"\0" * 10) is None
    assert nflog.parse_ip(b"\x60" + b"\0" * 20) is None
    assert nflog.parse_ip(b"\x20" * 40) is None             # not IP at all


def test_a_message_without_payload_or_prefix():
    body = struct.pack("=BBH", 2, 0, 0)
    logged = nflog.parse_packet_message(body)
    assert logged == nflog.LoggedPacket(prefix="", hook=0, indev=0, outdev=0, mark=0, packet=None, length=0)
    assert nflog.parse_packet_message(b"\0") is None


def test_a_batch_of_messages_and_truncated_garbage():
    one = _message(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2)), "egress a")
    two = _message(bytes(IP(src="10.0.0.3", dst="10.0.0.4") / UDP(sport=3, dport=4)), "egress b")
    done = struct.pack("=IHHII", 20, 3, 2, 0, 0) + b"\0\0\0\0"
    messages = list(nflog.parse_messages(one + two + done))
    assert [m[0] for m in messages] == [nflog.PACKET_MSG, nflog.PACKET_MSG, 3]
    assert list(nflog.parse_messages((one + two)[:len(one) + 10])) == [messages[0]]      # a cut one is left
    assert list(nflog.parse_messages(struct.pack("=IHHII", 4, 0, 0, 0, 0))) == []


def test_config_messages_name_the_group_big_endian():
    body = nflog.config_body(100, attr(nflog.NFULA_CFG_CMD, bytes([nflog.NFULNL_CFG_CMD_BIND])))
    assert body[:4] == b"\x00\x00\x00\x64"
    assert body[4:] == b"\x05\x00\x01\x00\x01\x00\x00\x00"
    with pytest.raises(ValueError):
        nflog.NflogListener(70000)
