"""flanneld's Kubernetes subnet manager, its health and metrics, without a kernel.

No kube-apiserver can run on this machine: the API side is tests/fake_kube_api.py, a
stateful scripted server speaking the API's wire format on 127.0.0.1 (see its
docstring for which behaviours come from the API documentation). The client side is
the real `kubernetes` package. The kernel side (routes, FDB, pods talking) is in
netns_tests/test_flanneld_kube_cluster.py.
"""
import json
import logging
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flanneld import daemon as flanneld_daemon
from flanneld.metrics import FlanneldMetrics, entry_counts, udp_counters
from flanneld.subnet import Lease
from flanneld.subnet.kube import (
    KubeSubnetManager,
    PodCIDRMissing,
    annotation_names,
    annotation_patch,
    backend_data_text,
    network_unavailable_patch,
    node_lease,
    stored_mac,
)
from podnet import httpd
from podnet.kube.nodes import NodeNameError, make_client, pod_cidrs
from podnet.kube.objects import InvalidObject
from podnet.net.ip import parse_cidr, parse_ip

from fake_kube_api import FakeKubeApi, strategic_merge

P = "flannel.alpha.coreos.com/"
NAMES = annotation_names()
MAC1, MAC2, MAC3 = "0a:6f:08:12:55:ce", "4a:0a:31:60:ad:44", "62:8d:37:1f:a5:45"


def flannel_annotations(public_ip, mac=None, backend="vxlan"):
    """As upstream flannel writes them (pkg/subnet/kube/kube.go AcquireLease,
    pkg/backend/vxlan/vxlan.go newSubnetAttrs)."""
    return {P + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % mac if mac else "null",
            P + "backend-type": backend, P + "kube-subnet-manager": "true", P + "public-ip": public_ip}


# ---- the pure pieces ---------------------------------------------------------------------

def test_annotation_names_follow_flannels_prefix_rules():
    assert NAMES.backend_data == "flannel.alpha.coreos.com/backend-data"
    assert NAMES.kube_managed == "flannel.alpha.coreos.com/kube-subnet-manager"
    assert annotation_names("example.com/").public_ip == "example.com/public-ip"
    assert annotation_names("example.com/net").public_ip == "example.com/net-public-ip"
    assert annotation_names("example.com/net-").public_ip == "example.com/net-public-ip"
    for bad in ("a/b/c", "UPPER.com", "nodots", "example.com/Bad"):
        with pytest.raises(ValueError):
            annotation_names(bad)


def test_backend_data_is_gos_encoding():
    assert backend_data_text({"VNI": 1, "VtepMAC": MAC1}) == '{"VNI":1,"VtepMAC":"%s"}' % MAC1
    assert backend_data_text({}) == backend_data_text(None) == "null"


def test_annotation_patch_names_only_what_differs():
    fresh = annotation_patch({}, NAMES, "vxlan", {"VNI": 1, "VtepMAC": MAC1}, "192.168.50.1")
    assert fresh == flannel_annotations("192.168.50.1", MAC1)
    assert list(fresh) == sorted(fresh)
    assert annotation_patch(fresh, NAMES, "vxlan", {"VNI": 1, "VtepMAC": MAC1}, "192.168.50.1") == {}
    assert annotation_patch(fresh, NAMES, "vxlan", {"VNI": 1, "VtepMAC": MAC2}, "192.168.50.1") == \
        {P + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % MAC2}
    assert annotation_patch({}, NAMES, "host-gw", {}, "192.168.50.1") == \
        flannel_annotations("192.168.50.1", backend="host-gw")
    # vxlan without data yet: the type and the marker only (flannel's `bd != "null"` rule)
    assert annotation_patch({}, NAMES, "vxlan", {}, "10.0.0.1") == {P + "backend-type": "vxlan",
                                                                     P + "kube-subnet-manager": "true"}


