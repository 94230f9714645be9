"""kube_proxy.tracker: accumulating changes, coalescing bursts, partial vs full syncs.

Pure: a fake clock drives time, no root, no I/O.
"""
import copy

from kube_proxy.model import ServicePortName
from kube_proxy.tracker import ChangeTracker
from podnet.kube.events import Event

WEB = ServicePortName("default", "web", "http", "TCP")
DNS = ServicePortName("kube-system", "dns", "dns", "UDP")


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def service(name="web", ns="default", port=80, pname="http", protocol="TCP", ip="10.96.0.10", **spec):
    spec.update(clusterIP=ip, ports=[{"name": pname, "port": port, "protocol": protocol}])
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def slice_(service_name="web", ns="default", name=None, ips=("10.244.1.2",), pname="http", protocol="TCP",
           ready=True, port=8080):
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name or service_name + "-1", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "ports": [{"name": pname, "port": port, "protocol": protocol}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips]}


def ready_tracker(clock=None, **kw):
    """A tracker after the initial lists: web + dns with endpoints, first (full) sync taken."""
    clock = clock or Clock()
    t = ChangeTracker(clock=clock, **kw)
    t.apply(Event("RELIST", "Service", [service(), service("dns", "kube-system", 53, "dns", "UDP", "10.96.0.53")]))
    t.apply(Event("RELIST", "EndpointSlice", [slice_(), slice_("dns", "kube-system", pname="dns", protocol="UDP",
                                                               ips=("10.244.2.2", "10.244.3.3"), port=53)]))
    first = t.take()
    assert first.full and first.reason == "first sync" and first.changed == {WEB, DNS}
    return t, clock


def test_no_sync_before_both_kinds_are_listed():
    clock = Clock()
    t = ChangeTracker(clock=clock)
    assert t.next_sync_at() is None and not t.due()
    t.apply(Event("RELIST", "Service", [service()]))
    assert not t.ready and not t.due()
    t.apply(Event("RELIST", "EndpointSlice", []))
    assert t.ready and t.due()
    sync = t.take()
    assert sync.full and list(sync.state.service_ports) == [WEB] and sync.state.endpoints_for(WEB) == ()


def test_first_sync_has_whole_state():
    t, _ = ready_tracker()
    state = t.take().state
    assert set(state.service_ports) == {WEB, DNS}
    assert [e.addr for e in state.endpoints_for(DNS)] == ["10.244.2.2:53", "10.244.3.3:53"]


def test_nothing_changed_nothing_due():
    t, clock = ready_tracker(full_sync_period=3600)
    clock.now += 10
    assert not t.due()
    assert t.next_sync_at() == 100.0 + 3600       # only the periodic full sync is ahead


def test_endpoint_change_marks_only_that_service_port():
    t, clock = ready_tracker(min_sync_period=1.0)
    clock.now += 5
    t.apply(Event("MODIFIED", "EndpointSlice", slice_(ips=("10.244.1.2", "10.244.1.9"))))
    assert t.due()
    sync = t.take()
    assert not sync.full and sync.changed == {WEB}
    assert [e.ip for e in sync.state.endpoints_for(WEB)] == ["10.244.1.2", "10.244.1.9"]
    old_port, old_eps = sync.previous[WEB]
    assert old_port == sync.state.service_ports[WEB] and [e.ip for e in old_eps] == ["10.244.1.2"]
    assert set(sync.state.service_ports) == {WEB, DNS}     # the full state is always there


def test_burst_coalesces_within_min_sync_period():
    t, clock = ready_tracker(min_sync_period=1.0)
    clock.now = 200.0
    t.apply(Event("MODIFIED", "EndpointSlice", slice_(ips=("10.244.1.3",))))
    assert t.due()                                   # first change after a quiet period: at once
    t.take()
    for i, step in enumerate((0.1, 0.2, 0.3)):
        clock.now += step
        t.apply(Event("MODIFIED", "EndpointSlice", slice_(ips=("10.244.1.%d" % (10 + i),))))
        assert not t.due()
        assert t.next_sync_at() == 201.0
    clock.now = 201.0
    assert t.due()
    sync = t.take()
    assert sync.changed == {WEB} and [e.ip for e in sync.state.endpoints_for(WEB)] == ["10.244.1.12"]


def test_change_undone_before_sync_is_no_change():
    t, clock = ready_tracker()
    clock.now += 5
    original = slice_()
    t.apply(Event("MODIFIED", "EndpointSlice", slice_(ips=("10.244.9.9",))))
    t.apply(Event("MODIFIED", "EndpointSlice", original))
    sync = t.take()
    assert sync.changed == frozenset() and sync.empty


