"""sysctl through /proc/sys (per network namespace for net.*: the namespace the
calling thread is in when the file is opened)."""
from __future__ import annotations


def path_of(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/") if "/" not in name else "/proc/sys/" + name.lstrip("/")


def read(name: str) -> str:
    with open(path_of(name)) as f:
        return f.read().strip()


def write(name: str, value: object) -> None:
    """Set a sysctl; a no-op write is skipped (writes to some keys have side effects)."""
    path = path_of(name)
    value = str(value)
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(value)


def try_write(name: str, value: object) -> bool:
    """Set a sysctl, ignoring a missing key (as the reference plugins do)."""
    try:
        write(name, value)
        return True
    except OSError:
        return False
