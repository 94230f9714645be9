"""Entering network namespaces.

Python 3.11 has no os.setns (3.12 does); `import ctypes` costs ~3 ms, its C
core `_ctypes` 0.5 ms, so setns(2) is bound through `_ctypes` directly.
Namespace switches apply to the calling thread only: CNI plugins are
single-threaded, and `entered` always switches back.
"""
from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Self

CLONE_NEWNET = 0x40000000
_setns_func: Callable[[int, int], None] | None = None


def _libc_setns() -> Callable[[int, int], None]:
    import _ctypes

    class _CInt(_ctypes._SimpleCData):
        _type_ = "i"

    class _Func(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = _CInt

    class _Libc:
        _handle = _ctypes.dlopen(None, 0)        # type: ignore[arg-type]  # (None: the program itself)

    func = _Func(("setns", _Libc()))            # type: ignore[arg-type]  # (_Libc stands in for a CDLL)

    def setns(fd: int, nstype: int) -> None:
        if func(fd, nstype) != 0:
            err = _ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return setns


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    global _setns_func
    if _setns_func is None:
        _setns_func = getattr(os, "setns", None) or _libc_setns()
    _setns_func(fd, nstype)


def open_netns(path: str) -> int:
    """Open a netns file (e.g. /var/run/netns/x or /proc/PID/ns/net); fd is close-on-exec."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class entered:
    """`with entered(path_or_fd):` runs the block inside that network namespace."""

    def __init__(self, target: str | int) -> None:
        self.target = target
        self._home: int | None = None
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if isinstance(self.target, int):
                fd = self.target
            else:
                fd = self._fd = open_netns(self.target)
            try:
                setns(fd)
            except OSError as e:
                raise OSError(e.errno, "%s is not a network namespace: %s" % (self.target, e.strerror)) from None
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._home is not None, "not entered"
        try:
            setns(self._home)
        finally:
            self._close()

    def _close(self) -> None:
        for fd in (self._fd, self._home):
            if fd is not None:
                os.close(fd)
        self._fd = self._home = None
