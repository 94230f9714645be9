"""The NetworkPolicy truth-table harness: a two-node lab cluster laid out as upstream's e2e
suite, the NetworkPolicy agent on both nodes, and a prober that checks the whole matrix at once.

Layout (netpol_cases.py): namespaces x, y, z with pods a, b, c each, spread over
node1 and node2 (so the matrix holds same-node and cross-node pairs), attached by
the cluster's real CNI plugins (`Cluster.add_pod`); in every pod lab.echo serves
TCP and UDP on ports 80 and 81. The Namespace and Pod manifests (real addresses,
spec.nodeName as the agent's --hostname-override says it, named container ports)
and the scenario's NetworkPolicies are written into a manifests directory per node,
which that node's agent reads (`Cluster.start_network_policy`).

Probing: every pod runs one prober process for the whole session (started once, fed
one JSON line per round on stdin), which opens all of its connections of a round
concurrently: TCP connects, UDP datagrams that the echo server answers, and SCTP
INIT chunks. This kernel cannot open SCTP sockets, but it routes, tracks
(conntrack) and filters SCTP; an INIT sent through a raw socket to a pod that has no
SCTP stack is answered by the pod's kernel with ICMP "protocol unreachable", which
comes back as a reply of the tracked flow: that answer is our "connected". A cell
is allowed only on proof (a handshake, an answer). Silence is a drop when it lasts
DROP_TIMEOUT (0.5 s) and the same round's slowest answer came within a quarter of that
(answers here take 20 ms at most); otherwise, and always for a cell expected open, the
silent cells are probed once more with a 3 s timeout before they count. So a busy
machine neither fails a run nor hides a leak (open where it must be closed). UDP and SCTP probes bind source ports
from a range that advances every round, so no probe ever reuses a conntrack entry
an earlier scenario left.

Run as a script, this file is the prober (`python netpol_matrix.py prober`).
"""
import errno
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

SOURCE_PORTS = (10000, 30000)       # below the ephemeral range: never collides with kernel-chosen ports


# ---- the prober (runs inside a pod's network namespace) ------------------------------------

