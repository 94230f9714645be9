"""The NetworkPolicy agent's sync loop: source events -> object cache -> model -> dataplane.

Sources (podnet.kube.api or podnet.kube.manifests, kinds NetworkPolicy, Pod and
Namespace) emit events from their own threads into a queue; one thread drains it
into an `ObjectCache` whose transform parses each object with the model's parse
functions (network_policy/model.py) through `parse_or_skip`: a malformed object
is logged once with the path of what is wrong and stored as None, meaning
absent, so a later fix is an ordinary change. Every change goes on to
`PolicyModel.set_pod / set_namespace / set_policy`, which keeps the desired
state incrementally; the dataplane (network_policy/nftables.py) writes what
changed since its last sync in one nft transaction.

Timing, as kube-proxy's bounded-frequency runner: nothing is synced before every
kind has been listed once (`ObjectCache.ready`: a start must never briefly open
or close everything because the pods or the policies are not in yet); then the
first change after a quiet spell is synced at once and later ones are coalesced
to one sync per `min_sync_period`. Every `full_sync_period`, at the first sync
and after a failure the sync is full (the dataplane re-renders the whole table
and reads back what the kernel has). A sync that fails is retried as a full one
with exponential backoff: min_sync_period (1 s if 0) x 2^failures, at most
`max_retry`. Policies the kernel refuses are quarantined by the dataplane;
the loop logs each newly quarantined one as a warning.

`synced_through` is a wall-clock time such that everything the source had seen by
then is in the kernel (or changed nothing); it is exported as a metric, so a test
or an operator can wait for "my change is enforced" without sleeping. A source
that can say how far it has looked emits HORIZON markers: the manifests poller
(`manifest_source`) sends, after each scan, the time that scan started, so a file
written before a time T is enforced once synced_through > T. Without markers
(the API source) it is the time the last event was taken in.

Dropped packets the ruleset logs (rate-limited, `log group N prefix "<direction>
<namespace>"`) are read from NFLOG in a thread of their own (`DropLogger`) and
written as one line each, naming the pod and the peer from their addresses.
When the kernel refuses the NFLOG bind the agent runs on without those lines.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from podnet.kube.cache import Change, ObjectCache, resource_key
from podnet.kube.events import DELETED, RELIST, Event, drain
from podnet.kube.objects import parse_or_skip

TYPE_CHECKING = False
if TYPE_CHECKING:
    from network_policy.metrics import Metrics
    from podnet.kube.events import Source
    from podnet.net.nflog import LoggedPacket

log = logging.getLogger("network_policy")
drops_log = logging.getLogger("network_policy.drops")

KINDS = ("NetworkPolicy", "Pod", "Namespace")
HORIZON = "HORIZON"     # an Event type of ours: Event(HORIZON, "", t): the source has emitted all it saw by t
DEFAULT_MAX_RETRY = 30.0        # the longest wait before a failed sync is retried
# same-node pod-to-pod traffic on a Linux bridge (flannel's cni0) is bridged, and reaches the
# inet forward hook only with these on (per network namespace on this kernel)
BR_NETFILTER_SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")

Key = tuple[str, str]


class Dataplane(Protocol):
    """What the loop needs of network_policy.nftables.NftablesDataplane."""

    def sync(self, full: bool = False) -> Any: ...

    def cleanup(self) -> None: ...

    def drop_counts(self) -> dict[str, int]: ...


class _OnceLogger(logging.Logger):
    """What parse_or_skip logs through: each object's reason once (a re-list or a rewrite of the
    same bad object says nothing new), again when the reason changes or after `forget`."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(target.name)
        self.target = target
        self.said: dict[tuple[str, str], str] = {}

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        if len(args) == 3:
            what, name, reason = (str(a) for a in args)
            if self.said.get((what, name)) == reason:
                return
            self.said[(what, name)] = reason
        kwargs.setdefault("stacklevel", 2)
        self.target.warning(msg, *args, **kwargs)

    def forget(self, what: str, key: Key) -> None:
        self.said.pop((what, "%s/%s" % key), None)


def enable_bridge_netfilter() -> list[str]:
    """Turn br_netfilter's bridge-nf-call-iptables/ip6tables on in this network namespace (see
    BR_NETFILTER_SYSCTLS); returns the ones this call changed. Missing keys (no bridge support)
    are logged, not fatal: routed traffic is policed all the same."""
    from podnet.net import sysctl
    changed, on = [], []
    for name in BR_NETFILTER_SYSCTLS:
        try:
            if sysctl.read(name) != "1":
                sysctl.write(name, 1)
                changed.append(name)
            on.append(name)
        except OSError as e:
            log.warning("cannot set %s=1 (%s): pod-to-pod traffic bridged on this node is not policed", name, e)
    if on:
        log.info("%s %s: traffic bridged between this node's pods passes the forward hook",
                 " and ".join(on), "set to 1" if changed else "on already")
    return changed


