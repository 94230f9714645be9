#!/usr/bin/env python3
"""Pod-to-pod throughput across two nodes for each flanneld backend.

    sudo .venv/bin/python bench/flannel_throughput.py [--seconds 5] [--backends vxlan,host-gw,udp]

Each backend gets a fresh two-node podnet Cluster (etcd, `flanneld` per node,
pods attached by the 10-flannel conflist through our CNI plugins): exactly
the datapath the demo and the tests build. In the same run, for scale: the
raw underlay (node eth0 to node eth0 over veth + bridge) and a raw kernel
VXLAN pair set up by hand as flannel's vxlan backend would (no daemon).
One iperf3 TCP stream per row. Prints a Markdown table.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.cluster import Cluster, Lab  # noqa: E402

from benchlib import VXLAN_MTU, attach_pod, iperf, setup_vxlan  # noqa: E402


def raw_paths(seconds):
    rows = []
    with Lab(prefix="pnt") as lab:
        underlay = lab.underlay("192.168.60.0/24")
        nodes = [lab.node("n%d" % i, underlay, ip_forward=True) for i in (1, 2)]
        gbit, retr = iperf(nodes[0], nodes[1], nodes[1].underlay_ip, seconds)
        rows.append(("raw underlay (veth + bridge), node to node", gbit, retr))
        setup_vxlan(nodes)
        pods = [attach_pod(lab, node, "v%d" % i, "vp%d" % i, "10.245.%d" % i, VXLAN_MTU)
                for i, node in enumerate(nodes, 1)]
        gbit, retr = iperf(pods[0], pods[1], "10.245.2.2", seconds)
        rows.append(("raw kernel VXLAN pair, pod to pod (no daemon)", gbit, retr))
    return rows


def backend_path(backend, seconds):
    with Lab(prefix="pnt") as lab:
        cluster = Cluster(lab, nodes=2, backend=backend, ip_masq=False).start()
        a = cluster.add_pod(cluster.nodes[0], "a")
        b = cluster.add_pod(cluster.nodes[1], "b")
        gbit, retr = iperf(a.ns, b.ns, b.ip, seconds)
    return ("flanneld %s, pod to pod (our CNI chain)" % backend, gbit, retr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--backends", default="vxlan,host-gw,udp")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    rows = raw_paths(opts.seconds)
    for backend in opts.backends.split(","):
        rows.append(backend_path(backend.strip(), opts.seconds))
    print("one TCP stream, %d s each, two nodes on a veth + bridge underlay\n" % opts.seconds)
    print("| path | Gbit/s | retransmits |")
    print("|---|---|---|")
    for name, gbit, retr in rows:
        print("| %s | %.2f | %d |" % (name, gbit, retr))


if __name__ == "__main__":
    main()
