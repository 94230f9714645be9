"""network_policy/model.py: parsing, the semantics of networking.k8s.io/v1 NetworkPolicy as
the reference evaluator (verdict) states them, explain, and the incremental model's sets,
checked against a from-scratch computation on random clusters (hypothesis)."""
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from network_policy import model as m
from podnet.kube.objects import InvalidObject, LabelSelector, Requirement

# ---- API-shaped objects ----------------------------------------------------------------------


def ns_obj(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod_obj(ns, name, ips, labels=None, node="node1", ports=(), host_network=False, phase="Running",
            host_ip="192.168.0.1"):
    ips = [ips] if isinstance(ips, str) else list(ips)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": dict(labels or {})},
            "spec": {"nodeName": node, "hostNetwork": host_network,
                     "containers": [{"name": "main", "ports": [dict(p) for p in ports]}]},
            "status": {"phase": phase, "podIPs": [{"ip": ip} for ip in ips], "hostIP": host_ip,
                       "hostIPs": [{"ip": host_ip}]}}


def pol_obj(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


def sel(**labels):
    return {"matchLabels": labels}


class Cluster:
    """A model fed the way the agent feeds it."""

    def __init__(self, node="node1"):
        self.model = m.PolicyModel(node)

    def ns(self, name, **labels):
        self.model.set_namespace(name, m.parse_namespace(ns_obj(name, **labels)))

    def pod(self, ns, name, ips, labels=None, **kw):
        pod = m.parse_pod(pod_obj(ns, name, ips, labels, **kw))
        self.model.set_pod((ns, name), pod)
        return pod

    def delete_pod(self, ns, name):
        self.model.set_pod((ns, name), None)

    def policy(self, ns, name, spec):
        policy = m.parse_policy(pol_obj(ns, name, spec))
        self.model.set_policy((ns, name), policy)
        return policy

    def ok(self, src, dst, proto="TCP", port=80):
        return self.model.verdict(src, dst, proto, port).allowed


@pytest.fixture
def xyz():
    """Namespaces x, y, z; pods a, b, c in each (upstream e2e's layout): x/a 10.0.0.1 ... z/c 10.0.2.3."""
    c = Cluster()
    for i, ns in enumerate("xyz"):
        c.ns(ns, ns=ns)
        for j, name in enumerate("abc"):
            c.pod(ns, name, "10.0.%d.%d" % (i, j + 1), {"pod": name}, node="node%d" % (j % 2 + 1),
                  ports=[{"name": "serve-80-tcp", "containerPort": 80},
                         {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}])
    return c


def ip(ns, name):
    return "10.0.%d.%d" % ("xyz".index(ns), "abc".index(name) + 1)


def matrix(c, proto="TCP", port=80):
    """{(src, dst): allowed} over the 9x9 pods."""
    pods = [(ns, p) for ns in "xyz" for p in "abc"]
    return {(s, d): c.ok(ip(*s), ip(*d), proto, port) for s in pods for d in pods}


def allowed_pairs(c, proto="TCP", port=80):
    return {"%s/%s->%s/%s" % (s + d) for (s, d), ok in matrix(c, proto, port).items() if ok and s != d}


ALL_PAIRS = {"%s/%s->%s/%s" % (a, b, c, d) for a in "xyz" for b in "abc" for c in "xyz" for d in "abc"
             if (a, b) != (c, d)}


def to(dst_ns, dst, everything=ALL_PAIRS):
    """Pairs whose destination is dst_ns/dst."""
    return {p for p in everything if p.endswith("->%s/%s" % (dst_ns, dst))}


# ---- parsing ------------------------------------------------------------------------------------------

def test_parse_pod():
    pod = m.parse_pod(pod_obj("x", "a", ["10.0.0.1", "fd00::1"], {"app": "web"}, node="n2",
                              ports=[{"name": "http", "containerPort": 8080}, {"containerPort": 9000},
                                     {"name": "dns", "containerPort": 53, "protocol": "UDP"}]))
    assert pod == m.Pod("x", "a", ("10.0.0.1", "fd00::1"), (("app", "web"),), "n2", False,
                        (m.NamedPort("http", "TCP", 8080), m.NamedPort("dns", "UDP", 53)), ("192.168.0.1",))
    assert pod.addressable and str(pod) == "x/a"
    # the contract's constructor (host_ips defaults)
    assert m.Pod("x", "a", (), (), "n1", False, ()).host_ips == ()


def test_parse_pod_without_ips_is_nobody_yet_and_finished_pods_are_gone():
    obj = pod_obj("x", "a", [])
    del obj["status"]["podIPs"]
    pod = m.parse_pod(obj)
    assert pod is not None and pod.ips == () and not pod.addressable
    assert m.parse_pod(pod_obj("x", "a", "10.0.0.1", phase="Succeeded")) is None
    assert m.parse_pod(pod_obj("x", "a", "10.0.0.1", phase="Failed")) is None
    obj = pod_obj("x", "a", [])
    obj["status"] = {"podIP": "10.0.0.9"}       # older objects: podIP only
    assert m.parse_pod(obj).ips == ("10.0.0.9",)
    assert not m.parse_pod(pod_obj("x", "h", "192.168.0.1", host_network=True)).addressable


@pytest.mark.parametrize("mutate, error", [
    (lambda o: o["status"].update(podIPs=[{"ip": "10.0.0.300"}]), "status.podIPs[0].ip: '10.0.0.300' is not an IP address"),
    (lambda o: o["status"].update(podIPs=["10.0.0.1"]), "status.podIPs[0]: expected an object"),
    (lambda o: o["spec"]["containers"][0].update(ports=[{"containerPort": 70000}]),
     "spec.containers[0].ports[0].containerPort: 70000 is not a port number"),
    (lambda o: o["spec"]["containers"][0].update(ports=[{"name": "HTTP", "containerPort": 80}]),
     "spec.containers[0].ports[0].name: 'HTTP' is not a valid port name"),
    (lambda o: o["spec"]["containers"][0].update(ports=[{"name": "x", "containerPort": 80, "protocol": "ICMP"}]),
     "spec.containers[0].ports[0].protocol: 'ICMP' is not a supported protocol"),
    (lambda o: o["metadata"].update(labels={"a": "b c"}), "metadata.labels[a]: 'b c' is not a valid label value"),
    (lambda o: o["spec"].update(hostNetwork="yes"), "spec.hostNetwork: expected a boolean"),
])
def test_parse_pod_errors_say_where(mutate, error):
    obj = pod_obj("x", "a", "10.0.0.1")
    mutate(obj)
    with pytest.raises(InvalidObject) as e:
        m.parse_pod(obj)
    assert error in str(e.value)


def test_parse_namespace_has_the_name_label():
    ns = m.parse_namespace(ns_obj("x", team="a"))
    assert ns == m.Namespace("x", (("kubernetes.io/metadata.name", "x"), ("team", "a")))
    with pytest.raises(InvalidObject, match="metadata.name: 'X_x' is not a valid namespace name"):
        m.parse_namespace(ns_obj("X_x"))


def test_parse_policy_shapes():
    p = m.parse_policy(pol_obj("x", "p", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": sel(app="api")},
                              {"namespaceSelector": sel(team="a")},
                              {"namespaceSelector": sel(team="b"), "podSelector": sel(app="db")},
                              {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.2.0.0/16", "10.1.0.0/16"]}}],
                     "ports": [{"port": 80}, {"port": 8000, "endPort": 8100, "protocol": "UDP"}, {"port": "http"},
                               {"protocol": "SCTP"}]},
                    {}]}))
    web = LabelSelector((Requirement("app", "In", frozenset({"web"})),))
    assert p.pod_selector == web and p.egress is None
    rule = p.ingress[0]
    assert rule.peers[0] == m.PodSet("x", None, m.parse_policy(pol_obj("x", "q", {"podSelector": sel(app="api")})).pod_selector)
    assert rule.peers[1].namespace is None and rule.peers[1].pods == m.EVERYTHING
    assert rule.peers[2].namespaces is not None and rule.peers[2].pods.matches({"app": "db"})
    assert rule.peers[3] == m.IPBlock("10.0.0.0/8", ("10.1.0.0/16", "10.2.0.0/16"))
    assert rule.ports == (m.PortRange("TCP", 80), m.PortRange("UDP", 8000, 8100), m.PortSet("http", "TCP"),
                          m.PortRange("SCTP"))
    assert p.ingress[1] == m.Rule((), ())


