"""Plugin dispatch: environment and stdin in, result or error JSON out.

A plugin module defines COMMANDS = {"ADD": f, "DEL": f, "CHECK": f, ...} where
each f takes CmdArgs and returns an internal result (ADD) or None; its
executable calls `plugin_main(COMMANDS)`. `call` runs the same steps without a
process, for in-process delegation (cni.invoke).
"""
from __future__ import annotations

import os
import sys

from cni import errors
from cni.errors import CNIError
from cni.fastjson import JSONError, dumps, loads
from cni.types import LATEST, SUPPORTED_VERSIONS, check_supported, to_version, version_tuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, NoReturn, TypeVar

    from cni.types import Result

    T = TypeVar("T")
    # One command of a plugin: the internal result for ADD, None for the others.
    Command = Callable[["CmdArgs"], "Result | None"]
    Commands = Mapping[str, Command]

# Which environment variables each command needs (as the reference skel).
_REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
}
# The first spec version that has each command.
_SINCE = {"CHECK": (0, 4, 0), "GC": (1, 1, 0), "STATUS": (1, 1, 0)}
_ENV = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")

# The plugin commands running in this process, outermost first: (COMMANDS, command,
# stdin). cni.invoke refuses to start one of them again in-process: that is a plugin
# delegating to itself with the same config (e.g. bridge with "ipam": {"type": "bridge"}).
ACTIVE: list[tuple[object, str, bytes]] = []


class CmdArgs:
    """What one invocation was given: environment, raw stdin and parsed config."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path",
                 "stdin", "conf", "version")

    def __init__(self, command: str, container_id: str, netns: str, ifname: str, args: str,
                 path: list[str], stdin: bytes, conf: dict[str, Any], version: str) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args          # CNI_ARGS, raw "K=V;K2=V2"
        self.path = path          # CNI_PATH as a list of directories
        self.stdin = stdin        # config bytes, exactly as received (passed on to IPAM)
        self.conf = conf          # config as a dict
        self.version = version    # the config's cniVersion

    def cni_args(self) -> dict[str, str]:
        """CNI_ARGS as a dict (K=V pairs separated by ';')."""
        out = {}
        for pair in self.args.split(";") if self.args else ():
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise CNIError(errors.INVALID_ENV, "invalid CNI_ARGS pair %r" % pair)
            out[key] = value
        return out


def args_from_env(env: Mapping[str, str], stdin: bytes) -> CmdArgs:
    """Build CmdArgs from an environment mapping and stdin bytes, validating both."""
    for key in _ENV:
        _check_env_text(key, env.get(key, ""))
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(errors.INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    if command != "VERSION" and command not in _REQUIRED:
        raise CNIError(errors.INVALID_ENV, "unknown CNI_COMMAND: %s" % command)
    missing = [v for v in _REQUIRED.get(command, ()) if not env.get(v)]
    if missing:
        raise CNIError(errors.INVALID_ENV, "required env variables [%s] missing" % ",".join(missing))
    conf = parse_config(stdin, command)
    version = conf.get("cniVersion") or "0.1.0"
    args = CmdArgs(command, env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""),
                   env.get("CNI_IFNAME", ""), env.get("CNI_ARGS", ""),
                   [p for p in env.get("CNI_PATH", "").split(":") if p], stdin, conf, version)
    if command == "VERSION":
        return args
    check_supported(version)
    since = _SINCE.get(command)
    if since and version_tuple(version) < since:
        raise CNIError(errors.INCOMPATIBLE_VERSION,
                       "config version %s does not allow %s" % (version, command))
    validate_network_name(conf.get("name"))
    plugin_type = conf.get("type")
    if plugin_type is not None and not isinstance(plugin_type, str):   # null: missing, as in Go
        raise CNIError(errors.INVALID_NETCONF, "failed to load netconf: type must be a string, not %s"
                       % _short(plugin_type))
    if command in ("ADD", "CHECK", "DEL"):
        validate_container_id(args.container_id)
        validate_ifname(args.ifname)
    return args


def _check_env_text(key: str, value: str) -> None:
    """An environment value must be text: no NUL (impossible through exec, possible through
    a mapping) and valid UTF-8 (os.environ holds other bytes as lone surrogates)."""
    if "\0" in value:
        raise CNIError(errors.INVALID_ENV, "%s holds a NUL character" % key, ascii(value))
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise CNIError(errors.INVALID_ENV, "%s is not valid UTF-8" % key, ascii(value)) from None


def parse_config(stdin: bytes, command: str = "") -> dict[str, Any]:
    if not stdin.strip() and command == "VERSION":
        return {}
    try:
        conf = loads(stdin)
    except JSONError as e:
        raise CNIError(errors.DECODING_FAILURE, "error decoding network config: %s" % e) from None
    if not isinstance(conf, dict):
        raise CNIError(errors.DECODING_FAILURE, "network config is not a JSON object")
    version = conf.get("cniVersion")
    if version is not None and not isinstance(version, str):   # null: missing, as in Go
        raise CNIError(errors.DECODING_FAILURE, "cniVersion must be a string")
    return conf


# "a object", "a array": the wording these messages have always had (tests match on it)
_KIND_NAMES = {str: "a string", bool: "a boolean", int: "a number", dict: "a object", list: "a array"}


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def conf_value(conf: Mapping[str, Any], key: str, kind: type[T], default: T, name: str = "") -> T:
    """conf[key] if it has JSON type `kind` (null or missing: default), else the spec's
    INVALID_NETCONF error naming the field as `name` (default: key). A boolean is not
    a number, as in Go's decoder."""
    value = conf.get(key, default)
    if value is None:
        return default
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise CNIError(errors.INVALID_NETCONF, "failed to load netconf: %s must be %s, not %s"
                       % (name or key, _KIND_NAMES[kind], _short(value)))
    return value


