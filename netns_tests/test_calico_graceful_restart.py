"""BGP graceful restart (RFC 4724) against BIRD 2: an agent restarted twice loses no packet (issue 12).

A calico_lite cluster of two nodes whose agents are clients of BIRD 2 as the
route reflector (`podnet calico bird-config` renders it, with `graceful
restart on;` and `debug protocols all`, so BIRD logs every route it adds or
removes). A pod on node1 pings a pod on node2 every 50 ms the whole time,
while node1's agent is restarted twice in a row: once with SIGTERM (it closes
its session without a NOTIFICATION), once with SIGKILL (a crash: the kernel
closes the socket). Each time the next agent comes back with the R and F bits,
announces its block again and sends End-of-RIB, and only then is the next
restart done.

What must hold: not one ping lost; BIRD detects the graceful restart and
finishes it (End-of-RIB) both times and never removes node1's block, neither
from its table nor towards node2; the kernel of node2 (watched by `ip
monitor route` the whole time) never deletes its route to node1's block, and
node1's kernel never deletes its route to node2's (the new agent adopts it).

Then the other role: BIRD itself restarts gracefully (`birdc graceful
restart`, 3 s away, longer than the agents' own --route-grace, then `bird
-R`), and our agents, as receiving speakers, keep each other's blocks
(stale) until BIRD is back and has sent its End-of-RIB: again not one ping
lost, no kernel route deleted.
"""
import re
import signal
import subprocess
import time

import pytest

from lab.cluster import CalicoCluster, Lab

from helpers import ping_stats, wait_until

INTERVAL = 0.05
PING_SECONDS = 12           # the stream must outlast both restarts (each takes 0.3-2 s here)
CANARY = "198.51.100.0/24"  # a route added and deleted to prove a monitor is listening


class RouteMonitor:
    """`ip monitor route` in a namespace, into a file, from before the first restart to the end."""

    def __init__(self, ns, path):
        self.ns, self.path = ns, path
        self.out = open(path, "w")
        self.proc = ns.popen(["ip", "-timestamp", "monitor", "route"], stdout=self.out, stderr=subprocess.STDOUT)
        # the canary: prove the monitor hears deletions before anything that matters happens
        dev = ns.underlay_if
        wait_until(lambda: self._canary(dev), 10, "ip monitor in %s to report a deletion" % ns.role, interval=0.2)

    def _canary(self, dev):
        self.ns.ip("route", "replace", CANARY, "dev", dev)
        self.ns.ip("route", "del", CANARY, "dev", dev)
        time.sleep(0.1)
        return "Deleted %s" % CANARY in self.text()

    def text(self):
        with open(self.path) as f:
            return f.read()

    def deleted(self, prefix):
        """The deletions of `prefix` it reported ("Deleted 10.65.0.0/26 via ... proto 78")."""
        return [line for line in self.text().splitlines() if line.split()[:2] == ["Deleted", prefix]]

    def stop(self):
        # SIGTERM, not SIGINT: `ip monitor` has no handler of its own, and a suite started in the
        # background by a non-interactive shell hands every child SIGINT ignored
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(5)
        self.ns.processes.remove(self.proc)
        self.out.close()


def bird_session_settled(cluster, node):
    """BIRD's session with the node's agent is Established and its graceful restart (if any) is done."""
    text = cluster.birdc("show", "protocols", "all", cluster.bird_protocol(node))
    return "Established" in text and "graceful restart active" not in text


def agent_established(cluster, node, run):
    """Whether the session of the node's agent number `run` (0: the first one) is up, by its log."""
    with open(cluster.agent_log(node)) as f:
        log = f.read()
    starts = [m.start() for m in re.finditer(r"node %s \(" % node.role, log)]
    return len(starts) > run and "-> Established" in log[starts[run]:]


