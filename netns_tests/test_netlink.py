"""podnet.net.netlink and podnet.net.netns against the real kernel.

Everything happens inside namespaces of a `Lab`; the checks read the kernel
state back with iproute2 (`ip -j`, `bridge -j`) as the independent oracle, so
a message that the kernel accepted but understood differently is caught.
"""
import errno
import json
import os
import types

import pytest

from podnet.net import netlink as nlmod
from podnet.net import tun
from podnet.net.ip import AF_INET, AF_INET6, parse_cidr, parse_ip
from podnet.net.netlink import IFA_F_NODAD, NUD_PERMANENT, Netlink, NetlinkError
from podnet.net.netns import entered, open_netns

MAC1, MAC2, MAC3 = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:aa:bb:cc:dd:ee"


def net(text):
    return parse_cidr(text)


def ip(text):
    return parse_ip(text)


def current_netns_inode():
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def env(lab):
    """ns: where the socket talks; peer: a second namespace for veth peers."""
    ns = lab.namespace("nl")
    peer = lab.namespace("peer")
    home = current_netns_inode()
    with Netlink(netns=ns.path) as nl:
        assert current_netns_inode() == home         # opened there, came straight back
        yield types.SimpleNamespace(ns=ns, peer=peer, nl=nl)
    assert current_netns_inode() == home


def ipj(ns, *args):
    return ns.ip_json(*args)


def link_json(ns, name, details=False):
    return ipj(ns, *(["-d"] if details else []), "link", "show", name)[0]


def bridge_json(ns, *args):
    out = ns.run(["bridge", "-j"] + list(args)).stdout
    return json.loads(out) if out.strip() else []


def veth_pair(env, name="vh0", peer_name="eth0", up=True, **kw):
    """vh0 in env.ns, its peer straight in env.peer; both up (so there is carrier)."""
    fd = open_netns(env.peer.path)
    try:
        env.nl.add_veth(name, peer_name, peer_netns_fd=fd, **kw)
    finally:
        os.close(fd)
    link = env.nl.link(name)
    if up:
        env.nl.set_link(link.index, up=True)
        env.peer.ip("link", "set", peer_name, "up")
    return env.nl.link(name)


# --- links -------------------------------------------------------------------------

def test_bridge_create_and_read_back(env):
    env.nl.add_bridge("br-test", mtu=1400)
    oracle = link_json(env.ns, "br-test", details=True)
    link = env.nl.link("br-test")
    assert oracle["linkinfo"]["info_kind"] == "bridge" and link.kind == "bridge"
    assert link.index == oracle["ifindex"]
    assert link.mtu == oracle["mtu"] == 1400
    assert link.mac == oracle["address"]
    assert not link.up and "UP" not in oracle["flags"]
    assert env.nl.link(index=link.index).name == "br-test"
    assert "vlan_filtering" not in oracle["linkinfo"]["info_data"] or \
        oracle["linkinfo"]["info_data"]["vlan_filtering"] == 0


def test_bridge_exists(env):
    env.nl.add_bridge("br-test")
    with pytest.raises(NetlinkError) as e:
        env.nl.add_bridge("br-test")
    assert e.value.errno == errno.EEXIST
    assert e.value.strerror.startswith(os.strerror(errno.EEXIST))
    assert isinstance(e.value, OSError)


def test_links_dump_matches_ip(env):
    env.nl.add_bridge("br-a")
    veth_pair(env)
    ours = {(l.index, l.name, l.mtu, l.mac, l.kind) for l in env.nl.links()}
    oracle = {(l["ifindex"], l["ifname"], l["mtu"], l["address"],
               l.get("linkinfo", {}).get("info_kind", ""))
              for l in ipj(env.ns, "-d", "link", "show")}
    assert ours == oracle
    assert {l.name for l in env.nl.links()} == {"lo", "br-a", "vh0"}


def test_link_missing_or_impossible_names(env):
    assert env.nl.link("nope0") is None
    assert env.nl.link("x" * 15) is None
    assert env.nl.link("x" * 16) is None           # longer than IFNAMSIZ: cannot exist
    assert env.nl.link("é" * 8) is None            # 16 bytes
    assert env.nl.link("") is None
    assert env.nl.link(index=99999) is None


def test_veth_with_peer_in_another_namespace(env):
    env.nl.add_veth("vh0", "eth0", peer_netns_fd=_fd(env.peer), mtu=1450, peer_mac=MAC1)
    here = link_json(env.ns, "vh0", details=True)
    there = link_json(env.peer, "eth0", details=True)
    assert here["linkinfo"]["info_kind"] == there["linkinfo"]["info_kind"] == "veth"
    assert here["mtu"] == there["mtu"] == 1450
    assert there["address"] == MAC1
    assert "eth0" not in env.ns.link_names() and "vh0" not in env.peer.link_names()
    link = env.nl.link("vh0")
    assert link.kind == "veth" and link.mtu == 1450
    assert link.peer_index == there["ifindex"] == here["link_index"]
    assert link.link_netnsid is not None and link.link_netnsid == here["link_netnsid"]


_fds = []


def _fd(ns):
    fd = open_netns(ns.path)
    _fds.append(fd)
    return fd


@pytest.fixture(autouse=True)
def _close_fds():
    yield
    while _fds:
        os.close(_fds.pop())


def test_veth_in_same_namespace(env):
    env.nl.add_veth("va", "vb")
    a, b = env.nl.link("va"), env.nl.link("vb")
    assert a.peer_index == b.index and b.peer_index == a.index
    assert {"va", "vb"} <= env.ns.link_names()


