#!/usr/bin/env python3
"""CNI chain latency: the whole stock 10-flannel chain, as a runtime runs it.

    sudo .venv/bin/python bench/cni_chain_latency.py [--runs 30] [--cni-version 0.3.1]

The chain is Kubernetes' 10-flannel.conflist: flannel (delegating to bridge,
which calls host-local), then portmap with one port mapping (8080 -> 80/tcp)
as a capability arg. Three sides, each in its own node namespace of one Lab:

- podnet:  our flannel, bridge, host-local and portmap;
- flannel + reference delegates: our flannel driving the reference bridge,
  host-local and portmap from /usr/lib/cni (Debian packages no reference
  flannel plugin, so there is no all-reference chain to time);
- reference, no flannel: the reference bridge (+ host-local) with the config
  flannel would have produced, then the reference portmap: what a runtime pays
  with the reference plugins minus flannel's own step.

Every side runs through cni.conflist from this process after entering the
node namespace (the plugin processes inherit it, so nobody pays
`ip netns exec`): one process per plugin, prevResult passed down, the
libcni-format cache written, plugins never run in-process by the runtime
side. Per run, each side ADDs a fresh pod namespace, then each side DELs it;
the order of the sides rotates from run to run so that machine noise hits all
alike. Two warm-up runs (creating cni0 and the shared iptables chains) are not
counted. Prints a Markdown table for docs/performance.md.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cni import conflist  # noqa: E402
from cni.executable import install  # noqa: E402
from cni.plugins.flannel import delegate_config, parse_subnet_env  # noqa: E402
from lab.cluster import Lab  # noqa: E402
from podnet.net.netns import entered  # noqa: E402

from benchlib import summary  # noqa: E402

REF_DIR = "/usr/lib/cni"
SUBNET_ENV = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
              "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
CAP_ARGS = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
PORTMAP = {"type": "portmap", "capabilities": {"portMappings": True}}
WARMUP = 2


def flannel_list(version, subnet_file, data_dir):
    return {"name": "cbr0", "cniVersion": version, "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True},
         "subnetFile": subnet_file, "dataDir": os.path.join(data_dir, "flannel"),
         "ipam": {"dataDir": os.path.join(data_dir, "ipam")}},
        dict(PORTMAP)]}


def bridge_list(version, data_dir):
    """The same chain minus flannel: the bridge config flannel would delegate."""
    entry = flannel_list(version, None, data_dir)["plugins"][0]
    bridge = delegate_config(dict(entry, name="cbr0", cniVersion=version), parse_subnet_env(SUBNET_ENV))
    return {"name": "cbr0", "cniVersion": version, "plugins": [bridge, dict(PORTMAP)]}


def timed(fn, node_path, *args):
    with entered(node_path):
        start = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - start) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--cni-version", default="0.3.1", help="the conflist's cniVersion (stock: 0.3.1)")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    for name in ("bridge", "host-local", "portmap"):
        if not os.path.exists(os.path.join(REF_DIR, name)):
            raise SystemExit("reference plugins missing: apt-get install containernetworking-plugins")

    sides = ["podnet", "flannel + reference delegates", "reference, no flannel"]
    samples = {side: {"ADD": [], "DEL": []} for side in sides}
    with Lab(prefix="pnb") as lab:
        ours_bin = os.path.join(lab.workdir, "bin")
        install(ours_bin, "/usr/bin/python3")
        mixed_bin = os.path.join(lab.workdir, "mixed")
        install(mixed_bin, "/usr/bin/python3", ["flannel"])
        for name in ("bridge", "host-local", "portmap"):
            os.symlink(os.path.join(REF_DIR, name), os.path.join(mixed_bin, name))
        subnet_file = os.path.join(lab.workdir, "subnet.env")
        with open(subnet_file, "w") as f:
            f.write(SUBNET_ENV)

        setup = {}
        for i, side in enumerate(sides):
            data_dir = os.path.join(lab.workdir, "side%d" % i)
            os.makedirs(data_dir)
            if side == "reference, no flannel":
                raw, path = bridge_list(opts.cni_version, data_dir), [REF_DIR]
            else:
                raw = flannel_list(opts.cni_version, subnet_file, data_dir)
                path = [ours_bin if side == "podnet" else mixed_bin]
            setup[side] = (lab.namespace("node%d" % i), conflist.load(raw), path, data_dir)

        for run in range(WARMUP + opts.runs):
            order = sides[run % 3:] + sides[:run % 3]
            rts = {}
            for side in order:
                node, cl, path, data_dir = setup[side]
                pod = lab.pod_netns("%d-%d" % (sides.index(side), run))
                rts[side] = conflist.RuntimeConf("ctr%d" % run, pod.path, "eth0", (), CAP_ARGS, data_dir)
                ms = timed(conflist.add, node.path, cl, rts[side], path)
                if run >= WARMUP:
                    samples[side]["ADD"].append(ms)
            for side in order:
                node, cl, path, _ = setup[side]
                ms = timed(conflist.delete, node.path, cl, rts[side], path)
                if run >= WARMUP:
                    samples[side]["DEL"].append(ms)
    print_table(samples, sides, opts)


def print_table(samples, sides, opts):
    print("stock 10-flannel chain (flannel -> bridge -> host-local, then portmap with one mapping), "
          "spec %s, %d runs each, interleaved" % (opts.cni_version, opts.runs))
    print()
    print("| operation | side | median | p90 | podnet / side (medians) |")
    print("|---|---|---|---|---|")
    for op in ("ADD", "DEL"):
        ours, _ = summary(samples["podnet"][op])
        for side in sides:
            med, p90 = summary(samples[side][op])
            print("| %s | %s | %.1f ms | %.1f ms | %s |" % (op, side, med, p90,
                                                         "-" if side == "podnet" else "%.2fx" % (ours / med)))


if __name__ == "__main__":
    main()
