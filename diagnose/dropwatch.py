"""The kernel's drop reasons during a probe: the skb:kfree_skb tracepoint, in a trace instance of our own.

A node's mount namespace usually has no tracefs mounted (and `ip netns exec` remounts /sys without
it); mounting it there would change the node for everyone. So the watcher is a child process
started under `unshare -m --propagation private` (this file, run as a script): in that private
mount namespace it mounts tracefs when /sys/kernel/tracing is not already mounted, creates
`instances/podnet-trace-<pid>` (the pid of the podnet process that asked), enables
events/skb/kfree_skb in that instance only, filtered to IPv4 (`protocol == 2048`) and to reasons
other than NOT_SPECIFIED (the number read from the event's format file), and reads the instance's
trace_pipe until its stdin closes or its deadline passes. Then it disables the event and removes
the instance, whatever happened (SIGTERM and SIGHUP included); the mount goes with the namespace.

Reasons are decoded by name from the format file's `__print_symbolic` list. The tracepoint has no
network namespace filter: what it reports is every IPv4 drop on the host during the window, the
probe's among them, and the report says so.

One module for both sides: `podnet trace --live` runs a DropWatch around its probe, and the remote
`podnet trace --watch` runs one around its window. `Streamed` (a child whose stdout lines arrive
as they are written, every wait bounded) serves diagnose/live.py's other children too.
"""
from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

EVENT_DIR = "events/skb/kfree_skb"
ETH_P_IP = 0x0800           # the event's `protocol` field is the skb's ethertype
MAX_SECONDS = 120.0         # the child's own bound, whatever it is asked
START_WAIT = 10.0           # until the child reports it listens (python start, mount, mkdir)
MAX_LINES = 20000           # a drop storm is summarised from its first lines
TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


# ---- the pure part: the format file, trace_pipe lines, the summary ------------------------------

@dataclass
class EventFormat:
    fields: set[str] = field(default_factory=set)
    reasons: dict[int, str] = field(default_factory=dict)      # number -> name, e.g. 16 -> IP_RPFILTER

    def number(self, name: str) -> int | None:
        return next((n for n, text in self.reasons.items() if text == name), None)


_FIELD = re.compile(r"field:[^;]*?(\w+)(?:\[[^\]]*\])?;")
_SYMBOL = re.compile(r"\{\s*(0x[0-9a-fA-F]+|-?\d+)\s*,\s*\"(\w+)\"\s*\}")


def parse_format(text: str) -> EventFormat:
    """An event's format file -> its field names and the `reason` field's symbolic names."""
    fmt = EventFormat({m.group(1) for m in _FIELD.finditer(text)})
    start = text.find("__print_symbolic(REC->reason")
    if start < 0:
        return fmt
    depth, end = 0, len(text)
    for i in range(start + len("__print_symbolic"), len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                end = i
                break
    fmt.reasons = {int(num, 0): name for num, name in _SYMBOL.findall(text[start:end])}
    return fmt


def filter_expression(fmt: EventFormat) -> str:
    """The instance's filter: IPv4 only, NOT_SPECIFIED left out (the reasonless frees of code paths
    that do not say why: most of them are not drops)."""
    clauses = []
    if "protocol" in fmt.fields:
        clauses.append("protocol == %d" % ETH_P_IP)
    unspecified = fmt.number("NOT_SPECIFIED")
    if "reason" in fmt.fields and unspecified is not None:
        clauses.append("reason != %d" % unspecified)
    return " && ".join(clauses)


_PIPE_LINE = re.compile(r"\bkfree_skb:.*?\blocation=(\S+).*?\breason: (\S+)")


def parse_pipe_line(line: str, fmt: EventFormat) -> tuple[str, str] | None:
    """One trace_pipe line -> (reason name, location symbol+offset), or None for other lines."""
    found = _PIPE_LINE.search(line)
    if not found:
        return None
    location, reason = found.group(1), found.group(2)
    if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", reason):     # a kernel printing numbers: decode them here
        reason = fmt.reasons.get(int(reason, 0), reason)
    return reason, location.split("/")[0]                   # symbol+0xoff, without the symbol's size


def count(drops: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """[(reason, location)] -> [{reason, location, count}], the most frequent first."""
    tally: dict[tuple[str, str], int] = {}
    for key in drops:
        tally[key] = tally.get(key, 0) + 1
    ordered = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"reason": r, "location": loc, "count": n} for (r, loc), n in ordered]


