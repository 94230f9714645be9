"""calico_lite.routes.desired_routes as a pure function (no root, no kernel)."""
import pytest

from calico_lite import routes as cr
from calico_lite.datastore import Node
from podnet.net.ip import parse_cidr, parse_ip

ME = Node("node1", "192.168.50.1/24")
SAME = Node("node2", "192.168.50.2/24")
OTHER = Node("node3", "192.168.60.3/24")          # another subnet
NODES = [ME, SAME, OTHER]
LEARNED = {"10.65.0.64/26": "192.168.50.2", "10.65.0.128/26": "192.168.60.3"}
OWN = ["10.65.0.0/26"]


def by_dst(routes):
    return {r["dst"]: r for r in routes}


def test_cross_subnet():
    got = by_dst(cr.desired_routes(ME, NODES, LEARNED, "cross-subnet", own_blocks=OWN))
    assert got == {
        "10.65.0.0/26": {"dst": "10.65.0.0/26", "type": "blackhole"},
        "10.65.0.64/26": {"dst": "10.65.0.64/26", "via": "192.168.50.2", "dev": "eth0", "onlink": False},
        "10.65.0.128/26": {"dst": "10.65.0.128/26", "via": "192.168.60.3", "dev": "tunl0", "onlink": True},
    }


def test_always_and_never():
    got = by_dst(cr.desired_routes(ME, NODES, LEARNED, "always", own_blocks=OWN))
    assert {d: r.get("dev") for d, r in got.items()} == \
        {"10.65.0.0/26": None, "10.65.0.64/26": "tunl0", "10.65.0.128/26": "tunl0"}
    assert got["10.65.0.64/26"]["onlink"] and got["10.65.0.64/26"]["via"] == "192.168.50.2"
    problems = []
    got = by_dst(cr.desired_routes(ME, NODES, LEARNED, "never", own_blocks=OWN, problems=problems))
    assert sorted(got) == ["10.65.0.0/26", "10.65.0.64/26"]
    assert problems and problems[0][0] == "10.65.0.128/26" and "off 192.168.50.0/24" in problems[0][1]
    # with an underlay router that knows the pod routes, off-subnet next hops go through it
    got = by_dst(cr.desired_routes(ME, NODES, LEARNED, "never", underlay_gateway="192.168.50.254"))
    assert got["10.65.0.128/26"] == {"dst": "10.65.0.128/26", "via": "192.168.50.254", "dev": "eth0",
                                     "onlink": False}


def test_ipip_only_towards_cluster_nodes():
    learned = {"10.99.0.0/24": "192.168.50.77"}     # a ToR or other router on our segment
    got = cr.desired_routes(ME, NODES, learned, "always")
    assert got == [{"dst": "10.99.0.0/24", "via": "192.168.50.77", "dev": "eth0", "onlink": False}]


def test_own_block_and_self_next_hop_are_not_routed():
    problems = []
    learned = {"10.65.0.0/26": "192.168.50.2",        # someone else announces our block
               "10.65.1.0/26": "192.168.50.1",        # our own announcement reflected back
               "10.65.0.5/32": "192.168.50.2",        # a borrowed address inside our block: routed
               "fd00::/64": "192.168.50.2"}
    got = by_dst(cr.desired_routes(ME, NODES, learned, "never", own_blocks=OWN, problems=problems))
    assert got["10.65.0.0/26"] == {"dst": "10.65.0.0/26", "type": "blackhole"}
    assert "10.65.1.0/26" not in got
    assert got["10.65.0.5/32"]["via"] == "192.168.50.2"
    assert {p for p, _ in problems} == {"10.65.0.0/26", "10.65.1.0/26", "fd00::/64"}


def test_inputs_in_several_forms_and_sorted_output():
    learned = {parse_cidr("10.65.0.200/26"): parse_ip("192.168.50.2"), "10.65.0.64/26": "192.168.50.2"}
    got = cr.desired_routes(ME, {n.name: n for n in NODES}, learned, "never",
                            local_subnet="192.168.50.0/24", own_blocks=[parse_cidr("10.65.0.0/26")],
                            underlay_dev="ens3")
    assert [r["dst"] for r in got] == ["10.65.0.0/26", "10.65.0.64/26", "10.65.0.192/26"]
    assert got[1]["dev"] == "ens3"


def test_local_subnet_overrides_the_nodes_prefix():
    # a node whose underlay is a /16 in reality: both next hops count as local
    got = by_dst(cr.desired_routes(ME, NODES, LEARNED, "cross-subnet", local_subnet="192.168.0.0/16"))
    assert got["10.65.0.128/26"]["dev"] == "eth0"


def test_bad_mode():
    with pytest.raises(ValueError, match="IPIP mode"):
        cr.desired_routes(ME, NODES, LEARNED, "sometimes")
    assert cr.ipip_applies("cross-subnet", parse_ip("10.0.0.1"), parse_cidr("10.0.0.0/8")) is False


def test_uses_ipip():
    assert cr.uses_ipip(cr.desired_routes(ME, NODES, LEARNED, "cross-subnet"))
    assert not cr.uses_ipip(cr.desired_routes(ME, NODES, LEARNED, "never"))


def test_route_text_and_diff_shape():
    from podnet.net.routes import diff, route_text, routes_by_dst
    want = routes_by_dst(cr.desired_routes(ME, NODES, LEARNED, "cross-subnet", own_blocks=OWN))
    assert route_text(want["10.65.0.0/26"]) == " blackhole"
    assert route_text(want["10.65.0.128/26"]) == " via 192.168.60.3 dev tunl0 onlink"
    have = dict(want)
    have["10.65.0.0/26"] = {"via": "192.168.50.9", "dev": "eth0", "onlink": False}
    have["10.65.9.0/26"] = {"type": "blackhole"}
    remove, put = diff(have, want)
    assert remove == ["10.65.9.0/26"] and put == {"10.65.0.0/26": {"type": "blackhole"}}