def test_policy_types_inferred_and_explicit():
    def types(spec):
        p = m.parse_policy(pol_obj("x", "p", dict(podSelector={}, **spec)))
        return p.directions
    assert types({}) == ("ingress",)
    assert types({"ingress": [{}]}) == ("ingress",)
    assert types({"egress": [{}]}) == ("ingress", "egress")
    assert types({"egress": []}) == ("ingress",)            # an empty egress section is no section (API defaulting)
    assert types({"policyTypes": ["Egress"], "ingress": [{}]}) == ("egress",)
    assert types({"policyTypes": ["Ingress", "Egress"]}) == ("ingress", "egress")
    p = m.parse_policy(pol_obj("x", "p", {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}))
    assert p.ingress is None and p.egress == ()
    # absent podSelector decodes as {} (the API's Go type): every pod of the namespace
    assert m.parse_policy(pol_obj("x", "p", {})).pod_selector.everything


@pytest.mark.parametrize("spec, error", [
    ({"ingress": [{"from": [{}, {"ipBlock": {"cidr": "nope"}}]}]},
     "spec.ingress[0].from[0]: must specify podSelector, namespaceSelector or ipBlock"),
    ({"ingress": [{"from": [{"podSelector": {}}, {"ipBlock": {"cidr": "nope"}}]}]},
     "spec.ingress[0].from[1].ipBlock.cidr: 'nope' is not a CIDR"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]: '10.1.0.0/24' is not within cidr 10.0.0.0/16"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["fd00::/64"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]: 'fd00::/64' is not within cidr"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0]: ipBlock may not be combined"),
    ({"egress": [{"to": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}]}]},
     "spec.egress[0].to[0].podSelector.matchExpressions[0].operator: 'Is' is not In"),
    ({"egress": [{"ports": [{"port": "http", "endPort": 90}]}]}, "spec.egress[0].ports[0].endPort: may not be set with a named port"),
    ({"egress": [{"ports": [{"endPort": 90}]}]}, "spec.egress[0].ports[0].endPort: may not be set without a port"),
    ({"egress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "spec.egress[0].ports[0].endPort: 80 is below port 90"),
    ({"egress": [{"ports": [{"port": "80"}]}]}, "spec.egress[0].ports[0].port: '80' is neither a port number nor a valid port name"),
    ({"egress": [{"ports": [{"port": 0}]}]}, "spec.egress[0].ports[0].port: 0 is not a port number"),
    ({"ingress": [{"ports": [{"port": 80, "protocol": "tcp"}]}]}, "spec.ingress[0].ports[0].protocol: 'tcp' is not a supported protocol"),
    ({"policyTypes": ["Ingress", "Sideways"]}, "spec.policyTypes[1]: 'Sideways' is not Ingress or Egress"),
    ({"policyTypes": ["Ingress", "Ingress"]}, "spec.policyTypes: ['Ingress', 'Ingress'] names a type twice"),
    ({"ingress": {"from": []}}, "spec.ingress: expected a list"),
    ({"podSelector": []}, "spec.podSelector: expected an object"),
])
def test_parse_policy_errors_say_where(spec, error):
    with pytest.raises(InvalidObject) as e:
        m.parse_policy(pol_obj("x", "p", spec))
    assert error in str(e.value)


