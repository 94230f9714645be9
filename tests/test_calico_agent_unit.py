"""calico_lite.agent's pure part: which BGP peers a node wants, from the datastore; which routes it
keeps across restarts and session resets (against a stand-in speaker, no kernel)."""
from types import SimpleNamespace

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


# ---- which routes the agent keeps across restarts and resets (no kernel: the bookkeeping only) ----

class FakeSpeaker:
    """What the agent asks a Speaker: session states, whether a peer has sent its whole table."""

    def __init__(self):
        self.states = {}            # peer address -> FSM state
        self.synced_peers = set()
        self.calls = []
        self.configured = []

    def state(self, address):
        return self.states[address]         # KeyError: not configured

    def synced(self, address):
        return self.states.get(address) == "Established" and address in self.synced_peers

    def peers(self):
        return list(self.configured)

    def add_peer(self, config):
        self.calls.append(("add_peer", config.address))
        self.configured.append(config)

    def announce(self, prefix):
        self.calls.append(("announce", prefix))


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


def agent_with_fake_speaker(**kw):
    from calico_lite.agent import Agent
    agent = Agent(None, "n1", "eth0", clock=Clock(), route_grace=5.0, startup_grace=30.0, **kw)
    agent.speaker = FakeSpeaker()
    agent.me = NODES[0]
    return agent


RR, BLOCK2, BLOCK3 = "192.168.50.1", "10.65.0.64/26", "10.65.0.128/26"


def test_adopted_routes_stay_until_every_peer_has_sent_end_of_rib():
    agent = agent_with_fake_speaker()
    # the previous run left routes to two blocks; this run's peer is the reflector
    for block in (BLOCK2, BLOCK3):
        agent.held[block] = ("192.168.50.3", 1030.0)
        agent.adopted[block] = 1030.0
    agent.want_peers = (RR,)
    agent.speaker.states[RR] = "Established"
    assert set(agent.routes_to_keep()) == {BLOCK2, BLOCK3}
    # the reflector's table brings BLOCK2 again ...
    agent._on_best(BLOCK2, SimpleNamespace(peer=RR, next_hop="192.168.50.3"))
    assert set(agent.routes_to_keep()) == {BLOCK2, BLOCK3}          # no End-of-RIB yet: BLOCK3 may follow
    # ... and its End-of-RIB says that was all: BLOCK3 is gone, long before the startup grace ends
    agent.speaker.synced_peers.add(RR)
    assert agent.routes_to_keep() == {BLOCK2: "192.168.50.3"} and agent.adopted == {}


def test_adopted_routes_go_after_the_startup_grace_without_end_of_rib():
    agent = agent_with_fake_speaker()
    agent.held[BLOCK3] = ("192.168.50.3", 1030.0)
    agent.adopted[BLOCK3] = 1030.0
    agent.want_peers = (RR,)
    agent.clock.now = 1030.0
    assert agent.routes_to_keep() == {}


def test_routes_dropped_before_a_sessions_end_of_rib_or_with_the_session_are_held():
    agent = agent_with_fake_speaker()
    agent.speaker.states[RR] = "Established"
    agent._on_best(BLOCK2, SimpleNamespace(peer=RR, next_hop="192.168.50.3"))
    # the session has not sent its whole table (e.g. a restarted reflector flushing what it kept)
    agent._on_best(BLOCK2, None)
    assert agent.held[BLOCK2] == ("192.168.50.3", 1005.0)
    # once it has, its withdrawals are final
    agent._on_best(BLOCK2, SimpleNamespace(peer=RR, next_hop="192.168.50.3"))
    agent.speaker.synced_peers.add(RR)
    agent._on_best(BLOCK2, None)
    assert BLOCK2 not in agent.held and agent.routes_to_keep() == {}
    # a lost session: held for the route grace
    agent._on_best(BLOCK3, SimpleNamespace(peer=RR, next_hop="192.168.50.4"))
    agent.speaker.states[RR] = "Idle"
    agent._on_best(BLOCK3, None)
    assert agent.routes_to_keep() == {BLOCK3: "192.168.50.4"}
    agent.clock.now = 1005.0
    assert agent.routes_to_keep() == {}
    # a de-configured peer: its routes go at once
    agent._on_best(BLOCK3, SimpleNamespace(peer="192.168.50.9", next_hop="192.168.50.4"))
    agent._on_best(BLOCK3, None)
    assert agent.routes_to_keep() == {}


def test_blocks_are_announced_before_any_peer_is_added(tmp_path):
    from podnet.net.ip import parse_cidr
    agent = agent_with_fake_speaker()
    agent.blocks_file = str(tmp_path / "blocks")
    agent._reconcile_routes = lambda snap: None         # (the kernel part)
    s = snap(False, NODES)
    s.blocks[parse_cidr("10.65.0.0/26")] = "n1"
    agent.snapshot = s
    agent.reconcile()
    assert agent.speaker.calls == [("announce", "10.65.0.0/26"), ("add_peer", RR)]
    assert agent.speaker.configured[0].graceful_restart
    assert (tmp_path / "blocks").read_text() == "10.65.0.0/26\n"


def test_graceful_restart_off_reaches_the_peers():
    agent = agent_with_fake_speaker(graceful_restart_time=0)
    agent._reconcile_routes = lambda snap: None
    agent.snapshot = snap(False, NODES)
    agent.blocks_file = "/nonexistent/blocks"
    agent._reconcile_announcements = lambda snap: None
    agent.reconcile()
    assert not agent.speaker.configured[0].graceful_restart
