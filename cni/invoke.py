"""Finding and running another plugin (IPAM or a delegate), as libcni's invoke does.

A plugin found in CNI_PATH that is one of podnet's own executables from this
same source tree runs in-process: same code, same config, same result, minus
an interpreter start (~12 ms). Anything else is executed as the spec says.
"""
from __future__ import annotations

import os

from cni import errors
from cni.errors import CNIError
from cni.fastjson import JSONError, dumps, loads
from cni.types import from_version, to_version

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from cni.skel import CmdArgs
    from cni.types import Result
    from podnet.proc import Completed


def find(plugin_type: str, path_dirs: list[str]) -> str:
    if not plugin_type or "/" in plugin_type:
        raise CNIError(errors.INVALID_NETCONF, "invalid plugin type %r" % (plugin_type,))
    for d in path_dirs:
        candidate = os.path.join(d, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(errors.PLUGIN_NOT_FOUND,
                   'failed to find plugin "%s" in path [%s]' % (plugin_type, " ".join(path_dirs)))


def delegate(plugin_type: str, command: str, args: CmdArgs,
             netconf: bytes | bytearray | dict[str, Any] | None = None) -> Result | None:
    """Run `command` of plugin `plugin_type` with our environment and netconf.

    `args` is the caller's CmdArgs; `netconf` is the config to send (bytes or
    dict; default: the caller's own stdin, as for IPAM). Returns the internal
    result for ADD, None otherwise; a failing plugin raises its CNIError.
    """
    if netconf is None:
        stdin = args.stdin
    elif isinstance(netconf, (bytes, bytearray)):
        stdin = bytes(netconf)
    else:
        stdin = dumps(netconf).encode()
    env = cni_env(command, args.container_id, args.netns, args.ifname, args.args, args.path)
    return execute(find(plugin_type, args.path), command, stdin, env)


def cni_env(command: str, container_id: str, netns: str, ifname: str, cni_args: str,
            path_dirs: list[str]) -> dict[str, str]:
    """The process environment a plugin is run with: ours plus the CNI_* variables."""
    env = dict(os.environ)
    env.update({"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
                "CNI_IFNAME": ifname, "CNI_ARGS": cni_args, "CNI_PATH": ":".join(path_dirs)})
    return env


def execute(path: str, command: str, stdin: bytes, env: Mapping[str, str],
            in_process: bool = True) -> Result | None:
    """Run the plugin at `path`; in-process if it is one of ours and allowed."""
    if in_process:
        from cni.executable import ROOT, read_marker
        marker = read_marker(path)
        if marker and marker[1] == ROOT:
            return _in_process(marker[0], command, env, stdin, os.path.basename(path))
    return _execute(path, command, env, stdin)


# In-process plugin calls nested deeper than this are refused (no legitimate chain of
# delegations is longer than a few: flannel -> bridge -> host-local).
MAX_NESTING = 8


def _in_process(module: str, command: str, env: Mapping[str, str], stdin: bytes,
                name: str = "") -> Result | None:
    from cni import skel
    mod = __import__(module, fromlist=["COMMANDS"])
    for commands, active_command, active_stdin in skel.ACTIVE:
        if commands is mod.COMMANDS and active_command == command and active_stdin == stdin:
            raise CNIError(errors.INVALID_NETCONF,
                           'plugin "%s" delegates to itself with the same config' % (name or module),
                           "its IPAM (or delegate) type names the plugin itself")
    if len(skel.ACTIVE) >= MAX_NESTING:
        raise CNIError(errors.INVALID_NETCONF, "plugins delegate more than %d levels deep" % MAX_NESTING,
                       "an IPAM or delegate type that leads back to a plugin already running?")
    sub = skel.args_from_env(env, stdin)
    try:
        result = skel.call(mod.COMMANDS, sub)
    except CNIError:
        raise
    except Exception as e:
        # What the same plugin run as a process reports (skel.plugin_main), so
        # callers handle a failing delegate the same way on both paths.
        raise CNIError(errors.INTERNAL, "%s: %s" % (type(e).__name__, e)) from e
    if command != "ADD":
        return None
    # Round-trip through the callee's version as a separate process would.
    if TYPE_CHECKING:   # an ADD returns a result (a None would fail in to_version)
        assert result is not None
    return from_version(to_version(result, sub.version), sub.version)


def _execute(path: str, command: str, env: Mapping[str, str], stdin: bytes) -> Result | None:
    from podnet.proc import run
    proc = run([path], stdin, env=env)
    if proc.returncode != 0:
        raise _error_from(path, proc)
    if command != "ADD":
        return None
    try:
        raw = loads(proc.stdout)
    except JSONError as e:
        raise CNIError(errors.DECODING_FAILURE, "%s: cannot decode result: %s" % (path, e)) from None
    version = raw.get("cniVersion", "0.1.0") if isinstance(raw, dict) else "0.1.0"
    return from_version(raw, version)


def _error_from(path: str, proc: Completed) -> CNIError:
    """The failed plugin's error JSON as a CNIError; anything else (no JSON, or fields of
    other types than the spec's: an int code, string msg and details) is a 999."""
    try:
        raw = loads(proc.stdout)
    except JSONError:
        raw = None
    if isinstance(raw, dict):
        code, msg, details = raw.get("code"), raw.get("msg", ""), raw.get("details", "")
        if isinstance(code, int) and not isinstance(code, bool) and isinstance(msg, str) \
                and isinstance(details, (str, type(None))):
            return CNIError(code, msg, details)
    text = (proc.stderr or proc.stdout).decode(errors="replace").strip()
    return CNIError(errors.INTERNAL, "netplugin failed: %s" % (text or "exit %d" % proc.returncode),
                    os.path.basename(path))
