"""Running a network configuration list, as a container runtime does with libcni.

A conflist is {"cniVersion", "name", "plugins": [...]}; ADD runs the plugins in
order, each getting the list's name and version injected and the previous
plugin's result as `prevResult`; DEL runs them in reverse with the cached ADD
result as prevResult (spec >= 0.4.0); CHECK runs them in order with it.
Plugins that declare `capabilities` get the matching runtime values
(portMappings, ips, mac, bandwidth, ...) as `runtimeConfig`.

The cache has libcni's layout and format, <cacheDir>/results/<net>-<id>-<ifname>
holding {"kind": "cniCacheV1", ...}, so a runtime using libcni and this module
can share it. GC, as libcni's, first DELs the cached attachments the runtime
no longer lists, then sends GC to each plugin (spec 1.1.0).

This is the runtime side: plugins always run as separate processes here, the
way kubelet/containerd would run them.
"""
from __future__ import annotations

import base64
import os

from cni import errors
from cni.errors import CNIError
from cni.fastjson import JSONError, dumps, loads
from cni.invoke import cni_env, execute, find
from cni.types import check_supported, from_version, to_version, version_tuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Mapping
    from typing import Any

    from cni.types import Result

DEFAULT_CACHE_DIR = "/var/lib/cni"
NAME_MAX = 255          # bytes in one file name (Linux), e.g. the cache's <net>-<id>-<ifname>
PATH_MAX = 4096


class RuntimeConf:
    """What the runtime knows about one attachment."""

    def __init__(self, container_id: str, netns: str, ifname: str = "eth0",
                 args: Iterable[tuple[str, str]] = (), capability_args: Mapping[str, Any] | None = None,
                 cache_dir: str = DEFAULT_CACHE_DIR) -> None:
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = list(args)                      # [(key, value)] -> CNI_ARGS
        self.capability_args = dict(capability_args or {})
        self.cache_dir = cache_dir

    def cni_args(self) -> str:
        return ";".join("%s=%s" % kv for kv in self.args)

    def check(self) -> None:
        """What can go into a plugin's environment: no NUL anywhere (exec would refuse it)."""
        fields = [("container ID", self.container_id), ("netns", self.netns), ("ifname", self.ifname),
                  ("CNI_ARGS", self.cni_args())]
        for what, value in fields:
            if "\0" in value:
                raise CNIError(errors.INVALID_ENV, "the %s holds a NUL character" % what, ascii(value))


class ConfList:
    def __init__(self, raw: dict[str, Any], data: bytes) -> None:
        self.raw = raw           # the list as a dict
        self.bytes = data        # the file as given (cached verbatim, as libcni does)
        self.name: str = raw["name"]
        self.version: str = raw["cniVersion"]
        self.plugins: list[dict[str, Any]] = raw["plugins"]
        self.disable_check = bool(raw.get("disableCheck"))
        self.disable_gc = bool(raw.get("disableGC"))


def load(source: str | os.PathLike[str] | bytes | bytearray | dict[str, Any]) -> ConfList:
    """A ConfList from a path, bytes or dict. A single plugin config is wrapped
    into a one-plugin list, as libcni's ConfListFromConf does."""
    if isinstance(source, dict):
        data = dumps(source).encode()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CNIError(errors.IO_FAILURE, "cannot read %s: %s" % (source, e.strerror)) from None
    try:
        raw = loads(data)
    except JSONError as e:
        raise CNIError(errors.DECODING_FAILURE, "error parsing configuration list: %s" % e) from None
    if not isinstance(raw, dict):
        raise CNIError(errors.DECODING_FAILURE, "configuration list is not a JSON object")
    if "plugins" not in raw and "type" in raw:
        single = dict(raw)
        raw = {"cniVersion": raw.get("cniVersion", ""), "name": raw.get("name", ""), "plugins": [single]}
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise CNIError(errors.INVALID_NETCONF, "error parsing configuration list: no name")
    if not isinstance(raw.get("cniVersion"), str) or not raw["cniVersion"]:
        raise CNIError(errors.INVALID_NETCONF, "error parsing configuration list: no cniVersion")
    check_supported(raw["cniVersion"])
    plugins = raw.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise CNIError(errors.INVALID_NETCONF, "error parsing configuration list: no plugins in list")
    for i, p in enumerate(plugins):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise CNIError(errors.INVALID_NETCONF, "plugin %d in list %r has no type" % (i, raw["name"]))
    return ConfList(raw, data)


