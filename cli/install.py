"""`podnet install-cni`: the CNI plugin executables, the code they run, and the network config list.

What kube-flannel's init containers do with `cp` (the flannel binary into
/opt/cni/bin, cni-conf.json into /etc/cni/net.d/10-flannel.conflist), done so
that a runtime never sees a half-written file and a rerun changes nothing:

    podnet install-cni --dest /opt/cni/bin --copy-code \\
        --conflist-src /etc/kube-flannel/cni-conf.json --conflist-dest /etc/cni/net.d/10-flannel.conflist

The executables run the host's `/usr/bin/python3 -I -S`, not the image's
interpreter, and import podnet from the path baked into them. Inside a
container that path is the image's, which the host cannot see, so
`--copy-code` copies what the plugins import (found by reading their imports,
lazy ones included: `plugin_modules`) to `<dest>/.podnet/<version>-<digest>/`
and points the executables there. The digest is the code's, so an unchanged
install finds its directory and writes nothing; a new one is written beside
it (a temporary directory renamed into place) before the executables are
switched over, and the previous one is kept for plugin calls still running
from it; older ones are removed.

Every file written is recorded in `<dest>/.podnet/installed.json` (with the
conflist's network name and digest) for `podnet cleanup`.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable
from typing import Any

from cni.executable import PLUGINS, ROOT, install, read_marker

CODE_DIR = ".podnet"                # under the executables' directory: the copied code and the record
RECORD = "installed.json"
CONF_EXTENSIONS = (".conf", ".conflist", ".json")       # what libcni loads from a config directory
PLUGIN_PACKAGES = ("cni", "ipam", "podnet")             # the only packages plugin code may import
KEEP_VERSIONS = 2                   # the new code and the one the executables used before


class InstallError(Exception):
    pass


# ---- the plugins' code -----------------------------------------------------------------

def module_file(name: str, root: str = ROOT) -> str | None:
    base = os.path.join(root, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _imported(path: str, name: str) -> set[str]:
    """Modules named by every import statement in the file, at any depth (lazy imports too)."""
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                mod = base + ("." + node.module if node.module else "")
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(mod + "." + alias.name for alias in node.names)    # `from pkg import submodule`
    return found


def plugin_modules(root: str = ROOT, plugins: Iterable[str] | None = None) -> list[str]:
    """Every first-party module the plugins can import (their package parents included),
    sorted. A plugin importing any other first-party package is an InstallError: the floors
    say it must not, and the copied tree would not have it."""
    first_party = {n for n in os.listdir(root) if module_file(n, root)}
    todo = [PLUGINS[p] for p in (plugins or PLUGINS)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, root)
        if path is None:
            continue            # `from pkg import function`: not a module
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for imported in _imported(path, name):
            top = imported.partition(".")[0]
            if top in first_party:
                if top not in PLUGIN_PACKAGES:
                    raise InstallError("%s imports %s: plugin code may import only %s"
                                       % (name, imported, ", ".join(PLUGIN_PACKAGES)))
                todo.append(imported)
    return sorted(seen)


def code_files(root: str = ROOT) -> list[str]:
    """The plugins' source files, relative to root."""
    return sorted(os.path.relpath(module_file(m, root) or "", root) for m in plugin_modules(root))


def code_digest(root: str, files: Iterable[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        h.update(b"%s\0%d\0" % (rel.encode(), len(data)))
        h.update(data)
    return h.hexdigest()


def version() -> str:
    from podnet import __version__
    return __version__


def copy_code(code_dir: str, root: str = ROOT, changed: list[str] | None = None) -> str:
    """The plugins' code copied to code_dir/<version>-<digest 12>/ (only if not there
    already; written to a temporary directory renamed into place, so a directory of that
    name is always complete); its path."""
    files = code_files(root)
    final = os.path.join(code_dir, "%s-%s" % (version(), code_digest(root, files)[:12]))
    if os.path.isdir(final):
        return final
    os.makedirs(code_dir, exist_ok=True)
    tmp = os.path.join(code_dir, ".tmp-%d" % os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in files:
        target = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(root, rel), target)
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):        # not another installer's identical copy: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if changed is not None:
        changed.append(final)
    return final


def prune_code(code_dir: str, keep: Iterable[str]) -> list[str]:
    """Remove copies of the code other than `keep` (paths) and leftover temporary directories;
    the paths removed."""
    keep = {os.path.realpath(k) for k in keep}
    removed = []
    try:
        names = sorted(os.listdir(code_dir))
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(code_dir, name)
        if os.path.isdir(path) and os.path.realpath(path) not in keep and not name.startswith("."):
            shutil.rmtree(path)
            removed.append(path)
        elif name.startswith(".tmp-") and os.path.isdir(path) and not _pid_alive(name[5:]):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


# ---- the network config list ----------------------------------------------------------

def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def check_conflist(data: bytes, path: str) -> dict[str, Any]:
    """The config (a conflist, or a single plugin's .conf) parsed, or InstallError: a runtime
    would refuse it, so it is never installed."""
    try:
        conf = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InstallError("%s is not JSON: %s" % (path, e)) from None
    if not isinstance(conf, dict) or not isinstance(conf.get("name"), str) or not conf["name"]:
        raise InstallError("%s: a network config needs a \"name\"" % path)
    plugins = conf.get("plugins")
    if plugins is None and not isinstance(conf.get("type"), str):
        raise InstallError("%s: neither a conflist (\"plugins\") nor a plugin config (\"type\")" % path)
    if plugins is not None and (not isinstance(plugins, list) or not plugins
                                or not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in plugins)):
        raise InstallError("%s: \"plugins\" must be a non-empty list of objects with a \"type\"" % path)
    return conf


