"""flanneld's vxlan and host-gw backends and its ipmasq rules on a real kernel.

One module-wide lab: three nodes on an underlay switch, each with one pod
attached by podnet's bridge + host-local (the node's subnet, as the flannel
CNI plugin would delegate), and an "outside" host on the underlay that is not
part of the cluster. Leases are built by hand (no etcd); every node runs its
backend in-process with its netlink socket bound to the node's namespace
(`netns=node.path`), exactly the code the daemon runs inside the node.

`Cluster.use(kind)` switches the whole cluster between vxlan and host-gw, so
each test gets the backend it names whatever ran before it.

Underlay captures run tcpdump in the switch namespace (on br0, which sees
every frame between nodes) into a pcap file, parsed by helpers.parse_pcap: outer UDP port,
VXLAN VNI, inner addresses.
"""
import json
import logging
import os
import re
import subprocess
import time

import pytest

from flanneld import config as cfgmod
from flanneld import ipmasq
from flanneld.backend import backend_class
from flanneld.backend.base import ExternalInterface
from flanneld.subnet import Lease
from lab.cluster import Lab, exec_argv
from podnet.net.ip import AF_INET, parse_cidr, parse_ip
from podnet.net.netlink import Netlink

from helpers import Capture

NETWORK = "10.244.0.0/16"
NODES = ("node1", "node2", "node3")
OUTSIDE_IP = "192.168.50.200"
POD_MTU = 1450
TIMEOUT = 20


# ---- the lab --------------------------------------------------------------------

def bridge_conf(data_dir, subnet):
    """What the flannel CNI plugin delegates: bridge cni0, host-local in the node's subnet."""
    return {
        "cniVersion": "1.0.0", "name": "cbr0", "type": "bridge", "bridge": "cni0",
        "isGateway": True, "isDefaultGateway": True, "ipMasq": False, "hairpinMode": True,
        "mtu": POD_MTU,
        "ipam": {"type": "host-local", "dataDir": data_dir, "ranges": [[{"subnet": subnet}]]},
    }


def external_interface(node):
    with Netlink(netns=node.path) as nl:
        link = nl.link("eth0")
        (addr,) = nl.addrs(index=link.index, family=AF_INET)
        return ExternalInterface(link.name, link.index, addr.net.ip, addr.net.prefixlen, link.mtu)


class Cluster:
    def __init__(self, lab, cni_bin):
        self.lab = lab
        underlay = lab.underlay()
        self.switch = underlay.switch
        self.nodes = [lab.node(name, underlay, ip_forward=True) for name in NODES]
        self.outside = lab.node("outside", underlay, ip=OUTSIDE_IP)
        self.subnet = {n.role: "10.244.%d.0/24" % (i + 1) for i, n in enumerate(self.nodes)}
        self.ext = {n.role: external_interface(n) for n in self.nodes}
        self.pods, self.pod_ip = {}, {}
        for node in self.nodes:
            pod = lab.pod_netns(node.role)
            conf = bridge_conf(os.path.join(lab.workdir, "ipam-" + node.role), self.subnet[node.role])
            out = node.run_cni(os.path.join(cni_bin, "bridge"), "ADD", "ctr-" + node.role, pod.path,
                               "eth0", conf, cni_bin, timeout=TIMEOUT)
            assert out.returncode == 0, out.stdout + out.stderr
            self.pods[node.role] = pod
            self.pod_ip[node.role] = out.result["ips"][0]["address"].split("/")[0]
        self.kind = None
        self.config = None
        self.backends = {}      # role -> backend
        self.leases = {}        # role -> Lease

    def node(self, role):
        return next(n for n in self.nodes if n.role == role)

    def use(self, kind):
        """Run backend `kind` on every node (tearing down the other one first)."""
        if self.kind == kind:
            return self
        self.stop()
        self.config = cfgmod.parse({"Network": NETWORK, "Backend": {"Type": kind}})
        for node in self.nodes:
            self.start(node.role)
        self.sync_all()
        self.kind = kind
        return self

    def start(self, role):
        """A new backend object on node `role`: register, lease, configure (a daemon start)."""
        node = self.node(role)
        backend = backend_class(self.config.backend_type)(self.config, self.ext[role], netns=node.path)
        data, mtu = backend.register()
        self.leases[role] = Lease(parse_cidr(self.subnet[role]), self.ext[role].ip,
                                  self.config.backend_type, data)
        backend.configure(self.leases[role])
        self.backends[role] = backend
        return backend, mtu

    def stop(self):
        for backend in self.backends.values():
            backend.close()
        self.backends = {}
        for node in self.nodes:     # what a backend switch leaves: clean slate for the next
            node.ip("link", "del", "flannel.1", check=False)
            node.ip("route", "flush", "proto", "77")
        self.kind = None

    def remotes(self, role, exclude=(), extra=()):
        return [l for r, l in self.leases.items() if r != role and r not in exclude] + list(extra)

    def sync_all(self):
        return {role: b.sync(self.remotes(role)) for role, b in self.backends.items()}


