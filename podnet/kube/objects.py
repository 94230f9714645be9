"""Checking Kubernetes objects as they arrive: fields, names, ports, addresses, labels, selectors.

Every consumer (kube-proxy, the Ingress controller, and the NetworkPolicy agent
and flanneld's Kubernetes subnet manager to come) reads the plain dicts of the
API's JSON shapes and must survive whatever a manifests directory or an old
object holds. The checks live here once, so a name is valid or not by the same
rule everywhere, and every rejection says where and why
("spec.ports[1].port: 70000 is not a port number (1-65535)").
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Mapping
    from typing import Any, TypeVar
    T = TypeVar("T")
    D = TypeVar("D")

PROTOCOLS = ("TCP", "UDP", "SCTP")

# Anchored with \Z, never `$`: `$` also matches before a trailing newline, so "web\n" would pass,
# and a newline in a name breaks every line-based format it reaches (iptables-restore input).
# `.match()` and `.search()` on these are whole-string matches.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")


class InvalidObject(ValueError):
    """An object that cannot be used; the message says where and why."""


def short(value: object) -> str:
    """repr(value), cut to 40 characters: what an error message quotes of bad input."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_KIND_WORDS = {"dict": "an object", "list": "a list", "str": "a string", "int": "an integer",
               "bool": "a boolean"}


def get_field(obj: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = dict,
              required: bool = False, default: Any = None) -> Any:
    """obj[key] checked to be of `kind` (`default` when absent and not required).

    `where` is the path of `obj` in its object ("spec.", "ports[0].") for the message."""
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidObject("%s%s: missing" % (where, key))
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidObject("%s%s: expected %s, got %s %s" % (where, key, _KIND_WORDS.get(names, names),
                                                              type(value).__name__, short(value)))
    return value


def is_dns_label(text: object) -> bool:
    """RFC 1123 label: namespaces, Service names."""
    return isinstance(text, str) and len(text) <= 63 and bool(DNS_LABEL.match(text))


def is_dns_subdomain(text: object) -> bool:
    """RFC 1123 subdomain: most object names."""
    return isinstance(text, str) and len(text) <= 253 and bool(DNS_SUBDOMAIN.match(text))


def is_port_name(text: object) -> bool:
    """An IANA service name, as named ports are: 1-15 of a-z, 0-9 and "-", at least one
    letter, no "--", not starting or ending with "-"."""
    return (isinstance(text, str) and len(text) <= 15 and bool(IANA_SVC_NAME.match(text))
            and "--" not in text and any("a" <= c <= "z" for c in text))


