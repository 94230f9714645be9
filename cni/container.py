"""Reaching into the container's network namespace, with the CNI errors the spec asks for.

Shared by the plugins that create interfaces in a container (bridge, calico):
they also share the roll-back of a failed ADD.
a missing netns path is "unknown container" (code 3), anything else that is
not a usable network namespace is "invalid environment" (code 4), and a
kernel refusal becomes code 101 with the operation named.
"""
from __future__ import annotations

from cni import errors
from cni.errors import CNIError
from podnet.net.netlink import Netlink
from podnet.net.netns import open_netns

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


def open_container_netns(path: str) -> int:
    """An fd of the container's network namespace (close-on-exec)."""
    try:
        return open_netns(path)
    except FileNotFoundError:
        raise CNIError(errors.UNKNOWN_CONTAINER, "failed to open netns %r: no such file" % path) from None
    except OSError as e:
        raise CNIError(errors.INVALID_ENV, "failed to open netns %r: %s" % (path, e.strerror)) from None
    except ValueError:      # a NUL in the path
        raise CNIError(errors.INVALID_ENV, "failed to open netns %r: not a valid path" % path) from None


def container_netlink(ns_fd: int, path: str) -> Netlink:
    """A Netlink socket living in the container's namespace."""
    try:
        return Netlink(netns=ns_fd)
    except OSError as e:
        if e.errno == 22:   # EINVAL from setns: e.g. a regular file
            raise CNIError(errors.INVALID_ENV, "%r is not a network namespace" % path) from None
        raise CNIError(errors.INVALID_ENV, "failed to open netns %r: %s" % (path, e.strerror)) from None


def kernel_error(what: str, e: OSError) -> CNIError:
    return CNIError(errors.KERNEL, "%s: %s" % (what, e.strerror or e))


def roll_back(undo: Sequence[Callable[[], object]]) -> None:
    """Run a failed ADD's undo actions, newest first. Best effort: the caller reports the
    original error, not a cleanup's."""
    for action in reversed(undo):
        try:
            action()
        except Exception:
            pass
