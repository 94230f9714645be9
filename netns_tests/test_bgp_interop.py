"""calico_lite's BGP speaker against real ones: BIRD 2 and GoBGP, on a netns underlay.

Scenario 1: our route reflector (`python -m calico_lite.reflector`) in one
namespace; clients BIRD (plain), BIRD (TCP MD5), GoBGP, and a BIRD with the
wrong MD5 password (must never come up). Each client announces its own /26;
every client must learn the others' with the originating client as next hop,
ORIGINATOR_ID = that client and CLUSTER_LIST = [our cluster id]. Then a
client killed (socket closed) and one stopped with SIGSTOP (silent: only the
hold timer, 3 s on that session, notices) are withdrawn from the others.

Scenario 2: the roles swapped: BIRD reflects between two of our speakers
(processes announcing prefixes) and a GoBGP client.

The helpers here (Bird, Gobgp, OurSpeaker) are reused by test_bgp_fuzz.py.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lab.cluster import Lab

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AS = 64512
HOLD = 6                # seconds, on every session but the SIGSTOP victim's
SILENT_HOLD = 3


def wait_until(predicate, timeout, what, diagnose=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s\n%s"
                                 % (timeout, what, diagnose() if diagnose else ""))
        time.sleep(0.05)


def forget(ns, proc):
    """Reap a process we killed ourselves, so lab cleanup never signals its (reusable) pid."""
    proc.wait(10)
    if proc in ns.processes:
        ns.processes.remove(proc)


def kill(ns, proc, sig=signal.SIGKILL):
    os.kill(proc.pid, sig)
    if sig in (signal.SIGKILL, signal.SIGTERM):
        forget(ns, proc)


def tail(path, n=3000):
    try:
        with open(path) as f:
            return f.read()[-n:]
    except OSError:
        return ""


# ---- BIRD 2 -----------------------------------------------------------------------------

BIRD_TIMERS = "connect delay time 1; connect retry time 1; error wait time 1, 2;"


def bird_client_conf(router_id, reflector, prefixes, password=None, hold=HOLD):
    """A BIRD iBGP client of `reflector` announcing static /26s (next hop: itself)."""
    statics = "".join("  route %s blackhole;\n" % p for p in prefixes)
    auth = '  password "%s";\n' % password if password else ""
    return """router id {rid};
