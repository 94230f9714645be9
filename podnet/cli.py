"""The `podnet` command: one entry point, one subcommand per job."""
import argparse
import os
import sys


def cmd_install_cni(opts):
    from cni.executable import PLUGINS, install
    names = opts.plugins or list(PLUGINS)
    unknown = [n for n in names if n not in PLUGINS]
    if unknown:
        print("unknown plugin(s): %s (have: %s)" % (", ".join(unknown), ", ".join(PLUGINS)), file=sys.stderr)
        return 2
    for path in install(opts.dest, opts.python, names):
        print(path)
    return 0


def cmd_demo(opts):
    from podnet.demo import run_demo
    return run_demo(pods=opts.pods, keep=opts.keep)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="podnet", description="Container networking for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install-cni", help="install podnet's CNI plugin executables")
    p.add_argument("--dest", default="/opt/cni/bin", help="directory to install into (default: %(default)s)")
    p.add_argument("--python", default="/usr/bin/python3",
                   help="interpreter in the executables' #! line (default: %(default)s); "
                        "never a pyenv shim: it costs ~70 ms per call")
    p.add_argument("plugins", nargs="*", help="plugin names (default: all)")
    p.set_defaults(func=cmd_install_cni)

    p = sub.add_parser("demo", help="build a node in network namespaces, attach pods, check connectivity")
    p.add_argument("--pods", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="leave the lab up until Enter is pressed")
    p.set_defaults(func=cmd_demo)

    opts = parser.parse_args(argv)
    if opts.command in ("demo",) and os.geteuid() != 0:
        print("podnet %s: needs root (it creates network namespaces)" % opts.command, file=sys.stderr)
        return 1
    return opts.func(opts)


if __name__ == "__main__":
    sys.exit(main())