def plugin_config(conflist: ConfList, plugin: dict[str, Any], rt: RuntimeConf | None,
                  prev_result: Result | None = None, extra: dict[str, Any] | None = None) -> bytes:
    """One plugin's stdin: its config plus name, cniVersion, prevResult, runtimeConfig."""
    conf = dict(plugin)
    conf["name"] = conflist.name
    conf["cniVersion"] = conflist.version
    if prev_result is not None:
        conf["prevResult"] = to_version(prev_result, conflist.version)
    caps = plugin.get("capabilities") or {}
    runtime = {k: v for k, v in rt.capability_args.items() if caps.get(k)} if rt else {}
    if runtime:
        conf["runtimeConfig"] = runtime
    if extra:
        conf.update(extra)
    return dumps(conf).encode()


def _run(plugin: dict[str, Any], command: str, stdin: bytes, rt: RuntimeConf | None,
         cni_path: list[str]) -> Result | None:
    env = cni_env(command, rt.container_id if rt else "", rt.netns if rt else "",
                  rt.ifname if rt else "", rt.cni_args() if rt else "", cni_path)
    return execute(find(plugin["type"], cni_path), command, stdin, env, in_process=False)


# ---- the cache -----------------------------------------------------------------

def cache_path(conflist: ConfList, rt: RuntimeConf) -> str:
    return os.path.join(rt.cache_dir, "results", "%s-%s-%s" % (conflist.name, rt.container_id, rt.ifname))


def _cache_path_fits(conflist: ConfList, rt: RuntimeConf) -> bool:
    path = cache_path(conflist, rt)
    return len(os.path.basename(path).encode()) <= NAME_MAX and len(path.encode()) < PATH_MAX


def _write_cache(conflist: ConfList, rt: RuntimeConf, result: Result) -> None:
    entry = {"kind": "cniCacheV1", "containerId": rt.container_id,
             "config": base64.b64encode(conflist.bytes).decode(), "ifName": rt.ifname,
             "networkName": conflist.name, "netns": rt.netns,
             "cniArgs": [list(kv) for kv in rt.args], "capabilityArgs": rt.capability_args,
             "result": to_version(result, conflist.version)}
    path = cache_path(conflist, rt)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # as libcni: 0600
        with open(fd, "w") as f:
            f.write(dumps(entry))
        os.replace(tmp, path)
    except OSError as e:
        raise CNIError(errors.IO_FAILURE, "failed to write the cached result %s: %s"
                       % (path, e.strerror or e)) from None


def cached_result(conflist: ConfList, rt: RuntimeConf) -> Result | None:
    """The cached ADD result (internal shape), or None."""
    if not _cache_path_fits(conflist, rt):
        return None             # never written: add() refuses such names
    try:
        with open(cache_path(conflist, rt), "rb") as f:
            entry = loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, JSONError) as e:
        raise CNIError(errors.IO_FAILURE, "cannot read cached result: %s" % e) from None
    raw = entry.get("result") if isinstance(entry, dict) else None
    if not raw:
        return None
    return from_version(raw, raw.get("cniVersion", conflist.version))


def _drop_cache(conflist: ConfList, rt: RuntimeConf) -> None:
    if not _cache_path_fits(conflist, rt):
        return
    try:
        os.unlink(cache_path(conflist, rt))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CNIError(errors.IO_FAILURE, "failed to remove the cached result: %s" % (e.strerror or e)) from None


def cached_attachments(cache_dir: str, network: str | None = None) -> list[RuntimeConf]:
    """The attachments the cache knows (libcni's GetCachedAttachments): a list of
    RuntimeConf rebuilt from each readable cniCacheV1 entry, of `network` if given."""
    directory = os.path.join(cache_dir, "results")
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                entry = loads(f.read())
        except (OSError, JSONError):
            continue
        if not isinstance(entry, dict) or entry.get("kind") != "cniCacheV1":
            continue
        cid, ifname, net = entry.get("containerId"), entry.get("ifName"), entry.get("networkName")
        if not (isinstance(cid, str) and cid and isinstance(ifname, str) and ifname
                and isinstance(net, str) and net) or (network is not None and net != network):
            continue
        args = [tuple(kv) for kv in entry.get("cniArgs") or [] if isinstance(kv, list) and len(kv) == 2]
        caps = entry.get("capabilityArgs") if isinstance(entry.get("capabilityArgs"), dict) else {}
        netns = entry.get("netns")
        if not isinstance(netns, str):
            netns = ""
        rt = RuntimeConf(cid, netns, ifname, args, caps, cache_dir)
        try:
            rt.check()
        except CNIError:
            continue            # not something a plugin could be run with
        out.append(rt)
    return out