protocol device {{ }}
protocol static announced {{
  ipv4;
{statics}}}
protocol bgp reflector {{
  local {rid} as {asn};
  neighbor {rr} as {asn};
  direct;
  hold time {hold};
  {timers}
{auth}  ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};
}}
""".format(rid=router_id, rr=reflector, asn=AS, statics=statics, hold=hold, timers=BIRD_TIMERS, auth=auth)


def bird_reflector_conf(router_id, clients, hold=HOLD):
    """BIRD as a route reflector: every address in `clients` is an rr client.
    (`rr` is a reserved word in BIRD, hence the protocol names c1, c2, ...)"""
    out = ["router id %s;" % router_id, "protocol device { }",
           "template bgp rrclient {", "  local %s as %d;" % (router_id, AS), "  rr client;",
           "  rr cluster id %s;" % router_id, "  direct;", "  hold time %d;" % hold, "  " + BIRD_TIMERS,
           "  ipv4 { import all; export all; };", "}"]
    for i, address in enumerate(clients, 1):
        out.append("protocol bgp c%d from rrclient { neighbor %s as %d; }" % (i, address, AS))
    return "\n".join(out) + "\n"


class Bird:
    """bird -f in namespace `ns`, with its control socket and log in the lab's workdir."""

    def __init__(self, ns, name, conf):
        wd = ns.lab.workdir
        self.ns, self.name = ns, name
        self.conf = os.path.join(wd, name + ".conf")
        self.sock = os.path.join(wd, name + ".ctl")
        self.log = os.path.join(wd, name + ".log")
        with open(self.conf, "w") as f:
            f.write(conf)
        with open(self.log, "w") as log:
            self.proc = ns.popen(["bird", "-c", self.conf, "-s", self.sock, "-P", os.path.join(wd, name + ".pid"),
                                  "-f"], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: os.path.exists(self.sock) or self.proc.poll() is not None, 10, "bird's socket")
        assert self.proc.poll() is None, tail(self.log)

    def cmd(self, *args):
        return subprocess.run(["birdc", "-s", self.sock] + list(args), capture_output=True, text=True,
                              timeout=10).stdout

    def protocol_state(self, protocol):
        """BGP state of a protocol, e.g. "Established", "Connect", "Active"."""
        out = self.cmd("show", "protocols", protocol)
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == protocol:
                return parts[-1]
        return None

    def routes(self):
        """{prefix: {"via": gateway, "from": protocol, attr name: value}} of BGP routes (best first)."""
        routes, current = {}, None
        for line in self.cmd("show", "route", "all").splitlines():
            m = re.match(r"^(\d+\.\d+\.\d+\.\d+/\d+)\s+(\w+)\s+\[(\S+)", line)
            if m:
                current = None
                if m.group(1) not in routes:
                    current = routes[m.group(1)] = {"type": m.group(2), "from": m.group(3)}
                continue
            m = re.match(r"^\s+(\w+)\s+\[(\S+)", line)      # a second route of the same prefix
            if m:
                current = None
                continue
            if current is None:
                continue
            m = re.match(r"^\s+via (\S+)", line)
            if m:
                current["via"] = m.group(1)
                continue
            m = re.match(r"^\s+(BGP\.\w+): ?(.*)$", line)
            if m:
                current[m.group(1)] = m.group(2).strip()
        return {p: r for p, r in routes.items() if "BGP.next_hop" in r}


# ---- GoBGP ------------------------------------------------------------------------------------

