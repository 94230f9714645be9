"""`podnet network-policy explain`: a model's Explanation (network_policy/model.py) for people
and as JSON, and the reference evaluator's verdict on one connection to the pod.

The text is the model's own account (`Explanation.lines()`: isolation per direction, each
policy selecting the pod, per rule its peers with the pods they match now and its ports
with named ones resolved), followed by the verdict when one was asked for. The JSON is
the same plain data, field for field: {"explanation": {...}, "verdict": {...} | null}.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any

TYPE_CHECKING = False
if TYPE_CHECKING:
    from network_policy.model import Explanation, Pod, PolicyModel, Verdict


@dataclasses.dataclass(frozen=True)
class Judged:
    """A verdict with the connection it is about, as the command line named it."""
    source: str             # as given: NAMESPACE/POD or an address
    src: str                # the address judged
    dst: str
    protocol: str
    port: int
    port_name: str | None
    verdict: Verdict


def _ip_family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def source_address(model: PolicyModel, source: str, family: int | None = None) -> str:
    """NAMESPACE/POD -> that pod's address (of `family` when it has one), or an address as it is;
    ValueError for a pod that does not exist or has no address, or text that is neither."""
    if "/" in source:
        namespace, _, name = source.partition("/")
        pod = model.pod(namespace, name)
        if pod is None:
            raise ValueError("no pod %s" % source)
        if not pod.ips:
            raise ValueError("pod %s has no address yet" % source)
        return next((ip for ip in pod.ips if family is None or _ip_family(ip) == family), pod.ips[0])
    try:
        return str(ipaddress.ip_address(source))
    except ValueError:
        raise ValueError("%r is neither NAMESPACE/POD nor an IP address" % source) from None


def resolve_port(pod: Pod, port: str, protocol: str) -> tuple[int, str | None]:
    """A port number, or a named port resolved on the destination pod: (number, name or None)."""
    if port.isdigit():
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError("%s is not a port number" % port)
        return number, None
    for named in pod.ports:
        if named.name == port and named.protocol == protocol:
            return named.port, port
    raise ValueError("pod %s has no %s port named %r" % (pod, protocol, port))


def judge(model: PolicyModel, source: str, pod: Pod, port: str, protocol: str) -> Judged:
    """The reference evaluator on a new connection from `source` to `pod` on port/protocol."""
    if not pod.ips:
        raise ValueError("pod %s has no address yet" % pod)
    first = source_address(model, source)
    dst = next((ip for ip in pod.ips if _ip_family(ip) == _ip_family(first)), None)
    if dst is None:
        raise ValueError("%s has no address of the family of %s" % (pod, first))
    number, name = resolve_port(pod, port, protocol)
    return Judged(source, first, dst, protocol, number, name, model.verdict(first, dst, protocol, number))


def verdict_lines(judged: Judged) -> list[str]:
    port = "%d" % judged.port if judged.port_name is None else "%s (%d)" % (judged.port_name, judged.port)
    v = judged.verdict
    out = ["verdict: %s -> %s %s/%s: %s" % (
        judged.source if judged.source == judged.src else "%s (%s)" % (judged.source, judged.src), judged.dst,
        judged.protocol, port, "ALLOWED" if v.allowed else "DENIED by %s" % v.denied_by)]
    out.append("  %s" % v.reason)
    for side, ref in (("egress", v.egress_by), ("ingress", v.ingress_by)):
        if ref is not None:
            out.append("  %s allowed by %s/%s, %s rule %d" % (side, ref[0], ref[1], ref[2], ref[3]))
    return out


def to_text(explanation: Explanation, judged: Judged | None = None) -> str:
    lines = explanation.lines()
    if judged is not None:
        lines += verdict_lines(judged)
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def to_dict(explanation: Explanation, judged: Judged | None = None) -> dict[str, Any]:
    out = {"explanation": _plain(explanation), "verdict": _plain(judged) if judged is not None else None}
    pod = out["explanation"].get("pod")
    if isinstance(pod, dict):       # labels as the API writes them
        pod["labels"] = dict(pod.get("labels") or ())
    return out


def to_json(explanation: Explanation, judged: Judged | None = None) -> str:
    return json.dumps(to_dict(explanation, judged), indent=2, sort_keys=True)
