"""Subnet leases from Kubernetes Node objects (flanneld --kube-subnet-mgr), as flannel keeps them.

    sm = KubeSubnetManager(lambda: make_client(api_url, kubeconfig), "/etc/kube-flannel/net-conf.json")
    config = sm.get_network_config()          # net-conf.json (the kube-flannel-cfg ConfigMap)
    lease = sm.acquire_lease(public_ip, "vxlan", {"VNI": 1, "VtepMAC": "..."})
    leases, revision = sm.list_leases()
    for kind, payload in sm.watch_leases(revision, stop_event): ...

In Kubernetes mode nothing is allocated here: a node's subnet is its
`spec.podCIDR(s)` (the node IPAM controller's, or set by hand), and what the
other nodes need to reach it is published as annotations on its Node object,
under the prefix `flannel.alpha.coreos.com/` (--kube-annotation-prefix), written
exactly as flannel writes them (pkg/subnet/kube in flannel v0.28):

    flannel.alpha.coreos.com/backend-type:         vxlan
    flannel.alpha.coreos.com/backend-data:         {"VNI":1,"VtepMAC":"62:8d:37:1f:a5:45"}
    flannel.alpha.coreos.com/kube-subnet-manager:  true
    flannel.alpha.coreos.com/public-ip:            192.168.50.2

backend-data is the backend's attributes as Go's encoding/json writes them
(compact, in the struct's field order: VNI, then VtepMAC) or `null` when the
backend has none (host-gw, udp). If the Node carries `public-ip-overwrite`, that
address is published as public-ip instead of ours. The annotations go in with one
strategic-merge PATCH of nodes/NAME/status naming only the keys that differ, and
none at all when nothing differs (flannel sends an empty patch then); once the
node is configured, a second PATCH of the same shape sets the NetworkUnavailable
condition to False ("FlannelIsUp"), as flannel does (--set-node-network-unavailable).
Those are the only writes: kube-flannel's ClusterRole grants pods get, nodes
get/list/watch and nodes/status patch, and that is all this manager uses.

Other nodes: one list + watch of Nodes (podnet.kube.api.KubeApiSource: paging,
bookmarks, reconnects with backoff, 410 Gone -> re-list) into an ObjectCache that
keeps, per Node, the Lease it stands for, or None for a Node that is not flannel's:
without `kube-subnet-manager: "true"` (an upstream rule: those Nodes are ignored),
without an IPv4 podCIDR, or with annotations that do not parse (logged once per
change, with the reason). So kubelet's status updates, which change nothing of
that, cause no event at all, and a re-list turns into exactly the leases added,
changed and gone. Those become the etcd manager's events: ("put", Lease),
("delete", subnet); several changes that arrived together are handed over as one
("resync", every lease), so a re-list of 1,000 Nodes costs the daemon one backend
sync, not 1,000. Leases do not expire: renew_lease() only returns the lease.

A restarted daemon keeps its VTEP's MAC: stored_attributes() reads it back from
its own Node's backend-data (and the node-public-ip annotation, which flannel uses
as --public-ip), and the daemon hands it to the backend before it creates the
device, so the other nodes' FDB and neighbour entries stay valid.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from flanneld.config import parse
from flanneld.subnet import DEFAULT_TTL, Lease
from podnet.kube.nodes import node_annotations, pod_cidrs
from podnet.kube.objects import InvalidObject, short
from podnet.net.ip import AF_INET, parse_ip

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

    from flanneld.config import NetworkConfig
    from flanneld.subnet import BackendData, LeaseEvent
    from podnet.kube.events import Event
    from podnet.kube.nodes import NodeClient
    from podnet.net.ip import IP, IPNet

log = logging.getLogger("flanneld.subnet.kube")

DEFAULT_ANNOTATION_PREFIX = "flannel.alpha.coreos.com"
DEFAULT_NET_CONF = "/etc/kube-flannel/net-conf.json"
NETWORK_UNAVAILABLE = "NetworkUnavailable"
EVENT_BUFFER = 10000            # changes kept for a slow reader before it is handed a resync instead
LIST_WAIT = 30.0                # list_leases() waits this long for the first complete list, then raises

_PREFIX_FORMAT = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?\Z")


class AnnotationNames(NamedTuple):
    kube_managed: str
    backend_data: str
    backend_v6_data: str
    backend_type: str
    public_ip: str
    public_ipv6: str
    node_public_ip: str
    node_public_ipv6: str
    public_ip_overwrite: str
    public_ipv6_overwrite: str


def annotation_names(prefix: str = DEFAULT_ANNOTATION_PREFIX) -> AnnotationNames:
    """flannel's annotation keys under `prefix` ("fqdn", "fqdn/" or "fqdn/name-", as
    --kube-annotation-prefix allows: without a slash one is added, a part after the slash
    is joined with "-"). ValueError for a prefix flannel refuses."""
    if prefix.count("/") > 1:
        raise ValueError("annotation prefix %r: at most one slash" % prefix)
    if "/" not in prefix:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if not _PREFIX_FORMAT.search(prefix):
        raise ValueError("annotation prefix %r must be fqdn/[0-9a-z-_]*" % prefix)
    return AnnotationNames(*(prefix + name for name in (
        "kube-subnet-manager", "backend-data", "backend-v6-data", "backend-type", "public-ip", "public-ipv6",
        "node-public-ip", "node-public-ipv6", "public-ip-overwrite", "public-ipv6-overwrite")))


# ---- the pure pieces: annotations <-> leases --------------------------------------------------

def backend_data_text(data: BackendData | None) -> str:
    """BackendData as Go's json.Marshal writes it into the annotation: compact, keys in the
    order given (a backend's struct order), "null" for none."""
    if not data:
        return "null"
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def annotation_patch(current: Mapping[str, str], names: AnnotationNames, backend_type: str,
                     backend_data: BackendData | None, public_ip: str) -> dict[str, str]:
    """The annotations to write ({} when the Node already says it all), by flannel's rules:
    the backend type and kube-subnet-manager always, the data and public-ip unless a vxlan
    backend has no data yet, public-ip-overwrite (when set) taking the place of our address."""
    data = backend_data_text(backend_data)
    overwrite = current.get(names.public_ip_overwrite, "")
    stale = (current.get(names.backend_data) != data or current.get(names.backend_type) != backend_type
             or current.get(names.public_ip) != public_ip or current.get(names.kube_managed) != "true"
             or (overwrite != "" and overwrite != public_ip))
    if not stale:
        return {}
    want = {names.backend_type: backend_type}
    if backend_type != "vxlan" or data != "null":
        want[names.backend_data] = data
        if overwrite:
            if current.get(names.public_ip) != overwrite:
                log.info("overriding public ip with %s from node annotation %s", overwrite,
                         names.public_ip_overwrite)
                want[names.public_ip] = overwrite
        else:
            want[names.public_ip] = public_ip
    want[names.kube_managed] = "true"
    return {k: v for k, v in sorted(want.items()) if current.get(k) != v}


def first_ipv4(cidrs: list[IPNet]) -> IPNet | None:
    return next((c for c in cidrs if c.family == AF_INET), None)


def node_lease(node: Mapping[str, Any], names: AnnotationNames) -> Lease | None:
    """The Lease a Node stands for; None for a Node that is not flannel's (no
    kube-subnet-manager "true"). InvalidObject, saying why, for one that is but cannot be
    used (no IPv4 podCIDR, a public-ip or backend-data that does not parse)."""
    ann = node_annotations(node)
    if ann.get(names.kube_managed) != "true":
        return None
    text = ann.get(names.public_ip, "")
    try:
        public_ip = parse_ip(text)
    except ValueError:
        public_ip = None
    if public_ip is None or public_ip.family != AF_INET:
        raise InvalidObject("annotation %s: %s is not an IPv4 address" % (names.public_ip, short(text)))
    subnet = first_ipv4(pod_cidrs(node))
    if subnet is None:
        raise InvalidObject("no IPv4 podCIDR (spec.podCIDR / spec.podCIDRs)")
    raw = ann.get(names.backend_data) or "null"
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidObject("annotation %s: %s is not JSON" % (names.backend_data, short(raw))) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidObject("annotation %s: %s is not a JSON object" % (names.backend_data, short(raw)))
    return Lease(subnet, public_ip, ann.get(names.backend_type, ""), data)


def leases_of_nodes(nodes: Iterable[Mapping[str, Any]],
                    prefix: str = DEFAULT_ANNOTATION_PREFIX) -> list[Lease]:
    """Every lease the Nodes stand for (what `list_leases` answers from the API), the Nodes that
    are not flannel's or cannot be used left out: for the diagnosis of a --kube-subnet-mgr
    cluster, where leases live in Node annotations, not in etcd."""
    names = annotation_names(prefix)
    out = []
    for node in nodes:
        try:
            lease = node_lease(node, names)
        except InvalidObject:
            continue
        if lease is not None:
            out.append(lease)
    return out


def stored_mac(node: Mapping[str, Any], names: AnnotationNames) -> str | None:
    """The VtepMAC this node published before (a restart keeps it), if any."""
    try:
        data = json.loads(node_annotations(node).get(names.backend_data) or "null")
    except ValueError:
        return None
    mac = data.get("VtepMAC") if isinstance(data, dict) else None
    return mac if isinstance(mac, str) and mac else None


def network_unavailable_patch(now: float) -> dict[str, Any]:
    """flannel's CompleteLease body: NetworkUnavailable False, reason FlannelIsUp, the
    fields in NodeCondition's order, times as metav1.Time writes them (RFC 3339, UTC)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return {"status": {"conditions": [{
        "type": NETWORK_UNAVAILABLE, "status": "False", "lastHeartbeatTime": stamp, "lastTransitionTime": stamp,
        "reason": "FlannelIsUp", "message": "Flannel is running on this node"}]}}


def lease_events(old: Lease | None, new: Lease | None) -> list[LeaseEvent]:
    """What one Node's change means to the daemon."""
    out: list[LeaseEvent] = []
    if old is not None and (new is None or old.subnet != new.subnet):
        out.append(("delete", old.subnet))
    if new is not None and new != old:
        out.append(("put", new))
    return out


class PodCIDRMissing(LookupError):
    """Our Node has no IPv4 podCIDR yet."""


# ---- the manager -------------------------------------------------------------------------

class KubeSubnetManager:
    """flanneld.subnet.SubnetManager over Node objects (see the module's docstring)."""

    def __init__(self, client_factory: Callable[[], Any], net_config_path: str = DEFAULT_NET_CONF,
                 annotation_prefix: str = DEFAULT_ANNOTATION_PREFIX, node_name: str | None = None,
                 environ: Mapping[str, str] | None = None, set_network_unavailable: bool = True,
                 page_size: int = 500, watch_timeout: tuple[float, float] = (300, 600),
                 backoff: tuple[float, float] = (0.8, 30.0), list_wait: float = LIST_WAIT,
                 event_buffer: int = EVENT_BUFFER) -> None:
        from podnet.kube.cache import ObjectCache
        self.names = annotation_names(annotation_prefix)
        self.net_config_path = net_config_path
        self.node_name = node_name
        self.environ = os.environ if environ is None else environ
        self.set_network_unavailable = set_network_unavailable
        self.page_size, self.watch_timeout, self.backoff = page_size, watch_timeout, backoff
        self.list_wait = list_wait
        self._client_factory = client_factory
        self._api_client: Any = None
        self._nodes: NodeClient | None = None
        self._source: Any = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._cond = threading.Condition()
        self._cache: ObjectCache[Lease | None] = ObjectCache(("Node",), transform=self._transform)
        self._events: collections.deque[tuple[int, LeaseEvent]] = collections.deque(maxlen=event_buffer)
        self._seq = 0
        self._invalid: dict[str, str] = {}      # node name -> why its lease is unusable (logged once)
        self.watch_events = 0                   # Node events received (list + watch)
        self.last_event: float | None = None     # time.time() of the last one

    def __repr__(self) -> str:
        return "KubeSubnetManager(%s)" % (self.node_name or "node not known yet")

    # ---- the API client ----

    @property
    def api_client(self) -> Any:
        with self._cond:
            if self._api_client is None:
                self._api_client = self._client_factory()
            return self._api_client

    @property
    def nodes(self) -> NodeClient:
        if self._nodes is None:
            from podnet.kube.nodes import NodeClient
            self._nodes = NodeClient(self.api_client)
        return self._nodes

    def resolve_node_name(self) -> str:
        """Our Node's name ($NODE_NAME, or our Pod's spec.nodeName): see podnet.kube.nodes."""
        if self.node_name is None:
            from podnet.kube.nodes import node_name_from_env
            self.node_name = node_name_from_env(self.environ, self.nodes.get_pod)
            log.info("this is node %s", self.node_name)
        return self.node_name

    # ---- SubnetManager ----

    def get_network_config(self) -> NetworkConfig:
        with open(self.net_config_path, encoding="utf-8") as f:
            return parse(f.read())

    def stored_attributes(self) -> tuple[str | None, str | None]:
        """(node-public-ip, VtepMAC) our Node published before; (None, None) if it cannot be read."""
        name = self.resolve_node_name()
        try:
            node = self.nodes.get_node(name)
        except Exception as e:
            log.error("failed to read node %s for its stored annotations: %s", name, e)
            return None, None
        if node is None:
            return None, None
        public_ip = node_annotations(node).get(self.names.node_public_ip) or None
        return public_ip, stored_mac(node, self.names)

    def acquire_lease(self, public_ip: IP, backend_type: str, backend_data: BackendData,
                      ttl: int = DEFAULT_TTL) -> Lease:
        """Our Node's podCIDR as the lease, once our annotations are on the Node."""
        name = self.resolve_node_name()
        node = self.nodes.get_node(name)
        if node is None:
            raise LookupError("node %s does not exist (yet)" % name)
        subnet = first_ipv4(pod_cidrs(node))
        if subnet is None:
            raise PodCIDRMissing("node %s has no IPv4 podCIDR yet: waiting for one (the node IPAM controller "
                                 "assigns it: kube-controller-manager --allocate-node-cidrs; or set spec.podCIDR)"
                                 % name)
        network = self.get_network_config().network
        if subnet.prefixlen < network.prefixlen or not network.contains(subnet.network):
            raise ValueError("the network %s of %s does not contain node %s's podCIDR %s"
                             % (network, self.net_config_path, name, subnet))
        patch = annotation_patch(node_annotations(node), self.names, backend_type, backend_data, str(public_ip))
        if patch:
            self.nodes.patch_node_status(name, {"metadata": {"annotations": patch}})
            log.info("node %s annotated: %s", name, ", ".join("%s=%s" % kv for kv in patch.items()))
        return Lease(subnet, public_ip, backend_type, dict(backend_data or {}))

    def renew_lease(self, lease: Lease) -> Lease:
        return lease        # a Node's podCIDR does not expire

    def complete_lease(self, lease: Lease) -> None:
        """Once the node is configured: NetworkUnavailable False (unless turned off)."""
        if not self.set_network_unavailable:
            return
        name = self.resolve_node_name()
        self.nodes.patch_node_status(name, network_unavailable_patch(time.time()))
        log.info("node %s: condition %s set to False (FlannelIsUp)", name, NETWORK_UNAVAILABLE)

    def list_leases(self) -> tuple[list[Lease], int]:
        self.start()
        deadline = time.monotonic() + self.list_wait
        with self._cond:
            while not self._cache.ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no complete list of Nodes from the API after %gs" % self.list_wait)
                self._cond.wait(remaining)
            return self._leases(), self._seq

    def watch_leases(self, revision: int, stop_event: threading.Event) -> Iterator[LeaseEvent]:
        """Changes after `revision` (a list_leases() answer) until stop_event is set; one
        change as it is, several at once (or more than the buffer held) as a resync."""
        position = revision
        while not stop_event.is_set():
            with self._cond:
                if self._seq <= position:
                    self._cond.wait(0.5)
                    if self._seq <= position:
                        continue
                oldest = self._events[0][0] if self._events else self._seq + 1
                if self._seq - position > 1 or position + 1 < oldest:
                    out: LeaseEvent = ("resync", self._leases())
                else:
                    out = self._events[-1][1]
                position = self._seq
            yield out

    # ---- the Node list + watch ----

    def start(self) -> None:
        """Start following Nodes (once)."""
        with self._cond:
            if self._source is not None:
                return
            from podnet.kube.api import KubeApiSource
            self._source = KubeApiSource(self._on_event, api_client=self.api_client, kinds=("Node",),
                                         page_size=self.page_size, watch_timeout=self.watch_timeout,
                                         backoff=self.backoff)
            self._threads = self._source.start()

    def stop(self, timeout: float = 5) -> None:
        with self._cond:
            source, self._stopping = self._source, True
        if source is not None:
            source.stop(timeout)

    def _transform(self, kind: str, node: Any) -> Lease | None:
        name = node.get("metadata", {}).get("name", "?") if isinstance(node, dict) else "?"
        try:
            lease = node_lease(node, self.names)
        except Exception as e:
            why = str(e) if isinstance(e, InvalidObject) else "unexpected %s: %s" % (type(e).__name__, e)
            if self._invalid.get(name) != why:
                log.warning("ignoring node %s: %s", name, why)
                self._invalid[name] = why
            return None
        if self._invalid.pop(name, None) is not None:
            log.info("node %s is usable again", name)
        return lease

    def _on_event(self, event: Event) -> None:
        """The source's thread: the cache, then the changes it made, for watch_leases()."""
        with self._cond:
            self.watch_events += 1
            self.last_event = time.time()
            changes = self._cache.apply(event)
            if event.type == "DELETED" or event.type == "RELIST":
                live = {key[1] for key, _ in self._cache.items("Node")}
                for name in list(self._invalid):
                    if name not in live:
                        del self._invalid[name]
            for change in changes:
                for lease_event in lease_events(change.old, change.new):
                    self._push(lease_event)
                    if lease_event[0] == "delete":
                        # another Node claiming the same subnet (a misconfiguration) is what is left
                        for other in self._cache.values("Node"):
                            if other is not None and other.subnet == lease_event[1]:
                                self._push(("put", other))
                                break
            self._cond.notify_all()

    def _push(self, lease_event: LeaseEvent) -> None:
        self._seq += 1
        self._events.append((self._seq, lease_event))

    def _leases(self) -> list[Lease]:
        return [lease for lease in self._cache.values("Node") if lease is not None]

    # ---- for metrics and health ----

    def stats(self) -> dict[str, int]:
        """Nodes known, by what they are to flanneld; list + watch figures."""
        with self._cond:
            total = self._cache.count("Node")
            leases = sum(1 for v in self._cache.values("Node") if v is not None)
            invalid = len(self._invalid)
        source = self._source
        return {"nodes": total, "leases": leases, "invalid": invalid, "ignored": total - leases - invalid,
                "relists": source.relists.get("Node", 0) if source is not None else 0,
                "events": self.watch_events}

    def alive(self) -> tuple[bool, str]:
        """The Node watch's thread is running (once started)."""
        source = self._source
        if source is None:
            return True, ""
        if not self._stopping and not all(t.is_alive() for t in self._threads):
            return False, "the Node watch thread has died"
        return True, ""
