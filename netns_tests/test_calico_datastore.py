"""calico_lite.datastore.Datastore against a real etcd 3.4 on loopback.

As netns_tests/test_etcd_subnet.py: each test starts its own etcd (the `etcd`
fixture: helpers.EtcdServer on free ports of 127.0.0.1, data in tmp_path) and
kills it by PID however the test ends.
"""
import threading
import time

import pytest

from calico_lite.datastore import ClusterConfig, DataError, Datastore, EtcdError, Node, PoolExhaustedError
from podnet.net.ip import parse_cidr

from helpers import free_port, requires_etcd

pytestmark = requires_etcd


@pytest.fixture
def etcd_url(etcd):
    return etcd.url


@pytest.fixture
def store(etcd_url):
    s = Datastore([etcd_url])
    s.put_config(ClusterConfig(pool="10.65.0.0/24", block_size=26, ipip_mode="cross-subnet"))
    return s


def net(text):
    return parse_cidr(text)


def test_config_and_nodes_round_trip(etcd_url):
    s = Datastore(etcd_url)
    assert s.get_config() is None
    with pytest.raises(DataError, match="no calico-lite config"):
        s.allocate_block("node1")
    cfg = ClusterConfig(as_number=65001, node_to_node_mesh=False, ipip_mode="never")
    s.put_config(cfg)
    assert s.get_config() == cfg
    n1 = Node("node1", "192.168.50.1/24")
    rr = Node("rr1", "192.168.50.9/24", role="route-reflector", rr_cluster_id="244.0.0.1")
    s.put_node(n1)
    s.put_node(rr)
    assert s.get_node("node1") == n1 and s.get_node("nope") is None
    snap = s.snapshot()
    assert snap.config == cfg and snap.nodes == {"node1": n1, "rr1": rr} and snap.revision > 0
    assert s.delete_node("rr1") and not s.delete_node("rr1")
    assert s.list_nodes() == {"node1": n1}


def test_block_allocation_is_idempotent_and_exclusive(store):
    b1 = store.allocate_block("node1")
    assert b1 == net("10.65.0.0/26")
    assert store.allocate_block("node1") == b1                 # a rerun: the same block
    b2 = store.allocate_block("node2")
    assert b2 == net("10.65.0.64/26")
    b3 = store.allocate_block("node1", additional=True)
    assert b3 == net("10.65.0.128/26")
    assert store.snapshot().blocks_of("node1") == [b1, b3]
    assert store.allocate_block("node1") == b1                 # still the lowest of its own
    store.allocate_block("node3")
    with pytest.raises(PoolExhaustedError, match="4 /26 blocks"):
        store.allocate_block("node4")
    assert store.allocate_block("node3") == net("10.65.0.192/26")   # a holder still gets its own


def test_release_only_by_the_owner(store):
    b = store.allocate_block("node1")
    assert not store.release_block(b, "node2")
    assert store.list_blocks() == {b: "node1"}
    assert store.release_block(b, "node1")
    assert store.list_blocks() == {}
    assert not store.release_block(b, "node1")
    assert store.allocate_block("node2") == b                  # free again


def test_delete_node_releases_its_blocks(store):
    store.put_node(Node("node1", "192.168.50.1/24"))
    store.allocate_block("node1")
    store.allocate_block("node1", additional=True)
    keep = store.allocate_block("node2")
    store.delete_node("node1")
    assert store.list_blocks() == {keep: "node2"}


def test_concurrent_allocation_never_gives_a_block_twice(etcd_url):
    setup = Datastore(etcd_url)
    setup.put_config(ClusterConfig(pool="10.65.0.0/26", block_size=29))    # 8 blocks
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = Datastore(etcd_url).allocate_block("node%d" % i)
        except Exception as e:          # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(set(results.values())) == 8
    assert setup.list_blocks() == {b: "node%d" % i for i, b in results.items()}


def test_malformed_block_value_is_never_reallocated(store, etcd_url):
    import etcd3gw
    port = int(etcd_url.rsplit(":", 1)[1])
    etcd3gw.client(host="127.0.0.1", port=port).put("/calico-lite/v1/blocks/10.65.0.0-26", "garbage")
    assert store.allocate_block("node1") == net("10.65.0.64/26")


def test_wait_for_change(store):
    rev = store.snapshot().revision
    t0 = time.monotonic()
    assert store.wait_for_change(rev, 0.5) is False
    assert time.monotonic() - t0 >= 0.4
    store.put_node(Node("node1", "192.168.50.1/24"))
    assert store.wait_for_change(rev, 5) is True              # the change after rev is seen, even if earlier


def test_unreachable_etcd_is_a_clear_error():
    s = Datastore("http://127.0.0.1:%d" % free_port(), timeout=1)
    with pytest.raises(EtcdError, match="unreachable"):
        s.get_config()
