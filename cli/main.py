"""The `podnet` command: one entry point, one subcommand per job."""
import argparse
import os
import sys


def cmd_cni(opts):
    """Run a conflist against a network namespace, as a container runtime would."""
    from cni import conflist
    from cni.errors import CNIError
    from cni.fastjson import dumps
    from cni.types import LATEST, to_version
    version = LATEST
    try:
        conf = conflist.load(opts.conflist)
        version = conf.version
        cid = opts.container_id or "podnet-" + _short_hash(opts.netns)
        cap_args = {}
        if opts.cap_args:
            from cni.fastjson import loads
            cap_args = loads(opts.cap_args)
            if not isinstance(cap_args, dict):
                raise ValueError("--cap-args must be a JSON object, not %s" % opts.cap_args)
        args = [tuple(kv.split("=", 1)) for kv in opts.args.split(";") if kv] if opts.args else []
        rt = conflist.RuntimeConf(cid, opts.netns, opts.ifname, args, cap_args, opts.cache_dir)
        path = [d for d in opts.cni_path.split(":") if d]
        if opts.action == "add":
            print(dumps(to_version(conflist.add(conf, rt, path), conf.version), indent=4))
        elif opts.action == "del":
            if not opts.cap_args:   # what ADD was given (portmap needs its mappings to remove them)
                for cached in conflist.cached_attachments(opts.cache_dir, conf.name):
                    if (cached.container_id, cached.ifname) == (cid, opts.ifname):
                        rt.capability_args = cached.capability_args
            conflist.delete(conf, rt, path)
        elif opts.action == "check":
            conflist.check(conf, rt, path)
        elif opts.action == "gc":
            valid = [tuple(a.split("/", 1)) for a in opts.valid or []]
            conflist.gc(conf, valid, path, opts.cache_dir)
        elif opts.action == "status":
            conflist.status(conf, path)
        return 0
    except CNIError as e:
        print(dumps(e.to_dict(version), indent=4))
        return 1
    except ValueError as e:
        print("podnet cni: %s" % e, file=sys.stderr)
        return 2


def _short_hash(text):
    import hashlib
    return hashlib.sha512(text.encode()).hexdigest()[:16]


def cmd_demo(opts):
    from lab.demo import run_demo
    return run_demo(nodes=opts.nodes, backend=opts.backend, pods_per_node=opts.pods_per_node,
                    keep=opts.keep, mode=opts.mode)


# Subcommands that are whole daemons with their own flag parsers: name -> module with main(argv).
DAEMONS = {
    "flanneld": "flanneld.daemon",
    "kube-proxy": "kube_proxy.server",
    "ingress": "ingress.controller",
    "calico": "calico_lite.agent",
    "network-policy": "network_policy.server",
}


def main(argv=None):
    import sys as _sys
    argv = _sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DAEMONS:     # daemons parse their own (upstream-named) flags
        import importlib
        return importlib.import_module(DAEMONS[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="podnet", description="Container networking for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)

    if argv[:1] in (["install-cni"], ["cleanup"]):
        from cli import cleanup, install
        install.add_parser(sub)
        cleanup.add_parser(sub)
    else:       # listed, without their imports (~13 ms) on every `podnet cni` a runtime-like caller makes
        sub.add_parser("install-cni", help="install podnet's CNI plugin executables (and a network config list)")
        sub.add_parser("cleanup", help="remove everything podnet created on this node; --dry-run lists it")

    p = sub.add_parser("cni", help="run a CNI network config list against a netns (like cnitool)")
    p.add_argument("action", choices=["add", "del", "check", "gc", "status"])
    p.add_argument("netns", nargs="?", default="", help="network namespace path (not for gc/status)")
    p.add_argument("--conflist", required=True, help="a .conflist (or single .conf) file")
    p.add_argument("--ifname", default="eth0")
    p.add_argument("--container-id", default="", help="default: derived from the netns path")
    p.add_argument("--cni-path", default=os.environ.get("CNI_PATH", "/opt/cni/bin"))
    p.add_argument("--cache-dir", default="/var/lib/cni", help="libcni-compatible result cache")
    p.add_argument("--cap-args", default="", help='capability args as JSON, e.g. \'{"portMappings": [...]}\' '
                   "(del: default the ones the cached ADD was given)")
    p.add_argument("--args", default="", help="CNI_ARGS, K=V;K2=V2")
    p.add_argument("--valid", action="append", help="gc: a valid attachment CONTAINERID/IFNAME (repeatable)")
    p.set_defaults(func=cmd_cni)

    sub.add_parser("flanneld", help="run the overlay daemon (flannel's flags; see podnet flanneld --help)")
    sub.add_parser("kube-proxy", help="run the Service proxy (kube-proxy's flags; see podnet kube-proxy --help)")
    sub.add_parser("ingress", help="run the Ingress controller on nginx (see podnet ingress --help)")
    sub.add_parser("calico", help="calico_lite: `agent` (BGP + routes), `reflector`, `bird-config`")
    sub.add_parser("network-policy", help="run the NetworkPolicy agent (nftables); `network-policy explain "
                   "NAMESPACE/POD` shows what a pod is allowed")

    p = sub.add_parser("demo", help="build a cluster in network namespaces, attach pods, check connectivity")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--mode", choices=["flannel", "calico"], default="flannel",
                   help="flannel: an overlay (see --backend); calico: BGP routes via a route reflector")
    p.add_argument("--backend", choices=["vxlan", "host-gw", "udp"], default="vxlan", help="flannel's backend")
    p.add_argument("--pods-per-node", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="leave the lab up until Enter is pressed")
    p.set_defaults(func=cmd_demo)

    if argv[:1] == ["trace"]:
        from diagnose import trace
        trace.add_parser(sub)
    else:
        sub.add_parser("trace", help="where a packet from SRC to DST goes, hop by hop, and where it stops")

    p = sub.add_parser("doctor", help="this node's kernel state against what podnet's components want, and the "
                       "classic misconfigurations; exit 1 on an error finding")
    if argv[:1] == ["doctor"]:
        from diagnose import doctor
        doctor.add_arguments(p)
        p.set_defaults(func=doctor.main)

    opts = parser.parse_args(argv)
    if opts.command in ("demo",) and os.geteuid() != 0:
        print("podnet %s: needs root (it creates network namespaces)" % opts.command, file=sys.stderr)
        return 1
    return opts.func(opts)


if __name__ == "__main__":
    sys.exit(main())
