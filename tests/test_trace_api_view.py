"""`podnet trace --kubeconfig` asks the Kubernetes API only for the objects its walk reads.

The API side is tests/fake_kube_api.py (real HTTP, the API's wire format, its field and label
selectors). Each SRC/DST form is traced twice over the same cluster: once from the targeted
lists (diagnose.trace.api_view), once from full lists of every kind; the requests of the first
are pinned, and both walks must give the same answer, hop for hop."""
import json
import urllib.error
import urllib.request

import pytest
from test_trace_unit import MAC1, MAC2, NODE1, NODE2, A, B, C, flannel_node, node_snapshot

from diagnose.snapshot import Snapshot
from diagnose.trace import FEW_ENDPOINT_ADDRESSES, NodeState, load_view, rule_scope, walk
from lab import manifests as k8s
from podnet.kube.api import KubeApiSource
from podnet.kube.events import RESOURCES

from fake_kube_api import FakeKubeApi

CLUSTER_IP = "10.96.0.20"
NODE_PORT = 30080
TEAMS = ["team-%d" % i for i in range(4)]
BULK = ["10.244.2.%d" % (100 + i) for i in range(FEW_ENDPOINT_ADDRESSES + 4)]


def pod(namespace, name, ip, node, app=None, host_network=False, phase="Running"):
    spec = {"nodeName": node, "containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8080}]}]}
    if host_network:
        spec["hostNetwork"] = True
    return {"metadata": {"name": name, "namespace": namespace, "labels": {"app": app or name}},
            "spec": spec, "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": (
                NODE1 if node == "node1" else NODE2)}}


def policy(namespace, name, selector, types, ingress=None):
    spec = {"podSelector": selector, "policyTypes": types}
    if ingress is not None:
        spec["ingress"] = ingress
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def build_cluster(api, isolate_c=False):
    """Two flannel nodes; shop/a, shop/b on node1 and default/c on node2 behind Service default/web
    (ClusterIP, NodePort); bulk/many with more endpoints than are looked up one by one; and, to be
    left alone, four namespaces of workers, Services, EndpointSlices and NetworkPolicies."""
    for name, cidr, ip, mac in (("node1", "10.244.1.0/24", NODE1, MAC1), ("node2", "10.244.2.0/24", NODE2, MAC2)):
        api.add_node(name, pod_cidr=cidr, internal_ip=ip,
                     annotations=flannel_node(name, cidr, ip, mac)["metadata"]["annotations"])
    for namespace in ["default", "shop", "bulk", "kube-system"] + TEAMS:
        api.add_object("Namespace", {"metadata": {"name": namespace, "labels": {"team": namespace}}})
    api.add_object("Pod", pod("shop", "a", A, "node1"))
    api.add_object("Pod", pod("shop", "b", B, "node1"))
    api.add_object("Pod", pod("default", "c", C, "node2"))
    for node, ip in (("node1", NODE1), ("node2", NODE2)):       # they hold their node's address
        api.add_object("Pod", pod("kube-system", "kube-proxy-" + node, ip, node, host_network=True))
    api.add_object("Service", k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080,
                                                               "nodePort": NODE_PORT}], type="NodePort"))
    api.add_object("EndpointSlice", k8s.endpoint_slice("web", [(C, "node2")], [{"port": 8080}]))
    for i, ip in enumerate(BULK):
        api.add_object("Pod", pod("bulk", "many-%d" % i, ip, "node2", app="many"))
    api.add_object("Service", k8s.service("many", "10.96.0.30", [{"port": 80, "targetPort": 8080}], namespace="bulk"))
    # its first endpoint, the one the walk follows, is a pod of another namespace (a hand-made slice)
    api.add_object("EndpointSlice", k8s.endpoint_slice("many", [(ip, "node2") for ip in [C] + BULK],
                                                       [{"port": 8080}], namespace="bulk"))
    for i in range(40):
        team, node = TEAMS[i % 4], "node%d" % (1 + i % 2)
        ip = "10.244.%d.%d" % (1 + i % 2, 10 + i)
        api.add_object("Pod", pod(team, "worker-%d" % i, ip, node, app="worker"))
        api.add_object("Service", k8s.service("svc-%d" % i, "10.96.1.%d" % i, [{"port": 80, "targetPort": 8080,
                                                                                 "nodePort": 31000 + i}],
                                              namespace=team, type="NodePort"))
        api.add_object("EndpointSlice", k8s.endpoint_slice("svc-%d" % i, [(ip, node)], [{"port": 8080}],
                                                           namespace=team))
    for team in TEAMS:
        api.add_object("NetworkPolicy", policy(team, "default-deny", {}, ["Ingress", "Egress"]))
    api.add_object("NetworkPolicy", policy("shop", "b-only-from-shop", {"matchLabels": {"app": "b"}}, ["Ingress"],
                                           [{"from": [{"podSelector": {}}]}]))
    if isolate_c:
        api.add_object("NetworkPolicy", policy("default", "c-from-team-0", {"matchLabels": {"app": "c"}},
                                               ["Ingress"], [{"from": [{"namespaceSelector": {
                                                   "matchLabels": {"team": "team-0"}}}]}]))


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(isolate_c=False):
        api = FakeKubeApi()
        made.append(api)
        build_cluster(api, isolate_c)
        return api, api.kubeconfig(str(tmp_path))
    yield make
    for api in made:
        api.close()


