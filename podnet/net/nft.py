"""nftables through the `nft` command: one atomic transaction per `apply()` (`nft -f -`),
reads as JSON.

What a transaction costs with nft 1.0.x depends on its commands, not on its size:
before evaluating, nft fetches a cache of the ruleset, and which parts it fetches
depends on the command kinds. `add chain T C { rules }`, `flush chain`, `add table`
and `add set|map T S { type ...; elements = { ... } }` need only the table list;
`add rule`, `add element` and any `delete` make it dump every chain of every table
(plus sets and their elements). With 60,000 chains (10,000 Services) that dump
alone costs ~0.4 s; the kernel's own commit of a small change costs ~55 ms. So
callers that care write the cheap forms (see kube_proxy/nftables.py).

Every call is bounded (podnet.proc kills nft and raises TimeoutExpired, a
TimeoutError). nft takes no xtables lock, but a transaction's time grows with
the ruleset: a whole table of 10,000 Services loads in ~3 s here, a listing of
a big table can take far longer (`nft list table ip nat` of kube-proxy's
iptables-nft rules at 10k: 26 s), so the bounds are generous: nft is run by
daemons, never on a CNI plugin's path.
"""
from __future__ import annotations

import json

from podnet.proc import Completed, run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NFT = "nft"
APPLY_TIMEOUT = 60.0        # + APPLY_PER_MIB per MiB of input
APPLY_PER_MIB = 4.0
LIST_TIMEOUT = 120.0


class NftError(RuntimeError):
    pass


def _errors(proc: Completed, limit: int = 4000) -> str:
    text = proc.stderr.decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def apply(text: str | bytes, timeout: float | None = None) -> None:
    """Run `text` (nft syntax, several commands) as one transaction; raise NftError if refused.
    nft is killed after `timeout` s (default APPLY_TIMEOUT + APPLY_PER_MIB per MiB of `text`)."""
    data = text.encode() if isinstance(text, str) else text
    if timeout is None:
        timeout = APPLY_TIMEOUT + APPLY_PER_MIB * len(data) / (1 << 20)
    proc = run([NFT, "-f", "-"], data, timeout=timeout)
    if proc.returncode != 0:
        raise NftError("nft -f failed: %s" % _errors(proc))


def check(text: str | bytes, timeout: float | None = None) -> None:
    """Have the kernel check `text` as one transaction without applying it (`nft -c -f -`:
    nft sends the batch and aborts it, so the kernel's own refusals show); NftError if refused."""
    data = text.encode() if isinstance(text, str) else text
    if timeout is None:
        timeout = APPLY_TIMEOUT + APPLY_PER_MIB * len(data) / (1 << 20)
    proc = run([NFT, "-c", "-f", "-"], data, timeout=timeout)
    if proc.returncode != 0:
        raise NftError("nft -c -f failed: %s" % _errors(proc))


def list_json(*what: str, terse: bool = False, timeout: float = LIST_TIMEOUT) -> list[dict[str, Any]]:
    """`nft -j [-t] list <what...>` -> the objects it lists, e.g. [{"chain": {...}}, ...]
    (the metainfo entry dropped)."""
    argv = [NFT, "-j"] + (["-t"] if terse else []) + ["list"] + list(what)
    proc = run(argv, timeout=timeout)
    if proc.returncode != 0:
        raise NftError("%s failed: %s" % (" ".join(argv), _errors(proc)))
    if not proc.stdout.strip():
        return []
    return [obj for obj in json.loads(proc.stdout).get("nftables", []) if "metainfo" not in obj]


def list_text(*what: str, timeout: float = LIST_TIMEOUT) -> str:
    """`nft list <what...>` as text."""
    argv = [NFT, "list"] + list(what)
    proc = run(argv, timeout=timeout)
    if proc.returncode != 0:
        raise NftError("%s failed: %s" % (" ".join(argv), _errors(proc)))
    return proc.stdout.decode()


def version() -> str:
    proc = run([NFT, "--version"], timeout=10.0)
    if proc.returncode != 0:
        raise NftError("nft --version failed: %s" % _errors(proc))
    return proc.stdout.decode().strip()
