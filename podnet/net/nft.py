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
"""
from __future__ import annotations

import json

from podnet.proc import Completed, run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NFT = "nft"


class NftError(RuntimeError):
    pass


def _errors(proc: Completed, limit: int = 4000) -> str:
    text = proc.stderr.decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def apply(text: str | bytes) -> None:
    """Run `text` (nft syntax, several commands) as one transaction; raise NftError if refused."""
    proc = run([NFT, "-f", "-"], text.encode() if isinstance(text, str) else text)
    if proc.returncode != 0:
        raise NftError("nft -f failed: %s" % _errors(proc))


def list_json(*what: str, terse: bool = False) -> list[dict[str, Any]]:
    """`nft -j [-t] list <what...>` -> the objects it lists, e.g. [{"chain": {...}}, ...]
    (the metainfo entry dropped)."""
    argv = [NFT, "-j"] + (["-t"] if terse else []) + ["list"] + list(what)
    proc = run(argv)
    if proc.returncode != 0:
        raise NftError("%s failed: %s" % (" ".join(argv), _errors(proc)))
    if not proc.stdout.strip():
        return []
    return [obj for obj in json.loads(proc.stdout).get("nftables", []) if "metainfo" not in obj]


def list_text(*what: str) -> str:
    """`nft list <what...>` as text."""
    argv = [NFT, "list"] + list(what)
    proc = run(argv)
    if proc.returncode != 0:
        raise NftError("%s failed: %s" % (" ".join(argv), _errors(proc)))
    return proc.stdout.decode()


def version() -> str:
    proc = run([NFT, "--version"])
    if proc.returncode != 0:
        raise NftError("nft --version failed: %s" % _errors(proc))
    return proc.stdout.decode().strip()
