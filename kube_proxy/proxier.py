"""What every proxy mode shares: the flags that shape the rules (`Config`), what a sync
reports (`SyncResult`), the interface a mode implements (`Proxier`: iptables.py,
nftables.py, ipvs.py; server.py picks one with --proxy-mode), and fault isolation
(`Quarantine`, `isolate`).

Fault isolation. Validation (podnet/kube/objects.py, kube_proxy/model.py) keeps out
what the API server would refuse, but the kernel may still refuse a Service's rules
(a rule no check foresaw, a kernel without some match). One refused transaction must
not stop every other Service from being programmed, sync after sync. So when the
kernel refuses a transaction, the mode narrows the failure down to the Service ports
it cannot take (`isolate`: apply halves of the suspects, recursing into the half that
fails: about 1.5 log2(n) trials for one bad port among n), programs everything
else in the same sync, and puts the culprits into the `Quarantine`: each is logged
with the kernel's error and counted, what the kernel held for it before stays (or
nothing, if that is not known), and it is kept out of later syncs until its Service
or endpoints change. A refusal that is not any port's doing (every trial fails, and a
control transaction too) fails the sync as before; the tracker retries it with
backoff.

This module knows no mode: the modes import it, never the other way round.
"""
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from podnet.isolate import Isolation
from podnet.isolate import isolate as _isolate
from podnet.kube.endpointslices import Endpoint, ServicePortName

if TYPE_CHECKING:
    from kube_proxy.model import ProxyState, ServicePort
    from kube_proxy.tracker import Sync
    from podnet.net.conntrack import Flow

log = logging.getLogger("kube_proxy")

# What a transaction the kernel refused raises: podnet.net.iptables.IptablesError,
# podnet.net.nft.NftError and the IPVS mode's ipset errors are RuntimeErrors. A timeout
# (TimeoutError, e.g. the xtables lock) or a missing tool (FileNotFoundError) is nobody's
# rule: it fails the sync, to be retried with backoff.
REFUSED: tuple[type[BaseException], ...] = (RuntimeError,)


@dataclass(frozen=True)
class Config:
    """kube-proxy's flags that shape the rules."""
    cluster_cidr: tuple[str, ...] = ()          # --cluster-cidr: traffic from elsewhere is masqueraded
    masquerade_all: bool = False                # --masquerade-all
    nodeport_addresses: tuple[str, ...] = ()    # --nodeport-addresses resolved to this node's IPs; (): all local
    localhost_nodeports: bool = True            # --iptables-localhost-nodeports (IPv4 only)
    node_ip: str = ""                           # for loadBalancerSourceRanges that contain the node
    family: int = 4                             # the IP family rendered: 4, or 6 (the tracker's family)
    ipvs_scheduler: str = "rr"                  # --ipvs-scheduler

    @property
    def local_detector(self) -> bool:
        return bool(self.cluster_cidr)


@dataclass
class SyncResult:
    full: bool
    seconds: float = 0.0
    changed: int = 0                            # service ports rewritten
    restore_bytes: int = 0
    rules: dict[str, int] = field(default_factory=dict)     # {table: rules}
    conntrack_deleted: int = 0
    chains_written: int | None = None           # full syncs: chains (re)written or deleted (0: the kernel was right)
    refused: int = 0                            # transactions the kernel refused (isolation included)
    quarantined: tuple["Quarantined", ...] = ()  # put into quarantine by this sync
    in_quarantine: int = 0                      # service ports in quarantine after it


class Proxier(Protocol):
    """One proxy mode: what server.ProxyServer drives.

    mode        "iptables" | "nftables" | "ipvs" (--proxy-mode)
    setup()     create what it needs once (base chains, tables, devices); idempotent
    sync(sync)  apply one tracker.Sync: a full one may rewrite everything it owns, a
                partial one only `sync.changed`. Service ports whose rules the kernel
                refuses are quarantined (SyncResult.quarantined) and everything else is
                applied; raises only if that fails too (the caller marks the next sync
                full and backs off)
    cleanup()   remove everything it owns (kube-proxy --cleanup, and switching modes),
                leaving what another mode that is still there shares with it
    """
    mode: str

    def setup(self) -> None: ...

    def sync(self, sync: "Sync") -> SyncResult: ...

    def cleanup(self) -> None: ...


def clear_stale_udp_flows(sync: "Sync", ipv6: bool = False) -> int:
    """Conntrack entries of UDP flows to removed endpoints (and to Services that had no
    endpoints before) would keep sending datagrams nowhere: delete them, as kube-proxy does."""
    doomed_dst: set[tuple[str, int]] = set()
    doomed_via: set[tuple[tuple[str | None, int], tuple[str, int]]] = set()
    for name in sync.changed:
        if name.protocol != "UDP":
            continue
        old_port, old_eps = sync.previous.get(name, (None, ()))
        new_port = sync.state.service_ports.get(name)
        new_eps = {(e.ip, e.port) for e in sync.state.endpoints_for(name)} if new_port else set()
        if old_port is not None:
            frontends: list[tuple[str | None, int]] = [
                (ip, old_port.port) for ip in (old_port.cluster_ip,) + old_port.external_ips
                + old_port.load_balancer_ips]
            if old_port.node_port:
                frontends.append((None, old_port.node_port))
            for ep in old_eps:
                if (ep.ip, ep.port) not in new_eps:
                    doomed_via.update((front, (ep.ip, ep.port)) for front in frontends)
        if new_port is not None and new_eps and not old_eps:
            doomed_dst.update((ip, new_port.port) for ip in (new_port.cluster_ip,) + new_port.external_ips
                              + new_port.load_balancer_ips)
    if not doomed_dst and not doomed_via:
        return 0

    def doomed(flow: "Flow") -> bool:
        if flow.proto != 17:
            return False
        if (flow.dst, flow.dport) in doomed_dst:
            return True
        backend = (flow.reply_src, flow.reply_sport)
        return ((flow.dst, flow.dport), backend) in doomed_via or ((None, flow.dport), backend) in doomed_via

    from podnet.net import conntrack
    try:
        return conntrack.delete_flows(doomed, 10 if ipv6 else 2)
    except OSError as e:
        logging.getLogger("kube_proxy").warning("could not clear stale UDP conntrack entries: %s", e)
        return 0