def port_number(value: object, where: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObject("%s: %s is not a port number" % (where, short(value)))
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise InvalidObject("%s: %d is not a port number (1-65535)" % (where, value))
    return value


def ip_address(value: object, where: str, family: int | None = None) -> str | None:
    """The address in its normal text form; None when it is not of `family` (4 or 6)."""
    if not isinstance(value, str):
        raise InvalidObject("%s: %s is not an IP address" % (where, short(value)))
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidObject("%s: %s is not an IP address" % (where, short(value))) from None
    if family is not None and addr.version != family:
        return None
    return str(addr)


def cidr(value: object, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise InvalidObject("%s: %s is not a CIDR" % (where, short(value)))
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise InvalidObject("%s: %s is not a CIDR" % (where, short(value))) from None


def protocol(value: object, where: str) -> str:
    """TCP, UDP or SCTP; unset means TCP, as the API defaults it."""
    if value is None:
        return "TCP"
    if value not in PROTOCOLS:
        raise InvalidObject("%s: %s is not a supported protocol (TCP, UDP, SCTP)" % (where, short(value)))
    return str(value)


def namespaced_metadata(obj: object, what: str) -> tuple[dict[str, Any], str, str]:
    """(metadata, namespace, name) of a namespaced object; the namespace defaults to "default"."""
    if not isinstance(obj, dict):
        raise InvalidObject("%s is not an object but %s" % (what, type(obj).__name__))
    meta = get_field(obj, "metadata", "", required=True)
    name = get_field(meta, "name", "metadata.", str, required=True)
    namespace = get_field(meta, "namespace", "metadata.", str, default="default")
    if not is_dns_label(namespace):
        raise InvalidObject("metadata.namespace: %s is not a valid namespace" % short(namespace))
    return meta, namespace, name


def object_key(obj: object) -> tuple[str, str] | None:
    """(namespace, name) of an object, ("default" when the namespace is unset); None if unusable."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    meta = obj["metadata"]
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return (namespace, name)


def parse_or_skip(what: str, parse: Callable[..., T], obj: object, args: tuple[Any, ...], default: D,
                  logger: logging.Logger) -> tuple[T | D, str | None]:
    """(parse(obj, *args), None), or (default, reason) for an object that cannot be used, the
    reason logged ("skipping Service shop/web: spec.ports[0].port: ..."). Any exception counts:
    a shape nobody foresaw still costs only this object, never the consumer's loop."""
    try:
        return parse(obj, *args), None
    except InvalidObject as e:
        reason = str(e)
    except Exception as e:
        reason = "unexpected %s: %s" % (type(e).__name__, e)
    key = object_key(obj)
    logger.warning("skipping %s %s: %s", what, "%s/%s" % key if key else "(unnamed)", reason)
    return default, reason


# ---- labels and label selectors ---------------------------------------------------------

def check_label_key(key: object, where: str) -> str:
    """A label key: an optional DNS-subdomain prefix and "/", then a name of up to 63
    characters of alphanumerics, "-", "_" and ".", starting and ending alphanumeric."""
    if not isinstance(key, str) or not key:
        raise InvalidObject("%s: %s is not a label key" % (where, short(key)))
    prefix, slash, name = key.rpartition("/")
    if slash and not is_dns_subdomain(prefix):
        raise InvalidObject("%s: %s: the prefix is not a DNS subdomain" % (where, short(key)))
    if len(name) > 63 or not _LABEL_NAME.match(name):
        raise InvalidObject("%s: %s is not a valid label name" % (where, short(key)))
    return key


def check_label_value(value: object, where: str) -> str:
    """A label value: empty, or up to 63 characters as a label name."""
    if not isinstance(value, str) or (value and (len(value) > 63 or not _LABEL_NAME.match(value))):
        raise InvalidObject("%s: %s is not a valid label value" % (where, short(value)))
    return value


def labels_of(obj: Mapping[str, Any], where: str = "metadata.") -> dict[str, str]:
    """metadata.labels, checked; {} when there are none."""
    meta = obj.get("metadata")
    labels = get_field(meta, "labels", where, dict, default={}) if isinstance(meta, dict) else {}
    for key, value in labels.items():
        check_label_key(key, "%slabels" % where)
        check_label_value(value, "%slabels[%s]" % (where, key))
    return dict(labels)


SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One matchExpressions entry (matchLabels entries become `In` with one value)."""
    key: str
    operator: str                   # In | NotIn | Exists | DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values     # NotIn


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """metav1.LabelSelector: every requirement must hold (AND). No requirements selects
    everything, as `{}` does in the API; `nothing` is the selector that selects nothing
    (a field that is absent where absence means "none", never `{}`)."""
    requirements: tuple[Requirement, ...] = ()
    nothing: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.nothing and all(r.matches(labels) for r in self.requirements)

    @property
    def everything(self) -> bool:
        return not self.nothing and not self.requirements

    def __str__(self) -> str:
        if self.nothing:
            return "<none>"
        parts = []
        for r in self.requirements:
            if r.operator in ("Exists", "DoesNotExist"):
                parts.append(("!" if r.operator == "DoesNotExist" else "") + r.key)
            elif r.operator == "In" and len(r.values) == 1:
                parts.append("%s=%s" % (r.key, next(iter(r.values))))
            else:
                parts.append("%s %s (%s)" % (r.key, r.operator.lower(), ",".join(sorted(r.values))))
        return ",".join(parts) or "<all>"


def parse_selector(value: object, where: str) -> LabelSelector:
    """A metav1.LabelSelector dict -> LabelSelector; InvalidObject says what is wrong.

    As the API validates it: In and NotIn need at least one value, Exists and
    DoesNotExist none; keys and values must be valid label keys and values."""
    if not isinstance(value, dict):
        raise InvalidObject("%s: expected an object, got %s" % (where, short(value)))
    reqs = []
    match_labels = get_field(value, "matchLabels", where + ".", dict, default={})
    for key in sorted(match_labels):
        check_label_key(key, "%s.matchLabels" % where)
        reqs.append(Requirement(key, "In", frozenset(
            [check_label_value(match_labels[key], "%s.matchLabels[%s]" % (where, key))])))
    for i, expr in enumerate(get_field(value, "matchExpressions", where + ".", list, default=[])):
        at = "%s.matchExpressions[%d]" % (where, i)
        if not isinstance(expr, dict):
            raise InvalidObject("%s: expected an object, got %s" % (at, short(expr)))
        key = check_label_key(get_field(expr, "key", at + ".", str, required=True), at + ".key")
        op = get_field(expr, "operator", at + ".", str, required=True)
        if op not in SELECTOR_OPERATORS:
            raise InvalidObject("%s.operator: %s is not In, NotIn, Exists or DoesNotExist" % (at, short(op)))
        values = get_field(expr, "values", at + ".", list, default=[])
        if op in ("In", "NotIn") and not values:
            raise InvalidObject("%s.values: %s needs at least one value" % (at, op))
        if op in ("Exists", "DoesNotExist") and values:
            raise InvalidObject("%s.values: %s takes no values" % (at, op))
        checked = frozenset(check_label_value(v, "%s.values[%d]" % (at, j)) for j, v in enumerate(values))
        reqs.append(Requirement(key, op, checked))
    return LabelSelector(tuple(reqs))
