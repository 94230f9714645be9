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
    skip = pytest.mark.skip(reason="needs a kernel feature this machine lacks: runs in the full-kernel lane (./dev test)")
    for item in items:
        if "fullkernel" in item.keywords:
            item.add_marker(skip)