# ---- fault isolation ---------------------------------------------------------------------------

Input = tuple["ServicePort | None", tuple[Endpoint, ...]]
NOTHING: Input = (None, ())


def isolate(suspects: Sequence[ServicePortName], trial: Callable[[list[ServicePortName]], object],
            control: Callable[[], object] | None = None) -> Isolation[ServicePortName]:
    """Which of `suspects` the kernel refuses on their own (podnet.isolate.isolate, with the
    proxiers' REFUSED errors)."""
    return _isolate(suspects, trial, REFUSED, control)


@dataclass(frozen=True)
class Quarantined:
    """A service port whose rules the kernel refused."""
    name: ServicePortName
    refused: Input          # the ServicePort and endpoints that were refused: kept out until they change
    fallback: Input         # what stays programmed for it meanwhile (NOTHING: no rules at all)
    error: str

    def __str__(self) -> str:
        return "%s (%s)" % (self.name, self.name.protocol)


class Quarantine:
    """The service ports kept out of syncs because the kernel refused their rules.

    A quarantined port is synced as its `fallback` (what the kernel held for it before:
    the previous ServicePort and endpoints, or nothing) until its input in the desired
    state differs from what was refused; then it is tried again like any changed port.
    `effective()` turns the tracker's Sync into the one a mode applies."""

    def __init__(self) -> None:
        self.ports: dict[ServicePortName, Quarantined] = {}
        self.total = 0                      # ever quarantined (a counter)

    def __len__(self) -> int:
        return len(self.ports)

    def __contains__(self, name: object) -> bool:
        return name in self.ports

    def effective(self, sync: "Sync") -> "Sync":
        """`sync` with each quarantined port replaced by its fallback, and the ports whose
        input changed since they were refused released (and marked changed, their previous
        being the fallback the kernel holds). The same Sync when nothing is quarantined."""
        if not self.ports:
            return sync
        from kube_proxy.tracker import Sync
        state = sync.state
        released = {}
        for name, q in list(self.ports.items()):
            if (state.service_ports.get(name), state.endpoints_for(name)) != q.refused:
                released[name] = q.fallback
                del self.ports[name]
                log.info("service port %s changed: out of quarantine, its rules are tried again", q)
        if not self.ports and not released:
            return sync
        previous = dict(sync.previous)
        previous.update(released)
        changed = (sync.changed | released.keys()) - self.ports.keys()
        return Sync(_with(state, {name: q.fallback for name, q in self.ports.items()}), frozenset(changed),
                    sync.full, sync.reason, MappingProxyType(previous))

    @staticmethod
    def fallback(sync: "Sync", name: ServicePortName) -> Input:
        """What the kernel holds for `name` when this (effective) Sync's change of it is
        refused: its previous input if it changed in this sync, else nothing known."""
        if name not in sync.changed:
            return NOTHING
        port, eps = sync.previous.get(name, NOTHING)
        return (port, eps) if port is not None else NOTHING

    def add(self, sync: "Sync", bad: Sequence[tuple[ServicePortName, str]]) -> tuple[Quarantined, ...]:
        """Quarantine `bad` ([(name, kernel's error)]) of the effective `sync`; logs each."""
        out = []
        for name, error in bad:
            q = Quarantined(name, (sync.state.service_ports.get(name), sync.state.endpoints_for(name)),
                            self.fallback(sync, name), error)
            self.ports[name] = q
            self.total += 1
            out.append(q)
            log.warning("quarantined service port %s: the kernel refused its rules: %s; %s until the "
                        "Service or its endpoints change", q, error,
                        "its previous rules stay" if q.fallback[0] is not None else "it has no rules")
        return tuple(out)

    def fallback_state(self, sync: "Sync", names: Sequence[ServicePortName]) -> "ProxyState":
        """The (effective) Sync's state with `names` at their fallback: what the kernel
        should hold once they are quarantined."""
        return _with(sync.state, {name: self.fallback(sync, name) for name in names})


def _with(state: "ProxyState", inputs: dict[ServicePortName, Input]) -> "ProxyState":
    """`state` with these service ports' ServicePort and endpoints replaced (None: absent)."""
    from kube_proxy.model import ProxyState
    ports, endpoints = dict(state.service_ports), dict(state.endpoints)
    for name, (port, eps) in inputs.items():
        if port is None:
            ports.pop(name, None)
        else:
            ports[name] = port
        if port is not None and eps:
            endpoints[name] = eps
        else:
            endpoints.pop(name, None)
    return ProxyState.of(ports, endpoints)