def unavailable(why: str) -> dict[str, Any]:
    return {"available": False, "why": why, "host_wide": True, "drops": []}


def summary(report: dict[str, Any], limit: int = 5) -> str:
    """One line for a person: what the kernel dropped during the window, or why that is not known."""
    if not report.get("available"):
        return "drop reasons not available: %s" % (report.get("why") or "unknown")
    drops = report.get("drops") or []
    if not drops:
        return "kernel drops during the probe (host-wide): none"
    parts = ["%d x %s at %s" % (d["count"], d["reason"], d["location"]) for d in drops[:limit]]
    if len(drops) > limit:
        parts.append("%d more" % (len(drops) - limit))
    return "kernel drops during the probe (host-wide, not only the probe's): %s" % ", ".join(parts)


def reasons_seen(report: dict[str, Any]) -> set[str]:
    return {d["reason"] for d in report.get("drops") or ()}


def boot_id() -> str:
    """Which kernel this is: two nodes of one lab share it, and with it the host-wide drops."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# ---- a child whose stdout lines are read as they come -----------------------------------------

class Streamed:
    """A child process; its stdout lines (those `keep` accepts) arrive on a queue as it writes them,
    its stderr is kept (the last 8 KiB). Every wait is bounded; stop() ends it (SIGTERM, SIGKILL after a grace)."""

    def __init__(self, argv: list[str], stdin_pipe: bool = False, env: dict[str, str] | None = None,
                 keep: Any = None) -> None:
        self.argv = argv
        self.keep = keep            # lines it refuses are not kept (nft monitor's ruleset changes)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.eof = False
        self._stderr = b""
        self._readers = [threading.Thread(target=self._read_out, daemon=True, name="stdout %s" % argv[0]),
                         threading.Thread(target=self._read_err, daemon=True, name="stderr %s" % argv[0])]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if self.keep is None or self.keep(line):
                self.lines.put(line)
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr = (self._stderr + raw)[-8192:]

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace").strip()

    def next_line(self, timeout: float) -> str | None:
        """The next stdout line, or None at its end or after `timeout` seconds (self.eof tells which)."""
        if self.eof:
            return None
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if line is None:
            self.eof = True
        return line

    def wait_for(self, wanted: Any, timeout: float, seen: list[str] | None = None) -> str | None:
        """The first line `wanted(line)` accepts within `timeout` s (None at the end or the bound);
        the lines passed over go to `seen`."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            line = self.next_line(deadline - time.monotonic())
            if line is None:
                return None
            if wanted(line):
                return line
            if seen is not None:
                seen.append(line)
        return None

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def rest(self, timeout: float) -> list[str]:
        """The lines still to come, until the child ends its stdout (within `timeout` s)."""
        out = []
        deadline = time.monotonic() + timeout
        while not self.eof:
            line = self.next_line(deadline - time.monotonic())
            if line is None:
                break
            out.append(line)
        return out

    def stop(self, grace: float = 2.0) -> int | None:
        """End it if it still runs (SIGTERM, SIGKILL after `grace` s); its exit code."""
        self.close_stdin()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    return None
        for reader in self._readers:
            reader.join(1.0)
        return self.proc.returncode


# ---- the watcher, as its parent sees it -------------------------------------------------------

def instance_name(pid: int | None = None) -> str:
    return "podnet-trace-%d" % (os.getpid() if pid is None else pid)


