#!/usr/bin/env python3
"""NetworkPolicy dataplane sync times at scale, rules really applied to a kernel, and what
1,000 policies add to a new connection's first packet.

    sudo .venv/bin/python bench/network_policy_sync.py [--policies 1000 --pods 10000 --namespaces 100]
                                                         [--runs 3] [--connections 3000] [--quick]

The cluster: --namespaces namespaces (labels team, env), --pods pods spread over 100 nodes
(labels app, tier, team; named container ports http and metrics; this node, node0, runs
1 in 100 of them), --policies policies shaped like the API's (selectors mixing matchLabels
and matchExpressions; peers by podSelector, namespaceSelector with podSelector, ipBlock with
except; numbered, ranged and named ports; default-deny and egress policies). Every object
goes through the real pipeline (API-shaped dicts -> parse_* -> PolicyModel ->
NftablesDataplane -> nft -f) into a fresh network namespace a podnet Lab makes (never the
root namespace). Figures, medians over --runs:

  floor          the same table text loaded with one `nft -f` into an empty namespace: the
                 least any full sync can cost here
  first sync     the dataplane's first (full) sync into an empty namespace, incl. reading it
  full sync      a periodic full sync over the table it wrote
  restart sync   a new dataplane's first sync over its predecessor's table (takeover)
  pod relabel    one pod's labels changed so that it leaves the sets of the policies selecting
                 it (a partial sync: set and map elements only), a pod of this node and one
                 of another in turn
  pod add/del    one pod added, one deleted
  policy change  one policy's port changed (its chain rewritten), one added, one deleted
  model          loading every object into the model (Python only)
  beside another table   the relabel (both ways of removing elements) and the policy change
                 again with someone else's table of --foreign-chains chains in the namespace:
                 nft's `delete element` lists every table's chains first, our rewrite does not

The first-packet cost: two pods of node0 (a client isolated for egress and a server isolated
for ingress, allowed by the policies) in namespaces routed through the node namespace;
--connections TCP connections (connect, accept, reset) timed with our table in place and
without it, alternately, in one run. The difference per connection is what the policies
cost a new flow (its first packet through both base chains; the rest are conntrack hits).

Results go to docs/performance.md (network_policy section).
"""
import argparse
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.cluster import Lab  # noqa: E402
from network_policy import model as npm  # noqa: E402
from network_policy import nftables as npn  # noqa: E402
from podnet.net.netns import entered  # noqa: E402

NODES = 100
NODE = "node0"
APPS = 10
TIERS = ("web", "api", "db", "cache")
TEAMS = 10


def pod_ip(j):
    """Pod j runs on node j % NODES, in that node's 10.244.<node>.0/24 (flannel-like)."""
    return "10.244.%d.%d" % (j % NODES, j // NODES + 2)


def namespaces(n):
    return [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "ns%d" % i, "labels": {"team": "t%d" % (i % TEAMS),
                                                         "env": "prod" if i % 3 else "dev"}}}
            for i in range(n)]


def pod(j, n_ns, labels=None):
    ns = j % n_ns
    app = "app%d" % ((j // n_ns) % APPS)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "ns%d" % ns, "name": "pod%d" % j,
                         "labels": labels or {"app": app, "tier": TIERS[j % len(TIERS)], "team": "t%d" % (ns % TEAMS)}},
            "spec": {"nodeName": "node%d" % (j % NODES),
                     "containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8080},
                                                               {"name": "metrics", "containerPort": 9090}]}]},
            "status": {"phase": "Running", "podIP": pod_ip(j), "podIPs": [{"ip": pod_ip(j)}],
                       "hostIP": "192.168.0.%d" % (j % NODES + 1)}}