def test_public_ip_overwrite_is_published_instead():
    current = {P + "public-ip-overwrite": "203.0.113.5"}
    patch = annotation_patch(current, NAMES, "vxlan", {"VNI": 1, "VtepMAC": MAC1}, "192.168.50.1")
    assert patch[P + "public-ip"] == "203.0.113.5"
    current.update(patch)
    assert annotation_patch(current, NAMES, "vxlan", {"VNI": 1, "VtepMAC": MAC1}, "192.168.50.1") == {}


def node(name, cidr=None, ann=None, cidrs=None):
    spec = {}
    if cidr:
        spec["podCIDR"] = cidr
    if cidrs:
        spec["podCIDRs"] = cidrs
    return {"metadata": {"name": name, "annotations": ann or {}}, "spec": spec}


def test_node_lease():
    lease = node_lease(node("a", "10.244.3.0/24", flannel_annotations("192.168.50.3", MAC3)), NAMES)
    assert lease == Lease(parse_cidr("10.244.3.0/24"), parse_ip("192.168.50.3"), "vxlan",
                          {"VNI": 1, "VtepMAC": MAC3})
    assert node_lease(node("a", "10.244.3.0/24"), NAMES) is None                 # not flannel's: ignored
    dual = node("a", cidrs=["fd00:1::/64", "10.244.4.0/24"], ann=flannel_annotations("192.168.50.4"))
    assert str(node_lease(dual, NAMES).subnet) == "10.244.4.0/24"
    assert node_lease(dual, NAMES).backend_data == {}                           # "null"
    for bad, why in ((node("a", None, flannel_annotations("192.168.50.3")), "no IPv4 podCIDR"),
                     (node("a", "10.244.3.0/24", flannel_annotations("x")), "not an IPv4 address"),
                     (node("a", "10.244.3.0/24", dict(flannel_annotations("1.2.3.4"), **{P + "backend-data": "{"})),
                      "is not JSON"),
                     (node("a", "nonsense", flannel_annotations("1.2.3.4")), "spec.podCIDR: 'nonsense' is not a CIDR"),
                     (node("a", cidrs=["10.1.0.0/24"] * 3, ann=flannel_annotations("1.2.3.4")), "at most one")):
        with pytest.raises(InvalidObject, match=why):
            node_lease(bad, NAMES)


def test_pod_cidrs_prefers_the_list():
    assert [str(c) for c in pod_cidrs(node("a", "10.1.0.0/24", cidrs=["10.1.0.0/24", "fd00::/64"]))] == \
        ["10.1.0.0/24", "fd00::/64"]
    assert pod_cidrs(node("a")) == []


def test_stored_mac():
    assert stored_mac(node("a", ann=flannel_annotations("1.2.3.4", MAC2)), NAMES) == MAC2
    assert stored_mac(node("a", ann=flannel_annotations("1.2.3.4")), NAMES) is None
    assert stored_mac(node("a"), NAMES) is None


def test_network_unavailable_patch_is_flannels():
    patch = network_unavailable_patch(1700000000.7)
    assert json.dumps(patch, separators=(",", ":")) == (
        '{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False",'
        '"lastHeartbeatTime":"2023-11-14T22:13:20Z","lastTransitionTime":"2023-11-14T22:13:20Z",'
        '"reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}')


def test_the_fakes_strategic_merge_follows_the_api():
    old = {"metadata": {"annotations": {"a": "1", "b": "2"}},
           "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "status": "True"}]}}
    new = strategic_merge(old, {"metadata": {"annotations": {"a": None, "c": "3"}},
                                "status": {"conditions": [{"type": "X", "status": "False"},
                                                          {"type": "NetworkUnavailable", "status": "False"}]}})
    assert new["metadata"]["annotations"] == {"b": "2", "c": "3"}
    assert new["status"]["conditions"] == [{"type": "Ready", "status": "True"}, {"type": "X", "status": "False"},
                                           {"type": "NetworkUnavailable", "status": "False"}]
    merge = strategic_merge(old, {"status": {"conditions": [{"type": "X"}]}}, lists_by_key=False)
    assert merge["status"]["conditions"] == [{"type": "X"}]                  # RFC 7386: lists replaced


# ---- the manager against the scripted API ---------------------------------------------------

@pytest.fixture
def api():
    server = FakeKubeApi(bookmark_interval=0.2)
    yield server
    server.close()


@pytest.fixture
def net_conf(tmp_path):
    path = tmp_path / "net-conf.json"
    path.write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}))
    return str(path)


