"""The iptables proxier's decisions, metrics and flags (no root: restore/save are recorded, not run)."""
import argparse

import pytest

from kube_proxy import iptables as ipt
from kube_proxy import metrics as km
from kube_proxy import server
from kube_proxy.proxier import Config, SyncResult
from kube_proxy.tracker import ChangeTracker
from lab import manifests as k8s
from podnet import httpd
from podnet.net.conntrack import Flow

HTTP = {"name": "http", "port": 80, "targetPort": 8080}


class FakeKernel:
    """Records restore inputs; save() answers what a test put there."""

    def __init__(self, saved=None, fail=False):
        self.saved = saved or {"filter": "", "nat": ""}
        self.restores = []
        self.fail = fail

    def restore(self, text):
        if self.fail:
            raise RuntimeError("iptables-restore: line 3 failed")
        self.restores.append(text)

    def save(self, table):
        return self.saved[table]


def tracker_with(services):
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    svcs, slices = [], []
    for name, ip, eps in services:
        svcs.append(k8s.service(name, ip, [HTTP]))
        slices.append(k8s.endpoint_slice(name, [(e, "node1") for e in eps], [{"name": "http", "port": 8080}]))
    t.replace("Service", svcs)
    t.replace("EndpointSlice", slices)
    return t


def proxier(kernel):
    return ipt.IptablesProxier(Config(cluster_cidr=("10.244.0.0/16",)), restore=kernel.restore,
                               save=kernel.save)


def test_setup_adds_missing_jumps_and_chains_once():
    kernel = FakeKernel()
    p = proxier(kernel)
    p.setup()
    text = kernel.restores[0]
    assert ":KUBE-SERVICES - [0:0]" in text and ":KUBE-POSTROUTING - [0:0]" in text
    assert "-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" in text
    # now the kernel has them: nothing more to do (and existing chains are never re-declared)
    kernel.saved = {"filter": "\n".join([":%s - [0:0]" % c for c in ipt.FILTER_BASE] +
                                        ["-A %s %s" % (c, r) for t, c, r in ipt.BUILTIN_JUMPS if t == "filter"]),
                    "nat": "\n".join([":%s - [0:0]" % c for c in ipt.NAT_BASE] +
                                     ["-A %s %s" % (c, r) for t, c, r in ipt.BUILTIN_JUMPS if t == "nat"])}
    p.setup()
    assert len(kernel.restores) == 1


def test_first_sync_deletes_our_stale_chains_and_never_names_others():
    kernel = FakeKernel({"filter": ":KUBE-FORWARD - [0:0]\n", "nat": ":KUBE-SVC-OLDOLDOLDOLDOLD - [0:0]\n"
                                                                  ":KUBE-SEP-OLDOLDOLDOLDOLD - [0:0]\n"
                                                                  ":CNI-HOSTPORT-DNAT - [0:0]\n"})
    p = proxier(kernel)
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2", "10.244.2.2"])])
    result = p.sync(t.take())
    text = kernel.restores[-1]
    assert result.full and "-X KUBE-SVC-OLDOLDOLDOLDOLD" in text and "-X KUBE-SEP-OLDOLDOLDOLDOLD" in text
    assert "CNI-HOSTPORT-DNAT" not in text
    assert result.rules["nat"] > 0 and p.synced


def test_endpoint_change_is_a_partial_sync_of_that_service_only():
    kernel = FakeKernel()
    p = proxier(kernel)
    services = [("svc%d" % i, "10.96.0.%d" % (10 + i), ["10.244.1.%d" % (2 + i)]) for i in range(20)]
    t = tracker_with(services)
    p.sync(t.take())
    t.update_slice(k8s.endpoint_slice("svc3", [("10.244.1.5", "node1"), ("10.244.2.9", "node1")],
                                      [{"name": "http", "port": 8080}]))
    result = p.sync(t.take())
    text = kernel.restores[-1]
    assert not result.full and result.changed == 1
    svc = ipt.service_chain(next(n for n in t.take().state.service_ports if n.name == "svc3"))
    assert ":%s - [0:0]" % svc in text
    assert "KUBE-SERVICES" not in text          # the dispatch chain is untouched
    assert text.count(":KUBE-SVC-") == 1