def test_parse_policy_object_errors():
    with pytest.raises(InvalidObject, match="spec: missing"):
        m.parse_policy({"metadata": {"name": "p", "namespace": "x"}})
    with pytest.raises(InvalidObject, match="metadata.name: 'P' is not a valid name"):
        m.parse_policy(pol_obj("x", "P", {}))
    with pytest.raises(InvalidObject, match="not an object"):
        m.parse_policy(["x"])


def test_same_selectors_in_other_words_are_one_set():
    a = m.parse_policy(pol_obj("x", "a", {"podSelector": {"matchLabels": {"app": "web", "tier": "fe"}}}))
    b = m.parse_policy(pol_obj("x", "b", {"podSelector": {"matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["fe"]}, {"key": "app", "operator": "In", "values": ["web"]}]}}))
    assert a.target == b.target


def test_ip_block_arithmetic():
    b = m.IPBlock("10.0.0.0/24", ("10.0.0.0/26", "10.0.0.128/25", "10.0.0.64/28"))
    assert b.prefixes == ("10.0.0.80/28", "10.0.0.96/27")
    assert b.ranges == ((int(ipaddress.ip_address("10.0.0.80")), int(ipaddress.ip_address("10.0.0.127"))),)
    assert b.contains("10.0.0.100") and not b.contains("10.0.0.70") and not b.contains("10.0.1.1")
    assert not b.contains("fd00::1")
    assert m.IPBlock("0.0.0.0/0").prefixes == ("0.0.0.0/0",)
    assert m.IPBlock("10.0.0.0/24", ("10.0.0.0/24",)).prefixes == ()
    # overlapping excepts
    assert m.IPBlock("10.0.0.0/24", ("10.0.0.0/25", "10.0.0.0/26")).prefixes == ("10.0.0.128/25",)
    six = m.IPBlock("fd00::/64", ("fd00::/65",))
    assert six.family == 6 and six.prefixes == ("fd00::8000:0:0:0/65",) and six.contains("fd00::ffff:0:0:1")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.lists(st.tuples(st.integers(0, 255), st.integers(24, 32)), max_size=4),
       st.integers(0, 255))
def test_ip_block_prefixes_are_the_cidr_minus_its_excepts(base, holes, probe):
    excepts = tuple(sorted({str(ipaddress.ip_network("10.9.%d.%d/%d" % (base, h, n), strict=False))
                            for h, n in holes}))
    # every except within the /24 of `base`... or not: keep only those within
    block = m.IPBlock("10.9.%d.0/24" % base, excepts)
    addr = "10.9.%d.%d" % (base, probe)
    expected = not any(ipaddress.ip_address(addr) in ipaddress.ip_network(e) for e in excepts)
    assert block.contains(addr) == expected
    in_prefixes = any(ipaddress.ip_address(addr) in ipaddress.ip_network(p) for p in block.prefixes)
    assert in_prefixes == expected
    nets = [ipaddress.ip_network(p) for p in block.prefixes]
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])


# ---- semantics (the reference evaluator) ---------------------------------------------------------------

def test_no_policies_everything_allowed(xyz):
    assert allowed_pairs(xyz) == ALL_PAIRS
    v = xyz.model.verdict(ip("x", "a"), ip("y", "b"), "TCP", 80)
    assert v.allowed and v.egress_by is None and v.ingress_by is None and v.denied_by is None


def test_deny_all_ingress_isolates_only_ingress_of_its_namespace(xyz):
    xyz.policy("x", "deny", {"podSelector": {}, "ingress": []})
    assert allowed_pairs(xyz) == ALL_PAIRS - {p for p in ALL_PAIRS if "->x/" in p}
    v = xyz.model.verdict(ip("y", "a"), ip("x", "b"))
    assert not v.allowed and v.denied_by == "ingress" and "isolated by deny" in v.reason


def test_deny_all_egress(xyz):
    xyz.policy("x", "deny", {"podSelector": {}, "policyTypes": ["Egress"]})
    assert allowed_pairs(xyz) == ALL_PAIRS - {p for p in ALL_PAIRS if p.startswith("x/")}
    assert xyz.model.verdict(ip("x", "a"), ip("y", "b")).denied_by == "egress"


def test_allowed_is_the_union_of_the_policies(xyz):
    xyz.policy("x", "from-b", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})
    xyz.policy("x", "from-c", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="c")}]}]})
    assert to("x", "a", allowed_pairs(xyz)) == {"x/b->x/a", "x/c->x/a"}
    v = xyz.model.verdict(ip("x", "c"), ip("x", "a"))
    assert v.ingress_by == ("x", "from-c", "ingress", 0)


def test_pod_selector_peer_means_the_policy_namespace(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})
    assert not xyz.ok(ip("y", "b"), ip("x", "a"))
    assert xyz.ok(ip("x", "b"), ip("x", "a"))