class Setup:
    def __init__(self, lab):
        self.lab = lab
        self.c = c = CalicoCluster(lab, nodes=2, route_reflector=True, reflector="bird", hold_time=6,
                                   graceful_restart_time=60, bird_debug="all")
        c.start()
        self.node1, self.node2 = c.workers()
        self.pod1, self.pod2 = c.add_pod(self.node1, "n1-pod"), c.add_pod(self.node2, "n2-pod")
        self.block1 = open(c.blocks_file(self.node1)).read().split()[0]
        self.block2 = open(c.blocks_file(self.node2)).read().split()[0]

    def settled(self):
        wait_until(lambda: all(bird_session_settled(self.c, n) for n in (self.node1, self.node2)), 20,
                   "BIRD's sessions")

    def monitors(self, tag):
        return {n.role: RouteMonitor(n, "%s/%s-%s-routes.log" % (self.lab.workdir, n.role, tag))
                for n in (self.node1, self.node2)}

    def ping(self):
        count = int(PING_SECONDS / INTERVAL)
        return count, self.pod1.ns.popen(["ping", "-n", "-q", "-i", str(INTERVAL), "-c", str(count), "-W", "2",
                                          self.pod2.ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def diagnose(self, monitors, bird_log=""):
        parts = ["--- %s kernel routes ---\n%s" % (name, m.text()[-3000:]) for name, m in monitors.items()]
        for n in (self.node1, self.node2):
            with open(self.c.agent_log(n)) as f:
                parts.append("--- %s agent log ---\n%s" % (n.role, f.read()[-6000:]))
        parts.append("--- BIRD ---\n" + "\n".join(line for line in bird_log.splitlines()
                                                  if "KEEPALIVE" not in line and "Scanning" not in line)[-5000:])
        return "\n".join(parts)

    def ping_result(self, ping):
        out, _ = ping.communicate(timeout=PING_SECONDS + 15)
        self.pod1.ns.processes.remove(ping)
        return ping_stats(out) + (out,)


@pytest.fixture(scope="module")
def setup(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        yield Setup(lab)


def test_agent_restarts_twice_under_a_ping_stream_without_loss_or_withdrawal(setup):
    c, node1, node2, block1, block2 = setup.c, setup.node1, setup.node2, setup.block1, setup.block2
    setup.settled()
    monitors = setup.monitors("agent")
    bird_log_start = len(open(c.bird_log()).read())
    count, ping = setup.ping()
    started = time.monotonic()
    time.sleep(1.0)
    timings = []
    for run, sig in enumerate((signal.SIGTERM, signal.SIGKILL), start=1):
        t = time.monotonic()
        c.restart_agent(node1, sig)
        wait_until(lambda run=run: agent_established(c, node1, run), 20, "node1's new agent's session")
        wait_until(lambda: bird_session_settled(c, node1), 20, "BIRD to finish the graceful restart")
        timings.append(round(time.monotonic() - t, 2))
    restarts_done = time.monotonic() - started
    sent, received, out = setup.ping_result(ping)
    for m in monitors.values():
        m.stop()
    bird_log = open(c.bird_log()).read()[bird_log_start:]
    print("graceful restart: %d pings sent, %d lost; restarts took %s s (SIGTERM, SIGKILL)"
          % (sent, sent - received, timings))
    assert restarts_done < PING_SECONDS - 1, "the ping stream ended before the restarts did: %s" % timings
    assert sent == count and received == sent, "%s\n%s" % (out, setup.diagnose(monitors, bird_log))

    # BIRD: both restarts detected and finished by End-of-RIB, node1's block never removed
    proto1, proto2 = c.bird_protocol(node1), c.bird_protocol(node2)
    detected = [line for line in bird_log.splitlines() if proto1 in line and "graceful restart detected" in line]
    done = [line for line in bird_log.splitlines() if proto1 in line and "graceful restart done" in line]
    assert len(detected) == 2 and len(done) == 2, bird_log[-4000:]
    removals = [line for line in bird_log.splitlines() if "removed" in line and " %s " % block1 in line]
    assert removals == [], removals
    # and each new session did carry node1's block again (BIRD: "ignored" when it equals the kept
    # route, which clears its stale mark; "added" otherwise), then End-of-RIB
    again = [line for line in bird_log.splitlines() if re.search(r"%s\.ipv4 > (added|ignored).* %s " % (
        proto1, re.escape(block1)), line)]
    eors = [line for line in bird_log.splitlines() if "%s: Got END-OF-RIB" % proto1 in line]
    assert len(again) >= 2 and len(eors) >= 2, "\n".join(
        line for line in bird_log.splitlines() if block1 in line or "END-OF-RIB" in line)
    # node2's session was never disturbed (one session per agent: no duplicate fighting it)
    assert not [line for line in bird_log.splitlines() if proto2 in line
                and ("< removed" in line or "graceful restart detected" in line or "session closed" in line)]

    # the kernels: node2 kept its route to node1's block, node1 its route to node2's
    # (the canary's deletion shows the monitors heard, and are read, right)
    assert all(m.deleted(CANARY) for m in monitors.values())
    assert monitors["node2"].deleted(block1) == [], monitors["node2"].text()
    assert monitors["node1"].deleted(block2) == [], monitors["node1"].text()
    assert [r["dst"] for r in c.routes_via_bgp(node2)] == [block1]
    assert [r["dst"] for r in c.routes_via_bgp(node1)] == [block2]
    log = open(c.agent_log(node1)).read()
    assert log.count("restarted with forwarding state kept") == 2


def speaker_view(cluster, node):
    """The agent's log since its latest start."""
    with open(cluster.agent_log(node)) as f:
        log = f.read()
    return log[log.rfind("node %s (" % node.role):]


def test_bird_restarting_gracefully_is_honoured_by_our_agents(setup):
    c, node1, node2, block1, block2 = setup.c, setup.node1, setup.node2, setup.block1, setup.block2
    setup.settled()
    monitors = setup.monitors("bird")
    count, ping = setup.ping()
    started = time.monotonic()
    time.sleep(1.0)
    t = time.monotonic()
    # away for longer than the agents' --route-grace (2 s): only graceful restart keeps the routes
    c.restart_bird(down_for=3.0)
    # both agents see their session go and keep what BIRD had sent them, stale
    wait_until(lambda: all("graceful restart: keeping its 1 routes" in speaker_view(c, n) for n in (node1, node2)),
               10, "the agents to keep BIRD's routes")
    wait_until(lambda: all(bird_session_settled(c, n) for n in (node1, node2)), 30, "BIRD to be back")
    wait_until(lambda: all("graceful restart done (End-of-RIB)" in speaker_view(c, n) for n in (node1, node2)), 20,
               "BIRD's End-of-RIB at both agents")
    took = round(time.monotonic() - t, 2)
    assert time.monotonic() - started < PING_SECONDS - 1, "the ping stream ended before BIRD was back"
    sent, received, out = setup.ping_result(ping)
    for m in monitors.values():
        m.stop()
    print("BIRD graceful restart: %d pings sent, %d lost; back and synchronised after %s s"
          % (sent, sent - received, took))
    assert sent == count and received == sent, "%s\n%s" % (out, setup.diagnose(monitors))
    assert all(m.deleted(CANARY) for m in monitors.values())
    assert monitors["node2"].deleted(block1) == [], monitors["node2"].text()
    assert monitors["node1"].deleted(block2) == [], monitors["node1"].text()
    assert [r["dst"] for r in c.routes_via_bgp(node2)] == [block1]
    assert [r["dst"] for r in c.routes_via_bgp(node1)] == [block2]
    for n in (node1, node2):
        assert "dropping its" not in speaker_view(c, n)        # nothing stale was left to drop
