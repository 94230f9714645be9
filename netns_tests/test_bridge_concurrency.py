"""Many bridge ADDs and DELs at once in one node, and repeated ADD/DEL of one pod.

Fifty plugin processes race for the bridge, the host-local store and the nat
table: every ADD must succeed with its own address and a working veth, and
fifty DELs at once must leave no veth, allocation file or CNI- chain behind.
"""
import json
import os
import subprocess
import time

from lab.cluster import finish_cni, start_cni

from helpers import allocation_files

NETWORK = "podnet"
BRIDGE = "cni0"
SUBNET = "10.244.0.0/24"
N = 50
TIMEOUT = 60


def bridge_conf(data_dir, subnet=SUBNET):
    return {
        "cniVersion": "1.0.0", "name": NETWORK, "type": "bridge", "bridge": BRIDGE,
        "isGateway": True, "ipMasq": True,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": data_dir},
    }


def unreachable(ns, targets):
    """Targets not answering one ping from `ns`: one shell, all pings in parallel."""
    script = " ".join("(ping -c1 -W2 -q %s >/dev/null 2>&1 || echo %s) &" % (t, t)
                      for t in targets) + " wait"
    return ns.run(script, timeout=TIMEOUT).stdout.split()


def host_veths(node):
    """veth links in the node other than its underlay eth0."""
    return {l["ifname"] for l in node.ip_json("link", "show", "type", "veth")} - {"eth0"}


def nat_rules(node, pattern="CNI-"):
    return [l for l in node.run(["iptables-save", "-t", "nat"]).stdout.splitlines()
            if pattern in l]


def test_fifty_adds_then_fifty_dels_at_once(lab, cni_bin):
    node = lab.node("node1", lab.underlay())
    data_dir = os.path.join(lab.workdir, "ipam")
    conf = bridge_conf(data_dir)
    pods = [lab.pod_netns("p%02d" % i) for i in range(N)]
    ids = ["ctr%02d" % i for i in range(N)]

    results = finish_cni([start_cni(node, os.path.join(cni_bin, "bridge"), "ADD", cid, pod.path, "eth0", conf, cni_bin)
                          for cid, pod in zip(ids, pods)])
    failed = [(cid, rc, out, err) for cid, (rc, out, err) in zip(ids, results) if rc != 0]
    assert failed == [], failed[:3]
    addrs = [json.loads(out)["ips"][0]["address"].split("/")[0] for _, out, _ in results]
    assert len(set(addrs)) == N
    assert len(host_veths(node)) == N
    assert len(allocation_files(data_dir, NETWORK)) == N
    assert len(nat_rules(node, "-A POSTROUTING")) == N
    assert len(nat_rules(node, ":CNI-")) == N
    # Each pod has exactly its address, and answers.
    for pod, addr in zip(pods[:5], addrs):
        got = [a["local"] for a in pod.ip_json("-4", "addr", "show", "eth0")[0]["addr_info"]]
        assert got == [addr]
    assert unreachable(node, addrs) == []

    results = finish_cni([start_cni(node, os.path.join(cni_bin, "bridge"), "DEL", cid, pod.path, "eth0", conf, cni_bin)
                          for cid, pod in zip(ids, pods)])
    failed = [(cid, rc, out, err) for cid, (rc, out, err) in zip(ids, results) if rc != 0]
    assert failed == [], failed[:3]
    assert host_veths(node) == set()
    assert allocation_files(data_dir, NETWORK) == []
    assert nat_rules(node) == []
    assert all(pod.link_names() == {"lo"} for pod in pods)


