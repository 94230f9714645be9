#!/usr/bin/env python3
"""flanneld udp backend throughput: one TCP stream between pods on two nodes.

    sudo .venv/bin/python bench/flannel_udp_throughput.py [--seconds 5]

Two node namespaces on a veth + bridge underlay (a podnet Lab). Measured in
the same run, one after the other, with iperf3 (one TCP stream, --seconds):
  - the underlay itself: node eth0 to node eth0, no encapsulation;
  - kernel VXLAN: pod to pod through a VXLAN device set up as flannel's vxlan
    backend does (VNI 1, port 8472, routes via onlink VTEP addresses, static
    neighbour and FDB entries), pod MTU 1450;
  - the udp backend (flanneld.backend.udp, one process per node inside the
    node namespace): pod to pod, pod MTU 1472; once as it runs (UDP GSO, UDP
    GRO, TCP coalescing into TSO writes), once with --no-offload (one syscall
    per packet each way).
For the udp backend the engine's CPU per packet is given per node: the
process's utime+stime (/proc/PID/stat) over the packets its TUN read and
wrote (the engine's counters: a TSO write counts as the segments it
carries). That includes the kernel work the
engine's syscalls carry (a TUN write forwards the packet into the pod in the
writer's context). Prints a Markdown table.
"""
import argparse
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lab.cluster import Lab  # noqa: E402

from benchlib import UDP_MTU, VXLAN_MTU, attach_pod, iperf, setup_vxlan  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


class Engine:
    def __init__(self, node, index, nodes, offload):
        argv = [sys.executable, "-m", "flanneld.backend.udp", "--network", "10.244.0.0/16",
                "--subnet", "10.244.%d.0/24" % index]
        for j, peer in enumerate(nodes, 1):
            if j != index:
                argv += ["--lease", "10.244.%d.0/24=%s" % (j, peer.underlay_ip)]
        if not offload:
            argv.append("--no-offload")
        self.node = node
        self.proc = node.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            raise SystemExit("udp backend did not start on %s" % node.role)

    def sample(self):
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK       # utime, stime
        # Packets read from and written to the TUN (a TSO write counts its segments).
        self.proc.stdin.write('{"stats": true}\n')
        self.proc.stdin.flush()
        stats = json.loads(self.proc.stdout.readline().split(" ", 1)[1])
        return cpu, stats["tun_packets"] + stats["delivered"]

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    opts = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) still unwinds through the Lab's cleanup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    rows = []
    with Lab() as lab:
        underlay = lab.underlay()
        nodes = [lab.node("node%d" % i, underlay, ip_forward=True) for i in (1, 2)]
        udp_pods = [attach_pod(lab, n, "u%d" % i, "vu", "10.244.%d" % i, UDP_MTU) for i, n in enumerate(nodes, 1)]
        vx_pods = [attach_pod(lab, n, "v%d" % i, "vv", "10.245.%d" % i, VXLAN_MTU) for i, n in enumerate(nodes, 1)]
        setup_vxlan(nodes)

        gbps, retr = iperf(nodes[0], nodes[1], nodes[1].underlay_ip, opts.seconds)
        rows.append(("underlay veth + bridge, node to node (no encapsulation)", gbps, retr, None))
        gbps, retr = iperf(vx_pods[0], vx_pods[1], "10.245.2.2", opts.seconds)
        rows.append(("kernel VXLAN, pod to pod", gbps, retr, None))
        for offload, label in ((True, "udp backend: UDP GSO + GRO, TCP coalesced into TSO writes, pod to pod"),
                               (False, "udp backend --no-offload: one syscall per packet, pod to pod")):
            engines = [Engine(n, i, nodes, offload) for i, n in enumerate(nodes, 1)]
            try:
                before = [e.sample() for e in engines]
                gbps, retr = iperf(udp_pods[0], udp_pods[1], "10.244.2.2", opts.seconds)
                after = [e.sample() for e in engines]
            finally:
                for e in engines:
                    e.stop()
            cpu = []
            for (c0, p0), (c1, p1) in zip(before, after):
                packets = p1 - p0
                cpu.append((c1 - c0, packets, (c1 - c0) / packets * 1e6 if packets else 0))
            rows.append((label, gbps, retr, cpu))

    print("%d CPUs, kernel %s, one TCP stream (iperf3), %d s each\n" % (os.cpu_count(), os.uname().release,
                                                                      opts.seconds))
    print("| path | Gbit/s | retransmits | engine CPU per packet, sending node | same, receiving node |")
    print("|---|---|---|---|---|")
    for label, gbps, retr, cpu in rows:
        if cpu is None:
            per = ["-", "-"]
        else:
            per = ["%.1f us (%.2f s CPU / %d pkts)" % (us, secs, pkts) for secs, pkts, us in cpu]
        print("| %s | %.2f | %d | %s | %s |" % (label, gbps, retr, per[0], per[1]))


if __name__ == "__main__":
    main()
