"""BIRD 2 configurations for calico-lite nodes and route reflectors, from datastore data.

    from calico_lite.bird import render
    text = render.render_config(snapshot, "node1", timers=render.FAST_TIMERS)
    render.validate(text)                          # `bird -p`: raises BirdConfigError
    render.write_atomic("/etc/bird/bird.conf", text)

`snapshot` is a calico_lite.datastore.Snapshot (or anything with .config,
.nodes {name: Node}, .blocks {IPNet: name}, .revision). `context()` builds the
plain data the templates see (unit-testable without BIRD).

Who peers with whom:
  nodeToNodeMesh on   every node peers with every other node (role ignored);
  nodeToNodeMesh off  a node peers with every route reflector; a route
                      reflector peers with every node as `rr client` (with
                      `rr cluster id` at protocol level, if it has one) and
                      with the other reflectors as plain iBGP peers.
A peer on our underlay subnet gets `direct;` (iBGP is multihop by default,
and a direct session takes the next hop as on-link); one elsewhere gets
`multihop;` and `gateway recursive`, as do sessions to reflectors (a
reflected route keeps its originator's next hop, which may be anywhere):
next hops are then resolved through the underlay's connected subnet
(`protocol direct`) and the kernel's own routes (`learn`), so the underlay
must route between node subnets (as it must for the sessions themselves).

Graceful restart (RFC 4724) is on for every BGP session (`graceful restart
on;`, restart time `graceful_restart_time`, BIRD's default 120 s if None):
BIRD keeps the routes of a calico-lite agent (or another BIRD) that restarts
while its kernel keeps forwarding, until the peer's End-of-RIB says which are
gone or the peer's restart time runs out. `debug_protocols` ("all", or some
of states, routes, filters, interfaces, events, packets) adds a `debug
protocols` line: with routes, BIRD logs every route it adds or removes.

What BIRD puts in the kernel (protocol kernel4): every route learned over
BGP, and our blocks as blackholes (`protocol static blocks`, also what we
announce). They carry `proto bird` (12; stock BIRD 2 sets no other) and the
`metric` given as kernel_metric; the calico-lite agent's own routes are
proto 78, so the two never touch each other's. IPIP (always, or
cross-subnet for next hops outside our subnet), towards cluster nodes only:
the export filter sets `ifname = "tunl0"; onlink = true; gw = bgp_next_hop`,
which stock BIRD 2.0.12 turns into `via <node> dev tunl0 onlink` (checked by
netns_tests/test_bird_render.py with a stand-in device). No krt_prefsrc: the
kernel picks tunl0's own address (the agent gives it one from our block)
as source for routes through it.
"""
import os

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

# BIRD's own defaults: hold 240 s, keepalive 80 s, connect delay 5 s, connect retry 120 s.
DEFAULT_TIMERS = {"connect delay time": 2, "connect retry time": 5, "error wait time": (5, 30)}
# For tests and labs: sessions up in about a second, failures noticed in a few.
FAST_TIMERS = {"hold time": 6, "keepalive time": 2, "connect delay time": 1, "connect retry time": 1,
               "error wait time": (1, 5)}
_TIMER_NAMES = ("hold time", "keepalive time", "connect delay time", "connect retry time",
                "error wait time", "startup hold time")


class BirdConfigError(ValueError):
    """BIRD refused a rendered configuration (`bird -p`)."""


def _protocol_name(prefix, ip):
    return "%s_%s" % (prefix, str(ip).replace(".", "_"))


def _timer_lines(timers):
    lines = []
    for name, value in timers.items():
        if name not in _TIMER_NAMES:
            raise ValueError("unknown BGP timer %r (known: %s)" % (name, ", ".join(_TIMER_NAMES)))
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError("BGP timer %r must be whole seconds, not %r" % (name, value))
        lines.append("%s %s" % (name, ", ".join(str(v) for v in values)))
    return lines


def _sorted_nodes(nodes):
    return sorted(nodes, key=lambda n: (n.address.value, n.name))


_DEBUG_CLASSES = ("states", "routes", "filters", "interfaces", "events", "packets")


def _debug_line(debug):
    if debug in (None, "", "off"):
        return None
    if debug == "all":
        return "all"
    classes = [debug] if isinstance(debug, str) else list(debug)
    unknown = [c for c in classes if c not in _DEBUG_CLASSES]
    if unknown or not classes:
        raise ValueError("unknown BIRD debug classes %r (known: all, %s)" % (unknown, ", ".join(_DEBUG_CLASSES)))
    return "{ %s }" % ", ".join(classes)