def test_service_change_and_removal():
    t, clock = ready_tracker()
    clock.now += 5
    t.apply(Event("MODIFIED", "Service", service(port=81)))
    sync = t.take()
    assert sync.changed == {WEB} and sync.state.service_ports[WEB].port == 81
    clock.now += 5
    t.apply(Event("DELETED", "Service", service(port=81)))
    sync = t.take()
    assert sync.changed == {WEB} and WEB not in sync.state.service_ports
    assert WEB not in sync.state.endpoints                # endpoints only for existing ports
    assert sync.previous[WEB][0].port == 81


def test_renamed_port_is_two_changes():
    t, clock = ready_tracker()
    clock.now += 5
    t.apply(Event("MODIFIED", "Service", service(pname="web")))
    sync = t.take()
    renamed = ServicePortName("default", "web", "web", "TCP")
    assert sync.changed == {WEB, renamed}
    assert sync.state.endpoints_for(renamed) == ()         # the slice still says "http"


def test_endpoints_before_service_show_up_when_service_arrives():
    t, clock = ready_tracker()
    new = ServicePortName("default", "api", "http", "TCP")
    clock.now += 5
    t.apply(Event("ADDED", "EndpointSlice", slice_("api", ips=("10.244.5.5",))))
    sync = t.take()
    assert sync.changed == frozenset()                    # no Service yet: nothing to program
    clock.now += 5
    t.apply(Event("ADDED", "Service", service("api", ip="10.96.0.20")))
    sync = t.take()
    assert sync.changed == {new} and [e.ip for e in sync.state.endpoints_for(new)] == ["10.244.5.5"]


def test_several_slices_per_service_merge():
    t, clock = ready_tracker()
    clock.now += 5
    t.apply(Event("ADDED", "EndpointSlice", slice_(name="web-2", ips=("10.244.7.7",))))
    sync = t.take()
    assert [e.ip for e in sync.state.endpoints_for(WEB)] == ["10.244.1.2", "10.244.7.7"]
    clock.now += 5
    t.apply(Event("DELETED", "EndpointSlice", slice_()))
    sync = t.take()
    assert sync.changed == {WEB} and [e.ip for e in sync.state.endpoints_for(WEB)] == ["10.244.7.7"]


def test_slice_moving_to_another_service():
    t, clock = ready_tracker()
    clock.now += 5
    t.apply(Event("ADDED", "Service", service("api", ip="10.96.0.20")))
    t.take()
    clock.now += 5
    moved = slice_()
    moved["metadata"]["labels"]["kubernetes.io/service-name"] = "api"
    t.apply(Event("MODIFIED", "EndpointSlice", moved))
    sync = t.take()
    api = ServicePortName("default", "api", "http", "TCP")
    assert sync.changed == {WEB, api}
    assert sync.state.endpoints_for(WEB) == () and sync.state.endpoints_for(api)[0].ip == "10.244.1.2"


def test_relist_deletes_what_is_gone_and_changes_nothing_else():
    t, clock = ready_tracker()
    clock.now += 5
    t.apply(Event("RELIST", "Service", [service()]))        # dns is gone
    t.apply(Event("RELIST", "EndpointSlice", [slice_(), slice_("dns", "kube-system", pname="dns",
                                                               protocol="UDP", ips=("10.244.2.2", "10.244.3.3"),
                                                               port=53)]))
    sync = t.take()
    assert sync.changed == {DNS} and DNS not in sync.state.service_ports
    assert t.service_count() == 1 and t.slice_count() == 2


def test_bad_update_removes_the_service_others_keep_working(caplog):
    t, clock = ready_tracker()
    clock.now += 5
    bad = service(port=99999)
    t.apply(Event("MODIFIED", "Service", bad))
    sync = t.take()
    assert sync.changed == {WEB} and WEB not in sync.state.service_ports and DNS in sync.state.service_ports
    assert "skipping Service default/web: spec.ports[0].port: 99999 is not a port number" in caplog.text
    t.apply(Event("MODIFIED", "Service", {"metadata": {}}))   # no name at all: logged, ignored
    t.apply(Event("MODIFIED", "EndpointSlice", "garbage"))
    t.apply(Event("MODIFIED", "ConfigMap", {}))
    t.apply(Event("BOGUS", "Service", {}))
    assert t.take().changed == frozenset()


