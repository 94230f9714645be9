"""Best-path selection, the Loc-RIB, import checks and Adj-RIB-Out rules
(iBGP split horizon, route reflection per RFC 4456, eBGP), all as pure data."""
from calico_lite.bgp.messages import AS_SEQUENCE, AS_SET, ORIGIN_EGP, ORIGIN_IGP, ORIGIN_INCOMPLETE, PathAttributes
from calico_lite.bgp.rib import (
    ExportPolicy,
    Rib,
    Route,
    Source,
    export_attributes,
    import_attributes,
    local_source,
    select_best,
)

LOCAL_AS, ROUTER_ID, CLUSTER_ID = 64512, "10.0.0.1", "10.0.0.1"
P = "10.65.1.0/26"


def ibgp(address, router_id=None, client=False):
    return Source(address, router_id or address, LOCAL_AS, ibgp=True, rr_client=client)


def ebgp(address, asn, router_id=None):
    return Source(address, router_id or address, asn, ibgp=False)


def route(source, prefix=P, **attrs):
    attrs.setdefault("next_hop", source.address or "192.0.2.254")
    return Route(prefix, PathAttributes(**attrs), source)


def path(*asns):
    return ((AS_SEQUENCE, tuple(asns)),) if asns else ()


# ---- the decision process --------------------------------------------------------------

def test_single_and_no_candidate():
    r = route(ibgp("192.0.2.2"))
    assert select_best([r]) is r
    assert select_best([]) is None


def test_local_pref_wins_first():
    low = route(ibgp("192.0.2.2"), local_pref=100)
    high = route(ibgp("192.0.2.3"), local_pref=200, as_path=path(1, 2, 3))
    assert select_best([low, high]) is high


def test_missing_local_pref_counts_as_100():
    none = route(ibgp("192.0.2.2"))
    lower = route(ibgp("192.0.2.3"), local_pref=90)
    assert select_best([lower, none]) is none


def test_shortest_as_path_with_as_set_counting_one():
    long = route(ebgp("192.0.2.2", 65001), as_path=path(65001, 65002, 65003))
    with_set = route(ebgp("192.0.2.3", 65001), as_path=((AS_SEQUENCE, (65001,)), (AS_SET, (1, 2, 3, 4))))
    assert select_best([long, with_set]) is with_set


def test_lowest_origin():
    inc = route(ibgp("192.0.2.2"), origin=ORIGIN_INCOMPLETE)
    egp = route(ibgp("192.0.2.3"), origin=ORIGIN_EGP)
    igp = route(ibgp("192.0.2.4"), origin=ORIGIN_IGP)
    assert select_best([inc, egp, igp]) is igp
    assert select_best([inc, egp]) is egp


def test_med_compared_only_within_the_same_neighbour_as():
    a_high = route(ebgp("192.0.2.2", 65001), as_path=path(65001), med=50)
    a_low = route(ebgp("192.0.2.3", 65001), as_path=path(65001), med=10)
    b_high = route(ebgp("192.0.2.1", 65002), as_path=path(65002), med=100)
    # a_high loses to a_low (same neighbour AS); b_high's larger MED is not compared with
    # theirs, so it survives and then wins on the lowest router id (192.0.2.1).
    assert select_best([a_high, a_low, b_high]) is b_high
    assert select_best([a_high, a_low]) is a_low
    missing = route(ebgp("192.0.2.9", 65001), as_path=path(65001))      # no MED = 0, the best
    assert select_best([a_low, missing]) is missing


def test_ebgp_over_ibgp():
    internal = route(ibgp("192.0.2.2"), as_path=path(65001))
    external = route(ebgp("192.0.2.9", 65001), as_path=path(65001))
    assert select_best([internal, external]) is external


def test_lowest_router_id_or_originator_id():
    a = route(ibgp("192.0.2.2", router_id="10.0.0.9"))
    b = route(ibgp("192.0.2.3", router_id="10.0.0.5"))
    assert select_best([a, b]) is b
    reflected = route(ibgp("192.0.2.4", router_id="10.0.0.2"), originator_id="10.0.0.7")
    assert select_best([b, reflected]) is b          # compared by ORIGINATOR_ID 10.0.0.7 > 10.0.0.5
    assert select_best([a, reflected]) is reflected


def test_numeric_not_textual_router_id_order():
    a = route(ibgp("192.0.2.2", router_id="10.0.0.10"))
    b = route(ibgp("192.0.2.3", router_id="10.0.0.9"))
    assert select_best([a, b]) is b


