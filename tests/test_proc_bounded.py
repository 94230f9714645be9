"""podnet.proc's bounded waits (issue 12, "Bounded waits"): a child that does not finish in
time is killed (SIGTERM, SIGKILL after a grace) and the caller gets TimeoutExpired naming
the program and the bound; feed() streams stdin under the same bound. Real programs
(sh, sleep, cat, wc), no root needed."""
import errno
import os
import time

import pytest

from podnet import proc


def _gone(pid):
    """True once `pid` is no child of ours any more (reaped: no zombie left)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_a_hung_child_is_killed_at_the_timeout():
    started = time.monotonic()
    with pytest.raises(proc.TimeoutExpired) as info:
        proc.run(["sh", "-c", "echo started; echo working >&2; exec sleep 30"], timeout=0.3)
    took = time.monotonic() - started
    assert 0.3 <= took < 1.0, took
    e = info.value
    assert isinstance(e, TimeoutError)          # callers may catch the builtin
    assert str(e).startswith("sh did not finish within 0.3 s; killed it (SIGTERM)"), str(e)
    assert "working" in str(e)                  # its stderr so far, for the log
    assert e.stdout == b"started\n" and e.stderr == b"working\n"
    assert e.timeout == 0.3 and e.reaped and _gone(e.pid)


def test_sigkill_follows_an_ignored_sigterm():
    started = time.monotonic()
    with pytest.raises(proc.TimeoutExpired) as info:
        # an ignored signal stays ignored across exec: sleep itself ignores SIGTERM
        proc.run(["sh", "-c", "trap '' TERM; exec sleep 30"], timeout=0.2)
    took = time.monotonic() - started
    assert 0.2 + proc.TERM_GRACE <= took < 0.2 + proc.TERM_GRACE + 1.0, took
    assert "SIGKILL, SIGTERM ignored for 1 s" in str(info.value)
    assert info.value.reaped and _gone(info.value.pid)


def test_a_quick_child_is_not_held_up():
    started = time.monotonic()
    for _ in range(20):
        assert proc.run(["true"], timeout=5).returncode == 0
    assert time.monotonic() - started < 2.0
    assert proc.run(["cat"], b"in", timeout=5).stdout == b"in"


def test_without_pidfd_the_wait_is_bounded_too(monkeypatch):
    def no_pidfd(pid, flags=0):
        raise OSError(errno.ENOSYS, "pidfd_open not implemented")
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert proc.run(["sh", "-c", "sleep 0.05; exit 3"], timeout=5).returncode == 3
    started = time.monotonic()
    with pytest.raises(proc.TimeoutExpired):
        proc.run(["sleep", "30"], timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert proc.feed(["wc", "-c"], [b"x" * 300000], timeout=5).stdout.strip() == b"300000"


def test_timeouts_leak_no_file_descriptors():
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(proc.TimeoutExpired):
            proc.run(["sleep", "30"], timeout=0.05)
        with pytest.raises(proc.TimeoutExpired):
            proc.feed(["sleep", "30"], [b"x" * (1 << 20)], timeout=0.05)
        proc.feed(["cat"], [b"x"])
    assert set(os.listdir("/proc/self/fd")) == before


# --- feed: stdin streamed while it is produced --------------------------------------

def test_feed_streams_stdin_and_collects_output():
    chunks = (b"%06d\n" % i for i in range(100000))        # 700 kB, far more than a pipe holds
    done = proc.feed(["wc", "-l"], chunks)
    assert done.returncode == 0 and done.stdout.strip() == b"100000"
    done = proc.feed(["sh", "-c", "cat >/dev/null; echo err >&2; exit 5"], [b"a", b"b"])
    assert (done.returncode, done.stderr) == (5, b"err\n")


def test_feed_to_a_child_that_stops_reading_is_bounded():
    started = time.monotonic()
    with pytest.raises(proc.TimeoutExpired) as info:
        proc.feed(["sleep", "30"], (b"x" * 65536 for _ in range(100)), timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert info.value.argv[0] == "sleep" and _gone(info.value.pid)


def test_feed_bound_grows_with_the_input_and_excludes_the_callers_time():
    def slow_producer():
        for _ in range(4):
            time.sleep(0.15)                # our own rendering time: not the child's
            yield b"x" * 1000
    done = proc.feed(["wc", "-c"], slow_producer(), timeout=0.3)
    assert done.stdout.strip() == b"4000"
    # 0.1 s + 4 s per MiB: a child that never reads gets 0.1 s plus 4 s/MiB of what the pipe
    # took before it filled (64 KiB by default: 0.35 s in all)
    started = time.monotonic()
    with pytest.raises(proc.TimeoutExpired) as info:
        proc.feed(["sleep", "30"], (b"x" * 65536 for _ in range(100)), timeout=0.1, per_mib=4.0)
    took = time.monotonic() - started
    bound = info.value.timeout
    assert 0.1 < bound <= 0.35 and bound <= took < bound + 1.0, (bound, took)
    assert "within %g s" % bound in str(info.value)


def test_feed_kills_the_child_when_producing_fails(tmp_path):
    pidfile = tmp_path / "pid"

    def failing():
        yield b"first\n"
        while not pidfile.exists() or not pidfile.read_text().strip():
            time.sleep(0.01)
        raise ValueError("rendering failed")

    started = time.monotonic()
    with pytest.raises(ValueError, match="rendering failed"):
        proc.feed(["sh", "-c", "echo $$ > %s; exec cat" % pidfile], failing(), timeout=10)
    assert time.monotonic() - started < 2.0
    assert _gone(int(pidfile.read_text()))      # killed and reaped, before its input ended

    def interrupted():
        yield b"x"
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        proc.feed(["cat"], interrupted())


def test_feed_stops_when_the_child_exits_early():
    produced = []

    def chunks():
        for i in range(1000):
            produced.append(i)
            yield b"x" * 65536
    done = proc.feed(["sh", "-c", "head -c 10 >/dev/null; exit 4"], chunks(), timeout=5)
    assert done.returncode == 4
    assert len(produced) < 1000         # the rest was never rendered


def test_feed_missing_program():
    with pytest.raises(FileNotFoundError):
        proc.feed(["podnet-no-such-program"], [b"x"])