_DNS_LISTS = ("nameservers", "search", "options")


def conf_dns(conf: Mapping[str, Any], key: str = "dns") -> dict[str, Any]:
    """conf[key] as the spec's DNS type: nameservers, search and options lists of strings,
    domain a string (else INVALID_NETCONF, as Go's typed decoding); other keys dropped."""
    dns = conf_value(conf, key, dict, {})
    out: dict[str, Any] = {}
    for field in _DNS_LISTS:
        value = dns.get(field)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CNIError(errors.INVALID_NETCONF, "failed to load netconf: %s.%s must be a list of "
                           "strings, not %s" % (key, field, _short(value)))
        if value:
            out[field] = value
    domain = conf_value(dns, "domain", str, "", key + ".domain")
    if domain:
        out["domain"] = domain
    return out


def conf_path(conf: Mapping[str, Any], key: str, default: str) -> str:
    """conf[key] as a file system path (null or missing: default): a non-empty string
    without NUL, else the spec's INVALID_NETCONF error (open() would raise ValueError)."""
    value = conf_value(conf, key, str, default)
    if not value or "\0" in value:
        raise CNIError(errors.INVALID_NETCONF, "failed to load netconf: %s must be a path, not %s"
                       % (key, _short(value)))
    return value


def valid_attachments(conf: Mapping[str, Any]) -> set[tuple[str, str]]:
    """GC's cni.dev/valid-attachments as {(containerID, ifname)}. null or missing is none
    (libcni sends null for an empty list); anything but a list of objects with those two
    strings is INVALID_NETCONF: a GC must never guess what is still in use."""
    raw = conf.get("cni.dev/valid-attachments")
    if raw is None:
        return set()
    if not isinstance(raw, list):
        raise CNIError(errors.INVALID_NETCONF, "cni.dev/valid-attachments must be a list")
    out = set()
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("containerID"), str) \
                or not isinstance(entry.get("ifname"), str):
            raise CNIError(errors.INVALID_NETCONF,
                           "cni.dev/valid-attachments entries need containerID and ifname strings",
                           _short(entry))
        out.add((entry["containerID"], entry["ifname"]))
    return out


def _only(text: str, allowed_extra: str) -> bool:
    return all(c.isascii() and (c.isalnum() or c in allowed_extra) for c in text)


def validate_network_name(name: object) -> None:
    if not name:
        raise CNIError(errors.INVALID_NETCONF, "missing network name")
    if not isinstance(name, str) or not name[0].isascii() or not name[0].isalnum() \
            or not _only(name, "_.-"):
        raise CNIError(errors.INVALID_NETCONF, "invalid characters found in network name", str(name))


def validate_container_id(cid: str) -> None:
    if not cid:
        raise CNIError(errors.UNKNOWN_CONTAINER, "missing containerID")
    if not (cid[0].isascii() and cid[0].isalnum() and _only(cid, "_.-")):
        raise CNIError(errors.INVALID_ENV, "invalid characters in containerID", cid)


