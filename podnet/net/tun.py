"""TUN devices: open (create or attach to) a layer-3 TUN through /dev/net/tun.

A TUN is a network device whose packets a process reads and writes on a file
descriptor. TUNSETIFF creates the device, or attaches to an existing TUN of
that name (a persistent one that no process holds); TUNSETPERSIST decides
whether the device outlives the last descriptor. Reading and writing the fd
(the per-packet work) stays with the caller.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

# <linux/if_tun.h>, <linux/if.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000             # no 4-byte packet-information prefix
IFF_VNET_HDR = 0x4000          # every packet carries a virtio_net_hdr
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")      # struct ifreq: ifr_name, ifr_flags, padding to 40 bytes


def open_tun(name: str, persist: bool = False, vnet: bool = False,
             busy_hint: str = "another process holds it") -> tuple[int, str]:
    """Create the TUN `name` (IFF_TUN | IFF_NO_PI), or attach to an existing one;
    returns (fd, the device's name as the kernel has it). The fd is close-on-exec.

    persist: the device stays when the fd is closed (TUNSETPERSIST).
    vnet: every packet read or written carries a virtio_net_hdr (IFF_VNET_HDR).
    A refused TUNSETIFF raises OSError "cannot open TUN <name>: <strerror>", with a
    hint for EBUSY (`busy_hint`: a process holds the device) and EINVAL (the name is
    taken by a device that is not a TUN, or a TUN with other flags).
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifreq(name, flags))
        except OSError as e:
            hint = {errno.EBUSY: busy_hint,
                    errno.EINVAL: "a device of that name exists and is not a TUN of ours"}
            raise OSError(e.errno, "cannot open TUN %s: %s%s" % (
                name, e.strerror, (": " + hint[e.errno]) if e.errno in hint else "")) from None
        fcntl.ioctl(fd, TUNSETPERSIST, 1 if persist else 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, ifreq_name(ifr)


def ifreq(name: str, flags: int) -> bytes:
    """struct ifreq with ifr_name and ifr_flags: what TUNSETIFF reads (and writes back)."""
    return _IFREQ.pack(name.encode(), flags)


def ifreq_name(ifr: bytes) -> str:
    """The ifr_name of a struct ifreq."""
    return ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
