"""flanneld as a cluster runs it: lab.cluster.Cluster, end to end (issue 4).

One etcd in its own namespace on the underlay, `python -m flanneld.daemon` in
each of three node namespaces (--etcd-endpoints, --iface eth0, --ip-masq), and
pods attached through the stock 10-flannel conflist (flannel -> bridge +
host-local, then portmap), two per node. One cluster per backend (a
module-scoped fixture parametrized indirectly: tests of the same backend share
it, and every test leaves it as it found it).

The daemons run with a 20 s lease TTL renewed 15 s before it expires, i.e.
every ~5 s, so a renewal falls inside the etcd-outage test.

What is shown, per backend:
  - every pod reaches every other pod, ICMP and TCP (pod IPs preserved);
  - the underlay carries what the backend says (tcpdump on the switch);
  - a node that leaves is forgotten by the others within 5 s (vxlan, host-gw);
  - a daemon restart keeps the subnet and the traffic (vxlan, host-gw);
  - an etcd outage does not disturb pods, and the daemons reconnect (vxlan);
and, on a bare etcd: a bad network config is refused without touching the
node until a valid one appears, and /readyz reports readiness.
"""
import importlib.util
import ipaddress
import json
import os
import subprocess
import time

import pytest

from lab.cluster import Cluster, Lab, exec_argv

from helpers import Capture, ping_many, ping_stats, wait_until

PREFIX = "/coreos.com/network"
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEASE_ARGS = ["--subnet-lease-ttl", "20", "--subnet-lease-renew-margin", "0.25"]   # renew every ~5 s
PODS_PER_NODE = 2
TCP_PORT = 8080
HEALTHZ_PORT = 10300
TIMEOUT = 20

UDP_READY = importlib.util.find_spec("flanneld.backend.udp") is not None
UDP = pytest.param("udp", marks=pytest.mark.skipif(
    not UDP_READY, reason="flanneld/backend/udp.py (the udp backend) is not there yet"))
# Same order everywhere: the indirect param index must match for tests to share a cluster.
ALL_BACKENDS = ["vxlan", "host-gw", UDP]
KERNEL_BACKENDS = ["vxlan", "host-gw"]


# ---- fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(request, netns_usable):
    """A started 3-node cluster of backend request.param, PODS_PER_NODE pods per node."""
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        c = Cluster(lab, backend=request.param, flanneld_args=LEASE_ARGS)
        c.start()
        for node in c.nodes:
            for i in range(1, PODS_PER_NODE + 1):
                c.add_pod(node, "%s-%d" % (node.role, i))
        yield c


@pytest.fixture(scope="module")
def bare(netns_usable):
    """etcd on an underlay and no node yet (the default config is in place)."""
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        yield Cluster(lab, nodes=0, flanneld_args=LEASE_ARGS).start()


def backends(values):
    return pytest.mark.parametrize("cluster", values, indirect=True)


# ---- helpers ----------------------------------------------------------------------


def pods_on(c, node):
    return [p for p in c.pods if p.node is node]


def read(path, offset=0):
    with open(path) as f:
        f.seek(offset)
        return f.read()


def log_size(c, node):
    return os.path.getsize(c.flanneld_log(node))


def node_subnet(c, node):
    """The node's lease (a str such as "10.244.7.0/24"), from its subnet.env."""
    env = dict(line.split("=", 1) for line in read(c.subnet_file(node)).split())
    return str(ipaddress.ip_interface(env["FLANNEL_SUBNET"]).network)


def lease_key(subnet):
    net = ipaddress.ip_network(subnet)
    return "%s/subnets/%s-%d" % (PREFIX, net.network_address, net.prefixlen)


def our_routes(node):
    return {r["dst"]: r for r in node.ip_json("route", "show", "proto", "77")}


def bridge_json(ns, *args):
    out = ns.run(["bridge", "-j"] + list(args)).stdout
    return json.loads(out) if out.strip() else []


def entries_for(c, node, subnet, public_ip):
    """What `node` has for a remote lease: ["route", "neigh", "fdb"] (those present)."""
    found = []
    if subnet in our_routes(node):
        found.append("route")
    if c.backend == "vxlan":
        gateway = str(ipaddress.ip_network(subnet).network_address)
        if any(n.get("dst") == gateway for n in node.ip_json("neigh", "show", "dev", "flannel.1")):
            found.append("neigh")
        if any(e.get("dst") == public_ip for e in bridge_json(node, "fdb", "show", "dev", "flannel.1")):
            found.append("fdb")
    return found


