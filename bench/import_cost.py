#!/usr/bin/env python3
"""What a CNI plugin pays to import itself, for two source trees side by side.

    .venv/bin/python bench/import_cost.py --tree after=. --tree before=/path/to/older/checkout [--runs 30]

Runs each plugin's import the way the installed executables do
(`/usr/bin/python3 -I -S`, the tree first on sys.path) with `-X importtime`,
interleaving the trees run by run so that machine noise hits both alike, after
one warm-up run per tree that writes the bytecode caches (as the first pod on a
node does). Reports the median cumulative import time of the plugin module, the
number of modules imported, and whether any module that only annotations would
need (`typing`, `collections.abc`, `dataclasses`, `inspect`) was imported.
"""
import argparse
import os
import statistics
import subprocess

PLUGINS = ("cni.plugins.bridge", "cni.plugins.portmap", "ipam.host_local", "cni.plugins.flannel")
ANNOTATION_ONLY = ("typing", "collections.abc", "dataclasses", "inspect")


def one_run(tree, module):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    code = "import sys; sys.path.insert(0, %r); import %s" % (os.path.abspath(tree), module)
    out = subprocess.run(["/usr/bin/python3", "-I", "-S", "-X", "importtime", "-c", code],
                         env=env, capture_output=True, text=True, timeout=30, check=True).stderr
    modules, total = set(), None
    for line in out.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        modules.add(name)
        if name == module:
            total = int(cumulative)
    return total, modules


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--runs", type=int, default=30)
    opts = parser.parse_args()
    trees = [spec.partition("=")[::2] for spec in opts.tree]
    print("`/usr/bin/python3 -I -S -X importtime`, %d interleaved runs per tree, bytecode cached" % opts.runs)
    print()
    print("| plugin module | " + " | ".join("%s: median µs (modules)" % name for name, _ in trees)
          + " | annotation-only modules imported |")
    print("|---|" + "---|" * len(trees) + "---|")
    for module in PLUGINS:
        samples = {name: [] for name, _ in trees}
        loaded = {}
        for _, tree in trees:
            one_run(tree, module)                           # warm-up: writes __pycache__
        for _ in range(opts.runs):
            for name, tree in trees:
                total, modules = one_run(tree, module)
                samples[name].append(total)
                loaded[name] = modules
        cells = ["%d (%d)" % (statistics.median(samples[name]), len(loaded[name])) for name, _ in trees]
        extra = ", ".join("%s: %s" % (name, ",".join(sorted(m for m in loaded[name] if m in ANNOTATION_ONLY)) or "none")
                          for name, _ in trees)
        print("| `%s` | %s | %s |" % (module, " | ".join(cells), extra))


if __name__ == "__main__":
    main()