def test_namespace_selector_and_pod_selector_and_vs_or(xyz):
    xyz.policy("x", "and", {"podSelector": sel(pod="a"), "ingress": [{"from": [
        {"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="b")}]}]})
    assert to("x", "a", allowed_pairs(xyz)) == {"y/b->x/a"}
    xyz.policy("x", "and", {"podSelector": sel(pod="a"), "ingress": [{"from": [
        {"namespaceSelector": sel(ns="y")}, {"podSelector": sel(pod="b")}]}]})
    assert to("x", "a", allowed_pairs(xyz)) == {"y/a->x/a", "y/b->x/a", "y/c->x/a", "x/b->x/a"}


def test_namespace_selector_everything(xyz):
    xyz.policy("x", "all-ns", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    assert to("x", "a", allowed_pairs(xyz)) == to("x", "a")
    assert not xyz.ok("192.0.2.1", ip("x", "a"))        # pods of every namespace, no other address


def test_empty_from_is_everyone(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"ports": [{"port": 80}]}]})
    assert to("x", "a", allowed_pairs(xyz)) == to("x", "a")
    assert xyz.ok("192.0.2.1", ip("x", "a"))
    assert not xyz.ok("192.0.2.1", ip("x", "a"), port=81)


def test_ip_block_with_except(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}]}]})
    allowed = to("x", "a", allowed_pairs(xyz))
    assert allowed == {p for p in to("x", "a") if not p.startswith("y/")}      # ipBlock matches pod IPs too
    assert xyz.ok("10.0.200.1", ip("x", "a")) and not xyz.ok("10.1.0.1", ip("x", "a"))


def test_ports_number_range_protocol(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"ports": [
        {"port": 80}, {"port": 1000, "endPort": 1002, "protocol": "UDP"}, {"protocol": "SCTP"}]}]})
    src, dst = ip("y", "a"), ip("x", "a")
    assert xyz.ok(src, dst, "TCP", 80) and not xyz.ok(src, dst, "UDP", 80)      # default TCP
    assert [xyz.ok(src, dst, "UDP", p) for p in (999, 1000, 1001, 1002, 1003)] == [False, True, True, True, False]
    assert xyz.ok(src, dst, "SCTP", 5) and xyz.ok(src, dst, "SCTP", 65535)      # a protocol without a port: all ports
    assert not xyz.ok(src, dst, "TCP", 81)


def test_rule_without_ports_allows_every_protocol(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})
    assert all(xyz.ok(ip("x", "b"), ip("x", "a"), proto, port)
               for proto, port in (("TCP", 1), ("UDP", 53), ("SCTP", 9), ("ICMP", 0)))


def test_named_ports_resolve_on_each_destination_pod():
    c = Cluster()
    c.ns("x")
    c.pod("x", "a", "10.0.0.1", {"app": "web"}, ports=[{"name": "http", "containerPort": 8080}])
    c.pod("x", "b", "10.0.0.2", {"app": "web"}, ports=[{"name": "http", "containerPort": 9090}])
    c.pod("x", "c", "10.0.0.3", {"app": "web"}, ports=[{"name": "http", "containerPort": 8080, "protocol": "UDP"}])
    c.pod("x", "client", "10.0.0.9")
    c.policy("x", "p", {"podSelector": sel(app="web"), "ingress": [{"ports": [{"port": "http"}]}]})
    assert c.ok("10.0.0.9", "10.0.0.1", "TCP", 8080) and not c.ok("10.0.0.9", "10.0.0.1", "TCP", 9090)
    assert c.ok("10.0.0.9", "10.0.0.2", "TCP", 9090) and not c.ok("10.0.0.9", "10.0.0.2", "TCP", 8080)
    # c's "http" is UDP: a TCP named port does not resolve there
    assert not c.ok("10.0.0.9", "10.0.0.3", "TCP", 8080) and not c.ok("10.0.0.9", "10.0.0.3", "UDP", 8080)
    c.policy("x", "p", {"podSelector": sel(app="web"), "ingress": [{"ports": [{"port": "http", "protocol": "UDP"}]}]})
    assert c.ok("10.0.0.9", "10.0.0.3", "UDP", 8080)


def test_egress_named_ports_resolve_on_the_peer():
    c = Cluster()
    c.ns("x")
    c.pod("x", "client", "10.0.0.9", {"app": "client"})
    c.pod("x", "a", "10.0.0.1", {"app": "db"}, ports=[{"name": "sql", "containerPort": 5432}])
    c.pod("x", "b", "10.0.0.2", {"app": "db"}, ports=[{"name": "sql", "containerPort": 3306}])
    c.policy("x", "p", {"podSelector": sel(app="client"), "policyTypes": ["Egress"],
                        "egress": [{"ports": [{"port": "sql"}]}]})
    assert c.ok("10.0.0.9", "10.0.0.1", "TCP", 5432) and not c.ok("10.0.0.9", "10.0.0.1", "TCP", 3306)
    assert c.ok("10.0.0.9", "10.0.0.2", "TCP", 3306)
    assert not c.ok("10.0.0.9", "192.0.2.1", "TCP", 5432)       # not a pod: the name resolves to nothing
    assert c.model.verdict("10.0.0.9", "10.0.0.2", "TCP", 3306).egress_by == ("x", "p", "egress", 0)


