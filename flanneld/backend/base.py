"""The interface every flanneld backend implements, and what they share.

The daemon drives a backend level-triggered: after any change it hands over
the complete set of remote leases, and the backend makes the kernel match
(desired state as plain data -> diff against what the kernel has -> apply).
A rerun with the same leases changes nothing; a restarted daemon finds its
own earlier state in the kernel and leaves it alone.

Lifecycle, as the daemon calls it:
    backend = backend_class(type)(network_config, external_interface)
    data, mtu = backend.register()     # create the device; BackendData for our lease, pod MTU
    backend.configure(own_lease)       # device addresses for our subnet
    backend.sync(remote_leases)        # many times: program routes / neighbours / FDB
    backend.close()                    # stop threads; the datapath stays in place

`Backend` states this as code: an abstract base class, because every backend
shares its constructor (`config`, `ext`) and its `type` attribute, and the
daemon constructs one through the class that `backend_class` returns; a
backend that lacks one of the five methods cannot be instantiated.

Routes a backend installs carry ROUTE_PROTOCOL, so that the diff recognises
its own routes (and `ip route show proto 77` shows them to an operator).

A lease a backend cannot use is skipped with a log line saying why, once
(SkippedLeases): every sync sees every lease again, and a bad lease must not
be reported on each of them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping, Sequence

    from flanneld.config import NetworkConfig
    from flanneld.subnet import BackendData, Lease
    from podnet.net.ip import IP

ROUTE_PROTOCOL = 77      # "podnet flanneld" in route listings


class ExternalInterface:
    """The node's underlay interface: where encapsulated traffic leaves."""

    __slots__ = ("name", "index", "ip", "prefixlen", "mtu")

    name: str
    index: int
    ip: IP
    prefixlen: int
    mtu: int

    def __init__(self, name: str, index: int, ip: IP, prefixlen: int, mtu: int) -> None:
        self.name = name
        self.index = index
        self.ip = ip                # IP: the public IP (flannel's --public-ip)
        self.prefixlen = prefixlen  # of that address: which remotes are on our L2 segment
        self.mtu = mtu

    def __repr__(self) -> str:
        return "ExternalInterface(%s %s/%d mtu %d)" % (self.name, self.ip, self.prefixlen, self.mtu)


class Backend(ABC):
    """One backend type (vxlan, host-gw, udp) on one node."""

    type: ClassVar[str] = ""     # the config's Backend.Type, and the BackendType of our lease

    def __init__(self, config: NetworkConfig, ext: ExternalInterface) -> None:
        self.config = config
        self.ext = ext

    @abstractmethod
    def register(self) -> tuple[BackendData, int]:
        """Create what the backend needs once; returns (BackendData dict, pod MTU)."""

    @abstractmethod
    def configure(self, own_lease: Lease) -> None:
        """Addresses for this node's subnet on the backend's device (if any)."""

    @abstractmethod
    def desired(self, remote_leases: Sequence[Lease]) -> Mapping[Any, object]:
        """Pure: the kernel state wanted for these leases, as plain data (each
        backend's own shape)."""

    @abstractmethod
    def sync(self, remote_leases: Sequence[Lease]) -> Sequence[str] | None:
        """Make the kernel match desired(remote_leases). Idempotent, and cheap when
        nothing is to change: the daemon calls it after every event and every
        --reconcile-period. Leases of another backend type, or unusable ones, are
        skipped, said once (SkippedLeases). Returns the changes made, if the
        backend reports them (the daemon ignores it)."""

    @abstractmethod
    def close(self) -> None:
        """Stop background work. Never tears down the datapath: pods keep talking
        across a daemon restart."""


class SkippedLeases:
    """Says once why a lease is skipped. A round is one desired() call:

        self.skipped.begin()
        ... self.skipped.skip(lease, logging.WARNING, "skipping lease %s: %s", lease.subnet, why)
        self.skipped.end()

    A skip is logged when it was not in the previous round: the first time, when
    the lease (public IP, backend type, data) or the reason changes, and when the
    lease comes back after a round in which it was gone or usable. The same bad
    lease in round after round is logged only the first time.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._said: set[tuple[str, str, str]] = set()       # the previous round's (subnet, lease, message)
        self._now: set[tuple[str, str, str]] = set()

    def begin(self) -> None:
        self._now = set()

    def skip(self, lease: Lease, level: int, msg: str, *args: object) -> None:
        text = msg % args if args else msg
        key = (str(lease.subnet), lease.value(), text)
        self._now.add(key)
        if key not in self._said:
            self.logger.log(level, "%s", text)

    def end(self) -> None:
        self._said, self._now = self._now, set()