def expected_entries(c):
    return ["route", "neigh", "fdb"] if c.backend == "vxlan" else ["route"]


def start_pinger(src, dst_ip, count, interval):
    return subprocess.Popen(exec_argv(src.ns.name, ["ping", "-n", "-q", "-c", count, "-i", interval,
                                                    "-W", "1", dst_ip]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def healthz(node, path="/healthz", host="127.0.0.1"):
    """HTTP status code of GET http://host:HEALTHZ_PORT/path from inside `node` ("000": no answer)."""
    r = node.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                  "http://%s:%d%s" % (host, HEALTHZ_PORT, path)], check=False)
    return r.stdout.strip()


# ---- traffic -------------------------------------------------------------------------

@backends(ALL_BACKENDS)
def test_every_pod_pings_every_other_pod(cluster):
    c = cluster
    assert len(c.pods) >= 3 * PODS_PER_NODE
    for pod in c.pods:      # host-local allocated from the lease flanneld wrote for the CNI plugin
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(node_subnet(c, pod.node)), pod
    pairs = {(a.name, b.name): (a.ns, b.ip) for a in c.pods for b in c.pods if a is not b}
    assert ping_many(pairs) == {}


SERVER = r"""
import hashlib, socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[2])), backlog=64)
print("listening", flush=True)
while True:
    c, (ip, _) = s.accept()
    with c:
        c.settimeout(5)
        data = b""
        try:
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
            c.sendall(("%s %s %d %s" % (sys.argv[1], ip, len(data), hashlib.sha256(data).hexdigest())).encode())
        except OSError:
            pass
"""

CLIENT = r"""
import os, socket, sys
data = os.urandom(200000)
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
import hashlib
print(reply.decode(), hashlib.sha256(data).hexdigest())
"""


