"""kube_proxy on a real (netns) cluster, end to end, in every proxy mode this kernel runs (issue 5).

Two flannel (vxlan) nodes, two pods on each running lab.echo (HTTP on
8080 and UDP on 8081, answering with the pod's name and the client address
they saw), an "outside" client namespace on the underlay, and
`podnet kube-proxy --manifests DIR` on every node reading the same directory
of Service and EndpointSlice manifests (the stand-in for an API server:
none can run here). Every request is a real TCP connection or UDP datagram
through the node's netfilter; nothing is mocked.
"""
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from lab import manifests as k8s
from lab.cluster import Cluster, Lab

from helpers import wait_until

HTTP = {"name": "http", "port": 80, "targetPort": "web"}        # a named target port
HTTP_EP = {"name": "http", "port": 8080}
UDP = {"name": "dns", "port": 53, "targetPort": 8081, "protocol": "UDP"}
UDP_EP = {"name": "dns", "port": 8081, "protocol": "UDP"}
EXTERNAL_IP, LB_IP = "172.30.0.10", "172.30.0.20"
CLIENT_IP = "192.168.50.100"
TIMEOUT = 20


class Env:
    def __init__(self, lab, cluster):
        self.lab, self.cluster = lab, cluster
        self.manifests = os.path.join(lab.workdir, "manifests")
        self.node1, self.node2 = cluster.nodes
        self.pods = {}
        self.client = None

    def pod(self, name):
        return self.pods[name]

    def endpoints(self, *names):
        return [(self.pods[n].ip, self.pods[n].node.role) for n in names]

    def syncs(self, node):
        with open(self.cluster.kube_proxy_log(node)) as f:
            return len(re.findall(r" sync \(", f.read()))

    def log(self, node):
        with open(self.cluster.kube_proxy_log(node)) as f:
            return f.read()

    def write(self, filename, *objects):
        """Change the manifests and wait until every node's proxy has synced after it."""
        before = {n.role: self.syncs(n) for n in self.cluster.nodes}
        k8s.write(self.manifests, filename, *objects)
        wait_until(lambda: all(self.syncs(n) > before[n.role] for n in self.cluster.nodes), TIMEOUT,
                   "kube-proxy to sync %s" % filename)

    def get(self, ns, url, count=1, timeout=2.0):
        return self.cluster.echo(ns, "get", url, "--count", count, "--timeout", timeout)


ALL = ("node1-a", "node1-b", "node2-a", "node2-b")


def services(env):
    """The Services under test and their EndpointSlices."""
    eps = env.endpoints(*ALL)
    return {
        "web.json": [k8s.service("web", "10.96.0.10", [dict(HTTP, nodePort=30080), dict(UDP, nodePort=30053)],
                                 type="NodePort", external_ips=[EXTERNAL_IP]),
                     k8s.endpoint_slice("web", eps, [HTTP_EP, UDP_EP])],
        "web-local.json": [k8s.service("web-local", "10.96.0.11", [dict(HTTP, nodePort=30081)],
                                       type="LoadBalancer", load_balancer_ips=[LB_IP],
                                       external_traffic_policy="Local", health_check_node_port=30200),
                           k8s.endpoint_slice("web-local", eps, [HTTP_EP])],
        "sticky.json": [k8s.service("sticky", "10.96.0.12", [HTTP], session_affinity_timeout=60),
                        k8s.endpoint_slice("sticky", eps, [HTTP_EP])],
        "empty.json": [k8s.service("empty", "10.96.0.13", [HTTP])],
        "self.json": [k8s.service("self", "10.96.0.14", [HTTP]),
                      k8s.endpoint_slice("self", env.endpoints("node1-a"), [HTTP_EP])],
        "near.json": [k8s.service("near", "10.96.0.15", [HTTP], internal_traffic_policy="Local"),
                      k8s.endpoint_slice("near", eps, [HTTP_EP])],
        "dns.json": [k8s.service("dns", "10.96.0.16", [UDP]),
                     k8s.endpoint_slice("dns", env.endpoints("node1-b", "node2-b"), [UDP_EP])],
        "ignored.json": [k8s.service("headless", "None", [HTTP]),
                         k8s.endpoint_slice("headless", eps, [HTTP_EP]),
                         dict(k8s.service("external-name", "", [HTTP]),
                              spec={"type": "ExternalName", "externalName": "example.org"})],
        # bad objects: each is logged and skipped; nothing else may suffer
        "bad.json": [k8s.service("bad-port", "10.96.0.20", [{"port": 70000, "targetPort": 8080}]),
                     k8s.service("bad-ip", "10.96.0.999", [HTTP]),
                     {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "no-spec"}},
                     k8s.endpoint_slice("web", [("10.244.999.1", "node1")], [HTTP_EP], name="web-bad")],
    }