def test_isolation_is_per_direction(xyz):
    xyz.policy("x", "in", {"podSelector": sel(pod="a"), "ingress": []})
    assert xyz.ok(ip("x", "a"), ip("y", "a"))           # egress of x/a is not isolated
    xyz.policy("x", "out", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": sel(ns="y")}]}]})
    assert xyz.ok(ip("x", "a"), ip("y", "a")) and not xyz.ok(ip("x", "a"), ip("z", "a"))
    assert not xyz.ok(ip("y", "a"), ip("x", "a"))


def test_egress_and_ingress_both_apply(xyz):
    xyz.policy("x", "out", {"podSelector": sel(pod="a"), "egress": [{"to": [{"podSelector": sel(pod="b")}]}]})
    xyz.policy("x", "in", {"podSelector": sel(pod="b"), "ingress": [{"from": [{"podSelector": sel(pod="c")}]}]})
    v = xyz.model.verdict(ip("x", "a"), ip("x", "b"))
    assert not v.allowed and v.denied_by == "ingress" and v.egress_by == ("x", "out", "egress", 0)
    xyz.policy("x", "in", {"podSelector": sel(pod="b"), "ingress": [{"from": [{"podSelector": sel(pod="a")}]}]})
    v = xyz.model.verdict(ip("x", "a"), ip("x", "b"))
    assert v.allowed and v.egress_by == ("x", "out", "egress", 0) and v.ingress_by == ("x", "in", "ingress", 0)


def test_match_expressions(xyz):
    xyz.policy("x", "p", {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]},
                          "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                              {"key": "ns", "operator": "In", "values": ["y", "z"]}]},
                              "podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"}]}}]}]})
    assert xyz.ok(ip("x", "b"), ip("x", "a"))           # x/a is not selected: not isolated
    assert to("x", "b", allowed_pairs(xyz)) == {p for p in to("x", "b") if p[0] in "yz"}
    xyz.policy("x", "p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchExpressions": [
        {"key": "pod", "operator": "DoesNotExist"}]}}]}]})
    assert to("x", "c", allowed_pairs(xyz)) == set()


def test_host_network_pods_are_not_policed_nor_peers():
    c = Cluster()
    c.ns("x")
    c.pod("x", "a", "10.0.0.1", {"app": "a"}, node="node1")
    c.pod("x", "host", "192.168.0.2", {"app": "a"}, node="node2", host_network=True, host_ip="192.168.0.2")
    c.policy("x", "p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": sel(app="a")}]}],
                        "egress": [{"to": [{"podSelector": sel(app="a")}]}]})
    # the hostNetwork pod's address is its node's: never a pod peer, never isolated
    assert not c.ok("192.168.0.2", "10.0.0.1")
    assert c.ok("10.0.0.9", "192.168.0.2") and c.model.verdict("10.0.0.9", "192.168.0.2").ingress_by is None
    assert not c.model.explain("x", "host").policed
    assert c.model.elements(m.PodSet("x", None, m.parse_policy(pol_obj("x", "q", {"podSelector": sel(app="a")}))
                                     .pod_selector)) == {"10.0.0.1"}


def test_traffic_with_the_pods_own_node_and_itself_is_allowed(xyz):
    xyz.policy("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    host = "192.168.0.1"            # every pod of the fixture runs on a node with this hostIP
    assert xyz.ok(host, ip("x", "a")) and xyz.ok(ip("x", "a"), host)
    assert xyz.ok(ip("x", "a"), ip("x", "a"))
    assert "itself" in xyz.model.verdict(ip("x", "a"), ip("x", "a")).reason
    assert not xyz.ok("192.168.0.7", ip("x", "a"))      # another node: policed


def test_pods_without_ips_are_nobody():
    c = Cluster()
    c.ns("x")
    c.pod("x", "a", "10.0.0.1", {"app": "a"})
    c.pod("x", "b", [], {"app": "b"})
    c.policy("x", "p", {"podSelector": sel(app="a"), "ingress": [{"from": [{"podSelector": sel(app="b")}]}]})
    ref = c.model.policies[("x", "p")].ingress[0].peers[0]
    assert c.model.elements(ref) == frozenset()
    assert not c.model.explain("x", "b").policed
    c.pod("x", "b", "10.0.0.2", {"app": "b"})           # the address arrives
    assert c.model.elements(ref) == {"10.0.0.2"} and c.ok("10.0.0.2", "10.0.0.1")


def test_ipv6(xyz):
    c = Cluster()
    c.ns("x")
    c.pod("x", "a", ["10.0.0.1", "fd00::1"], {"app": "a"})
    c.pod("x", "b", ["10.0.0.2", "fd00::2"], {"app": "b"})
    c.policy("x", "p", {"podSelector": sel(app="a"), "ingress": [
        {"from": [{"podSelector": sel(app="b")}], "ports": [{"port": 80}]},
        {"from": [{"ipBlock": {"cidr": "fd00:1::/64", "except": ["fd00:1::/120"]}}]}]})
    assert c.ok("fd00::2", "fd00::1") and c.ok("10.0.0.2", "10.0.0.1") and not c.ok("fd00::2", "fd00::1", port=81)
    assert c.ok("fd00:1::1:1", "fd00::1", port=9) and not c.ok("fd00:1::1", "fd00::1", port=9)
    assert c.model.elements(m.DISPATCH["ingress"]) == {("10.0.0.1", "x"), ("fd00::1", "x")}


def test_namespace_labels_and_unknown_namespaces(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"namespaceSelector": sel(team="blue")}]}]})
    assert to("x", "a", allowed_pairs(xyz)) == set()
    xyz.ns("y", ns="y", team="blue")                     # relabelled
    assert to("x", "a", allowed_pairs(xyz)) == {"y/a->x/a", "y/b->x/a", "y/c->x/a"}
    xyz.model.set_namespace("y", None)                   # its object gone: only the name label is known
    assert to("x", "a", allowed_pairs(xyz)) == set()
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]})
    assert to("x", "a", allowed_pairs(xyz)) == {"y/a->x/a", "y/b->x/a", "y/c->x/a"}


