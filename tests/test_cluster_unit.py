"""The parts of lab.cluster that need no root: names, addresses, argv, env."""
import ipaddress
import json
import os
import subprocess

import pytest

from lab import cluster
from lab.cluster import (
    IFNAMSIZ,
    AddressPool,
    CommandFailed,
    Lab,
    check_role,
    cni_env,
    exec_argv,
    lab_prefix,
    parse_netns_list,
    port_name,
    stale_pattern,
)


def test_lab_prefix_shape_and_uniqueness():
    prefix = lab_prefix(pid=4194304, tag="a3f9")
    assert prefix == "pn4194304xa3f9"
    mine = {lab_prefix() for _ in range(50)}
    assert len(mine) > 40                       # random tag: labs in one process differ
    assert all(p.startswith("pn%dx" % os.getpid()) for p in mine)


def test_stale_pattern_matches_only_our_family():
    pattern = stale_pattern()
    prefix = lab_prefix(pid=1234, tag="00ff")
    match = pattern.match(prefix + "-node1")
    assert match and match.group(1) == "1234"
    for other in ("pn1234xa3f9", "pnx1234-node", "pod1234xa3f9-n", "pn1234xZZZZ-n",
                  "cni-1234", "xpn1234xa3f9-n", "pn1234xa3f91-n"):
        assert not pattern.match(other), other
    assert stale_pattern("tt").match("tt5x0000-a")
    assert not stale_pattern("tt").match(prefix + "-node1")


def test_port_names_fit_ifnamsiz():
    assert port_name("node1", 0) == "ve-node1"
    assert port_name("a" * 12, 0) == "ve-" + "a" * 12
    assert len(port_name("a" * 12, 0)) == IFNAMSIZ
    assert port_name("a" * 13, 7) == "ve-7"
    assert port_name("we ird", 2) == "ve-2"
    # With the longest pid and role, a lab's netns name is only limited by the filesystem,
    # but every interface name it makes must fit.
    for role in ("n", "node-with-a-very-long-name-indeed", "x" * 64):
        assert len(port_name(role, 99999)) <= IFNAMSIZ


def test_roles_are_checked():
    assert check_role("node1") == "node1"
    assert check_role("pod-web.1_a") == "pod-web.1_a"
    for bad in ("", "-x", "a/b", "a b", "../x", "x" * 65, None):
        with pytest.raises(ValueError):
            check_role(bad)


def test_address_pool_hands_out_lowest_free_hosts():
    pool = AddressPool("192.168.50.0/24")
    assert str(pool.take()) == "192.168.50.1"
    assert str(pool.take("192.168.50.3")) == "192.168.50.3"
    assert str(pool.take()) == "192.168.50.2"
    assert str(pool.take()) == "192.168.50.4"


def test_address_pool_rejects_bad_and_duplicate_addresses():
    pool = AddressPool("10.0.0.0/30")
    for bad in ("10.0.0.0", "10.0.0.3", "10.0.1.1"):
        with pytest.raises(ValueError):
            pool.take(bad)
    pool.take("10.0.0.2")
    with pytest.raises(ValueError, match="already in use"):
        pool.take("10.0.0.2")
    assert str(pool.take()) == "10.0.0.1"
    with pytest.raises(ValueError, match="no free address"):
        pool.take()
    with pytest.raises(ValueError):
        AddressPool("10.0.0.1/24")              # host bits set: a typo, not a subnet


def test_address_pool_point_to_point():
    pool = AddressPool("10.0.0.0/31")
    assert [str(pool.take()), str(pool.take())] == ["10.0.0.0", "10.0.0.1"]
    with pytest.raises(ValueError):
        pool.take()
    assert AddressPool("10.0.0.7/32").take() == ipaddress.ip_address("10.0.0.7")


def test_parse_netns_list():
    text = "pn1x0000-a (id: 3)\npn1x0000-b\n\ncni-1 (id: 0)\n"
    assert parse_netns_list(text) == ["pn1x0000-a", "pn1x0000-b", "cni-1"]
    assert parse_netns_list("") == []


def test_exec_argv():
    assert exec_argv("pn1x0000-n", ["ping", "-c", 1]) == \
        ["ip", "netns", "exec", "pn1x0000-n", "ping", "-c", "1"]
    assert exec_argv("n", "echo $X | wc") == ["ip", "netns", "exec", "n", "sh", "-c", "echo $X | wc"]


def test_cni_env():
    env = cni_env("ADD", "c1", "/var/run/netns/p", "eth0", "/opt/a:/opt/b",
                  {"CNI_ARGS": "K8S_POD_NAME=web", "PATH": "/x"})
    assert env == {"PATH": "/x", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
                   "CNI_NETNS": "/var/run/netns/p", "CNI_IFNAME": "eth0",
                   "CNI_PATH": "/opt/a:/opt/b", "CNI_ARGS": "K8S_POD_NAME=web"}
    assert cni_env("DEL", "c1", None, "eth0", "/opt")["CNI_NETNS"] == ""


def test_run_cni_sends_config_and_parses_output(monkeypatch):
    """run_cni's plumbing, with the `ip netns exec` replaced by a recorder."""
    seen = {}

    def fake_run(argv, input=None, check=True, timeout=None, env=None):
        seen.update(argv=argv, input=input, env=env)
        return subprocess.CompletedProcess(argv, 0, '{"cniVersion": "1.0.0"}\n', "")

    monkeypatch.setattr(cluster, "_run", fake_run)
    ns = cluster.Namespace(None, "pn1x0000-node1", "node1")
    out = ns.run_cni("/bin/bridge", "ADD", "c1", "/var/run/netns/p", "eth0",
                     {"name": "n", "type": "bridge"}, "/bin")
    assert seen["argv"] == ["ip", "netns", "exec", "pn1x0000-node1", "/bin/bridge"]
    assert json.loads(seen["input"]) == {"name": "n", "type": "bridge"}
    assert seen["env"]["CNI_COMMAND"] == "ADD"
    assert out.returncode == 0 and out.result == {"cniVersion": "1.0.0"}

    monkeypatch.setattr(cluster, "_run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 1, "not json", "oops"))
    out = ns.run_cni("/bin/bridge", "DEL", "c1", "", "eth0", b"{}", "/bin")
    assert (out.returncode, out.stdout, out.result, out.stderr) == (1, "not json", None, "oops")


def test_command_failed_shows_stderr():
    err = CommandFailed(2, ["ip", "x"], "", "Cannot find device\n")
    assert "Cannot find device" in str(err)
    assert isinstance(err, subprocess.CalledProcessError)


def test_lab_touches_nothing_until_asked():
    lab = Lab()
    assert lab.namespaces == [] and lab._workdir is None
    assert lab in Lab._open
    lab.cleanup()                               # nothing made: no ip command run
    lab.cleanup()
    assert lab not in Lab._open