def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def sctp_init(dst, sport, dport, tag):
    """An IPv4 packet carrying one SCTP INIT chunk (RFC 9260 3.3.2), checksum included
    (conntrack checks it), for a raw IPPROTO_RAW socket; the kernel fills in the source."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, tag, 65535, 1, 1, tag)
    common = struct.pack("!HHII", sport, dport, 0, 0) + chunk
    common = common[:8] + struct.pack("<I", crc32c(common)) + common[12:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(common), 0, 0, 64, socket.IPPROTO_SCTP, 0,
                         b"\0\0\0\0", socket.inet_aton(dst))
    return header + common


def _icmp_protocol_unreachable(data):
    """(inner destination, sport, dport) of an ICMP protocol-unreachable about an SCTP packet."""
    ihl = (data[0] & 0x0F) * 4
    if len(data) < ihl + 8 + 28 or data[ihl] != 3 or data[ihl + 1] != 2:
        return None
    inner = data[ihl + 8:]
    inner_ihl = (inner[0] & 0x0F) * 4
    if inner[9] != socket.IPPROTO_SCTP or len(inner) < inner_ihl + 4:
        return None
    sport, dport = struct.unpack_from("!HH", inner, inner_ihl)
    return socket.inet_ntoa(inner[16:20]), sport, dport


def probe(targets, timeout, sport_base, resend=0.3):
    """targets: [[key, ip, protocol, port]] -> ({key: "ok" | "timeout" | "refused" | errno name},
    seconds the slowest answer took).

    Every connection of the round at once; UDP and SCTP probes are resent every `resend`
    seconds from the same source port (the same flow) until answered or timed out."""
    results, waiting = {}, {}
    sctp_out, sctp_waiting = None, {}
    icmp = None
    next_port = [sport_base]

    def source_port():
        p = next_port[0]
        next_port[0] = p + 1 if p + 1 < SOURCE_PORTS[1] else SOURCE_PORTS[0]
        return p

    for key, ip, proto, port in targets:
        try:
            if proto == "TCP":
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex((ip, port))
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    results[key] = errno.errorcode.get(err, str(err))
                    continue
                waiting[s] = (key, proto, None)
            elif proto == "UDP":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                try:
                    s.bind(("", source_port()))
                except OSError:
                    s.bind(("", 0))
                s.connect((ip, port))
                s.send(b"probe")
                waiting[s] = (key, proto, b"probe")
            elif proto == "SCTP":
                if sctp_out is None:
                    sctp_out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
                    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
                    icmp.setblocking(False)
                sport = source_port()
                packet = sctp_init(ip, sport, port, int.from_bytes(os.urandom(4), "big") | 1)
                sctp_out.sendto(packet, (ip, 0))
                sctp_waiting[(ip, sport, port)] = (key, packet)
            else:
                results[key] = "unknown protocol"
        except OSError as e:
            results[key] = errno.errorcode.get(e.errno, str(e))
    start = time.monotonic()
    slowest = 0.0
    deadline = start + timeout
    next_resend = start + resend
    while (waiting or sctp_waiting) and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_resend:
            for s, (_, _, payload) in waiting.items():
                if payload is not None:
                    try:
                        s.send(payload)
                    except OSError:
                        pass
            for (ip, _, _), (_, packet) in sctp_waiting.items():
                sctp_out.sendto(packet, (ip, 0))
            next_resend = now + resend
        readers = [s for s, (_, proto, _) in waiting.items() if proto == "UDP"] + ([icmp] if sctp_waiting else [])
        writers = [s for s, (_, proto, _) in waiting.items() if proto == "TCP"]
        r, w, _ = select.select(readers, writers, [], max(0.0, min(deadline, next_resend) - now))
        for s in w:
            key = waiting.pop(s)[0]
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                slowest = max(slowest, time.monotonic() - start)
            results[key] = "ok" if err == 0 else ("refused" if err == errno.ECONNREFUSED
                                                   else errno.errorcode.get(err, str(err)))
            s.close()
        for s in r:
            if s is icmp:
                while True:
                    try:
                        data = icmp.recv(2048)
                    except BlockingIOError:
                        break
                    about = _icmp_protocol_unreachable(data)
                    if about in sctp_waiting:
                        results[sctp_waiting.pop(about)[0]] = "ok"
                        slowest = max(slowest, time.monotonic() - start)
                continue
            key = waiting[s][0]
            try:
                s.recv(2048)
                results[key] = "ok"
                slowest = max(slowest, time.monotonic() - start)
            except ConnectionRefusedError:
                results[key] = "refused"
            except BlockingIOError:
                continue
            except OSError as e:
                results[key] = errno.errorcode.get(e.errno, str(e))
            waiting.pop(s)
            s.close()
    for s, (key, _, _) in waiting.items():
        results[key] = "timeout"
        s.close()
    for key, _ in sctp_waiting.values():
        results[key] = "timeout"
    for s in (sctp_out, icmp):
        if s is not None:
            s.close()
    return results, slowest


def watch(target, until, attempt_timeout, deadline, sport_base, interval=0.01):
    """Probe one target again and again until its outcome is "ok" (until="open") or a
    timeout (until="closed": a drop, not a refusal); {"at": time.time() of the attempt that
    showed it (its start, for "closed"), "attempts": n}, or {"at": None} at the deadline
    (seconds from now)."""
    end = time.monotonic() + deadline
    attempts, sport = 0, sport_base
    while time.monotonic() < end:
        started = time.time()
        outcome = probe([target], attempt_timeout, sport)[0][target[0]]
        attempts += 1
        sport = sport + 1 if sport + 1 < SOURCE_PORTS[1] else SOURCE_PORTS[0]
        if outcome == ("ok" if until == "open" else "timeout"):
            return {"at": started if until == "closed" else time.time(), "attempts": attempts}
        time.sleep(interval)
    return {"at": None, "attempts": attempts}


def prober_main():
    """One JSON request per line on stdin, one JSON line of results on stdout; ends at EOF.
    A request is a round ({"targets", "timeout", "sport"}) or a watch ({"watch": target,
    "until", "attempt_timeout", "deadline", "sport"})."""
    for line in sys.stdin:
        request = json.loads(line)
        if "watch" in request:
            out = watch(request["watch"], request["until"], request["attempt_timeout"], request["deadline"],
                        request["sport"])
        else:
            results, slowest = probe(request["targets"], request["timeout"], request["sport"])
            out = {"results": results, "slowest": slowest}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["prober"]:
    prober_main()
    sys.exit(0)


# ---- the harness (the test process) ----------------------------------------------------------

from lab import manifests as k8s  # noqa: E402
from lab.cluster import CalicoCluster, Cluster  # noqa: E402

import netpol_cases as cases  # noqa: E402 - the prober above must not pay for these

MODES = ("flannel", "calico")
DROP_TIMEOUT = 0.5          # seconds without an answer that make a drop...
TRUSTED_FRACTION = 0.25     # ...when the round's slowest answer came within this share of it
RECHECK_TIMEOUT = 3.0       # for silent cells whose silence is not conclusive
SYNC_TIMEOUT = 20
PROBER = os.path.abspath(__file__)


class Prober:
    """The long-lived prober process of one namespace."""

    def __init__(self, ns, python):
        self.ns = ns
        self.proc = ns.popen([python, PROBER, "prober"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=os.path.dirname(PROBER),
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self._buffer = b""

    def send(self, targets, timeout, sport):
        self.request({"targets": targets, "timeout": timeout, "sport": sport})

    def request(self, request):
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, deadline):
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
                raise AssertionError("prober in %s did not answer: %s" % (self.ns.name, err))
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    continue
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)


def pod_netns_name(pod):
    """The lab pod name of cases' "x/a"."""
    return pod.replace("/", "-")


