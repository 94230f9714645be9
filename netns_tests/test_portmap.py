"""portmap chained after our bridge, with real traffic; beside the reference portmap.

One module-wide lab: an underlay (IPv4 + IPv6), node1 with dual-stack pods
attached by our bridge (isGateway, ipMasq, hairpinMode, host-local), an
"outside" host on the underlay, and two more nodes ("ref", "ours") that get
the same input from the reference portmap and from ours for comparing
iptables-save. Every test cleans up the port mappings it made.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lab.cluster import Lab, cni_env, finish_cni, start_cni

NETWORK = "podnet"
SUBNET4, GW4 = "10.244.1.0/24", "10.244.1.1"
SUBNET6, GW6 = "fd00:244:1::/64", "fd00:244:1::1"
NODE6, OUTSIDE6 = "fd00:50::1", "fd00:50::100"
TIMEOUT = 30
SHARED = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")


def bridge_conf(data_dir, dual_stack=True):
    ranges = [[{"subnet": SUBNET4}]] + ([[{"subnet": SUBNET6}]] if dual_stack else [])
    routes = [{"dst": "0.0.0.0/0"}] + ([{"dst": "::/0"}] if dual_stack else [])
    return {"cniVersion": "1.0.0", "name": NETWORK, "type": "bridge", "bridge": "cni0",
            "isGateway": True, "ipMasq": True, "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": data_dir, "ranges": ranges, "routes": routes}}


def portmap_conf(prev, mappings, **extra):
    conf = {"cniVersion": "1.0.0", "name": NETWORK, "type": "portmap",
            "capabilities": {"portMappings": True},
            "runtimeConfig": {"portMappings": mappings}}
    if prev is not None:
        conf["prevResult"] = prev
    conf.update(extra)
    return conf


def chain_of(container_id):
    from cni.iptables_names import chain_name
    return chain_name(NETWORK, container_id, "DN-")


# ---- traffic ----------------------------------------------------------------

SERVER = """
import socket, sys, threading, time
tcp_port, udp_port = int(sys.argv[1]), int(sys.argv[2])
def peer(a):
    return a[0][7:] if a[0].startswith("::ffff:") else a[0]
t = socket.create_server(("::", tcp_port), family=socket.AF_INET6, dualstack_ipv6=True)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", udp_port))
def tcp():
    while True:
        c, a = t.accept()
        c.settimeout(5)
        try:
            c.recv(100)
            c.sendall(("tcp %s" % peer(a)).encode())
        except OSError:
            pass
        c.close()
def udp():
    while True:
        d, a = u.recvfrom(100)
        u.sendto(("udp %s" % peer(a)).encode(), a)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
time.sleep(120)
"""

CLIENT = """
import json, socket, sys, threading, time
probes, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
out = [None] * len(probes)
def probe(i, proto, host, port, sport):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        if sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", sport))
        s.connect((host, port))
        if proto == "tcp":
            s.send(b"ping\\n")
            out[i] = s.recv(100).decode()
            return
        # UDP has no retransmission: resend until an answer or the deadline (a
        # first datagram can wait on neighbour discovery, IPv6 mostly).
        deadline = time.monotonic() + timeout
        while True:
            s.send(b"ping\\n")
            s.settimeout(min(0.3, max(0.01, deadline - time.monotonic())))
            try:
                out[i] = s.recv(100).decode()
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
    except OSError as e:
        out[i] = "ERR " + type(e).__name__
    finally:
        s.close()
