"""NetworkPolicy truth tables on a real two-node cluster, upstream's e2e netpol suite in network namespaces.

Per mode (flannel vxlan, calico_lite) one cluster is built for the module
(netpol_matrix.NetpolCluster: 9 pods in namespaces x, y, z over two nodes, servers on
80/81 TCP and UDP, the NetworkPolicy agent on both nodes reading a manifests
directory, the stand-in for an API server); between scenarios only the manifests
change. Each scenario (netpol_cases.CASES) writes its policies, waits until both
agents report them in the kernel, and probes the whole 9x9 matrix for each of its
protocol/port checks with real TCP connections, UDP datagrams and SCTP INITs.
Then: updates (pods and namespaces relabelled, policies added, changed and
deleted, with the time from the write to enforcement measured), malformed policies
among good ones, and traffic from the nodes themselves.
"""
import random
import statistics
import time

import pytest

from lab.cluster import Lab

import netpol_cases as cases
import netpol_matrix as matrix
from helpers import wait_until


@pytest.fixture(scope="module", params=matrix.MODES)
def env(request, netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        e = matrix.NetpolCluster(lab, request.param).start()
        yield e
        print("\n[%s] slowest answer %.3f s; rounds too slow to trust a silence: %d; cells probed again: %d" % (
            e.mode, e.slowest_answer, e.untrusted_rounds, e.retried_cells))
        for node in e.nodes.values():
            if node.role in e.cluster.network_policy:
                e.cluster.stop_network_policy(node)


@pytest.fixture
def fresh(env):
    """Upstream's labels and no policies before and after the test."""
    env.reset()
    yield env
    env.reset()


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.name)
def test_truth_table(env, case):
    env.restore_labels()
    env.set_policies(case.policies(env.topology))
    env.assert_checks(case.checks, case.name)


# ---- updates ---------------------------------------------------------------------------------

TCP80 = ("TCP", 80)


def check(expected, protocol="TCP", port=80):
    return [cases.Check(protocol, port, expected)]


def test_relabelled_pod_gains_access(fresh):
    """Upstream's "allow ingress access from updated pod": x/b matches only once relabelled."""
    env = fresh
    env.set_policies([cases.netpol("a-from-updated-b", pods=cases.labels(pod="a"), ingress=[cases.ingress_rule(
        cases.peer(pods=cases.labels(pod="b", pod2="updated")))])])
    env.assert_checks(check(cases.only_into_xa()), "before the relabel")
    env.set_pod_labels("x/b", {"pod": "b", "pod2": "updated"})
    env.assert_checks(check(cases.only_into_xa("x/b")), "after the relabel")
    env.set_pod_labels("x/b", {"pod": "b"})
    env.assert_checks(check(cases.only_into_xa()), "after the label is gone again")


def test_relabelled_pod_becomes_isolated(fresh):
    """Upstream's "deny ingress access to updated pod": a label brings x/a under a deny policy."""
    env = fresh
    env.set_policies([cases.netpol("deny-isolated", pods=cases.labels(target="isolated"), ingress=[])])
    env.assert_checks(check(cases.ALL), "before the relabel")
    env.set_pod_labels("x/a", {"pod": "a", "target": "isolated"})
    env.assert_checks(check(cases.only_into_xa()), "after the relabel")


def test_relabelled_namespace_gains_access(fresh):
    """Upstream's "allow ingress access from updated namespace"."""
    env = fresh
    env.set_policies([cases.netpol("a-from-updated-ns", pods=cases.labels(pod="a"), ingress=[cases.ingress_rule(
        cases.peer(namespaces=cases.labels(ns2="updated")))])])
    env.assert_checks(check(cases.only_into_xa()), "before the relabel")
    env.set_namespace_labels("y", {"ns2": "updated"})
    env.assert_checks(check(cases.only_into_xa("y")), "after the namespace relabel")
    env.set_namespace_labels("y", {})
    env.assert_checks(check(cases.only_into_xa()), "after the namespace label is gone")