@backends(ALL_BACKENDS)
def test_tcp_between_every_pod_and_a_server_on_each_node(cluster):
    """A server in one pod per node; every other pod sends it 200 kB (full-size
    segments, so the pod MTU must fit the encapsulation) and gets back the
    length, a digest and the source address the server saw: the client's own
    pod IP (no masquerade between pods)."""
    c = cluster
    servers = [pods_on(c, node)[0] for node in c.nodes]
    procs = []
    try:
        for pod in servers:
            proc = pod.ns.popen(["python3", "-c", SERVER, pod.name, TCP_PORT],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(proc)
            assert proc.stdout.readline().strip() == "listening"
        clients = {}
        for server in servers:
            for pod in c.pods:
                if pod is not server:
                    clients[(pod.name, server.name)] = subprocess.Popen(
                        exec_argv(pod.ns.name, ["python3", "-c", CLIENT, server.ip, TCP_PORT]),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert len(clients) == len(servers) * (len(c.pods) - 1)
        failed = {}
        for (client, server), proc in clients.items():
            out = finish(proc, TIMEOUT).split()
            ip = next(p.ip for p in c.pods if p.name == client)
            if len(out) != 5 or out[:3] != [server, ip, "200000"] or out[3] != out[4]:
                failed[(client, server)] = " ".join(out)
        assert failed == {}
    finally:
        for pod, proc in zip(servers, procs):
            proc.kill()
            proc.wait()
            proc.stdout.close()
            pod.ns.processes.remove(proc)


@backends(ALL_BACKENDS)
def test_underlay_carries_what_the_backend_says(cluster):
    c = cluster
    node1, node2 = c.nodes[0], c.nodes[1]
    a, b = pods_on(c, node1)[0], pods_on(c, node2)[0]
    pods, hosts = {a.ip, b.ip}, {node1.underlay_ip, node2.underlay_ip}
    cap = Capture(c.underlay.switch, "br0", "udp or icmp",
                  os.path.join(c.lab.workdir, "underlay-%s.pcap" % c.backend))
    try:
        r = a.ns.run(["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", b.ip], check=False)
    finally:
        packets = cap.stop()
    assert r.returncode == 0, r.stdout
    clear = [p for p in packets if p["proto"] == 1 and {p["src"], p["dst"]} == pods]
    if c.backend == "vxlan":
        tunnelled = [p for p in packets if p.get("inner_proto") == 1]
        assert len(tunnelled) >= 6, packets                 # 3 requests + 3 replies
        for p in tunnelled:
            assert (p["proto"], p["dport"], p["vni"]) == (17, 8472, 1), p
            assert {p["src"], p["dst"]} == hosts and {p["inner_src"], p["inner_dst"]} == pods, p
        assert clear == []
    elif c.backend == "host-gw":
        assert len(clear) >= 6, packets                     # plain pod-to-pod ICMP
        assert not [p for p in packets if p["proto"] == 17 and {p["sport"], p["dport"]} & {8472, 8285}]
    else:
        carried = [p for p in packets if p["proto"] == 17 and 8285 in (p["sport"], p["dport"])]
        assert len(carried) >= 6, packets
        for p in carried:       # the payload is the bare inner IP packet, nothing around it
            assert p["dport"] == 8285 and {p["src"], p["dst"]} == hosts, p
            assert p.get("payload_proto") == 1 and {p["payload_src"], p["payload_dst"]} == pods, p
        assert clear == []


# ---- a daemon restart ---------------------------------------------------------------------

@backends(KERNEL_BACKENDS)
def test_restart_keeps_the_subnet_and_the_traffic(cluster):
    """SIGTERM flanneld on node1 and start it again while node1's pod pings node2's
    at 20/s: the same subnet.env, the same kernel state, at most 5 of 100 lost."""
    c = cluster
    node1, node2 = c.nodes[0], c.nodes[1]
    a, b = pods_on(c, node1)[0], pods_on(c, node2)[0]
    env_before, routes_before = read(c.subnet_file(node1)), our_routes(node1)
    vtep_before = node1.ip_json("link", "show", "flannel.1") if c.backend == "vxlan" else None
    offset = log_size(c, node1)
    pinger = start_pinger(a, b.ip, 100, 0.05)
    try:
        time.sleep(1)
        c.stop_flanneld(node1)
        c.start_flanneld(node1)
        took = wait_until(lambda: "lease acquired" in read(c.flanneld_log(node1), offset), TIMEOUT,
                          "the restarted daemon to acquire its lease")
        assert pinger.poll() is None, "the ping ended before the restart did: it proves nothing"
    finally:
        if node1.role not in c.flanneld:
            c.start_flanneld(node1)
        out = finish(pinger, TIMEOUT)
    sent, received = ping_stats(out)
    print("restart: lease after %.2fs, %d of %d pings lost" % (took, sent - received, sent))
    assert sent == 100 and sent - received <= 5, out
    log = read(c.flanneld_log(node1), offset)
    subnet = node_subnet(c, node1)
    assert "acquired reusing lease %s" % subnet in log, log
    wait_until(lambda: read(c.subnet_file(node1)) == env_before and our_routes(node1) == routes_before,
               5, "subnet.env and routes as before the restart")
    if c.backend == "vxlan":
        assert "adopting existing VTEP flannel.1" in log, log
        (before,), (after,) = vtep_before, node1.ip_json("link", "show", "flannel.1")
        assert (after["ifindex"], after["address"]) == (before["ifindex"], before["address"])


# ---- a node leaving -------------------------------------------------------------------------

@backends(KERNEL_BACKENDS)
def test_node_leave_is_forgotten_within_5s(cluster):
    """node3's daemon stops and its lease is deleted: node1 and node2 drop its route
    (and for vxlan its neighbour and FDB entry) within 5 s; they still talk to each
    other. The lease is then put back and node3 rejoins (test hygiene, and a rejoin)."""
    c = cluster
    node1, node2, node3 = c.nodes[:3]
    subnet3, ip3 = node_subnet(c, node3), node3.underlay_ip
    key = lease_key(subnet3)
    value = c.etcdctl("get", "--print-value-only", key).stdout.strip()
    assert json.loads(value)["PublicIP"] == ip3
    for node in (node1, node2):
        assert entries_for(c, node, subnet3, ip3) == expected_entries(c), node
    c.stop_flanneld(node3)
    try:
        start = time.monotonic()
        assert c.etcdctl("del", key).stdout.strip() == "1"
        took = wait_until(lambda: not any(entries_for(c, n, subnet3, ip3) for n in (node1, node2)), 10,
                          "node1 and node2 to forget node3's subnet", interval=0.02)
        took = time.monotonic() - start         # the etcdctl run included
        print("node leave: forgotten after %.2fs" % took)
        assert took < 5
        pairs = {(a.name, b.name): (a.ns, b.ip) for a in pods_on(c, node1) + pods_on(c, node2)
                 for b in pods_on(c, node1) + pods_on(c, node2) if a.node is not b.node}
        assert ping_many(pairs) == {}
        gone = pods_on(c, node3)[0]
        assert pods_on(c, node1)[0].ns.run(["ping", "-n", "-c", "1", "-W", "1", gone.ip], check=False).returncode
    finally:
        c.etcdctl("put", key, value)
        c.start_flanneld(node3)
    wait_until(lambda: all(entries_for(c, n, subnet3, ip3) == expected_entries(c) for n in (node1, node2)),
               TIMEOUT, "node3 to be back on node1 and node2")
    assert node_subnet(c, node3) == subnet3
    pairs = {(a.name, b.name): (a.ns, b.ip) for a in pods_on(c, node1) for b in pods_on(c, node3)}
    assert ping_many(pairs) == {}


# ---- an etcd outage ----------------------------------------------------------------------------

@backends(["vxlan"])
def test_etcd_outage_does_not_disturb_pods_and_daemons_reconnect(cluster):
    """etcd is stopped for 30 s while node1's pod pings node2's (5/s): at most 2 lost,
    the daemons keep running. etcd restarts on the same data dir: each daemon renews
    its lease (no lease was lost), and a node that joins afterwards is learned by the
    existing ones (their watches are back) and its pod reaches theirs."""
    c = cluster
    node1, node2 = c.nodes[0], c.nodes[1]
    a, b = pods_on(c, node1)[0], pods_on(c, node2)[0]
    watched = [n for n in c.nodes if n.role in c.flanneld]
    offsets = {n.role: log_size(c, n) for n in watched}
    pinger = start_pinger(a, b.ip, 150, 0.2)
    try:
        time.sleep(0.3)
        c.stop_etcd()
        out = finish(pinger, 45)
    finally:
        if c.etcd_proc is None:
            c.restart_etcd()
    sent, received = ping_stats(out)
    print("etcd outage: %d of %d pings lost" % (sent - received, sent))
    assert sent == 150 and sent - received <= 2, out
    for node in watched:
        assert c.flanneld[node.role].poll() is None, "%s's flanneld died in the outage" % node.role
        log = read(c.flanneld_log(node), offsets[node.role])
        assert "failed to renew the lease" in log and "etcd watch interrupted" in log, log
    back = {n.role: log_size(c, n) for n in watched}

    took = wait_until(lambda: all("lease renewed" in read(c.flanneld_log(n), back[n.role]) for n in watched),
                      15, "every daemon to renew its lease after the outage")
    print("etcd back: every lease renewed after %.2fs" % took)
    for node in watched:
        log = read(c.flanneld_log(node), offsets[node.role])
        assert "had gone from etcd" not in log and "lost its etcd lease" not in log, log

    new = c.add_node("node%d" % (len(c.nodes) + 1))
    wait_until(lambda: os.path.exists(c.subnet_file(new)), TIMEOUT, "the new node's subnet.env")
    subnet = node_subnet(c, new)
    took = wait_until(lambda: all(subnet in our_routes(n) for n in watched), 15,
                      "the existing nodes to learn the new node")
    print("etcd back: new node learned after %.2fs more" % took)
    pod = c.add_pod(new, new.role + "-1")
    assert ping_many({(pod.name, p.name): (pod.ns, p.ip) for p in (a, b)}) == {}


# ---- bad input and health ------------------------------------------------------------------------

VALID = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
BAD_CONFIGS = {     # case -> (config text, what the log must say)
    "cidr": (json.dumps({"Network": "10.244.0.0/33", "Backend": {"Type": "vxlan"}}),
             "Network '10.244.0.0/33' is not a valid CIDR"),
    "sublen": (json.dumps({"Network": "10.244.0.0/16", "SubnetLen": 12, "Backend": {"Type": "vxlan"}}),
               "SubnetLen 12 must be longer than the Network's /16"),
    "backend": (json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}),
                "unknown backend type 'wireguard'"),
    "json": ('{"Network": "10.244.0.0/16",', "network config is not valid JSON"),
}


