"""calico_lite mode end to end: BGP-routed pods, no bridge and no overlay (issue 6).

lab.cluster.CalicoCluster: etcd with the calico-lite datastore, `podnet
calico agent` on three nodes (our BGP speaker + kernel routes) and on a
route-reflector node (or a node-to-node mesh), pods attached by the `calico`
CNI plugin. Pods on every node reach each other through the routes the
agents learned over BGP; a killed agent's block stays with the others for its
graceful restart time (3 s here: RFC 4724, the kernel of its node still
forwards), then disappears, and comes back with the agent. IPIP across two underlay subnets needs the ipip
module, which this kernel lacks: that test runs in the full-kernel lane.
"""
import os
import signal

import pytest

from lab.cluster import CalicoCluster, Lab

from helpers import Capture, wait_until

RESTART_TIME = 3        # every agent's --graceful-restart-time


@pytest.fixture(scope="module", params=["route-reflector", "mesh", "bird-reflector"])
def cluster(request, netns_usable):
    """Our agents with our reflector, in a full mesh, or as clients of BIRD 2 reflecting
    (configured by `podnet calico bird-config` from the same datastore)."""
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        c = CalicoCluster(lab, nodes=3, route_reflector=request.param != "mesh", hold_time=6,
                          reflector="bird" if request.param == "bird-reflector" else "agent",
                          graceful_restart_time=RESTART_TIME)
        c.start()
        for node in c.workers():
            for i in (1, 2):
                c.add_pod(node, "%s-%d" % (node.role, i))
        yield c


def test_pods_on_every_node_reach_each_other_over_bgp_routes(cluster):
    matrix = cluster.ping_matrix()
    assert all(matrix.values()), [pair for pair, ok in matrix.items() if not ok]
    for node in cluster.workers():
        links = node.link_names()
        assert not links & {"cni0", "flannel.1", "flannel0", "tunl0"}, links      # no bridge, no overlay
        learned = cluster.routes_via_bgp(node)
        others = [n for n in cluster.workers() if n is not node]
        assert sorted(r["gateway"] for r in learned) == sorted(n.underlay_ip for n in others), learned
        assert all(r["dev"] == "eth0" for r in learned), learned
    pod = cluster.pods[0]
    routes = pod.ns.ip_json("route", "show")
    assert {"dst": "default", "gateway": "169.254.1.1"}.items() <= routes[0].items(), routes


def test_route_reflector_or_mesh_sessions(cluster):
    """With a reflector every node has one session (to it); in the mesh, one per other node."""
    for node in cluster.workers():
        with open(cluster.agent_log(node)) as f:
            log = f.read()
        peers = {line.split("adding BGP peer ")[1].split()[0] for line in log.splitlines()
                 if "adding BGP peer" in line}
        if cluster.route_reflector:
            rr = next(n for n in cluster.nodes if n.role == "rr1")
            assert peers == {rr.underlay_ip}, peers
        else:
            assert peers == {n.underlay_ip for n in cluster.workers() if n is not node}, peers
    if cluster.reflector == "bird":
        # BIRD (configured from the datastore) has a session with every agent and every block
        # (ORIGINATOR_ID / CLUSTER_LIST on what it reflects: netns_tests/test_bgp_interop.py)
        text = cluster.birdc("show", "route", "all")
        for node in cluster.workers():
            with open(cluster.blocks_file(node)) as f:
                block = f.read().split()[0]
            assert block in text and node.underlay_ip in text, text
        protocols = cluster.birdc("show", "protocols")
        assert protocols.count("Established") == len(cluster.workers()), protocols


def test_killed_agent_is_withdrawn_and_comes_back(cluster):
    node3 = next(n for n in cluster.workers() if n.role == "node3")
    others = [n for n in cluster.workers() if n is not node3]
    proc = cluster.agents.pop("node3")
    os.killpg(proc.pid, signal.SIGKILL)         # no goodbye: the kernel closes its sockets
    proc.wait(5)
    node3.processes.remove(proc)
    gone = wait_until(lambda: all(node3.underlay_ip not in {r["gateway"] for r in cluster.routes_via_bgp(n)}
                                  for n in others), RESTART_TIME + cluster.hold_time + 5,
                      "node3's block to be withdrawn")
    # (session loss is seen at once; its peers keep the routes for its restart time, graceful
    # restart; then in the mesh the agents hold them for --route-grace 2 s more)
    assert RESTART_TIME - 0.5 < gone < RESTART_TIME + 2 + 3, gone
    # node3's own routes to the others stay while its agent is away and while the new
    # one's sessions come up (it adopts them), so its pods keep answering throughout
    held = sorted(r["dst"] for r in cluster.routes_via_bgp(node3))
    assert len(held) == len(others), held
    cluster.start_agent(node3)
    wait_until(lambda: all(node3.underlay_ip in {r["gateway"] for r in cluster.routes_via_bgp(n)}
                           for n in others), 20, "node3's block to come back")
    matrix = cluster.ping_matrix()
    assert all(matrix.values()), [pair for pair, ok in matrix.items() if not ok]
    with open(cluster.agent_log(node3)) as f:
        assert "holding %d routes of the previous run" % len(others) in f.read()