@pytest.fixture
def manager(api, net_conf):
    made = []

    def make(**kw):
        kw.setdefault("node_name", "n1")
        kw.setdefault("backoff", (0.05, 0.2))
        sm = KubeSubnetManager(lambda: make_client(api.url), net_conf, **kw)
        made.append(sm)
        return sm
    yield make
    for sm in made:
        sm.stop()


def vxlan_data(mac):
    return {"VNI": 1, "VtepMAC": mac}


def test_acquire_annotates_with_one_strategic_merge_patch_of_status(api, manager):
    api.add_node("n1", pod_cidr="10.244.1.0/24")
    lease = manager().acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1))
    assert (str(lease.subnet), str(lease.public_ip), lease.expiration) == ("10.244.1.0/24", "192.168.50.1", None)
    assert [(r.method, r.path) for r in api.requests] == [("GET", "/api/v1/nodes/n1"),
                                                          ("PATCH", "/api/v1/nodes/n1/status")]
    patch = api.requests[1]
    assert patch.content_type == "application/strategic-merge-patch+json"
    assert patch.json() == {"metadata": {"annotations": flannel_annotations("192.168.50.1", MAC1)}}
    assert api.node("n1")["metadata"]["annotations"] == flannel_annotations("192.168.50.1", MAC1)
    # a restart with the same attributes writes nothing
    api.requests.clear()
    manager().acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1))
    assert [(r.method, r.path) for r in api.requests] == [("GET", "/api/v1/nodes/n1")]


def test_other_annotations_and_an_overwrite_are_kept(api, manager):
    api.add_node("n1", pod_cidr="10.244.1.0/24", annotations={"node.alpha.kubernetes.io/ttl": "0",
                                                             P + "public-ip-overwrite": "203.0.113.5"})
    manager().acquire_lease(parse_ip("192.168.50.1"), "host-gw", {})
    ann = api.node("n1")["metadata"]["annotations"]
    assert ann["node.alpha.kubernetes.io/ttl"] == "0" and ann[P + "public-ip"] == "203.0.113.5"
    assert ann[P + "backend-data"] == "null"


def test_node_name_from_the_pods_spec(api, manager):
    api.add_node("worker-7", pod_cidr="10.244.7.0/24")
    api.add_pod("kube-flannel", "kube-flannel-ds-x2b9c", "worker-7")
    sm = manager(node_name=None, environ={"POD_NAME": "kube-flannel-ds-x2b9c", "POD_NAMESPACE": "kube-flannel"})
    assert str(sm.acquire_lease(parse_ip("10.0.0.7"), "host-gw", {}).subnet) == "10.244.7.0/24"
    assert [r.path for r in api.requests][:2] == ["/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-x2b9c",
                                                  "/api/v1/nodes/worker-7"]
    with pytest.raises(NodeNameError, match="NODE_NAME"):
        manager(node_name=None, environ={}).resolve_node_name()
    with pytest.raises(LookupError, match="does not exist"):
        manager(node_name=None, environ={"POD_NAME": "gone", "POD_NAMESPACE": "x"}).resolve_node_name()


def test_a_node_without_pod_cidr_is_waited_for(api, manager):
    api.add_node("n1")
    sm = manager()
    with pytest.raises(PodCIDRMissing, match="node n1 has no IPv4 podCIDR yet: waiting"):
        sm.acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1))
    assert api.writes() == []
    api.update_node("n1", lambda n: n["spec"].update(podCIDR="10.244.9.0/24", podCIDRs=["10.244.9.0/24"]))
    assert str(sm.acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1)).subnet) == "10.244.9.0/24"


