"""sysctl through /proc/sys (per network namespace for net.*: the namespace the
calling thread is in when the file is opened)."""


def path_of(name):
    return "/proc/sys/" + name.replace(".", "/") if "/" not in name else "/proc/sys/" + name.lstrip("/")


def read(name):
    with open(path_of(name)) as f:
        return f.read().strip()


def write(name, value):
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


def try_write(name, value):
    """Set a sysctl, ignoring a missing key (as the reference plugins do)."""
    try:
        write(name, value)
        return True
    except OSError:
        return False
