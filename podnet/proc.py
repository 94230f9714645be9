"""Run a program and collect its output, without the `subprocess` module.

`import subprocess` costs ~13 ms (threading, selectors, signal...), more than
a whole reference plugin run. posix_spawn with in-memory files for stdin,
stdout and stderr needs no threads or polling and cannot deadlock on full pipes.
"""
from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

_FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


def run(argv: Sequence[str], input: bytes | str = b"", env: Mapping[str, str] | None = None) -> Completed:
    """Run argv[0] (resolved in PATH) with `input` on stdin; return Completed.

    Raises FileNotFoundError when the program does not exist.
    """
    exe = which(argv[0])
    if exe is None:
        raise FileNotFoundError("%s: not found in PATH" % argv[0])
    if isinstance(input, str):
        input = input.encode()
    fds = [_memfd("stdin", input), _memfd("stdout"), _memfd("stderr")]
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)]
        pid = os.posix_spawn(exe, list(argv), os.environ if env is None else env,
                             file_actions=actions)
        _, status = os.waitpid(pid, 0)
        return Completed(argv, os.waitstatus_to_exitcode(status), _slurp(fds[1]), _slurp(fds[2]))
    finally:
        for fd in fds:
            os.close(fd)