def test_a_running_agent_serves_metrics_and_readiness(cluster):
    """node1's agent again, with Felix's metrics and health flags: /readyz once its sessions are
    up and its routes reconciled; /metrics (calico_lite/metrics.py) as the kernel and BGP have it."""
    from prometheus_client.parser import text_string_to_metric_families
    node1 = next(n for n in cluster.workers() if n.role == "node1")
    others = [n for n in cluster.workers() if n is not node1]
    cluster.stop_agent(node1)
    cluster.start_agent(node1, extra=["--prometheus-metrics-enabled", "--prometheus-metrics-host", "127.0.0.1",
                                      "--health-enabled"])

    def get(port, path):
        out = node1.run(["curl", "-s", "-m", "2", "-w", "\\n%{http_code}", "http://127.0.0.1:%d%s" % (port, path)],
                        check=False).stdout
        body, _, status = out.rpartition("\n")
        return int(status) if status.isdigit() else 0, body
    wait_until(lambda: get(9091, "/readyz")[0] == 200, 20, "node1's agent to be ready")
    assert get(9099, "/readiness")[0] == 200 and get(9099, "/healthz") == (200, "ok\n")
    families = {}

    def samples(name, **labels):
        return [s.value for s in families[name].samples if all(s.labels.get(k) == v for k, v in labels.items())]

    def scrape():
        families.clear()
        families.update((f.name, f) for f in text_string_to_metric_families(get(9091, "/metrics")[1]))
        # ready means sessions up and routes reconciled once: the peers' prefixes may still be arriving
        return sum(samples("calico_lite_bgp_prefixes_received")) == len(others) \
            and samples("calico_lite_routes_installed", type="unicast") == [len(others)]
    wait_until(scrape, 20, "node1's agent to have every peer's prefix")
    peers = [n for n in cluster.nodes if n.role == "rr1"] if cluster.route_reflector else others
    for peer in peers:
        assert samples("calico_lite_bgp_session_state", peer=peer.underlay_ip, state="Established") == [1.0]
    assert sum(samples("calico_lite_bgp_prefixes_received")) == len(others)
    assert samples("calico_lite_bgp_prefixes_originated") == [1.0]
    assert samples("calico_lite_routes_installed", type="unicast") == [len(others)]
    assert samples("calico_lite_routes_installed", type="blackhole") == [1.0]
    assert samples("calico_lite_route_syncs")[0] >= 1 and samples("calico_lite_reconcile_failures") == [0.0]


@pytest.mark.fullkernel
def test_ipip_cross_subnet_only_between_subnets(lab):
    """Two underlay subnets joined by a router: pod traffic between them is IP-in-IP,
    traffic within a subnet is plain."""
    c = CalicoCluster(lab, nodes=3, subnets=("192.168.50.0/24", "192.168.60.0/24"), ipip="cross-subnet",
                      ready_timeout=180)        # everything is ~10x slower under emulation
    c.start()
    pods = {n.role: c.add_pod(n, n.role + "-p") for n in c.workers()}
    # node1 and node3 on the first subnet, node2 on the second
    cap1 = Capture(c.underlay.switch, "br0", "ip", os.path.join(lab.workdir, "u1.pcap"))
    cap2 = Capture(c.underlays[1].switch, "br0", "ip", os.path.join(lab.workdir, "u2.pcap"))
    matrix = c.ping_matrix(count=2, timeout=5)
    seen = cap1.stop() + cap2.stop()
    assert all(matrix.values()), [pair for pair, ok in matrix.items() if not ok]
    same = {pods["node1"].ip, pods["node3"].ip}
    for pkt in seen:
        pair = {pkt.get("inner_src", pkt["src"]), pkt.get("inner_dst", pkt["dst"])}
        if pkt["proto"] == 4:
            assert pods["node2"].ip in pair, pkt            # encapsulated: only across subnets
        elif pkt["proto"] == 1 and pair == same:
            pass                                            # within a subnet: plain
        elif pkt["proto"] == 1:
            assert not pair & {p.ip for p in pods.values()}, pkt    # no pod packet crossed bare
    assert any(p["proto"] == 4 for p in seen)
    assert any(p["proto"] == 1 and {p["src"], p["dst"]} == same for p in seen)
