"""Result types and conversion between CNI spec versions.

Internally a result is always held in the newest shape (1.1.0): a dict with
`interfaces`, `ips` (each with an `interface` index into `interfaces`),
`routes` and `dns`. `to_version` renders it for the version the caller's
config asked for; `from_version` reads a result (for example a prevResult)
of any supported version into the internal shape.
"""
from __future__ import annotations

from cni.errors import DECODING_FAILURE, INCOMPATIBLE_VERSION, CNIError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    # A result in the internal (1.1.0) shape, or rendered for some version: a JSON object.
    Result = dict[str, Any]

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"

# Fields added to results by spec 1.1.0, dropped when rendering older versions.
_IFACE_11 = ("mtu", "socketPath", "pciID")
_ROUTE_11 = ("mtu", "advmss", "priority", "table", "scope")


def version_tuple(version: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in version.split("."))
    except (AttributeError, ValueError):
        raise CNIError(INCOMPATIBLE_VERSION, "invalid version %r" % (version,)) from None
    if len(parts) != 3:
        raise CNIError(INCOMPATIBLE_VERSION, "invalid version %r" % (version,))
    return parts


def check_supported(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            'incompatible CNI versions; config is "%s", plugin supports [%s]'
            % (version, " ".join('"%s"' % v for v in SUPPORTED_VERSIONS)),
        )


def empty_result() -> Result:
    return {"interfaces": [], "ips": [], "routes": [], "dns": {}}


def from_version(raw: object, version: str) -> Result:
    """Read a result dict of spec `version` into the internal (1.1.0) shape."""
    if not isinstance(raw, dict):
        raise CNIError(DECODING_FAILURE, "result is not a JSON object")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION, "unsupported CNI result version %r" % (version,))
    out = empty_result()
    if version_tuple(version) < (0, 3, 0):
        for key in ("ip4", "ip6"):
            block = raw.get(key)
            if not block:
                continue
            if not isinstance(block, dict) or not isinstance(block.get("ip"), str):
                raise CNIError(DECODING_FAILURE, "result %s has no ip" % key)
            ip = {"address": _cidr(block["ip"], "%s ip" % key)}
            if block.get("gateway"):
                ip["gateway"] = _ip(block["gateway"], "%s gateway" % key)
            out["ips"].append(ip)
            out["routes"].extend(_routes(block.get("routes")))
    else:
        out["interfaces"] = [_interface(i) for i in _list(raw.get("interfaces"), "interfaces")]
        for ip in _list(raw.get("ips"), "ips"):
            if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
                raise CNIError(DECODING_FAILURE, "result ips entry has no address")
            ip = dict(ip)
            ip.pop("version", None)
            _cidr(ip["address"], "ips address")
            index = ip.get("interface")
            if index is not None and not _is_int(index):
                raise CNIError(DECODING_FAILURE, "result ips interface is not an index")
            if ip.get("gateway"):
                _ip(ip["gateway"], "ips gateway")
            elif ip.get("gateway") is not None:
                _str(ip["gateway"], "ips gateway")     # "" is no gateway, as Go's net.IP
            out["ips"].append(ip)
        out["routes"] = _routes(raw.get("routes"))
    out["dns"] = _dns(raw.get("dns"))
    return out


# Go's typed decoding (types100.Result) refuses these with another JSON type; so do we.
_IFACE_STRINGS = ("name", "mac", "sandbox", "socketPath", "pciID")
_ROUTE_INTS = ("mtu", "advmss", "priority", "table", "scope")
_DNS_LISTS = ("nameservers", "search", "options")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _interface(value: object) -> dict[str, Any]:
    iface = _dict(value, "interfaces")
    for key in _IFACE_STRINGS:
        if iface.get(key) is not None:
            _str(iface[key], "interface %s" % key)
    if iface.get("mtu") is not None and not _is_int(iface["mtu"]):
        raise CNIError(DECODING_FAILURE, "result interface mtu is not a number")
    return iface


def _cidr(value: object, what: str) -> str:
    from podnet.net.ip import parse_cidr
    text = _str(value, what)
    try:
        parse_cidr(text)
    except ValueError:
        raise CNIError(DECODING_FAILURE, "result %s %r is not an address with a prefix length"
                       % (what, text)) from None
    return text