def test_a_pod_cidr_outside_the_network_is_refused(api, manager):
    api.add_node("n1", pod_cidr="10.99.1.0/24")
    with pytest.raises(ValueError, match="does not contain node n1's podCIDR 10.99.1.0/24"):
        manager().acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1))
    assert api.writes() == []


def test_a_failed_patch_is_an_error_to_retry(api, manager):
    api.add_node("n1", pod_cidr="10.244.1.0/24")
    api.fail_next("PATCH", "/api/v1/nodes/n1/status", 500)
    sm = manager()
    from kubernetes.client.rest import ApiException
    with pytest.raises(ApiException, match="500"):
        sm.acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1))
    sm.acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1))
    assert api.node("n1")["metadata"]["annotations"] == flannel_annotations("192.168.50.1", MAC1)


def test_complete_lease_sets_network_unavailable_false(api, manager):
    api.add_node("n1", pod_cidr="10.244.1.0/24")
    sm = manager()
    lease = sm.acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1))
    sm.complete_lease(lease)
    last = api.writes()[-1]
    assert (last.method, last.path, last.content_type) == ("PATCH", "/api/v1/nodes/n1/status",
                                                           "application/strategic-merge-patch+json")
    (cond,) = last.json()["status"]["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("NetworkUnavailable", "False", "FlannelIsUp")
    conditions = {c["type"]: c["status"] for c in api.node("n1")["status"]["conditions"]}
    assert conditions == {"Ready": "True", "NetworkUnavailable": "False"}     # merged by type
    n = len(api.writes())
    manager(set_network_unavailable=False).complete_lease(lease)
    assert len(api.writes()) == n


def test_stored_attributes(api, manager):
    api.add_node("n1", pod_cidr="10.244.1.0/24", annotations=dict(flannel_annotations("192.168.50.1", MAC1),
                                                                  **{P + "node-public-ip": "198.51.100.1"}))
    assert manager().stored_attributes() == ("198.51.100.1", MAC1)
    assert manager(node_name="absent").stored_attributes() == (None, None)


def add_flannel_node(api, i, mac=None, ip=None, cidr=None):
    return api.add_node("n%d" % i, pod_cidr=cidr or "10.244.%d.0/24" % i,
                        annotations=flannel_annotations(ip or "192.168.50.%d" % i, mac or "02:00:00:00:00:%02x" % i))


class Watcher:
    """watch_leases() in a thread, its events collected."""

    def __init__(self, sm, revision):
        self.events = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(sm, revision), daemon=True)
        self.thread.start()

    def _run(self, sm, revision):
        for event in sm.watch_leases(revision, self.stop):
            self.events.append(event)

    def wait(self, count, timeout=5):
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.events) >= count, self.events
        return self.events

    def close(self):
        self.stop.set()
        self.thread.join(2)


def subnets(leases):
    return sorted(str(l.subnet) for l in leases)


def test_list_is_paged_and_ignores_nodes_that_are_not_flannels(api, manager, caplog):
    for i in range(1, 6):
        add_flannel_node(api, i)
    api.add_node("plain", pod_cidr="10.244.99.0/24")                       # no flannel annotations
    api.add_node("broken", pod_cidr="10.244.98.0/24", annotations=dict(flannel_annotations("nope")))
    sm = manager(page_size=2)
    with caplog.at_level(logging.WARNING, logger="flanneld.subnet.kube"):
        leases, _ = sm.list_leases()
    assert subnets(leases) == ["10.244.%d.0/24" % i for i in range(1, 6)]
    lists = [r for r in api.requests if r.path == "/api/v1/nodes" and r.query.get("watch") != "true"]
    assert [r.query.get("limit") for r in lists] == ["2"] * 4 and "continue" in lists[1].query
    assert "ignoring node broken: annotation flannel.alpha.coreos.com/public-ip: 'nope'" in caplog.text
    assert sm.stats() == {"nodes": 7, "leases": 5, "invalid": 1, "ignored": 1, "relists": 1, "events": 1}
    # kubelet's status updates change nothing flanneld uses: no event, no second log line
    w = Watcher(sm, sm.list_leases()[1])
    try:
        caplog.clear()
        for name in ("n1", "broken"):
            api.update_node(name, lambda n: n["status"]["conditions"][0].update(lastHeartbeatTime="later"))
        time.sleep(0.3)
        assert w.events == [] and "broken" not in caplog.text
    finally:
        w.close()


