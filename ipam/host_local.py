"""The host-local IPAM plugin: addresses from configured ranges, kept in files.

A drop-in for the reference host-local (containernetworking/plugins 1.1.1):
same config, same store layout (ipam.store), same results. Differences, all
deliberate:
  * ADD is idempotent: a (containerID, ifname) that already holds an address
    in a range set gets that address again instead of a "duplicate
    allocation" error, so a retried ADD cannot leak or fail;
  * errors carry spec codes (INVALID_NETCONF, NO_ADDRESSES, ...) rather than
    999 for everything; a CHECK that finds no address for the container is 104
    (errors.NOT_AS_ADDED), where the reference says 999;
  * unknown CNI_ARGS keys are ignored (the reference fails unless
    IgnoreUnknown=1 is among them), and IP= takes a comma-separated list;
  * DEL, CHECK and GC never create the store directory, and only ADD reads
    requested addresses, so a bad IP= cannot block a DEL;
  * a gateway outside its subnet is rejected (1.1.1 accepts it; later
    releases reject it too), and the network and IPv4 broadcast addresses
    are never handed out, even from an explicit rangeStart/rangeEnd that
    includes them (1.1.1 would allocate them);
  * ADD (and STATUS) refuse a range reaching into link-local (fe80::/10,
    169.254.0.0/16), multicast, loopback or IPv4-mapped IPv6 addresses,
    code 7 (1.1.1 hands out all but the last); DEL, CHECK and GC accept
    them, so what was allocated there can still be released;
  * dataDir and resolvConf of another type than string (false, 0, [], {})
    are code 7, not "unset"; a NUL in them, or a string anywhere in ipam that
    is not Unicode text (a lone surrogate), is code 7 too; route fields
    mtu/advmss/priority/table/scope must be integers;
  * the store survives kill -9 at any point (ipam.store: atomic reservations,
    crash leftovers reclaimed);
  * GC and STATUS (spec 1.1.0) exist; STATUS fails with 50 when a range set
    has no address left, as the spec asks.

The bridge plugin runs this in-process through cni.invoke, so the command
functions return the internal result or raise CNIError; main() is the
executable's entry point.
"""
from __future__ import annotations

import os

from cni import errors
from cni.errors import CNIError
from cni.fastjson import unencodable
from cni.skel import run_plugin
from cni.types import empty_result
from ipam.allocator import ip_string, json_kind, parse_addr, parse_range_sets
from ipam.store import Store
from podnet.net.ip import AF_INET, AF_INET6, parse_cidr, parse_ip

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cni.skel import Commands

ABOUT = "CNI host-local IPAM plugin (podnet)"

# Route fields besides dst/gw that spec 1.1.0 results may carry; passed through.
_ROUTE_EXTRA = ("mtu", "advmss", "priority", "table", "scope")


class IPAMConfig:
    """What host-local needs from a network config."""

    __slots__ = ("name", "data_dir", "range_sets", "routes", "resolv_conf", "requested")

    def __init__(self, name, data_dir, range_sets, routes, resolv_conf, requested):
        self.name = name
        self.data_dir = data_dir
        self.range_sets = range_sets
        self.routes = routes
        self.resolv_conf = resolv_conf
        self.requested = requested