# The same Service tests for every proxy mode this kernel can run.
MODES = ["iptables", "nftables"]


@pytest.fixture(scope="module", params=MODES)
def env(request, netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        cluster = Cluster(lab, nodes=2).start()
        e = Env(lab, cluster)
        e.mode = request.param
        for node in cluster.nodes:
            for suffix in ("a", "b"):
                pod = cluster.add_pod(node, "%s-%s" % (node.role, suffix))
                cluster.start_echo(pod)
                e.pods[pod.name] = pod
        e.client = lab.namespace("outside")
        cluster.underlay.attach(e.client, CLIENT_IP)
        # the outside world routes the external IP to node1 and the LB IP to node2
        e.client.ip("route", "add", EXTERNAL_IP, "via", e.node1.underlay_ip)
        e.client.ip("route", "add", LB_IP, "via", e.node2.underlay_ip)
        for filename, objects in services(e).items():
            k8s.write(e.manifests, filename, *objects)
        for node in cluster.nodes:
            cluster.start_kube_proxy(node, e.manifests, ["--proxy-mode", e.mode])
        wait_until(lambda: all(e.syncs(n) for n in cluster.nodes), TIMEOUT, "the first sync on every node")
        for pod in e.pods.values():     # every echo server answers
            wait_until(lambda pod=pod: e.get(e.node1, "%s:8080" % pod.ip)["answers"], TIMEOUT,
                       "%s to serve" % pod.name)
        yield e
        for node in cluster.nodes:
            if node.role in cluster.kube_proxy:
                cluster.stop_kube_proxy(node)


def test_cluster_ip_spreads_evenly_from_pods_on_both_nodes(env):
    for client in ("node1-a", "node2-a"):
        out = env.get(env.pod(client).ns, "10.96.0.10:80", count=300)
        assert out["errors"] == {}, out
        assert set(out["answers"]) == set(ALL), out
        # 75 expected per endpoint; a binomial(300, 1/4) is below 45 with p < 1e-5
        assert min(out["answers"].values()) >= 45, out
        # pod to Service inside the cluster CIDR: the source pod address is kept, except
        # when the pod reached itself (hairpin: masqueraded, or the reply would bypass NAT)
        assert out["sources"].get(env.pod(client).ip) == 300 - out["answers"][client], out


def test_nodeport_from_outside_on_both_nodes(env):
    for node in (env.node1, env.node2):
        out = env.get(env.client, "%s:30080" % node.underlay_ip, count=60)
        assert out["errors"] == {}, out
        assert set(out["answers"]) == set(ALL), out
        # Cluster policy: the client is masqueraded (to the node's address), never seen by the pod
        assert CLIENT_IP not in out["sources"], out


def test_external_ip_answers(env):
    out = env.get(env.client, "%s:80" % EXTERNAL_IP, count=40)
    assert out["errors"] == {} and set(out["answers"]) == set(ALL), out


@pytest.mark.parametrize("role", ["node1", "node2"])
def test_external_traffic_policy_local_keeps_source_and_stays_local(env, role):
    node = env.node1 if role == "node1" else env.node2
    out = env.get(env.client, "%s:30081" % node.underlay_ip, count=40)
    assert out["errors"] == {}, out
    assert set(out["answers"]) == {"%s-a" % role, "%s-b" % role}, out
    assert set(out["sources"]) == {CLIENT_IP}, out


def test_load_balancer_ip_with_local_policy(env):
    out = env.get(env.client, "%s:80" % LB_IP, count=40)      # routed to node2
    assert out["errors"] == {}, out
    assert set(out["answers"]) == {"node2-a", "node2-b"}, out
    assert set(out["sources"]) == {CLIENT_IP}, out


def test_internal_traffic_policy_local(env):
    for role in ("node1", "node2"):
        out = env.get(env.pod("%s-a" % role).ns, "10.96.0.15:80", count=30)
        assert out["errors"] == {} and set(out["answers"]) == {"%s-a" % role, "%s-b" % role}, out


def test_client_ip_affinity_sends_one_client_to_one_endpoint(env):
    for client in ("node1-b", "node2-a"):
        out = env.get(env.pod(client).ns, "10.96.0.12:80", count=30)
        assert out["errors"] == {} and len(out["answers"]) == 1, out


def test_service_without_endpoints_is_refused_at_once(env):
    out = env.get(env.pod("node2-b").ns, "10.96.0.13:80", count=3)
    assert out["answers"] == {} and out["errors"] == {"Connection refused": 3}, out
    assert out["seconds"] < 1.0, out
    out = env.get(env.client, "%s:80" % EXTERNAL_IP, count=1)     # unrelated Services still answer
    assert out["errors"] == {}, out


def test_pod_reaches_itself_through_its_service(env):
    out = env.get(env.pod("node1-a").ns, "10.96.0.14:80", count=10)
    assert out["errors"] == {} and out["answers"] == {"node1-a": 10}, out


def rules_text(env, node):
    """What the proxy mode programmed in the node's kernel, as text: nft's listing of our
    table in nftables mode, iptables-save's nat table otherwise."""
    if env.mode == "nftables":
        return node.run(["nft", "list", "table", "ip", "kube-proxy"]).stdout
    return node.run(["iptables-save", "-t", "nat"]).stdout


def test_headless_and_external_name_services_are_ignored(env):
    saved = rules_text(env, env.node1)
    assert "default/web" in saved       # named in chain names (nft) or comments (iptables)
    assert "default/headless" not in saved and "default/external-name" not in saved


def test_nftables_mode_has_one_table_and_no_iptables_chains(env):
    if env.mode != "nftables":
        pytest.skip("nftables mode only")
    for node in env.cluster.nodes:
        ruleset = node.run(["nft", "list", "ruleset"]).stdout
        tables = re.findall(r"^table (\S+ \S+) \{", ruleset, re.M)
        assert tables.count("ip kube-proxy") == 1 and "ip6 kube-proxy" not in tables, tables
        assert not re.search(r"\bKUBE-", ruleset), ruleset[:3000]     # no iptables-mode leftovers
        ours = ruleset[ruleset.index("table ip kube-proxy {"):]
        assert "chain nat-prerouting" in ours and "vmap @service-ips" in ours, ours[:3000]


def test_bad_objects_are_logged_and_skipped(env):
    for node in env.cluster.nodes:
        log = env.log(node)
        for name in ("bad-port", "bad-ip", "no-spec"):
            assert re.search(r"skipping Service default/%s: .+" % name, log), (name, log[-3000:])
        assert "EndpointSlice default/web-bad: skipping endpoint" in log, log[-3000:]
    out = env.get(env.pod("node1-b").ns, "10.96.0.10:80", count=60)    # the good ones still work (a backend missed by all 60: p ~ 1e-7)
    assert out["errors"] == {} and set(out["answers"]) == set(ALL), out


def test_metrics_and_healthz(env):
    metrics = env.node1.run(["curl", "-sf", "http://127.0.0.1:10249/metrics"]).stdout
    count = re.search(r"^kubeproxy_sync_proxy_rules_duration_seconds_count (\d+)\.0$", metrics, re.M)
    assert count and int(count.group(1)) >= 1, metrics
    if env.mode == "nftables":
        assert re.search(r'^podnet_sync_proxy_rules_total\{table="kube-proxy"\} [1-9]\d*\.0$', metrics, re.M), metrics
    else:
        assert re.search(r'^kubeproxy_sync_proxy_rules_iptables_total\{table="nat"\} [1-9]\d*\.0$', metrics, re.M)
    last = re.search(r"^kubeproxy_sync_proxy_rules_last_timestamp_seconds (\S+)$", metrics, re.M)
    assert last and abs(float(last.group(1)) - time.time()) < 3600
    health = env.node2.run(["curl", "-s", "-w", " %{http_code}", "http://127.0.0.1:10256/healthz"]).stdout
    body, code = health.rsplit(" ", 1)
    assert code == "200" and "lastUpdated" in json.loads(body), health


def test_removed_udp_endpoint_gets_no_more_datagrams(env):
    """A UDP flow pinned (by conntrack) to an endpoint moves once that endpoint is removed."""
    flow = env.pod("node1-a").ns.popen(
        [env.cluster.python, "-m", "lab.echo", "udp", "10.96.0.16", "53", "--count", "60", "--interval", "0.05"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    first = [flow.stdout.readline().strip() for _ in range(5)]
    assert len(set(first)) == 1 and first[0] in ("node1-b", "node2-b"), first
    pinned = first[0]
    other = "node2-b" if pinned == "node1-b" else "node1-b"
    env.write("dns.json", k8s.service("dns", "10.96.0.16", [UDP]),
              k8s.endpoint_slice("dns", env.endpoints(other), [UDP_EP]))
    rest = [line.strip() for line in flow.stdout]
    flow.wait(10)
    env.pod("node1-a").ns.processes.remove(flow)
    # the pinned pod still runs and would answer: only the conntrack flush moves the flow
    assert rest[-10:] == [other] * 10, rest
    assert "UDP flows cleared" in env.log(env.node1)


def test_removed_endpoint_gets_no_more_traffic_after_the_sync(env):
    remaining = ("node1-a", "node1-b", "node2-a")
    env.write("web.json", *services(env)["web.json"][:1],
              k8s.endpoint_slice("web", env.endpoints(*remaining), [HTTP_EP, UDP_EP]))
    for client in (env.pod("node1-a").ns, env.pod("node2-a").ns, env.client):
        url = "10.96.0.10:80" if client is not env.client else "%s:30080" % env.node2.underlay_ip
        out = env.get(client, url, count=60)
        assert out["errors"] == {} and set(out["answers"]) == set(remaining), out


def _nft_rules(node):
    return nft_lines(node.run(["nft", "list", "table", "ip", "kube-proxy"]).stdout)


def nft_lines(listing):
    """An nft table listing, order aside: one line per rule, chain and set header, and one
    per set element (elements of the dynamic affinity sets, which expire, left out)."""
    lines, where, dynamic, elements = [], None, False, None
    for line in (raw.strip() for raw in listing.splitlines()):
        if elements is not None:                # an element list continues over lines
            elements += " " + line
        elif line.startswith(("chain ", "set ", "map ")):
            where, dynamic = line, False
            lines.append(line)
        elif line.startswith("flags") and "dynamic" in line:
            dynamic = True
        elif line.startswith("elements = {"):
            elements = line[len("elements = {"):]
        elif line and line != "}":
            lines.append("%s %s" % (where, line))
        if elements is not None and elements.endswith("}"):
            if not dynamic:
                lines += ["%s %s" % (where, e.strip()) for e in elements[:-1].split(",")]
            elements = None
    return sorted(lines)


def _rules(node, mode="iptables"):
    """Our rules in the node's kernel, counters and order aside."""
    if mode == "nftables":
        return _nft_rules(node)
    lines = []
    for table in ("nat", "filter"):
        saved = node.run(["iptables-save", "-t", table]).stdout
        lines += sorted("%s %s" % (table, line) for line in saved.splitlines()
                        if line.startswith(("-A", ":")) and "KUBE" in line)
    return [re.sub(r"\[\d+:\d+\]", "", line) for line in lines]


def test_restart_keeps_running_streams_and_rules(env):
    """SIGTERM kube-proxy on both nodes during a NodePort stream and start it again: the
    stream never stalls, and the rules after the restart are those before."""
    node = env.node1
    stream = env.client.popen(["curl", "-sN", "http://%s:30080/stream" % node.underlay_ip],
                              stdout=subprocess.PIPE, text=True)
    stamps = []

    def reader():
        for _ in stream.stdout:
            stamps.append(time.monotonic())
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    wait_until(lambda: len(stamps) > 20, TIMEOUT, "the stream to flow")
    before = {n.role: _rules(n, env.mode) for n in env.cluster.nodes}
    restarted = time.monotonic()
    for n in env.cluster.nodes:
        env.cluster.stop_kube_proxy(n)
    syncs = {n.role: env.syncs(n) for n in env.cluster.nodes}
    logged = {n.role: len(env.log(n)) for n in env.cluster.nodes}
    for n in env.cluster.nodes:
        env.cluster.start_kube_proxy(n, env.manifests, ["--proxy-mode", env.mode])
    wait_until(lambda: all(env.syncs(n) > syncs[n.role] for n in env.cluster.nodes), TIMEOUT,
               "the first sync after the restart")
    time.sleep(1.0)
    during = [t for t in stamps if t >= restarted]
    gaps = [b - a for a, b in zip(during, during[1:])]
    os.killpg(stream.pid, signal.SIGTERM)
    stream.wait(5)
    env.client.processes.remove(stream)
    assert stream.returncode in (-signal.SIGTERM, 0, 143), "the stream ended before we stopped it"
    assert len(during) > 50 and max(gaps) < 0.5, (len(during), max(gaps or [0]))
    after = {n.role: _rules(n, env.mode) for n in env.cluster.nodes}
    assert after == before
    # the new process read the rules back and found every chain as it would write it
    # (rendered text is iptables-save's canonical form): it rewrote nothing
    # (nftables mode rewrites its table in one transaction instead: reading it back costs
    # more than writing it)
    written = r"full sync .*, 0 chains written" if env.mode == "iptables" else r"full sync .*, \d+ chains written"
    for n in env.cluster.nodes:
        assert re.search(written, env.log(n)[logged[n.role]:]), env.log(n)[logged[n.role]:]
    out = env.get(env.client, "%s:30080" % node.underlay_ip, count=10)
    assert out["errors"] == {}, out


def _others(node):
    """What other agents have in the node's netfilter: iptables rules not naming KUBE-
    chains (counters aside), and the nftables tables other than ours."""
    saved = node.run(["iptables-save"]).stdout
    rules = sorted(re.sub(r"\[\d+:\d+\]", "", line) for line in saved.splitlines()
                   if line.startswith(("-A", ":")) and "KUBE-" not in line)
    tables = sorted(t for t in node.run(["nft", "list", "tables"]).stdout.splitlines() if "kube-proxy" not in t)
    return rules, tables


def test_cleanup_removes_everything_of_ours_and_nothing_else(env):
    """The mode's cleanup (what `podnet kube-proxy --cleanup` runs) on node2, its proxy stopped.
    Last in this module: node2 proxies nothing afterwards."""
    node = env.node2
    env.cluster.stop_kube_proxy(node)
    before = _others(node)
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    node.run([env.cluster.python, "-c", "from kube_proxy.proxier import Config; "
              "from kube_proxy.server import make_proxier; "
              "make_proxier(%r, Config()).cleanup()" % env.mode], env=dict(os.environ, PYTHONPATH=source))
    assert "KUBE-" not in node.run(["iptables-save"]).stdout
    assert "kube-proxy" not in node.run(["nft", "list", "tables"]).stdout
    assert _others(node) == before


def _random_objects(rng, drawn):
    """Services of every kind and their slices, drawn at random: each of 8 Services keeps its
    previous draw (in `drawn`) or, one time in four, is drawn anew (or removed)."""
    for i in range(8):
        if i in drawn and rng.random() < 0.75:
            continue
        drawn[i] = []
        if rng.random() < 0.15:
            continue                                    # this Service is gone (or not yet there)
        objects = drawn[i]
        kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
        ports = [dict(HTTP, targetPort=8080)] + ([dict(UDP)] if i % 3 == 0 else [])
        if kind != "ClusterIP":
            ports = [dict(p, nodePort=30000 + 10 * i + k) for k, p in enumerate(ports)]
        lb = kind == "LoadBalancer"
        objects.append(k8s.service(
            "s%d" % i, "10.96.1.%d" % (i + 1), ports, type=kind,
            external_ips=["172.30.1.%d" % i] if rng.random() < 0.3 else [],
            load_balancer_ips=["172.30.2.%d" % i] if lb else [],
            source_ranges=rng.choice([[], ["203.0.113.0/24", "192.168.50.0/24"]]) if lb else [],
            external_traffic_policy=rng.choice([None, "Local"]) if kind != "ClusterIP" else None,
            internal_traffic_policy=rng.choice([None, None, "Local"]),
            session_affinity_timeout=rng.choice([0, 0, 60, 3600])))
        eps = []
        for _ in range(rng.randint(0, 4)):
            cond = rng.choice([{}, {}, {}, {"ready": False, "serving": True, "terminating": True},
                               {"ready": False, "serving": False}])
            eps.append(("10.244.%d.%d" % (rng.randint(1, 2), rng.randint(2, 9)), rng.choice(["node1", "node2"]),
                        cond))
        objects.append(k8s.endpoint_slice("s%d" % i, eps, [HTTP_EP, UDP_EP]))
    return [obj for i in sorted(drawn) for obj in drawn[i]]


def test_nftables_partial_syncs_leave_the_table_a_full_sync_writes(lab):
    """In a real kernel: 25 random rounds of changes, each applied as a partial sync, leave the table
    exactly as a fresh proxier's full sync of the same state writes it."""
    import random

    from kube_proxy import nftables as nk
    from kube_proxy.proxier import Config
    from kube_proxy.tracker import ChangeTracker
    from podnet.net.netns import entered

    rng = random.Random(5)
    config = Config(cluster_cidr=("10.244.0.0/16",), node_ip="192.168.50.2")
    partial_ns, full_ns = lab.namespace("nftpartial"), lab.namespace("nftfull")
    tracker = ChangeTracker(hostname="node1", min_sync_period=0)
    tracker.replace("Service", [])
    tracker.replace("EndpointSlice", [])
    proxier = nk.NftablesProxier(config)
    partials, drawn = 0, {}
    for step in range(25):
        objects = _random_objects(rng, drawn)
        tracker.replace("Service", [o for o in objects if o["kind"] == "Service"])
        tracker.replace("EndpointSlice", [o for o in objects if o["kind"] == "EndpointSlice"])
        sync = tracker.take()
        with entered(partial_ns.path):
            partials += not proxier.sync(sync).full
            got = nft_lines(partial_ns.run(["nft", "list", "table", "ip", "kube-proxy"]).stdout)
        with entered(full_ns.path):
            nk.NftablesProxier(config).sync(sync)
            want = nft_lines(full_ns.run(["nft", "list", "table", "ip", "kube-proxy"]).stdout)
            full_ns.run(["nft", "delete", "table", "ip", "kube-proxy"])
        assert got == want, (step, sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    assert partials == 24
