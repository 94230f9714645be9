"""iptables through iptables-save / iptables-restore.

One `iptables-restore --noflush` carries a whole change atomically and costs a
few ms; with the nf_tables backend each single `iptables -D/-F/-X` call costs
12-15 ms (see docs/performance.md). So changes are rendered as restore input
and applied in one process; reads use one iptables-save.
"""
from __future__ import annotations

from podnet.proc import run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


class IptablesError(RuntimeError):
    pass


def _tool(name: str, ipv6: bool) -> str:
    """iptables-save -> ip6tables-save (not "ip6iptables-save") for IPv6."""
    return ("ip6" + name[2:]) if ipv6 else name


def save(table: str, ipv6: bool = False, counters: bool = False) -> str:
    """The table as iptables-save prints it ('' if the table does not exist yet).

    counters=True prefixes each rule with "[packets:bytes] " (see split_counters).
    """
    proc = run([_tool("iptables-save", ipv6), "-t", table] + (["-c"] if counters else []))
    if proc.returncode != 0:
        raise IptablesError("%s -t %s failed: %s" % (_tool("iptables-save", ipv6), table,
                                                      proc.stderr.decode(errors="replace").strip()))
    return proc.stdout.decode()


def restore(text: str, ipv6: bool = False, noflush: bool = True) -> None:
    """Apply restore input atomically. noflush keeps every chain not declared in it."""
    argv = [_tool("iptables-restore", ipv6), "-w"]
    if noflush:
        argv.append("--noflush")
    proc = run(argv, text.encode())
    if proc.returncode != 0:
        raise IptablesError("%s failed: %s" % (argv[0], proc.stderr.decode(errors="replace").strip()))


def restore_stream(chunks: Iterable[str], ipv6: bool = False, noflush: bool = True) -> int:
    """Like restore(), fed chunk by chunk while `chunks` (an iterable of str) is being
    produced, so that iptables-restore parses while the caller renders. Returns the
    number of bytes written. If producing a chunk raises, the process is killed
    before its COMMIT: nothing is applied."""
    import subprocess
    argv = [_tool("iptables-restore", ipv6), "-w"] + (["--noflush"] if noflush else [])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None      # (both are pipes)
    written = 0
    try:
        try:
            for chunk in chunks:
                data = chunk.encode()
                proc.stdin.write(data)
                written += len(data)
            proc.stdin.close()
        except BrokenPipeError:         # it stopped reading: an error, reported below
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    if proc.wait() != 0:
        raise IptablesError("%s failed: %s" % (argv[0], err))
    return written


def quote(text: str) -> str:
    """Quote a value (e.g. a comment) as iptables-save does."""
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def rules_referencing(saved: str, chain: str) -> list[str]:
    """Lines of iptables-save output that jump to or belong to `chain`."""
    out = []
    for line in saved.splitlines():
        if not line.startswith("-A "):
            continue
        parts = line.split()
        if parts[1] == chain or ("-j" in parts and parts[parts.index("-j") + 1] == chain):
            out.append(line)
    return out


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
