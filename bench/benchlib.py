"""What the benchmark scripts share: timing a plugin run inside a node
namespace, and the summary statistics they report."""
import json
import os
import select
import statistics
import subprocess
import time

from podnet.net.netns import open_netns, setns


def bridge_config(data_dir, masq=False):
    """The bridge + host-local config the CNI latency benches time (ours and the reference)."""
    return {"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "cni0",
            "isGateway": True, "ipMasq": masq,
            "ipam": {"type": "host-local", "subnet": "10.88.0.0/16", "dataDir": data_dir,
                     "routes": [{"dst": "0.0.0.0/0"}]}}


def run_plugin(node_path, plugin, command, container_id, netns_path, stdin, cni_path):
    """Run one CNI plugin process inside the node netns; returns (ms, stdout).

    setns happens between fork and exec, so neither side pays `ip netns exec`.
    """
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
           "CNI_CONTAINERID": container_id, "CNI_NETNS": netns_path, "CNI_IFNAME": "eth0",
           "CNI_PATH": cni_path}
    fd = open_netns(node_path)
    try:
        start = time.perf_counter()
        proc = subprocess.run([plugin], input=stdin, env=env, capture_output=True,
                              preexec_fn=lambda: setns(fd), pass_fds=(fd,))
        elapsed = (time.perf_counter() - start) * 1000
    finally:
        os.close(fd)
    if proc.returncode != 0:
        raise SystemExit("%s %s failed: %s %s" % (plugin, command, proc.stdout, proc.stderr))
    return elapsed, proc.stdout


def summary(samples):
    """(median, p90) of a list of numbers."""
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


# ---- throughput: iperf3 and the raw paths podnet's datapaths are compared with ----

UDP_MTU, VXLAN_MTU = 1472, 1450


def attach_pod(lab, node, name, hostif, prefix, mtu):
    """A pod namespace with <prefix>.2/24, its node side <prefix>.1/24."""
    pod = lab.pod_netns(name)
    node.ip("link", "add", hostif, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "netns", pod.name)
    node.ip("addr", "add", prefix + ".1/24", "dev", hostif)
    node.ip("link", "set", hostif, "up")
    pod.ip("link", "set", "lo", "up")
    pod.ip("addr", "add", prefix + ".2/24", "dev", "eth0")
    pod.ip("link", "set", "eth0", "up")
    pod.ip("route", "add", "default", "via", prefix + ".1")
    return pod


def setup_vxlan(nodes):
    """flannel's vxlan datapath between the nodes for 10.245.0.0/16."""
    macs = {}
    for i, node in enumerate(nodes, 1):
        node.ip("link", "add", "vx", "mtu", VXLAN_MTU, "type", "vxlan", "id", 1, "local", node.underlay_ip,
                "dev", "eth0", "dstport", 8472, "nolearning")
        node.ip("addr", "add", "10.245.%d.0/32" % i, "dev", "vx")
        node.ip("link", "set", "vx", "up")
        macs[i] = node.ip_json("link", "show", "vx")[0]["address"]
    for i, node in enumerate(nodes, 1):
        for j, peer in enumerate(nodes, 1):
            if i == j:
                continue
            node.ip("route", "add", "10.245.%d.0/24" % j, "via", "10.245.%d.0" % j, "dev", "vx", "onlink")
            node.ip("neigh", "replace", "10.245.%d.0" % j, "lladdr", macs[j], "dev", "vx", "nud", "permanent")
            node.run(["bridge", "fdb", "append", macs[j], "dev", "vx", "dst", peer.underlay_ip,
                      "self", "permanent"])


def iperf(client_ns, server_ns, server_ip, seconds):
    server = server_ns.popen(["iperf3", "-s", "-1", "-B", server_ip, "--forceflush"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, said = time.monotonic() + 10, b""
        while b"listening" not in said:             # "-----", "Server listening on 5201", ...
            ready, _, _ = select.select([server.stdout], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                raise SystemExit("iperf3 server did not start in %s" % server_ns.name)
            said += os.read(server.stdout.fileno(), 4096)
        out = client_ns.run(["iperf3", "-c", server_ip, "-t", seconds, "-J"], timeout=seconds + 30).stdout
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
    end = json.loads(out)["end"]
    return end["sum_received"]["bits_per_second"] / 1e9, end["sum_sent"].get("retransmits", 0)