class NetpolCluster:
    """A two-node cluster (flannel vxlan or calico_lite) with upstream's 9 pods, their servers,
    their manifests, the NetworkPolicy agent on both nodes and a prober in every pod."""

    def __init__(self, lab, mode, agent_args=()):
        if mode not in MODES:
            raise ValueError("mode is one of %s" % (MODES,))
        self.lab, self.mode = lab, mode
        self.agent_args = list(agent_args)
        if mode == "flannel":
            self.cluster = Cluster(lab, nodes=2)
        else:
            self.cluster = CalicoCluster(lab, nodes=2, route_reflector=False)
        self.pods = {}              # "x/a" -> lab Pod
        self.probers = {}           # "x/a" (or a namespace name) -> Prober
        self.topology = None
        self.pod_labels = cases.default_pod_labels()
        self.namespace_labels = cases.default_namespace_labels()
        self.without_address = ()   # pods whose manifests say "not started yet"
        self.web_ports = {}         # pod -> its "web" container port, where moved
        self.written = {}           # manifest file name -> the JSON text last written
        self._sport = SOURCE_PORTS[0]
        self.retried_cells = 0      # cells expected open that needed the longer second look
        self.slowest_answer = 0.0   # seconds: the slowest answer any round saw (the margin under DROP_TIMEOUT)
        self.round_slowest = 0.0    # ... the last round saw
        self.untrusted_rounds = 0   # rounds too slow for their silences to count as drops

    # -- building --
    @property
    def nodes(self):
        return {n.role: n for n in self.cluster.nodes if n.role in cases.NODES}

    def manifests_dir(self, node):
        return os.path.join(self.cluster.node_dir(node), "netpol-manifests")

    def start(self):
        self.cluster.start()
        nodes = self.nodes
        for pod in cases.PODS:
            lab_pod = self.cluster.add_pod(nodes[cases.node_of(pod)], pod_netns_name(pod))
            # many probes per round ask for the same ICMP error (SCTP's answer): no rate limit
            lab_pod.ns.sysctl("net.ipv4.icmp_ratelimit", 0)
            for p in cases.PORTS:
                self.cluster.start_echo(lab_pod, port=p, udp_port=p)
            self.pods[pod] = lab_pod
        self.topology = cases.Topology(
            {pod: lab_pod.ip for pod, lab_pod in self.pods.items()},
            {name: self._pod_cidrs(node) for name, node in nodes.items()},
            self.cluster.network, {name: node.underlay_ip for name, node in nodes.items()})
        self.write_cluster_objects(wait=False)
        self.write("policies.json", [], wait=False)
        for node in nodes.values():
            self.cluster.start_network_policy(node, self.manifests_dir(node), self.agent_args)
        for node in nodes.values():
            self._wait(lambda node=node: self.cluster.network_policy_get(node, "/readyz")[0] == 200,
                       SYNC_TIMEOUT, "the agent on %s to be ready" % node.role,
                       lambda node=node: self.agent_log(node))
        for pod, lab_pod in self.pods.items():
            self.probers[pod] = Prober(lab_pod.ns, self.cluster.python)
        self.wait_all_open()
        return self

    def _pod_cidrs(self, node):
        if self.mode == "flannel":
            with open(self.cluster.subnet_file(node)) as f:
                env = dict(line.strip().split("=", 1) for line in f if "=" in line)
            address, _, length = env["FLANNEL_SUBNET"].partition("/")
            return (str(ipaddress.ip_network("%s/%s" % (address, length), strict=False)),)
        with open(self.cluster.blocks_file(node)) as f:
            return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))

    def wait_all_open(self, timeout=30):
        """Until every cell of every protocol and port answers (servers up, no policy)."""
        checks = [cases.Check(proto, port, cases.ALL) for proto in cases.PROTOCOLS for port in cases.PORTS]
        deadline = time.monotonic() + timeout
        while True:
            failures = self.compare(checks, recheck=False)
            if not failures:
                return
            if time.monotonic() > deadline:
                raise AssertionError("the cluster never answered everywhere:\n" + "\n".join(failures))
            time.sleep(0.5)

    # -- manifests --
    def write(self, filename, objects, wait=True):
        """Write `objects` as `filename` into every node's manifests directory and, if that
        changed anything, wait until both agents have it in the kernel; the seconds waited."""
        text = json.dumps(objects, sort_keys=True)
        if self.written.get(filename) == text:
            return 0.0
        since = time.time()
        for node in self.nodes.values():
            k8s.write(self.manifests_dir(node), filename, *objects)
        self.written[filename] = text
        if not wait:
            return 0.0
        started = time.monotonic()
        for node in self.nodes.values():
            self.cluster.wait_network_policy(node, since, timeout=SYNC_TIMEOUT)
        return time.monotonic() - started

    def time_to_enforce(self, filename, objects, src, dst, protocol, port, until, deadline=20):
        """Write `objects` as `filename` and watch src -> dst until it is `until` ("open" or
        "closed"): the seconds from the write to the first probe that saw it. Then waits for
        both agents as write() does, so the harness's view stays exact."""
        prober = self.probers[src]
        target = ["watch", self.topology.ip(dst), protocol, port]
        since = time.time()
        for node in self.nodes.values():
            k8s.write(self.manifests_dir(node), filename, *objects)
        self.written[filename] = json.dumps(objects, sort_keys=True)
        # a drop is concluded after 0.15 s; while waiting for "open", a silent attempt is
        # given up after 0.02 s (a connect here takes well under a millisecond) to resolve finely
        attempt_timeout = 0.15 if until == "closed" else 0.02
        prober.request({"watch": target, "until": until, "attempt_timeout": attempt_timeout, "deadline": deadline,
                        "sport": self.next_sport(1000)})
        seen = prober.receive(time.monotonic() + deadline + 10)
        for node in self.nodes.values():
            self.cluster.wait_network_policy(node, since, timeout=SYNC_TIMEOUT)
        if seen["at"] is None:
            raise AssertionError("%s -> %s %s/%d never became %s within %ss\n%s" % (
                src, dst, protocol, port, until, deadline, self.agent_logs()))
        return seen["at"] - since

    def remove(self, filename, wait=True):
        if filename not in self.written:
            return 0.0
        since = time.time()
        for node in self.nodes.values():
            k8s.remove(self.manifests_dir(node), filename)
        del self.written[filename]
        if wait:
            for node in self.nodes.values():
                self.cluster.wait_network_policy(node, since, timeout=SYNC_TIMEOUT)
        return 0.0

    def write_cluster_objects(self, wait=True):
        namespaces, pods = cases.cluster_objects(self.topology, self.pod_labels, self.namespace_labels,
                                                 self.without_address, self.web_ports)
        waited = self.write("namespaces.json", namespaces, wait)
        return waited + self.write("pods.json", pods, wait)

    def set_policies(self, policies):
        return self.write("policies.json", policies)

    def write_pods(self):
        return self.write("pods.json", cases.cluster_objects(self.topology, self.pod_labels, self.namespace_labels,
                                                               self.without_address, self.web_ports)[1])

    def set_web_port(self, pod, number):
        """Move the pod's container port named "web" (the manifest only: lab.echo serves 80 and 81)."""
        self.web_ports[pod] = number
        return self.write_pods()

    def set_pod_labels(self, pod, labels):
        self.pod_labels[pod] = dict(labels)
        return self.write_pods()

    def set_pod_address(self, pod, present):
        """The pod's manifest with its address (present) or as not started yet (the lab pod
        keeps its address: the kernel decides by the manifest alone)."""
        self.without_address = tuple(p for p in self.without_address if p != pod) + (() if present else (pod,))
        return self.write_pods()

    def set_namespace_labels(self, namespace, extra_labels):
        self.namespace_labels[namespace] = dict(extra_labels)
        return self.write("namespaces.json", cases.cluster_objects(self.topology, self.pod_labels,
                                                                     self.namespace_labels)[0])

    def restart_agents(self, while_down=lambda: None):
        """SIGTERM both agents (their rules stay), run `while_down`, start them again and wait
        until they are ready and have synced everything written meanwhile."""
        for node in self.nodes.values():
            self.cluster.stop_network_policy(node)
        since = time.time()
        while_down()
        for node in self.nodes.values():
            self.cluster.start_network_policy(node, self.manifests_dir(node), self.agent_args)
        for node in self.nodes.values():
            self.cluster.wait_network_policy(node, since, timeout=SYNC_TIMEOUT)

    def restore_labels(self):
        """Back to upstream's labels and addresses (a no-op when they are)."""
        self.pod_labels = cases.default_pod_labels()
        self.namespace_labels = cases.default_namespace_labels()
        self.without_address = ()
        self.web_ports = {}
        return self.write_cluster_objects()

    def reset(self):
        """Back to upstream's labels and addresses, and no policies."""
        self.pod_labels = cases.default_pod_labels()
        self.namespace_labels = cases.default_namespace_labels()
        self.without_address = ()
        self.web_ports = {}
        for filename in [f for f in self.written if f not in ("namespaces.json", "pods.json", "policies.json")]:
            self.remove(filename)
        self.write_cluster_objects()
        self.set_policies([])

    # -- probing --
    def next_sport(self, count):
        """The first of `count` source ports no earlier round used (until the range wraps,
        hundreds of rounds later, long after conntrack forgot them)."""
        if self._sport + count >= SOURCE_PORTS[1]:
            self._sport = SOURCE_PORTS[0]
        base, self._sport = self._sport, self._sport + count
        return base

    def probe_round(self, requests, timeout):
        """requests: {prober name: [[key, ip, protocol, port]]} -> {key: outcome}, all at once."""
        sport = self.next_sport(max(len(t) for t in requests.values()) if requests else 0)
        for name, targets in requests.items():
            self.probers[name].send(targets, timeout, sport)
        deadline = time.monotonic() + timeout + 10
        out = {}
        self.round_slowest = 0.0
        for name in requests:
            answer = self.probers[name].receive(deadline)
            out.update(answer["results"])
            self.round_slowest = max(self.round_slowest, answer["slowest"])
        self.slowest_answer = max(self.slowest_answer, self.round_slowest)
        return out

    def probe(self, checks, timeout=DROP_TIMEOUT, cells=None):
        """{check label: {(src, dst): outcome}} over the matrix (or just `cells`: [(label, src, dst)])."""
        by_label = {c.label: c for c in checks}
        if cells is None:
            cells = [(c.label, s, d) for c in checks for (s, d) in c.expected.cells]
        requests = {}
        for label, src, dst in cells:
            check = by_label[label]
            key = "%s %s %s" % (label, src, dst)
            requests.setdefault(src, []).append([key, self.topology.ip(dst), check.protocol, check.port])
        raw = self.probe_round(requests, timeout)
        out = {c.label: {} for c in checks}
        for key, outcome in raw.items():
            label, src, dst = key.split(" ")
            out[label][(src, dst)] = outcome
        return out

    def compare(self, checks, recheck=True):
        """Probe `checks`; [] if every cell is as expected, else one report per check that differs."""
        actual = self.probe(checks)
        if recheck:
            # silence is a drop when the round answered everything else fast (a busy machine
            # slows every answer of the round); a cell expected open is never failed on silence alone
            trusted = self.round_slowest <= TRUSTED_FRACTION * DROP_TIMEOUT
            silent = [(c.label, s, d) for c in checks for (s, d), allowed in c.expected.cells.items()
                      if (allowed or not trusted) and actual[c.label][(s, d)] == "timeout"]
            if not trusted:
                self.untrusted_rounds += 1
            if silent:
                self.retried_cells += len(silent)
                for label, cells in self.probe(checks, RECHECK_TIMEOUT, silent).items():
                    actual[label].update(cells)
        return [report(c, actual[c.label], self.mode) for c in checks
                if any((actual[c.label][cell] == "ok") != allowed for cell, allowed in c.expected.cells.items())]

    def assert_checks(self, checks, what=""):
        failures = self.compare(checks)
        if failures:
            raise AssertionError("%s[%s]: the kernel does not enforce what the policies say\n%s\n%s" % (
                what, self.mode, "\n".join(failures), self.agent_logs()))

    def probe_from(self, name, ns, targets, timeout=DROP_TIMEOUT):
        """Probe from any namespace of ours (a node, an outside client): {key: outcome}."""
        if name not in self.probers:
            self.probers[name] = Prober(ns, self.cluster.python)
        return self.probe_round({name: targets}, timeout)

    # -- the agent --
    def agent_log(self, node):
        try:
            with open(self.cluster.network_policy_log(node)) as f:
                return f.read()
        except OSError:
            return ""

    def agent_logs(self, tail=2500):
        return "\n".join("--- %s network-policy.log (tail) ---\n%s" % (name, self.agent_log(node)[-tail:])
                         for name, node in self.nodes.items())

    def nft(self, node, *args):
        return node.run(["nft"] + list(args)).stdout

    @staticmethod
    def _wait(predicate, timeout, what, detail=lambda: ""):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out after %ss waiting for %s\n%s" % (timeout, what, detail()))
            time.sleep(0.1)