def write_atomically(path: str, data: bytes, mode: int = 0o644) -> bool:
    """Write `data` to `path` through a temporary file in the same directory and a rename, so
    a reader sees the old content or the new, never a part; False (nothing written, the mtime
    unchanged) when the file holds exactly that already."""
    if _read(path) == data:
        return False
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(directory, ".%s.podnet-tmp-%d" % (name, os.getpid()))    # no extension libcni loads
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return True


def install_conflist(src: str, dest: str, remove_others: bool = False) -> tuple[bool, list[str], dict[str, Any]]:
    """(written?, other configs removed, the config) for src installed as dest."""
    if not dest.endswith(CONF_EXTENSIONS):
        raise InstallError("--conflist-dest %s: a runtime loads only %s files" % (dest, ", ".join(CONF_EXTENSIONS)))
    data = _read(src)
    if data is None:
        raise InstallError("--conflist-src %s: no such file" % src)
    conf = check_conflist(data, src)
    written = write_atomically(dest, data)
    removed = []
    if remove_others:
        directory = os.path.dirname(dest) or "."
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if path != dest and name.endswith(CONF_EXTENSIONS) and os.path.isfile(path):
                os.unlink(path)
                removed.append(path)
    return written, removed, conf


# ---- the record podnet cleanup reads ----------------------------------------------------

def record_path(bin_dir: str) -> str:
    return os.path.join(bin_dir, CODE_DIR, RECORD)


def read_record(bin_dir: str) -> dict[str, Any]:
    data = _read(record_path(bin_dir))
    try:
        record = json.loads(data) if data else {}
    except ValueError:
        record = {}
    return record if isinstance(record, dict) else {}


def update_record(bin_dir: str, executables: list[str], code: str | None,
                  conflist: tuple[str, str, str] | None) -> bool:
    record = read_record(bin_dir)
    record["executables"] = sorted(set(record.get("executables", [])) | set(executables))
    if code:
        record["code"] = code
    if conflist:
        path, network, digest = conflist
        confs = {c["path"]: c for c in record.get("conflists", []) if isinstance(c, dict) and "path" in c}
        confs[path] = {"path": path, "network": network, "sha256": digest}
        record["conflists"] = [confs[p] for p in sorted(confs)]
    return write_atomically(record_path(bin_dir), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


# ---- the command ------------------------------------------------------------------------

def cmd_install_cni(opts: Any) -> int:
    names = opts.plugins or list(PLUGINS)
    unknown = [n for n in names if n not in PLUGINS]
    if unknown:
        print("unknown plugin(s): %s (have: %s)" % (", ".join(unknown), ", ".join(PLUGINS)), file=sys.stderr)
        return 2
    if bool(opts.conflist_src) != bool(opts.conflist_dest):
        print("podnet install-cni: --conflist-src and --conflist-dest go together", file=sys.stderr)
        return 2
    changed: list[str] = []
    try:
        root, code_dir = ROOT, None
        if opts.copy_code:
            code_dir = os.path.join(opts.dest, CODE_DIR)
            before = {m[1] for m in (read_marker(os.path.join(opts.dest, n)) for n in PLUGINS) if m}
            root = copy_code(code_dir, changed=changed)
        paths = install(opts.dest, opts.python, names, root, changed)
        if code_dir:
            for path in prune_code(code_dir, {root} | {b for b in before if b.startswith(code_dir + os.sep)}):
                print("removed %s" % path)
        conflist = None
        if opts.conflist_src:
            written, removed, conf = install_conflist(opts.conflist_src, opts.conflist_dest, opts.remove_others)
            if written:
                changed.append(opts.conflist_dest)
            for path in removed:
                print("removed %s" % path)
            digest = hashlib.sha256(_read(opts.conflist_dest) or b"").hexdigest()
            conflist = (os.path.abspath(opts.conflist_dest), conf["name"], digest)
        update_record(opts.dest, paths, root if code_dir else None, conflist)
    except (InstallError, OSError) as e:
        print("podnet install-cni: %s" % e, file=sys.stderr)
        return 1
    for path in paths + ([opts.conflist_dest] if opts.conflist_src else []):
        print("%s %s" % ("wrote" if path in changed else "unchanged", path))
    if code_dir:
        print("%s %s" % ("wrote" if root in changed else "unchanged", root))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("install-cni", help="install podnet's CNI plugin executables (and a network config list)")
    p.add_argument("--dest", default="/opt/cni/bin", help="directory to install into (default: %(default)s)")
    p.add_argument("--python", default="/usr/bin/python3",
                   help="interpreter in the executables' #! line (default: %(default)s); "
                        "never a pyenv shim: it costs ~70 ms per call")
    p.add_argument("--copy-code", action="store_true",
                   help="copy the code the plugins import to DEST/%s/<version>-<digest>/ and run it from there "
                        "(an init container: the image's tree is not on the host)" % CODE_DIR)
    p.add_argument("--conflist-src", metavar="FILE", help="a network config list to install (e.g. the "
                   "ConfigMap's cni-conf.json)")
    p.add_argument("--conflist-dest", metavar="DIR/NAME.conflist",
                   help="where: written atomically (temporary file + rename), not at all when unchanged")
    p.add_argument("--remove-others", action="store_true",
                   help="delete the other network configs (%s) in --conflist-dest's directory" %
                        " ".join(CONF_EXTENSIONS))
    p.add_argument("plugins", nargs="*", help="plugin names (default: all)")
    p.set_defaults(func=cmd_install_cni)