def states():
    snaps = {"node1": node_snapshot("10.244.1", "10.244.2", NODE1, NODE2, MAC2, ["a", "b"]),
             "node2": node_snapshot("10.244.2", "10.244.1", NODE2, NODE1, MAC1, ["c"] + BULK)}
    many = "".join("-A KUBE-SEP-M%d -p tcp -m comment --comment bulk/many -m tcp -j DNAT --to-destination %s:8080\n"
                   % (i, ip) for i, ip in enumerate([C] + BULK))
    for snap in snaps.values():         # kube-proxy's rules for bulk/many next to those for default/web
        nat, commit, _ = snap["iptables_save"].rpartition("COMMIT\n")
        snap["iptables_save"] = nat + many + commit
    return {name: NodeState(name, Snapshot.from_dict(snap)) for name, snap in snaps.items()}


def outcome(view, source, destination):
    try:
        return walk(view, states(), source, destination, "node1").to_dict()
    except ValueError as e:
        return "ValueError: %s" % e


def asked(api):
    """The requests made, as (path, fieldSelector, labelSelector)."""
    return [(r.path, r.query.get("fieldSelector", ""), r.query.get("labelSelector", "")) for r in api.requests]


def targeted_and_full(api, kubeconfig, source, destination):
    """(the targeted view, its requests, the full view)."""
    api.requests.clear()
    targeted = load_view(None, kubeconfig, None, source, destination)
    requests = asked(api)
    full = load_view(None, kubeconfig, None)
    return targeted, requests, full


NODES_AND_NAMESPACES = [("/api/v1/nodes", "", ""), ("/api/v1/namespaces", "", "")]
EVERY_SERVICE = ("/api/v1/services", "", "")


def pods_named(namespace, name):
    return ("/api/v1/namespaces/%s/pods" % namespace, "metadata.name=" + name, "")


def pods_at(ip):
    return ("/api/v1/pods", "status.podIP=" + ip, "")


def services_named(namespace, name):
    return ("/api/v1/namespaces/%s/services" % namespace, "metadata.name=" + name, "")


def slices_of(namespace, name):
    return ("/apis/discovery.k8s.io/v1/namespaces/%s/endpointslices" % namespace, "",
            "kubernetes.io/service-name=" + name)


def policies_in(*namespaces):
    return [("/apis/networking.k8s.io/v1/namespaces/%s/networkpolicies" % ns, "", "") for ns in namespaces]


