"""host-local's on-disk store, file-for-file compatible with the reference plugin.

Layout of <dataDir>/<network name>/ (what containernetworking/plugins'
backend/disk writes, so either plugin can take over the other's store):

    <ip>                 one per allocated address, named by the address as
                         printed (10.1.0.2, fd00::2); content
                         "<containerID>\\r\\n<ifname>", or just "<containerID>"
                         in files written by old versions
    last_reserved_ip.<i> the address last allocated from range set i
    lock                 flock(LOCK_EX)ed for a whole allocation or release

A reservation is atomic: the owner is written to a temporary file
(.podnet-tmp.<pid>) which is then link(2)ed to the address's name. link
fails if the name exists, so O_EXCL's guarantee holds (even a writer that
skips the lock cannot make two containers own one address), and the address
file appears complete or not at all: a kill -9 at any point leaves either no
address file or one naming its owner, which the runtime's DEL releases.
last_reserved_ip.<i> is replaced with rename(2) the same way.

What crashes leave behind, and what becomes of it (all under the lock):
  * temporary files (killed before the link, or between link and unlink):
    only a lock holder writes them, so any seen by a lock holder is dead; every
    listing made under the lock removes them;
  * an empty address file: what a kill -9 between O_EXCL create and write
    leaves in a store written by older podnet or by the reference plugin (which
    writes that way). No DEL can match it (it names no container). It counts
    as taken while fresh (a writer that skips the lock might be at it), and a
    listing under the lock (ADD, DEL, CHECK, GC, and STATUS when a range looks
    full) removes it once it is ORPHAN_AGE seconds old.
"""
import errno
import fcntl
import os
import time

from ipam.allocator import ip_string
from podnet.net.ip import parse_ip

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LAST_RESERVED_PREFIX = "last_reserved_ip."
LOCK_NAME = "lock"
LINE_BREAK = "\r\n"
TMP_PREFIX = ".podnet-tmp."
# An empty address file older than this is a crashed writer's: reclaimed.
ORPHAN_AGE = 10.0


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
        """Every address file in the store, as a list of Allocation.

        Under the lock, also removes what crashed writers left: temporary
        files, and empty address files older than ORPHAN_AGE (module doc).
        A fresh empty file is listed with container_id "": taken, and owned
        by nobody a DEL can name.
        """
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        locked = self._lock_fd >= 0
        for name in names:
            if name == LOCK_NAME or name.startswith(LAST_RESERVED_PREFIX):
                continue
            if name.startswith(TMP_PREFIX):
                if locked:
                    _unlink(self._path(name))
                continue
            try:
                ip = parse_ip(name)
            except ValueError:
                continue   # not an address file (editor leftovers...)
            content = self._read(name)
            if content is None:
                continue   # released meanwhile, or a directory
            container_id, ifname = parse_owner(content)
            if not container_id and locked and self._stale(name):
                self.release(name)
                continue
            out.append(Allocation(name, ip, container_id, ifname))
        return out

    def names(self):
        """The names of the address files, without reading them (cheap)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return [n for n in names if n != LOCK_NAME and not n.startswith(LAST_RESERVED_PREFIX)
                and not n.startswith(TMP_PREFIX)]

    def _stale(self, name):
        try:
            return time.time() - os.stat(self._path(name)).st_mtime > ORPHAN_AGE
        except OSError:
            return False

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
        """Claim `ip` for (container_id, ifname); False if someone holds it already.

        Atomic (module doc): the address file appears with its owner in it, or
        not at all.
        """
        tmp = self._write_tmp(container_id.strip() + LINE_BREAK + ifname)
        try:
            os.link(tmp, self._path(ip_string(ip)))
        except FileExistsError:
            return False
        finally:
            _unlink(tmp)
        return True

    def set_last_reserved(self, range_index, ip):
        tmp = self._write_tmp(ip_string(ip))
        try:
            os.rename(tmp, self._path(LAST_RESERVED_PREFIX + str(range_index)))
        except BaseException:
            _unlink(tmp)
            raise

    def _write_tmp(self, text):
        """A new temporary file in the store holding `text`; its path."""
        path = self._path(TMP_PREFIX + str(os.getpid()))
        data = text.encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, "short write to %s" % path)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        return path

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
        attachment; a fresh empty file stays until it is stale (allocations()
        removes it then). Returns the released file names.
        """
        valid_ids = {cid for cid, _ in valid}
        released = []
        for a in self.allocations():
            if not a.container_id:
                continue
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
