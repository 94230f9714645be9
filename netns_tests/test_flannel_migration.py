"""A node migrated in place from upstream flannel to podnet's flanneld (Kubernetes mode).

No upstream flannel binary is packaged here, so node2 is built by hand exactly as
upstream leaves a node (kube-flannel.yml: `flanneld --ip-masq --kube-subnet-mgr`,
vxlan), from its source:
  - pkg/backend/vxlan: flannel.1, VNI 1, dstport 8472, local = the node's IP, dev eth0,
    nolearning, MTU eth0's - 50, a random locally administered MAC, the subnet's network
    address as a /32; per remote node a route `via <subnet>.0 dev flannel.1 onlink`
    (no protocol of its own: proto boot), a permanent neighbour and an FDB entry;
  - pkg/subnet/kube: the Node annotations (backend-data {"VNI":1,"VtepMAC":...},
    backend-type, kube-subnet-manager, public-ip);
  - subnet.env (FLANNEL_NETWORK, FLANNEL_SUBNET = the first address /24, FLANNEL_MTU,
    FLANNEL_IPMASQ);
  - pkg/trafficmngr/iptables: FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter) and the
    jumps to them, typed here as iptables commands in upstream's spelling;
  - a pod as upstream's conflist ("cbr0": flannel delegating to bridge + host-local)
    leaves it: cni0 with <subnet>.1/24, a veth into the pod, the pod's eth0 <subnet>.2/24
    with a default route via .1, and host-local's files <dataDir>/cbr0/10.244.2.2
    ("<container id>\\r\\neth0") and last_reserved_ip.0.
node1 and node3 run podnet's flanneld already. The Kubernetes API is the scripted
server tests/fake_kube_api.py (no kube-apiserver can run here), in a namespace on the
underlay. Then podnet's flanneld starts on node2 while node2's pod pings node1's pod
every 20 ms; shown: no packet lost, the same flannel.1 (ifindex and MAC), the same
annotations (no PATCH of them, only the NetworkUnavailable condition), the same
subnet.env subnet, upstream's iptables rules kept as they were, upstream's routes taken
over (proto 77) in place, the pod untouched (same netns, same address), and a new pod
attached through podnet's plugins gets another address and reaches both.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from lab.cluster import KubeFlannelCluster, Lab

from helpers import wait_until

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from fake_kube_api import FakeKubeApi  # noqa: E402

PREFIX = "flannel.alpha.coreos.com/"
HEALTHZ_PORT = 8081
NETWORK = "10.244.0.0/16"
UPSTREAM_MAC = "7a:3c:91:0e:5b:d2"     # what upstream's random MAC happened to be
OLD_POD_IP = "10.244.2.2"              # host-local's first address after the gateway
OLD_POD_CID = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
PING_INTERVAL = 0.02
PING_SECONDS = 8


def pod_cidr(i):
    return "10.244.%d.0/24" % i


def upstream_annotations(public_ip, mac):
    return {PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % mac, PREFIX + "backend-type": "vxlan",
            PREFIX + "kube-subnet-manager": "true", PREFIX + "public-ip": public_ip}


def upstream_iptables(node):
    """Upstream's chains as its iptables manager leaves them (--ip-masq, random-fully)."""
    c = ["-m", "comment", "--comment"]
    sub, net = pod_cidr(2), NETWORK
    masq = c + ["flanneld masq"]
    node.run(["iptables", "-t", "nat", "-N", "FLANNEL-POSTRTG"])
    node.run(["iptables", "-t", "nat", "-A", "POSTROUTING"] + masq + ["-j", "FLANNEL-POSTRTG"])
    for spec in (["-m", "mark", "--mark", "0x4000/0x4000"] + masq + ["-j", "RETURN"],
                 ["-s", sub, "-d", net] + masq + ["-j", "RETURN"],
                 ["-s", net, "-d", sub] + masq + ["-j", "RETURN"],
                 ["!", "-s", net, "-d", sub] + masq + ["-j", "RETURN"],
                 ["-s", net, "!", "-d", "224.0.0.0/4"] + masq + ["-j", "MASQUERADE", "--random-fully"],
                 ["!", "-s", net, "-d", net] + masq + ["-j", "MASQUERADE", "--random-fully"]):
        node.run(["iptables", "-t", "nat", "-A", "FLANNEL-POSTRTG"] + spec)
    fwd = c + ["flanneld forward"]
    node.run(["iptables", "-t", "filter", "-N", "FLANNEL-FWD"])
    node.run(["iptables", "-t", "filter", "-A", "FORWARD"] + fwd + ["-j", "FLANNEL-FWD"])
    node.run(["iptables", "-t", "filter", "-A", "FLANNEL-FWD", "-s", net] + fwd + ["-j", "ACCEPT"])
    node.run(["iptables", "-t", "filter", "-A", "FLANNEL-FWD", "-d", net] + fwd + ["-j", "ACCEPT"])


