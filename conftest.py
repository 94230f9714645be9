"""Test-suite-wide rules.

Tests marked `fullkernel` need what this machine's kernel lacks (bridge VLAN
filtering, ip_vs, dummy, ipip). They are skipped here and run together in the
full-kernel lane: Debian's own kernel booted under emulation, once per
`./dev test`, with PODNET_FULLKERNEL=1 (see `dev` and docs/decisions.md).
"""
import os

import pytest

IN_LANE = os.environ.get("PODNET_FULLKERNEL") == "1"


def pytest_collection_modifyitems(config, items):
    if IN_LANE:
        return
    skip = pytest.mark.skip(
        reason="needs a kernel feature this machine lacks: runs in the full-kernel lane (./dev test)")
    for item in items:
        if "fullkernel" in item.keywords:
            item.add_marker(skip)


# ---- the root network namespace must come out of a test session unchanged ----

def _root_namespace_state():
    """Link names and iptables rules of the namespace pytest runs in (the root one)."""
    import subprocess
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    state = {"links": sorted(line.split(": ")[1].split("@")[0] for line in links.splitlines() if ": " in line)}
    if os.geteuid() == 0:
        for tool in ("iptables-save", "ip6tables-save"):
            try:
                out = subprocess.run([tool], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            state[tool] = sorted(l for l in out.splitlines() if l.startswith(("-A", ":")))
    return state


def pytest_sessionstart(session):
    session.config._podnet_root_state = _root_namespace_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_podnet_root_state", None)
    if before is None:
        return
    after = _root_namespace_state()
    changed = {k: (sorted(set(after.get(k, [])) - set(before.get(k, []))),
                   sorted(set(before.get(k, [])) - set(after.get(k, []))))
               for k in set(before) | set(after) if before.get(k) != after.get(k)}
    if changed:
        lines = ["%s: added %s, removed %s" % (k, a, r) for k, (a, r) in changed.items()]
        print("\nERROR: the test session changed the ROOT network namespace "
              "(tests must only touch namespaces they create):\n  " + "\n  ".join(lines))
        session.exitstatus = 1
