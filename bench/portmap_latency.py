#!/usr/bin/env python3
"""portmap latency: podnet's portmap beside the reference, chained after our bridge.

    sudo .venv/bin/python bench/portmap_latency.py [--runs 20]

Two node namespaces (one per implementation) in a podnet Lab, each with one
pod attached by podnet's bridge (the prevResult). For each run: ADD then DEL
of the port mappings, interleaved ours / reference so that machine noise hits
both alike; plugins are started straight inside the node namespace (setns
between fork and exec), so neither side pays `ip netns exec`. Two configs:
IPv4 only and dual-stack, each with one TCP and one UDP mapping (the UDP one
makes both delete conntrack entries). Prints medians and p90 in ms.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cni.executable import install  # noqa: E402
from cni.fastjson import dumps, loads  # noqa: E402
from lab.cluster import Lab  # noqa: E402

from benchlib import run_plugin  # noqa: E402

REF_DIR = "/usr/lib/cni"
MAPPINGS = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 8053, "containerPort": 53, "protocol": "udp"}]


def bridge_conf(data_dir, dual):
    ranges = [[{"subnet": "10.88.0.0/16"}]] + ([[{"subnet": "fd00:88::/64"}]] if dual else [])
    return {"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "cni0",
            "isGateway": True, "ipMasq": True, "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": data_dir, "ranges": ranges}}


def run(node_path, plugin, command, netns_path, stdin, cni_path):
    return run_plugin(node_path, plugin, command, "bench-ctr", netns_path, stdin, cni_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    opts = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    rows = []
    with Lab(prefix="pnb") as lab:
        ours_bin = os.path.join(lab.workdir, "bin")
        install(ours_bin, "/usr/bin/python3")
        for dual in (False, True):
            impls = {}
            for name, bin_dir in (("podnet", ours_bin), ("reference", REF_DIR)):
                tag = "%s%d" % (name[:3], dual)
                node = lab.namespace("node-" + tag)
                pod = lab.pod_netns(tag)
                conf = dumps(bridge_conf(os.path.join(lab.workdir, tag), dual)).encode()
                _, out = run(node.path, os.path.join(ours_bin, "bridge"), "ADD", pod.path, conf, ours_bin)
                pm = dumps({"cniVersion": "1.0.0", "name": "bench", "type": "portmap",
                            "prevResult": loads(out), "runtimeConfig": {"portMappings": MAPPINGS}}).encode()
                impls[name] = (os.path.join(bin_dir, "portmap"), node.path, pod.path, pm, bin_dir)
            samples = {(n, c): [] for n in impls for c in ("ADD", "DEL")}
            for i in range(opts.runs + 1):          # run 0 warms up (creates the shared chains)
                for name, (plugin, node_path, pod_path, pm, bin_dir) in impls.items():
                    for command in ("ADD", "DEL"):
                        ms, _ = run(node_path, plugin, command, pod_path, pm, bin_dir)
                        if i:
                            samples[(name, command)].append(ms)
            for (name, command), s in samples.items():
                s.sort()
                rows.append(("dual-stack" if dual else "IPv4", name, command, statistics.median(s),
                             s[int(round(0.9 * (len(s) - 1)))]))
    print("| config | plugin | command | median ms | p90 ms |")
    print("|---|---|---|---|---|")
    for config, name, command, median, p90 in rows:
        print("| %s | %s | %s | %.1f | %.1f |" % (config, name, command, median, p90))


if __name__ == "__main__":
    main()