def iptables_rules(node):
    """Both tables' rules as iptables-save prints them, counters and comments of the dump cut."""
    out = []
    for table in ("nat", "filter"):
        text = node.run(["iptables-save", "-t", table]).stdout
        out += [line for line in text.splitlines() if line.startswith("-A ")]
    return out


def link(node, name):
    return json.loads(node.run(["ip", "-d", "-j", "link", "show", name]).stdout)[0]


def http_status(node, path):
    out = node.run(["curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}",
                    "http://127.0.0.1:%d%s" % (HEALTHZ_PORT, path)], check=False).stdout
    return int(out) if out.isdigit() else 0


def build_upstream_node(c, node, api, peers):
    """node as upstream flannel left it; peers: [(node, subnet, mac)] of the other nodes."""
    ip = node.underlay_ip
    mtu = int(link(node, node.underlay_if)["mtu"]) - 50
    node.ip("link", "add", "flannel.1", "address", UPSTREAM_MAC, "mtu", str(mtu), "type", "vxlan", "id", "1",
            "local", ip, "dev", node.underlay_if, "dstport", "8472", "nolearning")
    node.ip("addr", "add", "10.244.2.0/32", "dev", "flannel.1")
    node.ip("link", "set", "flannel.1", "up")
    for peer, subnet, mac in peers:
        gw = subnet.split("/")[0]
        node.ip("neigh", "replace", gw, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
        node.run(["bridge", "fdb", "replace", mac, "dev", "flannel.1", "dst", peer.underlay_ip, "self", "permanent"])
        node.ip("route", "replace", subnet, "via", gw, "dev", "flannel.1", "onlink")
    with open(c.subnet_file(node), "w") as f:
        f.write("FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=10.244.2.1/24\nFLANNEL_MTU=%d\nFLANNEL_IPMASQ=true\n"
                % (NETWORK, mtu))
    api.set_annotations(node.role, upstream_annotations(ip, UPSTREAM_MAC))
    upstream_iptables(node)
    # The pod, as bridge (cni0, isDefaultGateway, hairpin) and host-local left it.
    pod_ns = c.lab.pod_netns("node2-old")
    node.ip("link", "add", "cni0", "mtu", str(mtu), "type", "bridge")
    node.ip("addr", "add", "10.244.2.1/24", "dev", "cni0")
    node.ip("link", "set", "cni0", "up")
    node.ip("link", "add", "veth0ld", "mtu", str(mtu), "type", "veth", "peer", "name", "eth0", "netns", pod_ns.path)
    node.ip("link", "set", "veth0ld", "master", "cni0", "up")
    node.run(["bridge", "link", "set", "dev", "veth0ld", "hairpin", "on"])
    pod_ns.ip("addr", "add", OLD_POD_IP + "/24", "dev", "eth0")
    pod_ns.ip("link", "set", "eth0", "up")
    pod_ns.ip("link", "set", "lo", "up")
    pod_ns.ip("route", "add", "default", "via", "10.244.2.1")
    store = os.path.join(c.node_dir(node), "ipam", "cbr0")
    os.makedirs(store)
    with open(os.path.join(store, OLD_POD_IP), "w") as f:
        f.write(OLD_POD_CID + "\r\neth0")
    with open(os.path.join(store, "last_reserved_ip.0"), "w") as f:
        f.write(OLD_POD_IP)
    return pod_ns


@pytest.fixture
def lab(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        yield lab


def test_upstream_node_migrates_in_place(lab):
    from cni.executable import install
    c = KubeFlannelCluster(lab, backend="vxlan",
                           flanneld_args=["--healthz-port", str(HEALTHZ_PORT), "--reconcile-period", "2"])
    ns, ip = c.api_namespace()
    api = FakeKubeApi(host=ip, port=c.API_PORT, netns=ns.path, bookmark_interval=1.0)
    try:
        c.api_url = api.url
        for i in range(1, 4):
            api.add_node("node%d" % i, pod_cidr=pod_cidr(i))
        install(c.bin_dir, "/usr/bin/python3")
        node1 = c.add_node("node1")
        node2 = c._new_node("node2", c.underlay)      # upstream's node: no podnet daemon yet
        node3 = c.add_node("node3")
        wait_until(lambda: all(os.path.exists(c.subnet_file(n)) for n in (node1, node3)), 20,
                   "node1 and node3 to be up")
        pod1 = c.add_pod(node1, "node1-a")
        c.add_pod(node3, "node3-a")

        def peer_mac(node):
            return json.loads(api.node(node.role)["metadata"]["annotations"][PREFIX + "backend-data"])["VtepMAC"]
        old_pod = build_upstream_node(c, node2, api, [(node1, pod_cidr(1), peer_mac(node1)),
                                                      (node3, pod_cidr(3), peer_mac(node3))])
        # The podnet nodes learn node2 from its annotations, as they would from upstream's.
        wait_until(lambda: old_pod.run(["ping", "-c", "1", "-W", "1", pod1.ip], check=False).returncode == 0,
                   20, "the upstream pod to reach node1's pod")

        before = {"link": link(node2, "flannel.1"), "iptables": iptables_rules(node2),
                  "annotations": dict(api.node("node2")["metadata"]["annotations"]),
                  "netns": os.stat(old_pod.path).st_ino, "subnet_env": open(c.subnet_file(node2)).read()}
        writes_before = len(api.writes())

        count = int(PING_SECONDS / PING_INTERVAL)
        ping = old_pod.popen(["ping", "-n", "-q", "-i", str(PING_INTERVAL), "-c", str(count), "-W", "1", pod1.ip],
                             stdout=subprocess.PIPE, text=True)
        try:
            c.start_flanneld(node2)
            wait_until(lambda: http_status(node2, "/readyz") == 200, 20, "podnet's flanneld on node2 to be ready")
            out, _ = ping.communicate(timeout=PING_SECONDS + 20)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait()
        sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
        assert sent == count and received == sent, out          # not one packet lost

        after = link(node2, "flannel.1")
        assert (after["ifindex"], after["address"]) == (before["link"]["ifindex"], UPSTREAM_MAC)
        ann = api.node("node2")["metadata"]["annotations"]
        assert {k: ann[k] for k in before["annotations"]} == before["annotations"]
        # Nothing rewritten on the Node but its NetworkUnavailable condition.
        new_writes = api.writes()[writes_before:]
        assert new_writes and all(b"annotations" not in w.body for w in new_writes), new_writes
        env = open(c.subnet_file(node2)).read()
        assert "FLANNEL_SUBNET=10.244.2.1/24" in env and "FLANNEL_NETWORK=%s" % NETWORK in env, env
        assert iptables_rules(node2) == before["iptables"]
        routes = node2.run(["ip", "-j", "route", "show", "dev", "flannel.1"]).stdout
        proto = {r["dst"]: r.get("protocol") for r in json.loads(routes)}
        assert proto == {pod_cidr(1): "77", pod_cidr(3): "77"}, proto     # upstream's replaced in place
        assert os.stat(old_pod.path).st_ino == before["netns"]
        assert OLD_POD_IP + "/24" in old_pod.run(["ip", "-o", "addr", "show", "eth0"]).stdout

        new_pod = c.add_pod(node2, "node2-b")
        assert new_pod.ip != OLD_POD_IP and new_pod.ip.startswith("10.244.2."), new_pod
        for src, dst in ((new_pod.ns, pod1.ip), (new_pod.ns, OLD_POD_IP), (old_pod, new_pod.ip)):
            assert src.run(["ping", "-c", "1", "-W", "2", dst], check=False).returncode == 0, (src, dst)
    finally:
        for role in list(c.flanneld):
            node = next(n for n in c.nodes if n.role == role)
            c.stop_flanneld(node)
        api.close()