def test_set_link_up_down_mtu_mac_promisc(env):
    link = veth_pair(env, up=False)
    env.nl.set_link(link.index, up=True)
    env.peer.ip("link", "set", "eth0", "up")
    assert "UP" in link_json(env.ns, "vh0")["flags"] and env.nl.link("vh0").up
    env.nl.set_link(link.index, mtu=1300, mac=MAC2)
    oracle = link_json(env.ns, "vh0")
    assert (oracle["mtu"], oracle["address"]) == (1300, MAC2)
    got = env.nl.link("vh0")
    assert (got.mtu, got.mac) == (1300, MAC2)
    env.nl.set_link(link.index, promisc=True)
    assert "PROMISC" in link_json(env.ns, "vh0")["flags"]
    got = env.nl.link("vh0")
    assert got.promisc and got.promiscuity == link_json(env.ns, "vh0", details=True)["promiscuity"]
    assert got.up                                       # promisc left UP alone
    env.nl.set_link(link.index, promisc=False)
    assert "PROMISC" not in link_json(env.ns, "vh0")["flags"]
    env.nl.set_link(link.index, up=False)
    oracle = link_json(env.ns, "vh0")
    assert "UP" not in oracle["flags"] and oracle["operstate"] == "DOWN"
    assert not env.nl.link("vh0").up and env.nl.link("vh0").operstate == "down"
    assert env.nl.link("vh0").mtu == 1300               # down left the MTU alone


def test_operstate_up(env):
    veth_pair(env)
    assert link_json(env.ns, "vh0")["operstate"] == "UP"
    assert env.nl.link("vh0").operstate == "up"


def test_set_link_master_and_release(env):
    env.nl.add_bridge("br0")
    br = env.nl.link("br0")
    vh = veth_pair(env)
    env.nl.set_link(vh.index, master=br.index)
    oracle = link_json(env.ns, "vh0", details=True)
    assert oracle["master"] == "br0"
    assert oracle["linkinfo"]["info_slave_kind"] == "bridge"
    got = env.nl.link("vh0")
    assert got.master == br.index and got.slave_kind == "bridge"
    assert [l["ifname"] for l in ipj(env.ns, "link", "show", "master", "br0")] == ["vh0"]
    env.nl.set_link(vh.index, master=0)
    assert "master" not in link_json(env.ns, "vh0")
    assert env.nl.link("vh0").master == 0


def test_set_link_rename_and_move_namespace(env):
    vh = veth_pair(env, up=False)
    env.nl.set_link(vh.index, name="renamed0")
    assert "renamed0" in env.ns.link_names() and env.nl.link("vh0") is None
    assert env.nl.link("renamed0").index == vh.index
    env.nl.set_link(vh.index, netns_fd=_fd(env.peer), name="moved0")
    assert "renamed0" not in env.ns.link_names()
    assert {"moved0", "eth0"} <= env.peer.link_names()


def test_hairpin(env):
    env.nl.add_bridge("br0")
    br = env.nl.link("br0")
    vh = veth_pair(env)
    env.nl.set_link(vh.index, master=br.index)
    def port():
        return link_json(env.ns, "vh0", details=True)["linkinfo"]["info_slave_data"]
    assert port()["hairpin"] is False
    env.nl.set_bridge_port(vh.index, hairpin=True)
    assert port()["hairpin"] is True
    env.nl.set_bridge_port(vh.index, hairpin=False)
    assert port()["hairpin"] is False


def _vlan_filtering_supported(nl):
    try:
        nl.add_bridge("br-probe", vlan_filtering=True)
    except NetlinkError as e:
        if e.errno == errno.EOPNOTSUPP:
            return False
        raise
    nl.del_link(nl.link("br-probe").index)
    return True


@pytest.mark.fullkernel
def test_vlan_filtering_bridge_and_port_vlans(env):
    if not _vlan_filtering_supported(env.nl):
        pytest.skip("kernel built without CONFIG_BRIDGE_VLAN_FILTERING")
    env.nl.add_bridge("br0", vlan_filtering=True)
    info = link_json(env.ns, "br0", details=True)["linkinfo"]["info_data"]
    assert info["vlan_filtering"] == 1
    br = env.nl.link("br0")
    vh = veth_pair(env)
    env.nl.set_link(vh.index, master=br.index)
    env.nl.bridge_vlan_del(vh.index, 1)
    env.nl.bridge_vlan_add(vh.index, 100, pvid=True, untagged=True)
    env.nl.bridge_vlan_add(vh.index, 200)
    (entry,) = bridge_json(env.ns, "vlan", "show", "dev", "vh0")
    vlans = {v["vlan"]: sorted(v.get("flags", [])) for v in entry["vlans"]}
    assert vlans == {100: ["Egress Untagged", "PVID"], 200: []}
    env.nl.bridge_vlan_del(vh.index, 200)
    (entry,) = bridge_json(env.ns, "vlan", "show", "dev", "vh0")
    assert [v["vlan"] for v in entry["vlans"]] == [100]


def test_vlan_filtering_unsupported_is_a_clear_error(env):
    """On this machine's kernel (no CONFIG_BRIDGE_VLAN_FILTERING) the attempt must fail
    loudly, not create a bridge that silently ignores the VLAN config."""
    if _vlan_filtering_supported(env.nl):
        pytest.skip("kernel supports VLAN filtering (covered by the fullkernel test)")
    with pytest.raises(NetlinkError) as e:
        env.nl.add_bridge("br0", vlan_filtering=True)
    assert e.value.errno == errno.EOPNOTSUPP
    assert env.nl.link("br0") is None


