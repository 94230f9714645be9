"""The calico CNI plugin's datapath in namespaces: two dual-stack pods on node1
reach each other, the node and (through node1's routing) node2; CHECK sees a
missing route; bad input leaves nothing behind; DEL cleans up.

One module-wide set-up (node1 with pods a and b, node2 routing the block to
node1 on the underlay); the tests only read it, except where they say so,
and the DEL test runs last.
"""
import json
import os
import time

import pytest

from lab.cluster import Lab

BLOCK4, BLOCK6 = "10.65.0.64/26", "fd00:65::/122"
LOOPBACK = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
TIMEOUT = 20


def calico_conf(data_dir, blocks_file, **kw):
    c = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico", "mtu": 1480,
         "nodeBlocksFile": blocks_file,
         "ipam": {"type": "host-local", "subnet": "useNodeBlock", "dataDir": data_dir}}
    c.update(kw)
    return c


class Setup:
    def __init__(self, lab, cni_bin):
        self.lab, self.cni_bin = lab, cni_bin
        underlay = lab.underlay()
        self.node = lab.node("node1", underlay)
        self.node2 = lab.node("node2", underlay, ip_forward=True)
        self.node2.ip("route", "add", BLOCK4, "via", self.node.underlay_ip)
        self.node2.ip("-6", "addr", "add", "fd00:50::2/64", "dev", "eth0", "nodad")
        self.node.ip("-6", "addr", "add", "fd00:50::1/64", "dev", "eth0", "nodad")
        self.node2.ip("-6", "route", "add", BLOCK6, "via", "fd00:50::1")
        # the underlay's own link-local addresses run DAD (~1 s): wait, or a first
        # IPv6 packet between the nodes waits for it
        deadline = time.monotonic() + 5
        while any(n.ip("-6", "addr", "show", "tentative").stdout.strip() for n in (self.node, self.node2)):
            assert time.monotonic() < deadline, "IPv6 DAD on the underlay did not finish"
            time.sleep(0.05)
        self.blocks_file = os.path.join(lab.workdir, "blocks")
        with open(self.blocks_file, "w") as f:
            f.write("# written by the calico-lite agent\n%s\n%s\n" % (BLOCK4, BLOCK6))
        self.data_dir = os.path.join(lab.workdir, "ipam")
        self.conf = calico_conf(self.data_dir, self.blocks_file)
        self.pods, self.results = {}, {}

    def cni(self, command, pod, conf=None, plugin="calico", ifname="eth0", netns=None, cid=None):
        return self.node.run_cni(os.path.join(self.cni_bin, plugin), command, cid or "ctr-" + pod,
                                 netns if netns is not None else self.pods[pod].path, ifname,
                                 conf or self.conf, self.cni_bin, timeout=TIMEOUT)

    def ok(self, command, pod, **kw):
        out = self.cni(command, pod, **kw)
        assert out.returncode == 0, "%s %s: %s %s" % (command, pod, out.stdout, out.stderr)
        return out

    def attach(self, name):
        self.pods[name] = self.lab.pod_netns(name)
        self.ok("ADD", name, conf=LOOPBACK, plugin="loopback", ifname="lo")
        self.results[name] = self.ok("ADD", name).result

    def ip4(self, pod):
        return [i["address"].split("/")[0] for i in self.results[pod]["ips"] if ":" not in i["address"]][0]

    def ip6(self, pod):
        return [i["address"].split("/")[0] for i in self.results[pod]["ips"] if ":" in i["address"]][0]

    def check_conf(self, pod):
        c = dict(self.conf)
        c["prevResult"] = self.results[pod]
        return c


@pytest.fixture(scope="module")
def net(netns_usable, cni_bin):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        s = Setup(lab, cni_bin)
        s.attach("a")
        s.attach("b")
        yield s


def ping(ns, dst, count=1):
    return ns.run(["ping", "-n", "-q", "-c", count, "-i", "0.2", "-W", 2, dst], check=False)


