"""Who holds the xtables lock, as podnet.net.iptables reports it when iptables-restore gives
up on it (issue 12, "Bounded waits"). Real flocks on a private file, the real /proc/locks;
no root, no iptables. The restore side is in netns_tests/test_bounded_waits.py."""
import fcntl
import os
import subprocess
import time

from podnet.net import iptables


def test_lock_holders_names_the_process_holding_the_file(tmp_path):
    path = str(tmp_path / "xtables.lock")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert iptables.lock_holders(path) == []
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open("/proc/self/comm") as f:
            me = f.read().strip()
        assert iptables.lock_holders(path) == [(os.getpid(), me)]
    finally:
        os.close(fd)
    assert iptables.lock_holders(path) == []


def test_lock_holders_of_another_process(tmp_path):
    path = str(tmp_path / "xtables.lock")
    open(path, "w").close()
    holder = subprocess.Popen(["flock", "-x", path, "sleep", "10"])
    try:
        deadline = time.monotonic() + 5
        while not iptables.lock_holders(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert iptables.lock_holders(path) == [(holder.pid, "flock")]
    finally:
        holder.kill()
        holder.wait(5)


def test_lock_holders_skips_waiters_and_other_files(tmp_path):
    path = str(tmp_path / "xtables.lock")
    open(path, "w").close()
    st = os.stat(path)
    where = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    locks = ("1: FLOCK  ADVISORY  WRITE 4242 %s 0 EOF\n"
             "1: -> FLOCK  ADVISORY  WRITE 4343 %s 0 EOF\n"
             "2: POSIX  ADVISORY  WRITE 4444 00:00:1 0 EOF\n" % (where, where))
    assert [pid for pid, _ in iptables.lock_holders(path, locks)] == [4242]
    assert iptables.lock_holders(str(tmp_path / "missing"), locks) == []


def test_lock_path_follows_xtables_lockfile(monkeypatch):
    monkeypatch.delenv("XTABLES_LOCKFILE", raising=False)
    assert iptables.lock_path() == "/run/xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", "/tmp/private.lock")
    assert iptables.lock_path() == "/tmp/private.lock"


def test_lock_error_message_names_the_lock_the_wait_and_the_holder():
    e = iptables.XtablesLockTimeout("iptables-restore", "/run/xtables.lock", 5, [(77, "iptables")])
    assert isinstance(e, TimeoutError) and not isinstance(e, iptables.IptablesError)
    assert str(e) == ("iptables-restore gave up after waiting 5 s for the xtables lock /run/xtables.lock, "
                      "held by pid 77 (iptables)")
    assert "held by another process" in str(iptables.XtablesLockTimeout("iptables-restore", "/x", 5, []))


def test_a_lock_give_up_is_told_apart_from_a_refusal(tmp_path, monkeypatch):
    lock = tmp_path / "xtables.lock"
    lock.touch()
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lock))
    argv = ["iptables-restore", "-w", "5", "--noflush"]
    # what iptables-legacy-restore 1.8.9 prints, with exit code 4 (RESOURCE_PROBLEM)
    gave_up = (b"Can't lock %s: Resource temporarily unavailable\n"
               b"Another app is currently holding the xtables lock. Stopped waiting after 5s.\n" % str(lock).encode())
    e = iptables._restore_failed(argv, 4, gave_up, 5)
    assert isinstance(e, iptables.XtablesLockTimeout)
    assert (e.path, e.wait, e.holders) == (str(lock), 5, [])
    refused = iptables._restore_failed(argv, 1, b"iptables-restore: line 3 failed\n", 5)
    assert type(refused) is iptables.IptablesError and "line 3 failed" in str(refused)
