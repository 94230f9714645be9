"""Run a program and collect its output, without the `subprocess` module, within a bound.

`import subprocess` costs ~13 ms (threading, selectors, signal...), more than
a whole reference plugin run. posix_spawn with in-memory files for stdin,
stdout and stderr needs no threads and cannot deadlock on full pipes.

Every run is bounded: the wait for the child is a poll(2) on its pidfd
(Linux 5.3+; waitpid(WNOHANG) with backing-off sleeps where pidfd_open is
missing) against a monotonic deadline. A child still running at the deadline
gets SIGTERM, SIGKILL after TERM_GRACE seconds, and the caller gets
TimeoutExpired naming the program and the bound. `feed()` is the streaming
form (stdin a pipe, written while the caller produces it).
"""
from __future__ import annotations

import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

_FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The bound of a run whose caller names none: a program we know nothing about, e.g. a
# delegated CNI plugin (cni/invoke.py), whose own tool calls are bounded tighter (an
# iptables-restore: 5 s lock wait + 10 s, podnet/net/iptables.py). A bridge ADD whose
# restores hang pays two of those (the masquerade set-up, then its roll-back's delete: 30 s)
# before it reports; 60 s stays above that, so the inner bound fires first and names the
# real culprit, and well below kubelet's 2-minute runtime request timeout.
DEFAULT_TIMEOUT = 60.0
TERM_GRACE = 1.0            # SIGTERM -> SIGKILL
_REAP_WAIT = 5.0            # after SIGKILL (a child in uninterruptible sleep may take a while)
_SIGTERM, _SIGKILL = 15, 9  # Linux (pidfds are Linux-only anyway); `signal` costs an `enum` import


class Completed:
    __slots__ = ("argv", "returncode", "stdout", "stderr")
    argv: Sequence[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    def __init__(self, argv: Sequence[str], returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return "Completed(%r, rc=%d)" % (self.argv[0], self.returncode)


class TimeoutExpired(TimeoutError):
    """The program did not finish within `timeout` seconds and was killed (SIGTERM, then
    SIGKILL). `stdout`/`stderr` hold what it wrote until then; `reaped` is False only if
    it did not even die within a few seconds of SIGKILL (it is then left a zombie). `how`
    (in the message) says which signal ended it."""

    def __init__(self, argv: Sequence[str], timeout: float, pid: int, stdout: bytes = b"",
                 stderr: bytes = b"", how: str = "killed it") -> None:
        self.argv = argv
        self.timeout = timeout
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.reaped = "not exited" not in how
        tail = stderr.decode(errors="replace").strip()[-500:]
        super().__init__("%s did not finish within %g s; %s%s" % (
            argv[0], timeout, how, ("; its stderr so far: " + tail) if tail else ""))


def which(name: str, path: str | None = None) -> str | None:
    """Find an executable by name in `path` (a PATH string), then the usual dirs."""
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    dirs = (path if path is not None else os.environ.get("PATH", "")).split(":")
    for d in dirs + _FALLBACK_PATH.split(":"):
        if d:
            candidate = d + "/" + name
            if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
                return candidate
    return None


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _slurp(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class _Child:
    """A spawned child and a bounded wait for it (its pidfd, else waitpid polling)."""

    __slots__ = ("pid", "pidfd", "status", "killed")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None
        self.killed = False
        try:
            # The child cannot be reaped (nor its pid reused) before we wait for it,
            # so opening its pidfd after the spawn is race-free, even if it already exited.
            self.pidfd = os.pidfd_open(pid)
        except OSError:         # ENOSYS before Linux 5.3 (or a seccomp filter)
            self.pidfd = -1

    def wait(self, seconds: float) -> int | None:
        """The exit code once the child has exited (reaped), or None if it is still running
        after `seconds`."""
        if self.status is not None:
            return self.status
        deadline = time.monotonic() + seconds
        if self.pidfd >= 0:
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            while not poller.poll(max(0, int((deadline - time.monotonic()) * 1000) + 1)):
                if time.monotonic() >= deadline:
                    return None
            return self._reap(0)
        delay = 0.0005
        while True:
            status = self._reap(os.WNOHANG)
            if status is not None:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)

    def _reap(self, flags: int) -> int | None:
        pid, status = os.waitpid(self.pid, flags)
        if pid == 0:
            return None
        self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def kill(self, grace: float = TERM_GRACE) -> str:
        """SIGTERM, SIGKILL after `grace` s (at once if grace is 0), then reap; says how it
        went. Only the first call signals and waits."""
        if self.killed or self.status is not None:
            return "it had exited" if self.status is not None else "killed it, but it has not exited"
        self.killed = True
        try:
            if grace > 0:
                os.kill(self.pid, _SIGTERM)
                if self.wait(grace) is not None:
                    return "killed it (SIGTERM)"
            os.kill(self.pid, _SIGKILL)
        except ProcessLookupError:      # reaped behind our back (a waitpid(-1) elsewhere)
            self.status = -_SIGKILL
            return "it is gone"
        how = "killed it (SIGKILL%s)" % (", SIGTERM ignored for %g s" % grace if grace > 0 else "")
        if self.wait(_REAP_WAIT) is None:
            how += ", but it has not exited %g s later" % _REAP_WAIT
        return how

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _spawn(argv: Sequence[str], env: Mapping[str, str] | None, stdio: Sequence[int]) -> _Child:
    exe = which(argv[0])
    if exe is None:
        raise FileNotFoundError("%s: not found in PATH" % argv[0])
    actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)]
    return _Child(os.posix_spawn(exe, list(argv), os.environ if env is None else env, file_actions=actions))


