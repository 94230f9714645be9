"""podnet.kube.objects: the checks every consumer of Kubernetes objects shares (no root)."""
import pytest

from podnet.kube.objects import (
    InvalidObject,
    LabelSelector,
    check_label_key,
    check_label_value,
    get_field,
    is_dns_label,
    is_dns_subdomain,
    is_port_name,
    labels_of,
    object_key,
    parse_selector,
    port_number,
)


def test_get_field_says_where_and_what():
    assert get_field({"a": {}}, "a", "spec.") == {}
    assert get_field({}, "a", "spec.", default=3) == 3
    with pytest.raises(InvalidObject, match=r"spec\.a: missing"):
        get_field({}, "a", "spec.", required=True)
    with pytest.raises(InvalidObject, match=r"spec\.port: expected an integer, got bool True"):
        get_field({"port": True}, "port", "spec.", int)


@pytest.mark.parametrize("name, label, subdomain", [
    ("web", True, True), ("a-b.c", False, True), ("-a", False, False), ("A", False, False),
    ("a" * 63, True, True), ("a" * 64, False, True), ("", False, False), (7, False, False),
])
def test_dns_names(name, label, subdomain):
    assert is_dns_label(name) is label
    assert is_dns_subdomain(name) is subdomain


@pytest.mark.parametrize("name, ok", [("http", True), ("h2c", True), ("a--b", False), ("123", False),
                                      ("-http", False), ("a" * 16, False), ("HTTP", False)])
def test_port_names_are_iana_service_names(name, ok):
    assert is_port_name(name) is ok


def test_port_numbers():
    assert port_number(80, "p") == 80
    assert port_number(0, "p", allow_zero=True) == 0
    for bad in (0, 65536, True, "80"):
        with pytest.raises(InvalidObject):
            port_number(bad, "p")


def test_object_key():
    assert object_key({"metadata": {"name": "a"}}) == ("default", "a")
    assert object_key({"metadata": {"name": "a", "namespace": "x"}}) == ("x", "a")
    assert object_key({"metadata": {}}) is None and object_key([]) is None


@pytest.mark.parametrize("key", ["app", "app.kubernetes.io/name", "a_b.c-d", "x" * 63])
def test_good_label_keys(key):
    assert check_label_key(key, "labels") == key


@pytest.mark.parametrize("key", ["", "-app", "app-", "a/b/c", "Bad_Prefix/x", "x" * 64, "p/", 3])
def test_bad_label_keys(key):
    with pytest.raises(InvalidObject):
        check_label_key(key, "labels")


def test_label_values():
    assert check_label_value("", "v") == "" and check_label_value("v1.2_x", "v") == "v1.2_x"
    for bad in ("-x", "x" * 64, 1, None):
        with pytest.raises(InvalidObject):
            check_label_value(bad, "v")


def test_labels_of():
    assert labels_of({"metadata": {"labels": {"app": "web"}}}) == {"app": "web"}
    assert labels_of({"metadata": {}}) == {}
    with pytest.raises(InvalidObject, match="labels"):
        labels_of({"metadata": {"labels": {"app": ["web"]}}})


def test_selector_semantics():
    sel = parse_selector({"matchLabels": {"app": "web"},
                          "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                               {"key": "env", "operator": "NotIn", "values": ["prod"]},
                                               {"key": "team", "operator": "Exists"},
                                               {"key": "legacy", "operator": "DoesNotExist"}]}, "spec.podSelector")
    assert sel.matches({"app": "web", "tier": "a", "team": "x"})
    assert sel.matches({"app": "web", "tier": "b", "team": "", "env": "dev"})
    assert not sel.matches({"app": "web", "tier": "a", "team": "x", "env": "prod"})
    assert not sel.matches({"app": "web", "tier": "c", "team": "x"})
    assert not sel.matches({"app": "web", "tier": "a"})
    assert not sel.matches({"app": "web", "tier": "a", "team": "x", "legacy": "1"})
    assert not sel.matches({"tier": "a", "team": "x"})
    assert str(sel) == "app=web,tier in (a,b),env notin (prod),team,!legacy"


def test_empty_selector_selects_everything_and_nothing_selects_nothing():
    assert parse_selector({}, "s").matches({}) and parse_selector({}, "s").everything
    assert not LabelSelector(nothing=True).matches({})


@pytest.mark.parametrize("selector, message", [
    ([], "expected an object"),
    ({"matchLabels": {"app": 1}}, "not a valid label value"),
    ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "needs at least one value"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "takes no values"),
    ({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}, "is not In, NotIn"),
    ({"matchExpressions": [{"operator": "Exists"}]}, "key: missing"),
    ({"matchExpressions": ["a"]}, r"matchExpressions\[0\]: expected an object"),
])
def test_bad_selectors_say_why(selector, message):
    with pytest.raises(InvalidObject, match=message):
        parse_selector(selector, "spec.podSelector")


# ---- issue 12: a name must match as a whole, not up to a trailing newline -----------------------

@pytest.mark.parametrize("name", ["web\n", "a.b\n", "web\nweb"])
def test_a_trailing_newline_is_not_a_dns_name(name):
    """`$` also matches before a final newline: "web\\n" passed, and broke iptables-restore input."""
    assert not is_dns_label(name) and not is_dns_subdomain(name)


def test_a_trailing_newline_is_not_a_port_name_label_key_or_label_value():
    assert not is_port_name("http\n")
    for bad in ("app\n", "example.com\n/app", "example.com/app\n"):
        with pytest.raises(InvalidObject):
            check_label_key(bad, "labels")
    with pytest.raises(InvalidObject):
        check_label_value("web\n", "v")
    with pytest.raises(InvalidObject):
        parse_selector({"matchLabels": {"app": "web\n"}}, "spec.selector")
