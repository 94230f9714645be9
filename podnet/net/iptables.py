"""iptables through iptables-save / iptables-restore.

One `iptables-restore --noflush` carries a whole change atomically and costs a
few ms; with the nf_tables backend each single `iptables -D/-F/-X` call costs
12-15 ms (see docs/performance.md). So changes are rendered as restore input
and applied in one process; reads use one iptables-save.

Every call is bounded. iptables-restore gets `-w LOCK_WAIT`: the legacy backend
waits that long for the machine-wide xtables lock (/run/xtables.lock, or
$XTABLES_LOCKFILE, which is passed through) and then gives up, which raises
XtablesLockTimeout naming the lock and its holder; the nf_tables backend takes
no lock and ignores the option. The process itself is killed if it runs past
LOCK_WAIT + RESTORE_TIMEOUT + RESTORE_PER_MIB per MiB of input (podnet.proc
raises TimeoutExpired); iptables-save past SAVE_TIMEOUT. Both timeouts are
TimeoutErrors, not IptablesErrors: a caller's fallback for a refused change
(re-read and retry) must not wait all over again.
"""
from __future__ import annotations

import os

from podnet.proc import feed, run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

# The xtables lock wait: kubelet's and kube-proxy's `iptables -w 5`. A CNI ADD that finds the
# lock held this long fails (and is retried by the runtime) rather than hang the pod's start.
LOCK_WAIT = 5
# Once it has the lock, a restore of a CNI plugin's few rules takes milliseconds, and a whole
# nat table of 10,000 Services (25 MB) ~6 s on this machine (docs/performance.md): the bound
# grows with the input, so that one default fits the plugins (15 s) and the daemons (~65 s there).
RESTORE_TIMEOUT = 10.0
RESTORE_PER_MIB = 2.0
# iptables-save of that nat table: 1.7-3 s here.
SAVE_TIMEOUT = 20.0
LOCK_PATH = "/run/xtables.lock"
_RESOURCE_PROBLEM = 4                   # iptables' exit code when it gave up on the lock


class IptablesError(RuntimeError):
    pass


class XtablesLockTimeout(TimeoutError):
    """iptables-restore gave up after `wait` s: another process held the xtables lock at
    `path` all along. `holders` lists (pid, command) of who held it then, if /proc said."""

    def __init__(self, tool: str, path: str, wait: int, holders: list[tuple[int, str]]) -> None:
        self.tool = tool
        self.path = path
        self.wait = wait
        self.holders = holders
        who = ", ".join("pid %d (%s)" % holder for holder in holders) if holders else "another process"
        super().__init__("%s gave up after waiting %d s for the xtables lock %s, held by %s"
                         % (tool, wait, path, who))


def lock_path() -> str:
    """The xtables lock file iptables (legacy backend) uses: $XTABLES_LOCKFILE or /run/xtables.lock."""
    return os.environ.get("XTABLES_LOCKFILE") or LOCK_PATH


def lock_holders(path: str, locks: str | None = None) -> list[tuple[int, str]]:
    """(pid, command) of each process holding a lock on the file at `path`, from /proc/locks
    (or `locks`, its text): lines like "1: FLOCK  ADVISORY  WRITE 20655 fe:00:2149695 0 EOF"
    (pid, then device major:minor in hex and inode); waiters ("1: -> FLOCK ...") are not
    holders. [] when that cannot be found out."""
    try:
        st = os.stat(path)
        if locks is None:
            with open("/proc/locks") as f:
                locks = f.read()
    except OSError:
        return []
    where = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    holders = []
    for line in locks.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or parts[5] != where or not parts[4].isdigit():
            continue
        pid = int(parts[4])
        try:
            with open("/proc/%d/comm" % pid) as f:
                command = f.read().strip()
        except OSError:
            command = "?"
        holders.append((pid, command))
    return holders


def _tool(name: str, ipv6: bool) -> str:
    """iptables-save -> ip6tables-save (not "ip6iptables-save") for IPv6."""
    return ("ip6" + name[2:]) if ipv6 else name


def _restore_argv(ipv6: bool, noflush: bool, wait: int) -> list[str]:
    return [_tool("iptables-restore", ipv6), "-w", str(wait)] + (["--noflush"] if noflush else [])


def _restore_failed(argv: list[str], returncode: int, stderr: bytes, wait: int) -> Exception:
    err = stderr.decode(errors="replace").strip()
    if returncode == _RESOURCE_PROBLEM and "holding the xtables lock" in err:
        path = lock_path()
        return XtablesLockTimeout(argv[0], path, wait, lock_holders(path))
    return IptablesError("%s failed: %s" % (argv[0], err))


def save(table: str, ipv6: bool = False, counters: bool = False, timeout: float = SAVE_TIMEOUT) -> str:
    """The table as iptables-save prints it ('' if the table does not exist yet).

    counters=True prefixes each rule with "[packets:bytes] " (see split_counters).
    """
    proc = run([_tool("iptables-save", ipv6), "-t", table] + (["-c"] if counters else []), timeout=timeout)
    if proc.returncode != 0:
        raise IptablesError("%s -t %s failed: %s" % (_tool("iptables-save", ipv6), table,
                                                      proc.stderr.decode(errors="replace").strip()))
    return proc.stdout.decode()


