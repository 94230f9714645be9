"""Whether a sync loop keeps up with its changes: what the agents' /healthz and /livez answer.

A loop is healthy while no change has waited longer than `timeout` for a sync; before its first
sync, for `timeout` after start (a node with no objects never syncs, yet is not stuck). Ready
once one sync has succeeded. kube-proxy and the NetworkPolicy agent share this, so both
answer alike; each renders the answer its own way (kube-proxy's JSON body, a plain reason).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    healthy: bool
    reason: str             # "" when healthy
    last_updated: float     # now when healthy, else the last sync (or the start)


class SyncHealth:
    def __init__(self, timeout: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self.clock = clock
        self.lock = threading.Lock()        # the loop's thread writes, the HTTP handlers read
        self.started = clock()
        self.last_sync: float | None = None
        self.pending_since: float | None = None     # the oldest change not yet synced

    def queued(self, now: float | None = None) -> None:
        with self.lock:
            if self.pending_since is None:
                self.pending_since = self.clock() if now is None else now

    def synced(self, now: float | None = None) -> None:
        with self.lock:
            self.last_sync = self.clock() if now is None else now
            self.pending_since = None

    def check(self) -> Health:
        with self.lock:
            now = self.clock()
            if self.last_sync is None:
                if now - self.started < self.timeout:
                    return Health(True, "", now)
                return Health(False, "no sync in the %.0f s since start" % (now - self.started), self.started)
            if self.pending_since is None or now - self.pending_since < self.timeout:
                return Health(True, "", now)
            return Health(False, "a change has waited %.0f s for a sync (last sync %.0f s ago)" % (
                now - self.pending_since, now - self.last_sync), self.last_sync)

    def readiness(self) -> tuple[bool, str]:
        with self.lock:
            return (False, "no successful sync yet") if self.last_sync is None else (True, "")