def test_other_nodes_pods_are_only_peers(xyz):
    xyz.policy("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    # node1 runs a and c of each namespace; the maps hold only x/a and x/c
    assert xyz.model.elements(m.INGRESS_PODS) == {(ip("x", "a"), "x"), (ip("x", "c"), "x")}
    assert xyz.model.elements(m.EGRESS_PODS) == xyz.model.elements(m.INGRESS_PODS)
    assert xyz.model.elements(m.LOCAL_PODS) == {ip(ns, p) for ns in "xyz" for p in "ac"}
    target = xyz.model.policies[("x", "deny")].target
    assert xyz.model.elements(target) == {ip("x", p) for p in "abc"}        # sets hold every node's pods


def test_verdict_of_addresses_nobody_knows():
    c = Cluster()
    assert c.model.verdict("192.0.2.1", "192.0.2.2").reason == "neither address is a policed pod"


# ---- explain -------------------------------------------------------------------------------------------------

def test_explain(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [
        {"from": [{"podSelector": sel(pod="b")}, {"ipBlock": {"cidr": "10.9.0.0/16", "except": ["10.9.0.0/17"]}}],
         "ports": [{"port": "serve-80-tcp"}, {"port": 90, "endPort": 99}]}],
        "egress": [{"to": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="c")}],
                    "ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]})
    xyz.policy("x", "deny", {"podSelector": {}, "ingress": []})
    e = xyz.model.explain("x", "a")
    assert e.policed and e.local and e.isolated_ingress and e.isolated_egress
    assert [p.name for p in e.ingress] == ["deny", "p"] and e.ingress[0].rules == ()
    rule = e.ingress[1].rules[0]
    assert rule.peers[0] == m.ExplainedPeer("pods", "pods pod=b in namespace x", pods=("x/b",))
    assert rule.peers[1] == m.ExplainedPeer("ipBlock", "10.9.0.0/16 except 10.9.0.0/17", cidrs=("10.9.128.0/17",))
    assert rule.ports == (m.ExplainedPort("TCP", name="serve-80-tcp", resolved=(("x/a", 80),)),
                          m.ExplainedPort("TCP", 90, 99))
    assert e.egress[0].rules[0].ports == (m.ExplainedPort("UDP", name="serve-81-udp", resolved=(("y/c", 81),)),)
    text = "\n".join(e.lines())
    assert "ingress: isolated by 2 policies" in text and "x/deny: allows nothing" in text
    assert "from pods pod=b in namespace x [x/b]; 10.9.0.0/16 except 10.9.0.0/17 on serve-80-tcp/TCP (x/a:80), 90-99/TCP" in text
    b = xyz.model.explain("x", "b")
    assert b.isolated_ingress and not b.isolated_egress and not b.local
    assert "egress: not isolated" in "\n".join(b.lines())
    assert not xyz.model.explain("x", "nobody").policed


# ---- the incremental model --------------------------------------------------------------------------------

def test_a_pod_relabel_changes_elements_only(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})
    first = xyz.model.take_changes()
    assert first.policies == {("x", "p")} and all(first.elements[r].reset for r in xyz.model.policies[("x", "p")].refs())
    assert not xyz.model.take_changes()
    xyz.pod("x", "c", ip("x", "c"), {"pod": "b"}, node="node1")
    ch = xyz.model.take_changes()
    assert ch.policies == set()
    peer = xyz.model.policies[("x", "p")].ingress[0].peers[0]
    assert ch.elements == {peer: m.Delta({ip("x", "c")}, set())}
    # a change undone before the take is no change
    xyz.pod("x", "c", ip("x", "c"), {"pod": "c"}, node="node1")
    xyz.pod("x", "c", ip("x", "c"), {"pod": "b"}, node="node1")
    assert not xyz.model.take_changes()


def test_policies_share_sets_and_a_set_lives_while_one_uses_it(xyz):
    spec = {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]}
    xyz.policy("x", "one", spec)
    xyz.policy("x", "two", spec)
    refs = xyz.model.refs()
    assert len(refs) == 2
    xyz.model.take_changes()
    xyz.model.set_policy(("x", "one"), None)
    assert xyz.model.refs() == refs and not xyz.model.take_changes().elements
    xyz.model.set_policy(("x", "two"), None)
    assert xyz.model.refs() == set()
    assert xyz.model.elements(m.INGRESS_PODS) == frozenset()


def test_isolation_follows_policy_changes(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": []})
    assert xyz.model.elements(m.INGRESS_PODS) == {(ip("x", "a"), "x")}
    xyz.policy("x", "p", {"podSelector": sel(pod="c"), "ingress": []})
    assert xyz.model.elements(m.INGRESS_PODS) == {(ip("x", "c"), "x")}
    xyz.policy("x", "p", {"podSelector": sel(pod="c"), "policyTypes": ["Egress"]})
    assert xyz.model.elements(m.INGRESS_PODS) == frozenset()
    assert xyz.model.elements(m.EGRESS_PODS) == {(ip("x", "c"), "x")}
    xyz.delete_pod("x", "c")
    assert xyz.model.elements(m.EGRESS_PODS) == frozenset()


def test_named_port_sets(xyz):
    xyz.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]})
    ref = m.PortSet("serve-81-udp", "UDP")
    assert xyz.model.elements(ref) == {(ip(ns, p), "UDP", 81) for ns in "xyz" for p in "abc"}
    xyz.model.take_changes()
    xyz.pod("x", "b", ip("x", "b"), {"pod": "b"}, ports=[{"name": "serve-81-udp", "containerPort": 8181, "protocol": "UDP"}])
    assert xyz.model.take_changes().elements[ref] == m.Delta({(ip("x", "b"), "UDP", 8181)}, {(ip("x", "b"), "UDP", 81)})


