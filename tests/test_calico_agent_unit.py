"""calico_lite.agent's pure part: which BGP peers a node wants, from the datastore."""
from calico_lite.agent import desired_peers
from calico_lite.datastore import ClusterConfig, Node, Snapshot


def snap(mesh, nodes):
    return Snapshot(ClusterConfig(node_to_node_mesh=mesh), {n.name: n for n in nodes}, {}, 1)


NODES = [Node("n1", "192.168.50.2/24"), Node("n2", "192.168.50.3/24"), Node("n3", "192.168.60.2/24"),
         Node("rr1", "192.168.50.1/24", role="route-reflector")]


def test_mesh_peers_with_every_other_node_not_reflectors():
    peers = desired_peers(snap(True, NODES), NODES[0])
    assert set(peers) == {"192.168.50.3", "192.168.60.2"}
    assert all(not p.rr_client and p.remote_as == 64512 and p.local_address == "192.168.50.2"
               for p in peers.values())


def test_without_mesh_nodes_peer_only_with_reflectors():
    assert set(desired_peers(snap(False, NODES), NODES[1])) == {"192.168.50.1"}


def test_reflector_has_every_node_as_client_and_other_reflectors_as_peers():
    rr2 = Node("rr2", "192.168.60.1/24", role="route-reflector")
    peers = desired_peers(snap(False, NODES + [rr2]), NODES[3])
    assert {a for a, p in peers.items() if p.rr_client} == {"192.168.50.2", "192.168.50.3", "192.168.60.2"}
    assert {a for a, p in peers.items() if not p.rr_client} == {"192.168.60.1"}


def test_per_node_as_numbers_and_options():
    nodes = [Node("a", "10.0.0.1/24"), Node("b", "10.0.0.2/24", as_number=65001)]
    peers = desired_peers(snap(True, nodes), nodes[0], hold_time=30, md5_password="s3cret")
    assert peers["10.0.0.2"].remote_as == 65001 and peers["10.0.0.2"].hold_time == 30
    assert peers["10.0.0.2"].md5_password == "s3cret"
