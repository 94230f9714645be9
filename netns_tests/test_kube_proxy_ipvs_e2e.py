"""kube_proxy in IPVS mode, end to end.

On this machine's kernel (no ip_vs, no dummy): the rules and sets the mode renders
round-trip through the real iptables-restore/-save and ipset, its cleanup leaves the
iptables mode alone, and `podnet kube-proxy --proxy-mode ipvs` stops with one clear
line.

In the full-kernel lane (`fullkernel`, Debian's kernel under emulation, where
every process start costs seconds): a light two-node cluster, built in-process
over netlink (no etcd, no flanneld): an underlay switch, two nodes with a `cni0`
bridge each and static routes to each other's pod subnet, two pods per node
serving a one-line answer from threads of this process, and an outside client on
the underlay. Each node's IpvsProxier runs in this process too (inside the
node's namespace), fed by a ChangeTracker, so the same Service behaviours as the
iptables tests are checked against the real IPVS datapath: ClusterIP spread,
NodePort from outside on both nodes, external and LB IPs with the Local policy,
ClientIP affinity, hairpin, no endpoints refused, graceful endpoint removal, and
switching modes leaving nothing behind.
"""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from kube_proxy import ipvs as kipvs
from kube_proxy import server
from kube_proxy.iptables import IptablesProxier
from kube_proxy.proxier import Config
from kube_proxy.server import MODES, make_proxier
from kube_proxy.tracker import ChangeTracker
from lab import manifests as k8s
from lab.cluster import Lab
from podnet.net.ip import AF_INET, IP, IPNet, parse_ip
from podnet.net.netlink import Netlink
from podnet.net.netns import entered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIDR = "10.244.0.0/16"
HTTP = {"name": "http", "port": 80, "targetPort": 8080}
HTTP_EP = {"name": "http", "port": 8080}
EXTERNAL_IP, LB_IP, FW_LB_IP = "172.30.0.10", "172.30.0.20", "172.30.0.30"
CLIENT_IP = "192.168.50.100"
ALL = ("node1-a", "node1-b", "node2-a", "node2-b")


def iptables_lines(ns, table):
    return [line for line in ns.run(["iptables-save", "-t", table]).stdout.splitlines()
            if line.startswith(("-A", ":")) and "KUBE" in line]


# ---- on this kernel -------------------------------------------------------------------------------------

def test_rules_and_sets_round_trip_through_the_real_tools(lab):
    """What render_rules() and the set members say is exactly what iptables-save and
    `ipset save` print back (the proxier compares the two to find drift)."""
    ns = lab.namespace("node")
    sets = {name: set() for name in kipvs.SETS}
    samples = {"hash:ip,port": "10.96.0.10,tcp:80", "hash:ip,port,ip": "10.244.1.2,tcp:8080,10.244.1.2",
               "hash:ip,port,net": "172.30.0.20,tcp:80,10.0.0.0/8", "bitmap:port": "30080", "hash:ip": "10.96.0.10"}
    for name, (kind, _) in kipvs.SETS.items():
        sets[name].add(samples[kind])
    sets[kipvs.LB_SOURCE_CIDR].add("172.30.0.20,udp:53,1.2.3.4")
    ns.run(["ipset", "restore", "-exist"], input=kipvs.ipset_restore_input(sets, {}))
    assert kipvs.parse_ipset_save(ns.run(["ipset", "save"]).stdout) == sets

    config = Config(cluster_cidr=(CIDR,), node_ip="192.168.50.1")
    for cfg in (config, Config(masquerade_all=True), Config()):
        rules = kipvs.render_rules(frozenset(kipvs.SETS), cfg)      # (the ipvs match needs ip_vs: lane)
        saved = {t: ns.run(["iptables-save", "-t", t]).stdout for t in ("filter", "nat")}
        ns.run(["iptables-restore", "--noflush"], input=kipvs.jumps_input(saved) + kipvs.rules_restore_input(rules))
        saved = {t: ns.run(["iptables-save", "-t", t]).stdout for t in ("filter", "nat")}
        assert {t: kipvs.parse_saved(saved[t], t) for t in saved} == rules
        assert kipvs.jumps_input(saved) == ""
    for text in kipvs.cleanup_input(saved):
        ns.run(["iptables-restore", "--noflush"], input=text)
    assert not any(iptables_lines(ns, t) for t in ("filter", "nat"))


