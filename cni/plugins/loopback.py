"""loopback: bring `lo` up in the container (and down again on DEL)."""
from __future__ import annotations

import os

from cni import errors
from cni.container import container_netlink, open_container_netns
from cni.errors import CNIError
from podnet.net.ip import AF_INET6
from podnet.net.netlink import NetlinkError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cni.skel import Commands


def _open(args):
    """A Netlink socket in the container's netns, with the spec's errors (cni.container)."""
    fd = open_container_netns(args.netns)
    try:
        return container_netlink(fd, args.netns)
    finally:
        os.close(fd)


def cmd_add(args):
    with _open(args) as nl:
        lo = nl.link("lo")
        try:
            nl.set_link(lo.index, up=True)
        except NetlinkError as e:
            raise CNIError(errors.KERNEL, "failed to set lo up: %s" % e.strerror) from None
        ips = [{"interface": 0, "address": str(a.net)}
               for a in sorted(nl.addrs(lo.index), key=lambda a: a.net.family == AF_INET6)]
    return {"interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00", "sandbox": args.netns}],
            "ips": ips, "routes": [], "dns": {}}


def cmd_del(args):
    if not args.netns:
        return None
    try:
        nl = _open(args)
    except CNIError as e:
        if e.code == errors.UNKNOWN_CONTAINER:
            return None   # the sandbox is gone: nothing to undo
        raise
    with nl:
        lo = nl.link("lo")
        if lo is not None:
            nl.set_link(lo.index, up=False)
    return None


def cmd_check(args):
    with _open(args) as nl:
        lo = nl.link("lo")
        if lo is None or not lo.up:
            raise CNIError(errors.INVALID_NETCONF, "loopback interface is down")
    return None


COMMANDS: Commands = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}


def main() -> None:
    from cni.skel import run_plugin
    run_plugin(COMMANDS, about="podnet loopback plugin")