def run(argv: Sequence[str], input: bytes | str = b"", env: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT) -> Completed:
    """Run argv[0] (resolved in PATH) with `input` on stdin; return Completed.

    Raises FileNotFoundError when the program does not exist, and TimeoutExpired
    (a TimeoutError) when it is still running after `timeout` seconds (it is killed).
    """
    if isinstance(input, str):
        input = input.encode()
    fds = [_memfd("stdin", input), _memfd("stdout"), _memfd("stderr")]
    try:
        child = _spawn(argv, env, fds)
        try:
            try:
                code = child.wait(timeout)
            except BaseException:   # e.g. KeyboardInterrupt in the wait: leave no orphan running
                child.kill(grace=0)
                raise
            if code is None:
                how = child.kill()
                raise TimeoutExpired(argv, timeout, child.pid, _slurp(fds[1]), _slurp(fds[2]), how)
        finally:
            child.close()
        return Completed(argv, code, _slurp(fds[1]), _slurp(fds[2]))
    finally:
        for fd in fds:
            os.close(fd)


def feed(argv: Sequence[str], chunks: Iterable[bytes], env: Mapping[str, str] | None = None,
         timeout: float = DEFAULT_TIMEOUT, per_mib: float = 0.0) -> Completed:
    """Like run(), with stdin a pipe fed from `chunks` while the caller produces them (the
    child parses while the caller renders). If producing a chunk raises, the child is killed
    (SIGKILL) before it reads the end of its input, and the exception propagates. If the
    child stops reading (it failed), the rest of `chunks` is not consumed.

    The bound counts only the time spent waiting for the child (blocked writes and the final
    wait for its exit), not the caller's own time producing chunks: `timeout` seconds plus
    `per_mib` seconds per MiB written."""
    rfd, wfd = os.pipe()                  # both close-on-exec; the child gets rfd as its fd 0
    fds = [_memfd("stdout"), _memfd("stderr")]
    child: _Child | None = None
    try:
        child = _spawn(argv, env, [rfd] + fds)
        os.close(rfd)
        rfd = -1
        os.set_blocking(wfd, False)
        waited, written = 0.0, 0
        poller = select.poll()
        poller.register(wfd, select.POLLOUT)
        if child.pidfd >= 0:
            poller.register(child.pidfd, select.POLLIN)

        def allowed() -> float:
            return timeout + per_mib * written / (1 << 20)

        def expired() -> TimeoutExpired:
            assert child is not None
            how = child.kill()
            return TimeoutExpired(argv, round(allowed(), 2), child.pid, _slurp(fds[0]), _slurp(fds[1]), how)

        try:
            exited = False
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    try:
                        n = os.write(wfd, view)
                    except BlockingIOError:
                        left = allowed() - waited
                        if left <= 0:
                            raise expired() from None
                        started = time.monotonic()
                        events = poller.poll(int(min(left, 0.25) * 1000) + 1)
                        waited += time.monotonic() - started
                        if any(fd == child.pidfd for fd, _ in events) or (
                                child.pidfd < 0 and child.wait(0) is not None):
                            exited = True       # it exited without reading everything
                            break
                        continue
                    except BrokenPipeError:     # it closed its stdin: it failed, reported below
                        exited = True
                        break
                    written += n
                    view = view[n:]
                if exited:
                    break
            os.close(wfd)
            wfd = -1
            code = child.wait(max(0.0, allowed() - waited))
            if code is None:
                raise expired()
        except BaseException:    # producing a chunk failed: kill the child before its input ends
            child.kill(grace=0)  # (a no-op after expired(): it signals and waits only once)
            raise
        return Completed(argv, code, _slurp(fds[0]), _slurp(fds[1]))
    finally:
        if child is not None:
            child.close()
        for fd in [rfd, wfd] + fds:
            if fd >= 0:
                os.close(fd)
