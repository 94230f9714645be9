"""kubelet's path to podnet's CNI plugins: containerd 1.6's CRI plugin runs them.

Two flannel (vxlan) nodes of a lab `Cluster`, each with its own containerd
(netns_tests/containerd_lab.py) whose CRI plugin has podnet's plugins in its bin_dir and
the node's flannel conflist in its conf_dir. The tests speak the CRI over gRPC as kubelet
does (netns_tests/cri.py): RunPodSandbox with kubelet's metadata, PodSandboxStatus,
StopPodSandbox, RemovePodSandbox; containerd does the rest (the netns, libcni, the
plugins, the sandbox process). Traffic is real, between the sandboxes' network namespaces,
entered through their processes (`nsenter --net=/proc/<pid>/ns/net`) inside the nodes.

One cluster serves the module (etcd and two flanneld take seconds to start); each test
makes and removes its own sandboxes. flanneld runs without --ip-masq, so the bridge
masquerades for each sandbox (a CNI-<hash> chain naming it): a chain for the
leave-nothing checks to look for.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from lab.cluster import _SOURCE_ROOT, NETNS_DIR, Cluster, Lab, exec_argv

import containerd_lab
from containerd_lab import Containerd, sandbox_netns_path
from helpers import allocation_files, wait_until

PYTHON = sys.executable
NETWORK = "cbr0"            # the conflist's network name: host-local's store directory
TIMINGS = {}                # what -> [seconds], printed at the module's end (pytest -s)


def timed(what, call, *args, **kw):
    started = time.monotonic()
    try:
        return call(*args, **kw)
    finally:
        TIMINGS.setdefault(what, []).append(time.monotonic() - started)


def print_timings():
    for what, seconds in sorted(TIMINGS.items()):
        seconds = sorted(seconds)
        print("containerd CRI: %-40s n=%-3d median %6.1f ms  max %6.1f ms"
              % (what, len(seconds), 1000 * seconds[len(seconds) // 2], 1000 * seconds[-1]))


@pytest.fixture(scope="module")
def cri_cluster(netns_usable):
    """(Cluster, {node role: Containerd}) with containerd running on both nodes."""
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    reason = containerd_lab.unavailable()
    if reason:
        pytest.skip(reason)
    containerd_lab.sweep_stale_cgroups()        # sandboxes of a run that was SIGKILLed
    with Lab() as lab:
        cluster = Cluster(lab, nodes=2, backend="vxlan", ip_masq=False).start()
        image = os.path.join(lab.workdir, "pause.tar")
        containerd_lab.build_sandbox_image(image)
        runtimes = {}
        try:
            for node in cluster.nodes:
                runtime = Containerd(node, os.path.join(cluster.node_dir(node), "containerd"),
                                     cluster.conflist(node), PYTHON, _SOURCE_ROOT)
                runtimes[node.role] = runtime
                timed("containerd start to CRI ready", runtime.start, image)
            yield cluster, runtimes
        finally:
            print_timings()
            errors = []
            for runtime in runtimes.values():
                try:
                    runtime.close()
                except Exception as e:
                    errors.append("%s: %s" % (runtime.node.role, e))
            assert not errors, errors


class Sandbox:
    """One pod sandbox as the test knows it: where it runs and what containerd said of it."""

    def __init__(self, runtime, name, namespace, attempt, sandbox_id, status, info):
        self.runtime, self.name, self.namespace, self.attempt = runtime, name, namespace, attempt
        self.id, self.status, self.info = sandbox_id, status, info
        self.ip = status.network.ip
        self.host_veth = None       # the node's end of its eth0, found by host_veth_of()

    def __repr__(self):
        return "Sandbox(%s/%s on %s, %s)" % (self.namespace, self.name, self.runtime.node.role, self.ip)


def run_sandboxes(runtimes, per_node, prefix, port_mappings=None, parallel=False):
    """`per_node` sandboxes on each runtime, one after another, or all at once (`parallel`:
    as kubelet's pod workers start a node's pods, and two nodes' kubelets run side by side)."""
    wanted = []
    for role, runtime in sorted(runtimes.items()):
        for i in range(per_node):
            name = "%s-%s-%d" % (prefix, role, i)
            wanted.append((runtime, name, "team-a" if i % 2 else "default", i % 2, (port_mappings or {}).get(name, ())))

    def run(runtime, name, namespace, attempt, ports):
        what = "RunPodSandbox + status, %s" % ("%d at once" % len(wanted) if parallel else "one at a time")
        sandbox_id, status, info = timed(what, runtime.run_pod, name, namespace, attempt=attempt, port_mappings=ports)
        return Sandbox(runtime, name, namespace, attempt, sandbox_id, status, info)

    if not parallel:
        return [run(*args) for args in wanted]
    with concurrent.futures.ThreadPoolExecutor(len(wanted)) as pool:
        futures = [pool.submit(run, *args) for args in wanted]
        done = [f.result() if not f.exception() else f.exception() for f in futures]
    started = [s for s in done if isinstance(s, Sandbox)]
    failed = [e for e in done if not isinstance(e, Sandbox)]
    if failed:
        remove_sandboxes(started)
        raise failed[0]
    return started


def remove_sandboxes(sandboxes):
    """Stop and remove, as kubelet does when a pod goes; sandboxes already removed are skipped."""
    for sandbox in sandboxes:
        client = sandbox.runtime.client
        if sandbox.id in {s.id for s in client.list_pod_sandbox()}:
            client.stop_pod_sandbox(sandbox.id)
            client.remove_pod_sandbox(sandbox.id)


def ipam_owner(cluster, sandbox):
    """The container id in host-local's file for the sandbox's address (None: no file)."""
    path = os.path.join(cluster.node_dir(sandbox.runtime.node), "ipam", NETWORK, sandbox.ip)
    try:
        with open(path) as f:
            return f.read().split()[0]
    except FileNotFoundError:
        return None


def host_veth_of(sandbox):
    """(ifindex, name) of the node's end of the sandbox's eth0 (its peer index, read inside)."""
    link = sandbox.runtime.pod_run(sandbox.id, ["ip", "-j", "link", "show", "eth0"]).stdout
    peer = json.loads(link)[0]["link_index"]
    for entry in sandbox.runtime.node.ip_json("link", "show"):
        if entry["ifindex"] == peer:
            return peer, entry["ifname"]
    raise AssertionError("no link %d in %s for %r" % (peer, sandbox.runtime.node.name, sandbox))


def ping_all(sandboxes, count=1):
    """{(from, to): ping output} for every ordered pair that lost a packet; each source pings
    its targets in turn, the sources all at once."""
    procs = {}
    for src in sandboxes:
        targets = " ".join(s.ip for s in sandboxes if s is not src)
        script = ("for ip in %s; do ping -n -q -c %d -W 2 $ip >/dev/null || echo $ip; done" % (targets, count))
        argv = exec_argv(src.runtime.node.name, src.runtime.pod_argv(src.id, ["sh", "-c", script]))
        procs[src] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = {}
    by_ip = {s.ip: s for s in sandboxes}
    for src, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = " ".join(s.ip for s in sandboxes if s is not src) + " " + proc.communicate()[0]
        for ip in out.split():
            failed[(src.name, by_ip.get(ip, ip))] = out
    return failed


def start_echo(sandbox, port=8080):
    """lab.echo's HTTP server inside the sandbox's netns, saying the sandbox's name."""
    argv = sandbox.runtime.pod_argv(sandbox.id, [PYTHON, "-m", "lab.echo", "serve", "--name", sandbox.name,
                                                 "--port", port])
    return sandbox.runtime.node.popen(argv, cwd=_SOURCE_ROOT, env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def http_get(src, dst, port=8080, count=1):
    out = src.runtime.pod_run(src.id, [PYTHON, "-m", "lab.echo", "get", "http://%s:%d/" % (dst.ip, port),
                                       "--count", count, "--timeout", 2], check=False)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {"answers": {}}


def stop_process(node, proc):
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc in node.processes:
        node.processes.remove(proc)


def test_ten_sandboxes_get_podnet_addresses_and_reach_each_other(cri_cluster):
    cluster, runtimes = cri_cluster
    started = time.monotonic()
    sandboxes = run_sandboxes(runtimes, 5, "web", parallel=True)
    TIMINGS.setdefault("10 RunPodSandbox at once, wall", []).append(time.monotonic() - started)
    echo = []
    try:
        for sandbox in sandboxes:
            status, runtime = sandbox.status, sandbox.runtime
            assert status.state == runtime.client.pb.SANDBOX_READY, sandbox
            metadata = status.metadata
            assert (metadata.name, metadata.namespace, metadata.attempt) == (sandbox.name, sandbox.namespace,
                                                                             sandbox.attempt)
            assert status.labels["io.kubernetes.pod.uid"] == metadata.uid and metadata.uid
            # the address containerd reports is the one podnet's host-local gave this sandbox
            assert ipam_owner(cluster, sandbox) == sandbox.id, (sandbox, allocation_files(
                os.path.join(cluster.node_dir(runtime.node), "ipam")))
            cni = sandbox.info["info"]["cniResult"]["Interfaces"]["eth0"]
            assert [c["IP"] for c in cni["IPConfigs"]] == [sandbox.ip]
            # containerd's netns is a bind mount under its own state dir, never in the host's /var/run/netns
            netns = sandbox_netns_path(sandbox.info)
            assert netns.startswith(runtime.state + os.sep) and cni["Sandbox"] == netns, netns
            assert not os.path.exists(os.path.join(NETNS_DIR, os.path.basename(netns)))
            inside = runtime.pod_run(sandbox.id, ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout
            assert " %s/24 " % sandbox.ip in inside, inside
        subnets = {node.role: open(cluster.subnet_file(node)).read() for node in cluster.nodes}
        for sandbox in sandboxes:
            assert "FLANNEL_SUBNET=%s." % sandbox.ip.rsplit(".", 1)[0] in subnets[sandbox.runtime.node.role]
        assert len({s.ip for s in sandboxes}) == 10

        assert ping_all(sandboxes) == {}
        echo = [(s, start_echo(s)) for s in sandboxes]
        node1 = [s for s in sandboxes if s.runtime.node.role == "node1"]
        node2 = [s for s in sandboxes if s.runtime.node.role == "node2"]
        pairs = list(zip(node1, node2)) + list(zip(node2, node1))
        for src, dst in pairs:          # TCP across the overlay, both ways
            wait_until(lambda src=src, dst=dst: http_get(src, dst)["answers"].get(dst.name) == 1, 15,
                       "%r to answer %r over HTTP" % (dst, src), interval=0.2)
    finally:
        for sandbox, proc in echo:
            stop_process(sandbox.runtime.node, proc)
        remove_sandboxes(sandboxes)


def sandbox_rules(node, sandbox):
    """iptables-save lines (every table) in the node that name the sandbox's id."""
    return [line for line in node.run(["iptables-save"]).stdout.splitlines() if sandbox.id in line]


def test_stop_and_remove_leave_no_veth_no_address_no_chain(cri_cluster):
    cluster, runtimes = cri_cluster
    sandboxes = run_sandboxes(runtimes, 2, "gone")
    try:
        for sandbox in sandboxes:
            sandbox.host_veth = host_veth_of(sandbox)
            assert sandbox_rules(sandbox.runtime.node, sandbox), "no masquerade chain names %r" % sandbox
        for sandbox in sandboxes:
            runtime, node = sandbox.runtime, sandbox.runtime.node
            netns = sandbox_netns_path(sandbox.info)
            timed("StopPodSandbox", runtime.client.stop_pod_sandbox, sandbox.id)
            status, _ = runtime.client.pod_sandbox_status(sandbox.id)
            assert status.state == runtime.client.pb.SANDBOX_NOTREADY
            # StopPodSandbox ran CNI DEL: the network is gone before RemovePodSandbox
            links = {entry["ifindex"]: entry["ifname"] for entry in node.ip_json("link", "show")}
            assert sandbox.host_veth[0] not in links and sandbox.host_veth[1] not in links.values(), sandbox
            assert ipam_owner(cluster, sandbox) is None, sandbox
            assert sandbox_rules(node, sandbox) == []
            timed("RemovePodSandbox", runtime.client.remove_pod_sandbox, sandbox.id)
            assert sandbox.id not in [s.id for s in runtime.client.list_pod_sandbox()]
            assert not os.path.exists(netns), netns
            results = os.path.join(runtime.workdir, "var-lib", "cni", "results")
            assert not [f for f in os.listdir(results) if sandbox.id in f], os.listdir(results)
        for node in cluster.nodes:
            saved = node.run(["iptables-save"]).stdout
            assert not [line for line in saved.splitlines() if line.startswith(":CNI-")], saved
            assert allocation_files(os.path.join(cluster.node_dir(node), "ipam"), NETWORK) == []
            assert not [n for n in node.link_names() if n.startswith("veth")], node.link_names()
    finally:
        remove_sandboxes(sandboxes)


# containerd 1.6's go-cni sends Go field names (HostPort, ContainerPort, Protocol, HostIP: no JSON
# tags); portmap matches them as Go's decoder does (this test found it)
def test_host_port_through_containerd(cri_cluster):
    cluster, runtimes = cri_cluster
    node1, node2 = cluster.nodes
    sandboxes = run_sandboxes({"node1": runtimes["node1"]}, 1, "hostport", {"hostport-node1-0": [("TCP", 8080, 30080)]})
    sandbox = sandboxes[0]
    echo = start_echo(sandbox)
    try:
        assert any("CNI-DN-" in line for line in sandbox_rules(node1, sandbox))
        url = "http://%s:30080/" % node1.underlay_ip
        wait_until(lambda: sandbox.name in node2.run([PYTHON, "-m", "lab.echo", "get", url], check=False,
                                                     env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT)).stdout,
                   15, "the host port to reach %r" % sandbox, interval=0.2)
    finally:
        stop_process(node1, echo)
        remove_sandboxes(sandboxes)
    assert sandbox_rules(node1, sandbox) == []


def test_containerd_restart_keeps_sandbox_networking(cri_cluster):
    cluster, runtimes = cri_cluster
    sandboxes = run_sandboxes(runtimes, 2, "rs")
    try:
        before = {s.id: (s.ip, ipam_owner(cluster, s)) for s in sandboxes}
        assert ping_all(sandboxes) == {}
        for runtime in runtimes.values():
            runtime.stop()                                  # SIGKILL, by PID
        assert ping_all(sandboxes) == {}, "the datapath must not need containerd"
        for runtime in runtimes.values():
            timed("containerd restart to CRI ready", runtime.start)     # same root, state, mount namespace
        for sandbox in sandboxes:
            status, info = sandbox.runtime.client.pod_sandbox_status(sandbox.id)
            assert status.state == sandbox.runtime.client.pb.SANDBOX_READY, sandbox
            assert status.network.ip == sandbox.ip
            assert info["info"]["pid"] == sandbox.info["info"]["pid"] and not info["info"]["netNamespaceClosed"]
            assert sandbox_netns_path(info) == sandbox_netns_path(sandbox.info)
            assert (status.network.ip, ipam_owner(cluster, sandbox)) == before[sandbox.id]
        assert ping_all(sandboxes) == {}
    finally:
        remove_sandboxes(sandboxes)
    # a restarted containerd still tears down what its predecessor set up (libcni's cached result)
    for node in cluster.nodes:
        assert allocation_files(os.path.join(cluster.node_dir(node), "ipam"), NETWORK) == []
        assert not [n for n in node.link_names() if n.startswith("veth")]


def test_sandbox_image_is_a_fixed_oci_layout(tmp_path):
    """The same bytes every run (so containerd imports it once per root), in the layout ctr reads."""
    first, second = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    assert containerd_lab.build_sandbox_image(first) == containerd_lab.build_sandbox_image(second)
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
    with tarfile.open(first) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))
        (entry,) = index["manifests"]
        assert entry["annotations"]["io.containerd.image.name"] == containerd_lab.SANDBOX_IMAGE
        manifest = json.load(tar.extractfile("blobs/sha256/" + entry["digest"].split(":")[1]))
        config = json.load(tar.extractfile("blobs/sha256/" + manifest["config"]["digest"].split(":")[1]))
        (layer,) = manifest["layers"]
        with tarfile.open(fileobj=tar.extractfile("blobs/sha256/" + layer["digest"].split(":")[1])) as rootfs:
            sleep = rootfs.getmember("bin/sleep")
    assert "oci-layout" in names and config["rootfs"]["diff_ids"] == [layer["digest"]]
    assert config["config"]["Entrypoint"] + config["config"]["Cmd"] == ["/bin/sleep", "infinity"]
    assert sleep.isfile() and sleep.mode & 0o111 and sleep.size == os.path.getsize(containerd_lab.BUSYBOX)


def test_cgroup_mounts_are_mounted_again_as_the_host_has_them(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n"
        "31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    assert containerd_lab.cgroup_mount_commands(str(mountinfo)) == [
        "mkdir -p /sys/fs/cgroup", "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup",
        "mkdir -p /sys/fs/cgroup/cpu", "mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu",
        "mkdir -p /sys/fs/cgroup/systemd", "mount -t cgroup -o name=systemd cgroup /sys/fs/cgroup/systemd",
        "mkdir -p /sys/fs/cgroup/unified", "mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified"]