def test_nothing_changed_writes_nothing():
    kernel = FakeKernel()
    p = proxier(kernel)
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2"])])
    p.sync(t.take())
    n = len(kernel.restores)
    result = p.sync(t.take())
    assert len(kernel.restores) == n and result.restore_bytes == 0


def test_a_failed_restore_makes_the_next_sync_full_and_read_the_kernel():
    kernel = FakeKernel()
    p = proxier(kernel)
    t = tracker_with([("web", "10.96.0.10", ["10.244.1.2"])])
    p.sync(t.take())
    kernel.fail = True
    t.update_slice(k8s.endpoint_slice("web", [("10.244.1.3", "node1")], [{"name": "http", "port": 8080}]))
    with pytest.raises(RuntimeError, match="iptables-restore"):
        p.sync(t.take())
    assert not p.synced
    kernel.fail = False
    result = p.sync(t.take())       # the next one is full and reads the kernel again
    assert result.full


def test_cleanup_removes_jumps_and_every_chain_of_ours():
    kernel = FakeKernel({"filter": ":INPUT ACCEPT [0:0]\n:KUBE-FORWARD - [0:0]\n:OTHER - [0:0]\n"
                                   '-A INPUT -m comment --comment "kubernetes health check service ports" '
                                   "-j KUBE-NODEPORTS\n",
                         "nat": ":KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n"})
    proxier(kernel).cleanup()
    text = "".join(kernel.restores)
    assert '-D INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS' in text
    assert "-X KUBE-FORWARD" in text and "-X KUBE-SERVICES" in text and "-X KUBE-SVC-AAAAAAAAAAAAAAAA" in text
    assert "OTHER" not in text


def test_cleanup_beside_the_ipvs_mode_keeps_the_chains_and_jumps_it_shares():
    """The IPVS mode's chains are there (its start or restart runs our cleanup): the chains and
    jumps both modes use (rules.SHARED_CHAINS, rules.SHARED_JUMPS) stay, our rules in them go."""
    svc = "KUBE-SVC-AAAAAAAAAAAAAAAA"
    kernel = FakeKernel({"filter": ":KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-IPVS-FILTER - [0:0]\n"
                                   '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD\n'
                                   '-A INPUT -m comment --comment "kubernetes health check service ports" '
                                   "-j KUBE-NODEPORTS\n",
                         "nat": ":KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:%s - [0:0]\n"
                                '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
                                "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j %s\n"
                                "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT\n" % (svc, svc)})
    proxier(kernel).cleanup()
    text = "".join(kernel.restores)
    assert "-D KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j %s" % svc in text and "-X %s" % svc in text
    assert '-D INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS' in text
    assert "-X KUBE-NODEPORTS" in text
    for shared in ("KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-FORWARD"):
        assert "-X %s" % shared not in text and ":%s " % shared not in text
    assert "-D PREROUTING" not in text and "-D FORWARD" not in text and "KUBE-NODE-PORT\n" not in text
    assert "KUBE-IPVS-FILTER" not in text


def test_udp_flows_to_removed_endpoints_are_selected(monkeypatch):
    deleted = []

    def fake_delete(predicate, family=0):
        flows = [Flow(2, 17, "10.244.1.9", "10.96.0.53", 4000, 53, "10.244.2.2", 8081, b""),    # removed ep
                 Flow(2, 17, "10.244.1.9", "10.96.0.53", 4001, 53, "10.244.1.5", 8081, b""),    # kept ep
                 Flow(2, 6, "10.244.1.9", "10.96.0.53", 4002, 53, "10.244.2.2", 8081, b""),     # TCP
                 Flow(2, 17, "192.168.50.9", "192.168.50.1", 4003, 30053, "10.244.2.2", 8081, b"")]  # NodePort
        chosen = [f for f in flows if predicate(f)]
        deleted.extend(chosen)
        return len(chosen)
    from podnet.net import conntrack
    monkeypatch.setattr(conntrack, "delete_flows", fake_delete)
    kernel = FakeKernel()
    p = proxier(kernel)
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    udp = {"name": "dns", "port": 53, "targetPort": 8081, "protocol": "UDP", "nodePort": 30053}
    t.replace("Service", [k8s.service("dns", "10.96.0.53", [udp], type="NodePort")])
    eps = {"name": "dns", "port": 8081, "protocol": "UDP"}
    t.replace("EndpointSlice", [k8s.endpoint_slice("dns", [("10.244.1.5", "n"), ("10.244.2.2", "n")], [eps])])
    first = p.sync(t.take())
    # a UDP Service that gets its first endpoints: flows to it (answered by REJECT so far) go
    assert first.conntrack_deleted == 2 and {f.sport for f in deleted} == {4000, 4001}
    deleted.clear()
    t.update_slice(k8s.endpoint_slice("dns", [("10.244.1.5", "n")], [eps]))
    result = p.sync(t.take())
    assert result.conntrack_deleted == 2
    assert sorted(f.sport for f in deleted) == [4000, 4003]