def _ip(value: object, what: str) -> str:
    from podnet.net.ip import parse_ip
    text = _str(value, what)
    try:
        parse_ip(text)
    except ValueError:
        raise CNIError(DECODING_FAILURE, "result %s %r is not an IP address" % (what, text)) from None
    return text


def _dns(value: object) -> dict[str, Any]:
    dns = value or {}
    if not isinstance(dns, dict):
        raise CNIError(DECODING_FAILURE, "result dns is not an object")
    for key in _DNS_LISTS:
        items = dns.get(key)
        if items is not None and (not isinstance(items, list) or not all(isinstance(i, str) for i in items)):
            raise CNIError(DECODING_FAILURE, "result dns %s is not a list of strings" % key)
    if dns.get("domain") is not None:
        _str(dns["domain"], "dns domain")
    return dict(dns)


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CNIError(DECODING_FAILURE, "result %s entry is not an object" % what)
    return dict(value)


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise CNIError(DECODING_FAILURE, "result %s is not a string" % what)
    return value


def _routes(value: object) -> list[dict[str, Any]]:
    routes = [_dict(r, "routes") for r in _list(value, "routes")]
    for r in routes:
        _cidr(r.get("dst"), "route dst")
        if r.get("gw"):
            _ip(r["gw"], "route gw")
        elif r.get("gw") is not None:
            _str(r["gw"], "route gw")          # "" is no gateway, as Go's net.IP
        for key in _ROUTE_INTS:
            if r.get(key) is not None and not _is_int(r[key]):
                raise CNIError(DECODING_FAILURE, "result route %s is not a number" % key)
    return routes


def _list(value: object, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CNIError(DECODING_FAILURE, "result %s is not a list" % what)
    return value


def to_version(result: Mapping[str, Any], version: str) -> Result:
    """Render an internal result for spec `version` (what gets printed)."""
    vt = version_tuple(version)
    if vt < (0, 3, 0):
        return _to_020(result, version)
    out: Result = {"cniVersion": version}
    old = vt < (1, 1, 0)
    ifaces = []
    for iface in result.get("interfaces") or []:
        iface = {k: v for k, v in iface.items() if v not in (None, "", 0)}
        if old:
            for k in _IFACE_11:
                iface.pop(k, None)
        ifaces.append(iface)
    if ifaces:
        out["interfaces"] = ifaces
    ips = []
    for ip in result.get("ips") or []:
        entry: dict[str, Any] = {}
        if vt < (1, 0, 0):
            entry["version"] = "6" if ":" in ip["address"] else "4"
        if ip.get("interface") is not None:
            entry["interface"] = ip["interface"]
        entry["address"] = ip["address"]
        if ip.get("gateway"):
            entry["gateway"] = ip["gateway"]
        ips.append(entry)
    if ips:
        out["ips"] = ips
    routes = []
    for route in result.get("routes") or []:
        route = {k: v for k, v in route.items() if v not in (None, "")}
        if old:
            for k in _ROUTE_11:
                route.pop(k, None)
        routes.append(route)
    if routes:
        out["routes"] = routes
    out["dns"] = dict(result.get("dns") or {})
    return out


def _to_020(result: Mapping[str, Any], version: str) -> Result:
    out: Result = {"cniVersion": version}
    for ip in result.get("ips") or []:
        key = "ip6" if ":" in ip["address"] else "ip4"
        if key in out:
            raise CNIError(INCOMPATIBLE_VERSION,
                           "cannot convert: spec %s allows one address per family" % version)
        block = {"ip": ip["address"]}
        if ip.get("gateway"):
            block["gateway"] = ip["gateway"]
        out[key] = block
    for route in result.get("routes") or []:
        key = "ip6" if ":" in route.get("dst", "") else "ip4"
        if key in out:
            r = {"dst": route["dst"]}
            if route.get("gw"):
                r["gw"] = route["gw"]
            out[key].setdefault("routes", []).append(r)
    out["dns"] = dict(result.get("dns") or {})
    return out