def test_ipvs_cleanup_leaves_a_running_iptables_mode_alone(lab):
    """A restart of the iptables mode runs the other modes' cleanup: ours must not touch it."""
    ns = lab.namespace("node")
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    t.replace("Service", [k8s.service("web", "10.96.0.10", [dict(HTTP, nodePort=30080)], type="NodePort")])
    t.replace("EndpointSlice", [k8s.endpoint_slice("web", [("10.244.1.2", "node1")], [HTTP_EP])])
    config = Config(cluster_cidr=(CIDR,))
    with entered(ns.path):
        p = IptablesProxier(config)
        p.setup()
        p.sync(t.take())
    before = {tb: iptables_lines(ns, tb) for tb in ("filter", "nat")}
    with entered(ns.path):
        kipvs.IpvsProxier(config, graceful_interval=None).cleanup()
    assert {tb: iptables_lines(ns, tb) for tb in ("filter", "nat")} == before


def test_kube_proxy_in_ipvs_mode_on_a_kernel_without_ipvs_says_so(lab, tmp_path):
    if os.path.exists("/proc/net/ip_vs"):
        pytest.skip("this kernel has IPVS")
    ns = lab.namespace("node")
    out = ns.run([sys.executable, "-m", "cli.main", "kube-proxy", "--proxy-mode", "ipvs", "--manifests",
                  str(tmp_path), "--metrics-bind-address", "", "--healthz-bind-address", ""], check=False,
                 env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert out.returncode == 1, out
    last = out.stderr.strip().splitlines()[-1]
    assert last == ("podnet kube-proxy: --proxy-mode ipvs: this kernel has no IPVS (ip_vs): the generic netlink "
                    "family 'IPVS' does not exist (load the ip_vs module)"), out.stderr
    assert "Traceback" not in out.stderr


# ---- the full-kernel lane: a light two-node cluster -------------------------------------------------------------

class EchoServer:
    """One pod's server, a thread of this process listening inside the pod's namespace.

    "GET\\n" is answered with "NAME CLIENT_IP:PORT\\n" and the connection closed;
    "HOLD\\n" is answered the same way, then every further line too, until the
    client closes (a long-lived connection)."""

    def __init__(self, name, ns, port=8080):
        self.name = name
        with entered(ns.path):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", port))
        self.sock.listen(256)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn, peer):
        answer = ("%s %s:%d\n" % (self.name, peer[0], peer[1])).encode()
        try:
            with conn:
                f = conn.makefile("rb")
                first = f.readline()
                conn.sendall(answer)
                if first.startswith(b"HOLD"):
                    for _ in f:
                        conn.sendall(answer)
        except OSError:
            pass


def get(ns, ip, port, count=1, timeout=2.0):
    """`count` requests, each on a new connection, from namespace `ns`:
    {"answers": {name: n}, "sources": {ip: n}, "errors": {reason: n}, "seconds": s}."""
    answers, sources, errors = {}, {}, {}
    started = time.monotonic()
    with entered(ns.path):
        for _ in range(count):
            try:
                with socket.create_connection((ip, port), timeout=timeout) as s:
                    s.sendall(b"GET\n")
                    name, source = s.makefile("rb").readline().decode().split()
                answers[name] = answers.get(name, 0) + 1
                src = source.rsplit(":", 1)[0]
                sources[src] = sources.get(src, 0) + 1
            except (OSError, ValueError) as e:
                reason = {ConnectionRefusedError: "Connection refused", socket.timeout: "timed out"}.get(
                    type(e), str(e))
                errors[reason] = errors.get(reason, 0) + 1
    return {"answers": answers, "sources": sources, "errors": errors, "seconds": time.monotonic() - started}


class Held:
    """A long-lived connection ("HOLD") from `ns`; ask() sends a line and returns the answer."""

    def __init__(self, ns, ip, port):
        with entered(ns.path):
            self.sock = socket.create_connection((ip, port), timeout=5)
        self.file = self.sock.makefile("rb")
        self.name = self.ask(b"HOLD\n")

    def ask(self, line=b"again\n"):
        self.sock.sendall(line)
        return self.file.readline().decode().split()[0]

    def close(self):
        self.file.close()
        self.sock.close()


