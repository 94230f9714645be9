"""flanneld heals what is deleted by hand, without an etcd event (issue 12).

A two-node vxlan cluster (lab.cluster.Cluster: etcd, `python -m flanneld.daemon`
in each node, one pod per node through the flannel conflist) whose daemons
re-sync their backend every PERIOD seconds (--reconcile-period). On node1, by
hand: a route, a neighbour entry, an FDB entry, the VTEP flannel.1 itself, its
address, its up flag. Each comes back within the period (plus a little: the
daemons share two cores with the test), nothing is written to etcd, and the
pods ping each other again. The VTEP comes back with its MAC, so node2's
entries for node1 (and node1's lease) stay valid; subnet.env is not touched.
"""
import ipaddress
import json
import os
import time

import pytest

from lab.cluster import Cluster, Lab

from helpers import ping_many, wait_until

PERIOD = 2.0
SLACK = 2.0         # a sync takes milliseconds; this is for a loaded machine


@pytest.fixture(scope="module")
def cluster(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        c = Cluster(lab, nodes=2, backend="vxlan", flanneld_args=["--reconcile-period", str(PERIOD)])
        c.start()
        for node in c.nodes:
            c.add_pod(node, node.role + "-pod")
        yield c





def remote_of(c, node, other):
    """(subnet, gateway, VtepMAC, public IP) of `other`'s lease as `node` should program it."""
    subnet = ipaddress.ip_interface(c.subnet_env(other)["FLANNEL_SUBNET"]).network
    (link,) = other.ip_json("link", "show", "flannel.1")
    return str(subnet), str(subnet.network_address), link["address"], other.underlay_ip


def state(c, node, other):
    """What `node` has for `other`: the route, the neighbour, the FDB entry (None if absent)."""
    subnet, gateway, mac, public_ip = remote_of(c, node, other)
    if "flannel.1" not in node.link_names():
        return {"route": False, "neigh": False, "fdb": False}
    routes = {r["dst"]: r for r in node.ip_json("route", "show", "proto", "77")}
    neighs = {n["dst"]: n for n in node.ip_json("neigh", "show", "dev", "flannel.1") if "dst" in n}
    out = node.run(["bridge", "-j", "fdb", "show", "dev", "flannel.1"]).stdout
    fdb = [e for e in (json.loads(out) if out.strip() else []) if e.get("mac") == mac and e.get("dst") == public_ip]
    route = routes.get(subnet)
    neigh = neighs.get(gateway)
    return {
        "route": route is not None and route.get("gateway") == gateway and route.get("dev") == "flannel.1",
        "neigh": neigh is not None and neigh.get("lladdr") == mac and "PERMANENT" in neigh.get("state", []),
        "fdb": bool(fdb),
    }


def vtep_addresses(node):
    """The IPv4 addresses on flannel.1 (`ip -4` lists no link that has none)."""
    return [a["local"] for link in node.ip_json("-4", "addr", "show", "flannel.1") for a in link["addr_info"]]


def healthy(c, node, other):
    return all(state(c, node, other).values())


def etcd_revision(c):
    out = c.etcdctl("endpoint", "status", "-w", "json").stdout
    return json.loads(out)[0]["Status"]["header"]["revision"]


def pods_ping(c):
    a, b = c.pods
    return ping_many({(a.name, b.name): (a.ns, b.ip), (b.name, a.name): (b.ns, a.ip)})


def heals(c, node, other, what, break_it):
    """Break something on `node` with `break_it()`, then wait for the daemon to put it back."""
    assert healthy(c, node, other) and pods_ping(c) == {}
    revision = etcd_revision(c)
    break_it()
    assert not healthy(c, node, other), "breaking %s changed nothing" % what
    took = wait_until(lambda: healthy(c, node, other), PERIOD + SLACK, "%s to come back" % what, interval=0.1)
    print("%s came back after %.2fs" % (what, took))
    assert pods_ping(c) == {}
    assert etcd_revision(c) == revision, "no etcd write (and so no watch event) was needed"
    for n in c.nodes:
        assert c.flanneld[n.role].poll() is None
    return took


def test_reconcile_rounds_that_find_everything_in_place_change_and_say_nothing(cluster):
    c = cluster
    assert all(healthy(c, a, b) for a in c.nodes for b in c.nodes if a is not b)
    sizes = {n.role: os.path.getsize(c.flanneld_log(n)) for n in c.nodes}
    time.sleep(2 * PERIOD + 0.5)
    assert {n.role: os.path.getsize(c.flanneld_log(n)) for n in c.nodes} == sizes


def test_a_route_deleted_by_hand_comes_back(cluster):
    c = cluster
    node1, node2 = c.node_by_role("node1"), c.node_by_role("node2")
    subnet = remote_of(c, node1, node2)[0]
    heals(c, node1, node2, "the route", lambda: node1.ip("route", "del", subnet, "dev", "flannel.1"))


def test_a_neighbour_deleted_by_hand_comes_back(cluster):
    c = cluster
    node1, node2 = c.node_by_role("node1"), c.node_by_role("node2")
    gateway = remote_of(c, node1, node2)[1]
    heals(c, node1, node2, "the neighbour", lambda: node1.ip("neigh", "del", gateway, "dev", "flannel.1"))


def test_an_fdb_entry_deleted_by_hand_comes_back(cluster):
    c = cluster
    node1, node2 = c.node_by_role("node1"), c.node_by_role("node2")
    _, _, mac, public_ip = remote_of(c, node1, node2)
    heals(c, node1, node2, "the FDB entry",
          lambda: node1.run(["bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", public_ip]))


def test_the_vtep_deleted_by_hand_comes_back_with_its_mac(cluster):
    c = cluster
    node1, node2 = c.node_by_role("node1"), c.node_by_role("node2")
    (before,) = node1.ip_json("-d", "link", "show", "flannel.1")
    env_path = c.subnet_file(node1)
    env_before, env_mtime = c.subnet_env(node1), os.stat(env_path).st_mtime_ns
    heals(c, node1, node2, "flannel.1", lambda: node1.ip("link", "del", "flannel.1"))
    (after,) = node1.ip_json("-d", "link", "show", "flannel.1")
    assert after["address"] == before["address"]            # node2's entries for node1 stay valid
    assert after["mtu"] == before["mtu"] and "UP" in after["flags"]
    assert after["linkinfo"]["info_data"]["id"] == 1 and after["linkinfo"]["info_data"]["port"] == 8472
    (addrs,) = node1.ip_json("-4", "addr", "show", "flannel.1")
    subnet = ipaddress.ip_interface(env_before["FLANNEL_SUBNET"]).network
    assert [(a["local"], a["prefixlen"]) for a in addrs["addr_info"]] == [(str(subnet.network_address), 32)]
    assert c.subnet_env(node1) == env_before and os.stat(env_path).st_mtime_ns == env_mtime
    assert healthy(c, node2, node1)


def test_the_vtep_set_down_or_stripped_of_its_address_is_configured_again(cluster):
    c = cluster
    node1, node2 = c.node_by_role("node1"), c.node_by_role("node2")
    heals(c, node1, node2, "flannel.1 up", lambda: node1.ip("link", "set", "flannel.1", "down"))
    (addrs,) = node1.ip_json("-4", "addr", "show", "flannel.1")
    (addr,) = addrs["addr_info"]

    # Without its address the entries stay (so healthy() cannot tell), but traffic from
    # node1 itself to node2's pods has lost its source address: wait for the address.
    node1.ip("addr", "del", "%s/32" % addr["local"], "dev", "flannel.1")
    took = wait_until(lambda: vtep_addresses(node1) == [addr["local"]], PERIOD + SLACK,
                      "the VTEP's address to come back", interval=0.1)
    print("the VTEP's address came back after %.2fs" % took)
    assert pods_ping(c) == {}


def test_no_daemon_failed_on_the_way(cluster):
    for node in cluster.nodes:
        with open(cluster.flanneld_log(node)) as f:
            text = f.read()
        for bad in ("Traceback", "sync failed", "failed to"):
            assert bad not in text, text[-3000:]