WEB_ENDPOINTS = [slices_of("default", "web"), pods_at(C)]
CASES = {
    "pod to pod by name": ("shop/a", "default/c:8080", "delivered",
                           [pods_named("shop", "a"), pods_named("default", "c")] + policies_in("default", "shop")),
    "pod IP to pod IP": (A, C + ":8080", "delivered", [pods_at(A), pods_at(C)] + policies_in("default", "shop")),
    "pod to a Service by name": ("shop/a", "svc/default/web:80", "delivered",
                                 [pods_named("shop", "a"), services_named("default", "web")] + WEB_ENDPOINTS
                                 + policies_in("default", "shop")),
    # no pod has the address: every Service, for its ClusterIP
    "pod to a ClusterIP": ("shop/a", CLUSTER_IP + ":80", "delivered",
                           [pods_named("shop", "a"), pods_at(CLUSTER_IP), EVERY_SERVICE] + WEB_ENDPOINTS
                           + policies_in("default", "shop")),
    # a node's address is only its hostNetwork pods': every Service, for the NodePort
    "pod to a node's NodePort": ("shop/a", "%s:%d" % (NODE2, NODE_PORT), "delivered",
                                 [pods_named("shop", "a"), pods_at(NODE2), EVERY_SERVICE] + WEB_ENDPOINTS
                                 + policies_in("default", "shop")),
    "node address to pod": (NODE1, "shop/b:8080", "delivered",
                            [pods_at(NODE1), EVERY_SERVICE, pods_named("shop", "b")] + policies_in("shop")),
    "an unknown pod": ("shop/ghost", "default/c:8080", "ValueError: no pod shop/ghost",
                       [pods_named("shop", "ghost"), pods_named("default", "c")] + policies_in("default")),
    # more endpoints than are asked for one by one: the pods of the Service's namespace, then by
    # address the endpoint no pod there holds
    "pod to a Service of many endpoints": ("shop/a", "svc/bulk/many:80", "delivered",
                                           [pods_named("shop", "a"), services_named("bulk", "many"),
                                            slices_of("bulk", "many"), ("/api/v1/namespaces/bulk/pods", "", ""),
                                            pods_at(C)] + policies_in("bulk", "default", "shop")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_form_asks_only_for_what_the_walk_reads_and_walks_the_same(cluster, case):
    source, destination, verdict, requests = CASES[case]
    api, kubeconfig = cluster()
    targeted, made, full = targeted_and_full(api, kubeconfig, source, destination)
    assert made == NODES_AND_NAMESPACES + requests
    # none of the unrelated namespaces' objects (their Services only in the fallback's list of every one)
    assert not [o for o in targeted.pods + targeted.slices + targeted.policies if o["metadata"]["namespace"] in TEAMS]
    assert len(full.pods) > 60 and len(full.policies) > 4
    result = outcome(targeted, source, destination)
    assert result == outcome(full, source, destination)
    if isinstance(result, dict):
        assert verdict is None or result["verdict"] == verdict, json.dumps(result, indent=1)
    else:
        assert result == verdict
    assert rule_scope(targeted, destination) == rule_scope(full, destination)
    assert targeted.leases == full.leases and len(targeted.leases) == 2


def test_a_policy_of_the_destination_namespace_isolates_it(cluster):
    api, kubeconfig = cluster(isolate_c=True)
    for source, destination in (("shop/a", "default/c:8080"), ("shop/a", "svc/default/web:80"),
                                (A, CLUSTER_IP + ":80"), ("shop/a", "svc/bulk/many:80")):
        targeted, made, full = targeted_and_full(api, kubeconfig, source, destination)
        assert policies_in("default")[0] in made
        result = outcome(targeted, source, destination)
        assert result == outcome(full, source, destination)
        assert result["verdict"] == "dropped"
        assert (result["failed_hop"]["step"], result["failed_hop"]["object"]) == (
            "ingress-policy", "NetworkPolicy default/c-from-team-0")


def test_snapshot_scope_from_the_destination_alone(cluster):
    """`podnet trace --snapshot DST` (no SRC) computes the remote node's rule scope from DST's objects."""
    api, kubeconfig = cluster()
    full = load_view(None, kubeconfig, None)
    for destination, requests in (("svc/default/web:80", [services_named("default", "web")] + WEB_ENDPOINTS),
                                  ("%s:%d" % (NODE2, NODE_PORT), [pods_at(NODE2), EVERY_SERVICE] + WEB_ENDPOINTS)):
        api.requests.clear()
        view = load_view(None, kubeconfig, None, None, destination)
        assert asked(api) == NODES_AND_NAMESPACES + requests + policies_in("default")
        scope = rule_scope(view, destination)
        assert scope == rule_scope(full, destination) and scope.ipvs


# ---- the API client and the scripted server's selectors -----------------------------------

def get(api, path):
    try:
        with urllib.request.urlopen(api.url + path, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def names(objects):
    return ["%s/%s" % (o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects]


def test_list_by_namespace_and_selectors_paged(cluster):
    api, kubeconfig = cluster()
    source = KubeApiSource(lambda event: None, kubeconfig=kubeconfig, page_size=3)
    pods, rv = source.list("Pod", "team-1", label_selector="app=worker")
    assert names(pods) == sorted(names(pods)) and len(pods) == 10 and rv
    assert all(p["kind"] == "Pod" and p["apiVersion"] == "v1" for p in pods)
    pages = [r for r in api.requests if r.path == "/api/v1/namespaces/team-1/pods"]
    assert [bool(r.query.get("continue")) for r in pages] == [False, True, True, True]
    assert names(source.list("Pod", field_selector="spec.nodeName=node1,metadata.namespace=shop")[0]) == \
        ["shop/a", "shop/b"]
    assert names(source.list("Pod", field_selector="status.podIP=%s" % NODE2)[0]) == ["kube-system/kube-proxy-node2"]
    assert names(source.list("Pod", "shop", field_selector="metadata.name!=a")[0]) == ["shop/b"]
    slices, _ = source.list("EndpointSlice", label_selector="kubernetes.io/service-name=web")
    assert names(slices) == ["default/web-abcde"] and slices[0]["apiVersion"] == "discovery.k8s.io/v1"
    assert len(source.list("NetworkPolicy", label_selector="!app")[0]) == 5
    assert source.list("NetworkPolicy", label_selector="app")[0] == []
    assert names(source.list("Namespace", label_selector="team=shop,team!=bulk")[0]) == ["/shop"]
    assert source.list("Namespace", field_selector="metadata.name=bulk")[0][0]["metadata"]["labels"] == {
        "team": "bulk", "kubernetes.io/metadata.name": "bulk"}
    with pytest.raises(ValueError, match="not namespaced"):
        source.list("Node", "default")


def test_unsupported_selectors_are_refused_as_the_api_server_does(cluster):
    api, _ = cluster()
    code, body = get(api, "/api/v1/pods?fieldSelector=status.hostIP%3D" + NODE1)
    assert (code, body["reason"], body["message"]) == (400, "BadRequest", "field label not supported: status.hostIP")
    code, body = get(api, "/api/v1/services?fieldSelector=status.podIP%3D" + A)
    assert (code, body["message"]) == (400, "field label not supported: status.podIP")
    code, body = get(api, "/api/v1/pods?labelSelector=app+in+%28a%2Cb%29")
    assert code == 400 and "set-based" in body["message"]
    code, body = get(api, "/api/v1/namespaces/default/services/web")
    assert code == 200 and body["spec"]["clusterIP"] == CLUSTER_IP
    code, body = get(api, "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/nope")
    assert (code, body["reason"]) == (404, "NotFound")
    code, body = get(api, "/api/v1/pods?limit=2")
    assert code == 200 and body["kind"] == "PodList" and body["metadata"]["remainingItemCount"] > 60


def test_a_kinds_own_field_selector_is_combined_with_the_callers(cluster):
    """Secrets (type kubernetes.io/tls, always) by name, in one namespace: one selector, comma-joined.
    The scripted server serves no Secrets (404); the request is what is checked."""
    from kubernetes.client.rest import ApiException
    api, kubeconfig = cluster()
    source = KubeApiSource(lambda event: None, kubeconfig=kubeconfig, kinds=["Secret"])
    with pytest.raises(ApiException):
        source.list("Secret", "shop", field_selector="metadata.name=tls")
    (request,) = api.requests
    assert (request.path, request.query["fieldSelector"]) == ("/api/v1/namespaces/shop/secrets",
                                                              "type=kubernetes.io/tls,metadata.name=tls")


def test_namespaced_list_functions_exist():
    import kubernetes.client
    for kind, res in RESOURCES.items():
        if res.namespaced:
            assert callable(getattr(getattr(kubernetes.client, res.api_class), res.namespaced_list_func)), kind
        else:
            with pytest.raises(ValueError):
                _ = res.namespaced_list_func