# ---- the incremental model against a computation from scratch (random clusters) ----------------------------

LABEL_VALUES = {"app": ["a", "b", "c"], "tier": ["w", "d"]}
NS_LABELS = {"team": ["t1", "t2"], "env": ["p", "d"]}


def labels_strategy(space):
    return st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in space.items()})


def selector_strategy(space):
    key = st.sampled_from(sorted(space))
    expr = st.one_of(
        st.builds(lambda k, vs: {"key": k, "operator": "In", "values": vs}, key,
                  st.lists(st.sampled_from(["a", "b", "c", "w", "d", "t1", "t2", "p"]), min_size=1, max_size=2)),
        st.builds(lambda k, vs: {"key": k, "operator": "NotIn", "values": vs}, key,
                  st.lists(st.sampled_from(["a", "b", "w", "t1", "p"]), min_size=1, max_size=2)),
        st.builds(lambda k: {"key": k, "operator": "Exists"}, key),
        st.builds(lambda k: {"key": k, "operator": "DoesNotExist"}, key))
    return st.builds(lambda ml, me: dict(({"matchLabels": ml} if ml else {}), **({"matchExpressions": me} if me else {})),
                     labels_strategy(space), st.lists(expr, max_size=2))


PEER = st.one_of(
    st.builds(lambda s: {"podSelector": s}, selector_strategy(LABEL_VALUES)),
    st.builds(lambda s: {"namespaceSelector": s}, selector_strategy(NS_LABELS)),
    st.builds(lambda n, p: {"namespaceSelector": n, "podSelector": p}, selector_strategy(NS_LABELS),
              selector_strategy(LABEL_VALUES)),
    st.builds(lambda c, e: {"ipBlock": {"cidr": c, "except": e}}, st.sampled_from(["10.0.0.0/28", "10.0.0.0/29", "0.0.0.0/0"]),
              st.lists(st.sampled_from(["10.0.0.0/30", "10.0.0.4/31", "10.0.0.7/32"]), max_size=2, unique=True)),
    st.builds(lambda c: {"ipBlock": {"cidr": c}}, st.sampled_from(["fd00::/125", "fd00::4/126"])),
)
PORT = st.one_of(
    st.builds(lambda p, proto: {"port": p, "protocol": proto}, st.sampled_from([80, 81, 53]), st.sampled_from(["TCP", "UDP"])),
    st.builds(lambda p: {"port": p, "endPort": p + 1}, st.sampled_from([80, 52])),
    st.builds(lambda n, proto: {"port": n, "protocol": proto}, st.sampled_from(["http", "dns"]), st.sampled_from(["TCP", "UDP"])),
    st.builds(lambda proto: {"protocol": proto}, st.sampled_from(["TCP", "UDP"])),
    st.just({}),
)


def rules_strategy(peers_field):
    return st.lists(st.builds(lambda peers, ports: dict(({peers_field: peers} if peers is not None else {}),
                                                         **({"ports": ports} if ports is not None else {})),
                              st.one_of(st.none(), st.lists(PEER, max_size=2)),
                              st.one_of(st.none(), st.lists(PORT, max_size=2))), max_size=2)


POLICY_SPEC = st.builds(
    lambda target, ingress, egress, types: dict(
        {"podSelector": target},
        **({"ingress": ingress} if ingress is not None else {}),
        **({"egress": egress} if egress is not None else {}),
        **({"policyTypes": types} if types is not None else {})),
    selector_strategy(LABEL_VALUES), st.one_of(st.none(), rules_strategy("from")),
    st.one_of(st.none(), rules_strategy("to")),
    st.one_of(st.none(), st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]])))

NAMED_PORTS = st.lists(st.sampled_from([{"name": "http", "containerPort": 80}, {"name": "http", "containerPort": 81},
                                        {"name": "dns", "containerPort": 53, "protocol": "UDP"}]),
                       max_size=2, unique_by=lambda p: p["name"])


NODE_IPS = {"node1": "192.168.0.1", "node2": "192.168.0.2"}


@st.composite
def clusters(draw):
    """Namespace, pod and policy objects of a small cluster, and a sequence of later changes."""
    names = draw(st.lists(st.sampled_from(["x", "y", "z"]), min_size=1, max_size=3, unique=True))
    namespaces = [ns_obj(n, **draw(labels_strategy(NS_LABELS))) for n in names]
    n_pods = draw(st.integers(2, 8))
    pods = []
    for i in range(n_pods):
        kind = draw(st.sampled_from(["v4", "v4", "v4", "dual", "none", "host"]))
        node = draw(st.sampled_from(["node1", "node2"]))
        host_ip = NODE_IPS[node]
        v4, v6 = "10.0.0.%d" % (i + 1), "fd00::%x" % (i + 1)
        ips = {"v4": [v4], "dual": [v4, v6], "none": [], "host": [host_ip]}[kind]
        pods.append(pod_obj(draw(st.sampled_from(names)), "p%d" % i, ips, draw(labels_strategy(LABEL_VALUES)),
                            node=node, ports=draw(NAMED_PORTS), host_network=kind == "host", host_ip=host_ip))
    policies = [pol_obj(draw(st.sampled_from(names)), "pol%d" % i, draw(POLICY_SPEC))
                for i in range(draw(st.integers(1, 5)))]
    return namespaces, pods, policies