def untouched(node, c):
    """What a daemon that has applied nothing leaves: a list of what it did touch."""
    touched = []
    if node.link_names() - {"lo", "eth0"}:
        touched.append("links %s" % sorted(node.link_names() - {"lo", "eth0"}))
    if os.path.exists(c.subnet_file(node)):
        touched.append("subnet.env")
    routes = node.ip_json("-4", "route", "show", "table", "all")
    extra = [r for r in routes if r.get("dev") not in ("eth0", "lo")]
    if extra or our_routes(node):
        touched.append("routes %s" % extra)
    if "FLANNEL" in node.run(["iptables-save"]).stdout:
        touched.append("iptables")
    return touched


def test_bad_network_config_is_refused_until_a_valid_one_appears(bare):
    """Four daemons at once, each under its own etcd prefix holding a bad config:
    each logs what is wrong (twice: it retries), creates no device, writes no
    subnet.env or lease, adds no route or iptables chain, and /readyz says 503.
    A valid config under the same prefix is then picked up without a restart."""
    c = bare
    nodes = {}
    for case, (text, _) in BAD_CONFIGS.items():
        prefix = "/podnet-test/%s" % case
        c.etcdctl("put", prefix + "/config", text)
        nodes[case] = c.add_node("bad-" + case, extra=["--etcd-prefix", prefix, "--healthz-port", HEALTHZ_PORT])

    def refused_twice(case):
        return read(c.flanneld_log(nodes[case])).count("invalid network config at /podnet-test/%s/config: %s"
                                                       % (case, BAD_CONFIGS[case][1])) >= 2
    wait_until(lambda: all(refused_twice(case) for case in BAD_CONFIGS), TIMEOUT,
               "every daemon to refuse its config twice")
    for case, node in nodes.items():
        assert c.flanneld[node.role].poll() is None, case
        assert untouched(node, c) == [], case
        assert healthz(node, "/readyz") == "503", case
        assert c.etcdctl("get", "--prefix", "--keys-only", "/podnet-test/%s/subnets/" % case).stdout.strip() == ""
        assert "Traceback" not in read(c.flanneld_log(node)), case

    for case in BAD_CONFIGS:
        c.etcdctl("put", "/podnet-test/%s/config" % case, json.dumps(VALID))
    took = wait_until(lambda: all(healthz(n, "/readyz") == "200" for n in nodes.values()), TIMEOUT,
                      "every daemon to pick up the valid config")
    print("valid config picked up after %.2fs" % took)
    for case, node in nodes.items():
        assert os.path.exists(c.subnet_file(node)) and "flannel.1" in node.link_names(), case
        assert "FLANNEL-POSTRTG" in node.run(["iptables-save"]).stdout, case
        keys = c.etcdctl("get", "--prefix", "--keys-only", "/podnet-test/%s/subnets/" % case).stdout.split()
        assert len(keys) == 1, (case, keys)