class Node:
    """One node's kube-proxy (any mode), run in this process inside the node's namespace."""

    def __init__(self, ns, config):
        self.ns, self.config = ns, config
        self.tracker = self.proxier = None

    def start(self, mode, objects, clean=True, **kw):
        """What `podnet kube-proxy --proxy-mode MODE` does on start: clean up after the
        other modes (clean=False: a fresh node has nothing to clean), set up, one full sync."""
        self.tracker = ChangeTracker(hostname=self.ns.role, min_sync_period=0)
        self.tracker.replace("Service", [o for o in objects if o["kind"] == "Service"])
        self.tracker.replace("EndpointSlice", [o for o in objects if o["kind"] == "EndpointSlice"])
        with entered(self.ns.path):
            if clean and hasattr(server, "cleanup_other_modes"):
                server.cleanup_other_modes(mode, self.config)
            elif clean:
                # the same by hand; IPVS first: the iptables mode's cleanup (unless it knows the
                # chains the IPVS mode shares with it) fails while the IPVS mode's rules are there
                for other in sorted(MODES, key=lambda m: m != "ipvs"):
                    if other != mode:
                        make_proxier(other, self.config).cleanup()
            if mode == "ipvs":
                kw.setdefault("graceful_interval", None)
                self.proxier = kipvs.IpvsProxier(self.config, **kw)
            else:
                self.proxier = make_proxier(mode, self.config)
            self.proxier.setup()
        return self.sync()

    def sync(self, full=False):
        if full:
            self.tracker.request_full_sync()
        with entered(self.ns.path):
            return self.proxier.sync(self.tracker.take())

    def reap(self):
        with entered(self.ns.path):
            return self.proxier.reap_terminating()

    def ipvs_table(self):
        """{(proto, vip, port): {(ip, port): (forward, weight, active, inactive)}} as `ipvsadm -Ln` says."""
        out = self.ns.run(["ipvsadm", "-Ln"]).stdout
        table, current = {}, None
        for line in out.splitlines():
            m = re.match(r"^(TCP|UDP|SCTP)\s+(\S+):(\d+)\s+(\S+)(.*)$", line)
            if m:
                current = table.setdefault((m.group(1), m.group(2), int(m.group(3))), {})
                continue
            m = re.match(r"^\s+->\s+(\S+):(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)", line)
            if m and current is not None:
                current[(m.group(1), int(m.group(2)))] = (m.group(3), int(m.group(4)), int(m.group(5)),
                                                          int(m.group(6)))
        return table