class PolicyAgent:
    """Events in (`apply`), syncs out (`sync_once` when `next_sync_at` says so); `run` is the
    loop around them. Pure apart from the model and the dataplane it is given, and
    single-threaded: sources hand their events over through `emit` (a queue)."""

    def __init__(self, model: Any, dataplane: Dataplane, node: str, min_sync_period: float = 1.0,
                 full_sync_period: float = 3600.0, max_retry: float = DEFAULT_MAX_RETRY,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 parsers: Mapping[str, Callable[[object], Any]] | None = None) -> None:
        if parsers is None:
            from network_policy import model as policy_model
            parsers = {"Pod": policy_model.parse_pod, "Namespace": policy_model.parse_namespace,
                       "NetworkPolicy": policy_model.parse_policy}
        self.model = model
        self.dataplane = dataplane
        self.node = node
        self.parsers = parsers
        self.min_sync_period = float(min_sync_period)
        self.full_sync_period = float(full_sync_period)
        self.max_retry = float(max_retry)
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.events: queue.Queue[Event] = queue.Queue()
        self.stopping = threading.Event()
        self.cache: ObjectCache[Any] = ObjectCache(KINDS, self._parse)
        self.skipped = _OnceLogger(logging.getLogger("network_policy.objects"))
        self.invalid: dict[tuple[str, Key], str] = {}          # (kind, key) -> why it is skipped
        self.pods_by_ip: dict[str, Key] = {}
        self.dirty = False                                      # changes not yet synced
        self.full_reason: str | None = "first sync"
        self.failures = 0                                       # syncs in a row that failed
        self.syncs = 0
        self.last_sync: float | None = None
        self.last_full: float | None = None
        self.retry_at: float | None = None
        self.received_through: float | None = None             # the source's horizon, or the last event's time
        self.horizons = False                                   # the source sends HORIZON markers
        self.synced_through: float | None = None
        self.quarantined: frozenset[Key] = frozenset()

    # ---- events -------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Where sources hand events (from any thread)."""
        self.events.put(event)

    def apply(self, event: Event) -> None:
        """One source event into the cache and the model (a bug shown by one object is logged
        and costs only that event), or a HORIZON marker."""
        if event.type == HORIZON:
            self.horizons = True
            self.received_through = float(event.obj)
            if not self.dirty and self.full_reason is None and self.last_sync is not None:
                self._caught_up()
            return
        try:
            changes = self.cache.apply(event)
            if event.type == RELIST:
                self._forget_missing(event)
            elif event.type == DELETED:
                self._forget(event.kind, resource_key(event.kind, event.obj))
        except Exception:
            log.exception("skipping a %s %s event", event.type, event.kind)
            changes = []
        for change in changes:
            try:
                self._changed(change)
            except Exception:       # a bug one object shows costs that object, not the others
                log.exception("%s %s/%s: the model could not take this change; a full sync follows",
                              change.kind, change.key[0], change.key[1])
                self.full_reason = self.full_reason or "after a model error"
        if not self.horizons:
            self.received_through = self.wall_clock()
        if changes:
            self.dirty = True
            if self.metrics is not None:
                self.metrics.queued()
        elif not self.dirty and self.full_reason is None and self.last_sync is not None:
            self._caught_up()

    def _parse(self, kind: str, obj: Any) -> Any:
        value, reason = parse_or_skip(kind, self.parsers[kind], obj, (), None, self.skipped)
        key = resource_key(kind, obj)
        if key is not None:
            if reason is None:
                self._forget(kind, key)
            else:
                self.invalid[(kind, key)] = reason
        return value

    def _forget_missing(self, event: Event) -> None:
        """After a RELIST: bad objects no longer listed are gone, not bad."""
        listed = {resource_key(event.kind, obj) for obj in event.obj} if isinstance(event.obj, list) else set()
        for kind, key in [k for k in self.invalid if k[0] == event.kind and k[1] not in listed]:
            self._forget(kind, key)

    def _forget(self, kind: str, key: Key | None) -> None:
        if key is not None and self.invalid.pop((kind, key), None) is not None:
            self.skipped.forget(kind, key if kind != "Namespace" else ("default", key[1]))

    def _changed(self, change: Change[Any]) -> None:
        kind, key, new = change.kind, change.key, change.new
        if kind == "Pod":
            self._index_pod(key, change.old, new)
            self.model.set_pod(key, new)
        elif kind == "Namespace":
            self.model.set_namespace(key[1], new)
        else:
            self.model.set_policy(key, new)

    def _index_pod(self, key: Key, old: Any, new: Any) -> None:
        for ip in getattr(old, "ips", ()):
            if self.pods_by_ip.get(ip) == key:
                del self.pods_by_ip[ip]
        if new is not None and new.addressable:     # a hostNetwork pod's address is its node's
            for ip in new.ips:
                self.pods_by_ip[ip] = key

    # ---- syncing ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.cache.ready

    def retry_delay(self) -> float:
        if not self.failures:
            return 0.0
        return min(self.max_retry, (self.min_sync_period or 1.0) * 2.0 ** min(self.failures, 62))

    def next_sync_at(self, now: float) -> float | None:
        """When the next sync is due (a clock value; <= now: at once), or None: nothing to do."""
        if not self.ready:
            return None
        earliest = now if self.last_sync is None else max(now, self.last_sync + self.min_sync_period)
        if self.retry_at is not None:
            earliest = max(earliest, self.retry_at)
        if self.dirty or self.full_reason is not None:
            return earliest
        if self.last_full is not None:
            return max(earliest, self.last_full + self.full_sync_period)
        return None

    def sync_once(self, now: float | None = None) -> Any:
        """One dataplane sync now; its SyncResult, or None when it failed (retried later, full)."""
        now = self.clock() if now is None else now
        reason = self.full_reason
        if reason is None and self.last_full is not None and now - self.last_full >= self.full_sync_period:
            reason = "periodic full sync"
        through = self.received_through
        self.dirty = False
        try:
            result = self.dataplane.sync(full=reason is not None)
        except Exception as e:
            self.failures += 1
            self.full_reason = "retry after a failed sync"
            self.retry_at = now + self.retry_delay()
            self.last_sync = now
            self.dirty = True
            if self.metrics is not None:
                self.metrics.failed()
            log.error("sync failed (%d in a row; the next one is full, in %.1f s): %s",
                      self.failures, self.retry_delay(), e)
            return None
        self.failures = 0
        self.retry_at = None
        self.last_sync = now
        self.syncs += 1
        if reason is not None:
            self.last_full = now
            self.full_reason = None
        self.synced_through = through
        self._report(result, reason)
        return result

    def _report(self, result: Any, reason: str | None) -> None:
        if self.metrics is not None:
            self.metrics.synced(result, self.synced_through)
            self.report_counts()
        log.info("%s sync%s: %d policies, %d chains, %d rules, %d sets, %d elements, %d changed, %.3f s",
                 "full" if result.full else "partial", " (%s)" % reason if reason else "", result.policies,
                 result.chains, result.rules, result.sets, result.elements, result.changed, result.seconds)
        quarantined = frozenset(tuple(k) for k in result.quarantined)
        for key in sorted(quarantined - self.quarantined):
            detail = self._quarantine_reason(key)
            log.warning("policy %s/%s quarantined: the kernel refused its rules%s; it is left out, every other "
                        "policy is enforced", key[0], key[1], ": %s" % detail if detail else "")
        for key in sorted(self.quarantined - quarantined):
            log.info("policy %s/%s is out of quarantine", key[0], key[1])
        if self.metrics is not None:
            self.metrics.quarantines.inc(len(quarantined - self.quarantined))
        self.quarantined = quarantined

    def _quarantine_reason(self, key: Key) -> str | None:
        """What the kernel said of a quarantined policy (NftablesDataplane.quarantine: key ->
        (policy, error)), when the dataplane keeps it."""
        entry = getattr(self.dataplane, "quarantine", {}).get(key)
        return str(entry[1]) if isinstance(entry, tuple) and len(entry) > 1 else None

    def _caught_up(self) -> None:
        self.synced_through = self.received_through
        if self.metrics is not None and self.synced_through is not None:
            self.metrics.caught_up(self.synced_through)

    def report_counts(self) -> None:
        if self.metrics is None:
            return
        pods = [p for p in self.cache.values("Pod") if p is not None and p.ips]
        local = sum(1 for p in pods if p.node == self.node and p.addressable)
        invalid = {kind: 0 for kind in KINDS}
        for kind, _ in self.invalid:
            invalid[kind] += 1
        self.metrics.counts(policies=sum(1 for p in self.cache.values("NetworkPolicy") if p is not None),
                            pods=len(pods), local_pods=local,
                            namespaces=sum(1 for n in self.cache.values("Namespace") if n is not None),
                            invalid=invalid)

    # ---- the loop -----------------------------------------------------------------------

    def step(self, timeout: float = 1.0) -> Any:
        """One turn of the loop: sync if due, else take in events for up to `timeout` s (less
        when a sync comes due sooner). The sync's result, or None."""
        now = self.clock()
        when = self.next_sync_at(now)
        if when is not None and when <= now:
            return self.sync_once(now)
        drain(self.events, timeout if when is None else min(timeout, when - now), self.apply)
        return None

    def run(self, source: Source) -> None:
        """Until stop(): the source started, events taken in, syncs when due; the source stopped
        at the end. Rules stay in the kernel."""
        source.start()
        try:
            while not self.stopping.is_set():
                self.step()
        finally:
            source.stop()

    def stop(self, *_: object) -> None:
        self.stopping.set()

    # ---- dropped packets --------------------------------------------------------------------

    def describe_address(self, ip: str) -> str:
        """A pod's "namespace/name (ip)", or the bare address when no pod has it."""
        key = self.pods_by_ip.get(ip)
        return "%s/%s (%s)" % (key[0], key[1], ip) if key else ip

    def drop_line(self, logged: LoggedPacket) -> tuple[str, str] | None:
        """(direction, the log line) for one NFLOG packet of our ruleset; None when its prefix
        is not ours or it carries no IP packet."""
        direction, _, namespace = logged.prefix.strip().partition(" ")
        packet = logged.packet
        if direction not in ("ingress", "egress") or packet is None:
            return None
        pod, peer = (packet.dst, packet.src) if direction == "ingress" else (packet.src, packet.dst)
        if packet.protocol in (6, 17, 132):
            what = "%s port %d" % (packet.protocol_name, packet.dport)
        elif packet.protocol in (1, 58):
            what = "%s type %d" % (packet.protocol_name, packet.sport)
        else:
            what = "protocol %s" % packet.protocol_name
        if direction == "ingress":
            line = "dropped ingress to %s from %s: %s" % (self.describe_address(pod), self.describe_address(peer), what)
        else:
            line = "dropped egress from %s to %s: %s" % (self.describe_address(pod), self.describe_address(peer), what)
        if namespace and pod not in self.pods_by_ip:
            line += " (policy namespace %s)" % namespace
        return direction, line


