"""calico_lite.datastore without etcd: the dataclasses, key names, block arithmetic,
and parsing a listing into a Snapshot (the store itself: netns_tests/test_calico_datastore.py)."""
import json

import pytest

from calico_lite import datastore as ds
from calico_lite.datastore import ClusterConfig, DataError, Node
from podnet.net.ip import parse_cidr


def net(text):
    return parse_cidr(text)


def test_config_defaults_and_round_trip():
    c = ClusterConfig()
    assert (c.as_number, c.node_to_node_mesh, c.ipip_mode, c.pool, c.block_size) == \
        (64512, True, "always", "10.65.0.0/16", 26)
    d = {"asNumber": 65001, "nodeToNodeMesh": False, "ipipMode": "cross-subnet",
         "poolCIDR": "10.70.0.0/20", "blockSize": 28}
    c = ClusterConfig.from_dict(d)
    assert c.to_dict() == d
    assert ClusterConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_config_partial_and_unknown_keys():
    c = ClusterConfig.from_dict({"ipipMode": "never", "somethingNew": 1, "asNumber": None})
    assert c.ipip_mode == "never" and c.as_number == 64512


@pytest.mark.parametrize("d, words", [
    ({"asNumber": 0}, "AS number"),
    ({"asNumber": "64512"}, "AS number"),
    ({"asNumber": True}, "AS number"),
    ({"nodeToNodeMesh": "yes"}, "nodeToNodeMesh"),
    ({"ipipMode": "Always"}, "ipipMode"),
    ({"poolCIDR": "10.65.0.0"}, "not a CIDR"),
    ({"poolCIDR": "10.65.1.0/16"}, "host bits"),
    ({"poolCIDR": "fd00::/48"}, "IPv4"),
    ({"blockSize": 15}, "blockSize"),
    ({"blockSize": 33}, "blockSize"),
])
def test_config_rejects(d, words):
    with pytest.raises(DataError, match=words):
        ClusterConfig.from_dict(d)


def test_node_round_trip_and_properties():
    n = Node("node-1.example", "192.168.50.7/24")
    assert str(n.address) == "192.168.50.7" and str(n.subnet) == "192.168.50.0/24"
    assert not n.is_route_reflector and n.asn(ClusterConfig()) == 64512
    assert Node.from_dict(n.name, n.to_dict()) == n
    rr = Node("rr1", "192.168.50.9/24", as_number=65000, role="route-reflector", rr_cluster_id="244.0.0.1")
    assert rr.is_route_reflector and rr.asn(ClusterConfig()) == 65000
    assert rr.to_dict() == {"ip": "192.168.50.9/24", "asNumber": 65000, "role": "route-reflector",
                            "rrClusterID": "244.0.0.1"}
    assert Node.from_dict("rr1", rr.to_dict()) == rr


@pytest.mark.parametrize("kw, words", [
    ({"name": "Node1"}, "node name"),
    ({"name": "-a"}, "node name"),
    ({"name": "a/b"}, "node name"),
    ({"ip": "192.168.50.1"}, "prefix length"),
    ({"ip": "fd00::1/64"}, "IPv4"),
    ({"as_number": -1}, "AS number"),
    ({"role": "rr"}, "role"),
    ({"rr_cluster_id": "244.0.0.1"}, "only for a route-reflector"),
    ({"role": "route-reflector", "rr_cluster_id": "0.0.0.0"}, "dotted quad"),
    ({"role": "route-reflector", "rr_cluster_id": "7"}, "dotted quad"),
])
def test_node_rejects(kw, words):
    args = {"name": "n1", "ip": "192.168.50.1/24"}
    args.update(kw)
    with pytest.raises(DataError, match=words):
        Node(**args)


def test_keys():
    assert ds.config_key() == "/calico-lite/v1/config"
    assert ds.config_key("calico-lite/v1/") == "/calico-lite/v1/config"
    assert ds.node_key("node1") == "/calico-lite/v1/nodes/node1"
    key = ds.block_key(net("10.65.3.64/26"))
    assert key == "/calico-lite/v1/blocks/10.65.3.64-26"
    assert ds.block_from_key(key) == net("10.65.3.64/26")
    for bad in ("/calico-lite/v1/blocks/10.65.3.64", "/x/blocks/10.65.3.65-26", "/x/blocks/a-26",
                "/x/blocks/10.65.3.64-33"):
        with pytest.raises(DataError):
            ds.block_from_key(bad)


def test_pool_blocks_and_choose():
    c = ClusterConfig(pool="10.65.0.0/24", block_size=26)
    blocks = list(ds.pool_blocks(c))
    assert [str(b) for b in blocks] == ["10.65.0.0/26", "10.65.0.64/26", "10.65.0.128/26", "10.65.0.192/26"]
    assert ds.block_count(c) == 4
    assert ds.choose_block(c, set()) == blocks[0]
    assert ds.choose_block(c, {blocks[0], blocks[2]}) == blocks[1]
    assert ds.choose_block(c, set(blocks)) is None
    assert ds.block_count(ClusterConfig(pool="10.0.0.0/8", block_size=26)) == 262144
    # the generator does not materialise a big pool to find the first free block
    assert str(ds.choose_block(ClusterConfig(pool="10.0.0.0/8"), set())) == "10.0.0.0/26"


def test_parse_snapshot_skips_malformed_but_keeps_blocks_taken(caplog):
    p = "/calico-lite/v1"
    kvs = [
        (p + "/config", b'{"poolCIDR": "10.65.0.0/24", "ipipMode": "never"}'),
        (p + "/nodes/node1", b'{"ip": "192.168.50.1/24"}'),
        (p + "/nodes/node2", b'{"ip": "192.168.50.2/24", "role": "route-reflector"}'),
        (p + "/nodes/bad", b'{"ip": "nonsense"}'),
        (p + "/nodes/worse", b'not json'),
        (p + "/blocks/10.65.0.0-26", b'{"node": "node1"}'),
        (p + "/blocks/10.65.0.128-26", b'{"node": "node2"}'),
        (p + "/blocks/10.65.0.64-26", b'{}'),
        (p + "/blocks/garbage", b'{"node": "node1"}'),
    ]
    snap = ds.parse_snapshot(p, kvs, 42)
    assert snap.revision == 42 and snap.config.ipip_mode == "never"
    assert sorted(snap.nodes) == ["node1", "node2"]
    assert snap.nodes["node2"].is_route_reflector
    assert snap.blocks == {net("10.65.0.0/26"): "node1", net("10.65.0.128/26"): "node2",
                           net("10.65.0.64/26"): None}
    assert snap.blocks_of("node1") == [net("10.65.0.0/26")]
    # the malformed block value is never handed out again
    assert ds.choose_block(snap.config, set(snap.blocks)) == net("10.65.0.192/26")
    assert sum("skipping" in r.message for r in caplog.records) == 4


def test_datastore_constructor_validates_without_connecting():
    d = ds.Datastore("http://127.0.0.1:1,https://10.0.0.1", prefix="x/y")
    assert d.prefix == "/x/y" and d.endpoints == [("http", "127.0.0.1", 1), ("https", "10.0.0.1", 2379)]
    with pytest.raises(ValueError):
        ds.Datastore("127.0.0.1:2379")
    with pytest.raises(ValueError):
        ds.Datastore([])


def test_a_node_name_ending_in_a_newline_is_refused():
    # `$` matches before a final newline: "node1\n" once passed as a name (and reached etcd keys)
    with pytest.raises(DataError, match="node name"):
        Node("node1\n", "192.168.50.1/24")
    assert Node("node1", "192.168.50.1/24").name == "node1"
