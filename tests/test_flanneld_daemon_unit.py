"""flanneld.daemon without etcd or a kernel: the retry loop's messages and the
periodic reconcile, driven with a fake subnet manager and a fake backend."""
import logging
import threading
import time

from flanneld.daemon import Daemon, parse_args


class FakeSubnetManager:
    pass


def make_daemon(*argv):
    return Daemon(parse_args(list(argv)), FakeSubnetManager())


def test_a_failure_without_a_message_still_says_what_it_was(caplog):
    """A MemoryError (what listing 2^30 subnets ended in) has no text: the log said
    "failed to acquire a lease: " and nothing else."""
    d = make_daemon()
    calls = []

    def action():
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError()
        return "lease"
    d.stop.wait = lambda delay: False          # no real pause
    with caplog.at_level(logging.ERROR, logger="flanneld"):
        assert d._retry(action, "acquire a lease") == "lease"
    (record,) = caplog.records
    assert record.getMessage().startswith("failed to acquire a lease: MemoryError")


# ---- the reconcile loop -------------------------------------------------------------

class FakeBackend:
    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)       # call numbers (1-based) that raise
        self.busy = False
        self.overlaps = 0

    def sync(self, leases):
        if self.busy:
            self.overlaps += 1
        self.busy = True
        try:
            time.sleep(0.001)
            self.calls.append(sorted(leases))
            if len(self.calls) in self.fail:
                raise OSError(19, "No such device")
        finally:
            self.busy = False


class Clock:
    """Stands in for the daemon's stop event: records every wait, stops after `rounds`."""

    def __init__(self, rounds):
        self.waits = []
        self.rounds = rounds

    def wait(self, delay):
        self.waits.append(delay)
        return len(self.waits) > self.rounds

    def is_set(self):
        return False


def reconciling(*argv, fail=()):
    d = make_daemon(*argv)
    d.backend = FakeBackend(fail)
    return d


def test_reconcile_resyncs_the_last_leases_without_etcd():
    d = reconciling("--reconcile-period", "7")
    d.stop = Clock(rounds=3)
    d._reconcile_loop()
    assert d.backend.calls == [] and d.stop.waits == [7, 7, 7, 7]      # nothing listed yet: nothing to sync
    assert d._sync({"b": "lease-b", "a": "lease-a"}) is True
    d.stop = Clock(rounds=3)
    d._reconcile_loop()
    assert d.backend.calls == [["lease-a", "lease-b"]] * 4               # the event's sync, then one per round


def test_failed_rounds_back_off_log_once_and_recover(caplog):
    d = reconciling("--reconcile-period", "5", fail=(2, 3, 4))
    d._sync({"a": "lease-a"})
    d.stop = Clock(rounds=6)
    with caplog.at_level(logging.INFO, logger="flanneld"):
        d._reconcile_loop()
    # rounds: fail, fail, fail (5 -> 10 -> 20 -> 40), then fine again (back to 5)
    assert d.stop.waits == [5, 10, 20, 40, 5, 5, 5]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "backend sync failed (reconcile)" and caplog.records[0].exc_info   # the traceback, once
    assert messages[1:3] == ["backend sync failed again (reconcile): [Errno 19] No such device"] * 2
    assert messages[3] == "backend sync works again (reconcile)" and len(messages) == 4


def test_backoff_is_capped_at_a_minute():
    d = reconciling("--reconcile-period", "5", fail=range(2, 100))
    d._sync({"a": "lease-a"})
    d.stop = Clock(rounds=8)
    d._reconcile_loop()
    assert d.stop.waits == [5, 10, 20, 40, 60, 60, 60, 60, 60]


def test_reconcile_period_0_only_retries_the_iptables_rules():
    d = reconciling("--reconcile-period", "0")
    d._sync({"a": "lease-a"})
    tries = []

    def install():
        tries.append(1)
        if len(tries) < 3:
            raise RuntimeError("iptables-restore failed: line 7: RULE_APPEND failed")
    d._iptables_pending = install
    assert d._apply_iptables() is False
    d.stop = Clock(rounds=50)
    d._reconcile_loop()
    assert len(tries) == 3 and d._iptables_pending is None
    assert d.stop.waits == [5.0, 10.0]           # the default period, backing off; then done: the loop returned
    assert d.backend.calls == [["lease-a"]]      # the backend was not re-synced


def test_event_and_reconcile_syncs_never_overlap_and_the_latest_leases_win():
    d = reconciling("--reconcile-period", "0.001")
    d._sync({})
    t = threading.Thread(target=d._reconcile_loop, daemon=True)
    t.start()
    for i in range(200):
        d._sync({"n": "lease-%03d" % i})
    time.sleep(0.05)
    d.stop.set()
    t.join(2)
    assert not t.is_alive() and d.backend.overlaps == 0
    assert d.backend.calls[-1] == ["lease-199"]      # a reconcile round never goes back to older leases
