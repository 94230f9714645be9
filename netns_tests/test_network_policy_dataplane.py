"""The NetworkPolicy dataplane (network_policy/nftables.py) in a real kernel: real TCP and
UDP between pod namespaces routed through a node namespace that holds our table, judged
against the model's reference evaluator (verdict); incremental updates (a pod relabel
writes no chain), a restarted dataplane taking the table over with no wrong packet,
cleanup that leaves the ruleset as it was, another table left untouched, a refused policy
quarantined, and same-node pods on a bridge (br_netfilter).

Topology (one Lab per module, every object in namespaces it made): node1 forwards between
veths to the pods' namespaces (/32 and /128 routes, the node side answering 169.254.1.1 and
fd00:ffff::1); every pod listens on TCP 80, 81 and UDP 53 (dual stack). Probes run in
parallel with a short deadline: a dropped SYN or datagram shows as "no answer".
"""
import os
import select
import socket
import struct
import threading
import time

import pytest

from lab.cluster import Lab
from network_policy import model as m
from network_policy import nftables as nt
from podnet.net.netns import entered

from helpers import wait_until

TCP_PORTS = (80, 81)
UDP_PORT = 53
DEADLINE = 0.6
NODE = "node1"
NODE_IP = "169.254.1.1"


class PodNet:
    """A pod's namespace with its addresses and listeners."""

    def __init__(self, lab, node, ns, name, index, host):
        self.namespace, self.name, self.host = ns, name, host
        self.ip4, self.ip6 = "10.0.%d.%d" % (index // 10, index % 10 + 1), "fd00::%d" % (index + 1)
        self.netns = lab.namespace("%s-%s" % (ns, name))
        self.netns.sysctl("net.ipv6.conf.default.accept_dad", 0)      # eth0 arrives with addresses usable at once
        hostif = "veth%d" % index
        node.ip("link", "add", hostif, "type", "veth", "peer", "name", "eth0", "netns", self.netns.name)
        node.ip("addr", "add", NODE_IP + "/32", "dev", hostif)
        node.ip("-6", "addr", "add", "fd00:ffff::1/128", "dev", hostif, "nodad")
        node.ip("link", "set", hostif, "up")
        node.ip("route", "add", self.ip4 + "/32", "dev", hostif)
        node.ip("-6", "route", "add", self.ip6 + "/128", "dev", hostif)
        p = self.netns
        p.ip("addr", "add", self.ip4 + "/32", "dev", "eth0")
        p.ip("-6", "addr", "add", self.ip6 + "/128", "dev", "eth0", "nodad")
        p.ip("link", "set", "eth0", "up")
        p.ip("route", "add", NODE_IP, "dev", "eth0")
        p.ip("route", "add", "default", "via", NODE_IP, "dev", "eth0")
        p.ip("-6", "route", "add", "fd00:ffff::1", "dev", "eth0")
        p.ip("-6", "route", "add", "default", "via", "fd00:ffff::1", "dev", "eth0")
        self.listeners = []
        with entered(p.path):
            for port in TCP_PORTS:
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::", port))
                s.listen(256)
                s.setblocking(False)
                self.listeners.append(s)
            self.udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.udp.bind(("::", UDP_PORT))
            self.udp.setblocking(False)

    def obj(self, labels, node=None):
        return {"metadata": {"namespace": self.namespace, "name": self.name, "labels": labels},
                "spec": {"nodeName": node or self.host,
                         "containers": [{"name": "c", "ports": [{"name": "serve-80", "containerPort": 80},
                                                                {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
                "status": {"phase": "Running", "podIPs": [{"ip": self.ip4}, {"ip": self.ip6}], "hostIP": "192.168.0.1"}}

    def drain(self):
        for s in self.listeners:
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()

    def close(self):
        for s in self.listeners + [self.udp]:
            s.close()


PODS = (("x", "a", NODE), ("x", "b", NODE), ("y", "a", NODE), ("y", "b", NODE), ("z", "a", "node2"))


@pytest.fixture(scope="module")
def net():
    if os.geteuid() != 0:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        node = lab.namespace("node1", ip_forward=True)
        node.sysctl("net.ipv6.conf.all.forwarding", 1)
        node.sysctl("net.ipv6.conf.default.accept_dad", 0)
        pods = {}
        for i, (ns, name, host) in enumerate(PODS):
            pods[(ns, name)] = PodNet(lab, node, ns, name, i, host)
        # every path answers (IPv6 neighbours resolved) before a test counts silence as a drop
        ring = list(pods.values())
        warm = [(a, b.ip6 if family == 6 else b.ip4, "UDP", UDP_PORT)
                for a, b in zip(ring, ring[1:] + ring[:1]) for family in (4, 6)]
        wait_until(lambda: all(probe(pods, warm, deadline=0.3)), 10, "IPv4 and IPv6 between the pods")
        yield lab, node, pods
        for p in pods.values():
            p.close()


@pytest.fixture
def cluster(net):
    """A model of the module's pods (labels pod=<name>, namespaces ns=<name>) and a dataplane in
    node1; our table is removed afterwards however the test ends."""
    lab, node, pods = net
    model = m.PolicyModel(NODE)
    for ns in "xyz":
        model.set_namespace(ns, m.parse_namespace({"metadata": {"name": ns, "labels": {"ns": ns}}}))
    for key, p in pods.items():
        model.set_pod(key, m.parse_pod(p.obj({"pod": key[1]})))
    dp = Dataplane(node, model)
    yield model, dp, pods, node
    dp.cleanup()
    assert "podnet-network-policy" not in node.run(["nft", "list", "tables"]).stdout


class Dataplane:
    """NftablesDataplane run inside the node's namespace."""

    def __init__(self, node, model):
        self.node = node
        self.dp = nt.NftablesDataplane(model)

    def __getattr__(self, name):
        attr = getattr(self.dp, name)
        if not callable(attr):
            return attr

        def call(*args, **kw):
            with entered(self.node.path):
                return attr(*args, **kw)
        return call


def policy(model, ns, name, spec):
    p = m.parse_policy({"metadata": {"namespace": ns, "name": name}, "spec": spec})
    model.set_policy(p.key, p)
    return p


LINGER0 = struct.pack("ii", 1, 0)


def probe(pods, probes, deadline=DEADLINE):
    """[(client PodNet, destination address, "TCP"|"UDP", port)] -> [answered?], all at once."""
    pending = {}
    results = [False] * len(probes)
    udp_tokens = {}
    for i, (client, dst, proto, port) in enumerate(probes):
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        src = client.ip6 if family == socket.AF_INET6 else client.ip4
        with entered(client.netns.path):
            s = socket.socket(family, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((src, 0))
        if proto == "TCP":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
            s.connect_ex((dst, port))
            pending[s.fileno()] = (i, s)
        else:
            token = b"probe-%d-%d" % (i, time.monotonic_ns())
            udp_tokens[token] = i
            s.sendto(token, (dst, port))
            pending[s.fileno()] = (i, s)
    poller = select.poll()
    for fd, (_, s) in pending.items():
        if s.type == socket.SOCK_STREAM:
            poller.register(fd, select.POLLOUT)
    servers = {p.udp.fileno(): p.udp for p in pods.values()}
    for fd in servers:
        poller.register(fd, select.POLLIN)
    end = time.monotonic() + deadline
    waiting_tcp = sum(1 for _, s in pending.values() if s.type == socket.SOCK_STREAM)
    while time.monotonic() < end and (waiting_tcp or len(udp_tokens) > sum(results[i] for i in udp_tokens.values())):
        for fd, _ in poller.poll(max(0, int((end - time.monotonic()) * 1000))):
            if fd in servers:
                while True:
                    try:
                        data, _ = servers[fd].recvfrom(100)
                    except BlockingIOError:
                        break
                    if data in udp_tokens:
                        results[udp_tokens[data]] = True
                continue
            i, s = pending[fd]
            results[i] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            poller.unregister(fd)
            waiting_tcp -= 1
    for _, s in pending.values():
        s.close()
    for p in pods.values():
        p.drain()
    return results


def all_probes(pods, families=(4, 6)):
    out = []
    for src in pods.values():
        for dst in pods.values():
            if src is dst:
                continue
            for family in families:
                addr = dst.ip4 if family == 4 else dst.ip6
                out += [(src, addr, "TCP", port) for port in TCP_PORTS] + [(src, addr, "UDP", UDP_PORT)]
    return out


def expected(model, probes):
    """What the reference evaluator says (the tests give pods of other nodes no egress policy
    while they compare: their egress is their own node's job)."""
    return [model.verdict(client.ip6 if ":" in dst else client.ip4, dst, proto, port).allowed
            for client, dst, proto, port in probes]


def assert_matrix(model, pods, probes=None):
    probes = probes or all_probes(pods)
    got = probe(pods, probes)
    want = expected(model, probes)
    wrong = ["%s/%s -> %s %s/%d: got %s, want %s" % (c.namespace, c.name, d, proto, port, g, w)
             for (c, d, proto, port), g, w in zip(probes, got, want) if g != w]
    assert not wrong, "\n".join(wrong)
    return got


# ---- tests ---------------------------------------------------------------------------------------------

def test_traffic_follows_the_policies_ipv4_and_ipv6(cluster):
    model, dp, pods, node = cluster
    assert all(probe(pods, all_probes(pods, (4,))))          # no table: everything answers
    policy(model, "x", "deny", {"podSelector": {}, "ingress": []})
    policy(model, "x", "a-from-y-b", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}],
         "ports": [{"port": "serve-80"}]},
        {"ports": [{"port": "dns", "protocol": "UDP"}]}]})
    policy(model, "y", "a-out", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}], "ports": [{"port": 81}, {"port": 53, "protocol": "UDP"}]},
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.1/32", "10.0.0.2/32"]}}]}]})
    r = dp.sync()
    assert r.full and r.quarantined == () and r.policies == 3
    got = assert_matrix(model, pods)
    assert not all(got) and any(got)
    # spot checks of what the matrix holds
    by = dict(zip(((c.namespace + "/" + c.name, d, proto, port) for c, d, proto, port in all_probes(pods)), got))
    x_a, x_b = pods[("x", "a")], pods[("x", "b")]
    assert by[("y/b", x_a.ip4, "TCP", 80)] and by[("y/b", x_a.ip6, "TCP", 80)]
    assert not by[("y/b", x_a.ip4, "TCP", 81)] and not by[("x/b", x_a.ip4, "TCP", 80)]
    assert by[("x/b", x_a.ip4, "UDP", 53)] and by[("z/a", x_a.ip6, "UDP", 53)]
    assert by[("y/a", x_a.ip4, "UDP", 53)] and not by[("y/a", x_a.ip4, "TCP", 80)]    # y/a: x on 81, 53 only...
    assert by[("y/a", pods[("y", "b")].ip4, "TCP", 80)]       # ... and the ipBlock (10.0.0.4 is in it)
    assert not by[("y/a", pods[("y", "b")].ip6, "TCP", 80)]   # an IPv4 block says nothing of IPv6
    # z/a runs on node2: its egress is enforced there, not here
    policy(model, "z", "deny-out", {"podSelector": {}, "policyTypes": ["Egress"]})
    dp.sync()
    assert not model.verdict(pods[("z", "a")].ip4, pods[("y", "a")].ip4, "TCP", 80).allowed
    assert probe(pods, [(pods[("z", "a")], pods[("y", "a")].ip4, "TCP", 80)]) == [True]
    # the node itself (kubelet probes) reaches an isolated pod
    out = node.run(["python3", "-c", "import socket; socket.create_connection(('%s', 81), 2); print('ok')" % x_b.ip4])
    assert out.stdout.strip() == "ok"
    counts = dp.drop_counts()
    assert counts["ingress"] > 0 and counts["egress"] > 0