def test_del_link(env):
    env.nl.add_bridge("br-gone")
    index = env.nl.link("br-gone").index
    env.nl.del_link(index)
    assert "br-gone" not in env.ns.link_names()
    assert env.nl.link("br-gone") is None
    with pytest.raises(NetlinkError) as e:
        env.nl.del_link(index)
    assert e.value.errno == errno.ENODEV
    veth_pair(env)
    env.nl.del_link(env.nl.link("vh0").index)          # deleting one end removes the pair
    assert "eth0" not in env.peer.link_names()


# --- addresses --------------------------------------------------------------------

def addr_info(ns, dev):
    return {(a["local"], a["prefixlen"]): a for a in link_addrs(ns, dev)}


def link_addrs(ns, dev):
    return ipj(ns, "addr", "show", "dev", dev)[0]["addr_info"]


def test_ipv4_address_with_broadcast(env):
    vh = veth_pair(env)
    env.nl.add_addr(vh.index, net("10.1.0.2/24"))
    a = addr_info(env.ns, "vh0")[("10.1.0.2", 24)]
    assert a["broadcast"] == "10.1.0.255" and a["scope"] == "global" and a["label"] == "vh0"
    (got,) = env.nl.addrs(vh.index, AF_INET)
    assert got.net == net("10.1.0.2/24") and got.index == vh.index and got.label == "vh0"
    # The prefix route the kernel adds for it.
    assert {"dst": "10.1.0.0/24", "dev": "vh0", "prefsrc": "10.1.0.2"}.items() <= \
        ipj(env.ns, "route", "show", "10.1.0.0/24")[0].items()


@pytest.mark.parametrize("cidr", ["10.9.0.0/31", "10.9.0.7/32"])
def test_ipv4_point_to_point_sizes_have_no_broadcast(env, cidr):
    vh = veth_pair(env)
    env.nl.add_addr(vh.index, net(cidr))
    (a,) = [a for a in link_addrs(env.ns, "vh0") if a["family"] == "inet"]
    assert "broadcast" not in a


def test_address_exists_replace_and_delete(env):
    vh = veth_pair(env)
    env.nl.add_addr(vh.index, net("10.1.0.2/24"))
    with pytest.raises(NetlinkError) as e:
        env.nl.add_addr(vh.index, net("10.1.0.2/24"))
    assert e.value.errno == errno.EEXIST
    env.nl.add_addr(vh.index, net("10.1.0.2/24"), replace=True)
    env.nl.add_addr(vh.index, net("10.1.0.3/24"))
    assert set(addr_info(env.ns, "vh0")) >= {("10.1.0.2", 24), ("10.1.0.3", 24)}
    env.nl.del_addr(vh.index, net("10.1.0.3/24"))
    assert ("10.1.0.3", 24) not in addr_info(env.ns, "vh0")
    with pytest.raises(NetlinkError) as e:
        env.nl.del_addr(vh.index, net("10.1.0.3/24"))
    assert e.value.errno == errno.EADDRNOTAVAIL


def test_ipv6_address_nodad_and_delete(env):
    vh = veth_pair(env)
    env.nl.add_addr(vh.index, net("fd00::2/64"), nodad=True)
    env.nl.add_addr(vh.index, net("fd00::3/64"))
    info = addr_info(env.ns, "vh0")
    assert info[("fd00::2", 64)].get("nodad") is True
    assert "nodad" not in info[("fd00::3", 64)]
    got = {str(a.net): a for a in env.nl.addrs(vh.index, AF_INET6)}
    assert got["fd00::2/64"].flags & IFA_F_NODAD
    assert not got["fd00::3/64"].flags & IFA_F_NODAD
    assert "fe80" in " ".join(got)                       # the link-local one is listed too
    env.nl.del_addr(vh.index, net("fd00::2/64"))
    assert ("fd00::2", 64) not in addr_info(env.ns, "vh0")


def test_noprefixroute(env):
    vh = veth_pair(env)
    env.nl.add_addr(vh.index, net("10.7.0.2/24"), noprefixroute=True)
    assert addr_info(env.ns, "vh0")[("10.7.0.2", 24)].get("noprefixroute") is True
    assert ipj(env.ns, "route", "show", "10.7.0.0/24") == []


def test_addrs_all_links(env):
    vh = veth_pair(env)
    env.nl.add_addr(vh.index, net("10.1.0.2/24"))
    env.ns.ip("addr", "add", "10.5.5.5/8", "dev", "lo")
    ours = {(a.index, str(a.net)) for a in env.nl.addrs()}
    oracle = {(l["ifindex"], "%s/%d" % (a["local"], a["prefixlen"]))
              for l in ipj(env.ns, "addr", "show") for a in l["addr_info"]}
    assert ours == oracle


# --- routes -------------------------------------------------------------------------

@pytest.fixture
def routed(env):
    """vh0 up with 10.1.0.2/24 and fd00::2/64 (peer eth0 up with .1 / ::1)."""
    vh = veth_pair(env)
    env.nl.add_addr(vh.index, net("10.1.0.2/24"))
    env.nl.add_addr(vh.index, net("fd00::2/64"), nodad=True)
    env.peer.ip("addr", "add", "10.1.0.1/24", "dev", "eth0")
    env.peer.ip("addr", "add", "fd00::1/64", "dev", "eth0", "nodad")
    env.vh = vh
    return env


def route_json(ns, *args):
    return ipj(ns, "route", "show", *args)


def route6_json(ns, *args):
    return ipj(ns, "-6", "route", "show", *args)


