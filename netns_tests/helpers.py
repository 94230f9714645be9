"""Helpers shared by the netns tests: underlay captures and parallel pings.

Captures run tcpdump inside one of a lab's namespaces (usually the underlay
switch, on br0, which sees every frame between nodes) into a pcap file in the
lab's workdir; `parse_pcap` turns it into plain dicts so a test can assert on
the outer and inner headers of what really crossed the wire.
"""
import os
import re
import signal
import struct
import subprocess
import time

from podnet.cluster import exec_argv


class Capture:
    """tcpdump into a pcap file in namespace `ns` on `iface`, stopped by stop()."""

    def __init__(self, ns, iface, bpf, path):
        self.path = path
        self.ns = ns
        self.proc = ns.popen(["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-Z", "root",
                              "-w", path, bpf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self.proc.stderr.readline().decode()       # "listening on br0, ..." once it captures
        assert "listening on" in line, line

    def stop(self):
        """Stop tcpdump and return parse_pcap() of what it wrote."""
        time.sleep(0.2)
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=10)
        self.proc.stderr.close()
        self.ns.processes.remove(self.proc)     # reaped: cleanup must not signal its pid again
        return parse_pcap(self.path)


def _ipv4(frame, off):
    ihl = (frame[off] & 0x0F) * 4
    proto = frame[off + 9]
    src, dst = ".".join(map(str, frame[off + 12:off + 16])), ".".join(map(str, frame[off + 16:off + 20]))
    return src, dst, proto, off + ihl


def _bare_ipv4(payload):
    """True if `payload` is exactly one IPv4 packet (version 4, total length = its size)."""
    return (len(payload) >= 20 and payload[0] >> 4 == 4 and (payload[0] & 0x0F) >= 5
            and struct.unpack_from("!H", payload, 2)[0] == len(payload))


def parse_pcap(path):
    """Ethernet/IPv4 packets as dicts: src, dst, proto; for UDP sport and dport, and
      - for VXLAN (a payload with the I flag): vni and the inner frame's
        inner_src, inner_dst, inner_proto;
      - for a payload that is exactly one bare IPv4 packet (flannel's udp
        backend): payload_src, payload_dst, payload_proto;
      and for IP-in-IP (protocol 4): inner_src, inner_dst, inner_proto."""
    with open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack_from("<I", data)
    assert magic == 0xA1B2C3D4, "unexpected pcap format %x" % magic
    assert struct.unpack_from("<I", data, 20)[0] == 1, "not an Ethernet capture"
    off, out = 24, []
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from("<IIII", data, off)
        frame = data[off + 16: off + 16 + incl]
        off += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        src, dst, proto, l4 = _ipv4(frame, 14)
        pkt = {"src": src, "dst": dst, "proto": proto}
        if proto == 17:
            sport, dport, udp_len = struct.unpack_from("!HHH", frame, l4)
            pkt["sport"], pkt["dport"] = sport, dport
            payload = frame[l4 + 8:l4 + udp_len]
            if _bare_ipv4(payload):
                pkt["payload_src"], pkt["payload_dst"], pkt["payload_proto"], _ = _ipv4(payload, 0)
            elif len(payload) >= 8 + 34 and payload[0] & 0x08:
                pkt["vni"] = int.from_bytes(payload[4:7], "big")
                if payload[8 + 12:8 + 14] == b"\x08\x00":
                    pkt["inner_src"], pkt["inner_dst"], pkt["inner_proto"], _ = _ipv4(payload, 8 + 14)
        elif proto == 4 and len(frame) >= l4 + 20:         # IP-in-IP
            pkt["inner_src"], pkt["inner_dst"], pkt["inner_proto"], _ = _ipv4(frame, l4)
        out.append(pkt)
    return out


def ping_stats(output):
    """(transmitted, received) from ping's summary line."""
    m = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert m, output
    return int(m.group(1)), int(m.group(2))


def ping_many(pairs, count=2, interval=0.2, wait=2, timeout=30):
    """Ping in parallel: pairs is {key: (namespace, ip)}; returns {key: output} of those
    that lost any packet."""
    procs = {}
    for key, (ns, ip) in pairs.items():
        procs[key] = subprocess.Popen(
            exec_argv(ns.name, ["ping", "-n", "-q", "-c", count, "-i", interval, "-W", wait, ip]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = {}
    for key, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0 or " 0% packet loss" not in out:
            failed[key] = out
    return failed
