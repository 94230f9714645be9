"""Interrupted netlink dumps on the real kernel (the unit tests use a fake socket:
tests/test_netlink_messages.py).

A namespace holds 100 veth pairs, so a link dump spans many datagrams; another
thread keeps adding and deleting a veth pair there, and the kernel marks the
dumps it overlaps NLM_F_DUMP_INTR. Netlink.links() must read each such dump to
its end, ask again, and return only whole snapshots: every one of our 200
links in every answer.
"""
import threading
import time

from podnet.net.netlink import Netlink

PAIRS = 100


def test_link_dumps_interrupted_by_changes_are_retried_into_whole_snapshots(lab):
    ns = lab.namespace("intr")
    ns.run(["ip", "-batch", "-"], input="".join("link add v%d type veth peer name w%d\n" % (i, i)
                                                   for i in range(PAIRS)))
    ours = {"v%d" % i for i in range(PAIRS)} | {"w%d" % i for i in range(PAIRS)}
    churn = "".join("link add c%d type veth peer name e%d\nlink del c%d\n" % (i, i, i) for i in range(20))
    stop = threading.Event()

    def churner():
        while not stop.is_set():
            ns.run(["ip", "-batch", "-"], input=churn)

    thread = threading.Thread(target=churner, daemon=True)
    thread.start()
    attempts = {"interrupted": 0, "whole": 0}
    calls = 0
    with Netlink(netns=ns.path) as nl:
        exchange = nl._exchange

        def counted(*args):
            out, interrupted = exchange(*args)
            attempts["interrupted" if interrupted else "whole"] += 1
            return out, interrupted
        nl._exchange = counted
        try:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and attempts["interrupted"] < 10:
                names = {link.name for link in nl.links()}
                calls += 1
                assert ours <= names, "an inconsistent snapshot came back: %d of ours missing" % len(ours - names)
        finally:
            stop.set()
            thread.join(30)
    print("%d link dumps: %s" % (calls, attempts))
    assert attempts["interrupted"] > 0, "the kernel never marked a dump interrupted: nothing was shown"
    assert attempts["whole"] == calls
