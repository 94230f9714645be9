"""Command-line values every daemon's flags share, in the forms upstream's flags take them.

Go's duration syntax ("1s", "500ms", "1m30s", "2h") is how kube-proxy, flannel
and their kin spell periods; plain numbers are seconds. Errors are
argparse.ArgumentTypeError, so a parser built with `type=parse_duration`
reports them as a usage error naming the flag.
"""
from __future__ import annotations

import argparse

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# longest first: "ms" must win over "m" at the same position
_UNIT_ORDER = ("ms", "us", "µs", "ns", "h", "m", "s")


def parse_duration(text: str) -> float:
    """Go's duration syntax as kube-proxy's flags take it ("1s", "500ms", "1m30s"), or plain seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total, number, i = 0.0, "", 0
    while i < len(text):
        c = text[i]
        if c.isdigit() or c == ".":
            number += c
            i += 1
            continue
        unit = next((u for u in _UNIT_ORDER if text.startswith(u, i)), None)
        if unit is None or not number:
            raise argparse.ArgumentTypeError("not a duration: %r" % text)
        try:
            total += float(number) * _UNITS[unit]
        except ValueError:
            raise argparse.ArgumentTypeError("not a duration: %r" % text) from None
        number, i = "", i + len(unit)
    if number or not text:
        raise argparse.ArgumentTypeError("not a duration (missing unit): %r" % text)
    return total