def test_watch_turns_node_changes_into_lease_events(api, manager):
    add_flannel_node(api, 1, MAC1)
    add_flannel_node(api, 2, MAC2)
    sm = manager()
    leases, revision = sm.list_leases()
    assert subnets(leases) == ["10.244.1.0/24", "10.244.2.0/24"]
    w = Watcher(sm, revision)
    try:
        add_flannel_node(api, 3, MAC3)
        assert w.wait(1)[-1] == ("put", Lease(parse_cidr("10.244.3.0/24"), parse_ip("192.168.50.3"), "vxlan",
                                              vxlan_data(MAC3)))
        api.set_annotations("n3", {P + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % MAC1.replace("0a", "0e")})
        kind, lease = w.wait(2)[-1]
        assert kind == "put" and lease.backend_data["VtepMAC"] == MAC1.replace("0a", "0e")
        api.delete_node("n2")
        assert w.wait(3)[-1] == ("delete", parse_cidr("10.244.2.0/24"))
        # a Node that stops being flannel's is a deletion too
        api.set_annotations("n3", {P + "kube-subnet-manager": None})
        assert w.wait(4)[-1] == ("delete", parse_cidr("10.244.3.0/24"))
        # a new podCIDR: the old subnet goes and the new one comes, handed over together
        api.update_node("n1", lambda n: n["spec"].update(podCIDR="10.244.11.0/24", podCIDRs=["10.244.11.0/24"]))
        kind, payload = w.wait(5)[-1]
        assert kind == "resync" and subnets(payload) == ["10.244.11.0/24"]
    finally:
        w.close()


def test_dropped_watch_and_410_gone_lose_nothing(api, manager):
    for i in (1, 2, 3):
        add_flannel_node(api, i)
    sm = manager()
    leases, revision = sm.list_leases()
    w = Watcher(sm, revision)
    try:
        time.sleep(0.3)
        assert api.drop_watches() == 1
        add_flannel_node(api, 4)                  # while nobody watches
        assert w.wait(1)[-1][0] == "put" and str(w.events[-1][1].subnet) == "10.244.4.0/24"
        assert sm.stats()["relists"] == 1          # resumed from the resourceVersion it had
        deadline = time.monotonic() + 5
        while api.watch_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        api.drop_watches()
        api.delete_node("n1")
        add_flannel_node(api, 5)
        api.compact()                             # the watch resumes too late: 410, a re-list
        w.wait(2)
        assert sm.stats()["relists"] == 2
        final = {}
        for kind, payload in w.events:
            if kind == "resync":
                final = {str(l.subnet): l for l in payload}
            elif kind == "put":
                final[str(payload.subnet)] = payload
            else:
                final.pop(str(payload), None)
        deadline = time.monotonic() + 5
        while sorted(final) != ["10.244.%d.0/24" % i for i in (2, 3, 4, 5)] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert subnets(sm.list_leases()[0]) == ["10.244.%d.0/24" % i for i in (2, 3, 4, 5)]
        # and the bookmarks the server sent kept the watch's resourceVersion fresh
        assert any(r.query.get("allowWatchBookmarks") == "true" for r in api.requests)
    finally:
        w.close()


