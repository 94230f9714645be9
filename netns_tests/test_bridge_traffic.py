"""Real traffic through podnet's bridge: pods attached with our loopback + bridge
(+ host-local) reach each other, the gateway and, masqueraded, another node;
DEL takes every trace away again.

One module-wide set-up (node1 with three dual-stack pods, node2 as an outside
host on the underlay); the tests only read it, except the last, which DELs.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from lab.cluster import Lab

NETWORK = "podnet"
BRIDGE = "cni0"
SUBNET4, GW4 = "10.244.1.0/24", "10.244.1.1"
SUBNET6, GW6 = "fd00:244:1::/64", "fd00:244:1::1"
PODS = ("a", "b", "c")
LOOPBACK = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
TIMEOUT = 20


def bridge_conf(data_dir):
    return {
        "cniVersion": "1.0.0", "name": NETWORK, "type": "bridge", "bridge": BRIDGE,
        "isGateway": True, "ipMasq": True, "hairpinMode": True,
        "ipam": {
            "type": "host-local", "dataDir": data_dir,
            # Two range sets: one IPv4 and one IPv6 address per pod.
            "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
            "routes": [{"dst": "0.0.0.0/0"}],   # via the gateway: lets pods reach node2
        },
    }


class Attached:
    """What the module fixture built: nodes, pods and their addresses."""

    def __init__(self, lab, cni_bin):
        self.lab = lab
        self.cni_bin = cni_bin
        self.data_dir = os.path.join(lab.workdir, "ipam")
        self.conf = bridge_conf(self.data_dir)
        underlay = lab.underlay()
        self.node = lab.node("node1", underlay)
        self.outside = lab.node("node2", underlay)   # no route to the pod subnet
        self.pods = {}      # name -> pod Namespace
        self.ip4 = {}       # name -> "10.244.1.x"
        self.ip6 = {}       # name -> "fd00:244:1::x"
        self.host_veth = {}

    def cni(self, plugin, command, pod, ifname, conf):
        out = self.node.run_cni(os.path.join(self.cni_bin, plugin), command, "ctr-" + pod,
                                self.pods[pod].path, ifname, conf, self.cni_bin, timeout=TIMEOUT)
        assert out.returncode == 0, "%s %s %s: %s %s" % (plugin, command, pod, out.stdout, out.stderr)
        return out

    def attach(self, name):
        self.pods[name] = self.lab.pod_netns(name)
        self.cni("loopback", "ADD", name, "lo", LOOPBACK)
        result = self.cni("bridge", "ADD", name, "eth0", self.conf).result
        for ipc in result["ips"]:
            address = ipc["address"].split("/")[0]
            (self.ip6 if ":" in address else self.ip4)[name] = address
        self.host_veth[name] = result["interfaces"][1]["name"]


@pytest.fixture(scope="module")
def net(netns_usable, cni_bin):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        attached = Attached(lab, cni_bin)
        for name in PODS:
            attached.attach(name)
        yield attached


def unreachable(ns, targets, ipv6=False):
    """The targets that do not answer one ping from `ns` (all pinged in parallel)."""
    flag = "-6" if ipv6 else "-4"
    script = " ".join("(ping %s -c1 -W2 -q %s >/dev/null 2>&1 || echo %s) &" % (flag, t, t)
                      for t in targets) + " wait"
    return ns.run(script, timeout=TIMEOUT).stdout.split()


def test_pods_got_distinct_dual_stack_addresses(net):
    assert len(set(net.ip4.values())) == len(PODS)
    assert len(set(net.ip6.values())) == len(PODS)
    for name, pod in net.pods.items():
        addrs = {a["local"] for a in pod.ip_json("addr", "show", "eth0")[0]["addr_info"]
                 if a["scope"] == "global"}
        assert addrs == {net.ip4[name], net.ip6[name]}
        assert "UP" in pod.ip_json("link", "show", "lo")[0]["flags"]     # our loopback
    gw = {a["local"] for a in net.node.ip_json("addr", "show", BRIDGE)[0]["addr_info"]}
    assert {GW4, GW6} <= gw


def test_every_pod_pings_every_other_pod_and_the_gateway(net):
    for name, pod in net.pods.items():
        others = [ip for other, ip in net.ip4.items() if other != name]
        assert unreachable(pod, others + [GW4]) == [], "from pod %s" % name


def test_pods_ping_each_other_over_ipv6(net):
    for name, pod in net.pods.items():
        others = [ip for other, ip in net.ip6.items() if other != name]
        assert unreachable(pod, others + [GW6], ipv6=True) == [], "from pod %s" % name


def test_node_reaches_every_pod(net):
    assert unreachable(net.node, list(net.ip4.values())) == []
    assert unreachable(net.node, list(net.ip6.values()), ipv6=True) == []


SERVER = """
import socket
s = socket.create_server((%(ip)r, %(port)d))
s.settimeout(%(timeout)d)
print("ready", flush=True)
c, peer = s.accept()
c.settimeout(%(timeout)d)
data = b""
while not data.endswith(b"\\n"):
    chunk = c.recv(4096)
    if not chunk:
        break
    data += chunk