def test_periodic_full_sync():
    t, clock = ready_tracker(full_sync_period=60, min_sync_period=1)
    clock.now += 59
    assert not t.due()
    clock.now += 1
    assert t.due()
    sync = t.take()
    assert sync.full and sync.reason == "periodic full sync" and not sync.empty and sync.changed == frozenset()
    assert t.next_sync_at() == clock.now + 60


def test_failed_sync_makes_next_one_full():
    t, clock = ready_tracker(min_sync_period=2)
    clock.now += 0.5
    t.sync_failed()
    assert t.next_sync_at() == 104.0                      # 2 x min_sync_period after the sync taken at 100
    clock.now = 104.0
    sync = t.take()
    assert sync.full and sync.reason == "previous sync failed"
    assert not t.take().full


def _failing_syncs(t, clock, n):
    """n syncs in a row that fail, each retried when due: the waits between them."""
    waits = []
    for i in range(n):
        t.sync_failed()                                   # the sync taken at clock.now failed
        when = t.next_sync_at()
        t.update_service(service("other%d" % i, ip="10.96.1.%d" % (i + 1)))
        assert t.next_sync_at() == when and not t.due(when - 0.01)   # changes wait for the retry too
        waits.append(when - clock.now)
        clock.now = when
        sync = t.take()
        assert sync.full and sync.reason == "previous sync failed"
    return waits


def test_a_failed_sync_is_retried_after_the_retry_period():
    """A failing kernel is not hammered with a full sync every --min-sync-period: consecutive
    failures back off exponentially (2, 4, 8 ... x --min-sync-period) up to --iptables-sync-period
    (kube-proxy's SyncPeriod); changes arriving meanwhile wait for the retry too; a sync that
    works brings back --min-sync-period, and the next failure starts from the bottom again."""
    t, clock = ready_tracker(min_sync_period=1, retry_period=30)
    assert _failing_syncs(t, clock, 7) == [2, 4, 8, 16, 30, 30, 30]
    t.update_service(service("third", ip="10.96.0.12"))   # the last retry worked (no sync_failed)
    assert t.next_sync_at() == clock.now + 1              # back to --min-sync-period
    clock.now += 1
    t.take()
    assert _failing_syncs(t, clock, 2) == [2, 4]          # the count started again


def test_the_backoff_is_capped_at_30_seconds_by_default():
    t, clock = ready_tracker(min_sync_period=3)
    assert _failing_syncs(t, clock, 5) == [6, 12, 24, 30, 30]
    t, clock = ready_tracker(min_sync_period=0)           # no --min-sync-period: from 1 s
    assert _failing_syncs(t, clock, 7) == [2, 4, 8, 16, 30, 30, 30]


def test_ipv6_tracker_ignores_ipv4_objects():
    clock = Clock()
    t = ChangeTracker(family=6, clock=clock)
    t.apply(Event("RELIST", "Service", [service(), service("v6", ip="fd00::10")]))
    t.apply(Event("RELIST", "EndpointSlice", [slice_()]))
    sync = t.take()
    assert [str(k) for k in sync.state.service_ports] == ["default/v6:http"]


def test_local_endpoints_use_hostname():
    clock = Clock()
    t = ChangeTracker(hostname="node-a", clock=clock)
    s = slice_()
    s["endpoints"][0]["nodeName"] = "node-a"
    t.apply(Event("RELIST", "Service", [service()]))
    t.apply(Event("RELIST", "EndpointSlice", [s, ]))
    assert t.take().state.endpoints_for(WEB)[0].is_local


def test_scale_ten_thousand_services_one_change_is_cheap():
    import time
    clock = Clock()
    t = ChangeTracker(clock=clock)
    services = [service("s%d" % i, ip="10.96.%d.%d" % (i >> 8, i & 255)) for i in range(10000)]
    slices = [slice_("s%d" % i, ips=["10.244.%d.%d" % (j >> 8, j & 255) for j in range(i * 5 % 60000, i * 5 % 60000 + 5)])
              for i in range(10000)]
    t.apply(Event("RELIST", "Service", services))
    t.apply(Event("RELIST", "EndpointSlice", slices))
    assert len(t.take().changed) == 10000
    clock.now += 10
    changed = copy.deepcopy(slices[1234])
    changed["endpoints"].pop()
    start = time.perf_counter()
    t.apply(Event("MODIFIED", "EndpointSlice", changed))
    sync = t.take()
    took = time.perf_counter() - start
    assert sync.changed == {ServicePortName("default", "s1234", "http", "TCP")}
    assert took < 0.1, took
