"""flanneld --kube-subnet-mgr in a three-node lab cluster, against a scripted API server.

No kube-apiserver can run on this machine, so the API is tests/fake_kube_api.py:
a stateful stand-in speaking the API's JSON wire format (lists, watches with
bookmarks, 410 Gone after a compaction, strategic-merge PATCH), listening inside a
namespace of the lab's underlay (lab.cluster.KubeFlannelCluster.api_namespace), so
the daemons reach it over the underlay exactly as they would reach a real API
server. Everything else is real: `python -m flanneld.daemon --kube-subnet-mgr` in
each node namespace (NODE_NAME, net-conf.json, --iface eth0, --ip-masq,
--healthz-port 8081), the kernel's VXLAN / routes / FDB, pods attached through the
flannel CNI conflist, ping and TCP between them.

One cluster per backend (vxlan, host-gw; a module fixture parametrized indirectly);
every test leaves the cluster as it found it. Shown:
  - every pod reaches every other pod (ICMP) and a server on every other node (TCP);
  - the annotations each daemon wrote are byte for byte flannel's, through
    exactly two PATCHes of nodes/NAME/status per node (annotations, then the
    NetworkUnavailable condition), and nothing else is written;
  - a "foreign" node, a hand-made kernel VXLAN VTEP annotated as upstream flannel
    annotates its Node, gets routes, neighbours and FDB entries on our nodes, and a
    pod reaches it (vxlan);
  - a Node deleted: its routes (and FDB entries) are gone on the others within 1 s;
    added: routes everywhere within 1 s;
  - dropped watches and a 410 Gone (compaction) lose nothing (vxlan);
  - /readyz 503 until routes and subnet.env exist, then 200; /healthz sees a wedged
    daemon (the --test-wedge-on-sigusr2 hook); /metrics parses (vxlan);
  - --iface-regex / --iface-can-reach pick the right interface on a node with three
    interfaces, and a daemon started that way joins the cluster (vxlan).
"""
import json
import os
import signal
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.cluster import KubeFlannelCluster, Lab
from podnet.net.ip import AF_INET
from podnet.net.netlink import NUD_PERMANENT, Netlink

from helpers import ping_many, wait_until

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from fake_kube_api import FakeKubeApi  # noqa: E402

PREFIX = "flannel.alpha.coreos.com/"
HEALTHZ_PORT = 8081               # kube-flannel.yml's
TIMEOUT = 20
FOREIGN_MAC = "02:42:0a:f4:32:00"


def pod_cidr(i):
    return "10.244.%d.0/24" % i


def upstream_annotations(backend, public_ip, vtep_mac=None):
    """The annotations upstream flannel writes, built as its source builds them:
    pkg/subnet/kube/annotations.go (the key names under the prefix), pkg/subnet/kube/kube.go
    AcquireLease (backend-type, backend-data = the backend's attributes marshalled,
    kube-subnet-manager "true", public-ip), pkg/backend/vxlan/vxlan.go newSubnetAttrs
    (json.Marshal of vxlanLeaseAttrs{VNI uint32; VtepMAC hardwareAddr}, whose MarshalJSON is
    %q of the MAC's String(): `{"VNI":1,"VtepMAC":"aa:bb:..."}`); host-gw leaves BackendData
    nil, which json.RawMessage marshals as `null`."""
    data = '{"VNI":1,"VtepMAC":"%s"}' % vtep_mac if backend == "vxlan" else "null"
    return {PREFIX + "backend-data": data, PREFIX + "backend-type": backend,
            PREFIX + "kube-subnet-manager": "true", PREFIX + "public-ip": public_ip}


