"""Finding the objects a kernel transaction refuses, by bisection.

Agents apply their desired state in one transaction (iptables-restore, nft -f, ipset
restore). When the kernel refuses it, one object's rules are usually to blame (a
name it cannot take, a rule it cannot load), and everything else must still be
programmed. kube-proxy narrows a refusal down to Service ports, the NetworkPolicy
agent to policies; both use `isolate` here, with a trial that applies (or only
checks) the rules of a group of suspects.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")


def one_line(error: object, limit: int = 600) -> str:
    """An error as one log-friendly line: iptables-restore and nft answer on several lines."""
    text = " | ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Isolation(Generic[K]):
    """What isolate() found: the suspects refused on their own ([(suspect, error)]), and how
    many transactions it tried and how many of those the kernel refused."""
    bad: list[tuple[K, str]] = field(default_factory=list)
    tried: int = 0
    refused: int = 0


def isolate(suspects: Sequence[K], trial: Callable[[list[K]], object],
            refused: tuple[type[BaseException], ...],
            control: Callable[[], object] | None = None) -> Isolation[K]:
    """Which of `suspects` the kernel refuses, on their own.

    trial(group) applies (or has the kernel check) those suspects' rules in one go; a
    refusal raises one of `refused` and must leave nothing of them applied. The whole list
    is tried first, then its halves, recursing into a half that fails; when the first half
    of a failing group goes through, the second is known to fail and is split without
    being tried. One bad suspect among n costs about 1 + 1.5 log2(n) trials, and all of
    them together carry about twice the suspects' rules.

    When no trial at all went through, `control()` (a harmless transaction) tells a
    refusal of these suspects from a kernel that refuses everything: if it is refused too,
    or there is no control, the first error is raised and nobody is blamed."""
    out: Isolation[K] = Isolation()
    bad = out.bad
    passed = False
    first: list[BaseException] = []

    def attempt(group: list[K]) -> str | None:
        nonlocal passed
        out.tried += 1
        try:
            trial(group)
        except refused as e:
            out.refused += 1
            if not first:
                first.append(e)
            return one_line(e)
        passed = True
        return None

    def split(group: list[K], error: str) -> None:
        if len(group) == 1:
            bad.append((group[0], error))
            return
        half = len(group) // 2
        left, right = group[:half], group[half:]
        left_error = attempt(left)
        if left_error is None:
            split(right, error)                 # the fault is in the right half
            return
        split(left, left_error)
        right_error = attempt(right)
        if right_error is not None:
            split(right, right_error)

    group = list(suspects)
    if group:
        error = attempt(group)
        if error is not None:
            split(group, error)
    if bad and not passed:
        if control is None:
            raise first[0]
        out.tried += 1
        try:
            control()
        except refused:
            raise first[0] from None
    return out