def load_config(args, with_requested=True, for_allocation=False):
    """Parse and validate args.conf["ipam"] (and requested IPs if asked).

    for_allocation (ADD, STATUS) also refuses ranges no pod can be given an
    address from (ipam.allocator); DEL, CHECK and GC take them, so that what
    an older version allocated there can still be released.
    """
    conf = args.conf
    ipam = conf.get("ipam")
    if ipam is None:
        raise _invalid("IPAM config missing 'ipam' key")
    if not isinstance(ipam, dict):
        raise _invalid("ipam must be an object")
    runtime = conf.get("runtimeConfig")
    if runtime is None:
        runtime = {}
    elif not isinstance(runtime, dict):
        raise _invalid("runtimeConfig must be an object")
    conf_args = conf.get("args")
    cni_block = conf_args.get("cni") if isinstance(conf_args, dict) else None
    # Everything host-local reads, and may quote back in a result or an error,
    # must be text that can be printed (JSON can carry lone surrogates).
    _check_text(ipam, "ipam")
    _check_text(runtime.get("ipRanges"), "runtimeConfig.ipRanges")
    _check_text(runtime.get("ips"), "runtimeConfig.ips")
    if isinstance(cni_block, dict):
        _check_text(cni_block.get("ips"), "args.cni.ips")
    data_dir = _path(ipam, "dataDir")
    resolv_conf = _path(ipam, "resolvConf")
    requested = _requested_ips(args, runtime, cni_block) if with_requested else []
    range_sets = parse_range_sets(ipam, runtime.get("ipRanges"), args.version, for_allocation)
    routes = _routes(ipam.get("routes"))
    return IPAMConfig(conf.get("name"), data_dir, range_sets, routes, resolv_conf, requested)


def _path(ipam, key):
    """ipam[key] as a path, or None for the default: null, missing and "" mean unset
    (as in the reference, where they all leave Go's string empty); any other
    type is invalid, not "unset"."""
    value = ipam.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _invalid("ipam.%s must be a string, not %s" % (key, json_kind(value)))
    if "\0" in value:
        raise _invalid("ipam.%s holds a NUL character: %s" % (key, ascii(value)))
    return value


def _check_text(obj, where):
    """CNIError(INVALID_NETCONF) naming the first string in `obj` (keys included)
    that is not Unicode text (a lone surrogate: neither a file name nor an answer can hold it)."""
    bad = unencodable(obj, where)
    if bad is not None:
        raise _invalid("%s is not valid Unicode text (a lone surrogate): %s" % (ascii(bad[0])[1:-1], ascii(bad[1])))


def _requested_ips(args, runtime, cni_block):
    """Addresses asked for: CNI_ARGS IP=, args.cni.ips, runtimeConfig.ips (capability "ips")."""
    out = []
    value = args.cni_args().get("IP")
    if value:
        for text in value.split(","):
            try:
                out.append(parse_addr(text.strip()))
            except ValueError as e:
                raise CNIError(errors.INVALID_ENV,
                               'ARGS: error parsing value of pair "IP=%s": %s' % (value, e)) from None
    from_args = cni_block.get("ips") if isinstance(cni_block, dict) else None
    for where, items in (("args.cni.ips", from_args), ("runtimeConfig.ips", runtime.get("ips"))):
        if items is None:
            continue
        if not isinstance(items, list):
            raise _invalid("%s must be a list of addresses" % where)
        for text in items:
            # Either "10.1.0.5" or "10.1.0.5/24"; the prefix length is not used.
            addr = text.partition("/")[0] if isinstance(text, str) else text
            try:
                out.append(parse_addr(addr))
            except ValueError as e:
                raise _invalid("cannot understand ip: %s" % e) from None
    unique = []
    for ip in out:
        if ip not in unique:
            unique.append(ip)
    return unique


def _routes(routes):
    if routes is None:
        return []
    if not isinstance(routes, list):
        raise _invalid("ipam.routes must be a list")
    out = []
    for route in routes:
        if not isinstance(route, dict):
            raise _invalid("ipam.routes entries must be objects")
        dst = route.get("dst")
        try:
            net = parse_cidr(dst)
            entry = {"dst": "%s/%d" % (ip_string(net.ip), net.prefixlen)}
        except ValueError:
            raise _invalid("invalid CIDR address: %s" % (dst,)) from None
        gw = route.get("gw")
        if gw is not None and gw != "":
            if not isinstance(gw, str):
                raise _invalid("ipam.routes: gw must be a string, not %s" % json_kind(gw))
            try:
                entry["gw"] = ip_string(parse_addr(gw))
            except ValueError as e:
                raise _invalid(str(e)) from None
        for key in _ROUTE_EXTRA:
            value = route.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):   # spec 1.1.0: integers
                raise _invalid("ipam.routes: %s must be an integer, not %s" % (key, json_kind(value)))
            entry[key] = value
        out.append(entry)
    return out


