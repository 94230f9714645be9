"""network_policy/agent.py, metrics.py, server.py and explain.py without a kernel.

The loop runs with the real model (network_policy/model.py) and a recording
dataplane: our own object standing in for NftablesDataplane (the kernel side is
tested in netns_tests/test_network_policy_daemon.py). Time comes from a fake clock.
`explain` reads a manifests directory, and once the Kubernetes API: no
kube-apiserver can run here, so that test lists from tests/test_kube_sources.py's
FakeApiServer, a scripted stand-in answering in the API's wire format.
"""
import json
import logging
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from network_policy import agent as agent_mod
from network_policy import model as model_mod
from network_policy.agent import PolicyAgent
from network_policy.metrics import Metrics
from podnet.kube.events import ADDED, DELETED, MODIFIED, RELIST, Event
from podnet.net.nflog import LoggedPacket, Packet


@dataclass
class Result:
    full: bool
    seconds: float = 0.01
    policies: int = 0
    chains: int = 3
    rules: int = 7
    sets: int = 2
    elements: int = 5
    changed: int = 1
    quarantined: tuple = ()


@dataclass
class RecordingDataplane:
    """Records every sync(full) call; `fail` makes the next calls raise."""
    model: object = None
    calls: list = field(default_factory=list)
    fail: int = 0
    quarantine: dict = field(default_factory=dict)       # key -> (policy, error), as NftablesDataplane keeps it
    drops: dict = field(default_factory=lambda: {"ingress": 4, "egress": 2})

    def sync(self, full=False):
        self.calls.append(full)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("nft -f failed: injected")
        return Result(full=full, policies=1, quarantined=tuple(sorted(self.quarantine)))

    def cleanup(self):
        pass

    def drop_counts(self):
        return dict(self.drops)


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def pod(name, ns="x", ip="10.244.1.2", node="node1", labels=None, **extra):
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
               {"name": "http", "containerPort": 80, "protocol": "TCP"}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
    obj.update(extra)
    return obj


def namespace(name, labels=None):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": dict({"kubernetes.io/metadata.name": name}, **(labels or {}))}}


def policy(name, ns="x", spec=None):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": spec if spec is not None else {"podSelector": {}, "policyTypes": ["Ingress"]}}


