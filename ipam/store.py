"""host-local's on-disk store, file-for-file compatible with the reference plugin.

Layout of <dataDir>/<network name>/ (what containernetworking/plugins'
backend/disk writes, so either plugin can take over the other's store):

    <ip>                 one per allocated address, named by the address as
                         printed (10.1.0.2, fd00::2); content
                         "<containerID>\\r\\n<ifname>", or just "<containerID>"
                         in files written by old versions
    last_reserved_ip.<i> the address last allocated from range set i
    lock                 flock(LOCK_EX)ed for a whole allocation or release

Address files are created with O_CREAT|O_EXCL, so even a writer that skips
the lock cannot make two containers own one address.
"""
import errno
import fcntl
import os

from ipam.allocator import ip_string
from podnet.net.ip import parse_ip

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LAST_RESERVED_PREFIX = "last_reserved_ip."
LOCK_NAME = "lock"
LINE_BREAK = "\r\n"


class Allocation:
    """One address file: who holds the address (ifname None for legacy files)."""

    __slots__ = ("name", "ip", "container_id", "ifname")

    def __init__(self, name, ip, container_id, ifname):
        self.name = name
        self.ip = ip
        self.container_id = container_id
        self.ifname = ifname

    def __repr__(self):
        return "Allocation(%s, %r, %r)" % (self.name, self.container_id, self.ifname)


def parse_owner(content):
    """File content -> (containerID, ifname or None), tolerating whitespace like the reference."""
    text = content.strip()
    container_id, sep, ifname = text.partition(LINE_BREAK)
    if not sep:
        return text, None
    return container_id, ifname


class Store:
    """The store directory of one network. Use `with store:` to hold its lock."""

    def __init__(self, network, data_dir=None):
        self.dir = os.path.join(data_dir or DEFAULT_DATA_DIR, network)
        self._lock_fd = -1

    def exists(self):
        return os.path.isdir(self.dir)

    # -- locking ----------------------------------------------------------

    def lock(self):
        """Block until this process holds the store's exclusive lock.

        Creates the directory and the lock file when missing, as the
        reference does; callers that must not create check exists() first.
        """
        if self._lock_fd >= 0:
            raise RuntimeError("store lock already held")
        path = self._path(LOCK_NAME)
        flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(self.dir, 0o755, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    break
                except InterruptedError:
                    continue
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def unlock(self):
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)   # closing the only descriptor drops the flock

    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc):
        self.unlock()

    # -- reading ------------------------------------------------------------

    def allocations(self):
        """Every address file in the store, as a list of Allocation."""
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            if name == LOCK_NAME or name.startswith(LAST_RESERVED_PREFIX):
                continue
            try:
                ip = parse_ip(name)
            except ValueError:
                continue   # not an address file (editor leftovers, temp files...)
            content = self._read(name)
            if content is None:
                continue   # released meanwhile, or a directory
            container_id, ifname = parse_owner(content)
            out.append(Allocation(name, ip, container_id, ifname))
        return out

    def last_reserved(self, range_index):
        """The last address allocated from range set `range_index`, or None."""
        content = self._read(LAST_RESERVED_PREFIX + str(range_index))
        if not content:
            return None
        try:
            return parse_ip(content.strip())
        except ValueError:
            return None   # a torn or foreign file only costs round-robin once

    def _read(self, name):
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            # Store files are a few dozen bytes: one read usually reaches EOF.
            chunks = [os.read(fd, 4096)]
            while len(chunks[-1]) == 4096:
                chunks.append(os.read(fd, 4096))
        except OSError:
            return None   # e.g. a directory
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "replace")

    # -- writing ------------------------------------------------------------

    def reserve(self, ip, container_id, ifname):
        """Claim `ip` for (container_id, ifname); False if someone holds it already."""
        path = self._path(ip_string(ip))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        data = (container_id.strip() + LINE_BREAK + ifname).encode()
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, "short write to %s" % path)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        return True

    def set_last_reserved(self, range_index, ip):
        path = self._path(LAST_RESERVED_PREFIX + str(range_index))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, ip_string(ip).encode())
        finally:
            os.close(fd)

    def release(self, name):
        """Remove one address file; True if it existed."""
        return _unlink(self._path(name))

    def release_by_id(self, container_id, ifname):
        """Release the addresses of (container_id, ifname); return their file names.

        As the reference: files naming the interface first; only if there are
        none, legacy files that hold just the container ID.
        """
        container_id = container_id.strip()
        mine = self.find(container_id, ifname)
        return [a.name for a in mine if self.release(a.name)]

    def find(self, container_id, ifname, allocations=None):
        """Allocations of (container_id, ifname), falling back to legacy files."""
        container_id = container_id.strip()
        if allocations is None:
            allocations = self.allocations()
        exact = [a for a in allocations if a.container_id == container_id and a.ifname == ifname]
        if exact:
            return exact
        return [a for a in allocations if a.container_id == container_id and a.ifname is None]

    def gc(self, valid):
        """Release every allocation not in `valid`, a set of (containerID, ifname).

        A legacy file (no ifname) stays while its container has any valid
        attachment. Returns the released file names.
        """
        valid_ids = {cid for cid, _ in valid}
        released = []
        for a in self.allocations():
            if a.ifname is None:
                keep = a.container_id in valid_ids
            else:
                keep = (a.container_id, a.ifname) in valid
            if not keep and self.release(a.name):
                released.append(a.name)
        return released

    def _path(self, name):
        return self.dir + "/" + name


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except (FileNotFoundError, IsADirectoryError):
        return False
