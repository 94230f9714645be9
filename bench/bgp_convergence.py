"""Route reflection with 50 clients: calico_lite's reflector against BIRD 2 as the reflector.

    sudo .venv/bin/python bench/bgp_convergence.py [--clients 50] [--rounds 1] [--no-silent]

The clients are BIRD 2 instances, one per network namespace on one underlay,
as calico-node runs BIRD on every node: iBGP AS 64512, hold 9 s / keepalive
3 s, each announcing its own /26 and exporting what it learns into its
namespace's kernel table. They are passive, so the reflector (started last)
opens every session at once, and both reflectors see the same start.

Per reflector, in a fresh lab:
  - start -> all sessions up: from launching the reflector to its last
    session Established (the reflector's own timestamps);
  - all up -> converged: from there until every client has every other
    client's prefix in its kernel (netlink dumps of the 50 namespaces, polled);
  - a killed client (SIGKILL: its socket closes) gone from every other kernel;
  - a silent client (SIGSTOP: only the hold timer notices) gone everywhere;
  - the reflector's resident memory once converged.
Prints a markdown table (medians when --rounds > 1).
"""
import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lab.cluster import Lab  # noqa: E402
from podnet.net.netlink import Netlink  # noqa: E402

AS = 64512
NET = "192.168.90"
RR = NET + ".1"
HOLD, KEEPALIVE = 9, 3
SETTLE = 2.0            # seconds between starting the clients and the reflector


def client_address(i):
    return "%s.%d" % (NET, 10 + i)


def client_prefix(i):
    return "10.90.%d.0/26" % i


def client_conf(i):
    me = client_address(i)
    return """router id {me};
protocol device {{ scan time 10; }}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}
protocol static announced {{ ipv4; route {prefix} blackhole; }}
protocol bgp reflector {{
  local {me} as {asn};
  neighbor {rr} as {asn};
  direct;
  passive on;
  hold time {hold}; keepalive time {keepalive};
  ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};
}}
""".format(me=me, prefix=client_prefix(i), asn=AS, rr=RR, hold=HOLD, keepalive=KEEPALIVE)


def bird_reflector_conf(n):
    lines = ["router id %s;" % RR, "protocol device { scan time 10; }",
             "template bgp rrclient {", "  local %s as %d;" % (RR, AS), "  rr client;", "  rr cluster id %s;" % RR,
             "  direct;", "  hold time %d; keepalive time %d;" % (HOLD, KEEPALIVE),
             "  connect delay time 0; connect retry time 1;",       # open at once, as ours does
             "  ipv4 { import all; export all; };", "}"]
    lines += ["protocol bgp c%d from rrclient { neighbor %s as %d; }" % (i, client_address(i), AS)
              for i in range(1, n + 1)]
    return "\n".join(lines) + "\n"