def test_route_with_gateway_metric_mtu(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.add_route(net("10.2.0.0/16"), gateway=ip("10.1.0.1"), oif=vh.index, priority=50,
                 mtu=1400, advmss=1360)
    (r,) = route_json(ns, "10.2.0.0/16")
    assert (r["gateway"], r["dev"], r["metric"]) == ("10.1.0.1", "vh0", 50)
    assert r["metrics"] == [{"mtu": 1400, "advmss": 1360}]
    assert r.get("protocol", "boot") == "boot" and r.get("scope", "global") == "global"
    (got,) = [x for x in nl.routes() if x.dst == net("10.2.0.0/16")]
    assert (got.gateway, got.oif, got.priority, got.mtu, got.advmss) == \
        (ip("10.1.0.1"), vh.index, 50, 1400, 1360)
    assert got.table == 254 and got.protocol == nlmod.RTPROT_BOOT
    assert got.scope == nlmod.RT_SCOPE_UNIVERSE
    with pytest.raises(NetlinkError) as e:
        nl.add_route(net("10.2.0.0/16"), gateway=ip("10.1.0.1"), priority=50)
    assert e.value.errno == errno.EEXIST


def test_route_host_bits_are_masked(routed):
    routed.nl.add_route(net("10.2.3.4/16"), gateway=ip("10.1.0.1"))
    assert route_json(routed.ns, "10.2.0.0/16")[0]["gateway"] == "10.1.0.1"


def test_link_scope_route_and_delete(routed):
    """Regression: del_route sent scope 0 (universe), so a route without a gateway
    (scope link) could never be deleted (ESRCH)."""
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.add_route(net("10.3.0.0/16"), oif=vh.index)
    (r,) = route_json(ns, "10.3.0.0/16")
    assert r["scope"] == "link" and r["dev"] == "vh0" and "gateway" not in r
    nl.del_route(net("10.3.0.0/16"), oif=vh.index)
    assert route_json(ns, "10.3.0.0/16") == []
    with pytest.raises(NetlinkError) as e:
        nl.del_route(net("10.3.0.0/16"))
    assert e.value.errno == errno.ESRCH


def test_delete_route_with_gateway_and_by_dst_only(routed):
    nl, ns = routed.nl, routed.ns
    nl.add_route(net("10.2.0.0/16"), gateway=ip("10.1.0.1"))
    with pytest.raises(NetlinkError) as e:
        nl.del_route(net("10.2.0.0/16"), gateway=ip("10.1.0.99"))   # wrong gateway
    assert e.value.errno == errno.ESRCH
    nl.del_route(net("10.2.0.0/16"), gateway=ip("10.1.0.1"))
    assert route_json(ns, "10.2.0.0/16") == []
    nl.add_route(net("10.2.0.0/16"), gateway=ip("10.1.0.1"), priority=7)
    nl.del_route(net("10.2.0.0/16"))
    assert route_json(ns, "10.2.0.0/16") == []


def test_onlink_gateway(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    with pytest.raises(NetlinkError) as e:     # outside every connected subnet
        nl.add_route(net("10.4.0.0/16"), gateway=ip("192.168.99.1"), oif=vh.index)
    assert e.value.errno == errno.ENETUNREACH
    nl.add_route(net("10.4.0.0/16"), gateway=ip("192.168.99.1"), oif=vh.index, onlink=True)
    (r,) = route_json(ns, "10.4.0.0/16")
    assert r["gateway"] == "192.168.99.1" and "onlink" in r["flags"]
    (got,) = [x for x in nl.routes() if x.dst == net("10.4.0.0/16")]
    assert got.flags & nlmod.RTNH_F_ONLINK


def test_replace_and_append(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.add_route(net("0.0.0.0/0"), gateway=ip("10.1.0.1"))
    nl.add_route(net("0.0.0.0/0"), gateway=ip("10.1.0.5"), replace=True)
    (r,) = route_json(ns, "default")
    assert r["gateway"] == "10.1.0.5"
    nl.add_route(net("0.0.0.0/0"), gateway=ip("10.1.0.1"), oif=vh.index, replace=True, mtu=1280)
    (r,) = route_json(ns, "default")
    assert r["gateway"] == "10.1.0.1" and r["metrics"] == [{"mtu": 1280}]
    nl.add_route(net("10.8.0.0/16"), gateway=ip("10.1.0.1"), replace=True)   # replace creates
    assert route_json(ns, "10.8.0.0/16")[0]["gateway"] == "10.1.0.1"
    nl.add_route(net("10.8.0.0/16"), gateway=ip("10.1.0.1"), priority=9, append=True)
    assert sorted(r.get("metric", 0) for r in route_json(ns, "10.8.0.0/16")) == [0, 9]


def test_prefsrc_and_other_table(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.add_route(net("10.6.0.0/16"), oif=vh.index, prefsrc=ip("10.1.0.2"))
    assert route_json(ns, "10.6.0.0/16")[0]["prefsrc"] == "10.1.0.2"
    (got,) = [x for x in nl.routes() if x.dst == net("10.6.0.0/16")]
    assert got.prefsrc == ip("10.1.0.2") and got.scope == nlmod.RT_SCOPE_LINK
    for table in (100, 1000):                     # 1000 needs RTA_TABLE
        nl.add_route(net("0.0.0.0/0"), gateway=ip("10.1.0.1"), table=table)
        (r,) = route_json(ns, "table", str(table))
        assert r["dst"] == "default" and r["gateway"] == "10.1.0.1"
        (got,) = nl.routes(table=table)
        assert got.table == table and got.dst == net("0.0.0.0/0")
        assert all(x.table == 254 for x in nl.routes())
        nl.del_route(net("0.0.0.0/0"), table=table)
        assert route_json(ns, "table", str(table)) == []


def test_routes_list_main_table_matches_ip(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.add_route(net("10.2.0.0/16"), gateway=ip("10.1.0.1"), priority=3)
    nl.add_route(net("10.3.0.0/16"), oif=vh.index)
    nl.add_route(net("0.0.0.0/0"), gateway=ip("10.1.0.1"))
    ours = {(str(r.dst), str(r.gateway) if r.gateway else None, r.priority)
            for r in nl.routes(AF_INET)}
    oracle = {("0.0.0.0/0" if r["dst"] == "default" else r["dst"], r.get("gateway"),
               r.get("metric", 0)) for r in route_json(ns)}
    assert ours == oracle
    assert all(r.family == AF_INET for r in nl.routes(AF_INET))


def test_ipv6_routes(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.add_route(net("fd01::/64"), gateway=ip("fd00::1"), oif=vh.index, mtu=1400)
    (r,) = route6_json(ns, "fd01::/64")
    assert (r["gateway"], r["dev"]) == ("fd00::1", "vh0")
    assert r["metrics"] == [{"mtu": 1400}]
    (got,) = [x for x in nl.routes(AF_INET6) if x.dst == net("fd01::/64")]
    assert (got.gateway, got.oif, got.mtu, got.family) == (ip("fd00::1"), vh.index, 1400, AF_INET6)
    assert got.priority == r["metric"] == 1024              # the kernel's v6 default
    nl.add_route(net("::/0"), gateway=ip("fd00::1"), oif=vh.index)
    assert route6_json(ns, "default")[0]["gateway"] == "fd00::1"
    nl.add_route(net("::/0"), gateway=ip("fd00::5"), oif=vh.index, replace=True)
    assert [r["gateway"] for r in route6_json(ns, "default")] == ["fd00::5"]
    ours = {str(r.dst) for r in nl.routes(AF_INET6)}
    oracle = {"::/0" if r["dst"] == "default" else r["dst"] for r in route6_json(ns)}
    assert ours == oracle
    nl.del_route(net("fd01::/64"), gateway=ip("fd00::1"))
    nl.del_route(net("::/0"))
    assert route6_json(ns, "fd01::/64") == [] and route6_json(ns, "default") == []
    nl.add_route(net("fd02::/64"), oif=vh.index, priority=5)          # on-link, no gateway
    (r,) = route6_json(ns, "fd02::/64")
    assert r["dev"] == "vh0" and "gateway" not in r and r["metric"] == 5
    nl.del_route(net("fd02::/64"), oif=vh.index)
    assert route6_json(ns, "fd02::/64") == []


def test_route_get_matches_ip_route_get(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.add_route(net("10.2.0.0/16"), gateway=ip("10.1.0.1"), oif=vh.index)
    nl.add_route(net("fd01::/64"), gateway=ip("fd00::1"), oif=vh.index)
    for dst, gateway in (("10.1.0.1", None), ("10.2.3.4", "10.1.0.1"), ("fd01::9", "fd00::1")):
        (oracle,) = ipj(ns, "route", "get", dst)
        got = nl.route_get(ip(dst))
        assert (got.oif, got.gateway, got.dst) == (vh.index, ip(gateway) if gateway else None,
                                                   net(dst + ("/128" if ":" in dst else "/32")))
        assert oracle["dev"] == "vh0" and oracle.get("gateway") == gateway
    local = nl.route_get(ip("10.1.0.2"))                  # our own address: the local table, via lo
    assert local.type == nlmod.RTN_LOCAL and local.oif == nl.link("lo").index
    with pytest.raises(NetlinkError) as e:                # no default route here
        nl.route_get(ip("192.0.2.1"))
    assert e.value.errno == errno.ENETUNREACH


# --- neighbours ------------------------------------------------------------------------

def test_neighbours(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.set_neighbour(vh.index, ip("10.1.0.9"), MAC1)
    nl.set_neighbour(vh.index, ip("fd00::9"), MAC2)
    oracle = {n["dst"]: n for n in ipj(ns, "neigh", "show", "dev", "vh0")}
    assert oracle["10.1.0.9"]["lladdr"] == MAC1 and oracle["10.1.0.9"]["state"] == ["PERMANENT"]
    assert oracle["fd00::9"]["lladdr"] == MAC2 and oracle["fd00::9"]["state"] == ["PERMANENT"]
    (got,) = [n for n in nl.neighbours(AF_INET, vh.index) if n.dst == ip("10.1.0.9")]
    assert got.lladdr == MAC1 and got.state == NUD_PERMANENT and got.index == vh.index
    (got6,) = [n for n in nl.neighbours(AF_INET6, vh.index) if n.dst == ip("fd00::9")]
    assert got6.lladdr == MAC2 and got6.family == AF_INET6
    nl.set_neighbour(vh.index, ip("10.1.0.9"), MAC3)             # replace
    assert {n["dst"]: n["lladdr"] for n in ipj(ns, "neigh", "show", "dev", "vh0")}["10.1.0.9"] \
        == MAC3
    nl.del_neighbour(vh.index, ip("10.1.0.9"))
    nl.del_neighbour(vh.index, ip("fd00::9"))
    left = {n["dst"] for n in ipj(ns, "neigh", "show", "dev", "vh0")}
    assert not left & {"10.1.0.9", "fd00::9"}
    with pytest.raises(NetlinkError) as e:
        nl.del_neighbour(vh.index, ip("10.1.0.9"))
    assert e.value.errno == errno.ENOENT


# --- VXLAN and FDB ----------------------------------------------------------------------

def test_vxlan(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    nl.add_vxlan("vx0", 4242, local=ip("10.1.0.2"), port=4789, dev_index=vh.index,
                 mtu=1450, mac=MAC3)
    oracle = link_json(ns, "vx0", details=True)
    data = oracle["linkinfo"]["info_data"]
    assert oracle["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["local"], data["port"], data["learning"]) == \
        (4242, "10.1.0.2", 4789, False)
    assert data["link"] == "vh0"
    assert (oracle["mtu"], oracle["address"]) == (1450, MAC3)
    got = nl.link("vx0")
    assert got.kind == "vxlan" and got.mtu == 1450 and got.mac == MAC3
    assert got.info_data[nlmod.IFLA_VXLAN_ID] == (4242).to_bytes(4, "little")


def test_vxlan_defaults_and_learning(env):
    env.nl.add_vxlan("vx1", 1)
    data = link_json(env.ns, "vx1", details=True)["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["learning"]) == (1, 8472, False)  # flannel's port
    assert "local" not in data
    env.nl.add_vxlan("vx2", 2, port=4790, learning=True)
    data = link_json(env.ns, "vx2", details=True)["linkinfo"]["info_data"]
    assert (data["port"], data["learning"]) == (4790, True)


def fdb(ns, dev):
    """{mac: [entries]} of the static (self) entries on a VXLAN device."""
    out = {}
    for e in bridge_json(ns, "fdb", "show", "dev", dev):
        out.setdefault(e["mac"], []).append(e)
    return out


def test_vxlan_fdb(routed):
    nl, ns = routed.nl, routed.ns
    nl.add_vxlan("vx0", 1, local=ip("10.1.0.2"))
    vx = nl.link("vx0")
    nl.set_fdb(vx.index, MAC1, ip("10.1.0.7"))
    nl.set_fdb(vx.index, MAC2, ip("10.1.0.8"))
    entries = fdb(ns, "vx0")
    assert [e["dst"] for e in entries[MAC1]] == ["10.1.0.7"]
    assert [e["dst"] for e in entries[MAC2]] == ["10.1.0.8"]
    assert entries[MAC1][0]["state"] == "permanent" and "self" in entries[MAC1][0]["flags"]
    nl.set_fdb(vx.index, MAC1, ip("10.1.0.77"))                  # replaces the VTEP
    assert [e["dst"] for e in fdb(ns, "vx0")[MAC1]] == ["10.1.0.77"]
    nl.del_fdb(vx.index, MAC1)
    nl.del_fdb(vx.index, MAC2, ip("10.1.0.8"))
    assert not set(fdb(ns, "vx0")) & {MAC1, MAC2}
    with pytest.raises(NetlinkError) as e:
        nl.del_fdb(vx.index, MAC1)
    assert e.value.errno == errno.ENOENT


def test_fdb_dump_matches_bridge(routed):
    """Netlink.fdb(index): the VXLAN device's own entries, as `bridge fdb show dev` lists them."""
    nl, ns = routed.nl, routed.ns
    nl.add_vxlan("vx0", 1, local=ip("10.1.0.2"))
    vx = nl.link("vx0")
    nl.set_fdb(vx.index, MAC1, ip("10.1.0.7"))
    nl.set_fdb(vx.index, MAC2, ip("10.1.0.8"))
    got = {(e.lladdr, str(e.dst)) for e in nl.fdb(vx.index)}
    assert got == {(m, e["dst"]) for m, es in fdb(ns, "vx0").items() for e in es}
    assert got == {(MAC1, "10.1.0.7"), (MAC2, "10.1.0.8")}
    for e in nl.fdb(vx.index):
        assert e.family == nlmod.AF_BRIDGE and e.index == vx.index
        assert e.state == NUD_PERMANENT and e.flags & nlmod.NTF_SELF
    assert {e.index for e in nl.fdb()} >= {vx.index}       # all links without an index


def test_del_route_by_protocol(routed):
    """del_route(protocol=P) deletes only a route installed with protocol P."""
    nl, ns = routed.nl, routed.ns
    nl.add_route(net("10.5.0.0/16"), gateway=ip("10.1.0.1"), protocol=77)
    with pytest.raises(NetlinkError) as e:
        nl.del_route(net("10.5.0.0/16"), protocol=nlmod.RTPROT_STATIC)
    assert e.value.errno == errno.ESRCH
    assert route_json(ns, "10.5.0.0/16")[0]["protocol"] == "77"
    nl.del_route(net("10.5.0.0/16"), protocol=77)
    assert route_json(ns, "10.5.0.0/16") == []


def test_vxlan_flood_entries(routed):
    """Regression: the all-zeros MAC (flooding to every VTEP) was sent with
    NLM_F_REPLACE, which the kernel refuses for it (EOPNOTSUPP); it is a list."""
    nl, ns = routed.nl, routed.ns
    nl.add_vxlan("vx0", 1, local=ip("10.1.0.2"))
    vx = nl.link("vx0")
    zero = "00:00:00:00:00:00"
    nl.set_fdb(vx.index, zero, ip("10.1.0.7"))
    nl.set_fdb(vx.index, zero, ip("10.1.0.8"))
    nl.set_fdb(vx.index, zero, ip("10.1.0.8"))                   # idempotent
    assert sorted(e["dst"] for e in fdb(ns, "vx0")[zero]) == ["10.1.0.7", "10.1.0.8"]
    nl.del_fdb(vx.index, zero, ip("10.1.0.7"))
    assert [e["dst"] for e in fdb(ns, "vx0")[zero]] == ["10.1.0.8"]
    nl.set_fdb(vx.index, "01:00:5e:00:00:05", ip("10.1.0.9"))   # multicast MACs too
    assert [e["dst"] for e in fdb(ns, "vx0")["01:00:5e:00:00:05"]] == ["10.1.0.9"]


def test_vxlan_ipv6_vtep(routed):
    """Regression: an IPv6 local was sent as IFLA_VXLAN_LOCAL and the kernel took
    its first four bytes as an IPv4 address (fd00::2 became 253.0.0.0)."""
    nl, ns = routed.nl, routed.ns
    nl.add_vxlan("vx6", 6, local=ip("fd00::2"))
    data = link_json(ns, "vx6", details=True)["linkinfo"]["info_data"]
    assert data["local6"] == "fd00::2" and "local" not in data
    nl.set_fdb(nl.link("vx6").index, MAC1, ip("fd00::7"))
    assert [e["dst"] for e in fdb(ns, "vx6")[MAC1]] == ["fd00::7"]


# --- IPIP and TUN ---------------------------------------------------------------------

def test_ipip_link(env):
    if not os.path.exists("/sys/class/net/tunl0"):
        if os.path.exists("/proc/modules"):
            # Creating one would load ipip, which adds a tunl0 to every namespace, the root one too.
            pytest.skip("ipip is not loaded: load it before the session (modprobe ipip)")
        with pytest.raises(NetlinkError) as e:        # a kernel built without ipip
            env.nl.add_ipip("ipip-t0")
        assert e.value.errno == errno.EOPNOTSUPP
        assert env.nl.link("ipip-t0") is None
        return
    env.nl.add_ipip("ipip-t0", mtu=1400)
    oracle = link_json(env.ns, "ipip-t0", details=True)
    assert oracle["linkinfo"]["info_kind"] == "ipip" and oracle["mtu"] == 1400
    assert env.nl.link("ipip-t0").kind == "ipip"
    with pytest.raises(NetlinkError) as e:
        env.nl.add_ipip("ipip-t0")
    assert e.value.errno == errno.EEXIST


def test_tun_create_attach_and_persist(env):
    with entered(env.ns.path):
        fd, name = tun.open_tun("tun-t0", persist=True, vnet=True)
    try:
        assert name == "tun-t0"
        oracle = link_json(env.ns, "tun-t0", details=True)
        assert oracle["linkinfo"]["info_kind"] == "tun"
        assert oracle["linkinfo"]["info_data"]["type"] == "tun"
        assert oracle["linkinfo"]["info_data"]["vnet_hdr"] is True
        with entered(env.ns.path), pytest.raises(OSError) as e:
            tun.open_tun("tun-t0", persist=True, vnet=True, busy_hint="held by the first fd")
        assert e.value.errno == errno.EBUSY
        assert "cannot open TUN tun-t0" in str(e.value) and "held by the first fd" in str(e.value)
    finally:
        os.close(fd)
    assert env.nl.link("tun-t0") is not None           # persistent: outlives its fd
    with entered(env.ns.path):
        fd, name = tun.open_tun("tun-t0", vnet=True)    # attach again, and drop persistence
    os.close(fd)
    assert env.nl.link("tun-t0") is None
    with entered(env.ns.path):
        fd, name = tun.open_tun("tun%d")                # the kernel picks the name
    try:
        assert name.startswith("tun") and name != "tun%d" and env.nl.link(name).kind == "tun"
    finally:
        os.close(fd)


# --- errors -------------------------------------------------------------------------

def test_error_carries_errno_and_extended_ack(routed):
    with pytest.raises(NetlinkError) as e:
        routed.nl.add_route(net("10.4.0.0/16"), gateway=ip("192.168.9.1"))
    assert e.value.errno == errno.ENETUNREACH
    assert e.value.strerror == "%s: Nexthop has invalid gateway" % os.strerror(errno.ENETUNREACH)
    with pytest.raises(NetlinkError) as e:
        routed.nl.add_vxlan("vx-bad", 1 << 25)
    assert e.value.errno == errno.ERANGE
    assert "VXLAN ID must be lower than 16777216" in str(e.value)
    assert routed.nl.link("vx-bad") is None


def test_error_on_bad_link_attributes(env):
    with pytest.raises(NetlinkError) as e:
        env.nl.add_bridge("x" * 16)                     # longer than IFNAMSIZ
    assert e.value.errno in (errno.EINVAL, errno.ERANGE)   # ERANGE: policy validation (6.x)
    with pytest.raises(NetlinkError) as e:
        env.nl.set_link(99999, up=True)
    assert e.value.errno == errno.ENODEV
    with pytest.raises(ValueError):
        env.nl.set_link(1, mac="02:00:00:00:00")        # caught before the kernel
    # The socket is still usable after errors (no stale answers left behind).
    assert env.nl.link("lo").index == 1


# --- namespaces ------------------------------------------------------------------------

def test_netlink_in_another_namespace_leaves_the_caller_alone(lab):
    ns = lab.namespace("other")
    root_before = current_netns_inode()
    with Netlink(netns=ns.path) as nl:
        nl.add_bridge("br-elsewhere")
        assert current_netns_inode() == root_before
    assert "br-elsewhere" in ns.link_names()
    with Netlink() as here:                               # the root namespace: read only
        assert here.link("br-elsewhere") is None
    fd = open_netns(ns.path)
    try:
        with Netlink(netns=fd) as nl:                     # an fd works too
            assert nl.link("br-elsewhere") is not None
        os.fstat(fd)                                      # and stays open
    finally:
        os.close(fd)


def test_entered_switches_and_restores(lab):
    a, b = lab.namespace("a"), lab.namespace("b")
    home = current_netns_inode()
    with entered(a.path):
        assert current_netns_inode() == os.stat(a.path).st_ino
        with entered(b.path):
            assert current_netns_inode() == os.stat(b.path).st_ino
        assert current_netns_inode() == os.stat(a.path).st_ino
    assert current_netns_inode() == home
    fd = open_netns(b.path)
    try:
        with entered(fd):
            assert current_netns_inode() == os.stat(b.path).st_ino
        os.fstat(fd)                                      # the caller's fd is not closed
    finally:
        os.close(fd)
    assert current_netns_inode() == home


def test_entered_restores_when_the_block_raises(lab):
    a = lab.namespace("a")
    home = current_netns_inode()
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="inside"):
        with entered(a.path):
            assert current_netns_inode() == os.stat(a.path).st_ino
            raise RuntimeError("inside")
    assert current_netns_inode() == home
    assert set(os.listdir("/proc/self/fd")) == fds_before


def test_entered_bad_targets(lab, tmp_path):
    home = current_netns_inode()
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        with entered(str(tmp_path / "missing")):
            pass
    plain = tmp_path / "plain"
    plain.write_text("not a namespace")
    with pytest.raises(OSError) as e:
        with entered(str(plain)):
            pass
    assert e.value.errno == errno.EINVAL and "is not a network namespace" in str(e.value)
    with pytest.raises(OSError):
        Netlink(netns=str(plain))
    assert current_netns_inode() == home
    assert set(os.listdir("/proc/self/fd")) == fds_before


# --- big dumps (multi-part answers) -------------------------------------------------------

class CountingSocket:
    def __init__(self, sock):
        self.sock, self.recvs = sock, 0

    def send(self, data):
        return self.sock.send(data)

    def recv_into(self, buf):
        self.recvs += 1
        return self.sock.recv_into(buf)

    def close(self):
        self.sock.close()


def test_dump_of_2000_routes(routed):
    nl, ns, vh = routed.nl, routed.ns, routed.vh
    want = set()
    for i in range(2000):
        dst = net("10.%d.%d.0/24" % (100 + i // 256, i % 256))
        nl.add_route(dst, gateway=ip("10.1.0.1"), oif=vh.index, priority=i % 7)
        want.add((str(dst), i % 7))
    nl.sock = counting = CountingSocket(nl.sock)
    routes = nl.routes(AF_INET)
    assert counting.recvs > 1                              # really a multi-part answer
    got = {(str(r.dst), r.priority) for r in routes if r.gateway == ip("10.1.0.1")}
    assert got == want
    oracle = {(r["dst"], r.get("metric", 0)) for r in route_json(ns) if r.get("gateway")}
    assert oracle == want
    assert len(routes) == len(route_json(ns))
    # The socket is in step afterwards: the next request gets its own answer.
    assert nl.link("vh0").index == vh.index
    for i in range(0, 2000, 2):
        nl.del_route(net("10.%d.%d.0/24" % (100 + i // 256, i % 256)))
    assert len([r for r in nl.routes(AF_INET) if r.gateway]) == 1000
    assert len([r for r in route_json(ns) if r.get("gateway")]) == 1000


def test_dump_of_many_links_and_addresses(env):
    names = ["br%d" % i for i in range(150)]
    for name in names:
        env.nl.add_bridge(name)
    vh = veth_pair(env)
    for i in range(600):
        env.nl.add_addr(vh.index, net("10.%d.%d.1/32" % (20 + i // 250, i % 250)))
    env.nl.sock = counting = CountingSocket(env.nl.sock)
    links = env.nl.links()
    assert counting.recvs > 1
    assert {l.name for l in links} == set(names) | {"lo", "vh0"} == env.ns.link_names()
    addrs = {str(a.net) for a in env.nl.addrs(vh.index, AF_INET)}
    assert len(addrs) == 600
    assert addrs == {"%s/%d" % (a["local"], a["prefixlen"])
                     for a in link_addrs(env.ns, "vh0") if a["family"] == "inet"}


# --- policy routing rules ------------------------------------------------------------

def test_rules_dump_matches_ip_rule(env):
    env.ns.ip("rule", "add", "from", "10.244.1.0/24", "iif", "lo", "lookup", "100", "priority", "100")
    env.ns.ip("rule", "add", "not", "to", "10.96.0.0/12", "fwmark", "0x4000/0x4000", "prohibit", "priority", "200")
    env.ns.ip("-6", "rule", "add", "from", "fd00::/64", "lookup", "101", "priority", "300")
    rules = env.nl.rules(AF_INET)
    by_prio = {r.priority: r for r in rules}
    assert [r["priority"] for r in ipj(env.ns, "rule", "show")] == [r.priority for r in rules]
    assert {0, 100, 200, 32766, 32767} <= set(by_prio)
    r = by_prio[100]
    assert (str(r.src), r.dst, r.iifname, r.table, r.action, r.invert) == ("10.244.1.0/24", None, "lo", 100,
                                                                             nlmod.FR_ACT_TO_TBL, False)
    r = by_prio[200]
    assert (str(r.dst), r.fwmark, r.fwmask, r.action, r.invert) == ("10.96.0.0/12", 0x4000, 0x4000,
                                                                     nlmod.FR_ACT_PROHIBIT, True)
    assert by_prio[32766].table == 254 and by_prio[0].table == 255
    (v6,) = [r for r in env.nl.rules(AF_INET6) if r.priority == 300]
    assert str(v6.src) == "fd00::/64" and v6.table == 101
