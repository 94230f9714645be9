#!/usr/bin/env python3
"""calico CNI latency: podnet's calico plugin beside the bridge plugins, in one run.

    sudo .venv/bin/python bench/calico_cni_latency.py [--runs 40]

There is no reference calico plugin packaged here, so the baselines are the
closest comparable ADDs: podnet's bridge and the reference (Go) bridge, both
with host-local and ipMasq off, spec 1.0.0. One node namespace per
implementation; for each run a fresh pod namespace per implementation gets
ADD, then DEL, interleaved so that machine noise hits all alike. Plugins are
started straight inside the node namespace (setns between fork and exec).
Prints a Markdown table for docs/performance.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cni.executable import install  # noqa: E402
from cni.fastjson import dumps  # noqa: E402
from lab.cluster import Lab  # noqa: E402

from benchlib import bridge_config, run_plugin, summary  # noqa: E402

REF_DIR = "/usr/lib/cni"


def calico_config(data_dir, blocks_file):
    return {"cniVersion": "1.0.0", "name": "bench", "type": "calico", "mtu": 1480,
            "nodeBlocksFile": blocks_file,
            "ipam": {"type": "host-local", "subnet": "useNodeBlock", "dataDir": data_dir}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    opts = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")

    results = {}
    with Lab(prefix="pnb") as lab:
        ours_bin = os.path.join(lab.workdir, "bin")
        install(ours_bin, "/usr/bin/python3")
        blocks = os.path.join(lab.workdir, "blocks")
        with open(blocks, "w") as f:
            f.write("10.65.0.0/24\n")      # room for every run's pod
        impls = {"podnet calico": (ours_bin, "calico", calico_config(os.path.join(lab.workdir, "c"), blocks)),
                 "podnet bridge": (ours_bin, "bridge", bridge_config(os.path.join(lab.workdir, "b")))}
        if os.path.exists(os.path.join(REF_DIR, "bridge")):
            impls["reference bridge"] = (REF_DIR, "bridge", bridge_config(os.path.join(lab.workdir, "r")))
        nodes = {}
        for i, name in enumerate(impls):
            nodes[name] = lab.namespace("node%d" % i)
            results[name] = {"ADD": [], "DEL": []}
        for i in range(opts.runs):
            pods = {}
            for j, (name, (bin_dir, plugin, conf)) in enumerate(impls.items()):
                pods[name] = lab.pod_netns("p%d-%d" % (j, i))
                ms, _ = run_plugin(nodes[name].path, os.path.join(bin_dir, plugin), "ADD", "c%d" % i,
                                   pods[name].path, dumps(conf).encode(), bin_dir)
                results[name]["ADD"].append(ms)
            for name, (bin_dir, plugin, conf) in impls.items():
                ms, _ = run_plugin(nodes[name].path, os.path.join(bin_dir, plugin), "DEL", "c%d" % i,
                                   pods[name].path, dumps(conf).encode(), bin_dir)
                results[name]["DEL"].append(ms)

    print("calico (veth + /32 routes) vs bridge, host-local, ipMasq off, spec 1.0.0, %d runs each, interleaved"
          % opts.runs)
    print()
    print("| plugin | ADD median | ADD p90 | DEL median | DEL p90 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        am, ap = summary(r["ADD"])
        dm, dp = summary(r["DEL"])
        print("| %s | %.1f ms | %.1f ms | %.1f ms | %.1f ms |" % (name, am, ap, dm, dp))


if __name__ == "__main__":
    main()
