"""Helpers shared by the netns tests: underlay captures, parallel pings, a test etcd.

Captures run tcpdump inside one of a lab's namespaces (usually the underlay
switch, on br0, which sees every frame between nodes) into a pcap file in the
lab's workdir; `parse_pcap` turns it into plain dicts so a test can assert on
the outer and inner headers of what really crossed the wire.

`EtcdServer` is one etcd member on loopback for the etcd client tests
(flanneld's subnet manager, calico-lite's datastore); the `etcd` fixture in
conftest.py starts one per test and kills it by PID however the test ends.
"""
import os
import re
import signal
import socket
import struct
import subprocess
import time
import urllib.request

import pytest

from lab.cluster import exec_argv

ETCD = "/usr/bin/etcd"
requires_etcd = pytest.mark.skipif(not os.access(ETCD, os.X_OK),
                                   reason="needs etcd 3.4 at %s (Debian package etcd-server)" % ETCD)


def allocation_files(data_dir, network=None):
    """host-local's address files under data_dir (not its lock or last_reserved_ip.N):
    the names in `network`'s store, or "net/name" across every network when None."""
    nets = [network] if network else (sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else [])
    out = []
    for net in nets:
        try:
            names = os.listdir(os.path.join(data_dir, net))
        except FileNotFoundError:
            continue
        out += [name if network else "%s/%s" % (net, name) for name in sorted(names)
                if name != "lock" and not name.startswith("last_reserved_ip.")]
    return out


def wait_until(predicate, timeout, what, interval=0.05):
    """Seconds it took for predicate() to hold; an AssertionError after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)
    return time.monotonic() - start


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


# ---- a test etcd ---------------------------------------------------------------------------

def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One etcd member on 127.0.0.1 (free ports, data in `workdir`), optionally with TLS
    (`tls`: paths of ca.crt, server.crt, server.key; client certificates required).
    stop()/start() keep ports and data (a restart)."""

    def __init__(self, workdir, tls=None):
        self.workdir = workdir
        self.datadir = os.path.join(workdir, "etcd-data")
        self.tls = tls
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.client_port)
        self.proc = None

    def start(self):
        peer = "http://127.0.0.1:%d" % self.peer_port
        args = [ETCD, "--name", "test", "--data-dir", self.datadir,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "test=" + peer, "--logger", "zap", "--log-level", "warn"]
        if self.tls:
            args += ["--cert-file", self.tls["server.crt"], "--key-file", self.tls["server.key"],
                     "--trusted-ca-file", self.tls["ca.crt"], "--client-cert-auth"]
        log = open(os.path.join(self.workdir, "etcd.log"), "ab")
        # A clean environment: no ETCD_* variable of the host may change what this member does.
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env={"PATH": "/usr/bin:/bin"})
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("etcd exited with %s; see %s/etcd.log" % (self.proc.returncode, self.workdir))
            try:
                if self.tls:
                    # The TCP port is enough here: the first client call waits for the leader anyway.
                    socket.create_connection(("127.0.0.1", self.client_port), 0.2).close()
                    time.sleep(0.2)
                    return
                with urllib.request.urlopen(self.url + "/health", timeout=0.5) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("etcd did not become ready; see %s/etcd.log" % self.workdir)

    def stop(self):
        """SIGTERM (SIGKILL after 5 s) to the process this object started, by its PID."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        """A raw etcd3gw client for test setup (writes behind the code under test's back)."""
        import etcd3gw
        return etcd3gw.client(host="127.0.0.1", port=self.client_port, timeout=5)
