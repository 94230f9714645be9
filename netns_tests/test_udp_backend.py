"""flanneld's udp backend end to end: three nodes on an underlay, a pod on each.

Each node runs the backend in its own process inside the node namespace
(`python -m flanneld.backend.udp`, started with `ip netns exec`), with
hand-made leases instead of etcd; lease changes go to it as JSON lines on
stdin. A pod is a namespace with a veth to its node, <node subnet>.2/24, MTU
1472 (what subnet.env would say), default route via <node subnet>.1.

One module-wide set-up; the tests that change it (lease removal, restart)
restore what they changed.
"""
import hashlib
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from lab.cluster import Lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK = "10.244.0.0/16"
NODES = 3
POD_MTU = 1472              # eth0's 1500 minus the udp backend's 28
PORT = 8285
TIMEOUT = 20


def subnet(i):
    return "10.244.%d.0/24" % i


def pod_ip(i):
    return "10.244.%d.2" % i


def read_line(proc, timeout=TIMEOUT):
    """The next stdout line of a runner, or fail with what it printed on stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line.strip()
        if proc.poll() is not None:
            break
    err = proc.stderr.read() if proc.poll() is not None else "(still running)"
    raise AssertionError("runner gave no answer (exit %s): %s" % (proc.poll(), err))


class Runner:
    """One node's backend process."""

    def __init__(self, node, index, leases):
        argv = [sys.executable, "-m", "flanneld.backend.udp", "--iface", "eth0",
                "--network", NETWORK, "--subnet", subnet(index)]
        for lease in leases:
            argv += ["--lease", lease]
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = node.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        line = read_line(self.proc)
        assert line.startswith("ready "), line
        self.info = json.loads(line[6:])

    def send(self, msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return read_line(self.proc)

    def sync(self, leases):
        assert self.send({"leases": leases}).startswith("synced ")

    def stats(self):
        line = self.send({"stats": True})
        assert line.startswith("stats "), line
        return json.loads(line[6:])

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait(TIMEOUT)
        return self.proc.returncode


class Cluster:
    def __init__(self, lab):
        self.lab = lab
        self.underlay = lab.underlay()
        self.nodes, self.pods, self.runners = [], [], []
        for i in range(1, NODES + 1):
            node = lab.node("node%d" % i, self.underlay, ip_forward=True)
            pod = lab.pod_netns("p%d" % i)
            node.ip("link", "add", "veth-p", "mtu", POD_MTU, "type", "veth",
                    "peer", "name", "eth0", "netns", pod.name)
            node.ip("addr", "add", "10.244.%d.1/24" % i, "dev", "veth-p")
            node.ip("link", "set", "veth-p", "up")
            pod.ip("link", "set", "lo", "up")
            pod.ip("addr", "add", pod_ip(i) + "/24", "dev", "eth0")
            pod.ip("link", "set", "eth0", "up")
            pod.ip("route", "add", "default", "via", "10.244.%d.1" % i)
            self.nodes.append(node)
            self.pods.append(pod)
        for i in range(1, NODES + 1):
            self.runners.append(self.start(i))

    def leases(self, i, without=()):
        return ["%s=%s" % (subnet(j), self.nodes[j - 1].underlay_ip)
                for j in range(1, NODES + 1) if j != i and j not in without]

    def start(self, i):
        return Runner(self.nodes[i - 1], i, self.leases(i))


@pytest.fixture(scope="module")
def net(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        yield Cluster(lab)


def unreachable(ns, targets, count=1):
    """The targets that do not answer (pings in parallel)."""
    script = " ".join("(ping -c%d -i0.2 -W2 -q %s >/dev/null 2>&1 || echo %s) &" % (count, t, t)
                      for t in targets) + " wait"
    return ns.run(script, timeout=TIMEOUT).stdout.split()


def test_device_mtu_address_and_route(net):
    for i, node in enumerate(net.nodes, 1):
        link = node.ip_json("-d", "link", "show", "flannel0")[0]
        assert link["mtu"] == POD_MTU
        assert link["linkinfo"]["info_kind"] == "tun"
        assert link["linkinfo"]["info_data"]["persist"] is True
        addrs = [(a["local"], a["prefixlen"]) for a in
                 node.ip_json("addr", "show", "flannel0")[0]["addr_info"] if a["family"] == "inet"]
        assert addrs == [("10.244.%d.0" % i, 16)]
        routes = {r["dst"]: r["dev"] for r in node.ip_json("route", "show")}
        assert routes[NETWORK] == "flannel0"


def test_every_pod_pings_every_other_pod(net):
    assert all(r.stats()["alive"] for r in net.runners)
    for i, pod in enumerate(net.pods, 1):
        others = [pod_ip(j) for j in range(1, NODES + 1) if j != i]
        assert unreachable(pod, others, count=2) == [], "from pod %d" % i


RECEIVER = """
import hashlib, socket
s = socket.create_server((%(ip)r, %(port)d))
s.settimeout(%(timeout)d)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(%(timeout)d)
h, n = hashlib.sha256(), 0
while True:
    data = c.recv(1 << 16)
    if not data:
        break
    h.update(data)
    n += len(data)
print(n, h.hexdigest(), flush=True)
"""

SENDER = """
import os, socket, sys
data = bytes.fromhex(sys.stdin.read().strip()) * %(repeat)d
c = socket.create_connection((%(ip)r, %(port)d), timeout=%(timeout)d)
c.sendall(data)
c.close()
"""


def transfer(src_pod, dst_pod, dst_ip, size_mb):
    """Send size_mb MiB of random data over TCP; (bytes, sha256) as the receiver saw them."""
    chunk = os.urandom(1 << 20)
    params = {"ip": dst_ip, "port": 5201, "timeout": TIMEOUT, "repeat": size_mb}
    server = dst_pod.popen([sys.executable, "-c", textwrap.dedent(RECEIVER % params)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(server) == "ready"
        src_pod.run([sys.executable, "-c", textwrap.dedent(SENDER % params)],
                    input=chunk.hex(), timeout=TIMEOUT)
        out, err = server.communicate(timeout=TIMEOUT)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
    size, digest = out.split()
    return int(size), digest, hashlib.sha256(chunk * size_mb).hexdigest()


def test_tcp_transfer_arrives_intact_and_is_coalesced(net):
    before = net.runners[2].stats()
    size, got, want = transfer(net.pods[0], net.pods[2], pod_ip(3), 8)
    assert size == 8 << 20
    assert got == want
    after = net.runners[2].stats()
    # The receiving node wrote most of the data as TSO packets (userspace GRO).
    assert after["coalesced"] > before["coalesced"]
    assert after["delivered"] - before["delivered"] > 5000
    # And the sending node batched with UDP GSO.
    assert net.runners[0].stats()["gso_sends"] > 0
    # The other way too (data node2 -> node1, ACKs the other way).
    size, got, want = transfer(net.pods[1], net.pods[0], pod_ip(1), 4)
    assert (size, got) == (4 << 20, want)


def parse_pcap(data):
    """[(outer src, outer dst, udp sport, udp dport, udp payload)] from an Ethernet pcap."""
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    assert struct.unpack_from(endian + "I", data, 20)[0] == 1    # LINKTYPE_ETHERNET
    off, out = 24, []
    while off + 16 <= len(data):
        caplen = struct.unpack_from(endian + "I", data, off + 8)[0]
        frame = data[off + 16:off + 16 + caplen]
        off += 16 + caplen
        if len(frame) < 42 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0xF) * 4
        if frame[23] != 17:
            continue
        src, dst = frame[26:30], frame[30:34]
        udp = frame[14 + ihl:]
        sport, dport, length = struct.unpack_from("!HHH", udp)
        out.append((ip_str(src), ip_str(dst), sport, dport, udp[8:length]))
    return out


def ip_str(raw):
    return ".".join(str(b) for b in raw)


def test_underlay_carries_inner_ip_packets_in_udp_8285(net):
    switch = net.underlay.switch
    pcap = os.path.join(net.lab.workdir, "underlay.pcap")
    dump = switch.popen(["tcpdump", "-i", "br0", "-U", "-n", "-c", "4", "-w", pcap,
                         "udp", "port", str(PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while "listening" not in dump.stderr.readline():
            assert time.monotonic() < deadline and dump.poll() is None, "tcpdump did not start"
        assert unreachable(net.pods[0], [pod_ip(2)], count=2) == []
        dump.wait(TIMEOUT)
    finally:
        if dump.poll() is None:
            dump.kill()
    with open(pcap, "rb") as f:
        frames = parse_pcap(f.read())
    assert len(frames) == 4
    node1, node2 = net.nodes[0].underlay_ip, net.nodes[1].underlay_ip
    seen = set()
    for src, dst, sport, dport, inner in frames:
        assert (sport, dport) == (PORT, PORT)
        assert inner[0] >> 4 == 4 and inner[9] == 1         # IPv4 carrying ICMP
        assert struct.unpack_from("!H", inner, 2)[0] == len(inner)   # one whole packet per datagram
        inner_src, inner_dst = ip_str(inner[12:16]), ip_str(inner[16:20])
        icmp_type = inner[20]
        seen.add((src, dst, inner_src, inner_dst, icmp_type))
    assert seen == {(node1, node2, pod_ip(1), pod_ip(2), 8),      # echo request
                    (node2, node1, pod_ip(2), pod_ip(1), 0)}      # echo reply


def test_removing_a_lease_stops_traffic_to_that_node(net):
    runner = net.runners[0]
    runner.sync(net.leases(1, without=(3,)))
    try:
        before = runner.stats()["no_route"]
        assert unreachable(net.pods[0], [pod_ip(3)], count=2) == [pod_ip(3)]
        assert unreachable(net.pods[0], [pod_ip(2)]) == []
        assert runner.stats()["no_route"] >= before + 2     # dropped at node1, never sent
    finally:
        runner.sync(net.leases(1))
    assert unreachable(net.pods[0], [pod_ip(3)]) == []


def test_restart_loses_only_a_few_packets(net):
    node2 = net.nodes[1]
    index = node2.ip_json("link", "show", "flannel0")[0]["ifindex"]
    interval, count = 0.02, 150             # 50 packets a second for 3 s
    ping = net.pods[0].popen(["ping", "-i", str(interval), "-c", str(count), "-W", "1", "-q",
                              pod_ip(2)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.8)
    assert net.runners[1].stop() == 0
    # Nothing attached: the device, its address and the route stay.
    assert "10.244.2.0/16" in node2.ip("addr", "show", "flannel0").stdout
    assert node2.ip_json("route", "show", NETWORK)[0]["dev"] == "flannel0"
    started = time.monotonic()
    net.runners[1] = net.start(2)
    gap = time.monotonic() - started
    out, _ = ping.communicate(timeout=TIMEOUT)
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    lost = sent - received
    print("restart: lost %d of %d, start-up %.3f s" % (lost, sent, gap))
    assert net.runners[1].info["ifindex"] == index          # the same device, adopted
    # The gap is the new process's start-up (~0.1-0.2 s): at 50/s, a handful of packets.
    assert lost <= 15, "lost %d of %d packets (restart took %.2f s)" % (lost, sent, gap)
    assert unreachable(net.pods[1], [pod_ip(1), pod_ip(3)]) == []