def read_resolv_conf(path):
    """The DNS block of a result from a resolv.conf file (as the reference parses it)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        raise CNIError(errors.IO_FAILURE, "open %s: %s" % (path, e.strerror or e)) from None
    nameservers, search, options, domain = [], [], [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        key = fields[0]
        if key == "nameserver":
            nameservers.append(fields[1])
        elif key == "domain":
            domain = fields[1]
        elif key == "search":
            search.extend(fields[1:])
        elif key == "options":
            options.extend(fields[1:])
    dns = {}
    if nameservers:
        dns["nameservers"] = nameservers
    if domain:
        dns["domain"] = domain
    if search:
        dns["search"] = search
    if options:
        dns["options"] = options
    return dns


# -- commands ---------------------------------------------------------------

def cmd_add(args):
    conf = load_config(args, for_allocation=True)
    dns = read_resolv_conf(conf.resolv_conf) if conf.resolv_conf else {}
    store = Store(conf.name, conf.data_dir)
    try:
        with store:
            ips = allocate(store, conf.range_sets, conf.requested, args.container_id, args.ifname)
    except OSError as e:
        raise _io_error(e) from None
    result = empty_result()
    result["ips"] = ips
    result["routes"] = [dict(r) for r in conf.routes]
    result["dns"] = dns
    return result


def allocate(store, range_sets, requested, container_id, ifname):
    """One address per range set for (container_id, ifname); the caller holds the lock.

    Returns the result "ips" entries. On any failure, the addresses this call
    reserved are released again before the error propagates.
    """
    allocations = store.allocations()
    used = {AF_INET: set(), AF_INET6: set()}
    for a in allocations:
        used[a.ip.family].add(a.ip.value)
    held = sorted((a.ip for a in store.find(container_id, ifname, allocations)),
                  key=lambda ip: (ip.family, ip.value))
    pending = list(requested)
    made = []
    out = []
    try:
        for idx, rs in enumerate(range_sets):
            want = None
            for ip in pending:
                if rs.contains(ip):
                    want = ip
                    pending.remove(ip)
                    break
            try:
                r, ip, new = _allocate_from(store, idx, rs, want, held, used[rs.family],
                                            container_id, ifname)
            except CNIError as e:
                raise CNIError(e.code, "failed to allocate for range %d: %s" % (idx, e.msg),
                               e.details) from None
            if new:
                made.append(ip)
                # After the address file: a failure here releases it with the rest.
                store.set_last_reserved(idx, ip)
            entry = {"address": "%s/%d" % (ip_string(ip), r.subnet.prefixlen),
                     "gateway": ip_string(r.gateway)}
            out.append(entry)
        if pending:
            raise CNIError(errors.INVALID_NETCONF, "failed to allocate all requested IPs: %s"
                           % " ".join(ip_string(ip) for ip in pending))
    except BaseException:
        for ip in made:
            try:
                store.release(ip_string(ip))
            except OSError:
                pass   # the original error says more; a DEL retries the release
        raise
    return out


def _allocate_from(store, idx, rs, want, held, used, container_id, ifname):
    """(range, ip, newly_reserved) for range set `rs` (index `idx`)."""
    mine = [ip for ip in held if rs.contains(ip)]
    if mine:
        # Idempotent ADD: hand back what this attachment already holds.
        if want is not None and want not in mine:
            raise CNIError(errors.NO_ADDRESSES,
                           "requested IP address %s conflicts with %s, already allocated to "
                           "container %s interface %s"
                           % (ip_string(want), ip_string(mine[0]), container_id, ifname))
        ip = want or mine[0]
        return rs.range_for(ip), ip, False

    if want is not None:
        r = rs.range_for(want)
        reason = r.reserved_reason(want)
        if reason:
            raise CNIError(errors.INVALID_NETCONF,
                           "requested ip %s is %s" % (ip_string(want), reason))
        if want.value in used or not store.reserve(want, container_id, ifname):
            raise CNIError(errors.NO_ADDRESSES, "requested IP address %s is not available in "
                           "range set %s" % (ip_string(want), rs))
        ip = want
    else:
        for r, ip in rs.free(used, store.last_reserved(idx)):  # noqa: B007 (r is returned below)
            if store.reserve(ip, container_id, ifname):
                break
            used.add(ip.value)   # taken by a writer that ignored the lock
        else:
            raise CNIError(errors.NO_ADDRESSES,
                           "no IP addresses available in range set: %s" % rs)
    used.add(ip.value)
    return r, ip, True


def cmd_del(args):
    conf = load_config(args, with_requested=False)
    store = Store(conf.name, conf.data_dir)
    if not store.exists():
        return None
    try:
        with store:
            store.release_by_id(args.container_id, args.ifname)
    except OSError as e:
        raise _io_error(e) from None
    return None


def cmd_check(args):
    conf = load_config(args, with_requested=False)
    store = Store(conf.name, conf.data_dir)
    found = []
    if store.exists():
        try:
            with store:
                found = store.find(args.container_id, args.ifname)
        except OSError as e:
            raise _io_error(e) from None
    if not found:
        # Not 3: the container may well exist and hold interfaces a DEL must remove; not 7:
        # the config is fine. A check that failed: ours, 104 (docs/decisions.md).
        raise CNIError(errors.NOT_AS_ADDED, "host-local: Failed to find address added by container %s"
                       % args.container_id)
    return None


def cmd_gc(args):
    conf = load_config(args, with_requested=False)
    attachments = args.conf.get("cni.dev/valid-attachments")
    if attachments is None:   # libcni sends null for "none left"
        attachments = []
    if not isinstance(attachments, list):
        raise _invalid("cni.dev/valid-attachments must be a list")
    valid = set()
    for att in attachments:
        if not isinstance(att, dict) or not isinstance(att.get("containerID"), str) \
                or not isinstance(att.get("ifname"), str):
            raise _invalid("cni.dev/valid-attachments entries need containerID and ifname strings")
        valid.add((att["containerID"].strip(), att["ifname"]))
    store = Store(conf.name, conf.data_dir)
    if not store.exists():
        return None
    try:
        with store:
            store.gc(valid)
    except OSError as e:
        raise _io_error(e) from None
    return None


def cmd_status(args):
    """Ready when the store is usable and every range set has an address left."""
    conf = load_config(args, with_requested=False, for_allocation=True)
    store = Store(conf.name, conf.data_dir)
    try:
        with store:   # creates the directory and lock file, proving both possible
            full = _exhausted(store, conf.range_sets)
        if not os.access(store.dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", store.dir)
    except OSError as e:
        raise CNIError(errors.LIMITED_CONNECTIVITY,
                       "host-local: data directory %s is not usable: %s"
                       % (store.dir, e.strerror or e)) from None
    if full is not None:
        raise CNIError(errors.LIMITED_CONNECTIVITY, "host-local: no IP addresses available in "
                       "range set %d: %s" % (full, conf.range_sets[full]))
    return None


def _exhausted(store, range_sets):
    """The index of the first range set with no address left to hand out, or None.

    Counts address files by name, without reading them or walking the ranges,
    so a /64 costs what a /30 does. A set that looks full is counted again after
    a listing that reclaims what crashed writers left (ipam.store), as the next
    ADD would.
    """
    swept = False
    while True:
        used = {AF_INET: set(), AF_INET6: set()}
        for name in store.names():
            try:
                ip = parse_ip(name)
            except ValueError:
                continue
            used[ip.family].add(ip.value)
        full = next((i for i, rs in enumerate(range_sets) if not rs.available(used[rs.family])), None)
        if full is None or swept:
            return full
        store.allocations()
        swept = True


COMMANDS: Commands = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def _invalid(msg):
    return CNIError(errors.INVALID_NETCONF, msg)


def _io_error(e):
    where = " %s" % e.filename if getattr(e, "filename", None) else ""
    return CNIError(errors.IO_FAILURE, "host-local:%s: %s" % (where, e.strerror or e))


def main() -> None:
    run_plugin(COMMANDS, about=ABOUT)


if __name__ == "__main__":
    main()