def test_pod_without_an_address_is_nobody(fresh):
    """x/b's manifest loses its address (as a pod being recreated): it is no longer a peer,
    and a policy isolating it no longer names an address; it gets it back."""
    env = fresh
    env.set_policies([cases.netpol("a-from-b", pods=cases.labels(pod="a"), ingress=[cases.ingress_rule(
        cases.peer(pods=cases.labels(pod="b")))])])
    env.assert_checks(check(cases.only_into_xa("x/b")), "x/b has its address")
    env.set_pod_address("x/b", False)
    env.assert_checks(check(cases.only_into_xa()), "x/b has no address")
    env.set_pod_address("x/b", True)
    env.assert_checks(check(cases.only_into_xa("x/b")), "x/b has its address again")


def test_named_port_follows_the_pods_container_port(fresh):
    """x/b's container port "web" moves from 81 to 80: a policy allowing "web" follows it."""
    env = fresh
    env.set_policies(cases.CASES_BY_NAME["named-port-per-pod"].policies(env.topology))
    web_81 = cases.reach(("", "x/a", False))
    env.assert_checks(check(cases.reach(("", "x/b", False), ("", "x/c", False))) + check(web_81, "TCP", 81),
                      "web on 81")
    env.set_web_port("x/b", 80)
    env.assert_checks(check(cases.reach(("", "x/c", False))) + check(cases.reach(("", "x/a", False), ("", "x/b", False)),
                                                                   "TCP", 81), "x/b's web moved to 80")


def test_agent_restart_keeps_enforcing_and_catches_up(fresh):
    """SIGTERM leaves the table: the policy holds while the agents are down; what is written
    meanwhile is in the kernel once they are back."""
    env = fresh
    env.set_policies([cases.DENY_INGRESS_X])
    deny_x = check(cases.reach(("", "x", False)))

    def while_down():
        env.assert_checks(deny_x, "agents stopped")
        env.write("policies.json", [cases.DENY_INGRESS_X, cases.netpol("deny-ingress", namespace="z", ingress=[])],
                  wait=False)

    env.restart_agents(while_down)
    env.assert_checks(check(cases.reach(("", "x", False), ("", "z", False))), "after the restart")


def test_policy_updated_in_place(fresh):
    """Upstream's "should enforce updated policy": allow-all becomes deny-all under the same name."""
    env = fresh
    env.set_policies([cases.netpol("mutating", ingress=[{}])])
    env.assert_checks(check(cases.ALL, "TCP", 81), "allow-all")
    env.set_policies([cases.netpol("mutating", ingress=[])])
    env.assert_checks(check(cases.reach(("", "x", False)), "TCP", 81), "changed to deny-all")


def test_policies_added_and_deleted(fresh):
    """Upstream's "stop enforcing policies after they are deleted", and a second policy added
    beside the first (the ports stack)."""
    env = fresh
    deny_all = cases.netpol("deny-all", types=["Ingress", "Egress"])
    env.set_policies([deny_all])
    env.assert_checks(check(cases.reach(("", "x", False), ("x", "", False))), "deny-all")
    env.set_policies([])
    env.assert_checks(check(cases.ALL), "deny-all deleted")
    p81 = cases.netpol("a-81-from-y", pods=cases.labels(pod="a"), ingress=[cases.ingress_rule(
        cases.peer(namespaces=cases.ns_is("y")), ports=[cases.port(81)])])
    p80 = cases.netpol("a-80-from-y", pods=cases.labels(pod="a"), ingress=[cases.ingress_rule(
        cases.peer(namespaces=cases.ns_is("y")), ports=[cases.port(80)])])
    env.set_policies([p81])
    env.assert_checks(check(cases.only_into_xa(), "TCP", 80) + check(cases.only_into_xa("y"), "TCP", 81), "81 only")
    env.set_policies([p81, p80])
    env.assert_checks(check(cases.only_into_xa("y"), "TCP", 80) + check(cases.only_into_xa("y"), "TCP", 81),
                      "80 added")