threads = [threading.Thread(target=probe, args=[i] + list(p)) for i, p in enumerate(probes)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


def start_server(pod, tcp_port=80, udp_port=53):
    proc = pod.popen([sys.executable, "-c", textwrap.dedent(SERVER), str(tcp_port), str(udp_port)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def probe(ns, probes, timeout=5.0):
    """[(proto, host, port, source port or 0)] -> replies ("tcp <peer>") or "ERR ..."."""
    out = ns.run([sys.executable, "-c", textwrap.dedent(CLIENT), json.dumps(probes), str(timeout)],
                 timeout=TIMEOUT)
    return json.loads(out.stdout)


# ---- plugins ----------------------------------------------------------------

def nat(node, ipv6=False):
    """The node's nat table, without the comment lines (timestamps)."""
    text = node.run(["ip6tables-save" if ipv6 else "iptables-save", "-t", "nat"]).stdout
    return [l for l in text.splitlines() if not l.startswith("#")]


def both_nat(node):
    return nat(node), nat(node, ipv6=True)


class Cluster:
    def __init__(self, lab, cni_bin, ref_bin):
        self.lab, self.cni_bin, self.ref_bin = lab, cni_bin, ref_bin
        underlay = lab.underlay()
        self.node = lab.node("node1", underlay)
        self.outside = lab.node("outside", underlay)
        self.node.ip("addr", "add", NODE6 + "/64", "dev", "eth0", "nodad")
        self.outside.ip("addr", "add", OUTSIDE6 + "/64", "dev", "eth0", "nodad")
        self.node_ip = self.node.underlay_ip
        self.data_dir = os.path.join(lab.workdir, "ipam")
        self.pods = {}          # container id -> (pod namespace, bridge result)

    def cni(self, plugin, command, cid, conf, node=None, netns=None, bin_dir=None, check=True):
        node = node or self.node
        bin_dir = bin_dir or self.cni_bin
        if netns is None:
            netns = self.pods[cid][0].path if cid in self.pods else ""
        out = node.run_cni(os.path.join(bin_dir, plugin), command, cid, netns, "eth0", conf, bin_dir,
                           timeout=TIMEOUT)
        if check:
            assert out.returncode == 0, "%s %s %s: %s %s" % (plugin, command, cid, out.stdout, out.stderr)
        return out

    def pod(self, cid, node=None, data_dir=None, dual_stack=True):
        """A pod namespace attached by our bridge; returns its bridge ADD result."""
        ns = self.lab.pod_netns(cid)
        self.pods[cid] = (ns, None)
        result = self.cni("bridge", "ADD", cid, bridge_conf(data_dir or self.data_dir, dual_stack),
                          node=node).result
        self.pods[cid] = (ns, result)
        return result

    def ip(self, cid, family=4):
        for ipc in self.pods[cid][1]["ips"]:
            address = ipc["address"].split("/")[0]
            if (":" in address) == (family == 6):
                return address
        return None


@pytest.fixture(scope="module")
def cluster(netns_usable, cni_bin, ref_bin):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        yield Cluster(lab, cni_bin, ref_bin)


# ---- traffic through the mapped ports -----------------------------------------

def test_mapped_ports_carry_traffic_and_del_takes_them_away(cluster):
    c, node = cluster, cluster.node
    prev = c.pod("web")
    pod = c.pods["web"][0]
    start_server(pod, 80, 53)
    conf = portmap_conf(prev, [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                               {"hostPort": 8053, "containerPort": 53, "protocol": "udp"}])
    out = c.cni("portmap", "ADD", "web", conf)
    assert out.result == prev                   # a pass-through
    assert c.cni("portmap", "CHECK", "web", conf).returncode == 0
    assert node.run(["sysctl", "-n", "net.ipv4.conf.cni0.route_localnet"]).stdout.strip() == "1"
    nip = c.node_ip
    from_outside = [("tcp", nip, 8080, 0), ("udp", nip, 8053, 0),
                    ("tcp", NODE6, 8080, 0), ("udp", NODE6, 8053, 0),
                    ("udp", nip, 8053, 40053)]       # a fixed source port: one conntrack entry
    from_node = [("tcp", "127.0.0.1", 8080, 0), ("udp", "127.0.0.1", 8053, 0),
                 ("tcp", nip, 8080, 0), ("udp", nip, 8053, 0), ("tcp", NODE6, 8080, 0)]
    hairpin = [("tcp", nip, 8080, 0), ("udp", nip, 8053, 0), ("tcp", NODE6, 8080, 0),
               ("udp", NODE6, 8053, 0)]
    out6 = c.outside.underlay_ip
    # The pod sees outside clients as themselves; localhost and hairpin traffic
    # masqueraded to the gateway (else the pod would answer itself directly).
    assert probe(c.outside, from_outside) == [
        "tcp " + out6, "udp " + out6, "tcp " + OUTSIDE6, "udp " + OUTSIDE6, "udp " + out6]
    assert probe(node, from_node) == ["tcp " + GW4, "udp " + GW4, "tcp " + nip, "udp " + nip,
                                      "tcp " + NODE6]
    assert probe(pod, hairpin) == ["tcp " + GW4, "udp " + GW4, "tcp " + GW6, "udp " + GW6]

    c.cni("portmap", "DEL", "web", conf)
    chain = chain_of("web")
    for table in both_nat(node):
        assert not [l for l in table if chain in l or '"web"' in l and "dnat" in l]
        assert all(":%s " % s in "\n".join(table) for s in SHARED)     # shared chains stay
    # Everything is gone; the stale UDP flow too (its conntrack entry was
    # deleted), although the pod and its server still run.
    gone = probe(c.outside, from_outside, timeout=1) + probe(node, from_node, timeout=1) \
        + probe(pod, hairpin, timeout=1)
    assert all(r.startswith("ERR") for r in gone), gone
    out = c.cni("portmap", "CHECK", "web", conf, check=False)
    assert out.returncode == 1 and out.result["code"] == 7 and chain in out.result["msg"]
    c.cni("portmap", "DEL", "web", conf)                        # idempotent
    c.cni("portmap", "DEL", "web", portmap_conf(None, conf["runtimeConfig"]["portMappings"]),
          netns="")                                             # no prevResult, no netns


def test_twenty_concurrent_adds(cluster):
    c, node = cluster, cluster.node
    n = 20
    ids = ["par%02d" % i for i in range(n)]
    pods = [c.lab.pod_netns(cid) for cid in ids]
    bconf = bridge_conf(c.data_dir, dual_stack=False)
    results = finish_cni([start_cni(node, os.path.join(c.cni_bin, "bridge"), "ADD", cid, pod.path, "eth0", bconf, c.cni_bin)
                          for cid, pod in zip(ids, pods)])
    assert [r[0] for r in results] == [0] * n, results
    prevs = [json.loads(out) for _, out, _ in results]
    for cid, pod, prev in zip(ids, pods, prevs):
        c.pods[cid] = (pod, prev)
    servers = [pod.popen([sys.executable, "-c", textwrap.dedent(SERVER), "80", "53"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pod in pods]
    confs = [portmap_conf(prev, [{"hostPort": 9000 + i, "containerPort": 80}])
             for i, prev in enumerate(prevs)]
    results = finish_cni([start_cni(node, os.path.join(c.cni_bin, "portmap"), "ADD", cid, pod.path, "eth0", conf, c.cni_bin)
                          for cid, pod, conf in zip(ids, pods, confs)])
    assert [r[0] for r in results] == [0] * n, [r for r in results if r[0]][:3]

    table = nat(node)
    for cid, i in zip(ids, range(n)):
        chain = chain_of(cid)
        assert table.count(":%s - [0:0]" % chain) == 1
        entry = [l for l in table if l.startswith("-A CNI-HOSTPORT-DNAT ") and l.endswith("-j " + chain)]
        assert len(entry) == 1 and "--dports %d " % (9000 + i) in entry[0]
        assert len([l for l in table if l.startswith("-A %s " % chain)]) == 3
    for shared in SHARED:
        assert table.count(":%s - [0:0]" % shared) == 1
    for rule in ("-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                 "-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                 '-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ',
                 "-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE"):
        assert table.count(rule) == 1, rule
    assert len([l for l in table if l.startswith("-A CNI-HOSTPORT-SETMARK ")]) == 1

    for server in servers:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
    replies = probe(c.outside, [("tcp", c.node_ip, 9000 + i, 0) for i in range(n)])
    assert replies == ["tcp " + c.outside.underlay_ip] * n

    results = finish_cni([start_cni(node, os.path.join(c.cni_bin, "portmap"), "DEL", cid, pod.path, "eth0", conf, c.cni_bin)
                          for cid, pod, conf in zip(ids, pods, confs)])
    assert [r[0] for r in results] == [0] * n, [r for r in results if r[0]][:3]
    table = "\n".join(nat(node))
    assert not any(chain_of(cid) in table for cid in ids)
    assert "-A CNI-HOSTPORT-DNAT" not in table
    assert all(r.startswith("ERR") for r in probe(c.outside, [("tcp", c.node_ip, 9000, 0)], timeout=1))


def test_a_host_port_in_use_is_refused_and_nothing_is_left(cluster):
    c, node = cluster, cluster.node
    prev_a, prev_b = c.pod("owner"), c.pod("late")
    taken = portmap_conf(prev_a, [{"hostPort": 7000, "containerPort": 80, "protocol": "tcp"},
                                  {"hostPort": 7001, "containerPort": 81, "protocol": "udp",
                                   "hostIP": c.node_ip}])
    c.cni("portmap", "ADD", "owner", taken)
    before = both_nat(node)
    clashes = [
        [{"hostPort": 7000, "containerPort": 80, "protocol": "TCP"}],
        [{"hostPort": 7000, "containerPort": 80, "hostIP": c.node_ip}],       # specific vs any
        [{"hostPort": 7001, "containerPort": 80, "protocol": "udp"}],         # any vs specific
        [{"hostPort": 7100, "containerPort": 80}, {"hostPort": 7000, "containerPort": 80}],
    ]
    for mappings in clashes:
        out = c.cni("portmap", "ADD", "late", portmap_conf(prev_b, mappings), check=False)
        assert out.returncode == 1 and out.result["code"] == 103, out.stdout
        assert "is already mapped by another container" in out.result["msg"]
        assert chain_of("owner") in out.result["details"]
        assert 'dnat name: "podnet" id: "owner"' in out.result["details"]
        assert both_nat(node) == before, mappings
    # Other protocol, other address or other port: fine.
    fine = portmap_conf(prev_b, [{"hostPort": 7000, "containerPort": 80, "protocol": "udp"},
                                 {"hostPort": 7001, "containerPort": 80, "protocol": "udp",
                                  "hostIP": "127.0.0.1"},
                                 {"hostPort": 7002, "containerPort": 80}])
    c.cni("portmap", "ADD", "late", fine)
    c.cni("portmap", "ADD", "late", fine)             # a repeated ADD is not a clash with itself
    assert both_nat(node) != before
    c.cni("portmap", "DEL", "late", fine)
    assert both_nat(node) == before
    # Once the owner is gone the port is free.
    c.cni("portmap", "DEL", "owner", taken)
    c.cni("portmap", "ADD", "late", portmap_conf(prev_b, clashes[0]))
    c.cni("portmap", "DEL", "late", portmap_conf(prev_b, clashes[0]))


def test_repeated_add_and_passthrough(cluster):
    c, node = cluster, cluster.node
    prev = c.pod("again")
    before = both_nat(node)
    conf = portmap_conf(prev, [])
    assert c.cni("portmap", "ADD", "again", conf).result == prev      # no mappings: a no-op
    assert c.cni("portmap", "ADD", "again", portmap_conf(prev, None)).result == prev
    assert both_nat(node) == before
    conf = portmap_conf(prev, [{"hostPort": 6000, "containerPort": 80}])
    c.cni("portmap", "ADD", "again", conf)
    first = both_nat(node)
    c.cni("portmap", "ADD", "again", conf)
    assert both_nat(node) == first
    # A rerun the kernel refuses (no such mark chain) keeps what the pod has.
    out = c.cni("portmap", "ADD", "again", dict(conf, externalSetMarkChain="NO-SUCH-CHAIN"), check=False)
    assert out.returncode == 1 and out.result["code"] == 101, out.stdout
    assert both_nat(node) == first
    assert c.cni("portmap", "CHECK", "again", conf).returncode == 0
    out = c.cni("portmap", "CHECK", "again", dict(conf, markMasqBit=3), check=False)
    assert out.result["code"] == 7
    assert out.result["details"] == ('missing: -A CNI-HOSTPORT-SETMARK -m comment --comment '
                                     '"CNI portfwd masquerade mark" -j MARK --set-xmark 0x8/0x8')
    changed = portmap_conf(prev, [{"hostPort": 6001, "containerPort": 81}])
    c.cni("portmap", "ADD", "again", changed)          # a rerun with other mappings replaces them
    table = "\n".join(nat(node))
    assert "--dport 6001 " in table and "--dport 6000 " not in table
    c.cni("portmap", "DEL", "again", changed)
    after = both_nat(node)
    assert not any(chain_of("again") in l for t in after for l in t)


# ---- the same rules as the reference ------------------------------------------

MAPPINGS = [
    {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
    {"hostPort": 8053, "containerPort": 53, "protocol": "udp"},
    {"hostPort": 9090, "containerPort": 90, "protocol": "tcp", "hostIP": "192.168.50.1"},
    {"hostPort": 9091, "containerPort": 91, "protocol": "tcp", "hostIP": "0.0.0.0"},
    {"hostPort": 9093, "containerPort": 93, "protocol": "udp", "hostIP": "fd00::1"},
    {"hostPort": 9092, "containerPort": 92, "protocol": "sctp"},
] + [{"hostPort": 10000 + i, "containerPort": 1000 + i, "protocol": "tcp"} for i in range(17)]

VARIANTS = {
    "default": {},
    "no-snat": {"snat": False},
    "mark-bit-0": {"markMasqBit": 0},
    "external-mark-chain": {"externalSetMarkChain": "KUBE-MARK-MASQ"},
    "conditions": {"markMasqBit": 31, "conditionsV4": ["-s", "192.168.50.0/24", "-m", "comment",
                                                       "--comment", "a b"],
                   "conditionsV6": ["!", "-s", "fd00::/8"]},
}


@pytest.fixture(scope="module")
def twins(cluster):
    """Nodes "ref" and "ours", each with pod "twin" attached by our bridge: same
    addresses, same container ID, so the same iptables input."""
    c = cluster
    out = {}
    for name in ("ref", "ours"):
        node = c.lab.namespace(name)
        for tool in ("iptables", "ip6tables"):
            node.run([tool, "-t", "nat", "-N", "KUBE-MARK-MASQ"])
        ns = c.lab.pod_netns("twin-" + name)
        result = node.run_cni(os.path.join(c.cni_bin, "bridge"), "ADD", "twin", ns.path, "eth0",
                              bridge_conf(os.path.join(c.lab.workdir, "ipam-" + name)), c.cni_bin).result
        out[name] = (node, ns, result)
    assert out["ref"][2]["ips"] == out["ours"][2]["ips"]
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_rules_as_the_reference(cluster, twins, variant):
    c = cluster
    confs = {}
    for name, bin_dir in (("ref", c.ref_bin), ("ours", c.cni_bin)):
        node, ns, prev = twins[name]
        confs[name] = portmap_conf(prev, MAPPINGS, **VARIANTS[variant])
        out = c.cni("portmap", "ADD", "twin", confs[name], node=node, netns=ns.path, bin_dir=bin_dir)
        assert out.result["ips"] == prev["ips"]
    ref, ours = both_nat(twins["ref"][0]), both_nat(twins["ours"][0])
    assert ours == ref
    assert any(l.startswith("-A %s " % chain_of("twin")) for l in ours[0])
    # Each cleans up after the other: our DEL of the reference's rules, and back.
    c.cni("portmap", "DEL", "twin", confs["ref"], node=twins["ref"][0], netns="")
    c.cni("portmap", "DEL", "twin", confs["ours"], node=twins["ours"][0], netns="", bin_dir=c.ref_bin)
    ref, ours = both_nat(twins["ref"][0]), both_nat(twins["ours"][0])
    assert ours == ref
    assert not any(chain_of("twin") in l for t in ours for l in t)


# ---- bad input --------------------------------------------------------------

def _bad_cases(prev, node_ip):
    m = {"hostPort": 8081, "containerPort": 80}

    def with_(**kw):
        return dict(m, **kw)
    no_ips = {k: v for k, v in prev.items() if k != "ips"}
    host_side_only = dict(prev, ips=[dict(ip, interface=1) for ip in prev["ips"]])
    return [
        # (name, config, code, message part)
        ("mappings-not-a-list", portmap_conf(prev, m), 7, "portMappings must be a list"),
        ("entry-not-an-object", portmap_conf(prev, [8081]), 7, "portMappings[0] is not an object"),
        ("host-port-missing", portmap_conf(prev, [{"containerPort": 80}]), 7, "Invalid host port number: missing"),
        ("host-port-zero", portmap_conf(prev, [with_(hostPort=0)]), 7, "Invalid host port number: 0"),
        ("host-port-too-big", portmap_conf(prev, [with_(hostPort=65536)]), 7, "Invalid host port number: 65536"),
        ("host-port-string", portmap_conf(prev, [with_(hostPort="8081")]), 7, "Invalid host port number: '8081'"),
        ("host-port-bool", portmap_conf(prev, [with_(hostPort=True)]), 7, "Invalid host port number: True"),
        ("container-port-zero", portmap_conf(prev, [with_(containerPort=0)]), 7, "Invalid container port number: 0"),
        ("container-port-float", portmap_conf(prev, [with_(containerPort=80.5)]), 7, "Invalid container port number: 80.5"),
        ("unknown-protocol", portmap_conf(prev, [with_(protocol="icmp")]), 7, "Unknown protocol 'icmp'"),
        ("bad-host-ip", portmap_conf(prev, [with_(hostIP="300.1.1.1")]), 7, "Invalid hostIP '300.1.1.1'"),
        ("mark-bit-32", portmap_conf(prev, [m], markMasqBit=32), 7, "MasqMarkBit must be between 0 and 31"),
        ("mark-bit-negative", portmap_conf(prev, [m], markMasqBit=-1), 7, "MasqMarkBit must be between 0 and 31"),
        ("mark-bit-and-external", portmap_conf(prev, [m], markMasqBit=5, externalSetMarkChain="X"), 7,
         "Cannot specify externalSetMarkChain and markMasqBit"),
        ("bad-external-chain", portmap_conf(prev, [m], externalSetMarkChain="A B"), 7, "invalid externalSetMarkChain"),
        ("conditions-not-strings", portmap_conf(prev, [m], conditionsV4=["-s", 1]), 7,
         "conditionsV4 must be a list of strings"),
        ("conditions-injection", portmap_conf(prev, [m], conditionsV4=["-s", "10.0.0.1\nCOMMIT\n*nat\n-F"]), 7,
         "control character"),
        ("snat-not-bool", portmap_conf(prev, [m], snat="yes"), 7, "snat must be a boolean"),
        ("duplicate-host-port", portmap_conf(prev, [m, with_(containerPort=81, hostIP=node_ip)]), 7,
         "map host port tcp/8081 twice"),
        ("no-prev-result", portmap_conf(None, [m]), 7, "must be called as chained plugin"),
        ("no-prev-result-no-mappings", portmap_conf(None, []), 7, "must be called as chained plugin"),
        ("prev-result-without-ips", portmap_conf(no_ips, [m]), 7, "prevResult has no address of interface eth0"),
        ("prev-result-host-side-ips", portmap_conf(host_side_only, [m]), 7, "prevResult has no address"),
        ("prev-result-malformed", portmap_conf(dict(prev, ips="10.0.0.1"), [m]), 6, "result ips is not a list"),
        ("runtime-config-not-object", dict(portmap_conf(prev, [m]), runtimeConfig=[]), 7,
         "runtimeConfig must be an object"),
        # Regression (issue 12, defect 4): a lone surrogate anywhere in prevResult (echoed
        # back as the result) installed the rules, then crashed printing the result: no
        # JSON, and the CNI-DN chain left behind. Now refused before anything is touched.
        ("prev-result-unencodable", portmap_conf(dict(prev, dns={"domain": "x\ud800"}), [m]), 6,
         "lone surrogate"),
        ("prev-result-unencodable-interface", portmap_conf(dict(prev, interfaces=[
            dict(i, name=i["name"] + "\udcff") for i in prev["interfaces"]]), [m]), 6, "lone surrogate"),
        ("conditions-too-long", portmap_conf(prev, [m], conditionsV4=["-m", "comment", "--comment", "x" * 1100]),
         7, "too long for iptables"),
        ("type-not-a-string", dict(portmap_conf(prev, [m]), type=5), 7, "type must be a string"),
        # Found by the corpus: was 101, as if the kernel had failed.
        ("conditions-iptables-refuses", portmap_conf(prev, [m], conditionsV4=["--no-such-option", "1"]), 7,
         "iptables refused the rule with conditionsV4"),
        ("conditions-iptables-refuses-v6", portmap_conf(prev, [m], conditionsV6=["-s", "..-s"]), 7,
         "iptables refused the rule with conditionsV6"),
        # Valid input the kernel refuses, in the second family only: the first
        # family's rules are taken away again.
        ("external-chain-missing-in-ipv6", portmap_conf(prev, [m], externalSetMarkChain="ONLY-V4"), 101,
         "could not add the port mappings"),
    ]


def test_bad_input_fails_cleanly(cluster):
    c, node = cluster, cluster.node
    prev = c.pod("bad")
    # Some state to keep: another pod's mapping (and so the shared chains).
    c.cni("portmap", "ADD", "bad", portmap_conf(prev, [{"hostPort": 5000, "containerPort": 80}]))
    node.run(["iptables", "-t", "nat", "-N", "ONLY-V4"])
    before = both_nat(node)
    cases = _bad_cases(prev, c.node_ip)
    assert len(cases) >= 8
    for name, conf, code, message in cases:
        out = c.cni("portmap", "ADD", "bad2", conf, netns=c.pods["bad"][0].path, check=False)
        assert out.returncode == 1, (name, out.stdout)
        assert out.result["code"] == code, (name, out.result)
        assert message in out.result["msg"] + " " + out.result.get("details", ""), (name, out.result)
        assert both_nat(node) == before, name
    # A DEL with the same bad input still succeeds (it needs only name and ID).
    for name, conf, _, _ in cases[:6]:
        out = c.cni("portmap", "DEL", "bad2", conf, netns="", check=False)
        assert out.returncode == 0, (name, out.stdout)
    c.cni("portmap", "DEL", "bad", portmap_conf(prev, [{"hostPort": 5000, "containerPort": 80}]))
    node.run(["iptables", "-t", "nat", "-X", "ONLY-V4"])


# ---- a " -j " in the conditions (issue 12, defect 5) -------------------------------

@pytest.mark.parametrize("condition", ["a -j b", "-j", "-j CNI-DN-x"])
def test_del_with_a_jump_word_in_the_conditions(cluster, condition):
    """Regression: DEL took the first "-j" word of the CNI-HOSTPORT-DNAT rule for its
    target, never deleted the jump, and failed deleting the still-referenced chain
    (every retry too). The conflict check misread such rules the same way."""
    c, node = cluster, cluster.node
    cid = "jword%d" % len(condition)
    prev = c.pod(cid)
    before = both_nat(node)
    conditions = ["-m", "comment", "--comment", condition]
    conf = portmap_conf(prev, [{"hostPort": 6100, "containerPort": 80}], conditionsV4=conditions,
                        conditionsV6=conditions)
    c.cni("portmap", "ADD", cid, conf)
    entry = [l for l in nat(node) if l.startswith("-A CNI-HOSTPORT-DNAT ") and l.endswith(chain_of(cid))]
    assert len(entry) == 1 and "--comment" in entry[0].split(chain_of(cid))[0]
    c.cni("portmap", "ADD", cid, conf)                  # a rerun replaces that jump
    assert [l for l in nat(node) if l.endswith("-j " + chain_of(cid))] == entry
    other = c.pod(cid + "b")
    out = c.cni("portmap", "ADD", cid + "b", portmap_conf(other, [{"hostPort": 6100, "containerPort": 80}]),
                check=False)
    assert out.returncode == 1 and out.result["code"] == 103, out.stdout
    c.cni("portmap", "DEL", cid, conf)
    assert not any(chain_of(cid) in l for t in both_nat(node) for l in t)
    assert not any("dnat name" in l for t in both_nat(node) for l in t if l not in before[0] + before[1])


# ---- the hot path -------------------------------------------------------------

HEAVY = ("json", "re", "subprocess", "ipaddress", "socket", "hashlib", "enum", "ctypes",
         "threading", "selectors", "shlex")

IMPORTS = """
import os, sys
sys.path.insert(0, %r)
from cni.skel import plugin_main
from cni.plugins.portmap import COMMANDS
try:
    plugin_main(COMMANDS)
except SystemExit as e:
    code = e.code
sys.stdout.flush()
sys.stderr.write(" ".join(sorted(sys.modules)))
sys.exit(code)
"""


def test_hot_path_imports_stay_light(cluster):
    """ADD, CHECK and DEL (UDP conntrack included) import no heavy module."""
    c, node = cluster, cluster.node
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prev = c.pod("light")
    conf = json.dumps(portmap_conf(prev, [{"hostPort": 4000, "containerPort": 80},
                                          {"hostPort": 4000, "containerPort": 80, "protocol": "udp"}]))
    for command in ("ADD", "CHECK", "DEL"):
        env = cni_env(command, "light", c.pods["light"][0].path, "eth0", c.cni_bin)
        out = node.run(["/usr/bin/python3", "-I", "-S", "-c", IMPORTS % root], input=conf, env=env,
                       check=False)
        assert out.returncode == 0, (command, out.stdout, out.stderr[-2000:])
        loaded = set(out.stderr.split())
        assert {"cni.plugins.portmap", "podnet.net.iptables"} <= loaded
        assert not loaded & set(HEAVY), (command, sorted(loaded & set(HEAVY)))
    # The conntrack path runs only with tracked UDP flows: its imports, too.
    out = node.run(["/usr/bin/python3", "-I", "-S", "-c", "import sys; sys.path.insert(0, %r); "
                    "import cni.plugins.portmap, podnet.net.conntrack, podnet.net.sysctl, fcntl; "
                    "print(' '.join(sys.modules))" % root])
    assert not set(out.stdout.split()) & set(HEAVY)