def test_shortest_cluster_list_then_lowest_peer_address():
    long = route(ibgp("192.0.2.2"), originator_id="10.0.0.7", cluster_list=("1.1.1.1", "2.2.2.2"))
    short = route(ibgp("192.0.2.3"), originator_id="10.0.0.7", cluster_list=("3.3.3.3",))
    assert select_best([long, short]) is short
    twin = route(ibgp("192.0.2.1"), originator_id="10.0.0.7", cluster_list=("4.4.4.4",))
    assert select_best([short, twin]) is twin


def test_our_own_route_wins():
    mine = Route(P, PathAttributes(next_hop=None), local_source(ROUTER_ID, LOCAL_AS))
    theirs = route(ibgp("192.0.2.2"), local_pref=500)
    assert select_best([theirs, mine]) is mine


# ---- Loc-RIB ------------------------------------------------------------------------------

def test_rib_changes_and_source_loss():
    rib = Rib()
    a, b = ibgp("192.0.2.2"), ibgp("192.0.2.3")
    ra = route(a, local_pref=100)
    change = rib.update(ra)
    assert (change.prefix, change.old, change.new) == (P, None, ra)
    rb = route(b, local_pref=200)
    assert rib.update(rb).new is rb
    assert rib.update(route(a, local_pref=100)) is None          # same route again: no change
    assert rib.adj_rib_in(a) == {P: ra}
    other = route(a, prefix="10.65.2.0/26")
    rib.update(other)
    changes = rib.remove_source(b)
    assert [(c.prefix, c.old, c.new) for c in changes] == [(P, rb, ra)]
    assert rib.best(P) == ra and len(rib) == 2
    assert rib.remove(b, P) is None
    changes = rib.remove_source(a)
    assert sorted((c.prefix, c.new) for c in changes) == [("10.65.1.0/26", None), ("10.65.2.0/26", None)]
    assert len(rib) == 0 and rib.sources() == [] and rib.best_routes() == {}


def test_sources_are_distinct_per_session():
    rib = Rib()
    old, new = ibgp("192.0.2.2"), ibgp("192.0.2.2")      # the same peer, reconnected
    rib.update(route(old))
    rib.update(route(new))
    rib.remove_source(old)
    assert rib.best(P).source is new


# ---- import ------------------------------------------------------------------------------

def test_import_drops_our_own_reflected_routes_and_cluster_loops():
    src = ibgp("192.0.2.2")
    attrs = PathAttributes(next_hop="192.0.2.9")
    assert import_attributes(attrs.replace(originator_id=ROUTER_ID), src, LOCAL_AS, ROUTER_ID, None) is None
    looped = attrs.replace(cluster_list=("9.9.9.9", CLUSTER_ID))
    assert import_attributes(looped, src, LOCAL_AS, ROUTER_ID, CLUSTER_ID) is None
    assert import_attributes(looped, src, LOCAL_AS, ROUTER_ID, None) == looped    # we do not reflect
    assert import_attributes(attrs, src, LOCAL_AS, ROUTER_ID, CLUSTER_ID) == attrs


def test_import_from_ebgp():
    src = ebgp("192.0.2.2", 65001)
    attrs = PathAttributes(as_path=path(65001), next_hop="192.0.2.2", local_pref=999, originator_id="1.2.3.4",
                           cluster_list=("1.1.1.1",))
    kept = import_attributes(attrs, src, LOCAL_AS, ROUTER_ID, None)
    assert kept.local_pref == 100 and kept.originator_id is None and kept.cluster_list == ()
    assert import_attributes(attrs.replace(as_path=path(65001, LOCAL_AS)), src, LOCAL_AS, ROUTER_ID, None) is None


# ---- Adj-RIB-Out ------------------------------------------------------------------------------

def policy(source, client=False, local="192.0.2.1", next_hop_self=None):
    return ExportPolicy(source, source.ibgp, client, source.remote_as, local, next_hop_self)


def export(r, to, **kw):
    return export_attributes(r, to, LOCAL_AS, ROUTER_ID, kw.get("cluster_id", CLUSTER_ID))


def test_split_horizon_without_clients():
    a, b = ibgp("192.0.2.2"), ibgp("192.0.2.3")
    assert export(route(a), policy(b)) is None