def test_policies_in_several_files(fresh):
    """Policies in several manifest files: one deleted leaves the others enforced."""
    env = fresh
    env.set_policies([cases.DENY_INGRESS_X])
    env.write("more-policies.json", [cases.netpol("deny-ingress", namespace="y", ingress=[])])
    env.assert_checks(check(cases.reach(("", "x", False), ("", "y", False))), "two files")
    env.remove("more-policies.json")
    env.assert_checks(check(cases.reach(("", "x", False))), "one file removed")


def test_time_from_manifest_to_enforcement(fresh):
    """The figure docs/performance.md quotes: a policy written into the manifests directory ->
    the first new connection the kernel treats accordingly (y/a -> x/a, TCP 80, the pods on
    different nodes). Includes the manifests poll (0.2 s) and --min-sync-period (0.2 s)."""
    env = fresh
    closing, opening = [], []
    for _ in range(8):
        # the writes must not keep step with the agent's 0.2 s manifests poll, or every sample
        # lands at the same phase of it
        time.sleep(random.uniform(0, 0.25))
        closing.append(env.time_to_enforce("policies.json", [cases.DENY_INGRESS_X], "y/a", "x/a", "TCP", 80,
                                           "closed"))
        time.sleep(random.uniform(0, 0.25))
        opening.append(env.time_to_enforce("policies.json", [], "y/a", "x/a", "TCP", 80, "open"))
    print("\n[%s] manifest -> enforced: deny median %.3f s (max %.3f), allow median %.3f s (max %.3f)" % (
        env.mode, statistics.median(closing), max(closing), statistics.median(opening), max(opening)))
    assert max(closing + opening) < 5, (closing, opening)
    env.assert_checks(check(cases.ALL), "after the last change")


# ---- bad input ---------------------------------------------------------------------------------

def test_malformed_policies_are_skipped_and_the_good_ones_enforced(fresh):
    env = fresh
    bad = [policy for policy, _ in cases.bad_policies(env.topology)]
    env.set_policies(bad[:3] + cases.BAD_INPUT_GOOD_POLICIES[:1] + bad[3:] + cases.BAD_INPUT_GOOD_POLICIES[1:])
    env.assert_checks(check(cases.BAD_INPUT_EXPECTED) + check(cases.BAD_INPUT_EXPECTED, "UDP", 81), "bad input")
    for node in env.nodes.values():
        log = env.agent_log(node)
        missing = [p["metadata"]["name"] for p in bad if p["metadata"]["name"] not in log]
        assert not missing, "the agent on %s did not report %s\n%s" % (node.role, missing, log[-3000:])
    # a fixed policy is a change like any other: it is enforced
    fixed = cases.netpol("bad-port", namespace="y", ingress=[cases.ingress_rule(ports=[cases.port(7000)])])
    env.set_policies([fixed] + cases.BAD_INPUT_GOOD_POLICIES)
    env.assert_checks(check(cases.reach(cases.INTO_XA_DENIED, ("y", "x/a", True), ("z/c", "", False),
                                        ("", "y", False))), "bad-port fixed")


# ---- beyond the pod matrix -------------------------------------------------------------------

def test_a_node_reaches_its_own_pods_under_default_deny(fresh):
    """Traffic a node originates (kubelet's probes) to its own pods passes an isolated pod;
    from the other node it is outside traffic, which only an ipBlock admits."""
    env = fresh
    env.set_policies([cases.netpol("deny-all-ingress", namespace=ns, ingress=[]) for ns in cases.NAMESPACES])
    for name, node in env.nodes.items():
        targets = [[pod, env.topology.ip(pod), "TCP", 80] for pod in cases.PODS]
        seen = env.probe_from(name, node, targets)
        expected = {pod: "ok" if cases.node_of(pod) == name else "timeout" for pod in cases.PODS}
        assert seen == expected, "from %s: %s" % (name, seen)


def test_sctp_rules_are_in_the_kernel(fresh):
    """The SCTP scenarios above carry real SCTP packets; the ruleset names the protocol too."""
    env = fresh
    env.set_policies(cases.CASES_BY_NAME["sctp-only-port-81"].policies(env.topology))
    node1 = env.nodes["node1"]
    wait_until(lambda: "sctp" in env.nft(node1, "list", "table", "inet", "podnet-network-policy"), 5,
               "an sctp match in node1's table")
