"""Fault isolation in the proxiers (issue 12): one Service port the kernel refuses is found,
quarantined and reported, and every other change is still programmed in the same sync.

No root: the kernel is a stateful fake that refuses any transaction carrying a "poisoned"
address (the kernel refusing one port's rules), committing iptables-restore's tables one at
a time as the real tool does. netns_tests/test_kube_proxy_isolation_kernel.py does the same against
the real iptables-restore and nft.
"""
import logging
import math

import pytest

from kube_proxy import iptables as ipt
from kube_proxy import metrics as km
from kube_proxy import nftables as nk
from kube_proxy import server
from kube_proxy.model import Endpoint, ServicePort, ServicePortName
from kube_proxy.proxier import Config, Isolation, Quarantine, SyncResult, isolate
from kube_proxy.tracker import ChangeTracker
from lab import manifests as k8s

HTTP = {"name": "http", "port": 80, "targetPort": 8080}
HTTP_EP = [{"name": "http", "port": 8080}]
POISON = "10.244.66.66"             # an endpoint the fake kernel refuses
CONFIG = Config(cluster_cidr=("10.244.0.0/16",))


def spn(i):
    return ServicePortName("default", "svc%d" % i, "http", "TCP")


def refused(text=""):
    return RuntimeError("iptables-restore v1.8.9 (nf_tables): \nline 7: RULE_APPEND failed (Invalid argument): "
                        "rule in chain KUBE-SEP-X %s" % text)


class FakeTables:
    """iptables-restore --noflush and iptables-save over a filter and a nat table.

    Each table's block commits at its COMMIT, on its own (a refused second table leaves the
    first committed, as iptables-restore does); a line carrying `poison` (or any line, when
    `everything`) is refused; the checks iptables does itself are made too: a jump to a chain
    that does not exist, -D of a rule that is not there, -X of a chain still jumped to."""
    BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}

    def __init__(self, poison=(POISON,), poison_table=None):
        self.tables = {t: {c: [] for c in chains} for t, chains in self.BUILTIN.items()}
        self.poison = list(poison)
        self.poison_table = poison_table        # refuse the poison only in this table
        self.everything = False
        self.restores, self.refusals = [], 0

    def restore(self, text):
        self.restores.append(text)
        table = work = None
        for n, line in enumerate(text.splitlines(), 1):
            if line.startswith("*"):
                table, work = line[1:], {c: list(r) for c, r in self.tables[line[1:]].items()}
                continue
            if line == "COMMIT":
                self.tables[table] = work
                continue
            if line == "-S":
                continue
            if self.everything or (any(p in line for p in self.poison)
                                   and self.poison_table in (None, table)):
                self.refusals += 1
                raise refused("(line %d)" % n)
            words = line.split()
            if line.startswith(":"):
                work[words[0][1:]] = []
            elif words[0] in ("-A", "-I"):
                target = words[words.index("-j") + 1] if "-j" in words else None
                if words[1] not in work or (target and target.startswith("KUBE-") and target not in work):
                    raise RuntimeError("iptables-restore: line %d: Chain '%s' does not exist" % (n, target))
                if words[0] == "-A":
                    work[words[1]].append(line)
                else:
                    work[words[1]].insert(int(words[2]) - 1, "-A %s %s" % (words[1], line.split(" ", 3)[3]))
            elif words[0] == "-D":
                try:
                    work[words[1]].remove("-A " + line[3:])
                except (KeyError, ValueError):
                    raise RuntimeError("iptables-restore: line %d: Bad rule (does a matching rule exist?)" % n) \
                        from None
            elif words[0] == "-X":
                if any(r.split()[-1] == words[1] or (" -j %s " % words[1]) in r + " " for rs in work.values()
                       for r in rs):
                    raise RuntimeError("iptables-restore: line %d: chain %s in use" % (n, words[1]))
                del work[words[1]]
            else:
                raise AssertionError("unexpected restore line %r" % line)

    def save(self, table):
        chains = self.tables[table]
        lines = ["*" + table] + [":%s %s [0:0]" % (c, "ACCEPT" if c in self.BUILTIN[table] else "-")
                                 for c in chains]
        for rules in chains.values():
            lines += rules
        return "\n".join(lines + ["COMMIT"]) + "\n"

    def nat(self):
        return self.tables["nat"]

    def dnat_targets(self):
        """Every --to-destination in the nat table."""
        return sorted(r.split("--to-destination ")[1] for rules in self.nat().values() for r in rules
                      if "--to-destination" in r)