@pytest.fixture(scope="module")
def cluster(netns_usable, cni_bin):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        c = Cluster(lab, cni_bin)
        yield c
        c.stop()


@pytest.fixture
def vxlan(cluster):
    return cluster.use("vxlan")


@pytest.fixture
def hostgw(cluster):
    return cluster.use("host-gw")


# ---- helpers ---------------------------------------------------------------------

def ping_all(c, count=2):
    """Every pod pings every other pod (in parallel); returns the pairs that failed."""
    procs = {}
    for a in NODES:
        for b in NODES:
            if a != b:
                procs[(a, b)] = subprocess.Popen(
                    exec_argv(c.pods[a].name, ["ping", "-n", "-q", "-c", count, "-i", "0.2", "-W", "2",
                                               c.pod_ip[b]]),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = {}
    for pair, proc in procs.items():
        out, _ = proc.communicate(timeout=TIMEOUT)
        if proc.returncode != 0 or " 0% packet loss" not in out:
            failed[pair] = out
    return failed


def ping(ns, ip, count=1, wait=2):
    return ns.run(["ping", "-n", "-q", "-c", count, "-i", "0.2", "-W", wait, ip], check=False)


def bridge_json(ns, *args):
    out = ns.run(["bridge", "-j"] + list(args)).stdout
    return json.loads(out) if out.strip() else []


def vxlan_state(node):
    """What a vxlan node has: our routes, flannel.1's neighbours and FDB, via iproute2."""
    routes = node.ip_json("route", "show", "proto", "77")
    neigh = node.ip_json("neigh", "show", "dev", "flannel.1")
    fdb = bridge_json(node, "fdb", "show", "dev", "flannel.1")
    return routes, neigh, fdb


def full_state(node):
    """Everything a backend could touch, IPv4 (IPv6 link-local DAD changes by itself)."""
    state = [node.ip_json("-4", "route", "show", "table", "all"), node.ip_json("-4", "neigh", "show", "nud", "permanent")]
    if "flannel.1" in node.link_names():
        state += [bridge_json(node, "fdb", "show", "dev", "flannel.1"),
                  node.ip_json("-d", "link", "show", "flannel.1"), node.ip_json("-4", "addr", "show", "flannel.1")]
    return state


def iptables_save(ns):
    """iptables-save of nat and filter without comments and counters."""
    text = ns.run(["iptables-save"]).stdout
    return "\n".join(re.sub(r" \[\d+:\d+\]$", "", l) for l in text.splitlines() if not l.startswith("#"))


# ---- vxlan ---------------------------------------------------------------------------

def test_vxlan_every_pod_reaches_every_other(vxlan):
    assert ping_all(vxlan) == {}


def test_vxlan_node_state(vxlan):
    """node1 holds exactly flannel's three entries per remote, on a VTEP as flannel makes it."""
    node = vxlan.node("node1")
    (link,) = node.ip_json("-d", "link", "show", "flannel.1")
    info = link["linkinfo"]["info_data"]
    assert (info["id"], info["port"], info["local"], info["learning"]) == (1, 8472, "192.168.50.1", False)
    assert info["link"] == "eth0" and link["mtu"] == 1450
    assert link["address"] == vxlan.backends["node1"].mac
    assert node.run(["cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra"]).stdout.strip() == "0"
    assert [(a["local"], a["prefixlen"]) for a in node.ip_json("addr", "show", "flannel.1")[0]["addr_info"]
            if a["family"] == "inet"] == [("10.244.1.0", 32)]
    routes, neigh, fdb = vxlan_state(node)
    assert sorted((r["dst"], r["gateway"], r["dev"], "onlink" in r["flags"]) for r in routes) == [
        ("10.244.2.0/24", "10.244.2.0", "flannel.1", True), ("10.244.3.0/24", "10.244.3.0", "flannel.1", True)]
    macs = {r: vxlan.backends[r].mac for r in ("node2", "node3")}
    assert sorted((n["dst"], n["lladdr"], n["state"]) for n in neigh) == [
        ("10.244.2.0", macs["node2"], ["PERMANENT"]), ("10.244.3.0", macs["node3"], ["PERMANENT"])]
    assert sorted((e["mac"], e["dst"], e["state"]) for e in fdb) == sorted([
        (macs["node2"], "192.168.50.2", "permanent"), (macs["node3"], "192.168.50.3", "permanent")])
    assert vxlan.leases["node1"].value() == '{"PublicIP":"192.168.50.1","BackendType":"vxlan",' \
        '"BackendData":{"VNI":1,"VtepMAC":"%s"}}' % vxlan.backends["node1"].mac


def test_vxlan_underlay_carries_udp_8472_with_the_vni(vxlan, lab_dir):
    cap = Capture(vxlan.switch, "br0", "udp or icmp", os.path.join(lab_dir, "vxlan.pcap"))
    assert ping(vxlan.pods["node1"], vxlan.pod_ip["node2"], count=3).returncode == 0
    packets = cap.stop()
    pods = {vxlan.pod_ip["node1"], vxlan.pod_ip["node2"]}
    tunnelled = [p for p in packets if p.get("inner_proto") == 1]
    assert len(tunnelled) >= 6, packets                     # 3 requests + 3 replies
    for p in tunnelled:
        assert p["proto"] == 17 and p["dport"] == 8472 and p["vni"] == 1
        assert {p["src"], p["dst"]} == {"192.168.50.1", "192.168.50.2"}
        assert {p["inner_src"], p["inner_dst"]} == pods
    assert not [p for p in packets if p["proto"] == 1]      # no pod ICMP in the clear


def test_vxlan_sync_twice_changes_nothing(vxlan):
    before = {n.role: full_state(n) for n in vxlan.nodes}
    assert vxlan.sync_all() == {r: [] for r in NODES}
    assert {n.role: full_state(n) for n in vxlan.nodes} == before


def test_vxlan_vanished_lease_is_removed_and_comes_back(vxlan):
    node1, node2 = vxlan.node("node1"), vxlan.node("node2")
    other_before = vxlan_state(node2)
    changes = vxlan.backends["node1"].sync(vxlan.remotes("node1", exclude=("node3",)))
    assert len(changes) == 3, changes       # route, neighbour, FDB entry
    routes, neigh, fdb = vxlan_state(node1)
    mac3 = vxlan.backends["node3"].mac
    assert [r["dst"] for r in routes] == ["10.244.2.0/24"]
    assert [n["dst"] for n in neigh] == ["10.244.2.0"]
    assert mac3 not in {e["mac"] for e in fdb} and len(fdb) == 1
    assert vxlan_state(node2) == other_before
    assert ping(vxlan.pods["node1"], vxlan.pod_ip["node3"], wait=1).returncode != 0
    assert len(vxlan.backends["node1"].sync(vxlan.remotes("node1"))) == 3
    assert ping(vxlan.pods["node1"], vxlan.pod_ip["node3"]).returncode == 0


def test_vxlan_leaves_what_is_not_its_own(vxlan):
    """Routes of another protocol and neighbours on other links survive a sync, and
    a stale entry on the VTEP (a lease gone while the daemon was down) is removed."""
    node = vxlan.node("node1")
    node.ip("route", "add", "10.99.0.0/24", "via", "192.168.50.3", "proto", "static")
    node.ip("neigh", "replace", "192.168.50.77", "lladdr", "02:00:00:00:00:77", "dev", "eth0", "nud", "permanent")
    node.ip("route", "add", "10.244.9.0/24", "via", "10.244.9.0", "dev", "flannel.1", "onlink", "proto", "77")
    node.ip("neigh", "replace", "10.244.9.0", "lladdr", "0a:00:00:00:00:09", "dev", "flannel.1", "nud", "permanent")
    node.run(["bridge", "fdb", "append", "0a:00:00:00:00:09", "dev", "flannel.1", "dst", "192.168.50.9"])
    try:
        changes = vxlan.backends["node1"].sync(vxlan.remotes("node1"))
        assert sorted(c.split()[1] for c in changes) == ["fdb", "neigh", "route"], changes
        assert node.ip_json("route", "show", "10.99.0.0/24")
        assert node.ip_json("neigh", "show", "192.168.50.77", "dev", "eth0")
        routes, neigh, fdb = vxlan_state(node)
        assert "10.244.9.0/24" not in {r["dst"] for r in routes}
        assert "10.244.9.0" not in {n["dst"] for n in neigh}
        assert "0a:00:00:00:00:09" not in {e["mac"] for e in fdb}
    finally:
        node.ip("route", "del", "10.99.0.0/24", check=False)
        node.ip("neigh", "del", "192.168.50.77", "dev", "eth0", check=False)


def test_vxlan_restart_adopts_the_vtep_without_disturbing_traffic(vxlan):
    node = vxlan.node("node1")
    (before,) = node.ip_json("link", "show", "flannel.1")
    pinger = subprocess.Popen(
        exec_argv(vxlan.pods["node1"].name, ["ping", "-n", "-q", "-c", "50", "-i", "0.05", "-W", "1",
                                             vxlan.pod_ip["node2"]]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        for role in ("node1", "node2"):          # both ends of the running ping restart
            vxlan.backends[role].close()
            backend, mtu = vxlan.start(role)
            assert mtu == 1450
            assert backend.sync(vxlan.remotes(role)) == []
        out, _ = pinger.communicate(timeout=TIMEOUT)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.wait()
    (after,) = node.ip_json("link", "show", "flannel.1")
    assert (after["ifindex"], after["address"]) == (before["ifindex"], before["address"])
    assert vxlan.leases["node1"].backend_data["VtepMAC"] == before["address"]
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    assert sent == 50 and sent - received <= 2, out


def test_vxlan_vtep_recreated_keeps_mac_and_comes_back(cluster, lab_dir):
    """A lone node: an incompatible flannel.1 (IANA port) is recreated with flannel's
    port and its MAC; a VTEP deleted under a running backend is re-made by sync."""
    lab = cluster.lab
    node = lab.node("lone", cluster.nodes[0].underlay, ip="192.168.50.50")
    node.ip("link", "add", "flannel.1", "address", "0a:11:22:33:44:55", "type", "vxlan", "id", "1",
            "dstport", "4789", "local", "192.168.50.50", "dev", "eth0", "nolearning")
    config = cfgmod.parse({"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    backend = backend_class("vxlan")(config, external_interface(node), netns=node.path)
    try:
        data, _ = backend.register()
        assert data == {"VNI": 1, "VtepMAC": "0a:11:22:33:44:55"}
        (link,) = node.ip_json("-d", "link", "show", "flannel.1")
        assert link["linkinfo"]["info_data"]["port"] == 8472
        backend.configure(Lease(parse_cidr("10.244.50.0/24"), parse_ip("192.168.50.50"), "vxlan", data))
        remote = Lease(parse_cidr("10.244.2.0/24"), parse_ip("192.168.50.2"), "vxlan",
                       {"VtepMAC": "0a:00:00:00:00:02"})
        assert len(backend.sync([remote])) == 3
        node.ip("link", "del", "flannel.1")
        assert len(backend.sync([remote])) == 3
        (link,) = node.ip_json("link", "show", "flannel.1")
        assert link["address"] == "0a:11:22:33:44:55" and "UP" in link["flags"]
        assert [r["dst"] for r in node.ip_json("route", "show", "proto", "77")] == ["10.244.2.0/24"]
        assert backend.sync([remote]) == []
        # Someone else re-made it under the same name (a new index): adopted, not EEXIST.
        node.ip("link", "del", "flannel.1")
        node.ip("link", "add", "flannel.1", "address", "0a:11:22:33:44:66", "type", "vxlan", "id", "1",
                "dstport", "8472", "local", "192.168.50.50", "dev", "eth0", "nolearning")
        assert len(backend.sync([remote])) == 3
        assert backend.mac == "0a:11:22:33:44:66"
        assert [a["local"] for a in node.ip_json("-4", "addr", "show", "flannel.1")[0]["addr_info"]] == \
            ["10.244.50.0"]
    finally:
        backend.close()


# ---- host-gw ---------------------------------------------------------------------------

def test_hostgw_every_pod_reaches_every_other(hostgw):
    assert ping_all(hostgw) == {}
    routes = hostgw.node("node1").ip_json("route", "show", "proto", "77")
    assert sorted((r["dst"], r["gateway"], r["dev"]) for r in routes) == [
        ("10.244.2.0/24", "192.168.50.2", "eth0"), ("10.244.3.0/24", "192.168.50.3", "eth0")]
    assert not hostgw.node("node1").ip_json("link", "show", "type", "vxlan")


def test_hostgw_underlay_carries_plain_ip(hostgw, lab_dir):
    cap = Capture(hostgw.switch, "br0", "udp or icmp", os.path.join(lab_dir, "hostgw.pcap"))
    assert ping(hostgw.pods["node1"], hostgw.pod_ip["node3"], count=3).returncode == 0
    packets = cap.stop()
    pods = {hostgw.pod_ip["node1"], hostgw.pod_ip["node3"]}
    icmp = [p for p in packets if p["proto"] == 1]
    assert len(icmp) >= 6 and all({p["src"], p["dst"]} == pods for p in icmp), packets
    assert not [p for p in packets if p["proto"] == 17 and p.get("dport") == 8472]


def test_hostgw_sync_twice_and_vanished_lease(hostgw):
    before = {n.role: full_state(n) for n in hostgw.nodes}
    assert hostgw.sync_all() == {r: [] for r in NODES}
    assert {n.role: full_state(n) for n in hostgw.nodes} == before
    node1 = hostgw.node("node1")
    assert hostgw.backends["node1"].sync(hostgw.remotes("node1", exclude=("node2",))) == \
        ["del route 10.244.2.0/24 via 192.168.50.2 dev eth0"]
    assert [r["dst"] for r in node1.ip_json("route", "show", "proto", "77")] == ["10.244.3.0/24"]
    assert hostgw.backends["node1"].sync(hostgw.remotes("node1")) == \
        ["set route 10.244.2.0/24 via 192.168.50.2 dev eth0"]


def test_hostgw_remote_off_segment_is_refused_others_work(hostgw, caplog):
    far = Lease(parse_cidr("10.244.4.0/24"), parse_ip("192.168.60.5"), "host-gw")
    with caplog.at_level(logging.ERROR, logger="flanneld.backend.host_gw"):
        changes = hostgw.backends["node1"].sync(hostgw.remotes("node1", extra=[far]))
    assert changes == []
    assert ("host-gw requires direct L2 reachability: 10.244.4.0/24 via 192.168.60.5 is not on "
            "eth0's 192.168.50.0/24") in caplog.text
    assert not hostgw.node("node1").ip_json("route", "show", "10.244.4.0/24")
    assert ping_all(hostgw) == {}


# ---- ipmasq ------------------------------------------------------------------------------

def test_ipmasq(hostgw, lab_dir):
    """With FORWARD policy DROP the node forwards pods only thanks to FLANNEL-FWD; pod ->
    outside leaves with the node's IP, pod -> pod keeps the pod's; a rerun changes nothing."""
    node1, c = hostgw.node("node1"), hostgw
    root_before = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.count("FLANNEL")
    network, subnet = parse_cidr(NETWORK), parse_cidr(c.subnet["node1"])
    node1.run(["iptables", "-P", "FORWARD", "DROP"])
    try:
        assert ping(c.pods["node1"], c.pod_ip["node2"], wait=1).returncode != 0
        assert ipmasq.apply(network, subnet, netns=node1.path) == ["nat", "filter"]
        rules = iptables_save(node1)
        assert ipmasq.apply(network, subnet, netns=node1.path) == []
        assert iptables_save(node1) == rules
        assert rules.count("-j FLANNEL-POSTRTG") == 1 and rules.count("-j FLANNEL-FWD") == 1

        cap = Capture(c.outside, "eth0", "icmp", os.path.join(lab_dir, "masq.pcap"))
        assert ping(c.pods["node1"], OUTSIDE_IP, count=2).returncode == 0
        requests = [p for p in cap.stop() if p["dst"] == OUTSIDE_IP]
        assert requests and {p["src"] for p in requests} == {"192.168.50.1"}     # masqueraded

        cap = Capture(c.pods["node2"], "eth0", "icmp", os.path.join(lab_dir, "pod.pcap"))
        assert ping(c.pods["node1"], c.pod_ip["node2"], count=2).returncode == 0
        requests = [p for p in cap.stop() if p["dst"] == c.pod_ip["node2"]]
        assert requests and {p["src"] for p in requests} == {c.pod_ip["node1"]}  # not masqueraded

        ipmasq.remove(netns=node1.path)
        assert "FLANNEL" not in iptables_save(node1)
        ipmasq.remove(netns=node1.path)                                          # nothing left: no-op
    finally:
        node1.run(["iptables", "-P", "FORWARD", "ACCEPT"])
        ipmasq.remove(netns=node1.path)
    root_after = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.count("FLANNEL")
    assert root_after == root_before            # nothing of ours in the root namespace


@pytest.fixture
def lab_dir(cluster):
    return cluster.lab.workdir