def load(node, namespaces, pods, policies, order=None):
    model = m.PolicyModel(node)
    items = ([("ns", o) for o in namespaces] + [("pod", o) for o in pods] + [("pol", o) for o in policies])
    for i in (order or range(len(items))):
        kind, obj = items[i]
        if kind == "ns":
            model.set_namespace(obj["metadata"]["name"], m.parse_namespace(obj))
        elif kind == "pod":
            model.set_pod((obj["metadata"]["namespace"], obj["metadata"]["name"]), m.parse_pod(obj))
        else:
            model.set_policy((obj["metadata"]["namespace"], obj["metadata"]["name"]), m.parse_policy(obj))
    return model


def expected_members(ref, namespaces, pods):
    """A PodSet's or PortSet's elements computed directly from the objects."""
    ns_labels = {o["metadata"]["name"]: dict(o["metadata"]["labels"], **{"kubernetes.io/metadata.name": o["metadata"]["name"]})
                 for o in namespaces}
    out = set()
    for o in pods:
        if o["spec"]["hostNetwork"] or not o["status"]["podIPs"]:
            continue
        ns, labels = o["metadata"]["namespace"], o["metadata"]["labels"]
        ips = [p["ip"] for p in o["status"]["podIPs"]]
        if isinstance(ref, m.PortSet):
            for port in o["spec"]["containers"][0]["ports"]:
                if port["name"] == ref.name and port.get("protocol", "TCP") == ref.protocol:
                    out.update((i, ref.protocol, port["containerPort"]) for i in ips)
            continue
        in_scope = ns == ref.namespace if ref.namespace is not None else ref.namespaces.matches(
            ns_labels.get(ns, {"kubernetes.io/metadata.name": ns}))
        if in_scope and ref.pods.matches(labels):
            out.update(ips)
    return out


def snapshot(model):
    refs = model.refs() | {m.LOCAL_PODS, m.INGRESS_PODS, m.EGRESS_PODS}
    return {r.canonical: model.elements(r) for r in refs}


@settings(max_examples=150, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_incremental_sets_equal_sets_computed_from_scratch(cluster, rnd):
    namespaces, pods, policies = cluster
    n = len(namespaces) + len(pods) + len(policies)
    order = list(range(n))
    rnd.shuffle(order)
    model = load("node1", namespaces, pods, policies, order)
    for ref in model.refs():
        if isinstance(ref, (m.PodSet, m.PortSet)):
            assert model.elements(ref) == expected_members(ref, namespaces, pods), ref
    fresh = load("node1", namespaces, pods, policies)
    assert snapshot(model) == snapshot(fresh)
    # and after churn: relabel, delete and re-add everything in another order
    for o in pods:
        labels = o["metadata"]["labels"]
        model.set_pod((o["metadata"]["namespace"], o["metadata"]["name"]),
                      m.parse_pod(pod_obj(o["metadata"]["namespace"], o["metadata"]["name"], [], {"app": "zz"})))
        labels.setdefault("tier", "w")
    for o in namespaces:
        model.set_namespace(o["metadata"]["name"], None)
    for o in policies[:1]:
        model.set_policy((o["metadata"]["namespace"], o["metadata"]["name"]), None)
    rnd.shuffle(order)
    for i in order:
        kind_obj = (namespaces + pods + policies)[i]
        kind = "ns" if i < len(namespaces) else "pod" if i < len(namespaces) + len(pods) else "pol"
        if kind == "ns":
            model.set_namespace(kind_obj["metadata"]["name"], m.parse_namespace(kind_obj))
        elif kind == "pod":
            model.set_pod((kind_obj["metadata"]["namespace"], kind_obj["metadata"]["name"]), m.parse_pod(kind_obj))
        else:
            model.set_policy((kind_obj["metadata"]["namespace"], kind_obj["metadata"]["name"]), m.parse_policy(kind_obj))
    assert snapshot(model) == snapshot(load("node1", namespaces, pods, policies))


@settings(max_examples=100, deadline=None)
@given(clusters())
def test_changes_replayed_give_the_current_elements(cluster):
    """What take_changes() reports, applied to what was taken before, is what the model holds now."""
    namespaces, pods, policies = cluster
    model = m.PolicyModel("node1")
    held = {}

    def take():
        ch = model.take_changes()
        for ref, delta in ch.elements.items():
            if delta.reset:
                held[ref] = set(model.elements(ref))
            else:
                current = held.setdefault(ref, set())
                assert not (delta.added & current) and delta.removed <= current, (ref, delta, current)
                current |= delta.added
                current -= delta.removed
    for o in namespaces:
        model.set_namespace(o["metadata"]["name"], m.parse_namespace(o))
    take()
    for o in policies:
        model.set_policy((o["metadata"]["namespace"], o["metadata"]["name"]), m.parse_policy(o))
    for o in pods:
        model.set_pod((o["metadata"]["namespace"], o["metadata"]["name"]), m.parse_pod(o))
        take()
    for o in pods[::2]:
        model.set_pod((o["metadata"]["namespace"], o["metadata"]["name"]), None)
    for o in namespaces[:1]:
        model.set_namespace(o["metadata"]["name"], m.parse_namespace(ns_obj(o["metadata"]["name"], team="t1")))
    take()
    for ref in model.refs() | {m.LOCAL_PODS, m.INGRESS_PODS, m.EGRESS_PODS}:
        assert held.get(ref, set()) == set(model.elements(ref)), ref
