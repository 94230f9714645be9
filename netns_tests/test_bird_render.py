"""Real BIRD 2 with rendered configurations, one daemon per node namespace.

Mesh: three nodes peer with each other; every session reaches Established,
every node's kernel gets the others' blocks via their underlay address (and
its own block as a blackhole), and traffic to an address in a remote block
arrives. Route reflector: the three nodes peer only with a reflector in its
own namespace; each node still gets the others' blocks with the originating
node as next hop, here with IPIP "always", so through tunl0 with onlink
(on this kernel, without ipip, a veth named tunl0 stands in: BIRD's part,
the route shape, is what is checked). BIRD is started with
`bird -c conf -s sock -P pid -f` and killed by its PID.
"""
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from calico_lite.bird import render
from calico_lite.datastore import ClusterConfig, Node, Snapshot
from podnet.net.ip import parse_cidr

pytestmark = pytest.mark.skipif(shutil.which("bird") is None or shutil.which("birdc") is None,
                                reason="needs BIRD 2 (Debian package bird2)")

BLOCKS = {"node1": "10.65.0.0/26", "node2": "10.65.0.64/26", "node3": "10.65.0.128/26"}
TIMEOUT = 15


class Bird:
    def __init__(self, ns, text):
        self.ns = ns
        base = os.path.join(ns.lab.workdir, ns.role)
        self.conf, self.sock, self.pidfile, self.log = base + ".conf", base + ".ctl", base + ".pid", base + ".log"
        render.write_atomic(self.conf, text)
        with open(self.log, "w") as log:
            self.proc = ns.popen(["bird", "-c", self.conf, "-s", self.sock, "-P", self.pidfile, "-f"],
                                 stdout=log, stderr=subprocess.STDOUT)

    def birdc(self, *args):
        return self.ns.run(["birdc", "-s", self.sock] + list(args), check=False).stdout

    def bgp_states(self):
        """{protocol name: "Established" | other state} of the BGP protocols."""
        out = {}
        for line in self.birdc("show", "protocols").splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "BGP":
                out[parts[0]] = parts[-1] if parts[3] == "up" else parts[3] + " " + parts[-1]
        return out

    def stop(self):
        """SIGTERM BIRD by its PID, then wait (the Lab's cleanup is the fallback).

        `ip netns exec` execs BIRD, so the PID it writes is the one we started;
        a pidfile naming any other process is ignored (never signal what is not ours)."""
        try:
            with open(self.pidfile) as f:
                assert int(f.read().strip()) == self.proc.pid
        except (OSError, ValueError):
            pass            # not written yet
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(5)
        self.ns.processes.remove(self.proc)


def wait_for(predicate, what, birds):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    detail = "\n".join("--- %s\n%s%s" % (b.ns.role, b.birdc("show", "protocols"), open(b.log).read()[-1500:])
                       for b in birds)
    raise AssertionError("timed out waiting for %s\n%s" % (what, detail))


def bird_routes(ns):
    return {r["dst"]: r for r in ns.ip_json("route", "show", "proto", "bird")}


def start(lab, mesh, ipip, with_rr):
    und = lab.underlay("192.168.50.0/24")
    namespaces, nodes = {}, {}
    for i, name in enumerate(("node1", "node2", "node3"), 1):
        namespaces[name] = lab.node(name, und, "192.168.50.%d" % i, ip_forward=True)
        nodes[name] = Node(name, "192.168.50.%d/24" % i)
    if with_rr:
        namespaces["rr1"] = lab.node("rr1", und, "192.168.50.100")
        nodes["rr1"] = Node("rr1", "192.168.50.100/24", role="route-reflector", rr_cluster_id="244.0.0.1")
    snap = Snapshot(ClusterConfig(node_to_node_mesh=mesh, ipip_mode=ipip, pool="10.65.0.0/16"), nodes,
                    {parse_cidr(b): n for n, b in BLOCKS.items()}, 1)
    birds = []
    try:
        for name, ns in namespaces.items():
            text = render.render_config(snap, name, timers=render.FAST_TIMERS, scan_time=2)
            render.validate(text)
            birds.append(Bird(ns, text))
    except BaseException:
        for b in birds:
            b.stop()
        raise
    return namespaces, birds