def test_result(net):
    from cni.plugins.calico import host_veth_name
    r = net.results["a"]
    assert r["cniVersion"] == "1.0.0"
    host_if, pod_if = r["interfaces"]
    assert host_if == {"name": host_veth_name("ctr-a", "eth0"), "mac": "ee:ee:ee:ee:ee:ee"}
    assert pod_if["name"] == "eth0" and pod_if["sandbox"] == net.pods["a"].path
    ips = sorted((i["address"], i["gateway"], i["interface"]) for i in r["ips"])
    assert [a.split("/")[1] for a, _, _ in ips] == ["32", "128"]
    assert ips[0][1:] == ("169.254.1.1", 1) and ips[1][1:] == ("fe80::ecee:eeff:feee:eeee", 1)
    assert r["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                           {"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"}]
    assert net.ip4("a") != net.ip4("b")


def test_pod_side(net):
    pod = net.pods["a"]
    (link,) = pod.ip_json("addr", "show", "eth0")
    assert link["mtu"] == 1480 and "UP" in link["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["scope"] == "global"}
    assert addrs == {(net.ip4("a"), 32), (net.ip6("a"), 128)}
    (default,) = pod.ip_json("route", "show", "default")
    assert default["gateway"] == "169.254.1.1" and "onlink" in default["flags"]
    neigh = pod.ip_json("neigh", "show", "169.254.1.1")
    assert neigh[0]["lladdr"] == "ee:ee:ee:ee:ee:ee" and "PERMANENT" in neigh[0]["state"]


def test_host_side(net):
    host_if = net.results["a"]["interfaces"][0]["name"]
    (link,) = net.node.ip_json("addr", "show", host_if)
    assert link["address"] == "ee:ee:ee:ee:ee:ee" and link["mtu"] == 1480
    assert not [a for a in link["addr_info"] if a["family"] == "inet"]          # no IPv4 address
    (route,) = net.node.ip_json("route", "show", net.ip4("a"))
    assert route["dst"] == net.ip4("a") and route["dev"] == host_if and route["scope"] == "link"
    (route6,) = net.node.ip_json("-6", "route", "show", net.ip6("a"))
    assert route6["dev"] == host_if
    sysctls = net.node.run(["sysctl", "-n"] + ["net.ipv4.conf.%s.%s" % (host_if, k) for k in
                                                ("proxy_arp", "forwarding", "rp_filter")]
                           + ["net.ipv4.neigh.%s.proxy_delay" % host_if, "net.ipv4.ip_forward",
                              "net.ipv6.conf.%s.proxy_ndp" % host_if]).stdout.split()
    assert sysctls == ["1", "1", "1", "0", "1", "1"]


def test_pods_reach_each_other_the_node_and_beyond(net):
    a, b = net.pods["a"], net.pods["b"]
    for src, dst in ((a, net.ip4("b")), (b, net.ip4("a")), (a, net.node.underlay_ip),
                     (net.node, net.ip4("a")), (a, net.node2.underlay_ip), (net.node2, net.ip4("b")),
                     (a, net.ip6("b")), (b, "fd00:50::2"), (net.node2, net.ip6("a"))):
        out = ping(src, dst)
        assert out.returncode == 0, "%s -> %s: %s" % (src.role, dst, out.stdout + out.stderr)


def _rp_filter_drops(ns):
    lines = ns.run(["cat", "/proc/net/netstat"]).stdout.splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split(), values.split()))["IPReversePathFilter"])
    raise AssertionError("no TcpExt counters")


def test_spoofed_source_is_dropped(net):
    """rp_filter=1 on the host side: a pod cannot send from another pod's address."""
    a = net.pods["a"]
    before = _rp_filter_drops(net.node)
    a.ip("addr", "add", net.ip4("b") + "/32", "dev", "eth0")
    try:
        a.run(["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-I", net.ip4("b"), net.node.underlay_ip],
              check=False)
    finally:
        a.ip("addr", "del", net.ip4("b") + "/32", "dev", "eth0")
    assert _rp_filter_drops(net.node) - before >= 2


def test_add_rerun_is_idempotent(net):
    again = net.ok("ADD", "a").result
    assert again == net.results["a"]
    host_if = again["interfaces"][0]["name"]
    assert sum(1 for l in net.node.ip_json("link", "show") if l["ifname"].startswith("cali")) == 2
    assert len(net.node.ip_json("route", "show", "dev", host_if)) == 1