def manifest_source(directory: str, emit: Callable[[Event], None], interval: float,
                    wall_clock: Callable[[], float] = time.time) -> Any:
    """podnet.kube.manifests.ManifestSource of our kinds with a HORIZON marker after every scan:
    the time it started (files written before it have been read)."""
    from podnet.kube.manifests import ManifestSource
    return ManifestSource(directory, emit, interval=interval, clock=wall_clock, kinds=KINDS,
                          after_scan=lambda started: emit(Event(HORIZON, "", started)))


class DropLogger:
    """Reads the ruleset's NFLOG group in a thread and logs one line per dropped packet."""

    def __init__(self, agent: PolicyAgent, group: int) -> None:
        self.agent = agent
        self.group = group
        self.listener: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Bind the group and start reading; False (logged) when the kernel refuses the bind."""
        from podnet.net.nflog import NflogListener
        try:
            self.listener = NflogListener(self.group)
        except OSError as e:
            log.warning("cannot read NFLOG group %d (%s): running without a log line per dropped packet",
                        self.group, e)
            self._listening(False)
            return False
        self._listening(True)
        self._thread = threading.Thread(target=self._run, name="nflog", daemon=True)
        self._thread.start()
        log.info("logging dropped packets from NFLOG group %d", self.group)
        return True

    def _listening(self, up: bool) -> None:
        if self.agent.metrics is not None:
            self.agent.metrics.nflog_listening.set(1 if up else 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                packets = self.listener.receive(0.5)
            except OSError as e:
                log.warning("reading NFLOG group %d failed: %s; no more drop lines", self.group, e)
                self._listening(False)
                return
            for logged in packets:
                self.handle(logged)

    def handle(self, logged: LoggedPacket) -> None:
        found = self.agent.drop_line(logged)
        if found is None:
            return
        direction, line = found
        drops_log.info("%s", line)
        if self.agent.metrics is not None:
            self.agent.metrics.logged_drops.labels(direction).inc()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