def wait(predicate, timeout, what, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def start_bird(ns, name, conf):
    wd = ns.lab.workdir
    path = os.path.join(wd, name)
    with open(path + ".conf", "w") as f:
        f.write(conf)
    proc = ns.popen(["bird", "-c", path + ".conf", "-s", path + ".ctl", "-P", path + ".pid", "-f"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, path + ".ctl"


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


class Kernels:
    """One netlink socket per client namespace; which client prefixes each kernel has."""

    def __init__(self, clients):
        self.links = {i: Netlink(netns=ns.path) for i, ns in clients.items()}

    def prefixes(self, i):
        return {str(r.dst) for r in self.links[i].routes() if str(r.dst).startswith("10.90.")}

    def converged(self, alive):
        want = {client_prefix(j) for j in alive}
        return all(self.prefixes(i) == want - {client_prefix(i)} for i in alive)

    def gone_everywhere(self, prefix, alive):
        return all(prefix not in self.prefixes(i) for i in alive)

    def close(self):
        for link in self.links.values():
            link.close()


# ---- the reflector under test --------------------------------------------------------------------

def reflector_env():
    """How the reflector runs in production: from compiled bytecode. (Without a cache, as under
    PYTHONDONTWRITEBYTECODE, every start compiles the sources and the compiler's peak stays
    resident: ~4 MiB more RSS.) The cache goes to a directory of its own, not into the tree."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=os.path.join(tempfile.gettempdir(), "podnet-pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def warm_bytecode_cache():
    subprocess.run([sys.executable, "-c", "import calico_lite.reflector as r; r._import_asyncio_without_tls(); "
                    "import calico_lite.bgp.speaker"], env=reflector_env(), cwd=ROOT, check=True)


class OurReflector:
    name = "calico_lite reflector"

    def __init__(self, ns, n):
        # No --dump-file: its JSON snapshots are for tests and operators, and json alone is ~1 MiB
        # of RSS. The time the last session came up is read from the log instead.
        self.log = os.path.join(ns.lab.workdir, "rr.log")
        argv = [sys.executable, "-m", "calico_lite.reflector", "--router-id", RR, "--as", str(AS), "--listen", RR,
                "--hold-time", str(HOLD), "--connect-retry", "1"]
        for i in range(1, n + 1):
            argv += ["--peer", "%s,client" % client_address(i)]
        with open(self.log, "w") as log:
            self.proc = ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=reflector_env())
        self.n = n

    def up_since(self):
        """Epoch time the last session came up, once all are up (else None)."""
        with open(self.log) as f:
            text = f.read()
        m = re.search(r"^(\S+ \S+) INFO \S+: sessions established: %d of %d$" % (self.n, self.n), text, re.M)
        if m is None:
            return None
        stamp = m.group(1)          # logging's asctime: 2026-11-29 11:33:25,270
        return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000

    @property
    def pid(self):
        return self.proc.pid


class BirdReflector:
    name = "BIRD 2 reflector"

    def __init__(self, ns, n):
        self.proc, self.ctl = start_bird(ns, "rr", bird_reflector_conf(n))
        self.n = n
        self.day = time.strftime("%Y-%m-%d")

    def up_since(self):
        if not os.path.exists(self.ctl):
            return None
        out = subprocess.run(["birdc", "-s", self.ctl, "show", "protocols"], capture_output=True, text=True).stdout
        since = [line.split()[4] for line in out.splitlines() if line.startswith("c") and "Established" in line]
        if len(since) < self.n:
            return None
        last = max(since)       # HH:MM:SS.mmm today
        return time.mktime(time.strptime(self.day + " " + last[:8], "%Y-%m-%d %H:%M:%S")) + float(last[8:] or 0)

    @property
    def pid(self):
        return self.proc.pid


def run_once(kind, n, silent):
    with Lab() as lab:
        underlay = lab.underlay(NET + ".0/24")
        rr_ns = lab.node("rr", underlay, RR)
        clients = {i: lab.node("c%d" % i, underlay, client_address(i)) for i in range(1, n + 1)}
        birds = {i: start_bird(ns, "c%d" % i, client_conf(i))[0] for i, ns in clients.items()}
        kernels = Kernels(clients)
        time.sleep(SETTLE)      # the clients' BIRDs are listening and done with start-up
        started = time.time()
        rr = kind(rr_ns, n)
        up = wait(rr.up_since, 60, "every session to come up")
        wait(lambda: kernels.converged(clients), 60, "every kernel to have every prefix", interval=0.005)
        converged = time.time()
        rss = rss_kib(rr.pid)
        alive = set(clients)
        # a client killed: its socket closes
        victim = 1
        t = time.time()
        birds[victim].kill()
        birds[victim].wait()
        clients[victim].processes.remove(birds[victim])
        alive.discard(victim)
        wait(lambda: kernels.gone_everywhere(client_prefix(victim), alive), 30, "the killed client's prefix to go")
        killed = time.time() - t
        stopped = None
        if silent:
            victim = 2
            t = time.time()
            os.kill(birds[victim].pid, signal.SIGSTOP)
            alive.discard(victim)
            wait(lambda: kernels.gone_everywhere(client_prefix(victim), alive), 3 * HOLD, "the silent client's prefix")
            stopped = time.time() - t
            birds[victim].kill()
            birds[victim].wait()
            clients[victim].processes.remove(birds[victim])
        kernels.close()
        return {"up": up - started, "converge": converged - up, "killed": killed, "silent": stopped, "rss": rss}


def fmt(values, unit="s"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if unit == "MiB":
        return "%.1f MiB" % (statistics.median(values) / 1024)
    if len(values) == 1:
        return "%.2f s" % values[0]
    return "%.2f s (%.2f-%.2f)" % (statistics.median(values), min(values), max(values))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-silent", dest="silent", action="store_false", help="skip the SIGSTOP (hold timer) case")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    warm_bytecode_cache()
    results = {OurReflector: [], BirdReflector: []}
    for _ in range(args.rounds):
        for kind in results:            # side by side in every round: the machine is noisy
            results[kind].append(run_once(kind, args.clients, args.silent))
            print("%s: %s" % (kind.name, results[kind][-1]), file=sys.stderr)
    kinds = list(results)
    print("| %d BIRD 2 clients, iBGP, hold %d s / keepalive %d s | %s |" % (
        args.clients, HOLD, KEEPALIVE, " | ".join(k.name for k in kinds)))
    print("|---|" + "---|" * len(kinds))
    rows = [("reflector start -> all sessions up", "up", "s"),
            ("all sessions up -> every client has every prefix in its kernel", "converge", "s"),
            ("a killed client's prefix gone everywhere (socket closed)", "killed", "s"),
            ("a silent client's prefix gone (SIGSTOP, hold timer %d s)" % HOLD, "silent", "s"),
            ("reflector resident memory, converged", "rss", "MiB")]
    for title, key, unit in rows:
        print("| %s | %s |" % (title, " | ".join(fmt([r[key] for r in results[k]], unit) for k in kinds)))


if __name__ == "__main__":
    main()