def test_check(net):
    out = net.cni("CHECK", "a", conf=net.check_conf("a"))
    assert out.returncode == 0, out.stdout
    host_if = net.results["a"]["interfaces"][0]["name"]
    net.node.ip("route", "del", net.ip4("a"), "dev", host_if)
    try:
        out = net.cni("CHECK", "a", conf=net.check_conf("a"))
        assert out.returncode == 1 and out.result["code"] == 7
        assert "host route %s/32 dev %s is missing" % (net.ip4("a"), host_if) in out.result["msg"]
    finally:
        net.ok("ADD", "a")                       # a rerun repairs it
    assert net.cni("CHECK", "a", conf=net.check_conf("a")).returncode == 0
    net.pods["a"].ip("route", "del", "default")
    try:
        out = net.cni("CHECK", "a", conf=net.check_conf("a"))
        assert out.returncode == 1 and "route 0.0.0.0/0 via 169.254.1.1 is missing" in out.result["msg"]
    finally:
        net.ok("ADD", "a")
    assert ping(net.pods["a"], net.ip4("b")).returncode == 0


def test_bad_input_leaves_nothing(net, tmp_path):
    links = {l["ifname"] for l in net.node.ip_json("link", "show")}
    # no such netns
    out = net.cni("ADD", "x", netns="/var/run/netns/does-not-exist", cid="ctr-x")
    assert out.returncode == 1 and out.result["code"] == 3
    # blocks not written yet: try again later
    out = net.cni("ADD", "a", conf=calico_conf(net.data_dir, str(tmp_path / "none")), cid="ctr-y")
    assert out.returncode == 1 and out.result["code"] == 11
    # the container already has that interface name (not ours): refused
    out = net.cni("ADD", "a", ifname="lo", cid="ctr-z")
    assert out.returncode == 1 and "already exists" in out.result["msg"]
    # malformed config
    out = net.cni("ADD", "a", conf={"cniVersion": "1.0.0", "name": "n", "type": "calico", "mtu": "big",
                                    "ipam": {"type": "host-local"}}, cid="ctr-w")
    assert out.returncode == 1 and out.result["code"] == 7
    assert {l["ifname"] for l in net.node.ip_json("link", "show")} == links
    assert sorted(os.listdir(os.path.join(net.data_dir, "k8s-pod-network"))) == sorted(
        [net.ip4("a"), net.ip4("b"), net.ip6("a"), net.ip6("b"), "last_reserved_ip.0", "last_reserved_ip.1",
         "lock"])


def test_ipam_failure_removes_the_veth(net):
    """A block with room for one pod: the second ADD fails in IPAM, its veth is removed."""
    blocks = os.path.join(net.lab.workdir, "tiny-blocks")
    with open(blocks, "w") as f:
        f.write("10.65.9.0/30\n")
    conf = calico_conf(os.path.join(net.lab.workdir, "ipam-tiny"), blocks, name="tiny")
    for name in ("t1", "t2"):
        net.pods[name] = net.lab.pod_netns(name)
    assert net.cni("ADD", "t1", conf=conf).returncode == 0
    links = {l["ifname"] for l in net.node.ip_json("link", "show")}
    out = net.cni("ADD", "t2", conf=conf)
    assert out.returncode == 1 and out.result["code"] == 100, out.stdout
    assert {l["ifname"] for l in net.node.ip_json("link", "show")} == links
    assert net.pods["t2"].link_names() == {"lo"}
    for name in ("t1", "t2"):
        assert net.cni("DEL", name, conf=conf).returncode == 0


def test_del_cleans_up_and_is_idempotent(net):
    host_if = net.results["b"]["interfaces"][0]["name"]
    net.ok("DEL", "b")
    assert host_if not in net.node.link_names()
    assert net.pods["b"].link_names() == {"lo"}
    assert net.node.ip_json("route", "show", net.ip4("b")) == []
    assert net.ip4("b") not in os.listdir(os.path.join(net.data_dir, "k8s-pod-network"))
    net.ok("DEL", "b")                                      # again: nothing left, still fine
    # the sandbox already gone, and no blocks file any more: DEL still succeeds
    host_if = net.results["a"]["interfaces"][0]["name"]
    net.node.run(["ip", "netns", "delete", net.pods["a"].name])
    os.rename(net.blocks_file, net.blocks_file + ".gone")
    try:
        net.ok("DEL", "a")
    finally:
        os.rename(net.blocks_file + ".gone", net.blocks_file)
    assert host_if not in net.node.link_names()
    assert not [f for f in os.listdir(os.path.join(net.data_dir, "k8s-pod-network")) if f[0].isdigit()
                or ":" in f]
    assert json.loads(net.node.ip("-j", "route", "show", "proto", "boot").stdout or "[]") == []