DENY_ALL = {"podSelector": {}, "policyTypes": ["Ingress"]}
BAD_SELECTOR = {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near", "values": ["b"]}]}}


def make_agent(min_sync_period=1.0, full_sync_period=3600.0, max_retry=30.0, metrics=True):
    clock, wall = Clock(), Clock(1.7e9)
    model = model_mod.PolicyModel("node1")
    dataplane = RecordingDataplane(model)
    m = Metrics(clock=wall, drop_counts=dataplane.drop_counts) if metrics else None
    agent = PolicyAgent(model, dataplane, "node1", min_sync_period=min_sync_period,
                        full_sync_period=full_sync_period, max_retry=max_retry, metrics=m, clock=clock,
                        wall_clock=wall)
    return agent, dataplane, clock, wall


def list_all(agent, pods=(), namespaces=(), policies=()):
    agent.apply(Event(RELIST, "Namespace", list(namespaces)))
    agent.apply(Event(RELIST, "Pod", list(pods)))
    agent.apply(Event(RELIST, "NetworkPolicy", list(policies)))


def due(agent, clock):
    when = agent.next_sync_at(clock.now)
    return when is not None and when <= clock.now


# ---- timing -----------------------------------------------------------------------------------

def test_nothing_syncs_before_every_kind_is_listed_then_a_full_sync_at_once():
    agent, dp, clock, _ = make_agent()
    agent.apply(Event(RELIST, "Namespace", [namespace("x")]))
    agent.apply(Event(RELIST, "Pod", [pod("a")]))
    assert agent.next_sync_at(clock.now) is None        # no policies listed yet: nothing may be enforced
    agent.apply(Event(RELIST, "NetworkPolicy", [policy("deny")]))
    assert due(agent, clock)
    assert agent.sync_once() is not None and dp.calls == [True]
    assert agent.next_sync_at(clock.now) == clock.now + 3600.0      # only the periodic full sync is left


def test_changes_coalesce_to_one_sync_per_min_sync_period_and_a_quiet_spell_syncs_at_once():
    agent, dp, clock, _ = make_agent(min_sync_period=1.0)
    list_all(agent, [pod("a")], [namespace("x")])
    agent.sync_once()
    clock.now += 0.1
    agent.apply(Event(ADDED, "NetworkPolicy", policy("p1")))
    agent.apply(Event(ADDED, "NetworkPolicy", policy("p2")))
    assert agent.next_sync_at(clock.now) == pytest.approx(clock.now + 0.9)
    clock.now += 0.9
    assert due(agent, clock)
    agent.sync_once()
    assert dp.calls == [True, False]
    clock.now += 5.0                    # quiet
    agent.apply(Event(DELETED, "NetworkPolicy", policy("p1")))
    assert due(agent, clock)            # the first change after a quiet spell: at once
    agent.sync_once()
    assert dp.calls == [True, False, False]


def test_an_event_that_changes_nothing_asks_for_no_sync():
    agent, dp, clock, _ = make_agent()
    list_all(agent, [pod("a")], [namespace("x")], [policy("p")])
    agent.sync_once()
    clock.now += 10
    agent.apply(Event(MODIFIED, "NetworkPolicy", policy("p")))       # the same object again
    assert not due(agent, clock)


def test_a_failed_sync_is_retried_full_with_exponential_backoff_capped():
    agent, dp, clock, _ = make_agent(min_sync_period=1.0, max_retry=5.0)
    list_all(agent, [pod("a")], [namespace("x")])
    agent.sync_once()
    dp.fail = 4
    agent.apply(Event(ADDED, "NetworkPolicy", policy("p")))
    clock.now += 2
    delays = []
    for _ in range(4):
        assert due(agent, clock)
        assert agent.sync_once() is None
        when = agent.next_sync_at(clock.now)
        delays.append(when - clock.now)
        clock.now = when
    assert delays == [2.0, 4.0, 5.0, 5.0]
    assert agent.sync_once() is not None
    assert dp.calls == [True, False, True, True, True, True]      # every retry is full
    assert agent.failures == 0 and agent.retry_delay() == 0.0
    assert agent.metrics.sync_failures._value.get() == 4


def test_a_full_sync_every_full_sync_period():
    agent, dp, clock, _ = make_agent(min_sync_period=1.0, full_sync_period=60.0)
    list_all(agent)
    agent.sync_once()
    clock.now += 30
    agent.apply(Event(ADDED, "Namespace", namespace("y")))
    agent.sync_once()
    assert agent.next_sync_at(clock.now) == pytest.approx(clock.now + 30)
    clock.now += 30
    agent.sync_once()
    assert dp.calls == [True, False, True]


def test_step_drains_queued_events_then_syncs():
    agent, dp, clock, _ = make_agent(min_sync_period=0.0)
    agent.emit(Event(RELIST, "Namespace", [namespace("x")]))
    agent.emit(Event(RELIST, "Pod", [pod("a")]))
    agent.emit(Event(RELIST, "NetworkPolicy", [policy("p")]))
    assert agent.step(timeout=0.01) is None     # takes the three in
    assert agent.step(timeout=0.01).full
    assert dp.calls == [True]


class FakeSource:
    def __init__(self, agent):
        self.agent, self.started, self.stopped = agent, False, False

    def start(self):
        self.started = True
        for kind, objs in (("Namespace", [namespace("x")]), ("Pod", [pod("a")]), ("NetworkPolicy", [])):
            self.agent.emit(Event(RELIST, kind, objs))

    def stop(self, timeout=5):
        self.stopped = True


def test_run_starts_and_stops_the_source_and_syncs(monkeypatch):
    agent, dp, clock, _ = make_agent(min_sync_period=0.0)
    source = FakeSource(agent)
    original = agent.sync_once

    def sync_then_stop(now=None):
        result = original(now)
        agent.stop()
        return result
    monkeypatch.setattr(agent, "sync_once", sync_then_stop)
    agent.run(source)
    assert source.started and source.stopped and dp.calls == [True]


# ---- objects ----------------------------------------------------------------------------------

def test_a_bad_policy_is_logged_once_with_its_path_and_is_absent_until_fixed(caplog):
    agent, dp, clock, wall = make_agent()
    caplog.set_level(logging.WARNING, "network_policy")
    list_all(agent, [pod("a")], [namespace("x")], [policy("good"), policy("bad", spec=BAD_SELECTOR)])
    lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(lines) == 1 and "NetworkPolicy x/bad" in lines[0] and "podSelector" in lines[0], lines
    assert agent.cache.get("NetworkPolicy", ("x", "bad")) is None
    assert ("NetworkPolicy", ("x", "bad")) in agent.invalid
    # a re-list with the same bad object says nothing new
    caplog.clear()
    agent.apply(Event(RELIST, "NetworkPolicy", [policy("good"), policy("bad", spec=BAD_SELECTOR)]))
    assert not [r for r in caplog.records if "skipping" in r.getMessage()]
    # the fix is a change
    agent.sync_once()
    clock.now += 5
    agent.apply(Event(MODIFIED, "NetworkPolicy", policy("bad", spec=DENY_ALL)))
    assert agent.cache.get("NetworkPolicy", ("x", "bad")) is not None and due(agent, clock)
    assert not agent.invalid
    # broken again: said again
    agent.apply(Event(MODIFIED, "NetworkPolicy", policy("bad", spec=BAD_SELECTOR)))
    assert [r for r in caplog.records if "skipping" in r.getMessage()]


def test_a_bad_object_deleted_or_gone_from_a_relist_is_no_longer_counted():
    agent, dp, clock, _ = make_agent()
    list_all(agent, [pod("a")], [namespace("x")], [policy("bad", spec=BAD_SELECTOR), policy("bad2", spec=BAD_SELECTOR)])
    assert len(agent.invalid) == 2
    agent.apply(Event(DELETED, "NetworkPolicy", policy("bad", spec=BAD_SELECTOR)))
    agent.apply(Event(RELIST, "NetworkPolicy", []))
    assert not agent.invalid


def test_model_is_fed_and_pods_are_found_by_address():
    agent, dp, clock, _ = make_agent()
    list_all(agent, [pod("a", ip="10.244.1.2"), pod("b", ns="y", ip="10.244.2.3", node="node2"),
                     pod("h", ip="192.168.50.1", spec={"nodeName": "node1", "hostNetwork": True, "containers": []})],
             [namespace("x"), namespace("y")], [policy("deny")])
    assert agent.describe_address("10.244.2.3") == "y/b (10.244.2.3)"
    assert agent.describe_address("192.168.50.1") == "192.168.50.1"      # hostNetwork: the node's address
    agent.apply(Event(DELETED, "Pod", pod("b", ns="y", ip="10.244.2.3")))
    assert agent.describe_address("10.244.2.3") == "10.244.2.3"
    # the model took them in: the deny-all policy isolates x/a for ingress
    verdict = agent.model.verdict("10.244.9.9", "10.244.1.2", "TCP", 80)
    assert not verdict.allowed


def test_quarantined_policies_are_warned_about_once(caplog):
    agent, dp, clock, _ = make_agent()
    caplog.set_level(logging.INFO, "network_policy")
    list_all(agent, [pod("a")], [namespace("x")], [policy("p")])
    dp.quarantine = {("x", "p"): (None, "Error: Could not process rule")}
    agent.sync_once()
    agent.apply(Event(ADDED, "Namespace", namespace("y")))
    clock.now += 5
    agent.sync_once()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "x/p quarantined" in warnings[0] and "Could not process rule" in warnings[0]
    assert agent.metrics.quarantined._value.get() == 1


# ---- synced_through, metrics and health -------------------------------------------------------

def test_synced_through_follows_what_the_kernel_has():
    agent, dp, clock, wall = make_agent()
    list_all(agent, [pod("a")], [namespace("x")])
    assert agent.synced_through is None
    listed = wall.now
    wall.now += 1
    agent.sync_once()
    assert agent.synced_through == listed               # as of the last event the sync took in
    wall.now += 1
    agent.apply(Event(ADDED, "NetworkPolicy", policy("p")))
    assert agent.synced_through == listed               # pending
    clock.now += 5
    wall.now += 1
    agent.sync_once()
    assert agent.synced_through == wall.now - 1
    wall.now += 1
    agent.apply(Event(MODIFIED, "NetworkPolicy", policy("p")))     # changes nothing: caught up at once
    assert agent.synced_through == wall.now


def test_synced_through_follows_the_sources_horizon_when_it_has_one():
    agent, dp, clock, wall = make_agent()
    list_all(agent, [pod("a")], [namespace("x")])
    agent.apply(Event(agent_mod.HORIZON, "", 500.0))        # the scan that listed them started at 500
    agent.sync_once()
    assert agent.synced_through == 500.0
    agent.apply(Event(agent_mod.HORIZON, "", 501.0))        # a scan that found nothing new
    assert agent.synced_through == 501.0
    agent.apply(Event(ADDED, "NetworkPolicy", policy("p")))
    agent.apply(Event(agent_mod.HORIZON, "", 502.0))
    assert agent.synced_through == 501.0                   # not before the sync
    clock.now += 5
    agent.sync_once()
    assert agent.synced_through == 502.0
    assert agent.metrics.synced_through._value.get() == 502.0


def test_the_manifest_poller_marks_each_scan_with_the_time_it_started(tmp_path):
    events = []
    wall = Clock(42.0)
    poller = agent_mod.manifest_source(_manifests(tmp_path, policy("p"), namespace("x")), events.append, 0.1,
                                       wall_clock=wall)
    poller.scan()
    assert [e.type for e in events] == [RELIST, RELIST, RELIST, agent_mod.HORIZON] and events[-1].obj == 42.0
    poller.start()
    poller.stop()


def _samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_after_syncs_and_a_failure():
    agent, dp, clock, wall = make_agent()
    list_all(agent, [pod("a"), pod("b", ns="y", ip="10.244.2.2", node="node2")], [namespace("x"), namespace("y")],
             [policy("p"), policy("bad", spec=BAD_SELECTOR)])
    agent.sync_once()
    dp.fail = 1
    agent.apply(Event(ADDED, "Namespace", namespace("z")))
    clock.now += 5
    agent.sync_once()
    s = _samples(agent.metrics.render())
    assert s[("podnet_network_policy_sync_duration_seconds_count", (("type", "full"),))] == 1
    assert s[("podnet_network_policy_sync_failures_total", ())] == 1
    assert s[("podnet_network_policy_rules", ())] == 7
    assert s[("podnet_network_policy_chains", ())] == 3
    assert s[("podnet_network_policy_sets", ())] == 2
    assert s[("podnet_network_policy_set_elements", ())] == 5
    assert s[("podnet_network_policy_policies", ())] == 1
    assert s[("podnet_network_policy_pods", (("scope", "cluster"),))] == 2
    assert s[("podnet_network_policy_pods", (("scope", "node"),))] == 1
    assert s[("podnet_network_policy_invalid_objects", (("kind", "NetworkPolicy"),))] == 1
    assert s[("podnet_network_policy_dropped_packets_total", (("direction", "ingress"),))] == 4
    assert s[("podnet_network_policy_dropped_packets_total", (("direction", "egress"),))] == 2
    assert s[("podnet_network_policy_last_sync_timestamp_seconds", ())] == wall.now
    assert s[("podnet_network_policy_synced_through_timestamp_seconds", ())] == wall.now


def test_health_and_readiness():
    wall = Clock(1.7e9)
    m = Metrics(health_timeout=60, clock=wall)
    routes = m.routes("healthz")
    assert routes["/readyz"]()[0] == 503 and routes["/healthz"]()[0] == 200
    m.synced(Result(full=True), None)
    assert routes["/readyz"]()[0] == 200
    m.queued()
    wall.now += 59
    assert routes["/livez"]()[0] == 200
    wall.now += 2
    status, _, body = routes["/healthz"]()
    assert status == 503 and b"waited 61 s" in body
    m.synced(Result(full=False), None)
    assert routes["/healthz"]()[0] == 200
    assert set(m.routes("metrics")) == {"/metrics", "/healthz", "/livez", "/readyz"}
    never = Metrics(health_timeout=60, clock=wall)
    wall.now += 61
    assert never.health()[0] is False


def test_drop_counters_survive_a_failing_read():
    calls = []

    def read():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("nft gone")
        return {"ingress": 1, "egress": 0}
    m = Metrics(drop_counts=read)
    assert m.drop_counters.counts() == {"ingress": 1, "egress": 0}
    m.drop_counters._cached = (m.drop_counters._cached[0] - 10, m.drop_counters._cached[1])
    assert m.drop_counters.counts() == {"ingress": 1, "egress": 0}      # the last good read
    assert "podnet_network_policy_dropped_packets_total" in m.render()


# ---- dropped packets --------------------------------------------------------------------------

def test_a_logged_drop_names_the_pod_and_the_peer(caplog):
    agent, dp, clock, _ = make_agent()
    list_all(agent, [pod("a", ip="10.244.1.2"), pod("b", ns="y", ip="10.244.2.3", node="node2")],
             [namespace("x"), namespace("y")])
    drops = agent_mod.DropLogger(agent, 100)
    caplog.set_level(logging.INFO, "network_policy.drops")
    drops.handle(LoggedPacket("ingress x", 2, 3, 4, 0, Packet(4, 6, "10.244.2.3", "10.244.1.2", 40000, 80), 60))
    drops.handle(LoggedPacket("egress x", 2, 3, 4, 0, Packet(4, 17, "10.244.1.2", "192.168.50.9", 5000, 53), 60))
    drops.handle(LoggedPacket("ingress x", 2, 3, 4, 0, Packet(4, 1, "10.244.2.3", "10.244.1.2", 8, 0), 60))
    drops.handle(LoggedPacket("someone else", 2, 3, 4, 0, Packet(4, 6, "1.1.1.1", "2.2.2.2", 1, 2), 60))
    lines = [r.getMessage() for r in caplog.records if r.name == "network_policy.drops"]
    assert lines == ["dropped ingress to x/a (10.244.1.2) from y/b (10.244.2.3): TCP port 80",
                     "dropped egress from x/a (10.244.1.2) to 192.168.50.9: UDP port 53",
                     "dropped ingress to x/a (10.244.1.2) from y/b (10.244.2.3): ICMP type 8"]
    s = _samples(agent.metrics.render())
    assert s[("podnet_network_policy_logged_drops_total", (("direction", "ingress"),))] == 2
    assert s[("podnet_network_policy_logged_drops_total", (("direction", "egress"),))] == 1


def test_an_nflog_bind_the_kernel_refuses_leaves_the_agent_running(monkeypatch, caplog):
    agent, dp, clock, _ = make_agent()

    class Refusing:
        def __init__(self, group):
            raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr("podnet.net.nflog.NflogListener", Refusing)
    drops = agent_mod.DropLogger(agent, 100)
    caplog.set_level(logging.WARNING, "network_policy")
    assert drops.start() is False
    assert "running without a log line per dropped packet" in caplog.text
    assert agent.metrics.nflog_listening._value.get() == 0
    drops.stop()


# ---- the command line -------------------------------------------------------------------------

def test_flags_and_their_defaults():
    from network_policy import server
    opts = server.build_parser().parse_args([])
    assert (opts.metrics_bind_address, opts.healthz_bind_address) == ("127.0.0.1:10265", "0.0.0.0:10266")
    assert (opts.min_sync_period, opts.full_sync_period, opts.nflog_group) == (1.0, 3600.0, 100)
    opts = server.build_parser().parse_args(["--manifests", "/m", "--min-sync-period", "200ms", "--sync-period", "5m",
                                              "--hostname-override", "node1", "-v", "4", "--cleanup"])
    assert (opts.manifests, opts.min_sync_period, opts.full_sync_period, opts.cleanup) == ("/m", 0.2, 300.0, True)
    with pytest.raises(SystemExit):
        server.build_parser().parse_args(["--manifests", "/m", "--kubeconfig", "/k"])
    with pytest.raises(SystemExit):
        server.build_parser().parse_args(["--min-sync-period", "soon"])
    opts = server.build_explain_parser().parse_args(["x/a", "--manifests", "/m", "--json", "--verdict", "y/b",
                                                     "--port", "http", "--protocol", "udp"])
    assert (opts.pod, opts.json, opts.verdict, opts.port, opts.protocol) == ("x/a", True, "y/b", "http", "UDP")


def test_the_podnet_command_knows_the_daemon():
    from cli.main import DAEMONS
    assert DAEMONS["network-policy"] == "network_policy.server"


def _manifests(tmp_path, *objects):
    (tmp_path / "all.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    return str(tmp_path)


# ---- explain ----------------------------------------------------------------------------------

ALLOW_B = {"podSelector": {"matchLabels": {"app": "a"}},
           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": "http"}]}]}


def _explain_dir(tmp_path):
    return _manifests(tmp_path, namespace("x"), pod("a", labels={"app": "a"}),
                      pod("b", ip="10.244.2.2", node="node2", labels={"app": "b"}),
                      pod("c", ip="10.244.2.3", node="node2", labels={"app": "c"}),
                      policy("allow-b", spec=ALLOW_B), policy("bad", spec=BAD_SELECTOR))


def test_explain_text_with_a_verdict(tmp_path, capsys):
    from network_policy import server
    rc = server.main(["explain", "x/a", "--manifests", _explain_dir(tmp_path), "--hostname-override", "node1",
                      "--verdict", "x/b", "--port", "http"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.splitlines()[:5] == [
        "pod x/a: 10.244.1.2, on this node",
        "  ingress: isolated by 1 policy",
        "    x/allow-b",
        "      rule 0: from pods app=b in namespace x [x/b] on http/TCP (x/a:80)",
        "  egress: not isolated (everything allowed)"]
    assert "verdict: x/b (10.244.2.2) -> 10.244.1.2 TCP/http (80): ALLOWED" in out
    assert "ingress allowed by x/allow-b, ingress rule 0" in out


def test_explain_json_and_a_denied_verdict(tmp_path, capsys):
    from network_policy import server
    rc = server.main(["explain", "x/a", "--manifests", _explain_dir(tmp_path), "--json", "--verdict", "x/c",
                      "--port", "80"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    explanation, verdict = data["explanation"], data["verdict"]
    assert explanation["isolated_ingress"] is True and explanation["isolated_egress"] is False
    assert explanation["pod"]["labels"] == {"app": "a"}
    rule = explanation["ingress"][0]["rules"][0]
    assert rule["peers"][0]["pods"] == ["x/b"] and rule["ports"][0]["resolved"] == [["x/a", 80]]
    assert verdict["src"] == "10.244.2.3" and verdict["verdict"]["allowed"] is False
    assert verdict["verdict"]["denied_by"] == "ingress"


def test_explain_refuses_what_it_cannot_judge(tmp_path, capsys):
    from network_policy import server
    d = _explain_dir(tmp_path)
    assert server.main(["explain", "x/nobody", "--manifests", d]) == 1
    assert "no pod x/nobody" in capsys.readouterr().err
    assert server.main(["explain", "justaname", "--manifests", d]) == 2
    assert server.main(["explain", "x/a", "--manifests", d, "--verdict", "x/b", "--port", "grpc"]) == 2
    assert "has no TCP port named 'grpc'" in capsys.readouterr().err
    assert server.main(["explain", "x/a", "--manifests", d, "--verdict", "not-an-address"]) == 2
    assert server.main(["explain", "x/a", "--manifests", d, "--verdict", "192.168.50.9", "--port", "80"]) == 0
    assert "DENIED by ingress" in capsys.readouterr().out


def _api_list(kind, items):
    for item in items:          # list items carry neither kind nor apiVersion
        item.pop("kind", None)
        item.pop("apiVersion", None)
    return ("json", 200, {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "7"}, "items": items})


def test_explain_lists_the_kubernetes_api_once(tmp_path, capsys):
    from test_kube_sources import FakeApiServer

    from network_policy import server
    api = FakeApiServer()
    try:
        api.add("/api/v1/namespaces", "list", _api_list("NamespaceList", [namespace("x")]))
        api.add("/api/v1/pods", "list", _api_list("PodList", [pod("a", labels={"app": "a"}),
                                                                pod("b", ip="10.244.2.2", labels={"app": "b"})]))
        api.add("/apis/networking.k8s.io/v1/networkpolicies", "list",
                _api_list("NetworkPolicyList", [policy("allow-b", spec=ALLOW_B)]))
        rc = server.main(["explain", "x/a", "--kubeconfig", api.kubeconfig(str(tmp_path)), "--verdict", "x/b"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "rule 0: from pods app=b in namespace x [x/b] on http/TCP (x/a:80)" in out
        assert "ALLOWED" in out
        assert sorted((path, mode) for path, mode, _ in api.requests) == [
            ("/api/v1/namespaces", "list"), ("/api/v1/pods", "list"),
            ("/apis/networking.k8s.io/v1/networkpolicies", "list")]
    finally:
        api.close()


def test_a_model_that_fails_on_one_object_still_takes_the_others(caplog, monkeypatch):
    agent, dp, clock, _ = make_agent()
    original = agent.model.set_pod

    def set_pod(key, pod):
        if key == ("x", "boom"):
            raise KeyError("a bug")
        original(key, pod)
    monkeypatch.setattr(agent.model, "set_pod", set_pod)
    list_all(agent, [pod("boom", ip="10.244.1.9"), pod("a")], [namespace("x")], [policy("deny")])
    assert "Pod x/boom: the model could not take this change" in caplog.text
    assert not agent.model.verdict("10.244.9.9", "10.244.1.2", "TCP", 80).allowed     # x/a is in
    agent.sync_once()
    assert dp.calls == [True]