# ---- reporting -------------------------------------------------------------------------------

def grid(cells, mark=None):
    """A matrix as upstream prints it: rows are sources, columns destinations, "." allowed,
    "X" denied, "-" not probed (a pod to itself); cells in `mark` are bracketed."""
    width = 5
    lines = [" " * 4 + "".join(p.center(width) for p in cases.PODS)]
    for src in cases.PODS:
        row = src.ljust(4)
        for dst in cases.PODS:
            if src == dst:
                text = "-"
            else:
                value = cells.get((src, dst))
                text = "." if value in (True, "ok") else "X"
                if mark and (src, dst) in mark:
                    text = "[%s]" % text
            row += text.center(width)
        lines.append(row)
    return lines


def report(check, actual, mode=""):
    wrong = {cell for cell, allowed in check.expected.cells.items() if (actual.get(cell) == "ok") != allowed}
    left = ["expected"] + grid(check.expected.cells)
    right = ["actual" + ("" if not mode else " (%s)" % mode)] + grid(actual, wrong)
    width = max(len(line) for line in left) + 4
    lines = ["%s: %d of %d cells differ" % (check.label, len(wrong), len(check.expected.cells))]
    lines += [a.ljust(width) + b for a, b in zip(left, right)]
    for src, dst in sorted(wrong):
        lines.append("  %s -> %s %s: expected %s, got %s" % (
            src, dst, check.label, "allowed" if check.expected.cells[(src, dst)] else "denied",
            actual.get((src, dst))))
    return "\n".join(lines)

