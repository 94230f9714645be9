#!/usr/bin/env python3
"""CNI latency: podnet's plugins beside the reference Go plugins, in one run.

    sudo .venv/bin/python bench/cni_latency.py [--runs 40] [--no-masq] [--also NAME=TREE ...]

Two node namespaces (one per implementation) in a podnet Lab; for each run a
fresh pod namespace per implementation gets ADD, then DEL, interleaved ours /
reference so that machine noise hits both alike. Plugins are started straight
inside the node namespace (setns between fork and exec), so neither side pays
`ip netns exec`. The config is the ANCHORS.md one: bridge + host-local, ipMasq
on, spec 1.0.0. Prints a Markdown table for docs/performance.md.

`--also before=/path/to/an/older/checkout` adds that tree's plugins as a third
implementation in the same interleaved runs (a change's before and after, side
by side; git worktree gives the older checkout).
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cni.executable import install  # noqa: E402
from cni.fastjson import dumps  # noqa: E402
from lab.cluster import Lab  # noqa: E402

from benchlib import bridge_config, run_plugin, summary  # noqa: E402

REF_DIR = "/usr/lib/cni"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--no-masq", action="store_true", help="ipMasq off")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=TREE",
                        help="another podnet source tree to run beside (e.g. before=/work/baseline)")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    if not os.path.exists(os.path.join(REF_DIR, "bridge")):
        raise SystemExit("reference plugins missing: apt-get install containernetworking-plugins")

    results = {}
    with Lab(prefix="pnb") as lab:
        ours_bin = os.path.join(lab.workdir, "bin")
        install(ours_bin, "/usr/bin/python3")
        impls = {
            "podnet": (ours_bin, lab.namespace("ours")),
            "reference": (REF_DIR, lab.namespace("ref")),
        }
        for i, spec in enumerate(opts.also):
            name, _, tree = spec.partition("=")
            other_bin = os.path.join(lab.workdir, "bin-" + name)
            # that tree's own installer writes executables that run that tree's code
            subprocess.run(["/usr/bin/python3", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from cni.executable import install; install(sys.argv[2], '/usr/bin/python3')",
                            os.path.abspath(tree), other_bin], check=True)
            impls[name] = (other_bin, lab.namespace("also%d" % i))
        for name, (bin_dir, node) in impls.items():
            conf = dumps(bridge_config(os.path.join(lab.workdir, name), not opts.no_masq)).encode()
            impls[name] = (bin_dir, node, conf)
            results[name] = {"ADD": [], "DEL": [], "VERSION": []}
        for i in range(opts.runs):
            pods = {}
            for name, (bin_dir, node, conf) in impls.items():
                pod = lab.pod_netns("%s%d" % (name[:6], i))
                pods[name] = pod
                ms, _ = run_plugin(node.path, os.path.join(bin_dir, "bridge"), "ADD", "c%d" % i,
                                   pod.path, conf, bin_dir)
                results[name]["ADD"].append(ms)
            for name, (bin_dir, node, conf) in impls.items():
                for command, stdin in (("DEL", conf), ("VERSION", b"{}")):
                    ms, _ = run_plugin(node.path, os.path.join(bin_dir, "bridge"), command, "c%d" % i,
                                       pods[name].path, stdin, bin_dir)
                    results[name][command].append(ms)

    print("bridge + host-local, ipMasq %s, spec 1.0.0, %d runs each, interleaved"
          % ("off" if opts.no_masq else "on", opts.runs))
    print()
    print("| operation | podnet median | podnet p90 | reference median | reference p90 | ratio (medians) |")
    print("|---|---|---|---|---|---|")
    for op in ("ADD", "DEL", "VERSION"):
        om, op90 = summary(results["podnet"][op])
        rm, rp90 = summary(results["reference"][op])
        print("| %s | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.2fx |" % (op, om, op90, rm, rp90, om / rm))
    for name in impls:
        if name in ("podnet", "reference"):
            continue
        print()
        print("| operation | podnet median | %s median | podnet / %s |" % (name, name))
        print("|---|---|---|---|")
        for op in ("ADD", "DEL", "VERSION"):
            om, _ = summary(results["podnet"][op])
            am, _ = summary(results[name][op])
            print("| %s | %.1f ms | %.1f ms | %.3f |" % (op, om, am, om / am))


if __name__ == "__main__":
    main()
