"""What every proxy mode shares: the flags that shape the rules (`Config`), what a sync
reports (`SyncResult`), and the interface a mode implements (`Proxier`: iptables.py,
nftables.py, ipvs.py; server.py picks one with --proxy-mode).

This module knows no mode: the modes import it, never the other way round.
"""
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kube_proxy.tracker import Sync
    from podnet.net.conntrack import Flow


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


class Proxier(Protocol):
    """One proxy mode: what server.ProxyServer drives.

    mode        "iptables" | "nftables" | "ipvs" (--proxy-mode)
    setup()     create what it needs once (base chains, tables, devices); idempotent
    sync(sync)  apply one tracker.Sync: a full one may rewrite everything it owns, a
                partial one only `sync.changed`; raises if the kernel refused (the
                caller marks the next sync full)
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