def restore(text: str, ipv6: bool = False, noflush: bool = True, wait: int = LOCK_WAIT,
            timeout: float | None = None) -> None:
    """Apply restore input atomically. noflush keeps every chain not declared in it.

    Waits up to `wait` s for the xtables lock (XtablesLockTimeout after that); the process
    is killed after `timeout` s (default: wait + RESTORE_TIMEOUT + RESTORE_PER_MIB per MiB)."""
    argv = _restore_argv(ipv6, noflush, wait)
    data = text.encode()
    if timeout is None:
        timeout = wait + RESTORE_TIMEOUT + RESTORE_PER_MIB * len(data) / (1 << 20)
    proc = run(argv, data, timeout=timeout)
    if proc.returncode != 0:
        raise _restore_failed(argv, proc.returncode, proc.stderr, wait)


def restore_stream(chunks: Iterable[str], ipv6: bool = False, noflush: bool = True,
                   wait: int = LOCK_WAIT, timeout: float | None = None) -> int:
    """Like restore(), fed chunk by chunk while `chunks` (an iterable of str) is being
    produced, so that iptables-restore parses while the caller renders. Returns the
    number of bytes written. If producing a chunk raises, the process is killed
    before its COMMIT: nothing is applied.

    The bound is restore()'s, counting only the time spent waiting for iptables-restore
    (not the caller's rendering): `timeout` (default wait + RESTORE_TIMEOUT) plus
    RESTORE_PER_MIB per MiB written."""
    argv = _restore_argv(ipv6, noflush, wait)
    written = 0

    def encoded() -> Iterator[bytes]:
        nonlocal written
        for chunk in chunks:
            data = chunk.encode()
            written += len(data)
            yield data

    proc = feed(argv, encoded(), timeout=wait + RESTORE_TIMEOUT if timeout is None else timeout,
                per_mib=RESTORE_PER_MIB if timeout is None else 0.0)
    if proc.returncode != 0:
        raise _restore_failed(argv, proc.returncode, proc.stderr, wait)
    return written


def quote(text: str) -> str:
    """Quote a value (e.g. a comment) as iptables-save does."""
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def jump_target(args: list[str]) -> str | None:
    """The chain a rule (its split_rule arguments) jumps or goes to, else None: the last
    `-j`/`-g`, as iptables reads it (a condition may hold the word "-j", e.g. a comment)."""
    if len(args) >= 2 and args[-2] in ("-j", "-g"):
        return args[-1]
    return None


def rules_jumping_to(saved: str, chain: str) -> list[str]:
    """The rules of iptables-save text that jump or go to `chain`."""
    out = []
    for line in saved.splitlines():
        # the target is the last word: only a line ending with it can be one
        if line.startswith("-A ") and line.endswith(" " + chain) and jump_target(split_rule(line)) == chain:
            out.append(line)
    return out


def rules_referencing(saved: str, chain: str) -> list[str]:
    """The rules of `chain` and those jumping to it, in table order."""
    own = "-A %s " % chain
    jumps = set(rules_jumping_to(saved, chain))
    return [line for line in saved.splitlines() if line.startswith(own) or line in jumps]


def declared_chains(saved: str) -> list[str]:
    """Names of the chains an iptables-save text of one table declares, in order (built-in ones too)."""
    return [line[1:].split(" ", 1)[0] for line in saved.splitlines() if line.startswith(":")]


def chain_rules(saved: str, wanted: Callable[[str], object]) -> dict[str, tuple[str, ...]]:
    """iptables-save text of one table -> {chain: (rule lines...)} for the declared chains
    whose name wanted(name) accepts (empty ones included)."""
    chains: dict[str, list[str]] = {}
    for line in saved.splitlines():
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if wanted(name):
                chains[name] = []
        elif line.startswith("-A "):
            rules = chains.get(line[3:].split(" ", 1)[0])
            if rules is not None:
                rules.append(line)
    return {name: tuple(rules) for name, rules in chains.items()}


def chain_exists(saved: str, chain: str) -> bool:
    return (":%s " % chain) in saved


def split_rule(line: str) -> list[str]:
    """One iptables-save line -> its arguments, undoing quote() (e.g. comments)."""
    args = []
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        if line[i] == '"':
            i += 1
            chars = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(line[i])
                i += 1
            args.append("".join(chars))
            i += 1
        else:
            j = line.find(" ", i)
            j = n if j < 0 else j
            args.append(line[i:j])
            i = j
    return args


def split_counters(saved: str) -> tuple[str, dict[str, int]]:
    """iptables-save -c output -> (the same text without counters, {rule: packets}).

    Identical rules add up their packets.
    """
    lines: list[str] = []
    packets: dict[str, int] = {}
    for line in saved.splitlines():
        if line.startswith("[") and "] -A " in line:
            count, _, line = line.partition("] ")
            packets[line] = packets.get(line, 0) + int(count[1:].split(":", 1)[0])
        lines.append(line)
    return "\n".join(lines) + "\n", packets