def test_repeated_add_is_idempotent_and_repeated_del_succeeds(lab, cni_bin):
    node = lab.node("node1", lab.underlay())
    pod = lab.pod_netns("web")
    data_dir = os.path.join(lab.workdir, "ipam")
    conf = bridge_conf(data_dir)
    bridge = os.path.join(cni_bin, "bridge")

    def cni(command):
        out = node.run_cni(bridge, command, "web1", pod.path, "eth0", conf, cni_bin,
                           timeout=TIMEOUT)
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    first = cni("ADD").result
    nat_before = nat_rules(node)
    veths_before = host_veths(node)
    assert len(nat_before) == 4        # chain, jump, ACCEPT subnet, MASQUERADE
    for _ in range(2):
        again = cni("ADD").result
        assert again["ips"] == first["ips"]
        assert again["interfaces"][1]["name"] == first["interfaces"][1]["name"]
        assert again["interfaces"][2]["mac"] == first["interfaces"][2]["mac"]
        assert sorted(nat_rules(node)) == sorted(nat_before)     # no duplicated rules
        assert host_veths(node) == veths_before
        assert allocation_files(data_dir, NETWORK) == [first["ips"][0]["address"].split("/")[0]]
    addrs = pod.ip_json("-4", "addr", "show", "eth0")[0]["addr_info"]
    assert len(addrs) == 1
    assert unreachable(node, [addrs[0]["local"]]) == []

    for _ in range(3):
        cni("DEL")
        assert host_veths(node) == set()
        assert allocation_files(data_dir, NETWORK) == []
        assert nat_rules(node) == []
        assert pod.link_names() == {"lo"}
    # DEL once the sandbox is gone (the runtime deleted the netns first).
    out = node.run_cni(bridge, "DEL", "web1", pod.path + "-gone", "eth0", conf, cni_bin)
    assert out.returncode == 0, out.stdout + out.stderr


def test_del_after_the_netns_is_gone(lab, cni_bin):
    """The runtime removed the sandbox first: DEL still frees the address and the
    masquerade chain (the veth went with the netns)."""
    node = lab.node("node1", lab.underlay())
    pod = lab.pod_netns("gone")
    data_dir = os.path.join(lab.workdir, "ipam")
    conf = bridge_conf(data_dir)
    bridge = os.path.join(cni_bin, "bridge")
    out = node.run_cni(bridge, "ADD", "gone1", pod.path, "eth0", conf, cni_bin, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(nat_rules(node)) == 4
    subprocess.run(["ip", "netns", "delete", pod.name], check=True)
    for netns in (pod.path, ""):        # the old path, then none at all
        out = node.run_cni(bridge, "DEL", "gone1", netns, "eth0", conf, cni_bin, timeout=TIMEOUT)
        assert out.returncode == 0, out.stdout + out.stderr
        assert nat_rules(node) == []
        assert allocation_files(data_dir, NETWORK) == []
    # The kernel dismantles a deleted netns asynchronously; the veth pair goes with it.
    deadline = time.monotonic() + 10
    while host_veths(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_veths(node) == set()


def test_failed_rerun_keeps_the_running_attachment(lab, cni_bin):
    """A repeated ADD that fails (here: a route whose gateway is not on-link) must
    not release the address or the masquerade rules the running pod still uses."""
    node = lab.node("node1", lab.underlay())
    pod = lab.pod_netns("web")
    data_dir = os.path.join(lab.workdir, "ipam")
    conf = bridge_conf(data_dir)
    bridge = os.path.join(cni_bin, "bridge")
    first = node.run_cni(bridge, "ADD", "web1", pod.path, "eth0", conf, cni_bin, timeout=TIMEOUT)
    assert first.returncode == 0, first.stdout + first.stderr
    addr = first.result["ips"][0]["address"].split("/")[0]
    nat_before, veths_before = nat_rules(node), host_veths(node)

    bad = dict(conf, ipam=dict(conf["ipam"], routes=[{"dst": "10.0.0.0/8", "gw": "192.0.2.1"}]))
    out = node.run_cni(bridge, "ADD", "web1", pod.path, "eth0", bad, cni_bin, timeout=TIMEOUT)
    assert out.returncode != 0 and out.result["code"] == 101, out.stdout
    assert "10.0.0.0/8 via 192.0.2.1" in out.result["msg"]
    assert allocation_files(data_dir, NETWORK) == [addr]
    assert sorted(nat_rules(node)) == sorted(nat_before)
    assert host_veths(node) == veths_before
    assert unreachable(node, [addr]) == []
    # The address is still taken: the next pod gets another one.
    other = lab.pod_netns("next")
    out = node.run_cni(bridge, "ADD", "next1", other.path, "eth0", conf, cni_bin, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.result["ips"][0]["address"].split("/")[0] != addr