@pytest.fixture(scope="module")
def cluster(request, netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        c = KubeFlannelCluster(lab, backend=request.param,
                               flanneld_args=["--healthz-port", str(HEALTHZ_PORT), "--reconcile-period", "2"])
        ns, ip = c.api_namespace()
        api = FakeKubeApi(host=ip, port=c.API_PORT, netns=ns.path, bookmark_interval=1.0)
        try:
            c.api_url = api.url
            for i in range(1, 4):
                api.add_node("node%d" % i, pod_cidr=pod_cidr(i))
            c.start()
            for node in c.nodes:
                c.add_pod(node, "%s-a" % node.role)
            c.api = api
            c.nl = {node.role: Netlink(netns=node.path) for node in c.nodes}
            wait_until(lambda: all(readyz(c, n)[0] == 200 for n in c.nodes), TIMEOUT, "every node to be ready")
            yield c
        finally:
            for nl in getattr(c, "nl", {}).values():
                nl.close()
            api.close()


def backends(*values):
    return pytest.mark.parametrize("cluster", values, indirect=True)


BOTH = backends("vxlan", "host-gw")
VXLAN = backends("vxlan")


# ---- helpers ---------------------------------------------------------------------------

def http_get(node, path, port=HEALTHZ_PORT):
    """(status, body) of GET http://127.0.0.1:port/path inside the node; status 0: no answer."""
    out = node.run(["curl", "-s", "-m", "3", "-o", "-", "-w", "\n%{http_code}",
                    "http://127.0.0.1:%d%s" % (port, path)], check=False).stdout
    body, _, status = out.rpartition("\n")
    return (int(status) if status.isdigit() else 0), body


def readyz(c, node):
    return http_get(node, "/readyz")


def routes(c, node):
    """{dst: gateway} of flanneld's routes (proto 77) in the node."""
    return {str(r.dst): str(r.gateway) for r in c.nl[node.role].routes(AF_INET) if r.protocol == 77}


def vxlan_entries(c, node):
    """({neighbour ip: mac}, {(mac, dst)}) on the node's flannel.1."""
    nl = c.nl[node.role]
    link = nl.link("flannel.1")
    if link is None:
        return {}, set()
    neigh = {str(n.dst): n.lladdr for n in nl.neighbours(AF_INET, index=link.index)
             if n.dst is not None and n.state & NUD_PERMANENT}
    fdb = {(e.lladdr, str(e.dst)) for e in nl.fdb(link.index) if e.dst is not None}
    return neigh, fdb


def vtep_mac(node):
    return json.loads(node.run(["ip", "-j", "link", "show", "flannel.1"]).stdout)[0]["address"]


def others(c, node):
    return [n for n in c.nodes if n is not node]


def has_lease(c, node, subnet, gateway, mac=None, public_ip=None):
    if routes(c, node).get(subnet) != gateway:
        return False
    if mac is None:
        return True
    neigh, fdb = vxlan_entries(c, node)
    return neigh.get(gateway) == mac and (mac, public_ip) in fdb


def lacks_lease(c, node, subnet, mac=None):
    if subnet in routes(c, node):
        return False
    if mac is None:
        return True
    neigh, fdb = vxlan_entries(c, node)
    return mac not in neigh.values() and not any(m == mac for m, _ in fdb)


def metrics(node):
    status, body = http_get(node, "/metrics")
    assert status == 200, body
    return {s.name + repr(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}, \
        {family.name: family.type for family in text_string_to_metric_families(body)}


def log_text(c, node):
    with open(c.flanneld_log(node)) as f:
        return f.read()


# ---- traffic -------------------------------------------------------------------------

@BOTH
def test_every_pod_reaches_every_other_pod(cluster):
    c = cluster
    pairs = {(a.name, b.name): (a.ns, b.ip) for a in c.pods for b in c.pods if a is not b}
    assert len(pairs) == 6
    assert ping_many(pairs) == {}
    servers = [(pod, c.start_echo(pod)) for pod in c.pods]
    try:
        for pod in c.pods:
            wait_until(lambda pod=pod: c.echo(pod.ns, "get", "http://127.0.0.1:8080/")["answers"], 10,
                       "the echo server in %s" % pod.name, interval=0.1)
        for client in c.pods:
            for server in c.pods:
                if server is client:
                    continue
                url = "http://%s:8080/" % server.ip
                out = c.echo(client.ns, "get", url, "--count", "3", "--timeout", "3")
                assert out["answers"] == {server.name: 3}, (client, server, out)
                assert out["sources"] == {client.ip: 3}, out        # pod to pod: no masquerade
    finally:
        for pod, proc in servers:
            proc.terminate()
            proc.wait(5)
            pod.ns.processes.remove(proc)


# ---- what was written to the API -------------------------------------------------------

@BOTH
def test_annotations_are_upstream_flannels_byte_for_byte(cluster):
    c = cluster
    for node in c.nodes:
        obj = c.api.node(node.role)
        mac = vtep_mac(node) if c.backend == "vxlan" else None
        ours = {k: v for k, v in obj["metadata"]["annotations"].items() if k.startswith(PREFIX)}
        assert ours == upstream_annotations(c.backend, node.underlay_ip, mac), node.role
        condition = [x for x in obj["status"]["conditions"] if x["type"] == "NetworkUnavailable"]
        assert [(x["status"], x["reason"], x["message"]) for x in condition] == \
            [("False", "FlannelIsUp", "Flannel is running on this node")]
        assert obj["spec"] == {"podCIDR": pod_cidr(int(node.role[-1])), "podCIDRs": [pod_cidr(int(node.role[-1]))]}
    # the writes: per node one PATCH of the annotations (only flannel's keys, as flannel's
    # two-way merge patch names them) and one of the condition; nothing else at all
    writes = [w for w in c.api.writes() if w.path in ["/api/v1/nodes/node%d/status" % i for i in (1, 2, 3)]]
    assert len(writes) == len(c.api.writes()) == 6, c.api.writes()
    for node in c.nodes:
        mine = [w for w in writes if w.path == "/api/v1/nodes/%s/status" % node.role]
        assert [(w.method, w.content_type) for w in mine] == [("PATCH", "application/strategic-merge-patch+json")] * 2
        mac = vtep_mac(node) if c.backend == "vxlan" else None
        assert mine[0].json() == {"metadata": {"annotations": upstream_annotations(c.backend, node.underlay_ip, mac)}}
        (cond,) = mine[1].json()["status"]["conditions"]
        assert list(cond) == ["type", "status", "lastHeartbeatTime", "lastTransitionTime", "reason", "message"]
        assert cond["lastHeartbeatTime"].endswith("Z") and len(cond["lastHeartbeatTime"]) == 20


# ---- Nodes coming and going ---------------------------------------------------------------

def timed(predicate, timeout, what):
    return wait_until(predicate, timeout, what, interval=0.01)


@BOTH
def test_a_deleted_node_is_forgotten_and_an_added_one_learnt_within_a_second(cluster):
    c = cluster
    node3 = c.node_by_role("node3")
    saved = c.api.node("node3")
    subnet, gateway = pod_cidr(3), "10.244.3.0" if c.backend == "vxlan" else node3.underlay_ip
    mac = vtep_mac(node3) if c.backend == "vxlan" else None
    assert all(has_lease(c, n, subnet, gateway, mac, node3.underlay_ip) for n in others(c, node3))
    c.api.delete_node("node3")
    gone = timed(lambda: all(lacks_lease(c, n, subnet, mac) for n in others(c, node3)), 1.0,
                 "node3's routes%s to go" % (" and FDB entries" if mac else ""))
    c.api.add_node("node3", pod_cidr=subnet, annotations=saved["metadata"]["annotations"])
    back = timed(lambda: all(has_lease(c, n, subnet, gateway, mac, node3.underlay_ip) for n in others(c, node3)),
                 1.0, "node3's routes to come back")
    print("%s: node deleted -> gone everywhere in %.3f s; added -> everywhere in %.3f s" % (c.backend, gone, back))
    pairs = {(a.name, b.name): (a.ns, b.ip) for a in c.pods for b in c.pods if a is not b and "node3" in b.name}
    assert ping_many(pairs) == {}


@VXLAN
def test_a_foreign_node_annotated_as_upstream_flannel_does_is_reached(cluster):
    """A namespace with a VTEP made by hand as flannel makes one (flannel.1, VNI 1, port
    8472, no learning, the subnet's network address as a /32), and a Node object carrying
    exactly upstream's annotations: every node of ours programs it, and a pod reaches it."""
    c = cluster
    node1 = c.node_by_role("node1")
    foreign = c.lab.namespace("foreign")
    fip = str(c.underlay.subnet.broadcast_address - 20)
    c.underlay.attach(foreign, fip)
    subnet, gateway = "10.244.50.0/24", "10.244.50.0"
    foreign.ip("link", "add", "flannel.1", "address", FOREIGN_MAC, "type", "vxlan", "id", "1", "local", fip,
               "dev", "eth0", "dstport", "8472", "nolearning")
    foreign.ip("addr", "add", "10.244.50.0/32", "dev", "flannel.1")
    foreign.ip("link", "set", "flannel.1", "up")
    mac1 = vtep_mac(node1)            # the way back to node1's pods, as a flannel node would have it
    foreign.ip("neigh", "add", "10.244.1.0", "lladdr", mac1, "dev", "flannel.1", "nud", "permanent")
    foreign.run(["bridge", "fdb", "append", mac1, "dev", "flannel.1", "dst", node1.underlay_ip])
    foreign.ip("route", "add", pod_cidr(1), "via", "10.244.1.0", "dev", "flannel.1", "onlink")
    c.api.add_node("foreign", pod_cidr=subnet, annotations=upstream_annotations("vxlan", fip, FOREIGN_MAC))
    took = timed(lambda: all(has_lease(c, n, subnet, gateway, FOREIGN_MAC, fip) for n in c.nodes), 1.0,
                 "every node to program the foreign node")
    print("foreign node programmed everywhere in %.3f s" % took)
    pod = next(p for p in c.pods if p.node is node1)
    assert ping_many({"pod->foreign": (pod.ns, gateway)}) == {}
    c.api.delete_node("foreign")
    timed(lambda: all(lacks_lease(c, n, subnet, FOREIGN_MAC) for n in c.nodes), 1.0, "the foreign node to go")


@VXLAN
def test_dropped_watches_and_410_gone_lose_nothing(cluster):
    c = cluster
    before = {n.role: metrics(n)[0]["flanneld_kube_relists_total[]"] for n in c.nodes}

    def annotated(i):
        return upstream_annotations("vxlan", "192.168.50.%d" % (100 + i), "02:00:00:00:00:%02x" % i)

    # 1. every watch cut; a Node added meanwhile arrives when they resume
    assert c.api.drop_watches() >= 3
    c.api.add_node("late1", pod_cidr=pod_cidr(61), annotations=annotated(61))
    wait_until(lambda: all(pod_cidr(61) in routes(c, n) for n in c.nodes), 10, "late1 after the watches resumed")
    after_drop = {n.role: metrics(n)[0]["flanneld_kube_relists_total[]"] for n in c.nodes}
    assert after_drop == before                         # resumed from their resourceVersion: no re-list
    # 2. cut again, change things, and compact: the resumed watches get 410 Gone and re-list
    wait_until(lambda: c.api.watch_count() >= 3, 10, "the watches to be back")
    c.api.drop_watches()
    c.api.delete_node("late1")
    c.api.add_node("late2", pod_cidr=pod_cidr(62), annotations=annotated(62))
    c.api.compact()
    wait_until(lambda: all(pod_cidr(62) in routes(c, n) and pod_cidr(61) not in routes(c, n) for n in c.nodes),
               10, "the re-list to bring late2 and drop late1")
    for node in c.nodes:
        assert metrics(node)[0]["flanneld_kube_relists_total[]"] == before[node.role] + 1, node.role
        assert "too old resource version" in log_text(c, node)
        assert {pod_cidr(i) for i in (1, 2, 3) if "node%d" % i != node.role} < set(routes(c, node))
    c.api.delete_node("late2")
    wait_until(lambda: all(pod_cidr(62) not in routes(c, n) for n in c.nodes), 5, "late2 to go")


# ---- health, readiness, metrics --------------------------------------------------------

@VXLAN
def test_readyz_waits_for_routes_and_subnet_env_and_healthz_sees_a_wedge(cluster):
    c = cluster
    c.api.add_node("late")                               # no podCIDR yet
    node = c.add_node("late", extra=["--reconcile-period", "0.5", "--healthz-stall-timeout", "1",
                                     "--test-wedge-on-sigusr2"])
    try:
        wait_until(lambda: "has no IPv4 podCIDR yet" in log_text(c, node), TIMEOUT, "the daemon to wait for a podCIDR")
        assert readyz(c, node) == (503, "flanneld is not ready yet: waiting for the network config and lease, "
                                        "the backend's first sync, the iptables rules\n")
        assert http_get(node, "/healthz") == (200, "flanneld is running\n")
        assert not os.path.exists(c.subnet_file(node))
        c.api.update_node("late", lambda n: n["spec"].update(podCIDR=pod_cidr(70), podCIDRs=[pod_cidr(70)]))
        wait_until(lambda: readyz(c, node)[0] == 200, TIMEOUT, "/readyz to say 200")
        # 200 only once subnet.env and the routes to every other node are there
        assert os.path.exists(c.subnet_file(node))
        nl = Netlink(netns=node.path)
        try:
            ours = {str(r.dst) for r in nl.routes(AF_INET) if r.protocol == 77}
        finally:
            nl.close()
        assert {pod_cidr(i) for i in (1, 2, 3)} <= ours
        assert readyz(c, node) == (200, "flanneld is ready\n")
        # the wedge: the next reconcile sync blocks holding the sync lock; liveness sees it
        c.flanneld[node.role].send_signal(signal.SIGUSR2)
        took = wait_until(lambda: http_get(node, "/healthz")[0] == 503, 10, "/healthz to fail")
        status, body = http_get(node, "/healthz")
        assert body.startswith("flanneld is not healthy: a backend sync has been running for"), body
        print("wedged daemon seen by /healthz after %.1f s" % took)
    finally:
        c.stop_flanneld(node)
        c.nodes.remove(node)
        c.api.delete_node("late")
    wait_until(lambda: all(pod_cidr(70) not in routes(c, n) for n in c.nodes), 5, "late's routes to go")


DOCUMENTED = {   # name -> type, from flanneld/metrics.py's docstring
    "flanneld_ready": "gauge", "flanneld_leases": "gauge", "flanneld_backend_sync_duration_seconds": "histogram",
    "flanneld_backend_sync_errors": "counter", "flanneld_backend_changes": "counter",
    "flanneld_backend_last_sync_timestamp_seconds": "gauge", "flanneld_backend_entries": "gauge",
    "flanneld_kube_nodes": "gauge", "flanneld_kube_relists": "counter", "flanneld_kube_node_events": "counter",
}


@VXLAN
def test_metrics_are_the_documented_ones(cluster):
    c = cluster
    for node in c.nodes:
        samples, types = metrics(node)
        assert {k: v for k, v in types.items() if k.startswith("flanneld_")} == DOCUMENTED, node.role
        assert samples["flanneld_ready[]"] == 1
        assert samples["flanneld_leases[]"] == 2
        for kind in ("route", "neighbour", "fdb"):
            assert samples["flanneld_backend_entries[('kind', '%s')]" % kind] == 2, (node.role, kind)
        assert samples["flanneld_kube_nodes[('state', 'lease')]"] == 3
        assert samples["flanneld_kube_nodes[('state', 'invalid')]"] == 0
        assert samples["flanneld_backend_sync_duration_seconds_count[('trigger', 'event')]"] >= 1
        assert samples["flanneld_backend_sync_duration_seconds_count[('trigger', 'reconcile')]"] >= 1
        assert samples["flanneld_backend_sync_errors_total[('trigger', 'event')]"] == 0
        assert samples["flanneld_backend_changes_total[]"] >= 6      # 3 entries for each of 2 nodes
        assert time.time() - samples["flanneld_backend_last_sync_timestamp_seconds[]"] < 10


# ---- interface selection ---------------------------------------------------------------

@VXLAN
def test_interface_choice_on_a_node_with_three_interfaces(cluster):
    """eth0 on the underlay (192.168.50.x), eth1 10.20.0.2/24 and eth2 172.30.0.2/24 (with
    10.99.0.0/16 behind 172.30.0.1): each rule picks what flannel's would; then a daemon
    with a --iface and a --iface-regex that miss and --iface-can-reach to node1 takes eth0
    and joins the cluster, its public-ip annotation the address the route lookup gave."""
    from flanneld.iface import NoInterface, find_external_interface
    c = cluster
    node = c._new_node("multi", c.underlay)
    peer = c.lab.namespace("multi-peer")
    for ifname, peer_if, addr, peer_addr in (("eth1", "p1", "10.20.0.2/24", "10.20.0.1/24"),
                                            ("eth2", "p2", "172.30.0.2/24", "172.30.0.1/24")):
        node.ip("link", "add", ifname, "type", "veth", "peer", "name", peer_if, "netns", peer.name)
        node.ip("addr", "add", addr, "dev", ifname)
        node.ip("link", "set", ifname, "up")
        peer.ip("addr", "add", peer_addr, "dev", peer_if)
        peer.ip("link", "set", peer_if, "up")
    node.ip("route", "add", "10.99.0.0/16", "via", "172.30.0.1", "dev", "eth2")

    def pick(**kw):
        ext = find_external_interface(netns=node.path, **kw)
        return ext.name, str(ext.ip)
    try:
        assert pick() == ("eth0", node.underlay_ip)                                  # the default route's
        assert pick(regexes=[r"^172\.30\."]) == ("eth2", "172.30.0.2")              # by address
        assert pick(regexes=[r"eth1"]) == ("eth1", "10.20.0.2")                     # by name
        assert pick(regexes=[r"^nomatch$", r"\.20\.0\.2$"]) == ("eth1", "10.20.0.2")  # the second regex
        assert pick(can_reach="10.99.1.1") == ("eth2", "172.30.0.2")                # ip route get
        assert pick(can_reach="10.20.0.77") == ("eth1", "10.20.0.2")
        assert pick(names=["10.20.0.2"]) == ("eth1", "10.20.0.2")                   # --iface IP
        assert pick(names=["eth9", "eth2"], regexes=["eth1"]) == ("eth2", "172.30.0.2")  # --iface first
        assert pick(names=["eth2"], public_ip="203.0.113.9") == ("eth2", "203.0.113.9")
        with pytest.raises(NoInterface, match="eth9"):
            pick(names=["eth9"], regexes=["^wlan"])

        node1 = c.node_by_role("node1")
        c.api.add_node("multi", pod_cidr=pod_cidr(80))
        c.start_flanneld(node, ["--iface", "eth9", "--iface-regex", "^wlan", "--iface-can-reach",
                                node1.underlay_ip])
        wait_until(lambda: readyz(c, node)[0] == 200, TIMEOUT, "the multi node to be ready")
        ann = c.api.node("multi")["metadata"]["annotations"]
        assert ann[PREFIX + "public-ip"] == node.underlay_ip
        wait_until(lambda: routes(c, node1).get(pod_cidr(80)) == "10.244.80.0", 5, "node1 to route to multi")
        assert "could not find a valid interface matching eth9" in log_text(c, node)
    finally:
        if node.role in c.flanneld:
            c.stop_flanneld(node)
        c.nodes.remove(node)
        if "multi" in c.api.nodes:
            c.api.delete_node("multi")
    wait_until(lambda: all(pod_cidr(80) not in routes(c, n) for n in c.nodes), 5, "multi's routes to go")


@VXLAN
def test_a_restarted_daemon_keeps_its_vtep_mac_from_the_annotation(cluster):
    """The VTEP deleted while the daemon is down (a reboot): the new one gets the MAC the
    Node's backend-data holds, so nothing changes for the other nodes; no PATCH is needed."""
    c = cluster
    node2 = c.node_by_role("node2")
    mac = vtep_mac(node2)
    writes = len(c.api.writes())
    c.stop_flanneld(node2)
    node2.ip("link", "del", "flannel.1")
    c.start_flanneld(node2)
    wait_until(lambda: readyz(c, node2)[0] == 200, TIMEOUT, "node2 to be ready again")
    assert vtep_mac(node2) == mac
    assert "VTEP MAC %s from this node's annotation" % mac in log_text(c, node2)
    new = c.api.writes()[writes:]
    assert [w.json().get("status", {}).get("conditions", [{}])[0].get("type") for w in new] == ["NetworkUnavailable"]
    pairs = {(a.name, b.name): (a.ns, b.ip) for a in c.pods for b in c.pods if a is not b and "node2" in a.name}
    assert ping_many(pairs) == {}