def _config(backend=None, **fields):
    raw = {"Network": "10.244.0.0/16"}
    raw.update(fields)
    raw["Backend"] = backend if backend is not None else {"Type": "vxlan"}
    return json.dumps(raw)


# 30 different ways to be wrong, each with what the log must say about it.
THIRTY_BAD = [
    ('{"Network": "10.244.0.0/16",', "network config is not valid JSON"),
    ("[1, 2]", "network config must be a JSON object"),
    ("null", "network config must be a JSON object"),
    ('{"Backend": {"Type": "vxlan"}}', "network config has no Network"),
    (_config(Network="10.244.0.0/33"), "Network '10.244.0.0/33' is not a valid CIDR"),
    (_config(Network="bogus"), "Network 'bogus' is not a valid CIDR"),
    (_config(Network=10), "Network 10 is not a valid CIDR"),
    (_config(Network="fd00::/48"), "Network must be IPv4"),
    (_config(SubnetLen=12), "SubnetLen 12 must be longer than the Network's /16"),
    (_config(SubnetLen=31), "SubnetLen 31 must be longer than the Network's /16 and at most 30"),
    (_config(SubnetLen="24"), "SubnetLen must be a number, not '24'"),
    (_config(SubnetLen=True), "SubnetLen must be a number, not True"),
    (_config(SubnetMin="10.244.1.5"), "SubnetMin 10.244.1.5 is not the start of a /24 inside 10.244.0.0/16"),
    (_config(SubnetMax="10.245.0.0"), "SubnetMax 10.245.0.0 is not the start of a /24 inside 10.244.0.0/16"),
    (_config(SubnetMin="nonsense"), "SubnetMin 'nonsense' is not an IPv4 address"),
    (_config(SubnetMin="10.244.9.0", SubnetMax="10.244.3.0"), "SubnetMin is after SubnetMax"),
    (_config({"Type": "wireguard"}), "unknown backend type 'wireguard'"),
    (_config({"Type": 5}), "unknown backend type 5"),
    (_config("vxlan"), "Backend must be an object"),
    (_config({"Type": "vxlan", "VNI": "x"}), "vxlan VNI must be a whole number from 0 to 9999999, not 'x'"),
    (_config({"Type": "vxlan", "VNI": -1}), "vxlan VNI must be a whole number from 0 to 9999999, not -1"),
    (_config({"Type": "vxlan", "VNI": 10 ** 7}), "vxlan VNI must be a whole number from 0 to 9999999, not 10000000"),
    (_config({"Type": "vxlan", "VNI": 1.5}), "vxlan VNI must be a whole number from 0 to 9999999, not 1.5"),
    (_config({"Type": "vxlan", "VNI": True}), "vxlan VNI must be a whole number from 0 to 9999999, not True"),
    (_config({"Type": "vxlan", "Port": 70000}), "vxlan Port must be a whole number from 0 to 65535"),
    (_config({"Type": "vxlan", "Port": -1}), "vxlan Port must be a whole number from 0 to 65535"),
    (_config({"Type": "vxlan", "Port": "8472"}), "vxlan Port must be a whole number from 0 to 65535"),
    (_config({"Type": "vxlan", "Learning": "yes"}), "vxlan Learning must be true or false, not 'yes'"),
    (_config({"Type": "udp", "Port": "x"}), "udp Port must be a whole number from 1 to 65535, not 'x'"),
    (_config({"Type": "udp", "Port": 70000}), "udp Port must be a whole number from 1 to 65535, not 70000"),
]