def context(snapshot, node_name, underlay_if="eth0", timers=None, kernel_metric=32, scan_time=10,
            log_target="stderr", log_classes="all", ipip_device="tunl0", graceful_restart=True,
            graceful_restart_time=None, debug_protocols=None):
    """The plain data a template renders for node `node_name` (KeyError if unknown)."""
    config = snapshot.config
    if config is None:
        raise ValueError("no calico-lite config in the datastore")
    nodes = dict(snapshot.nodes)
    me = nodes[node_name]
    subnet = me.subnet
    mesh = config.node_to_node_mesh
    rr_role = not mesh and me.is_route_reflector
    others = [n for n in _sorted_nodes(nodes.values()) if n.name != node_name]
    peers = []
    for n in others:
        if mesh:
            kind, client = "mesh", False
        elif rr_role:
            kind, client = ("rrpeer", False) if n.is_route_reflector else ("client", True)
        elif n.is_route_reflector:
            kind, client = "reflector", False
        else:
            continue        # two plain nodes without the mesh: only through reflectors
        peers.append({"protocol": _protocol_name(kind, n.address), "ip": str(n.address),
                      "asn": n.asn(config), "direct": subnet.contains(n.address),
                      # reflected routes carry their originator's next hop, which may be
                      # anywhere: resolve it through the routing table
                      "recursive": not subnet.contains(n.address) or kind in ("reflector", "rrpeer"),
                      "rr_client": client, "description": "%s %s" % (kind, n.name)})
    if peers:
        reason = ""
    elif not others:
        reason = "this is the only node"
    elif rr_role:
        reason = "no nodes to serve"
    else:
        reason = "the node-to-node mesh is off and there is no route reflector"
    blocks = sorted((b.masked() for b, owner in snapshot.blocks.items() if owner == node_name),
                    key=lambda b: (b.network.value, b.prefixlen))
    if not isinstance(kernel_metric, int) or isinstance(kernel_metric, bool) or kernel_metric < 0:
        raise ValueError("kernel_metric must be a non-negative integer")
    if graceful_restart_time is not None and (not isinstance(graceful_restart_time, int)
                                              or not 0 <= graceful_restart_time <= 4095):
        raise ValueError("graceful_restart_time must be 0..4095 seconds")
    for what, value in (("underlay_if", underlay_if), ("ipip_device", ipip_device)):
        if not value or len(value) > 15 or any(c in '"\\/ \n' for c in value):
            raise ValueError("bad interface name %r for %s" % (value, what))
    return {
        "node_name": node_name,
        "role": "route reflector" if rr_role else "node",
        "revision": getattr(snapshot, "revision", 0),
        "router_id": str(me.address),
        "local_ip": str(me.address),
        "local_subnet": str(subnet),
        "asn": me.asn(config),
        "underlay_if": underlay_if,
        "blocks": [str(b) for b in blocks],
        "pool": str(config.pool_net),
        "node_ips": [str(n.address) for n in _sorted_nodes(nodes.values())],
        "ipip_mode": config.ipip_mode,
        "ipip_device": ipip_device,
        "kernel_metric": kernel_metric,
        "scan_time": int(scan_time),
        "log_target": log_target if log_target in ("stderr", "syslog") else '"%s"' % log_target.replace('"', ""),
        "log_classes": log_classes if log_classes == "all" else "{ %s }" % ", ".join(log_classes),
        "timer_lines": _timer_lines(DEFAULT_TIMERS if timers is None else timers),
        "graceful_restart": bool(graceful_restart),
        "graceful_restart_time": graceful_restart_time,
        "debug_protocols": _debug_line(debug_protocols),
        "rr_cluster_id": me.rr_cluster_id,
        "peers": peers,
        "no_peers_reason": reason,
        "template": "rr.conf.j2" if rr_role else "node.conf.j2",
    }


_env = None


def _environment():
    global _env
    if _env is None:
        import jinja2
        _env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                                  trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                  autoescape=False)
    return _env


def render_context(ctx):
    return _environment().get_template(ctx["template"]).render(**ctx)


def render_config(snapshot, node_name, **kw):
    """bird.conf text for node `node_name` (a node, or a route reflector when the mesh is off)."""
    return render_context(context(snapshot, node_name, **kw))


def validate(text, bird="bird"):
    """Check `text` with `bird -p -c` (parse only: nothing starts); BirdConfigError if refused."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".conf", prefix="bird-check-") as f:
        f.write(text)
        f.flush()
        proc = subprocess.run([bird, "-p", "-c", f.name], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().replace(f.name, "bird.conf")
        raise BirdConfigError("BIRD refuses the configuration: %s" % detail)


def write_atomic(path, text):
    """Write `path` through a temporary file and a rename: BIRD never reads half a file.
    Returns False (and leaves the file alone) if it already holds `text`."""
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except OSError:
        pass
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True