def _precheck() -> str:
    """Why drop reasons cannot be read here, or "" (the child finds the rest)."""
    from podnet.proc import which
    if os.geteuid() != 0:
        return "not root"
    if which("unshare") is None:
        return "no unshare(1) to make a private mount namespace"
    try:
        with open("/proc/filesystems") as f:
            known = f.read()
    except OSError as e:
        return "cannot read /proc/filesystems: %s" % e
    if "tracefs" not in known.split() and not any(os.path.isdir(os.path.join(p, EVENT_DIR)) for p in TRACEFS_PATHS):
        return "this kernel has no tracefs"
    return ""


class DropWatch:
    """The drop-reason watcher around a window: start(), the window, stop() -> a report
    {available, why, host_wide, drops: [{reason, location, count}], boot_id}. Never raises for
    an unavailable tracepoint: the report says why."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = min(max(seconds, 0.5), MAX_SECONDS)
        self.child: Streamed | None = None
        self.report: dict[str, Any] | None = None
        self.name = instance_name()

    def start(self, wait: float = START_WAIT) -> str:
        """Start the child and wait (bounded) until it listens: "listening", or why not."""
        why = _precheck()
        if why:
            self.report = unavailable(why)
            return why
        argv = ["unshare", "-m", "--propagation", "private", sys.executable, os.path.abspath(__file__),
                self.name, "%g" % self.seconds]
        try:
            self.child = Streamed(argv, stdin_pipe=True)
        except OSError as e:
            self.report = unavailable("cannot start the watcher: %s" % e)
            return self.report["why"]
        first = self.child.wait_for(lambda line: line.startswith("{"), wait)
        if first is None:
            self.child.stop()
            self.report = unavailable("the watcher did not start within %g s%s" % (
                wait, ": " + self.child.stderr[-300:] if self.child.stderr else ""))
            self.child = None
            return self.report["why"]
        state = json_object(first)
        if state.get("event") != "listening":
            self.report = unavailable(str(state.get("why") or first))
            self.child.stop()
            self.child = None
            return self.report["why"]
        return "listening"

    def stop(self, wait: float = 5.0) -> dict[str, Any]:
        """End the window; the report."""
        if self.report is not None:
            return self.report
        child = self.child
        if child is None:
            return unavailable("not started")
        child.close_stdin()
        lines = child.rest(wait)
        child.stop()
        done = next((json_object(x) for x in reversed(lines) if x.startswith("{")), {})
        if done.get("event") != "done":
            self.report = unavailable("the watcher ended without a report%s" % (
                ": " + child.stderr[-300:] if child.stderr else ""))
            if not done.get("removed"):
                remove_stale(self.name)
            return self.report
        self.report = {"available": True, "why": "", "host_wide": True, "drops": done.get("drops", []),
                       "lines": done.get("lines", 0), "boot_id": boot_id()}
        if done.get("error"):
            self.report["why"] = done["error"]
        return self.report


def remove_stale(name: str) -> None:
    """A watcher killed before its clean-up leaves its instance tracing: remove it (bounded)."""
    from podnet.proc import TimeoutExpired, run
    try:
        run(["unshare", "-m", "--propagation", "private", sys.executable, os.path.abspath(__file__),
             "--remove", name], timeout=10.0)
    except (OSError, TimeoutExpired):
        pass


def json_object(line: str) -> dict[str, Any]:
    """A JSON line's object, {} for anything else (a child's output is not trusted)."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ---- the watcher itself: the child, in its private mount namespace ---------------------------