class Cluster:
    """Everything but the namespaces themselves is made over netlink from this process
    (each `ip` command would cost about a second under emulation)."""

    def __init__(self, lab):
        self.lab = lab
        self.pods, self.servers = {}, []
        self.switch = lab.namespace("underlay", loopback=False)
        with Netlink(netns=self.switch.path) as nl:
            nl.add_bridge("br0")
            nl.set_link(nl.link("br0").index, up=True)
        self.nodes = {}
        for i in (1, 2):
            ns = lab.namespace("node%d" % i, loopback=False)
            ns.underlay_ip = "192.168.50.%d" % i
            self._attach(ns, ns.underlay_ip)
            with entered(ns.path):
                from podnet.net import sysctl
                sysctl.write("net/ipv4/ip_forward", 1)
            self.nodes[ns.role] = Node(ns, Config(cluster_cidr=(CIDR,), node_ip=ns.underlay_ip))
        self.client = lab.namespace("outside", loopback=False)
        self._attach(self.client, CLIENT_IP)
        for i, node in ((1, self.nodes["node1"].ns), (2, self.nodes["node2"].ns)):
            self._wire_node(node, i)
            for j, suffix in ((2, "a"), (3, "b")):
                self._add_pod(node, "%s-%s" % (node.role, suffix), "10.244.%d.%d" % (i, j), "10.244.%d.1" % i)
        with Netlink(netns=self.client.path) as nl:
            eth0 = nl.link("eth0")
            # the outside world routes the external IPs to node1 and the LB IP to node2
            for ip, via in ((EXTERNAL_IP, "192.168.50.1"), (FW_LB_IP, "192.168.50.1"), (LB_IP, "192.168.50.2")):
                nl.add_route(IPNet(parse_ip(ip), 32), gateway=parse_ip(via), oif=eth0.index)

    def _attach(self, ns, ip):
        """`ns` on the underlay switch as eth0 with `ip`/24 (lo up too)."""
        port = "ve-" + ns.role
        fd = os.open(ns.path, os.O_RDONLY)
        try:
            with Netlink(netns=self.switch.path) as nl:
                nl.add_veth(port, "eth0", peer_netns_fd=fd)
                nl.set_link(nl.link(port).index, master=nl.link("br0").index, up=True)
        finally:
            os.close(fd)
        with Netlink(netns=ns.path) as nl:
            eth0 = nl.link("eth0")
            nl.add_addr(eth0.index, IPNet(parse_ip(ip), 24))
            nl.set_link(eth0.index, up=True)
            nl.set_link(nl.link("lo").index, up=True)

    def _wire_node(self, node, i):
        other = 3 - i
        with Netlink(netns=node.path) as nl:
            eth0 = nl.link("eth0")
            # a default route, as a real node has: a Service IP not taken by IPVS must not die in routing
            nl.add_route(IPNet(IP(AF_INET, 0), 0), oif=eth0.index)
            nl.add_route(IPNet(parse_ip("10.244.%d.0" % other), 24), gateway=parse_ip("192.168.50.%d" % other),
                         oif=eth0.index)
            nl.add_bridge("cni0")
            br = nl.link("cni0")
            nl.add_addr(br.index, IPNet(parse_ip("10.244.%d.1" % i), 24))
            nl.set_link(br.index, up=True)
        with entered(node.path):
            from podnet.net import sysctl
            sysctl.write("net/bridge/bridge-nf-call-iptables", 1)

    def _add_pod(self, node, name, ip, gateway):
        ns = self.lab.namespace("pod-" + name, loopback=False)       # (nothing here needs lo)
        fd = os.open(ns.path, os.O_RDONLY)
        try:
            with Netlink(netns=node.path) as nl:
                host = "v" + name.replace("-", "")
                nl.add_veth(host, "eth0", peer_netns_fd=fd)
                link = nl.link(host)
                nl.set_link(link.index, master=nl.link("cni0").index, up=True)
                # as kubelet / the bridge plugin's hairpinMode do: with br_netfilter, a pod's packet
                # to a Service it serves itself goes back out the port it came in by
                nl.set_bridge_port(link.index, hairpin=True)
        finally:
            os.close(fd)
        with Netlink(netns=ns.path) as nl:
            eth0 = nl.link("eth0")
            nl.add_addr(eth0.index, IPNet(parse_ip(ip), 24))
            nl.set_link(eth0.index, up=True)
            nl.add_route(IPNet(IP(AF_INET, 0), 0), gateway=parse_ip(gateway), oif=eth0.index)
        ns.ip_addr = ip
        self.pods[name] = ns
        self.servers.append(EchoServer(name, ns))

    def ip(self, name):
        return self.pods[name].ip_addr

    def endpoints(self, *names):
        return [(self.ip(n), n.rsplit("-", 1)[0]) for n in names]

    def objects(self):
        eps = self.endpoints(*ALL)
        return [
            k8s.service("web", "10.96.0.10", [dict(HTTP, nodePort=30080)], type="NodePort",
                        external_ips=[EXTERNAL_IP]),
            k8s.endpoint_slice("web", eps, [HTTP_EP]),
            k8s.service("web-local", "10.96.0.11", [dict(HTTP, nodePort=30081)], type="LoadBalancer",
                        load_balancer_ips=[LB_IP], external_traffic_policy="Local", health_check_node_port=30200),
            k8s.endpoint_slice("web-local", eps, [HTTP_EP]),
            k8s.service("sticky", "10.96.0.12", [HTTP], session_affinity_timeout=60),
            k8s.endpoint_slice("sticky", eps, [HTTP_EP]),
            k8s.service("empty", "10.96.0.13", [HTTP]),
            k8s.service("self", "10.96.0.14", [HTTP]),
            k8s.endpoint_slice("self", self.endpoints("node1-a"), [HTTP_EP]),
            k8s.service("drain", "10.96.0.16", [HTTP]),
            k8s.endpoint_slice("drain", self.endpoints("node2-a", "node2-b"), [HTTP_EP]),
            # an LB whose source ranges leave the nodes out: the node itself may not use it
            k8s.service("fw", "10.96.0.17", [HTTP], type="LoadBalancer", load_balancer_ips=[FW_LB_IP],
                        source_ranges=["192.168.50.96/28"]),
            k8s.endpoint_slice("fw", self.endpoints("node2-a"), [HTTP_EP]),
        ]