def all_established(birds, count):
    states = [b.bgp_states() for b in birds]
    return all(len(s) == count and set(s.values()) == {"Established"} for s in states)


def test_full_mesh(lab):
    ns, birds = start(lab, mesh=True, ipip="never", with_rr=False)
    try:
        t0 = time.monotonic()
        wait_for(lambda: all_established(birds, 2), "every mesh session Established", birds)
        assert birds[0].bgp_states() == {"mesh_192_168_50_2": "Established", "mesh_192_168_50_3": "Established"}

        def converged():
            for me, node in ns.items():
                got = bird_routes(node)
                for other, block in BLOCKS.items():
                    r = got.get(block)
                    if r is None:
                        return False
                    if other == me:
                        if r.get("type") != "blackhole":
                            return False
                    elif (r.get("gateway"), r.get("dev")) != (ns[other].underlay_ip, "eth0"):
                        return False
            return True
        wait_for(converged, "every block in every kernel", birds)
        print("mesh: sessions and kernel routes in %.1fs" % (time.monotonic() - t0))
        # a "pod" address in node3's block answers node1
        ns["node3"].ip("addr", "add", "10.65.0.130/32", "dev", "lo")
        out = ns["node1"].run(["ping", "-c", "1", "-W", "2", "10.65.0.130"], check=False)
        assert out.returncode == 0, out.stdout
        # node2's BIRD goes away: its block leaves the other kernels (session closed)
        birds[1].stop()
        wait_for(lambda: BLOCKS["node2"] not in bird_routes(ns["node1"])
                 and BLOCKS["node2"] not in bird_routes(ns["node3"]), "node2's block withdrawn", birds[::2])
    finally:
        for b in birds:
            if b.proc.poll() is None:
                b.stop()
    assert bird_routes(ns["node1"]) == {}             # persist off: BIRD takes its routes along


def _tunl0(node):
    """The real tunl0 if the kernel has ipip, else a veth named tunl0 standing in for it."""
    if "tunl0" in node.link_names():
        node.ip("link", "set", "tunl0", "up")
        return
    node.ip("link", "add", "tunl0", "type", "veth", "peer", "name", "tunl0-peer")
    node.ip("link", "set", "tunl0", "up")
    node.ip("link", "set", "tunl0-peer", "up")


def test_route_reflector_with_ipip(lab):
    ns, birds = start(lab, mesh=False, ipip="always", with_rr=True)
    try:
        for name in ns:
            _tunl0(ns[name])
        t0 = time.monotonic()
        rr = birds[-1]
        wait_for(lambda: all_established(birds[:-1], 1) and all_established([rr], 3),
                 "every client session Established", birds)
        assert set(rr.bgp_states()) == {"client_192_168_50_1", "client_192_168_50_2", "client_192_168_50_3"}

        def converged():
            for me, node in ns.items():
                if me == "rr1":
                    continue
                got = bird_routes(node)
                for other, block in BLOCKS.items():
                    r = got.get(block)
                    if other == me:
                        if r is None or r.get("type") != "blackhole":
                            return False
                    elif r is None or (r.get("gateway"), r.get("dev")) != (ns[other].underlay_ip, "tunl0") \
                            or "onlink" not in r.get("flags", []):
                        return False
            return True
        wait_for(converged, "every block via tunl0 onlink, next hop the originating node", birds)
        print("route reflector: sessions and kernel routes in %.1fs" % (time.monotonic() - t0))
        out = birds[0].birdc("show", "route", "all", BLOCKS["node3"])
        assert "BGP.originator_id: 192.168.50.3" in out and re.search(r"BGP.cluster_list: 244\.0\.0\.1", out)
        # the reflector itself (no blocks) routes towards the nodes as well
        assert set(bird_routes(ns["rr1"])) == set(BLOCKS.values())
    finally:
        for b in birds:
            if b.proc.poll() is None:
                b.stop()
