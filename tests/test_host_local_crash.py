"""host-local killed mid-ADD (issue 12, defect 7): whatever point a kill -9
lands on, the runtime's DEL for that container leaves the store clean, and
every address of the range can still be handed out.

Two ways in, both with the store in tmp_path (host-local needs no netns):
- every crash point: a forked child runs the ADD and SIGKILLs itself just
  before its k-th file-system call (k = 1, 2, ... until the ADD completes),
  so each state between two syscalls is visited once;
- real processes: the installed host-local executable, kill -9 at random
  moments of its run, KILLS times (PODNET_KILLS raises it for a longer soak).
"""
import json
import os
import random
import signal
import subprocess
import time

import pytest

from cni import executable, skel
from cni.errors import CNIError
from ipam import host_local, store

NET = "killnet"
SUBNET = "10.77.0.0/27"            # 29 addresses after the gateway: a leak shows quickly
CAPACITY = 29
KILLS = int(os.environ.get("PODNET_KILLS", "200"))
# The os calls an ADD makes on its store; the child dies just before one of them.
STORE_CALLS = ("open", "write", "close", "link", "unlink", "rename", "replace", "listdir", "stat",
               "fstat", "read", "makedirs", "mkdir")


def conf(data_dir):
    return {"cniVersion": "1.0.0", "name": NET, "type": "bridge",
            "ipam": {"type": "host-local", "dataDir": str(data_dir), "subnet": SUBNET}}


def env(command, cid):
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/dev/null",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}


def call(command, data_dir, cid):
    args = skel.args_from_env(env(command, cid), json.dumps(conf(data_dir)).encode())
    return host_local.COMMANDS[command](args)


def leftovers(data_dir):
    """Every file in the store but the lock and the round-robin hint."""
    d = os.path.join(str(data_dir), NET)
    return sorted(f for f in os.listdir(d) if f != "lock" and not f.startswith("last_reserved_ip."))


def fill_the_range(data_dir):
    """CAPACITY fresh ADDs get CAPACITY distinct addresses; one more finds none."""
    got = [call("ADD", data_dir, "fresh%d" % i)["ips"][0]["address"] for i in range(CAPACITY)]
    assert len(set(got)) == CAPACITY, got
    with pytest.raises(CNIError) as e:
        call("ADD", data_dir, "one-too-many")
    assert e.value.code == 100
    for i in range(CAPACITY):
        call("DEL", data_dir, "fresh%d" % i)
    assert leftovers(data_dir) == []


def add_killed_at(data_dir, cid, k):
    """Run an ADD in a child that SIGKILLs itself before its k-th store call.
    True if it was killed, False if the ADD finished first."""
    pid = os.fork()
    if pid == 0:                                        # the child: never returns
        try:
            count = [0]

            def wrap(name, real):
                def call_then_maybe_die(*a, **kw):
                    count[0] += 1
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*a, **kw)
                return call_then_maybe_die

            for name in STORE_CALLS:
                setattr(store.os, name, wrap(name, getattr(os, name)))
            call("ADD", data_dir, cid)
            os._exit(0)
        finally:
            os._exit(3)                                 # the ADD failed: the parent's assert says so
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0
    return False


def test_kill_at_every_store_call_then_del_leaves_nothing(tmp_path):
    call("ADD", tmp_path, "warm")       # the store and its lock exist, as on a busy node
    call("DEL", tmp_path, "warm")
    k, killed = 1, 0
    while add_killed_at(tmp_path, "victim%d" % k, k):
        killed += 1
        call("DEL", tmp_path, "victim%d" % k)       # what the runtime does after a failed ADD
        assert leftovers(tmp_path) == [], "kill before store call %d left %s" % (k, leftovers(tmp_path))
        k += 1
    print("killed before each of the %d file-system calls of an ADD: no leftovers after DEL" % killed)
    assert killed >= 8, "the ADD made only %d store calls" % killed
    call("DEL", tmp_path, "victim%d" % k)           # the one that completed
    fill_the_range(tmp_path)


def test_kill_9_real_adds_at_random_moments(tmp_path):
    binary = executable.install(str(tmp_path / "bin"), "/usr/bin/python3", ["host-local"])[0]
    data_dir = tmp_path / "data"
    stdin = json.dumps(conf(data_dir)).encode()

    def start(cid):
        e = dict(os.environ, **env("ADD", cid))
        return subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=e)

    # How long a whole ADD takes here: the kills spread over that, weighted to its end,
    # where the store is written (the interpreter's start-up comes first).
    runs = []
    for i in range(3):
        t = time.monotonic()
        p = start("calibrate%d" % i)
        p.communicate(stdin)
        assert p.returncode == 0
        runs.append(time.monotonic() - t)
        call("DEL", data_dir, "calibrate%d" % i)
    whole = sorted(runs)[1]
    rng = random.Random(int(os.environ.get("PODNET_KILL_SEED", "12")))
    outcomes = {"killed": 0, "finished": 0, "left a file": 0}
    store_dir = os.path.join(str(data_dir), NET)
    for i in range(KILLS):
        before = set(leftovers(data_dir))
        p = start("k%d" % i)
        p.stdin.write(stdin)
        p.stdin.close()
        time.sleep(rng.uniform(0.4, 1.1) * whole if i % 4 else rng.uniform(0, whole))
        p.send_signal(signal.SIGKILL)
        p.wait()
        outcomes["killed" if p.returncode == -signal.SIGKILL else "finished"] += 1
        if os.path.isdir(store_dir) and set(leftovers(data_dir)) - before:
            outcomes["left a file"] += 1
        call("DEL", data_dir, "k%d" % i)        # what the runtime does after a failed ADD
    leaked = leftovers(data_dir)
    print("kill -9 of %d ADDs: %d died, %d finished first, %d left a file before their DEL; "
          "%d files after the DELs" % (KILLS, outcomes["killed"], outcomes["finished"],
                                       outcomes["left a file"], len(leaked)))
    assert outcomes["killed"] >= KILLS // 4      # most die mid-ADD; how many depends on the load
    assert leaked == []
    fill_the_range(data_dir)