def policy(i, n_ns, extra_port=None):
    """Policy i of namespace i % n_ns; ten shapes in turn (extra_port: one more ingress rule)."""
    ns = i % n_ns
    shape = (i // n_ns) % 10
    app = "app%d" % (i % APPS)
    spec = {"podSelector": {"matchLabels": {"app": app}}}
    if shape in (0, 1, 2, 3):
        spec["ingress"] = [{"from": [{"podSelector": {"matchLabels": {"app": "app%d" % ((i + 1) % APPS)}}}],
                            "ports": [{"port": 8080 + shape, "protocol": "TCP"}]}]
    elif shape in (4, 5):
        spec["ingress"] = [{"from": [{"namespaceSelector": {"matchLabels": {"team": "t%d" % (i % TEAMS)}},
                                      "podSelector": {"matchExpressions": [
                                          {"key": "tier", "operator": "In", "values": ["web", "api"]}]}}],
                            "ports": [{"port": "http"}]}]
    elif shape == 6:
        spec["podSelector"] = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]}
        spec["ingress"] = [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.%d.0/24" % (i % NODES)]}}],
                            "ports": [{"port": 443}, {"port": 8000, "endPort": 8100}]}]
    elif shape == 7:
        spec["podSelector"] = {"matchLabels": {"tier": "web"}}
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["ingress"] = [{"from": [{"podSelector": {}}]}]
        spec["egress"] = [{"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}], "ports": [{"port": 5432}]},
                          {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns0"}}}],
                           "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]},
                          {"to": [{"podSelector": {}}], "ports": [{"port": "metrics"}]}]
    elif shape == 8:
        spec["podSelector"] = {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [app]},
                                                    {"key": "tier", "operator": "Exists"}]}
        spec["ingress"] = [{"ports": [{"port": "metrics"}]}]
    else:
        spec = {"podSelector": {}, "policyTypes": ["Ingress"]}
    if extra_port is not None:
        spec.setdefault("ingress", []).append({"from": [{"podSelector": {"matchLabels": {"app": "extra"}}}],
                                               "ports": [{"port": extra_port}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "ns%d" % ns, "name": "policy%d" % i}, "spec": spec}


def load_model(opts):
    model = npm.PolicyModel(NODE)
    for obj in namespaces(opts.namespaces):
        ns = npm.parse_namespace(obj)
        model.set_namespace(ns.name, ns)
    for j in range(opts.pods):
        p = npm.parse_pod(pod(j, opts.namespaces))
        model.set_pod((p.namespace, p.name), p)
    for i in range(opts.policies):
        pol = npm.parse_policy(policy(i, opts.namespaces))
        model.set_policy(pol.key, pol)
    return model


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def fmt(seconds):
    return "%.1f ms" % (seconds * 1000) if seconds < 1 else "%.2f s" % seconds


def set_pod(model, obj):
    p = npm.parse_pod(obj)
    model.set_pod((p.namespace, p.name), p)


def set_policy(model, obj):
    p = npm.parse_policy(obj)
    model.set_policy(p.key, p)


def foreign_table(chains):
    """Someone else's table of `chains` chains of one rule each (as kube-proxy's iptables-nft rules)."""
    return "table ip bench-foreign {\n%s}\n" % "".join(
        "\tchain c%d {\n\t\tip saddr 10.%d.%d.%d counter accept\n\t}\n" % (c, c >> 16, (c >> 8) & 255, c & 255)
        for c in range(chains))


def relabel_pick(opts, rng, k):
    """A pod its namespace's policies select (its app is the one they target), of this node for even
    k, of another node for odd k: relabelling it takes it out of sets, the costly direction."""
    n = opts.namespaces
    chosen = [j for j in range(opts.pods) if (j // n) % APPS == (j % n) % APPS and (j % NODES == 0) == (k % 2 == 0)]
    return rng.choice(chosen)


def relabelled(opts, j):
    obj = pod(j, opts.namespaces)
    obj["metadata"]["labels"]["app"] = "app%d" % ((int(obj["metadata"]["labels"]["app"][3:]) + 1) % APPS)
    return obj


def relabel_times(model, dp, opts, rng, rewrite):
    """Partial syncs of pod relabels (each undone), removals by rewriting sets or by `delete element`."""
    saved = npn.REWRITE_LIMIT
    npn.REWRITE_LIMIT = saved if rewrite else -1
    times = []
    try:
        for k in range(opts.samples):
            j = relabel_pick(opts, rng, k)
            set_pod(model, relabelled(opts, j))
            t, r = timed(dp.sync)
            assert not r.full
            times.append(t)
            set_pod(model, pod(j, opts.namespaces))
            dp.sync()
    finally:
        npn.REWRITE_LIMIT = saved
    return times


def policy_change_times(model, dp, opts, rng):
    times = []
    for k in range(opts.samples):
        i = rng.randrange(opts.policies)
        set_policy(model, policy(i, opts.namespaces, extra_port=7500 + k))
        t, r = timed(dp.sync)
        times.append(t)
        set_policy(model, policy(i, opts.namespaces))
        dp.sync()
    return times


def bench_sync(lab, opts, run, log):
    out = {}
    t, model = timed(lambda: load_model(opts))
    out["model"] = t
    table = npn.render_table(model)
    text = npn.full_text(table)
    out["rules"], out["chains"], out["sets"], out["elements"] = (table.rules, len(table.chains) + 2, len(table.sets),
                                                                 table.element_count)
    out["bytes"] = len(text)
    floor_ns = lab.namespace("npfloor%d" % run)
    with entered(floor_ns.path):
        t, proc = timed(lambda: subprocess.run(["nft", "-f", "-"], input=text.encode(), capture_output=True))
        assert proc.returncode == 0, proc.stderr
        out["floor"] = t
    ns = lab.namespace("npsync%d" % run)
    with entered(ns.path):
        dp = npn.NftablesDataplane(model)
        out["first"], r = timed(dp.sync)
        assert r.full and not r.quarantined, r
        out["full"], r = timed(lambda: dp.sync(full=True))
        out["restart"], r = timed(lambda: npn.NftablesDataplane(model).sync())
        dp.synced = False               # the restart wrote the table: this one reads it back once
        dp.sync()
        rng = random.Random(run)
        relabels, adds, dels, changes, new_pols, del_pols, texts = [], [], [], [], [], [], []
        for k in range(opts.samples):
            j = relabel_pick(opts, rng, k)
            set_pod(model, relabelled(opts, j))
            t, r = timed(dp.sync)
            assert not r.full
            assert " chain " not in dp.last_text, dp.last_text[:500]
            relabels.append(t)
            texts.append(len(dp.last_text))
            set_pod(model, pod(j, opts.namespaces))         # back
            dp.sync()

            extra = pod(opts.pods + k, opts.namespaces)
            extra["metadata"]["name"] = "extra%d-%d" % (run, k)
            extra["status"]["podIP"] = extra["status"]["podIPs"][0]["ip"] = "10.250.%d.%d" % (run, k + 1)
            extra["spec"]["nodeName"] = NODE
            set_pod(model, extra)
            t, r = timed(dp.sync)
            adds.append(t)
            model.set_pod((extra["metadata"]["namespace"], extra["metadata"]["name"]), None)
            t, r = timed(dp.sync)
            dels.append(t)

            i = rng.randrange(opts.policies)
            set_policy(model, policy(i, opts.namespaces, extra_port=7000 + k))
            t, r = timed(dp.sync)
            changes.append(t)
            set_policy(model, policy(i, opts.namespaces))
            dp.sync()

            new = policy(rng.randrange(opts.policies), opts.namespaces)
            new["metadata"]["name"] = "new%d-%d" % (run, k)
            set_policy(model, new)
            t, r = timed(dp.sync)
            new_pols.append(t)
            model.set_policy((new["metadata"]["namespace"], new["metadata"]["name"]), None)
            t, r = timed(dp.sync)
            del_pols.append(t)
        med = statistics.median
        out.update(relabel=med(relabels), relabel_max=max(relabels), relabel_bytes=med(texts), pod_add=med(adds),
                   pod_del=med(dels), policy_change=med(changes), policy_change_max=max(changes),
                   policy_add=med(new_pols), policy_del=med(del_pols))
        # pod relabels again, with `delete element` instead of rewriting the sets that lose a member,
        # then both beside another component's big table (kube-proxy's rules on a real node)
        out["relabel_delete"] = med(relabel_times(model, dp, opts, rng, rewrite=False))
        if opts.foreign_chains:
            t, proc = timed(lambda: subprocess.run(["nft", "-f", "-"], input=foreign_table(opts.foreign_chains).encode(),
                                                   capture_output=True))
            assert proc.returncode == 0, proc.stderr
            out["foreign_rewrite"] = med(relabel_times(model, dp, opts, rng, rewrite=True))
            out["foreign_delete"] = med(relabel_times(model, dp, opts, rng, rewrite=False))
            out["foreign_policy"] = med(policy_change_times(model, dp, opts, rng))
    log("  run %d: model %s, floor %s, first %s, full %s, restart %s, pod relabel %s, policy change %s"
        % (run + 1, fmt(out["model"]), fmt(out["floor"]), fmt(out["first"]), fmt(out["full"]), fmt(out["restart"]),
           fmt(out["relabel"]), fmt(out["policy_change"])))
    return out


# ---- the first packet ------------------------------------------------------------------------------

def first_packet_pods(model, opts):
    """Two pods of this node in ns1: a client (tier web: isolated for egress by the shape-7
    policy, which lets it reach any pod's metrics port) and a server (tier db: isolated for
    ingress by the default deny, let in on its metrics port by the shape-8 policy)."""
    made = []
    for name, labels, ip in (("client", {"app": "app5", "tier": "web"}, "10.251.0.1"),
                             ("server", {"app": "app6", "tier": "db"}, "10.251.0.2")):
        obj = pod(0, opts.namespaces, labels)
        obj["metadata"].update(namespace="ns1", name="fp-" + name)
        obj["spec"]["nodeName"] = NODE
        obj["status"]["podIP"] = obj["status"]["podIPs"][0]["ip"] = ip
        set_pod(model, obj)
        made.append(model.pod("ns1", "fp-" + name))
    client, server = made
    v = model.verdict(client.ips[0], server.ips[0], "TCP", 9090)
    assert v.allowed and v.egress_by and v.ingress_by, v
    return client, server, 9090


def veth_pod(lab, node, name, ip, index):
    ns = lab.namespace(name)
    host = "veth%d" % index
    node.ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    node.ip("addr", "add", "169.254.1.1/32", "dev", host)
    node.ip("link", "set", host, "up")
    node.ip("route", "add", ip + "/32", "dev", host)
    ns.ip("addr", "add", ip + "/32", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("route", "add", "169.254.1.1", "dev", "eth0")
    ns.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    return ns


def connections(client_ns, server_ns, client_ip, server_ip, port, count):
    """Seconds for `count` TCP connections (connect, accept, reset), one process, no threads."""
    with entered(server_ns.path):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((server_ip, port))
        listener.listen(128)
    linger = struct.pack("ii", 1, 0)
    try:
        with entered(client_ns.path):
            start = time.perf_counter()
            for _ in range(count):
                c = socket.socket()
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                c.bind((client_ip, 0))
                c.connect((server_ip, port))
                s, _ = listener.accept()
                c.close()
                s.close()
            return time.perf_counter() - start
    finally:
        listener.close()


def bench_first_packet(lab, opts, log):
    model = load_model(opts)
    client, server, port = first_packet_pods(model, opts)
    node = lab.namespace("npnode", ip_forward=True)
    cns = veth_pod(lab, node, "npclient", client.ips[0], 1)
    sns = veth_pod(lab, node, "npserver", server.ips[0], 2)
    with entered(node.path):
        dp = npn.NftablesDataplane(model)
        dp.sync()
        rules = npn.render_table(model).rules
    with_table, without = [], []
    connections(cns, sns, client.ips[0], server.ips[0], port, 200)       # warm up
    for _ in range(opts.rounds):
        with entered(node.path):
            dp.sync(full=True)
        with_table.append(connections(cns, sns, client.ips[0], server.ips[0], port, opts.connections))
        with entered(node.path):
            dp.cleanup()
        without.append(connections(cns, sns, client.ips[0], server.ips[0], port, opts.connections))
    per = [w / opts.connections for w in with_table]
    per0 = [w / opts.connections for w in without]
    out = {"pair": "%s -> %s:%d" % (client, server, port), "rules": rules,
           "with": statistics.median(per), "without": statistics.median(per0),
           "with_min": min(per), "without_min": min(per0),
           "diff": statistics.median(a - b for a, b in zip(per, per0)),
           "policies_in_ns": len(model.policies_in(server.namespace))}
    log("  first packet: %s, with %.1f us, without %.1f us per connection (medians of %d rounds)"
        % (out["pair"], out["with"] * 1e6, out["without"] * 1e6, opts.rounds))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", type=int, default=1000)
    p.add_argument("--pods", type=int, default=10000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--samples", type=int, default=5, help="changes of each kind timed per run")
    p.add_argument("--connections", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=10, help="with/without alternations for the first packet")
    p.add_argument("--foreign-chains", type=int, default=30000,
                   help="chains of another table loaded beside ours for the last figures (0: skip)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 100 policies, 1,000 pods, one run")
    opts = p.parse_args()
    if opts.quick:
        opts.policies, opts.pods, opts.namespaces, opts.runs = 100, 1000, 10, 1
        opts.samples, opts.connections, opts.rounds, opts.foreign_chains = 2, 300, 2, 3000
    if os.geteuid() != 0:
        sys.exit("needs root (it makes network namespaces)")

    def log(text):
        print(text, file=sys.stderr, flush=True)

    log("%d policies over %d pods in %d namespaces (%d nodes, this one %s)"
        % (opts.policies, opts.pods, opts.namespaces, NODES, NODE))
    runs = []
    with Lab(prefix="npbench") as lab:
        for run in range(opts.runs):
            runs.append(bench_sync(lab, opts, run, log))
        first = bench_first_packet(lab, opts, log)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("| policies / pods / namespaces | chains / rules / sets / elements (text) | model load | floor: one `nft -f` "
          "| first sync | full sync | full / floor | restart sync |")
    print("|---|---|---|---|---|---|---|---|")
    print("| %d / %d / %d | %d / %d / %d / %d (%.1f MB) | %s | %s | %s | %s | %.2fx | %s |" % (
        opts.policies, opts.pods, opts.namespaces, med["chains"], med["rules"], med["sets"], med["elements"],
        med["bytes"] / 1e6, fmt(med["model"]), fmt(med["floor"]), fmt(med["first"]), fmt(med["full"]),
        med["full"] / med["floor"], fmt(med["restart"])))
    print()
    print("| pod relabel (median / max) | same with `delete element` | pod added | pod deleted "
          "| policy changed (median / max) | policy added | policy deleted |")
    print("|---|---|---|---|---|---|---|")
    print("| %s / %s | %s | %s | %s | %s / %s | %s | %s |" % (
        fmt(med["relabel"]), fmt(max(r["relabel_max"] for r in runs)), fmt(med["relabel_delete"]),
        fmt(med["pod_add"]), fmt(med["pod_del"]), fmt(med["policy_change"]),
        fmt(max(r["policy_change_max"] for r in runs)), fmt(med["policy_add"]), fmt(med["policy_del"])))
    print()
    print("| first packet: %s (%d policies in its namespace, %d rules in the table) | per connection |"
          % (first["pair"], first["policies_in_ns"], first["rules"]))
    print("|---|---|")
    print("| without our table (median / best round) | %.1f / %.1f us |" % (first["without"] * 1e6, first["without_min"] * 1e6))
    print("| with %d policies (median / best round) | %.1f / %.1f us |" % (opts.policies, first["with"] * 1e6,
                                                                        first["with_min"] * 1e6))
    print("| difference (median of the rounds' differences) | %.1f us |" % (first["diff"] * 1e6))
    if opts.foreign_chains:
        print()
        print("| beside another table of %d chains | pod relabel, sets rewritten | pod relabel, `delete element` "
              "| policy changed |" % opts.foreign_chains)
        print("|---|---|---|---|")
        print("| median | %s | %s | %s |" % (fmt(med["foreign_rewrite"]), fmt(med["foreign_delete"]),
                                         fmt(med["foreign_policy"])))


if __name__ == "__main__":
    main()