def test_incremental_updates_and_established_connections(cluster):
    model, dp, pods, node = cluster
    x_a, x_b, y_a = pods[("x", "a")], pods[("x", "b")], pods[("y", "a")]
    policy(model, "x", "a-from-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    dp.sync()
    assert probe(pods, [(x_b, x_a.ip4, "TCP", 80), (y_a, x_a.ip4, "TCP", 80)]) == [True, False]
    # an established connection survives a policy that would refuse it
    with entered(x_b.netns.path):
        conn = socket.create_connection((x_a.ip4, 81), 2)
    server, _ = x_a.listeners[1].accept() if _ready(x_a.listeners[1]) else (None, None)
    assert server is not None
    # x/b relabelled: only set elements change
    model.set_pod(("x", "b"), m.parse_pod(x_b.obj({"pod": "other"})))
    r = dp.sync()
    assert not r.full and r.changed > 0
    assert " chain " not in dp.last_text and "delete" not in dp.last_text, dp.last_text
    assert probe(pods, [(x_b, x_a.ip4, "TCP", 80)]) == [False]
    server.setblocking(True)
    conn.sendall(b"still here")
    assert server.recv(100) == b"still here"
    conn.close()
    server.close()
    # y/a relabelled into the peer set: allowed
    model.set_pod(("y", "a"), m.parse_pod(y_a.obj({"pod": "b"})))
    dp.sync()
    assert " chain " not in dp.last_text
    assert probe(pods, [(y_a, x_a.ip4, "TCP", 80)]) == [False]       # a podSelector alone is x's namespace only
    # a policy added, changed, deleted
    policy(model, "x", "from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                               "ports": [{"port": 81}]}]})
    dp.sync()
    assert probe(pods, [(y_a, x_a.ip4, "TCP", 81), (y_a, x_a.ip4, "TCP", 80)]) == [True, False]
    policy(model, "x", "from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                               "ports": [{"port": 80}]}]})
    dp.sync()
    assert "ingress-ns-x" not in dp.last_text        # the policy's own chain only
    assert probe(pods, [(y_a, x_a.ip4, "TCP", 81), (y_a, x_a.ip4, "TCP", 80)]) == [False, True]
    model.set_policy(("x", "from-y"), None)
    model.set_policy(("x", "a-from-b"), None)
    dp.sync()
    assert all(probe(pods, [(y_a, x_a.ip4, "TCP", 81), (x_b, x_a.ip6, "TCP", 80)]))
    assert_matrix(model, pods, all_probes(pods, (4,)))


def _ready(sock, timeout=2.0):
    return bool(select.select([sock], [], [], timeout)[0])


def listing(node):
    """Our table as {chain: [rules]} and {set: sorted elements}, from nft's JSON; empty chains
    and sets nothing uses (left flushed for a later deletion) aside."""
    import json
    data = json.loads(node.run(["nft", "-j", "list", "table", "inet", nt.TABLE]).stdout)["nftables"]
    chains, sets, used = {}, {}, set()
    for obj in data:
        if "rule" in obj:
            text = json.dumps(obj["rule"]["expr"], sort_keys=True)
            chains.setdefault(obj["rule"]["chain"], []).append(text)
            used.update(part.split('"')[0] for part in text.split('"@')[1:])
        elif "chain" in obj:
            chains.setdefault(obj["chain"]["name"], [])
        elif "set" in obj or "map" in obj:
            s = obj.get("set") or obj.get("map")
            sets[s["name"]] = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))
    jumps = {t.split('"')[0] for rules in chains.values() for r in rules for t in r.split('"target": "')[1:]}
    chains = {c: r for c, r in chains.items() if r or c in jumps}
    sets = {s: e for s, e in sets.items() if e or s in used or s.startswith(("ingress-pods", "egress-pods", "self-pods"))}
    return chains, sets


def test_partial_syncs_leave_the_table_a_full_sync_writes(cluster):
    model, dp, pods, node = cluster
    dp.sync()
    steps = [
        lambda: policy(model, "x", "p1", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
            {"from": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.9.0.0/16", "except": ["10.9.1.0/24"]}}],
             "ports": [{"port": "serve-80"}, {"port": 1000, "endPort": 2000, "protocol": "UDP"}]}]}),
        lambda: policy(model, "y", "p2", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["z"]}]}}]}]}),
        lambda: model.set_pod(("x", "b"), m.parse_pod(pods[("x", "b")].obj({"pod": "a"}))),
        lambda: model.set_namespace("z", m.parse_namespace({"metadata": {"name": "z", "labels": {"ns": "y"}}})),
        lambda: model.set_pod(("y", "b"), None),
        lambda: policy(model, "x", "p1", {"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}),
        lambda: model.set_policy(("y", "p2"), None),
        lambda: model.set_pod(("y", "b"), m.parse_pod(pods[("y", "b")].obj({"pod": "b", "extra": "1"}))),
    ]
    for step in steps:
        step()
        r = dp.sync()
        assert not r.full, dp.last_text
    partial = listing(node)
    assert dp.sync(full=True).full
    full = listing(node)
    assert partial == full
    assert_matrix(model, pods, all_probes(pods, (4,)))


def test_a_restarted_dataplane_takes_over_without_a_wrong_packet(cluster):
    model, dp, pods, node = cluster
    x_a, x_b, y_a = pods[("x", "a")], pods[("x", "b")], pods[("y", "a")]
    policy(model, "x", "a-from-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    dp.sync()
    before = listing(node)
    probes = [(x_b, x_a.ip4, "TCP", 80), (y_a, x_a.ip4, "TCP", 80), (x_b, x_a.ip6, "UDP", 53),
              (y_a, x_a.ip6, "UDP", 53)]
    want = [True, False, True, False]
    wrong, rounds = [], [0]
    stop = threading.Event()

    def prober():
        while not stop.is_set():
            got = probe(pods, probes, deadline=0.5)
            rounds[0] += 1
            if got != want:
                wrong.append(got)

    thread = threading.Thread(target=prober)
    thread.start()
    takeovers, give_up = 0, time.monotonic() + 20
    try:
        while (rounds[0] < 6 or takeovers < 5) and time.monotonic() < give_up:
            fresh = Dataplane(node, model)             # a new agent: reads the table back, rewrites it
            r = fresh.sync()
            assert r.full and r.quarantined == ()
            takeovers += 1
    finally:
        stop.set()
        thread.join(10)
    assert rounds[0] >= 6 and takeovers >= 5 and wrong == []
    assert listing(node) == before


def test_cleanup_leaves_the_ruleset_as_it_was_and_others_untouched(cluster):
    model, dp, pods, node = cluster
    other = ("table inet someone-else {\n\tset s { type ipv4_addr; elements = { 10.0.0.1 } }\n"
             "\tchain c { type filter hook forward priority 0; policy accept; ip saddr @s counter accept; }\n}\n"
             "table ip filter {\n\tchain FORWARD { type filter hook forward priority 0; policy accept; }\n}\n")
    node.run(["nft", "-f", "-"], input=other)
    try:
        before = node.run(["nft", "list", "ruleset"]).stdout
        policy(model, "x", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
        dp.sync()
        dp.sync(full=True)
        model.set_pod(("x", "b"), m.parse_pod(pods[("x", "b")].obj({"pod": "q"})))
        dp.sync()
        assert probe(pods, [(pods[("y", "a")], pods[("x", "a")].ip4, "TCP", 80)]) == [False]
        ruleset = node.run(["nft", "list", "ruleset"]).stdout
        assert ruleset.count("table ") == 3 and "table inet someone-else" in ruleset
        # the other tables are as they were (the counter aside: the probes went through it)
        strip = lambda text: "\n".join(line for line in text.splitlines() if "counter" not in line)  # noqa: E731
        dp.cleanup()
        dp.cleanup()                                  # absent: no error
        assert strip(node.run(["nft", "list", "ruleset"]).stdout) == strip(before)
        assert dp.drop_counts() == {"ingress": 0, "egress": 0}
    finally:
        node.run(["nft", "delete", "table", "inet", "someone-else"])
        node.run(["nft", "delete", "table", "ip", "filter"])


def test_a_policy_the_kernel_refuses_is_quarantined_and_fails_closed(cluster, monkeypatch):
    model, dp, pods, node = cluster
    x_a, x_b, y_a = pods[("x", "a")], pods[("x", "b")], pods[("y", "a")]
    real = nt.render_policy_chain

    def broken(policy, direction):
        name, rules, refs = real(policy, direction)
        if policy.name == "bad":
            rules = rules + ("jump no-such-chain",)           # nft passes it on; the kernel refuses
        return name, rules, refs

    monkeypatch.setattr(nt, "render_policy_chain", broken)
    policy(model, "x", "bad", {"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})
    policy(model, "x", "good", {"podSelector": {"matchLabels": {"pod": "a"}},
                                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    r = dp.sync()
    assert r.full and r.quarantined == (("x", "bad"),) and r.policies == 1
    # the good one works; x/a stays isolated: what only "bad" allows is refused, not opened
    assert probe(pods, [(x_b, x_a.ip4, "TCP", 80), (y_a, x_a.ip4, "TCP", 80)]) == [True, False]
    # changed (and renderable again), it goes in with the next sync
    monkeypatch.setattr(nt, "render_policy_chain", real)
    policy(model, "x", "bad", {"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                            "ports": [{"port": 80}]}]})
    r = dp.sync()
    assert r.quarantined == ()
    assert probe(pods, [(y_a, x_a.ip4, "TCP", 80)]) == [True]


def test_same_node_pods_on_a_bridge_need_br_netfilter(lab):
    """flannel's layout: pods on one bridge in the node; their traffic is bridged, and reaches
    the inet forward hook only with bridge-nf-call-iptables on (per network namespace)."""
    node = lab.namespace("brnode", ip_forward=True)
    node.ip("link", "add", "cni0", "type", "bridge")
    node.ip("addr", "add", "10.1.0.1/24", "dev", "cni0")
    node.ip("link", "set", "cni0", "up")
    netns = {}
    for i, name in enumerate(("a", "b"), 2):
        p = lab.namespace("br-" + name)
        node.ip("link", "add", "veth" + name, "type", "veth", "peer", "name", "eth0", "netns", p.name)
        node.ip("link", "set", "veth" + name, "master", "cni0", "up")
        p.ip("addr", "add", "10.1.0.%d/24" % i, "dev", "eth0")
        p.ip("link", "set", "eth0", "up")
        netns[name] = p
    model = m.PolicyModel(NODE)
    model.set_namespace("x", m.parse_namespace({"metadata": {"name": "x"}}))
    for i, name in enumerate(("a", "b"), 2):
        model.set_pod(("x", name), m.parse_pod({"metadata": {"namespace": "x", "name": name, "labels": {"pod": name}},
                                                "spec": {"nodeName": NODE},
                                                "status": {"podIPs": [{"ip": "10.1.0.%d" % i}]}}))
    policy(model, "x", "deny", {"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": []})
    dp = Dataplane(node, model)
    dp.sync()
    with entered(netns["b"].path):
        server = socket.socket()
        server.bind(("10.1.0.3", 80))
        server.listen(8)

    def connects():
        with entered(netns["a"].path):
            c = socket.socket()
        c.settimeout(DEADLINE)
        try:
            c.connect(("10.1.0.3", 80))
            return True
        except OSError:
            return False
        finally:
            c.close()

    try:
        node.sysctl("net.bridge.bridge-nf-call-iptables", 0)
        assert connects()                   # bridged past every inet hook: policies cannot see it
        node.sysctl("net.bridge.bridge-nf-call-iptables", 1)
        assert not connects()
        model.set_policy(("x", "deny"), None)
        dp.sync()
        assert connects()
    finally:
        server.close()
        dp.cleanup()