def validate_ifname(name: str) -> None:
    if not name:
        raise CNIError(errors.INVALID_ENV, "interface name is empty")
    if len(name.encode("utf-8", "surrogateescape")) > 15:   # IFNAMSIZ counts bytes
        raise CNIError(errors.INVALID_ENV, "interface name is too long",
                       "interface name should be less than 16 characters")
    if name in (".", ".."):
        raise CNIError(errors.INVALID_ENV, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in name):
        raise CNIError(errors.INVALID_ENV, "interface name contains / or : or whitespace characters")


def version_info(conf: object) -> dict[str, Any]:
    version = conf.get("cniVersion") if isinstance(conf, dict) else None
    if version not in SUPPORTED_VERSIONS:
        version = LATEST
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def call(commands: Commands, args: CmdArgs) -> Result | None:
    """Run one command of a plugin on prepared CmdArgs; return its internal result."""
    func = commands.get(args.command)
    if func is None:
        if args.command in ("GC", "STATUS"):
            return None   # nothing to collect / always ready
        raise CNIError(errors.INVALID_ENV, "plugin does not implement %s" % args.command)
    ACTIVE.append((commands, args.command, args.stdin))
    try:
        return func(args)
    finally:
        ACTIVE.pop()


def plugin_main(commands: Commands, about: str = "", env: Mapping[str, str] | None = None,
                stdin: bytes | None = None) -> NoReturn:
    """The body of a plugin executable. Never returns."""
    env = os.environ if env is None else env
    version = None      # the config's cniVersion, once args are parsed
    try:
        if stdin is None:
            stdin = sys.stdin.buffer.read()
        if env.get("CNI_COMMAND") == "VERSION":
            conf = parse_config(stdin, "VERSION")
            _print(version_info(conf), indent=None)    # compact, as the reference
            sys.exit(0)
        if not env.get("CNI_COMMAND") and about:
            sys.stderr.write(about + "\n")
        args = args_from_env(env, stdin)
        version = args.version
        result = call(commands, args)
        if args.command == "ADD":
            if TYPE_CHECKING:   # an ADD returns a result (a None fails in to_version: INTERNAL)
                assert result is not None
            _print(to_version(result, args.version))
        sys.exit(0)
    except CNIError as e:
        _print_error(e, version, stdin)
        sys.exit(1)
    except Exception as e:  # an unexpected failure still answers in the spec's format
        import traceback
        try:    # with bad input quoted in it: backslash escapes, as Python's own stderr does
            sys.stderr.write(traceback.format_exc().encode("utf-8", "backslashreplace").decode("utf-8"))
        except Exception:
            pass
        try:
            text = "%s: %s" % (type(e).__name__, e)
        except Exception:   # an exception whose str() fails
            text = type(e).__name__
        _print_error(CNIError(errors.INTERNAL, text), version, stdin)
        sys.exit(1)


def run_plugin(commands: Commands, about: str = "") -> NoReturn:
    """An executable's entry point: plugin_main, then leave through os._exit.

    Interpreter finalisation (module teardown, GC) costs 1.5-2 ms per run and
    there is nothing left to clean up once the answer is flushed (files,
    locks and sockets are closed by then). Never returns.
    """
    try:
        plugin_main(commands, about)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        code = code or 1
    os._exit(code)


def _error_version(version: str | None, stdin: bytes | None) -> str:
    """An error's cniVersion: the config's own (even when the error came before the
    config was validated, e.g. a bad CNI_COMMAND) if supported, else LATEST."""
    if version is None and stdin:
        try:
            conf = loads(stdin, allow_surrogates=True)
            version = conf.get("cniVersion") if isinstance(conf, dict) else None
        except (JSONError, RecursionError):
            pass
    return version if version in SUPPORTED_VERSIONS else LATEST


def _print(obj: object, indent: int | None = 4) -> None:
    """Write a document to stdout as UTF-8 bytes, whatever the text layer's encoding.
    A string that UTF-8 cannot carry (a lone surrogate, e.g. quoted from bad input)
    makes the whole document ASCII with \\u escapes instead of failing."""
    text = dumps(obj, indent=indent)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = dumps(obj, indent=indent, ascii=True).encode("ascii")
    out = sys.stdout
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is None:          # a text-only stream (tests): ASCII is safe for any encoding
        out.write(data.decode("utf-8") if data.isascii() else dumps(obj, indent=indent, ascii=True))
        out.flush()
        return
    buffer.write(data)
    buffer.flush()


def _print_error(error: CNIError, version: str | None, stdin: bytes | None) -> None:
    """The error JSON; never raises (a broken stdout is the caller's loss, not a traceback)."""
    try:
        _print(error.to_dict(_error_version(version, stdin)))
    except Exception:
        pass