def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _private_mount_namespace() -> bool:
    """Whether this process's mount namespace differs from its parent's: the guard that keeps a
    mount of ours off the node."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino != os.stat("/proc/%d/ns/mnt" % os.getppid()).st_ino
    except OSError:
        return False


def _tracefs() -> tuple[str, str]:
    """(the tracefs root, "") or ("", why not); mounts tracefs in this (private) namespace if needed."""
    for path in TRACEFS_PATHS:
        if os.path.isdir(os.path.join(path, EVENT_DIR)) or os.path.isdir(os.path.join(path, "instances")):
            return path, ""
    root = TRACEFS_PATHS[0]
    if not os.path.isdir(root):
        return "", "%s does not exist" % root
    if not _private_mount_namespace():
        return "", "not in a private mount namespace: tracefs is not mounted here"
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(b"nodev", root.encode(), b"tracefs", 0, None) != 0:
        errno = ctypes.get_errno()
        return "", "mount tracefs: %s" % os.strerror(errno)
    return root, ""


def _child(name: str, seconds: float, out: IO[str]) -> int:
    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    if os.geteuid() != 0:
        say({"event": "unavailable", "why": "not root"})
        return 1
    root, why = _tracefs()
    if not root:
        say({"event": "unavailable", "why": why})
        return 1
    try:
        with open(os.path.join(root, EVENT_DIR, "format")) as f:
            fmt = parse_format(f.read())
    except OSError:
        say({"event": "unavailable", "why": "this kernel has no skb:kfree_skb event"})
        return 1
    if "NOT_SPECIFIED" not in fmt.reasons.values():
        say({"event": "unavailable", "why": "skb:kfree_skb has no drop reasons in this kernel"})
        return 1
    instance = os.path.join(root, "instances", name)
    drops: list[tuple[str, str]] = []
    lines = 0
    error = ""
    pipe = -1
    made = False
    try:
        if os.path.isdir(instance):         # left by a killed watcher of the same pid
            _remove(instance)
        os.mkdir(instance)
        made = True
        _write(os.path.join(instance, EVENT_DIR, "filter"), filter_expression(fmt) + "\n")
        _write(os.path.join(instance, EVENT_DIR, "enable"), "1\n")
        pipe = os.open(os.path.join(instance, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
        say({"event": "listening", "instance": name})
        poller = select.poll()
        poller.register(pipe, select.POLLIN)
        poller.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
        deadline = time.monotonic() + min(seconds, MAX_SECONDS)
        partial = b""

        def take(chunk: bytes) -> None:
            nonlocal partial, lines
            *whole, partial = (partial + chunk).split(b"\n")
            for raw in whole:
                lines += 1
                found = parse_pipe_line(raw.decode(errors="replace"), fmt)
                if found is not None and len(drops) < MAX_LINES:
                    drops.append(found)
        stopping = False
        while not stopping and time.monotonic() < deadline:
            for fd, _ in poller.poll(int(min(deadline - time.monotonic(), 0.5) * 1000) + 1):
                if fd != pipe:
                    stopping = not os.read(fd, 4096)       # the parent closed our stdin: the window ended
                    if stopping:
                        poller.unregister(fd)
                    continue
                try:
                    take(os.read(pipe, 65536))
                except BlockingIOError:
                    pass
        try:                # what the kernel still buffers from the window
            while chunk := os.read(pipe, 65536):
                take(chunk)
        except BlockingIOError:
            pass
        if partial:
            take(b"\n")
    except OSError as e:
        error = "%s: %s" % (getattr(e, "filename", "") or "tracefs", e.strerror or e)
    finally:
        if pipe >= 0:
            os.close(pipe)
        removed = _remove(instance) if made else True
    say({"event": "done", "drops": count(drops), "lines": lines, "removed": removed, "error": error})
    return 0


def _remove(instance: str) -> bool:
    """Disable the event and remove the instance; retried briefly (rmdir says EBUSY while a
    reader of the instance's files is still closing)."""
    try:
        _write(os.path.join(instance, EVENT_DIR, "enable"), "0\n")
    except OSError:
        pass
    for _ in range(20):
        try:
            os.rmdir(instance)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.05)
    return False


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--remove"] and len(argv) == 2 and argv[1].startswith("podnet-trace-"):
        root, _ = _tracefs()
        return 0 if root and _remove(os.path.join(root, "instances", argv[1])) else 1
    if len(argv) != 2 or not argv[0].startswith("podnet-trace-"):
        print("usage: dropwatch.py podnet-trace-PID SECONDS | --remove podnet-trace-PID", file=sys.stderr)
        return 2
    return _child(argv[0], float(argv[1]), sys.stdout)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