# ---- the operations ---------------------------------------------------------------

def add(conflist: ConfList, rt: RuntimeConf, cni_path: list[str]) -> Result:
    """ADD every plugin in order; returns the final result (internal shape) and caches it.
    Refuses (before running anything) what it could not pass on or cache."""
    rt.check()
    if not _cache_path_fits(conflist, rt):
        raise CNIError(errors.INVALID_ENV, "container ID and interface name are too long for the "
                       "result cache: %s-<id>-%s would be a file name of more than %d bytes"
                       % (conflist.name, rt.ifname, NAME_MAX))
    result = None
    for plugin in conflist.plugins:
        stdin = plugin_config(conflist, plugin, rt, result)
        result = _run(plugin, "ADD", stdin, rt, cni_path)
    if TYPE_CHECKING:   # load() refuses an empty list, and a plugin's ADD returns a result
        assert result is not None
    _write_cache(conflist, rt, result)
    return result


def delete(conflist: ConfList, rt: RuntimeConf, cni_path: list[str]) -> None:
    """DEL every plugin in reverse order, with the cached result as prevResult."""
    rt.check()
    prev = None
    if version_tuple(conflist.version) >= (0, 4, 0):
        try:
            prev = cached_result(conflist, rt)
        except CNIError:        # unreadable: as libcni, drop it and DEL without
            _drop_cache(conflist, rt)
    for plugin in reversed(conflist.plugins):
        _run(plugin, "DEL", plugin_config(conflist, plugin, rt, prev), rt, cni_path)
    _drop_cache(conflist, rt)


def check(conflist: ConfList, rt: RuntimeConf, cni_path: list[str]) -> None:
    if version_tuple(conflist.version) < (0, 4, 0):
        raise CNIError(errors.INCOMPATIBLE_VERSION, "configuration version %s does not support CHECK"
                       % conflist.version)
    rt.check()
    if conflist.disable_check:
        return
    prev = cached_result(conflist, rt)
    if prev is None:
        raise CNIError(errors.INVALID_NETCONF, "no cached result for %s/%s: was it added?"
                       % (rt.container_id, rt.ifname))
    for plugin in conflist.plugins:
        _run(plugin, "CHECK", plugin_config(conflist, plugin, rt, prev), rt, cni_path)


def gc(conflist: ConfList, valid_attachments: Collection[tuple[str, str]], cni_path: list[str],
       cache_dir: str | None = None) -> None:
    """GC, as libcni's GCNetworkList: first DEL every attachment of this network
    that the cache (if cache_dir is given) holds and valid_attachments lacks,
    with its cached runtime config; then (spec 1.1.0) each plugin's GC with the
    valid attachments. Keeps going after a failure and raises the first."""
    if conflist.disable_gc:
        return
    valid = {tuple(a) for a in valid_attachments}
    failures = []
    for rt in cached_attachments(cache_dir, conflist.name) if cache_dir else ():
        if (rt.container_id, rt.ifname) not in valid:
            try:
                delete(conflist, rt, cni_path)
            except CNIError as e:
                failures.append(CNIError(e.code, "failed to delete stale attachment %s %s: %s"
                                         % (rt.container_id, rt.ifname, e.msg), e.details))
    if version_tuple(conflist.version) >= (1, 1, 0):
        extra = {"cni.dev/valid-attachments": [{"containerID": cid, "ifname": ifname}
                                               for cid, ifname in valid_attachments]}
        for plugin in conflist.plugins:
            try:
                _run(plugin, "GC", plugin_config(conflist, plugin, None, None, extra), None, cni_path)
            except CNIError as e:
                failures.append(e)
    if failures:
        raise failures[0]


def status(conflist: ConfList, cni_path: list[str]) -> None:
    """STATUS (spec 1.1.0): raises the first plugin's error; None when all are ready."""
    if version_tuple(conflist.version) < (1, 1, 0):
        return
    for plugin in conflist.plugins:
        _run(plugin, "STATUS", plugin_config(conflist, plugin, None), None, cni_path)
