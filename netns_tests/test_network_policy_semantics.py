"""The truth tables of netpol_cases.py against the model's reference evaluator: pure, no kernel, no root.

Every scenario the traffic tests run (test_network_policy_matrix.py) is also fed,
as the same API objects, to `network_policy.model.PolicyModel` and every cell of
its expected matrices compared with `verdict()`. Two independent statements of
the semantics (the expected matrices written from the API reference and
upstream's suite, and the model's evaluator) must agree before the kernel is
asked; when they disagree, the case's `about` says which document decides.
The same holds for the model built in any order, incrementally from the previous
scenario, and on either node. Malformed policies are refused with the path of
the field at fault. SCTP, which the kernel here carries but cannot terminate, is
in these tables like TCP and UDP.
"""
import pytest

from network_policy import model
from podnet.kube.objects import InvalidObject

import netpol_cases as cases
import netpol_matrix as matrix

TOPOLOGIES = ("flannel", "calico")


@pytest.fixture(autouse=True)
def _require_netns():
    """Overrides the netns tests' root check: nothing here needs root."""


def objects(topo, policies, pod_labels=None, namespace_labels=None):
    namespaces, pods = cases.cluster_objects(topo, pod_labels, namespace_labels)
    return namespaces, pods, policies


def feed(m, namespaces=(), pods=(), policies=()):
    for obj in namespaces:
        ns = model.parse_namespace(obj)
        m.set_namespace(ns.name, ns)
    for obj in pods:
        pod = model.parse_pod(obj)
        meta = obj["metadata"]
        m.set_pod((meta["namespace"], meta["name"]), pod)
    for obj in policies:
        meta = obj["metadata"]
        m.set_policy((meta["namespace"], meta["name"]), model.parse_policy(obj))
    return m


def build(topo, policies, node="node1", order="ns-pods-policies", **labels):
    namespaces, pods, policies = objects(topo, policies, **labels)
    m = model.PolicyModel(node)
    if order == "ns-pods-policies":
        return feed(m, namespaces, pods, policies)
    feed(m, policies=policies)
    feed(m, pods=pods)
    return feed(m, namespaces=namespaces)


def verdicts(m, topo, check):
    return {(s, d): m.verdict(topo.ip(s), topo.ip(d), check.protocol, check.port).allowed
            for (s, d) in check.expected.cells}


def mismatches(m, topo, case_):
    out = []
    for check in case_.checks:
        actual = verdicts(m, topo, check)
        if actual != check.expected.cells:
            wrong = sorted(cell for cell in check.expected.cells if actual[cell] != check.expected.cells[cell])
            reasons = ["  %s -> %s: %s" % (s, d, m.verdict(topo.ip(s), topo.ip(d), check.protocol, check.port).reason)
                       for s, d in wrong]
            out.append(matrix.report(check, {cell: "ok" if v else "timeout" for cell, v in actual.items()}, "model")
                       + "\n" + "\n".join(reasons))
    return out


@pytest.mark.parametrize("flavour", TOPOLOGIES)
@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.name)
def test_expected_matrix_is_the_models_verdict(case, flavour):
    topo = cases.synthetic_topology(flavour)
    failures = mismatches(build(topo, case.policies(topo)), topo, case)
    assert not failures, "%s (%s): %s\n%s" % (case.name, flavour, case.about, "\n".join(failures))


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.name)
def test_verdict_is_the_same_in_any_order_and_on_either_node(case):
    topo = cases.synthetic_topology()
    policies = case.policies(topo)
    reference = build(topo, policies)
    for node, order in (("node2", "ns-pods-policies"), ("node1", "policies-pods-ns")):
        other = build(topo, policies, node=node, order=order)
        for check in case.checks:
            assert verdicts(other, topo, check) == verdicts(reference, topo, check), (case.name, node, order)


def test_incremental_model_across_every_scenario():
    """One model for the whole run, as the agent keeps it: each scenario replaces the last
    one's policies (deleted, added, changed under the same name)."""
    topo = cases.synthetic_topology()
    namespaces, pods, _ = objects(topo, [])
    m = feed(model.PolicyModel("node1"), namespaces, pods)
    current = {}
    for case_ in cases.CASES:
        wanted = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in case_.policies(topo)}
        for key in set(current) - set(wanted):
            m.set_policy(key, None)
        for key, obj in wanted.items():
            m.set_policy(key, model.parse_policy(obj))
        current = wanted
        failures = mismatches(m, topo, case_)
        assert not failures, "%s (after the previous scenario): %s\n%s" % (case_.name, case_.about,
                                                                           "\n".join(failures))
        m.take_changes()