def test_reflection_from_a_client_goes_to_everyone():
    client, other_client, non_client = ibgp("192.0.2.2", client=True), ibgp("192.0.2.3", True), ibgp("192.0.2.4")
    r = route(client, local_pref=100)
    for target in (policy(other_client, client=True), policy(non_client)):
        out = export(r, target)
        assert out.next_hop == "192.0.2.2"              # unchanged on reflection
        assert out.originator_id == client.router_id and out.cluster_list == (CLUSTER_ID,)
        assert out.local_pref == 100
    assert export(r, policy(client, client=True)) is None        # never back to where it came from


def test_reflection_from_a_non_client_goes_to_clients_only():
    non_client, other_non_client, client = ibgp("192.0.2.4"), ibgp("192.0.2.5"), ibgp("192.0.2.2", client=True)
    r = route(non_client)
    assert export(r, policy(other_non_client)) is None
    out = export(r, policy(client, client=True))
    assert out.originator_id == "192.0.2.4" and out.cluster_list == (CLUSTER_ID,)


def test_reflection_keeps_an_existing_originator_and_prepends_the_cluster_id():
    client, target = ibgp("192.0.2.2", client=True), ibgp("192.0.2.3", client=True)
    r = route(client, originator_id="10.9.9.9", cluster_list=("10.8.8.8",))
    out = export(r, policy(target, client=True), cluster_id="10.7.7.7")
    assert out.originator_id == "10.9.9.9" and out.cluster_list == ("10.7.7.7", "10.8.8.8")
    # the cluster id defaults to the router id
    out = export_attributes(r, policy(target, client=True), LOCAL_AS, ROUTER_ID, None)
    assert out.cluster_list == (ROUTER_ID, "10.8.8.8")


def test_our_routes_towards_ibgp():
    mine = Route(P, PathAttributes(next_hop=None), local_source(ROUTER_ID, LOCAL_AS))
    peer = ibgp("192.0.2.2")
    out = export(mine, policy(peer, local="192.0.2.1"))
    assert out.next_hop == "192.0.2.1" and out.local_pref == 100 and out.as_path == ()
    assert out.originator_id is None and out.cluster_list == ()
    given = Route(P, PathAttributes(next_hop="192.0.2.77"), local_source(ROUTER_ID, LOCAL_AS))
    assert export(given, policy(peer)).next_hop == "192.0.2.77"
    assert export(given, policy(peer, next_hop_self=True)).next_hop == "192.0.2.1"


def test_ebgp_learned_routes_towards_ibgp_keep_the_next_hop_unless_next_hop_self():
    r = route(ebgp("198.51.100.1", 65001), as_path=path(65001), local_pref=100)
    peer = ibgp("192.0.2.2")
    assert export(r, policy(peer)).next_hop == "198.51.100.1"
    assert export(r, policy(peer, next_hop_self=True)).next_hop == "192.0.2.1"
    assert export(r, policy(peer)).as_path == path(65001)


def test_towards_ebgp():
    peer = ebgp("198.51.100.9", 65009)
    learned = route(ibgp("192.0.2.2"), as_path=path(65001), med=5, local_pref=300, originator_id="10.0.0.2",
                    cluster_list=("10.0.0.1",))
    out = export(learned, policy(peer, local="198.51.100.1"))
    assert out.as_path == path(LOCAL_AS, 65001) and out.next_hop == "198.51.100.1"
    assert out.local_pref is None and out.med is None                 # MED from another AS stays home
    assert out.originator_id is None and out.cluster_list == ()
    mine = Route(P, PathAttributes(next_hop=None, med=7), local_source(ROUTER_ID, LOCAL_AS))
    out = export(mine, policy(peer, local="198.51.100.1"))
    assert out.as_path == path(LOCAL_AS) and out.med == 7
    # not to an AS already on the path
    assert export(route(ebgp("198.51.100.7", 65001), as_path=path(65001, 65009)), policy(peer)) is None
    # a prepend onto an AS_SET starts a new sequence
    with_set = route(ebgp("198.51.100.7", 65001), as_path=((AS_SET, (1, 2)),))
    assert export(with_set, policy(peer)).as_path == ((AS_SEQUENCE, (LOCAL_AS,)), (AS_SET, (1, 2)))


def test_export_cache_key_groups_equal_peers():
    a = policy(ibgp("192.0.2.2", client=True), client=True)
    b = policy(ibgp("192.0.2.3", client=True), client=True)
    assert a.cache_key() == b.cache_key()
    assert a.cache_key() != policy(ibgp("192.0.2.4")).cache_key()
