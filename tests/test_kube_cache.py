"""podnet.kube.cache: the informer-style store every consumer keeps its objects in (no root)."""
from podnet.kube.cache import Change, ObjectCache, resource_key
from podnet.kube.events import ADDED, DELETED, MODIFIED, RELIST, Event


def svc(name, ns="default", **spec):
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def test_events_become_changes():
    cache = ObjectCache(["Service"])
    assert not cache.ready
    a = svc("a", port=1)
    assert cache.apply(Event(RELIST, "Service", [a])) == [Change("Service", ("default", "a"), None, a)]
    assert cache.ready
    assert cache.apply(Event(MODIFIED, "Service", a)) == []              # a repeat changes nothing
    a2 = svc("a", port=2)
    assert cache.apply(Event(MODIFIED, "Service", a2)) == [Change("Service", ("default", "a"), a, a2)]
    b = svc("b", "x")
    assert cache.apply(Event(ADDED, "Service", b)) == [Change("Service", ("x", "b"), None, b)]
    assert cache.apply(Event(DELETED, "Service", b)) == [Change("Service", ("x", "b"), b, None)]
    assert cache.apply(Event(DELETED, "Service", b)) == []
    assert dict(cache.items("Service")) == {("default", "a"): a2} and cache.count("Service") == 1


def test_relist_is_a_diff():
    cache = ObjectCache(["Service"])
    a, b, c = svc("a"), svc("b"), svc("c")
    cache.apply(Event(RELIST, "Service", [a, b]))
    b2 = svc("b", port=9)
    changes = cache.apply(Event(RELIST, "Service", [b2, c]))
    assert changes == [Change("Service", ("default", "a"), a, None), Change("Service", ("default", "b"), b, b2),
                       Change("Service", ("default", "c"), None, c)]
    assert sorted(k for k, _ in cache.items("Service")) == [("default", "b"), ("default", "c")]


def test_transform_keeps_what_the_consumer_makes_of_objects():
    seen = []

    def ports(kind, obj):
        seen.append(obj["metadata"]["name"])
        return tuple(obj["spec"].get("ports", ()))
    cache = ObjectCache(["Service"], ports)
    cache.apply(Event(ADDED, "Service", svc("a", ports=[80])))
    # a change of the object that leaves its transformed value alone is no change
    assert cache.apply(Event(MODIFIED, "Service", svc("a", ports=[80], other=1))) == []
    assert cache.get("Service", ("default", "a")) == (80,) and seen == ["a", "a"]


def test_nameless_objects_and_unknown_kinds_are_skipped(caplog):
    cache = ObjectCache(["Service"])
    assert cache.apply(Event(ADDED, "Service", {"metadata": {}})) == []
    assert cache.apply(Event(RELIST, "Service", [{"spec": {}}, svc("a")]))[0].key == ("default", "a")
    assert cache.apply(Event(ADDED, "Pod", svc("p"))) == []
    assert "without metadata.name" in caplog.text


def test_cluster_scoped_kinds_have_no_namespace():
    assert resource_key("IngressClass", {"metadata": {"name": "nginx"}}) == ("", "nginx")
    assert resource_key("Node", {"metadata": {"name": "n1"}}) == ("", "n1")
    assert resource_key("Pod", {"metadata": {"name": "p"}}) == ("default", "p")


def test_delete_by_key():
    cache = ObjectCache(["Service"])
    cache.apply(Event(ADDED, "Service", svc("a")))
    assert cache.delete("Service", ("default", "a")).new is None
    assert cache.delete("Service", ("default", "a")) is None