def test_relabels_change_verdicts():
    """The update scenarios of the traffic tests, in the model: a pod and a namespace
    relabelled, a named container port moved."""
    topo = cases.synthetic_topology()
    policy = cases.netpol("a-from-updated-b", pods=cases.labels(pod="a"), ingress=[cases.ingress_rule(
        cases.peer(pods=cases.labels(pod="b", pod2="updated")))])
    pod_labels = cases.default_pod_labels()
    m = build(topo, [policy])
    xb, xa = topo.ip("x/b"), topo.ip("x/a")
    assert not m.verdict(xb, xa, "TCP", 80).allowed
    pod_labels["x/b"] = {"pod": "b", "pod2": "updated"}
    _, pods = cases.cluster_objects(topo, pod_labels)
    feed(m, pods=pods)
    assert m.verdict(xb, xa, "TCP", 80).allowed
    policy = cases.netpol("a-from-updated-ns", pods=cases.labels(pod="a"), ingress=[cases.ingress_rule(
        cases.peer(namespaces=cases.labels(ns2="updated")))])
    m = build(topo, [policy])
    ya = topo.ip("y/a")
    assert not m.verdict(ya, xa, "TCP", 80).allowed
    namespaces, _ = cases.cluster_objects(topo, namespace_labels={"y": {"ns2": "updated"}})
    feed(m, namespaces=namespaces)
    assert m.verdict(ya, xa, "TCP", 80).allowed
    m = build(topo, cases.CASES_BY_NAME["named-port-per-pod"].policies(topo))
    assert not m.verdict(ya, xb, "TCP", 80).allowed and m.verdict(ya, xb, "TCP", 81).allowed
    _, pods = cases.cluster_objects(topo, web_ports={"x/b": 80})
    feed(m, pods=pods)
    assert m.verdict(ya, xb, "TCP", 80).allowed and not m.verdict(ya, xb, "TCP", 81).allowed


def test_pods_that_must_change_nothing():
    """x/pending (labels pod=a, no address) and x/hostnet (labels pod=b, node1's address) are
    selected by these policies, yet neither is policed nor ever a peer."""
    topo = cases.synthetic_topology()
    m = build(topo, [cases.netpol("deny-b", pods=cases.labels(pod="b"), ingress=[], types=["Ingress", "Egress"]),
                     cases.netpol("c-from-b", pods=cases.labels(pod="c"), ingress=[cases.ingress_rule(
                         cases.peer(pods=cases.labels(pod="b")))])])
    node1 = topo.node_ips["node1"]
    assert m.verdict(topo.ip("y/a"), node1, "TCP", 80).allowed, "a hostNetwork pod is not isolated"
    assert not m.verdict(topo.ip("y/a"), topo.ip("x/b"), "TCP", 80).allowed
    # x/c runs on node1: node1's own traffic to it passes; from node2 nothing but x/b may come
    assert m.verdict(node1, topo.ip("x/c"), "TCP", 80).allowed
    assert not m.verdict(topo.node_ips["node2"], topo.ip("x/c"), "TCP", 80).allowed
    # x/b is on node2: node1's address is no pod=b peer of x/c's policy... nor allowed into x/b
    assert not m.verdict(node1, topo.ip("x/b"), "TCP", 80).allowed
    assert m.pod("x", "pending") is not None and not m.pod("x", "pending").ips


@pytest.mark.parametrize("index", range(len(cases.bad_policies(cases.synthetic_topology()))))
def test_malformed_policy_is_refused_with_its_path(index):
    topo = cases.synthetic_topology()
    policy, path = cases.bad_policies(topo)[index]
    with pytest.raises(InvalidObject) as raised:
        model.parse_policy(policy)
    assert path in str(raised.value), (policy["metadata"]["name"], str(raised.value))


def test_bad_policies_leave_the_good_ones():
    """What the agent does with a manifests directory holding both: the bad ones are absent."""
    topo = cases.synthetic_topology()
    m = build(topo, cases.BAD_INPUT_GOOD_POLICIES)
    for policy, _ in cases.bad_policies(topo):
        with pytest.raises(InvalidObject):
            model.parse_policy(policy)
    check = cases.Check("TCP", 80, cases.BAD_INPUT_EXPECTED)
    assert verdicts(m, topo, check) == check.expected.cells