def test_metrics_text_and_health():
    now = [1000.0]
    m = km.Metrics(health_timeout=60, clock=lambda: now[0])
    assert m.health()[0]            # just started
    m.queued()
    m.synced(SyncResult(full=True, seconds=0.003, rules={"nat": 12, "filter": 3}), 2, 4)
    m.synced(SyncResult(full=False, seconds=0.5, changed=1, rules={"nat": 14, "filter": 3}), 2, 5)
    text = m.render()
    assert "kubeproxy_sync_proxy_rules_duration_seconds_count 2" in text
    assert 'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.004"} 1' in text
    assert "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1" in text
    assert 'kubeproxy_sync_proxy_rules_iptables_total{table="nat"} 14' in text
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1000.0" in text
    m.queued()
    now[0] += 61                    # a change waiting longer than the timeout: unhealthy
    healthy, body = m.health()
    assert not healthy and '"lastUpdated": "1970-01-01T00:16:40Z"' in body


def test_durations_and_addresses():
    assert server.parse_duration("1s") == 1.0
    assert server.parse_duration("500ms") == 0.5
    assert server.parse_duration("1m30s") == 90.0
    assert server.parse_duration("2") == 2.0
    with pytest.raises(argparse.ArgumentTypeError):
        server.parse_duration("10 parsecs")
    assert httpd.parse_address("127.0.0.1:10249", 1) == ("127.0.0.1", 10249)
    assert httpd.parse_address(":9000", 1) == ("0.0.0.0", 9000)
    assert httpd.parse_address("[::1]:9000", 1) == ("::1", 9000)
    assert httpd.parse_address("", 1) is None


def test_flags_are_kube_proxys():
    opts = server.build_parser().parse_args(
        ["--proxy-mode", "iptables", "--cluster-cidr", "10.244.0.0/16", "--masquerade-all",
         "--iptables-min-sync-period", "2s", "--nodeport-addresses", "192.168.0.0/16", "--manifests", "/tmp/x",
         "--hostname-override", "node1", "-v", "4"])
    assert opts.cluster_cidr == ("10.244.0.0/16",) and opts.masquerade_all and opts.min_sync_period == 2.0
    with pytest.raises(SystemExit):
        server.build_parser().parse_args(["--manifests", "/tmp/x", "--kubeconfig", "/tmp/k"])



@pytest.mark.parametrize("flag", ["--iptables-sync-period", "--ipvs-sync-period"])
def test_kube_proxys_sync_period_flags_have_kube_proxys_meaning(flag):
    """kube-proxy's SyncPeriod is the delay before a failed sync is retried; it used to be taken
    as the full-sync period here, making kube-proxy's usual 30s a full sync every 30 s."""
    for argv in ([flag, "30s"], [flag + "=30s"]):
        opts = server.build_parser().parse_args(["--manifests", "/tmp/x"] + argv)
        assert opts.retry_period == 30.0 and opts.full_sync_period == 3600.0
    opts = server.build_parser().parse_args(["--manifests", "/tmp/x", "--sync-period", "30m"])
    assert opts.full_sync_period == 1800.0 and opts.retry_period is None
    assert server.build_parser().parse_args(["--manifests", "/tmp/x"]).full_sync_period == 3600.0