c.sendall(data.upper())
c.close()
print(peer[0], flush=True)
"""

CLIENT = """
import socket
c = socket.create_connection((%(ip)r, %(port)d), timeout=%(timeout)d)
c.sendall(b"hello from pod b\\n")
c.shutdown(socket.SHUT_WR)
data = b""
while True:
    chunk = c.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
"""


def test_tcp_between_two_pods_without_nat(net):
    params = {"ip": net.ip4["a"], "port": 8080, "timeout": 5}
    server = net.pods["a"].popen([sys.executable, "-c", textwrap.dedent(SERVER % params)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        client = net.pods["b"].run([sys.executable, "-c", textwrap.dedent(CLIENT % params)],
                                   timeout=TIMEOUT)
        assert client.stdout.strip() == "HELLO FROM POD B"
        out, err = server.communicate(timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, err
    # Pod-to-pod traffic stays inside the subnet: not masqueraded.
    assert out.strip() == net.ip4["b"]


def test_masquerade_to_another_node(net):
    """node2 has no route to the pod subnet: its replies only come back if the
    pods' traffic leaves node1 masqueraded to node1's underlay address."""
    routes = net.outside.ip_json("route", "show")
    assert not any(r["dst"] in ("default", SUBNET4) for r in routes)
    for pod in net.pods.values():
        assert unreachable(pod, [net.outside.underlay_ip]) == []


def test_ports_are_on_the_bridge_with_hairpin(net):
    for name, veth in net.host_veth.items():
        link = net.node.ip_json("-d", "link", "show", veth)[0]
        assert link["master"] == BRIDGE
        assert link["linkinfo"]["info_slave_kind"] == "bridge"
        assert link["linkinfo"]["info_slave_data"]["hairpin"] is True, name


def test_del_all_leaves_nothing(net):
    node = net.node
    nat = node.run(["iptables-save", "-t", "nat"]).stdout
    assert nat.count("-j CNI-") == len(PODS)           # one jump per pod, before DEL
    for name in PODS:
        net.cni("bridge", "DEL", name, "eth0", net.conf)
        net.cni("loopback", "DEL", name, "lo", LOOPBACK)
    for name in PODS:     # a repeated DEL is fine too
        net.cni("bridge", "DEL", name, "eth0", net.conf)

    veths = {l["ifname"] for l in node.ip_json("link", "show", "type", "veth")}
    assert veths == {"eth0"}                            # only the underlay link
    assert node.ip_json("link", "show", "master", BRIDGE) == []
    for tool in ("iptables-save", "ip6tables-save"):
        assert "CNI-" not in node.run([tool, "-t", "nat"]).stdout, tool
    left = sorted(os.listdir(os.path.join(net.data_dir, NETWORK)))
    assert left == ["last_reserved_ip.0", "last_reserved_ip.1", "lock"]
    for pod in net.pods.values():
        assert pod.link_names() == {"lo"}
        assert "UP" not in pod.ip_json("link", "show", "lo")[0]["flags"]
