"""Fixtures for tests that build clusters out of network namespaces.

Every test here needs root and working `ip netns`; without them each is
skipped with one clear reason instead of failing. All state lives in
namespaces a `Lab` creates and deletes; the root namespace is never touched.
"""
import os
import shutil

import pytest

from cni import executable
from lab import cluster
from lab.cluster import Lab

from helpers import EtcdServer

SKIP_REASON = "needs root and network namespaces (run as root)"
REFERENCE_PLUGINS = "/usr/lib/cni"      # Debian containernetworking-plugins 1.1.1
PYTHON = "/usr/bin/python3"


def _netns_usable():
    """Root, iproute2, and a throwaway namespace can be made and deleted."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    try:
        with Lab() as probe:
            probe.namespace("probe")
    except Exception:
        return False
    return True


def pytest_sessionstart(session):
    """Remove namespaces that crashed earlier runs (dead owner pid) left behind."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return
    try:
        removed = Lab.teardown_stale()
    except Exception as e:      # never fail the session over housekeeping
        print("podnet: could not remove stale namespaces: %s" % e)
        return
    if removed:
        print("podnet: removed %d stale namespaces: %s" % (len(removed), " ".join(removed)))


@pytest.fixture(scope="session")
def netns_usable():
    return _netns_usable()


@pytest.fixture(autouse=True)
def _require_netns(netns_usable):
    if not netns_usable:
        pytest.skip(SKIP_REASON)


@pytest.fixture
def lab():
    """A fresh Lab, cleaned up however the test ends."""
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="session")
def cni_bin(tmp_path_factory):
    """A directory with podnet's plugin executables (some modules may not exist yet)."""
    dest = tmp_path_factory.mktemp("cni-bin")
    executable.install(str(dest), PYTHON)
    return str(dest)


@pytest.fixture(scope="session")
def ref_bin():
    """The reference plugins, to compare podnet's against."""
    if not os.path.isfile(os.path.join(REFERENCE_PLUGINS, "bridge")):
        pytest.skip("reference CNI plugins not installed in %s" % REFERENCE_PLUGINS)
    return REFERENCE_PLUGINS


@pytest.fixture(scope="session")
def run_cni():
    """lab.cluster.run_cni(namespace, plugin_path, command, container_id,
    netns_path, ifname, conf, cni_path, extra_env=None) -> CniOutcome."""
    return cluster.run_cni


@pytest.fixture
def etcd(tmp_path):
    """A fresh etcd member on loopback (helpers.EtcdServer, data in tmp_path), stopped by
    PID however the test ends. Tests using it should be marked helpers.requires_etcd."""
    server = EtcdServer(str(tmp_path))
    try:
        server.start()
        yield server
    finally:
        server.stop()