def test_partial_syncs_keep_rule_counts_and_chains_exact():
    """After any mix of partial syncs, what the proxier believes is in the kernel equals a
    fresh render of the state."""
    kernel = FakeKernel()
    p = proxier(kernel)
    t = tracker_with([("svc%d" % i, "10.96.0.%d" % (10 + i), ["10.244.1.%d" % (2 + i)]) for i in range(30)])
    p.sync(t.take())
    t.update_slice(k8s.endpoint_slice("svc1", [("10.244.9.1", "n"), ("10.244.9.2", "node1")],
                                      [{"name": "http", "port": 8080}]))
    t.delete_service(("default", "svc2"))
    t.update_service(k8s.service("new", "10.96.1.1", [HTTP]))        # no endpoints yet: REJECT in filter
    t.delete_slice(("default", "svc3-abcde"))                         # svc3 loses its endpoints
    result = p.sync(t.take())
    assert not result.full and result.changed == 4
    text = kernel.restores[-1]
    # the removed Service: its dispatch rule goes before its chains do
    assert text.index("-D KUBE-SERVICES -d 10.96.0.12/32") < text.index("-X KUBE-SVC-")
    assert '-I KUBE-SERVICES 1 -d 10.96.1.1/32 -p tcp -m comment --comment "default/new:http has no endpoints"' \
        in text
    expected = ipt.render(t.take().state, p.config)
    assert p.rules == ipt.rules_count(expected)
    assert p.chains["nat"] == set(expected["nat"])


def test_full_sync_stream_is_restore_input_reordered():
    t = tracker_with([("svc%d" % i, "10.96.%d.%d" % (i // 200, i % 200), ["10.244.1.%d" % (i % 250), "10.244.2.%d" % (i % 250)])
                      for i in range(300)])
    state = t.take().state
    out = {}
    known = {"nat": {"KUBE-SVC-GONEGONEGONEGONE"}, "filter": set()}
    text = "".join(ipt.full_sync_stream(state, CONFIG, {}, known, out))
    reference = ipt.restore_input(ipt.render(state, CONFIG), None, [("nat", "KUBE-SVC-GONEGONEGONEGONE")])
    assert sorted(text.splitlines()) == sorted(reference.splitlines())
    assert out["ruleset"] == ipt.render(state, CONFIG)
    # nothing is jumped to before it is declared
    declared = set(ipt.NAT_BASE) | set(ipt.FILTER_BASE)
    for line in text.splitlines():
        if line.startswith(":"):
            declared.add(line[1:].split()[0])
        elif line.startswith("-A") and " -j KUBE-" in line:
            assert line.split(" -j ")[1].split()[0] in declared, line
    assert text.index("-X KUBE-SVC-GONEGONEGONEGONE") > text.index("-A KUBE-SERVICES")


CONFIG = Config(cluster_cidr=("10.244.0.0/16",))


def test_full_sync_over_populated_kernel_rewrites_only_what_differs():
    t = tracker_with([("svc%d" % i, "10.96.0.%d" % (10 + i), ["10.244.1.%d" % (2 + i)]) for i in range(10)])
    state = t.take().state
    desired = ipt.render(state, CONFIG)
    # the kernel as an earlier run left it: everything right except one SEP chain (drift),
    # KUBE-SERVICES in another order (partial syncs insert at the top), and a stale chain
    saved = {}
    for table in ("filter", "nat"):
        chains = dict(desired[table])
        if table == "nat":
            chains["KUBE-SERVICES"] = tuple(reversed(chains["KUBE-SERVICES"][:-1])) + chains["KUBE-SERVICES"][-1:]
            sep = next(c for c in chains if c.startswith("KUBE-SEP-"))
            chains[sep] = chains[sep][:1]
            chains["KUBE-SVC-STALESTALESTALE"] = ("-A KUBE-SVC-STALESTALESTALE -j KUBE-MARK-MASQ",)
        saved[table] = "\n".join([":%s - [0:0]" % c for c in chains] +
                                 [r for rules in chains.values() for r in rules] +
                                 ["-A %s %s" % (c, r) for tb, c, r in ipt.BUILTIN_JUMPS if tb == table]) + "\n"
    kernel = FakeKernel(saved)
    p = proxier(kernel)
    result = p.sync(t.take())
    text = kernel.restores[-1]
    assert result.full and result.chains_written == 2
    assert text.count(":KUBE-") == 2 and ":%s - [0:0]" % sep in text and "-X KUBE-SVC-STALESTALESTALE" in text
    assert "KUBE-SERVICES" not in text