def objects(n, bad=(), extra=None):
    """n Services with one endpoint each; those in `bad` get the poisoned address too."""
    svcs, slices = [], []
    for i in range(n):
        svcs.append(k8s.service("svc%d" % i, "10.96.%d.%d" % (i // 250, 1 + i % 250), [HTTP]))
        eps = [("10.244.%d.%d" % (1 + i // 250, 1 + i % 250), "node1")]
        if i in bad:
            eps.append((POISON, "node1"))
        eps += (extra or {}).get(i, [])
        slices.append(k8s.endpoint_slice("svc%d" % i, eps, HTTP_EP))
    return svcs, slices


def tracker(n, bad=()):
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    svcs, slices = objects(n, bad)
    t.replace("Service", svcs)
    t.replace("EndpointSlice", slices)
    return t


def set_endpoints(t, i, *ips):
    t.update_slice(k8s.endpoint_slice("svc%d" % i, [(ip, "node1") for ip in ips], HTTP_EP))


def ipt_proxier(kernel):
    return ipt.IptablesProxier(CONFIG, restore=kernel.restore, save=kernel.save)


# ---- isolate() --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, bad", [(1, {0}), (2, {1}), (7, {3}), (1000, {617}), (1000, {0, 999}),
                                    (16, set(range(16)))])
def test_isolate_finds_exactly_the_refused_ones_in_about_log2_trials(n, bad):
    applied = set()

    def trial(names):
        if any(name in bad for name in names):
            raise refused()
        applied.update(names)

    found = isolate(list(range(n)), trial, control=lambda: None)
    assert sorted(name for name, _ in found.bad) == sorted(bad)
    assert applied == set(range(n)) - bad
    if len(bad) == 1:
        assert found.tried <= 1 + math.ceil(1.5 * math.log2(max(n, 2))) + 1, found


def test_isolate_blames_nobody_when_the_kernel_refuses_everything():
    def trial(names):
        raise refused("everything")

    with pytest.raises(RuntimeError, match="everything"):
        isolate(list(range(8)), trial, control=lambda: trial([]))
    with pytest.raises(RuntimeError):
        isolate([0], trial)                      # no control: nobody can be blamed
    # the control goes through: the one port really is refused
    assert [n for n, _ in isolate([0], trial, control=lambda: None).bad] == [0]


def test_isolate_lets_a_timeout_through():
    def trial(names):
        raise TimeoutError("iptables-restore: timed out")

    with pytest.raises(TimeoutError):
        isolate([0, 1], trial, control=lambda: None)


# ---- the quarantine -------------------------------------------------------------------------------

def test_quarantine_replaces_a_refused_port_by_its_fallback_until_it_changes():
    t = tracker(3)
    first = t.take()
    set_endpoints(t, 1, "10.244.9.9")
    second = t.take()
    q = Quarantine()
    assert q.effective(second) is second                 # nothing quarantined: the same Sync
    (added,) = q.add(second, [(spn(1), "refused")])
    assert added.fallback == (first.state.service_ports[spn(1)], first.state.endpoints_for(spn(1)))
    assert q.total == 1 and spn(1) in q
    # later syncs hold svc1 at what the kernel has, and never as changed
    set_endpoints(t, 2, "10.244.8.8")
    eff = q.effective(t.take())
    assert eff.changed == {spn(2)}
    assert [e.ip for e in eff.state.endpoints_for(spn(1))] == [first.state.endpoints_for(spn(1))[0].ip]
    # svc1 changes: released, changed, its previous being what the kernel holds
    set_endpoints(t, 1, "10.244.7.7")
    eff = q.effective(t.take())
    assert spn(1) not in q and eff.changed == {spn(1)}
    assert eff.previous[spn(1)] == added.fallback
    assert [e.ip for e in eff.state.endpoints_for(spn(1))] == ["10.244.7.7"]


def test_a_new_port_refused_has_no_fallback():
    t = tracker(2)
    t.take()
    t.update_service(k8s.service("svc9", "10.96.9.9", [HTTP]))
    sync = t.take()
    q = Quarantine()
    (added,) = q.add(sync, [(ServicePortName("default", "svc9", "http", "TCP"), "refused")])
    assert added.fallback == (None, ())
    eff = q.effective(t.take())
    assert ServicePortName("default", "svc9", "http", "TCP") not in eff.state.service_ports


# ---- iptables mode ---------------------------------------------------------------------------------

def test_iptables_partial_sync_quarantines_the_refused_port_and_programs_the_rest(caplog):
    kernel = FakeTables()
    p = ipt_proxier(kernel)
    t = tracker(20)
    p.sync(t.take())
    old_svc5 = dict((c, r) for c, r in kernel.nat().items() if c in p.port_rules[spn(5)].chains)
    set_endpoints(t, 5, "10.244.1.6", POISON)            # the kernel refuses this one
    set_endpoints(t, 7, "10.244.1.8", "10.244.5.5")       # a good change in the same sync
    with caplog.at_level(logging.WARNING, "kube_proxy"):
        result = p.sync(t.take())
    assert [str(q.name) for q in result.quarantined] == ["default/svc5:http"] and result.in_quarantine == 1
    assert result.refused >= 1 and p.synced
    assert "10.244.5.5:8080" in kernel.dnat_targets()      # the good change is in the kernel
    assert POISON + ":8080" not in kernel.dnat_targets()
    assert {c: kernel.nat()[c] for c in old_svc5} == old_svc5    # svc5 keeps what it had
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "quarantined service port default/svc5:http (TCP): the kernel refused its rules: " in text
    assert "RULE_APPEND failed (Invalid argument)" in text and "its previous rules stay" in text
    # the next sync is a plain partial one, svc5 stays out of it
    n = len(kernel.restores)
    set_endpoints(t, 9, "10.244.4.4")
    result = p.sync(t.take())
    assert not result.full and result.quarantined == () and result.in_quarantine == 1
    assert len(kernel.restores) == n + 1 and POISON not in kernel.restores[-1]
    assert "10.244.4.4:8080" in kernel.dnat_targets()
    # svc5 fixed: out of quarantine and programmed
    set_endpoints(t, 5, "10.244.3.3")
    result = p.sync(t.take())
    assert result.in_quarantine == 0 and "10.244.3.3:8080" in kernel.dnat_targets()
    assert not any(r.startswith("-A KUBE-SEP") and "10.244.1.6" in r for rs in kernel.nat().values() for r in rs)


def test_iptables_full_sync_with_a_refused_port_programs_everything_else():
    kernel = FakeTables()
    p = ipt_proxier(kernel)
    t = tracker(64, bad={17})
    result = p.sync(t.take())
    assert result.full and [q.name for q in result.quarantined] == [spn(17)]
    assert kernel.dnat_targets() == sorted("10.244.1.%d:8080" % (1 + i) for i in range(64) if i != 17)
    assert ipt.service_chain(spn(17)) not in kernel.nat()             # no fallback: nothing of it
    # the ruleset is exactly what a proxier writes for the state without svc17
    clean = FakeTables()
    t2 = tracker(64)
    t2.delete_service(("default", "svc17"))
    ipt_proxier(clean).sync(t2.take())
    for table in ("nat", "filter"):
        assert {c: sorted(r) for c, r in kernel.tables[table].items()} == \
            {c: sorted(r) for c, r in clean.tables[table].items()}, table


def test_iptables_restart_with_a_refused_port_never_takes_the_good_rules_away():
    """A restarted proxy (a full sync against the rules an earlier run left) with one Service
    now refused: the isolation only adds, so no good Service loses its rules meanwhile."""
    kernel = FakeTables()
    t = tracker(40)
    ipt_proxier(kernel).sync(t.take())
    good = {c: r for c, r in kernel.nat().items() if c.startswith("KUBE-SEP")}
    set_endpoints(t, 30, "10.244.1.31", POISON)
    set_endpoints(t, 3, "10.244.1.4", "10.244.6.6")
    kernel.restores = []
    p = ipt_proxier(kernel)                          # a new process: knows nothing
    seen = []
    real_restore = kernel.restore

    def watch(text):
        seen.append(dict((c, list(r)) for c, r in kernel.nat().items() if c in good))
        real_restore(text)

    p._restore = watch
    result = p.sync(t.take())
    assert [q.name for q in result.quarantined] == [spn(30)]
    # the refused full restore, then the trials (which only add), then the settling one
    assert all("-X " not in text and "-D " not in text for text in kernel.restores[1:-1])
    assert all(state == good for state in seen[1:])   # good Services kept their rules throughout
    assert "10.244.6.6:8080" in kernel.dnat_targets()


def test_iptables_a_port_refused_in_its_second_table_is_taken_back_from_the_first():
    """svc3 becomes a NodePort with an external IP and externalTrafficPolicy Local, all of its
    endpoints elsewhere: nat gets its KUBE-EXT chain and jumps, filter a DROP for the external
    IP, and filter is what the kernel refuses. Each trial is one transaction per table, so
    the nat half went in: the settling restore takes it out again."""
    kernel = FakeTables(poison=("172.30.9.9",), poison_table="filter")
    p = ipt_proxier(kernel)
    t = tracker(10)
    t.update_slice(k8s.endpoint_slice("svc3", [("10.244.1.4", "node2")], HTTP_EP))
    p.sync(t.take())
    before = {table: {c: sorted(r) for c, r in chains.items()} for table, chains in kernel.tables.items()}
    t.update_service(k8s.service("svc3", "10.96.0.4", [dict(HTTP, nodePort=30003)], type="NodePort",
                                 external_ips=["172.30.9.9"], external_traffic_policy="Local"))
    set_endpoints(t, 6, "10.244.5.6")
    result = p.sync(t.take())
    assert [q.name for q in result.quarantined] == [spn(3)]
    assert any("172.30.9.9" in text and text.startswith("*nat") for text in kernel.restores)    # it went in
    assert not any("172.30.9.9" in r or "30003" in r for rs in kernel.nat().values() for r in rs)  # and out
    assert ipt.external_chain(spn(3)) not in kernel.nat()
    after = {table: {c: sorted(r) for c, r in chains.items()} for table, chains in kernel.tables.items()}
    sep6 = {ipt.endpoint_chain(spn(6), Endpoint(ip, 8080)) for ip in ("10.244.1.7", "10.244.5.6")}
    strip = {table: {c: [r for r in rs if "svc6" not in r] for c, rs in chains.items() if c not in sep6
                     and c != ipt.service_chain(spn(6))} for table, chains in after.items()}
    strip_before = {table: {c: [r for r in rs if "svc6" not in r] for c, rs in chains.items() if c not in sep6
                            and c != ipt.service_chain(spn(6))} for table, chains in before.items()}
    assert strip == strip_before                                   # svc3 exactly as it was
    assert "10.244.5.6:8080" in kernel.dnat_targets()


def test_iptables_kernel_refusing_everything_fails_the_sync_and_blames_nobody():
    kernel = FakeTables()
    p = ipt_proxier(kernel)
    t = tracker(10)
    p.sync(t.take())
    kernel.everything = True
    set_endpoints(t, 2, "10.244.9.2")
    with pytest.raises(RuntimeError, match="RULE_APPEND"):
        p.sync(t.take())
    assert not p.synced and len(p.quarantine) == 0
    kernel.everything = False
    result = p.sync(t.take())                        # full, and fine again
    assert result.full and "10.244.9.2:8080" in kernel.dnat_targets()


def test_iptables_one_refused_port_among_1000_costs_a_few_restores():
    kernel = FakeTables()
    p = ipt_proxier(kernel)
    t = tracker(1000)
    p.sync(t.take())
    set_endpoints(t, 617, POISON)               # endpoints replaced, not added: 1,000 stay 1,000
    set_endpoints(t, 5, "10.244.7.7")           # (more would switch off the comments: a full sync)
    set_endpoints(t, 900, "10.244.7.8")
    n = len(kernel.restores)
    result = p.sync(t.take())
    assert not result.full or result.refused
    assert [q.name for q in result.quarantined] == [spn(617)]
    assert {"10.244.7.7:8080", "10.244.7.8:8080"} <= set(kernel.dnat_targets())
    assert len(kernel.restores) - n <= 8, len(kernel.restores) - n      # 3 suspects: a handful


def test_iptables_full_sync_isolation_over_1000_ports_costs_about_log2_restores():
    kernel = FakeTables()
    p = ipt_proxier(kernel)
    result = p.sync(tracker(1000, bad={617}).take())
    assert [q.name for q in result.quarantined] == [spn(617)]
    assert len(kernel.dnat_targets()) == 999
    # the refused restore, <= 2 per trial (one per table), the settling one
    assert len(kernel.restores) <= 2 + 2 * (1 + math.ceil(1.5 * math.log2(1000))), len(kernel.restores)


# ---- nftables mode ---------------------------------------------------------------------------------

class FakeNft:
    """nft -f and nft -c -f: refuses a transaction carrying `poison` (nothing of it is applied)."""

    def __init__(self, poison=(POISON,)):
        self.poison = list(poison)
        self.everything = False
        self.applied, self.checked, self.refusals = [], [], 0

    def _judge(self, text):
        if self.everything or any(p in text for p in self.poison):
            self.refusals += 1
            raise RuntimeError("nft -f failed: /dev/stdin:12:3-40: Error: Could not process rule: "
                               "Operation not supported")

    def apply(self, text):
        self._judge(text)
        self.applied.append(text)

    def check(self, text):
        assert nk.CHECK_TABLE in text and "table ip %s " % nk.TABLE not in text
        self._judge(text)
        self.checked.append(text)

    def list_text(self, *what):
        return ""

    def list_json(self, *what, terse=False):
        return []


def nft_proxier(fake):
    return nk.NftablesProxier(CONFIG, apply=fake.apply, list_json=fake.list_json, list_text=fake.list_text,
                              check=fake.check)


def test_nftables_partial_sync_quarantines_the_refused_port_and_programs_the_rest():
    fake = FakeNft()
    p = nft_proxier(fake)
    t = tracker(20)
    p.sync(t.take())
    set_endpoints(t, 5, "10.244.1.6", POISON)
    set_endpoints(t, 7, "10.244.1.8", "10.244.5.5")
    result = p.sync(t.take())
    assert [q.name for q in result.quarantined] == [spn(5)] and not result.full
    assert fake.checked == []                               # partial trials, nothing only checked
    assert any("dnat to 10.244.5.5:8080" in text for text in fake.applied)
    assert not any(POISON in text for text in fake.applied)
    # what the proxier believes the kernel holds is svc5's previous objects
    assert nk.endpoint_chain(spn(5), Endpoint(POISON, 8080)) not in p.ports[spn(5)].chains
    assert nk.endpoint_chain(spn(5), Endpoint("10.244.1.6", 8080)) in p.ports[spn(5)].chains
    n = len(fake.applied)
    set_endpoints(t, 9, "10.244.4.4")
    result = p.sync(t.take())
    assert not result.full and len(fake.applied) == n + 1 and result.in_quarantine == 1
    # a full sync later still writes svc5 as it was, and nothing refused
    p.synced = False
    result = p.sync(t.take())
    assert result.full and result.quarantined == () and POISON not in fake.applied[-1]
    assert nk.service_chain(spn(5)) in fake.applied[-1]


def test_nftables_full_sync_with_a_refused_port_programs_everything_else():
    fake = FakeNft()
    p = nft_proxier(fake)
    t = tracker(64, bad={40})
    result = p.sync(t.take())
    assert result.full and [q.name for q in result.quarantined] == [spn(40)]
    assert len(fake.checked) <= 2 + math.ceil(1.5 * math.log2(64)), len(fake.checked)
    final = fake.applied[-1]
    assert POISON not in final and nk.service_chain(spn(40)) not in final
    assert all(nk.service_chain(spn(i)) in final for i in range(64) if i != 40)
    # exactly the table a proxier writes for the state without svc40
    clean = FakeNft()
    t2 = tracker(64)
    t2.delete_service(("default", "svc40"))
    nft_proxier(clean).sync(t2.take())
    assert final == clean.applied[-1]


def test_nftables_kernel_refusing_everything_fails_the_sync_and_blames_nobody():
    fake = FakeNft()
    p = nft_proxier(fake)
    t = tracker(10)
    p.sync(t.take())
    fake.everything = True
    set_endpoints(t, 2, "10.244.9.2")
    with pytest.raises(RuntimeError, match="Operation not supported"):
        p.sync(t.take())
    assert not p.synced and len(p.quarantine) == 0
    fake.everything = False
    result = p.sync(t.take())
    assert result.full and "dnat to 10.244.9.2:8080" in fake.applied[-1]


def test_nftables_without_a_check_function_a_refused_full_sync_fails_as_before():
    fake = FakeNft()
    p = nk.NftablesProxier(CONFIG, apply=fake.apply, list_json=fake.list_json, list_text=fake.list_text)
    with pytest.raises(RuntimeError):
        p.sync(tracker(4, bad={1}).take())


def test_nftables_names_are_cut_to_kube_proxys_length():
    """Defect: an IPv6 endpoint of a Service whose namespace, name and port name are 63
    characters long made a 261-character chain name, which nft refuses ("name too long, 256
    characters maximum allowed"): every sync failed. kube-proxy cuts the base to 240."""
    name = ServicePortName("n" * 63, "s" * 63, "p" * 63, "SCTP")
    ep = Endpoint("fd00:1234:5678:9abc:def0:1234:5678:9abc", 65535)
    for chain in (nk.endpoint_chain(name, ep), nk.affinity_set(name, ep), nk.service_chain(name)):
        assert len(chain) <= 256, (len(chain), chain)
    assert nk.endpoint_chain(name, ep).endswith("...") and len(nk.endpoint_chain(name, ep)) == 9 + 240
    other = Endpoint("fd00:1234:5678:9abc:def0:1234:5678:9abd", 65535)
    assert nk.endpoint_chain(name, ep) != nk.endpoint_chain(name, other)       # the hash keeps them apart
    short = ServicePortName("ns1", "svc1", "p80", "TCP")
    assert nk.endpoint_chain(short, Endpoint("10.180.0.1", 80)) == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


# ---- reporting ---------------------------------------------------------------------------------------

def test_metrics_report_quarantined_ports_and_refused_restores():
    m = km.Metrics()
    sp = ServicePort(spn(1), "ClusterIP", "10.96.0.1", 80, "TCP")
    from kube_proxy.proxier import Quarantined
    q = Quarantined(spn(1), (sp, ()), (None, ()), "refused")
    m.synced(SyncResult(full=False, refused=3, quarantined=(q,), in_quarantine=1))
    m.synced(SyncResult(full=False, in_quarantine=1))
    text = m.render()
    assert "# TYPE podnet_sync_proxy_rules_quarantined_service_ports gauge" in text
    assert "podnet_sync_proxy_rules_quarantined_service_ports 1.0\n" in text
    assert "# TYPE podnet_sync_proxy_rules_service_port_quarantines_total counter" in text
    assert "podnet_sync_proxy_rules_service_port_quarantines_total 1.0\n" in text
    assert "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 3.0\n" in text


def test_the_sync_loop_logs_a_quarantine_and_goes_on(caplog):
    kernel = FakeTables()
    t = tracker(6, bad={2})
    srv = server.ProxyServer(ipt_proxier(kernel), t, lambda emit: None, km.Metrics())
    with caplog.at_level(logging.INFO, "kube_proxy"):
        result = srv.sync_once()
    assert result is not None and srv.syncs == 1
    assert "podnet_sync_proxy_rules_quarantined_service_ports 1.0\n" in srv.metrics.render()
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "1 service port quarantined (default/svc2:http (TCP))" in text, text


def test_isolation_result_defaults():
    assert Isolation().bad == [] and SyncResult(full=True).quarantined == ()


# ---- IPVS mode ------------------------------------------------------------------------------------------

def ipvs_kernel(poison_dest=None, poison_member=None):
    """test_kube_proxy_ipvs's fake kernel, refusing a real server (EINVAL over netlink) or an
    ipset member line (ipset restore exits 1 having applied nothing of it)."""
    import errno

    import test_kube_proxy_ipvs as fakes

    from kube_proxy import ipvs as kipvs

    class Ipvs(fakes.FakeIpvs):
        def add_dest(self, svc, dest):
            if dest.address == poison_dest:
                raise OSError(errno.EINVAL, "Invalid argument")
            super().add_dest(svc, dest)

    class Kernel(fakes.FakeKernel):
        def ipvs(self):
            return Ipvs(self)

        def ipset(self, args, text=""):
            if args[0] == "restore" and poison_member and poison_member in text:
                raise RuntimeError("ipset restore -exist failed: ipset v7.17: Syntax error: '%s' is invalid"
                                   % poison_member)
            return super().ipset(args, text)

    k = Kernel()
    p = kipvs.IpvsProxier(fakes.CONFIG, kernel=k, graceful_interval=None)
    p.setup()
    return p, k


def test_ipvs_refused_real_server_quarantines_its_port_and_programs_the_rest():
    p, k = ipvs_kernel(poison_dest=POISON)
    t = tracker(12)
    p.sync(t.take())
    set_endpoints(t, 5, "10.244.1.6", POISON)
    set_endpoints(t, 7, "10.244.1.8", "10.244.5.5")
    result = p.sync(t.take())
    assert [q.name for q in result.quarantined] == [spn(5)] and result.refused == 1 and p.synced
    assert k.servers()[("TCP", "10.96.0.8", 80)] == {("10.244.1.8", 8080): 1, ("10.244.5.5", 8080): 1}
    assert k.servers()[("TCP", "10.96.0.6", 80)] == {("10.244.1.6", 8080): 1}       # as it was
    set_endpoints(t, 9, "10.244.4.4")
    result = p.sync(t.take())
    assert not result.full and result.in_quarantine == 1
    assert ("10.244.4.4", 8080) in k.servers()[("TCP", "10.96.0.10", 80)]


def test_ipvs_refused_set_member_quarantines_its_port_and_programs_the_rest():
    from kube_proxy import ipvs as kipvs
    p, k = ipvs_kernel(poison_member="10.96.9.9,tcp:80")
    t = tracker(12)
    assert p.sync(t.take()).quarantined == ()
    t.update_service(k8s.service("svc3", "10.96.9.9", [HTTP]))      # moves onto a refused member
    set_endpoints(t, 7, "10.244.1.8", "10.244.5.5")
    result = p.sync(t.take())
    assert [q.name for q in result.quarantined] == [spn(3)]
    assert "10.96.0.4,tcp:80" in k.sets[kipvs.CLUSTER_IP] and "10.96.9.9,tcp:80" not in k.sets[kipvs.CLUSTER_IP]
    assert ("TCP", "10.96.0.4", 80) in k.servers() and ("TCP", "10.96.9.9", 80) not in k.servers()
    assert ("10.244.5.5", 8080) in k.servers()[("TCP", "10.96.0.8", 80)]