def test_a_slow_reader_gets_a_resync_instead_of_lost_events(api, manager):
    add_flannel_node(api, 1)
    sm = manager(event_buffer=2)
    _, revision = sm.list_leases()
    for i in range(2, 8):
        add_flannel_node(api, i)
    deadline = time.monotonic() + 5
    while sm.stats()["leases"] < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop = threading.Event()
    kind, payload = next(sm.watch_leases(revision, stop))
    stop.set()
    assert kind == "resync" and len(payload) == 7


def test_only_allowed_calls_are_made(api, manager):
    """kube-flannel's ClusterRole: pods get, nodes get/list/watch, nodes/status patch."""
    api.add_node("n1", pod_cidr="10.244.1.0/24")
    add_flannel_node(api, 2)
    api.add_pod("kube-flannel", "p", "n1")
    sm = manager(node_name=None, environ={"POD_NAME": "p", "POD_NAMESPACE": "kube-flannel"})
    lease = sm.acquire_lease(parse_ip("192.168.50.1"), "vxlan", vxlan_data(MAC1))
    sm.stored_attributes()
    sm.list_leases()
    sm.complete_lease(lease)
    allowed = {("GET", "/api/v1/namespaces/kube-flannel/pods/p"), ("GET", "/api/v1/nodes/n1"),
               ("GET", "/api/v1/nodes"), ("PATCH", "/api/v1/nodes/n1/status")}
    assert {(r.method, r.path) for r in api.requests} <= allowed
    assert all(r.content_type == "application/strategic-merge-patch+json" for r in api.writes())


# ---- the daemon's health, readiness and metrics ------------------------------------------------

class Backend:
    def __init__(self):
        self.synced = []

    def sync(self, leases):
        self.synced.append(list(leases))
        return ["set route %d" % i for i in range(len(leases))]

    def desired(self, leases):
        return {"routes": list(leases), "neighbours": list(leases), "fdb": []}

    def stats(self):
        return {"tx_packets": 7, "rx_packets": 5, "tx_sends": 2, "drops_no_route": 1, "drops_foreign": 0,
                "send_errors": 0, "tun_reopened": 1}


class Manager:
    def stats(self):
        return {"nodes": 4, "leases": 3, "invalid": 1, "ignored": 0, "relists": 2, "events": 9}

    def alive(self):
        return True, ""


def make_daemon(*argv):
    metrics = FlanneldMetrics()
    sm = Manager()
    metrics.subnet_stats = sm.stats
    d = flanneld_daemon.Daemon(flanneld_daemon.parse_args(list(argv), environ={}), sm, metrics)
    d.backend = Backend()
    metrics.backend_stats = d.backend.stats
    return d