@pytest.fixture(scope="module")
def cluster(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    if not os.path.exists("/proc/net/ip_vs"):
        pytest.skip("this kernel has no IPVS (ip_vs)")
    if not os.path.exists("/proc/sys/net/bridge"):
        subprocess.run(["modprobe", "br_netfilter"], check=False)
    with Lab() as lab:
        c = Cluster(lab)
        for node in c.nodes.values():
            node.start("ipvs", c.objects(), clean=False, grace_period=2.0)
        yield c


@pytest.mark.fullkernel
def test_the_kernel_holds_kube_proxys_ipvs_layout(cluster):
    node = cluster.nodes["node1"]
    ns = node.ns
    link = ns.ip_json("-d", "link", "show", kipvs.DUMMY)[0]
    assert link["linkinfo"]["info_kind"] == "dummy" and "UP" not in link["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in ns.ip_json("addr", "show", "dev", kipvs.DUMMY)[0]["addr_info"]}
    assert addrs == {(ip, 32) for ip in ("10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13", "10.96.0.14",
                                         "10.96.0.16", "10.96.0.17", EXTERNAL_IP, LB_IP, FW_LB_IP)}
    assert ns.ip_json("route", "show", "dev", kipvs.DUMMY) == []                   # no prefix route
    table = node.ipvs_table()                                                      # ipvsadm's view
    web = {(cluster.ip(n), 8080): ("Masq", 1, 0, 0) for n in ALL}
    for key in (("TCP", "10.96.0.10", 80), ("TCP", EXTERNAL_IP, 80), ("TCP", "192.168.50.1", 30080)):
        assert {d: v[:2] for d, v in table[key].items()} == {d: v[:2] for d, v in web.items()}, (key, table)
    assert set(table[("TCP", "192.168.50.1", 30081)]) == {(cluster.ip("node1-a"), 8080),
                                                          (cluster.ip("node1-b"), 8080)}
    assert table[("TCP", "10.96.0.13", 80)] == {}
    sticky = ns.run(["ipvsadm", "-Ln", "-t", "10.96.0.12:80"]).stdout
    assert re.search(r"TCP\s+10\.96\.0\.12:80 rr persistent 60", sticky), sticky
    # our netlink client reads the same table
    with entered(ns.path):
        from podnet.net.ipvs import Ipvs
        with Ipvs() as client:
            ours = {key: {d: (dest.weight,) for d, dest in dests.items()} for key, (_, dests) in client.table().items()}
    assert ours == {key: {d: (v[1],) for d, v in dests.items()} for key, dests in table.items()}
    saved = ns.run(["ipset", "save"]).stdout
    assert "add KUBE-CLUSTER-IP 10.96.0.10,tcp:80" in saved and "add KUBE-NO-ENDPOINTS 10.96.0.13,tcp:80" in saved
    assert "add KUBE-NODE-PORT-LOCAL-TCP 30081" in saved
    assert "add KUBE-LOOP-BACK %s,tcp:8080,%s" % (cluster.ip("node1-a"), cluster.ip("node1-a")) in saved
    # iptables-save prints exactly what was rendered (the ipvs match of the LB firewall included)
    rules = node.proxier.applied.rules
    assert any("-m ipvs" in r for r in rules["filter"]["KUBE-IPVS-OUT-FILTER"])
    for t in ("filter", "nat"):
        assert kipvs.parse_saved(ns.run(["iptables-save", "-t", t]).stdout, t) == rules[t]
    # a rerun changes nothing
    assert node.sync(full=True).chains_written == 0


@pytest.mark.fullkernel
def test_cluster_ip_spreads_over_endpoints_on_both_nodes(cluster):
    for client in ("node1-a", "node2-a"):
        out = get(cluster.pods[client], "10.96.0.10", 80, count=40)
        assert out["errors"] == {} and set(out["answers"]) == set(ALL), out
        assert min(out["answers"].values()) >= 8, out                  # rr: 10 each
        # from a pod the source is kept, except when the pod reached itself (hairpin: masqueraded)
        assert out["sources"].get(cluster.ip(client)) == 40 - out["answers"][client], out


@pytest.mark.fullkernel
def test_nodeport_from_outside_on_both_nodes(cluster):
    for node in ("192.168.50.1", "192.168.50.2"):
        out = get(cluster.client, node, 30080, count=20)
        assert out["errors"] == {} and set(out["answers"]) == set(ALL), out
        assert CLIENT_IP not in out["sources"], out                    # Cluster policy: masqueraded


@pytest.mark.fullkernel
def test_external_ip_and_the_local_policy(cluster):
    out = get(cluster.client, EXTERNAL_IP, 80, count=12)
    assert out["errors"] == {} and set(out["answers"]) == set(ALL), out
    for node, role in (("192.168.50.1", "node1"), ("192.168.50.2", "node2")):
        out = get(cluster.client, node, 30081, count=10)
        assert out["errors"] == {} and set(out["answers"]) == {role + "-a", role + "-b"}, out
        assert set(out["sources"]) == {CLIENT_IP}, out                  # Local: the source is kept
    out = get(cluster.client, LB_IP, 80, count=10)                     # routed to node2
    assert out["errors"] == {} and set(out["answers"]) == {"node2-a", "node2-b"}, out
    assert set(out["sources"]) == {CLIENT_IP}, out
    out = get(cluster.client, FW_LB_IP, 80, count=3)                   # the client is in its source range
    assert out["errors"] == {} and out["answers"] == {"node2-a": 3}, out


@pytest.mark.fullkernel
def test_client_ip_affinity_and_hairpin(cluster):
    for client in ("node1-b", "node2-a"):
        out = get(cluster.pods[client], "10.96.0.12", 80, count=10)
        assert out["errors"] == {} and len(out["answers"]) == 1, out
    out = get(cluster.pods["node1-a"], "10.96.0.14", 80, count=5)
    assert out["errors"] == {} and out["answers"] == {"node1-a": 5}, out
    assert cluster.ip("node1-a") not in out["sources"], out            # masqueraded (KUBE-LOOP-BACK)


@pytest.mark.fullkernel
def test_service_without_endpoints_is_refused_at_once(cluster):
    out = get(cluster.pods["node2-b"], "10.96.0.13", 80, count=3)
    assert out["answers"] == {} and out["errors"] == {"Connection refused": 3}, out
    assert out["seconds"] < 2.0, out
    # another port of a Service IP is refused too (KUBE-IPVS-FILTER), not answered by the node
    out = get(cluster.pods["node2-b"], "10.96.0.10", 22, count=1)
    assert out["errors"] == {"Connection refused": 1}, out


@pytest.mark.fullkernel
def test_removed_endpoint_is_drained_then_deleted(cluster):
    """node2-b leaves Service "drain": after the next sync no new connection reaches it, a
    connection it holds keeps working (weight 0, not deleted), and once the grace period
    is over it is deleted."""
    node1 = cluster.nodes["node1"]
    pod = cluster.pods["node1-a"]
    held = [Held(pod, "10.96.0.16", 80) for _ in range(2)]             # rr: one on each endpoint
    assert sorted(h.name for h in held) == ["node2-a", "node2-b"], [h.name for h in held]
    gone = next(h for h in held if h.name == "node2-b")
    dest = (cluster.ip("node2-b"), 8080)
    for node in cluster.nodes.values():
        node.tracker.update_slice(k8s.endpoint_slice("drain", cluster.endpoints("node2-a"), [HTTP_EP]))
        assert not node.sync().full
    vs = node1.ipvs_table()[("TCP", "10.96.0.16", 80)]
    assert vs[dest][1] == 0 and vs[dest][2] == 1, vs                  # weight 0, one active connection
    out = get(pod, "10.96.0.16", 80, count=10)
    assert out["errors"] == {} and out["answers"] == {"node2-a": 10}, out
    assert gone.ask() == "node2-b"                                     # the held connection still works
    for h in held:
        h.close()
    time.sleep(2.2)
    assert node1.reap() == 1
    assert dest not in node1.ipvs_table()[("TCP", "10.96.0.16", 80)]
    # node2 (no connection from there) deleted it at once
    assert dest not in cluster.nodes["node2"].ipvs_table()[("TCP", "10.96.0.16", 80)]


def _leftovers(ns):
    """Everything any proxy mode may leave in a node (one process: each costs seconds here)."""
    out = ns.run("iptables-save -t filter; echo '#--'; iptables-save -t nat; echo '#--'; ipset list -n; "
                 "echo '#--'; ipvsadm -Sn; echo '#--'; ip -j link show; echo '#--'; nft -j list tables").stdout
    filt, nat, sets, ipvs, links, nft = out.split("#--\n")
    tables = [t["table"]["name"] for t in json.loads(nft)["nftables"] if "table" in t] if nft.strip() else []

    def kube(saved):
        return [line for line in saved.splitlines() if line.startswith(("-A", ":")) and "KUBE" in line]
    return {"iptables": {"filter": kube(filt), "nat": kube(nat)},
            "sets": sorted(n for n in sets.split() if n.startswith("KUBE-")),
            "ipvs": ipvs.splitlines(),
            "dummy": kipvs.DUMMY in {link["ifname"] for link in json.loads(links)},
            "nft": [t for t in tables if "kube" in t]}


IPVS_ONLY = ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER",
             "KUBE-SOURCE-RANGES-FIREWALL")
IPTABLES_ONLY = re.compile(r"KUBE-(NODEPORTS|EXTERNAL-SERVICES|SVC-|SVL-|SEP-|EXT-|FW-)")


@pytest.mark.fullkernel
def test_switching_modes_leaves_nothing_of_the_previous_one(cluster):
    """ipvs (the running mode) -> iptables -> ipvs -> nftables (when there is one) -> iptables,
    each start cleaning up after the other modes as `podnet kube-proxy` does: nothing of
    the previous mode stays, Services answer in each, and the last iptables state is the
    first one."""
    node = cluster.nodes["node1"]
    ns, pod = node.ns, cluster.pods["node1-a"]
    steps = ["iptables", "ipvs"] + (["nftables"] if "nftables" in MODES else []) + ["iptables"]
    first_iptables = None
    for mode in steps:
        node.start(mode, cluster.objects())
        left = _leftovers(ns)
        rules = "\n".join(left["iptables"]["filter"] + left["iptables"]["nat"])
        if mode != "ipvs":
            assert left["ipvs"] == [] and not left["dummy"] and left["sets"] == [], (mode, left)
            assert not any(re.search(r"\b%s\b" % c, rules) for c in IPVS_ONLY), (mode, rules)
            assert "--match-set" not in rules, (mode, rules)
        else:
            assert left["ipvs"] and left["dummy"] and kipvs.CLUSTER_IP in left["sets"], left
            assert not IPTABLES_ONLY.search(rules), rules
            want = node.proxier.applied.rules
            expect = {t: sorted([":%s - [0:0]" % c for c in want[t]] + [r for rs in want[t].values() for r in rs]
                                + ["-A %s %s" % (c, text) for tb, c, text in kipvs.JUMPS if tb == t])
                      for t in ("filter", "nat")}
            got = {t: sorted(re.sub(r" \[\d+:\d+\]", " [0:0]", line) for line in left["iptables"][t])
                   for t in ("filter", "nat")}
            assert got == expect                           # ours, and nothing else
        if mode != "nftables":
            assert not left["nft"], (mode, left)
        if mode == "nftables":
            assert not rules, rules
        if mode == "iptables":
            if first_iptables is None:
                first_iptables = left
            else:
                assert left == first_iptables
        out = get(pod, "10.96.0.10", 80, count=8)
        assert out["errors"] == {} and sum(out["answers"].values()) == 8, (mode, out)


@pytest.mark.fullkernel
def test_the_command_runs_in_ipvs_mode(cluster, tmp_path):
    """`podnet kube-proxy --proxy-mode ipvs` itself: a real process programs a fresh node."""
    ns = cluster.lab.namespace("node3")
    k8s.write(str(tmp_path), "web.json", k8s.service("web", "10.96.0.10", [HTTP]),
              k8s.endpoint_slice("web", [("10.244.1.2", "node1")], [HTTP_EP]))
    log = tmp_path / "kube-proxy.log"
    with open(log, "w") as f:
        proc = ns.popen([sys.executable, "-m", "cli.main", "kube-proxy", "--proxy-mode", "ipvs", "--manifests",
                         str(tmp_path), "--hostname-override", "node3", "--metrics-bind-address", "",
                         "--healthz-bind-address", ""], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.monotonic() + 120
    while " sync (" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    text = log.read_text()
    assert re.search(r"full sync \(first sync\)", text), text
    assert "10.96.0.10:80" in ns.run(["ipvsadm", "-Ln"]).stdout
    proc.terminate()
    proc.wait(30)
    ns.processes.remove(proc)