def test_thirty_bad_network_configs_in_a_row_then_a_good_one(bare):
    """30 bad network configs in a row, then a good one: the daemon never exits
    (each is refused with its reason, nothing is configured from it) and takes
    the good one. With --config-retry-max 0.2 it reads the config every 0.2 s."""
    assert len({text for text, _ in THIRTY_BAD}) == 30
    c = bare
    prefix = "/podnet-test/thirty"
    c.etcdctl("put", prefix + "/config", THIRTY_BAD[0][0])
    node = c.add_node("thirty", extra=["--etcd-prefix", prefix, "--config-retry-max", "0.2",
                                       "--healthz-port", HEALTHZ_PORT])
    proc = c.flanneld[node.role]
    log = c.flanneld_log(node)
    started = time.monotonic()
    for i, (text, why) in enumerate(THIRTY_BAD):
        offset = os.path.getsize(log)
        if i:
            c.etcdctl("put", prefix + "/config", text)
        refused = "invalid network config at %s/config: %s" % (prefix, why)
        wait_until(lambda refused=refused, offset=offset: proc.poll() is not None or refused in read(log, offset),
                   TIMEOUT, "bad config %d (%s) to be refused" % (i, why))
        assert proc.poll() is None, "flanneld exited (%s) on bad config %d %s:\n%s" % (
            proc.returncode, i, text, read(log)[-3000:])
    print("30 bad configs refused in %.1fs" % (time.monotonic() - started))
    assert untouched(node, c) == [] and healthz(node, "/readyz") == "503"
    assert c.etcdctl("get", "--prefix", "--keys-only", prefix + "/subnets/").stdout.strip() == ""

    c.etcdctl("put", prefix + "/config", json.dumps({"Network": "10.244.0.0/16",
                                                     "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}))
    wait_until(lambda: healthz(node, "/readyz") == "200", TIMEOUT, "the daemon to take the good config")
    assert proc.poll() is None
    keys = c.etcdctl("get", "--prefix", "--keys-only", prefix + "/subnets/").stdout.split()
    assert len(keys) == 1 and os.path.exists(c.subnet_file(node)) and "flannel.1" in node.link_names()
    assert "Traceback" not in read(log)
    c.stop_flanneld(node)


def proc_status(pid, field):
    """A /proc/PID/status figure in kB (VmHWM: peak resident set; VmSize: address space)."""
    for line in read("/proc/%d/status" % pid).splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


RSS_LIMIT_MB = 60
GUARD_AS = 2 << 30      # address space a regression may take before MemoryError (the machine is shared)


def test_the_whole_ipv4_space_in_slash_30s_leases_in_little_memory(bare):
    """{"Network": "0.0.0.0/0", "SubnetLen": 30} (2^30 subnets, the udp backend by
    default): choosing a subnet used to list them all (3 GB, then MemoryError and
    "failed to acquire a lease: "). Now the daemon leases the first free /30 after
    the network address, and its peak RSS stays under RSS_LIMIT_MB.

    The daemon's address space is capped at GUARD_AS (set on its PID while it still
    waits for a config) so that a regression fails here, not on the machine."""
    import resource
    c = bare
    prefix = "/podnet-test/everything"
    node = c.add_node("everything", extra=["--etcd-prefix", prefix, "--config-retry-max", "0.2"])
    proc = c.flanneld[node.role]
    log = c.flanneld_log(node)
    wait_until(lambda: "cannot read the network config" in read(log), TIMEOUT, "the daemon to wait for a config")
    assert "flanneld.daemon" in read("/proc/%d/cmdline" % proc.pid)       # `ip netns exec` exec()s in place
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (GUARD_AS, GUARD_AS))
    c.etcdctl("put", prefix + "/config", '{"Network":"0.0.0.0/0","SubnetLen":30}')
    wait_until(lambda: proc.poll() is not None or os.path.exists(c.subnet_file(node)), TIMEOUT,
               "a lease in 0.0.0.0/0", interval=0.1)
    assert proc.poll() is None, read(log)[-3000:]
    env = read(c.subnet_file(node))
    assert "FLANNEL_NETWORK=0.0.0.0/0\n" in env
    subnet = ipaddress.ip_network(node_subnet(c, node))
    assert subnet.prefixlen == 30 and subnet.network_address != ipaddress.ip_address("0.0.0.0"), subnet
    assert int(subnet.network_address) < 4 * 101          # flannel's: among the first 100 free
    keys = c.etcdctl("get", "--prefix", "--keys-only", prefix + "/subnets/").stdout.split()
    assert keys == [lease_key(str(subnet)).replace(PREFIX, prefix)]
    peak_mb = proc_status(proc.pid, "VmHWM") / 1024
    print("0.0.0.0/0 in /30s: leased %s, flanneld peak RSS %.1f MB (VmSize %.0f MB)"
          % (subnet, peak_mb, proc_status(proc.pid, "VmSize") / 1024))
    assert peak_mb < RSS_LIMIT_MB
    assert "MemoryError" not in read(log) and "Traceback" not in read(log), read(log)[-4000:]
    # The iptables rules went in (iptables-nft refuses `! -s 0.0.0.0/0`) as iptables-save
    # spells them: applying them again changes nothing.
    assert "FLANNEL-POSTRTG" in node.run(["iptables-save", "-t", "nat"]).stdout
    again = node.run([c.python, "-c", "from flanneld import ipmasq; from podnet.net.ip import parse_cidr; "
                      "print(ipmasq.apply(parse_cidr('0.0.0.0/0'), parse_cidr('%s')))" % subnet],
                     env=dict(os.environ, PYTHONPATH=SOURCE_ROOT))
    assert again.stdout.strip() == "[]"
    c.stop_flanneld(node)


def test_healthz(bare):
    """--healthz-port: 200 from GET /readyz once ready and from /healthz (liveness), on
    loopback and the node's address, 404 for a path it does not serve; nothing listens once
    the daemon has stopped."""
    c = bare
    node = c.add_node("hz", extra=["--healthz-port", HEALTHZ_PORT])
    wait_until(lambda: os.path.exists(c.subnet_file(node)), TIMEOUT, "the daemon to be ready")
    wait_until(lambda: healthz(node, "/readyz") == "200", 5, "/readyz to say 200")
    assert healthz(node, host=node.underlay_ip) == "200"
    r = node.run(["curl", "-s", "--max-time", "3", "http://127.0.0.1:%d/healthz" % HEALTHZ_PORT])
    assert r.stdout == "flanneld is running\n"
    assert healthz(node, "/nope") == "404"
    c.stop_flanneld(node)
    assert healthz(node) == "000"