def get(server, path):
    host, port = server.server_address[:2]
    try:
        with urllib.request.urlopen("http://%s:%d%s" % (host, port, path), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def served():
    servers = []

    def serve(d):
        server = httpd.serve(("127.0.0.1", 0), flanneld_daemon.health_routes(d))
        servers.append(server)
        return server
    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def test_readyz_503_until_subnet_env_iptables_and_the_first_sync(served):
    d = make_daemon()
    server = served(d)
    assert get(server, "/healthz") == (200, "flanneld is running\n")
    assert get(server, "/readyz") == (503, "flanneld is not ready yet: waiting for the network config and "
                                           "lease, the backend's first sync, the iptables rules\n")
    d._subnet_written = True
    d._iptables_pending = lambda: None
    d._update_ready()
    assert get(server, "/readyz")[0] == 503
    assert d._apply_iptables()
    assert get(server, "/readyz") == (503, "flanneld is not ready yet: waiting for the backend's first sync\n")
    d._synced_once = True
    d._update_ready()
    assert get(server, "/readyz") == (200, "flanneld is ready\n")


def test_healthz_fails_for_a_stuck_sync_or_a_dead_loop(served):
    d = make_daemon("--healthz-stall-timeout", "2")
    server = served(d)
    d._sync_started = time.monotonic() - 1
    assert get(server, "/healthz")[0] == 200
    d._sync_started = time.monotonic() - 3
    assert get(server, "/healthz") == (503, "flanneld is not healthy: a backend sync has been running for 3s\n")
    d._sync_started = None
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    d._threads["reconcile"] = dead
    assert get(server, "/healthz") == (503, "flanneld is not healthy: the reconcile loop has stopped\n")


def test_the_wedge_hook_blocks_a_sync_until_stop():
    d = make_daemon("--healthz-stall-timeout", "0.2")
    d.wedge()
    t = threading.Thread(target=d._sync, args=({"a": "lease-a"},), daemon=True)
    t.start()
    time.sleep(0.4)
    assert t.is_alive() and d.liveness()[0] is False
    d.stop.set()
    t.join(2)
    assert not t.is_alive()


def test_metrics_parse_and_say_what_the_docs_say(served):
    d = make_daemon()
    d._sync({"a": "lease-a", "b": "lease-b"})
    d._sync(None, "reconcile")
    status, text = get(served(d), "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["flanneld_backend_sync_duration_seconds"].type == "histogram"
    assert samples[("flanneld_backend_sync_duration_seconds_count", (("trigger", "event"),))] == 1
    assert samples[("flanneld_backend_sync_duration_seconds_count", (("trigger", "reconcile"),))] == 1
    assert samples[("flanneld_backend_changes_total", ())] == 4
    assert samples[("flanneld_leases", ())] == 2
    assert samples[("flanneld_backend_entries", (("kind", "route"),))] == 2
    assert samples[("flanneld_backend_entries", (("kind", "fdb"),))] == 0
    assert samples[("flanneld_kube_nodes", (("state", "lease"),))] == 3
    assert samples[("flanneld_kube_relists_total", ())] == 2
    assert samples[("flanneld_udp_packets_total", (("direction", "tx"),))] == 7
    assert samples[("flanneld_udp_dropped_packets_total", (("reason", "no_route"),))] == 1
    assert samples[("flanneld_udp_tun_reopened_total", ())] == 1
    assert samples[("flanneld_ready", ())] == 0
    # every family is in the module's docstring
    import flanneld.metrics as m
    for name in families:
        assert name in m.__doc__, name


def test_udp_counters_and_entry_counts():
    assert udp_counters({"tx": 1, "rx_packets": 2, "dropped_x": 3, "drops": {"y": 4}, "other": 5}) == \
        ({"tx": 1, "rx": 2}, {"x": 3, "y": 4})
    assert entry_counts({"routes": [1, 2]}) == {"route": 2}
    assert entry_counts({"a": 1, "b": 2, "c": 3}) == {"route": 3}


def test_flags_as_flannel_takes_them():
    opts = flanneld_daemon.parse_args(["--kube-subnet-mgr", "--iface", "eth0", "--iface", "10.0.0.1",
                                       "--iface-regex", "^ens", "--iface-regex", "^eth",
                                       "--set-node-network-unavailable=false"], environ={})
    assert opts.iface == ["eth0", "10.0.0.1"] and opts.iface_regex == ["^ens", "^eth"]
    assert opts.set_node_network_unavailable is False and opts.kube_subnet_mgr
    assert opts.kube_annotation_prefix == "flannel.alpha.coreos.com"
    assert opts.net_config_path == "/etc/kube-flannel/net-conf.json"
    env = {"FLANNELD_IFACE": "eth9", "FLANNELD_IP_MASQ": "true", "FLANNELD_HEALTHZ_PORT": "8081",
           "FLANNELD_KUBE_SUBNET_MGR": "1"}
    opts = flanneld_daemon.parse_args([], environ=env)
    assert (opts.iface, opts.ip_masq, opts.healthz_port, opts.kube_subnet_mgr) == (["eth9"], True, 8081, True)
    assert flanneld_daemon.parse_args(["--iface", "eth1"], environ=env).iface == ["eth1"]   # the flag wins