def gobgp_client_conf(router_id, reflector, password=None, hold=HOLD):
    auth = '    auth-password = "%s"\n' % password if password else ""
    return """[global.config]
  as = {asn}
  router-id = "{rid}"
  local-address-list = ["{rid}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{rr}"
    peer-as = {asn}
{auth}  [neighbors.timers.config]
    connect-retry = 1
    hold-time = {hold}
    keepalive-interval = {keepalive}
  [neighbors.transport.config]
    local-address = "{rid}"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
""".format(asn=AS, rid=router_id, rr=reflector, auth=auth, hold=hold, keepalive=max(1, hold // 3))


class Gobgp:
    """gobgpd in namespace `ns`, its gRPC API on 127.0.0.1:`api_port` there."""

    def __init__(self, ns, name, conf, api_port):
        wd = ns.lab.workdir
        self.ns, self.name, self.api_port = ns, name, api_port
        self.conf = os.path.join(wd, name + ".toml")
        self.log = os.path.join(wd, name + ".log")
        with open(self.conf, "w") as f:
            f.write(conf)
        with open(self.log, "w") as log:
            self.proc = ns.popen(["gobgpd", "-f", self.conf, "-t", "toml", "--api-hosts", "127.0.0.1:%d" % api_port],
                                 stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.cli("global", check=False).returncode == 0 or self.proc.poll() is not None, 10,
                   "gobgpd's API")
        assert self.proc.poll() is None, tail(self.log)

    def cli(self, *args, check=True):
        return self.ns.run(["gobgp", "-p", str(self.api_port)] + list(args), check=check, timeout=10)

    def announce(self, prefix, next_hop):
        self.cli("global", "rib", "add", "-a", "ipv4", prefix, "nexthop", next_hop, "origin", "igp")

    def routes(self):
        """{prefix: {"next_hop", "originator_id", "cluster_list", "local_pref"}} of best paths learned from peers."""
        out = self.cli("global", "rib", "-a", "ipv4", "-j", check=False).stdout.strip()
        routes = {}
        for prefix, paths in (json.loads(out) if out else {}).items():
            for path in paths:
                if not path.get("best") or "neighbor-ip" not in path:
                    continue
                attrs = {a["type"]: a for a in path["attrs"]}
                routes[prefix] = {
                    "next_hop": attrs.get(3, {}).get("nexthop"),
                    "local_pref": attrs.get(5, {}).get("value"),
                    "originator_id": attrs.get(9, {}).get("value"),
                    "cluster_list": attrs.get(10, {}).get("value", []),
                }
        return routes


# ---- ours ------------------------------------------------------------------------------------

class OurSpeaker:
    """`python -m calico_lite.reflector` in namespace `ns`, watched through its --dump-file."""

    def __init__(self, ns, name, router_id, listen, peers=(), announce=(), extra=()):
        wd = ns.lab.workdir
        self.ns, self.name = ns, name
        self.dump_file = os.path.join(wd, name + ".json")
        self.log = os.path.join(wd, name + ".log")
        argv = [sys.executable, "-m", "calico_lite.reflector", "--router-id", router_id, "--as", str(AS),
                "--listen", listen, "--connect-retry", "1", "--dump-file", self.dump_file]
        for spec in peers:
            argv += ["--peer", spec]
        for prefix in announce:
            argv += ["--announce", prefix]
        argv += list(extra)
        with open(self.log, "w") as log:
            self.proc = ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=SOURCE_ROOT,
                                 env=dict(os.environ, PYTHONPATH=SOURCE_ROOT))
        wait_until(lambda: os.path.exists(self.dump_file) or self.proc.poll() is not None, 10, name + " to start")
        assert self.proc.poll() is None, tail(self.log)

    def state(self):
        try:
            with open(self.dump_file) as f:
                return json.load(f)
        except (OSError, ValueError):       # replaced atomically, but be lenient
            return {"peers": [], "routes": []}

    def routes(self):
        """{prefix: route dict} learned from peers."""
        return {r["prefix"]: r for r in self.state()["routes"] if r["peer"]}

    def peer_states(self):
        return {p["address"]: p["state"] for p in self.state()["peers"]}

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def prefix_of(address):
    """Each client's /26 is derived from its underlay address: 192.168.77.N -> 10.77.N.0/26."""
    a = address.split(".")
    return "10.%s.%s.0/26" % (a[2], a[3])


# ---- scenario 1: our reflector, BIRD and GoBGP clients ---------------------------------------------

NET1 = "192.168.77"
RR1, BIRD1, BIRD_MD5, GOBGP1, BIRD_BADPW = ("%s.%d" % (NET1, i) for i in (1, 2, 3, 4, 5))
PASSWORD = "s3cret,pw"


@pytest.fixture(scope="module")
def reflector_lab(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        underlay = lab.underlay(NET1 + ".0/24")
        nodes = {name: lab.node(name, underlay, ip) for name, ip in
                 (("rr", RR1), ("bird1", BIRD1), ("birdmd5", BIRD_MD5), ("gobgp1", GOBGP1), ("birdbad", BIRD_BADPW))}
        env = {
            "rr": OurSpeaker(nodes["rr"], "reflector", RR1, RR1, peers=[
                "%s,client,hold=%d" % (BIRD1, HOLD),
                "%s,client,hold=%d,md5=%s" % (BIRD_MD5, SILENT_HOLD, PASSWORD),
                "%s,client,hold=%d" % (GOBGP1, HOLD),
                "%s,client,hold=%d,md5=%s" % (BIRD_BADPW, HOLD, PASSWORD)]),
            "bird1": Bird(nodes["bird1"], "bird1", bird_client_conf(BIRD1, RR1, [prefix_of(BIRD1)])),
            "birdmd5": Bird(nodes["birdmd5"], "birdmd5", bird_client_conf(BIRD_MD5, RR1, [prefix_of(BIRD_MD5)],
                                                                         password=PASSWORD)),
            "birdbad": Bird(nodes["birdbad"], "birdbad", bird_client_conf(BIRD_BADPW, RR1, [prefix_of(BIRD_BADPW)],
                                                                         password="not-it")),
            "gobgp1": Gobgp(nodes["gobgp1"], "gobgp1", gobgp_client_conf(GOBGP1, RR1), api_port=50171),
        }
        env["gobgp1"].announce(prefix_of(GOBGP1), GOBGP1)
        env["nodes"] = nodes
        yield env


def diagnose(env):
    def text():
        parts = ["reflector: %s" % json.dumps(env["rr"].state(), indent=1)[:3000], tail(env["rr"].log)]
        for name in ("bird1", "birdmd5"):
            parts.append("%s routes: %s" % (name, env[name].routes()))
        parts.append("gobgp1 routes: %s" % env["gobgp1"].routes())
        return "\n".join(parts)
    return text


def assert_reflected(next_hop, originator, cluster_list, origin, reflector):
    """What a reflected route must look like at a client: untouched next hop, RFC 4456 attributes."""
    assert next_hop == origin
    assert originator == origin
    assert cluster_list == [reflector]


def test_our_reflector_between_bird_and_gobgp(reflector_lab):
    env = reflector_lab
    good = (BIRD1, BIRD_MD5, GOBGP1)
    expected = {prefix_of(a): a for a in good}

    def converged():
        b1, b2, g = env["bird1"].routes(), env["birdmd5"].routes(), env["gobgp1"].routes()
        return (set(b1) == set(expected) - {prefix_of(BIRD1)} and set(b2) == set(expected) - {prefix_of(BIRD_MD5)}
                and set(g) == set(expected) - {prefix_of(GOBGP1)})
    wait_until(converged, 15, "every client to learn every other client's prefix", diagnose(env))
    for bird in ("bird1", "birdmd5"):
        for prefix, route in env[bird].routes().items():
            origin = expected[prefix]
            assert route["from"] == "reflector" and route["via"] == origin
            assert_reflected(route["BGP.next_hop"], route["BGP.originator_id"], route["BGP.cluster_list"].split(),
                             origin, RR1)
            assert route["BGP.as_path"] == "" and route["BGP.local_pref"] == "100"
    for prefix, route in env["gobgp1"].routes().items():
        assert_reflected(route["next_hop"], route["originator_id"], route["cluster_list"], expected[prefix], RR1)
    # the reflector's own Loc-RIB carries the routes as they were received
    # (its dump file is written 0.1 s after a change, so it may lag the clients a little)
    def reflector_view():
        routes = env["rr"].routes()
        return routes if {p: r["next_hop"] for p, r in routes.items()} == expected else None
    ours = wait_until(reflector_view, 5, "the reflector's dump file", diagnose(env))
    assert all(r["originator_id"] is None and r["cluster_list"] == [] for r in ours.values())


def test_md5_session_with_bird(reflector_lab):
    env = reflector_lab
    wait_until(lambda: env["rr"].peer_states().get(BIRD_MD5) == "Established", 10, "the MD5 session", diagnose(env))
    assert env["birdmd5"].protocol_state("reflector") == "Established"
    # the client with the wrong password never got a session, so its prefix went nowhere
    assert env["rr"].peer_states()[BIRD_BADPW] != "Established"
    assert env["birdbad"].protocol_state("reflector") != "Established"
    assert prefix_of(BIRD_BADPW) not in env["rr"].routes()


def test_killed_client_is_withdrawn_at_once(reflector_lab):
    env = reflector_lab
    wait_until(lambda: prefix_of(BIRD1) in env["gobgp1"].routes(), 15, "bird1's prefix at gobgp1", diagnose(env))
    t = time.monotonic()
    kill(env["nodes"]["bird1"], env["bird1"].proc)
    wait_until(lambda: prefix_of(BIRD1) not in env["gobgp1"].routes()
               and prefix_of(BIRD1) not in env["birdmd5"].routes(), 5, "bird1's prefix to be withdrawn", diagnose(env))
    elapsed = time.monotonic() - t
    assert elapsed < 2.0, "withdrawal took %.2fs" % elapsed


def test_silent_client_is_withdrawn_within_the_hold_time(reflector_lab):
    env = reflector_lab
    wait_until(lambda: prefix_of(BIRD_MD5) in env["gobgp1"].routes(), 15, "birdmd5's prefix at gobgp1", diagnose(env))
    ns, proc = env["nodes"]["birdmd5"], env["birdmd5"].proc
    t = time.monotonic()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: prefix_of(BIRD_MD5) not in env["gobgp1"].routes(), SILENT_HOLD + 3,
                   "the silent client's prefix to be withdrawn", diagnose(env))
        elapsed = time.monotonic() - t
    finally:
        kill(ns, proc)
    assert elapsed <= SILENT_HOLD + 1.5, "withdrawal took %.2fs" % elapsed
    assert "hold timer expired" in tail(env["rr"].log, 20000)


# ---- scenario 2: BIRD reflects between our speakers and GoBGP -------------------------------------

NET2 = "192.168.78"
RR2, OURS1, OURS2, GOBGP2 = ("%s.%d" % (NET2, i) for i in (1, 2, 3, 4))


def test_bird_reflector_between_our_speakers_and_gobgp(lab):
    underlay = lab.underlay(NET2 + ".0/24")
    nodes = {name: lab.node(name, underlay, ip) for name, ip in
             (("birdrr", RR2), ("ours1", OURS1), ("ours2", OURS2), ("gobgp2", GOBGP2))}
    bird = Bird(nodes["birdrr"], "birdrr", bird_reflector_conf(RR2, [OURS1, OURS2, GOBGP2]))
    ours = {a: OurSpeaker(nodes[name], name, a, a, peers=["%s,hold=%d" % (RR2, HOLD)], announce=[prefix_of(a)])
            for name, a in (("ours1", OURS1), ("ours2", OURS2))}
    gobgp = Gobgp(nodes["gobgp2"], "gobgp2", gobgp_client_conf(GOBGP2, RR2), api_port=50172)
    gobgp.announce(prefix_of(GOBGP2), GOBGP2)
    everyone = (OURS1, OURS2, GOBGP2)

    def learned():
        out = {a: set(s.routes()) for a, s in ours.items()}
        out[GOBGP2] = set(gobgp.routes())
        return out

    def converged():
        got = learned()
        return all(got[a] == {prefix_of(b) for b in everyone if b != a} for a in everyone)

    def diag():
        return "learned: %s\nbird: %s\n%s" % (learned(), bird.routes(), tail(ours[OURS1].log))
    wait_until(converged, 15, "every client to learn every other client's prefix through BIRD", diag)
    for speaker in ours.values():
        for prefix, route in speaker.routes().items():
            origin = next(a for a in everyone if prefix_of(a) == prefix)
            assert route["peer"] == RR2
            assert_reflected(route["next_hop"], route["originator_id"], route["cluster_list"], origin, RR2)
    for prefix, route in gobgp.routes().items():
        origin = next(a for a in everyone if prefix_of(a) == prefix)
        assert_reflected(route["next_hop"], route["originator_id"], route["cluster_list"], origin, RR2)
    # BIRD's view of our announcements: next hop is our address, no reflection attributes yet
    for address in ours:
        route = bird.routes()[prefix_of(address)]
        assert route["BGP.next_hop"] == address and "BGP.originator_id" not in route
    # one of ours stops (SIGTERM: Cease to BIRD): its prefix leaves everyone else
    kill(nodes["ours1"], ours[OURS1].proc, signal.SIGTERM)
    wait_until(lambda: prefix_of(OURS1) not in ours[OURS2].routes() and prefix_of(OURS1) not in gobgp.routes(),
               5, "ours1's prefix to be withdrawn", diag)
    assert "administrative shutdown" in tail(bird.log) or bird.protocol_state("c1") != "Established"

