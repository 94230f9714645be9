"""The namespace harness itself: it builds what it says and leaves nothing behind."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lab.cluster import Lab, parse_netns_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def netns_names():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return parse_netns_list(out.stdout)


def ours(prefix):
    return [n for n in netns_names() if n.startswith(prefix + "-")]


def root_links():
    """Interface names of the root namespace (read only)."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(": ")[1].split("@")[0] for line in out.stdout.splitlines()}


def test_two_nodes_on_an_underlay_ping_each_other(lab):
    underlay = lab.underlay("192.168.50.0/24")
    node1 = lab.node("node1", underlay)
    node2 = lab.node("node2", underlay, ip="192.168.50.20")
    assert node1.underlay_ip == "192.168.50.1"
    assert node2.underlay_ip == "192.168.50.20"
    assert node2.underlay_cidr == "192.168.50.20/24"
    node1.run(["ping", "-c", "1", "-W", "2", node2.underlay_ip])
    node2.run(["ping", "-c", "1", "-W", "2", node1.underlay_ip])
    # eth0 is in each node, both switch ports on br0, and the switch has no eth0.
    assert "eth0" in node1.link_names()
    ports = {link["ifname"] for link in underlay.switch.ip_json("link", "show", "master", "br0")}
    assert ports == {"ve-node1", "ve-node2"}


def test_shell_strings_input_and_failures(lab):
    ns = lab.namespace("shell")
    assert ns.run("echo $((6*7))").stdout == "42\n"
    assert ns.run(["cat"], input="hello").stdout == "hello"
    assert ns.run("exit 3", check=False).returncode == 3
    with pytest.raises(subprocess.CalledProcessError, match="boom"):
        ns.run("echo boom >&2; exit 1")


def test_namespace_defaults(lab):
    ns = lab.namespace("plain")
    pod = lab.pod_netns("p1")
    fwd = lab.namespace("router", ip_forward=True)
    lo = ns.ip_json("link", "show", "lo")[0]
    assert "UP" in lo["flags"]
    assert "UP" not in pod.ip_json("link", "show", "lo")[0]["flags"]   # left to CNI loopback
    assert pod.link_names() == {"lo"}
    assert pod.path == "/var/run/netns/%s-pod-p1" % lab.prefix
    assert fwd.run("sysctl -n net.ipv4.ip_forward").stdout.strip() == "1"
    with pytest.raises(ValueError):
        lab.namespace("plain")


def test_popen_runs_inside_and_is_killed_at_cleanup():
    lab = Lab(kill_timeout=0.5)
    try:
        ns = lab.node("n1", lab.underlay())
        polite = ns.popen(["sleep", "1000"])
        # Ignores SIGTERM, as a wedged daemon might, and has a child of its own.
        stubborn = ns.popen(["sh", "-c", "trap '' TERM; sleep 1000 & echo $!; wait"],
                            stdout=subprocess.PIPE, text=True)
        grandchild = int(stubborn.stdout.readline())    # also: the trap is set by now
        assert in_netns_soon(polite.pid, ns.path)
        assert in_netns_soon(grandchild, ns.path)
    finally:
        lab.cleanup()
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    for pid in (polite.pid, stubborn.pid, grandchild):
        assert not os.path.exists("/proc/%d/ns/net" % pid)
    assert ours(lab.prefix) == []


def in_netns_soon(pid, netns_path, timeout=5):
    """True once `pid` has entered the namespace (`ip netns exec` setns()s, then exec()s)."""
    want = os.stat(netns_path).st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.stat("/proc/%d/ns/net" % pid).st_ino == want:
            return True
        time.sleep(0.01)
    return False


def test_cleanup_removes_every_namespace_and_is_idempotent():
    lab = Lab()
    underlay = lab.underlay()
    lab.node("a", underlay)
    lab.node("b", underlay)
    lab.pod_netns("x")
    workdir = lab.workdir
    assert len(ours(lab.prefix)) == 4
    lab.cleanup()
    assert ours(lab.prefix) == []
    assert not os.path.exists(workdir)
    lab.cleanup()
    with pytest.raises(RuntimeError):
        lab.namespace("late")


def test_failing_body_still_cleans_up():
    with pytest.raises(RuntimeError, match="test body failed"):
        with Lab() as lab:
            lab.node("n1", lab.underlay())
            assert len(ours(lab.prefix)) == 2
            raise RuntimeError("test body failed")
    assert ours(lab.prefix) == []


def test_root_namespace_links_unchanged():
    before = root_links()
    with Lab() as lab:
        underlay = lab.underlay()
        for i in range(3):
            lab.node("node%d" % i, underlay)
        lab.pod_netns("p")
        during = root_links()
    assert during == before
    assert root_links() == before


def _python(code):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def test_atexit_cleans_up_a_lab_left_open():
    child = _python("""
        from lab.cluster import Lab
        lab = Lab()
        lab.node("n1", lab.underlay())
        print(lab.prefix, flush=True)
        raise SystemExit(0)      # no cleanup(): the atexit hook must do it
    """)
    prefix = child.stdout.readline().strip()
    assert child.wait(30) == 0
    assert prefix and ours(prefix) == []


def test_teardown_stale_removes_only_dead_owners(lab):
    lab.namespace("alive")
    child = _python("""
        import os, signal, time
        from lab.cluster import Lab
        lab = Lab()
        lab.node("n1", lab.underlay())
        lab.node("n2", lab.underlay("10.9.0.0/24", name="under2"))
        print(lab.prefix, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)     # a crash: no atexit
    """)
    prefix = child.stdout.readline().strip()
    child.wait(30)
    assert child.returncode == -signal.SIGKILL
    left = ours(prefix)
    assert len(left) == 4
    removed = Lab.teardown_stale()
    assert set(left) <= set(removed)
    assert ours(prefix) == []
    assert ours(lab.prefix) == ["%s-alive" % lab.prefix]     # our own, live, lab is kept


def test_run_cni_puts_host_side_in_the_node(lab, ref_bin):
    """Reference loopback + bridge/host-local via run_cni: the host side lands in the node."""
    before = root_links()
    node = lab.node("node1", lab.underlay())
    pod = lab.pod_netns("web")
    lo = node.run_cni(ref_bin + "/loopback", "ADD", "c1", pod.path, "lo",
                      {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}, ref_bin)
    assert lo.returncode == 0, lo.stderr
    conf = {
        "cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni0",
        "isGateway": True, "ipMasq": True,
        "ipam": {"type": "host-local", "subnet": "10.244.1.0/24",
                 "dataDir": lab.workdir + "/ipam"},
    }
    add = node.run_cni(ref_bin + "/bridge", "ADD", "c1", pod.path, "eth0", conf, ref_bin)
    assert add.returncode == 0, add.stdout + add.stderr
    pod_ip = add.result["ips"][0]["address"].split("/")[0]
    assert "cni0" in node.link_names()
    assert "UP" in pod.ip_json("link", "show", "lo")[0]["flags"]
    node.run(["ping", "-c", "1", "-W", "2", pod_ip])
    assert "CNI-" in node.run(["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
    assert root_links() == before

    bad = node.run_cni(ref_bin + "/bridge", "ADD", "c2", pod.path, "eth1", "{not json", ref_bin)
    assert bad.returncode != 0 and bad.result["code"] == 6      # decoding failure

    delete = node.run_cni(ref_bin + "/bridge", "DEL", "c1", pod.path, "eth0", conf, ref_bin)
    assert delete.returncode == 0, delete.stderr
    assert delete.result is None
    assert "eth0" not in pod.link_names()
