"""The plugin executables that `podnet install-cni` writes, and how to recognise them.

Each executable is a four-line Python script (see render(): the shebang, the
marker, the sys.path entry, the call of main()) run by the system interpreter
with -I -S (isolated, no site): site-packages are not scanned, which saves
several ms per invocation; the script puts podnet's source root on sys.path
itself. The marker line lets cni.invoke recognise one of ours in CNI_PATH and
run it in-process instead of paying another interpreter start.
"""
from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

# Executable name -> module defining COMMANDS and main(). Later plugins join here.
PLUGINS = {
    "bridge": "cni.plugins.bridge",
    "loopback": "cni.plugins.loopback",
    "portmap": "cni.plugins.portmap",
    "host-local": "ipam.host_local",
    "flannel": "cni.plugins.flannel",
    "calico": "cni.plugins.calico",
}

MARKER = "# podnet-cni-plugin "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def render(name: str, python: str, root: str = ROOT) -> str:
    """The executable of plugin `name`, importing podnet from `root` (default: this tree;
    an installed copy of the plugins' code, see cli/install.py, names its own)."""
    module = PLUGINS[name]
    return (
        "#!%s -IS\n"
        "%s%s %s\n"
        "import sys; sys.path.insert(0, %r)\n"
        "from %s import main; main()\n"
    ) % (python, MARKER, module, root, root, module)


def read_marker(path: str) -> tuple[str, str] | None:
    """(module, root) if `path` is a podnet plugin executable, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    marker = MARKER.encode()
    start = head.find(marker)
    if not head.startswith(b"#!") or start < 0:
        return None
    line = head[start + len(marker):].split(b"\n", 1)[0].decode(errors="replace")
    module, _, root = line.partition(" ")
    return module, root


def install(dest: str, python: str, names: Iterable[str] | None = None, root: str = ROOT,
            changed: list[str] | None = None) -> list[str]:
    """Write the executables into dest atomically (rename), return their paths. One whose
    content is already right is left alone (not rewritten: its mtime stays); the paths
    actually written are appended to `changed` if given."""
    os.makedirs(dest, exist_ok=True)
    paths = []
    for name in names or PLUGINS:
        path = os.path.join(dest, name)
        paths.append(path)
        text = render(name, python, root)
        try:
            with open(path) as f:
                same = f.read() == text and os.access(path, os.X_OK)
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            continue
        tmp = path + ".podnet-tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        if changed is not None:
            changed.append(path)
    return paths
