"""calico_lite.bird.render: who peers with whom, the rendered text, and that BIRD 2
parses every variant (`bird -p`, no root needed). Running BIRD:
netns_tests/test_bird_render.py."""
import itertools
import shutil

import pytest

from calico_lite.bird import render
from calico_lite.datastore import ClusterConfig, Node, Snapshot
from podnet.net.ip import parse_cidr

needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="needs BIRD 2 (Debian package bird2)")

NODES = [Node("node1", "192.168.50.1/24"), Node("node2", "192.168.50.2/24"), Node("node3", "192.168.60.3/24"),
         Node("rr1", "192.168.50.9/24", role="route-reflector", rr_cluster_id="244.0.0.1"),
         Node("rr2", "192.168.60.9/24", role="route-reflector")]
BLOCKS = {parse_cidr("10.65.0.0/26"): "node1", parse_cidr("10.65.0.64/26"): "node2",
          parse_cidr("10.65.0.128/26"): "node1"}


def snap(mesh=True, ipip="cross-subnet", nodes=NODES, **kw):
    return Snapshot(ClusterConfig(node_to_node_mesh=mesh, ipip_mode=ipip, **kw), {n.name: n for n in nodes},
                    BLOCKS, 12)


def peers(ctx):
    return {p["ip"]: (p["protocol"], p["direct"], p["recursive"], p["rr_client"]) for p in ctx["peers"]}


def test_mesh_peers_everyone_direct_on_the_subnet_multihop_elsewhere():
    ctx = render.context(snap(), "node1")
    assert ctx["template"] == "node.conf.j2" and ctx["role"] == "node"
    assert peers(ctx) == {
        "192.168.50.2": ("mesh_192_168_50_2", True, False, False),
        "192.168.50.9": ("mesh_192_168_50_9", True, False, False),      # an RR is a plain peer in the mesh
        "192.168.60.3": ("mesh_192_168_60_3", False, True, False),
        "192.168.60.9": ("mesh_192_168_60_9", False, True, False)}
    assert ctx["blocks"] == ["10.65.0.0/26", "10.65.0.128/26"]
    assert (ctx["router_id"], ctx["asn"], ctx["local_subnet"], ctx["revision"]) == \
        ("192.168.50.1", 64512, "192.168.50.0/24", 12)
    assert ctx["node_ips"] == ["192.168.50.1", "192.168.50.2", "192.168.50.9", "192.168.60.3", "192.168.60.9"]


def test_reflectors_without_the_mesh():
    node = render.context(snap(mesh=False), "node2")
    assert node["template"] == "node.conf.j2"
    assert peers(node) == {"192.168.50.9": ("reflector_192_168_50_9", True, True, False),
                           "192.168.60.9": ("reflector_192_168_60_9", False, True, False)}
    rr = render.context(snap(mesh=False), "rr1")
    assert rr["template"] == "rr.conf.j2" and rr["role"] == "route reflector"
    assert rr["rr_cluster_id"] == "244.0.0.1"
    assert peers(rr) == {"192.168.50.1": ("client_192_168_50_1", True, False, True),
                         "192.168.50.2": ("client_192_168_50_2", True, False, True),
                         "192.168.60.3": ("client_192_168_60_3", False, True, True),
                         "192.168.60.9": ("rrpeer_192_168_60_9", False, True, False)}
    assert render.context(snap(mesh=False), "rr2")["rr_cluster_id"] is None


def test_no_peers_is_explained():
    alone = render.context(snap(nodes=NODES[:1]), "node1")
    assert alone["peers"] == [] and alone["no_peers_reason"] == "this is the only node"
    no_rr = render.context(snap(mesh=False, nodes=NODES[:3]), "node1")
    assert no_rr["peers"] == [] and "no route reflector" in no_rr["no_peers_reason"]
    text = render.render_context(no_rr)
    assert "# No BGP peers: the node-to-node mesh is off and there is no route reflector." in text


def test_per_node_as_numbers():
    nodes = [Node("a", "192.168.50.1/24", as_number=65001), Node("b", "192.168.50.2/24")]
    ctx = render.context(snap(nodes=nodes, as_number=65000), "a")
    assert ctx["asn"] == 65001 and ctx["peers"][0]["asn"] == 65000
    assert "neighbor 192.168.50.2 as 65000;" in render.render_context(ctx)


