"""`podnet network-policy`: the NetworkPolicy agent (sources -> model -> nftables), and `explain`.

The daemon: a source (the Kubernetes API, or a watched manifests directory) for
NetworkPolicies, Pods and Namespaces feeds the sync loop (network_policy/agent.py),
which keeps the model (network_policy/model.py) and has the dataplane
(network_policy/nftables.py) write our one table, `inet podnet-network-policy`.
At start it turns br_netfilter's bridge-nf-call-iptables / -ip6tables on in its
network namespace (pods on one bridge otherwise bypass the forward hook), serves
/metrics, /healthz, /livez and /readyz (network_policy/metrics.py), and reads the
ruleset's NFLOG group to log each dropped packet (the kernel rate-limits what it
logs). SIGTERM and SIGINT stop it and leave the table in place: enforcement goes
on while it restarts, and the next agent takes the table over with a full sync.
`--cleanup` deletes exactly our table and exits.

Flags follow kube-proxy's where they mean the same: --kubeconfig, --hostname-override
(this node's name as pods' spec.nodeName says it), --metrics-bind-address (default
127.0.0.1:10265), --healthz-bind-address (default 0.0.0.0:10266), --min-sync-period
(default 1s: changes coalesce to at most one sync per period), --sync-period (the
full-sync period, default 1h; a failed sync is retried sooner, with backoff up to
min(30 s, --sync-period)), -v, --cleanup. Ours: --manifests DIR, --nflog-group N
(default 100), --nflog-rate (default 10/second: what the ruleset logs at most, per
direction).

`podnet network-policy explain NAMESPACE/POD [--json] [--verdict SRC --port P
--protocol PROTO]` lists the same source once, builds the model and prints what the
pod is allowed: isolated or not per direction, each policy selecting it with its
rules, peers resolved to pods and CIDRs, named ports resolved; with --verdict, what
the reference evaluator says of a connection from SRC (NAMESPACE/POD or an address)
to the pod.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from podnet.flags import parse_duration

log = logging.getLogger("network_policy")

PROG = "podnet network-policy"
DEFAULT_NFLOG_GROUP = 100
DEFAULT_NFLOG_RATE = "10/second"


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config)")
    src.add_argument("--manifests", metavar="DIR",
                     help="read NetworkPolicies, Pods and Namespaces from YAML/JSON files in DIR (watched)")
    p.add_argument("--manifests-interval", type=parse_duration, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--hostname-override", default="",
                   help="this node's name, as pods' spec.nodeName says it (default: the hostname)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A NetworkPolicy agent: enforces networking.k8s.io/v1 "
                                "NetworkPolicies for this node's pods with nftables. "
                                "`%s explain NAMESPACE/POD` shows what a pod is allowed." % PROG)
    _add_source_flags(p)
    p.add_argument("--metrics-bind-address", default="127.0.0.1:10265",
                   help='/metrics, /healthz, /livez, /readyz (default 127.0.0.1:10265; "" disables)')
    p.add_argument("--healthz-bind-address", default="0.0.0.0:10266",
                   help='/healthz, /livez, /readyz (default 0.0.0.0:10266; "" disables)')
    p.add_argument("--min-sync-period", type=parse_duration, default=1.0,
                   help="minimum time between syncs (default 1s)")
    p.add_argument("--sync-period", dest="full_sync_period", type=parse_duration, default=3600.0,
                   help="interval of full syncs (default 1h; partial syncs in between)")
    p.add_argument("--nflog-group", type=int, default=DEFAULT_NFLOG_GROUP,
                   help="NFLOG group the ruleset logs dropped packets to (default %d)" % DEFAULT_NFLOG_GROUP)
    p.add_argument("--nflog-rate", default=DEFAULT_NFLOG_RATE,
                   help="most dropped packets logged, per direction (nft's limit rate; default %s)"
                        % DEFAULT_NFLOG_RATE)
    p.add_argument("--cleanup", action="store_true", help="remove our nftables table and exit")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=2, help="log verbosity (as kube-proxy's -v)")
    return p


def build_explain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG + " explain",
                                description="What a pod is allowed, from the policies the source holds now.")
    p.add_argument("pod", metavar="NAMESPACE/POD")
    _add_source_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--verdict", metavar="SRC",
                   help="also judge a connection from SRC (NAMESPACE/POD or an IP address) to the pod")
    p.add_argument("--port", default="80", help="--verdict's destination port, a number or a named port (default 80)")
    p.add_argument("--protocol", default="TCP", type=str.upper, choices=("TCP", "UDP", "SCTP"),
                   help="--verdict's protocol (default TCP)")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _logging(verbosity: int) -> None:
    logging.basicConfig(level=logging.DEBUG if verbosity >= 4 else logging.INFO if verbosity >= 1 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _source(opts: argparse.Namespace, emit: Any) -> Any:
    from network_policy.agent import KINDS, manifest_source
    if opts.manifests:
        return manifest_source(opts.manifests, emit, opts.manifests_interval)
    from podnet.kube.api import KubeApiSource
    return KubeApiSource(emit, kubeconfig=opts.kubeconfig, kinds=KINDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["explain"]:
        return explain_main(args[1:])
    opts = build_parser().parse_args(args)
    _logging(opts.verbosity)
    from network_policy.model import PolicyModel
    from network_policy.nftables import TABLE, NftablesDataplane
    hostname = opts.hostname_override or socket.gethostname()
    if not 0 <= opts.nflog_group <= 0xFFFF:
        print("%s: --nflog-group %d is not 0..65535" % (PROG, opts.nflog_group), file=sys.stderr)
        return 2
    model = PolicyModel(hostname)
    dataplane = NftablesDataplane(model, log_group=opts.nflog_group, log_rate=opts.nflog_rate)
    if opts.cleanup:
        try:
            dataplane.cleanup()
        except Exception as e:
            print("%s --cleanup: %s" % (PROG, e), file=sys.stderr)
            return 1
        log.info("removed table inet %s (if there was one)", TABLE)
        return 0

    from network_policy.agent import DropLogger, PolicyAgent, enable_bridge_netfilter
    from network_policy.metrics import HEALTHZ_PORT, METRICS_PORT, Metrics
    from podnet import httpd
    metrics = Metrics(health_timeout=max(60.0, 2 * opts.min_sync_period), drop_counts=dataplane.drop_counts)
    agent = PolicyAgent(model, dataplane, hostname, min_sync_period=opts.min_sync_period,
                        full_sync_period=opts.full_sync_period, max_retry=min(30.0, opts.full_sync_period),
                        metrics=metrics)
    servers = []
    for flag, default_port, routes in (("metrics_bind_address", METRICS_PORT, "metrics"),
                                       ("healthz_bind_address", HEALTHZ_PORT, "healthz")):
        text = getattr(opts, flag)
        try:
            address = httpd.parse_address(text, default_port)
            if address:
                servers.append(httpd.serve(address, metrics.routes(routes), name=routes))
        except (OSError, ValueError) as e:
            print("%s: --%s %s: %s" % (PROG, flag.replace("_", "-"), text, e), file=sys.stderr)
            return 1
    enable_bridge_netfilter()
    drops = DropLogger(agent, opts.nflog_group)
    drops.start()
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    source = _source(opts, agent.emit)
    log.info("NetworkPolicy agent for node %s; source %s; table inet %s", hostname,
             "manifests in %s" % opts.manifests if opts.manifests else "the Kubernetes API", TABLE)
    started = time.monotonic()
    try:
        agent.run(source)
    finally:
        drops.stop()
        for server in servers:
            server.shutdown()
            server.server_close()
    log.info("stopped after %.0f s and %d syncs; the rules stay in place", time.monotonic() - started, agent.syncs)
    return 0


class _NoDataplane:
    """explain builds the model only."""

    def sync(self, full: bool = False) -> Any:
        raise RuntimeError("explain does not sync")

    def cleanup(self) -> None:
        pass

    def drop_counts(self) -> dict[str, int]:
        return {}


def load_once(opts: argparse.Namespace, agent: Any) -> None:
    """Every object of the agent's kinds from the source, listed once, into the agent's model."""
    from network_policy.agent import KINDS
    from podnet.kube.events import RELIST, Event
    if opts.manifests:
        _source(opts, agent.apply).scan()
        return
    source = _source(opts, agent.apply)
    for kind in KINDS:
        items, _ = source.list(kind)
        agent.apply(Event(RELIST, kind, items))


def explain_main(argv: Sequence[str]) -> int:
    opts = build_explain_parser().parse_args(list(argv))
    _logging(opts.verbosity)
    namespace, slash, name = opts.pod.partition("/")
    if not slash or not namespace or not name:
        print("%s explain: expected NAMESPACE/POD, got %r" % (PROG, opts.pod), file=sys.stderr)
        return 2
    from network_policy import explain
    from network_policy.agent import PolicyAgent
    from network_policy.model import PolicyModel
    node = opts.hostname_override or socket.gethostname()
    model = PolicyModel(node)
    agent = PolicyAgent(model, _NoDataplane(), node)
    try:
        load_once(opts, agent)
    except Exception as e:
        print("%s explain: cannot list the source: %s" % (PROG, e), file=sys.stderr)
        return 1
    pod = agent.cache.get("Pod", (namespace, name))
    if pod is None:
        print("%s explain: no pod %s/%s%s" % (PROG, namespace, name,
                                               " (it is malformed: %s)" % agent.invalid[("Pod", (namespace, name))]
                                               if ("Pod", (namespace, name)) in agent.invalid else ""),
              file=sys.stderr)
        return 1
    explanation = model.explain(namespace, name)
    verdict = None
    if opts.verdict:
        try:
            verdict = explain.judge(model, opts.verdict, pod, opts.port, opts.protocol)
        except ValueError as e:
            print("%s explain: --verdict: %s" % (PROG, e), file=sys.stderr)
            return 2
    if opts.json:
        print(explain.to_json(explanation, verdict))
    else:
        print(explain.to_text(explanation, verdict), end="")
    return 0



if __name__ == "__main__":
    sys.exit(main())