def test_timers_and_options():
    ctx = render.context(snap(), "node1", timers={"hold time": 9, "error wait time": (1, 5)},
                         kernel_metric=0, underlay_if="ens3", log_classes=("warning", "error"))
    text = render.render_context(ctx)
    assert "  hold time 9;\n  error wait time 1, 5;\n" in text
    assert "metric 0;" in text and 'interface "ens3";' in text and "log stderr { warning, error };" in text
    default = render.render_config(snap(), "node1")
    assert "connect delay time 2;" in default and "hold time" not in default
    for bad in ({"hold": 3}, {"hold time": -1}, {"hold time": "3"}, {"error wait time": ()}):
        with pytest.raises(ValueError):
            render.context(snap(), "node1", timers=bad)
    with pytest.raises(ValueError):
        render.context(snap(), "node1", underlay_if='eth0"; evil')
    with pytest.raises(KeyError):
        render.context(snap(), "nope")


def test_ipip_filter_by_mode():
    cross = render.render_config(snap(ipip="cross-subnet"), "node1")
    assert "if bgp_next_hop ~ CLUSTER_NODES && !(bgp_next_hop ~ LOCAL_SUBNET) then {" in cross
    assert 'ifname = "tunl0";' in cross and "onlink = true;" in cross and "gw = bgp_next_hop;" in cross
    always = render.render_config(snap(ipip="always"), "node1")
    assert "if bgp_next_hop ~ CLUSTER_NODES then {" in always
    never = render.render_config(snap(ipip="never"), "node1")
    assert "tunl0" not in never.split("filter calico_kernel {")[1].split("}")[0]


def test_rr_settings_are_at_protocol_level():
    text = render.render_config(snap(mesh=False), "rr1")
    proto = text.split("protocol bgp client_192_168_50_1 from calico_peer {")[1].split("\n}\n")[0]
    head, channel = proto.split("ipv4 {")
    assert "rr client;" in head and "rr cluster id 244.0.0.1;" in head
    assert "rr " not in channel
    assert "protocol bgp rr " not in text and "protocol bgp rr{" not in text


@needs_bird
@pytest.mark.parametrize("mesh, ipip", list(itertools.product((True, False), ("always", "cross-subnet", "never"))))
def test_every_variant_parses(mesh, ipip):
    for name in ("node1", "node3", "rr1", "rr2"):
        render.validate(render.render_config(snap(mesh=mesh, ipip=ipip), name, timers=render.FAST_TIMERS))


@needs_bird
def test_single_node_without_blocks_parses():
    s = Snapshot(ClusterConfig(), {"solo": Node("solo", "10.0.0.1/8")}, {}, 0)
    render.validate(render.render_config(s, "solo"))


@needs_bird
def test_validate_reports_birds_complaint():
    with pytest.raises(render.BirdConfigError, match="syntax error"):
        render.validate("router id 1.2.3.4;\nprotocol bgp rr { }\n")


def test_write_atomic(tmp_path):
    path = str(tmp_path / "bird.conf")
    assert render.write_atomic(path, "a\n") is True
    assert render.write_atomic(path, "a\n") is False
    assert render.write_atomic(path, "b\n") is True
    assert open(path).read() == "b\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bird.conf"]


def test_graceful_restart_and_debug():
    text = render.render_config(snap(), "node1")
    template = text.split("template bgp calico_peer {")[1].split("\n}\n")[0]
    assert "  graceful restart on;\n" in template and "graceful restart time" not in template
    assert "debug protocols" not in text
    text = render.render_config(snap(mesh=False), "rr1", graceful_restart_time=300, debug_protocols="all")
    assert "  graceful restart on;\n  graceful restart time 300;\n" in text and "\ndebug protocols all;\n" in text
    assert "debug protocols { states, routes };" in render.render_config(snap(), "node1",
                                                                         debug_protocols=("states", "routes"))
    assert "graceful restart" not in render.render_config(snap(), "node1", graceful_restart=False)
    for bad in ({"debug_protocols": ("nonsense",)}, {"graceful_restart_time": 5000}):
        with pytest.raises(ValueError):
            render.context(snap(), "node1", **bad)


@needs_bird
def test_graceful_restart_and_debug_parse():
    for name in ("node1", "rr1"):
        render.validate(render.render_config(snap(mesh=False), name, graceful_restart_time=60, debug_protocols="all"))
