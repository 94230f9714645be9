"""EtcdSubnetManager against a real etcd 3.4 on loopback.

Each test starts its own etcd (the `etcd` fixture: helpers.EtcdServer on free
ports of 127.0.0.1, data dir in tmp_path) and kills it by PID at the end,
however the test ends. Several managers in one process stand in for several
nodes: what tells nodes apart is the public IP.
"""
import logging
import os
import queue
import shutil
import subprocess
import threading
import time

import pytest

from flanneld.config import ConfigError
from flanneld.subnet import Lease, parse_lease
from podnet.net.ip import parse_ip

from helpers import EtcdServer, requires_etcd

pytestmark = requires_etcd

PREFIX = "/coreos.com/network"
CONFIG = '{"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}'
# 10.5.0.0/28 in /30s: 4 subnets, the first skipped -> room for exactly three nodes.
SMALL = '{"Network": "10.5.0.0/28", "SubnetLen": 30, "Backend": {"Type": "host-gw"}}'


def make_certs(d):
    """A throwaway CA, a server cert for 127.0.0.1 and a client cert, all EC P-256."""
    os.makedirs(d)

    def run(*args):
        subprocess.run(args, cwd=d, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=podnet test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        run("openssl", "req", *key, "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + name)
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write(ext)
        run("openssl", "x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", name + ".crt", "-days", "1", "-extfile", name + ".ext")
    return {n: os.path.join(d, n) for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def manager(server, **kw):
    from flanneld.subnet.etcd import EtcdSubnetManager
    kw.setdefault("retry_min", 0.1)
    kw.setdefault("retry_max", 0.5)
    return EtcdSubnetManager([server.url], prefix=PREFIX, **kw)


def put_config(server, text=CONFIG):
    server.client().put(PREFIX + "/config", text)


class Watch:
    """watch_leases() in a thread, its events in a queue, any exception kept."""

    def __init__(self, sm, revision):
        self.stop = threading.Event()
        self.events = queue.Queue()
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(sm, revision), daemon=True)
        self.thread.start()

    def _run(self, sm, revision):
        try:
            for event in sm.watch_leases(revision, self.stop):
                self.events.put(event)
        except BaseException as e:       # the test asserts there is none
            self.error = e

    def wait_for(self, match, timeout=8):
        """The first event for which match(kind, payload) is true; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(event)
            if match(*event):
                return event
        pytest.fail("no matching watch event within %ss; saw %r (error %r)" % (timeout, seen, self.error))

    def close(self):
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "watch did not end after stop_event"
        assert self.error is None, "watch_leases raised %r" % self.error


@pytest.fixture
def watches():
    opened = []
    yield lambda sm, revision: opened.append(Watch(sm, revision)) or opened[-1]
    for w in opened:
        w.close()


def etcd_ttl(server, lease_id):
    return int(server.client().post(server.client().get_url("/kv/lease/timetolive"), json={"ID": lease_id})["TTL"])


def held_id(sm, lease):
    return sm._held[lease.subnet][0]


# ---- config -----------------------------------------------------------------

def test_network_config(etcd):
    from flanneld.subnet.etcd import ConfigMissingError
    sm = manager(etcd)
    with pytest.raises(ConfigMissingError, match="no network config at /coreos.com/network/config"):
        sm.get_network_config()
    put_config(etcd)
    config = sm.get_network_config()
    assert (str(config.network), config.subnet_len, config.backend_type) == ("10.244.0.0/16", 24, "vxlan")
    assert config.backend == {"Type": "vxlan"}
    put_config(etcd, '{"Network": "10.244.0.0/16", "SubnetLen": 8}')
    with pytest.raises(ConfigError, match="SubnetLen 8"):
        sm.get_network_config()
    put_config(etcd, "{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        sm.get_network_config()


# ---- acquiring ------------------------------------------------------------------

def test_three_nodes_acquire_distinct_subnets_concurrently(etcd):
    from flanneld.subnet.etcd import NetworkFullError
    put_config(etcd, SMALL)          # exactly three subnets: collisions are likely and must be retried
    ips = ["192.168.50.%d" % i for i in (1, 2, 3)]
    barrier = threading.Barrier(3)
    results, errors = {}, []

    def node(ip):
        try:
            sm = manager(etcd)
            sm.get_network_config()
            barrier.wait()
            results[ip] = sm.acquire_lease(ip, "host-gw", None, ttl=60)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=node, args=(ip,)) for ip in ips]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    subnets = {str(l.subnet) for l in results.values()}
    assert subnets == {"10.5.0.4/30", "10.5.0.8/30", "10.5.0.12/30"}
    leases, revision = manager(etcd).list_leases()
    assert revision > 0
    assert {(str(l.subnet), str(l.public_ip)) for l in leases} == \
        {(str(l.subnet), ip) for ip, l in results.items()}
    # The stored value is exactly Lease.value(), flannel's JSON.
    stored = etcd.client().get(results[ips[0]].key(PREFIX))
    assert stored == [b'{"PublicIP":"192.168.50.1","BackendType":"host-gw"}']
    for l in results.values():
        assert time.time() + 50 < l.expiration <= time.time() + 61
    with pytest.raises(NetworkFullError, match="10.5.0.0/28 is full"):
        manager(etcd).acquire_lease("192.168.50.4", "host-gw", None, ttl=60)


def test_restarted_node_gets_its_subnet_back(etcd):
    put_config(etcd)
    first = manager(etcd)
    lease = first.acquire_lease("192.168.50.7", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:01"}, ttl=60)
    manager(etcd).acquire_lease("192.168.50.8", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:02"}, ttl=60)
    old_id = held_id(first, lease)
    # The daemon restarts: a new manager, same public IP, a new VTEP MAC.
    again_sm = manager(etcd)
    again = again_sm.acquire_lease("192.168.50.7", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:03"}, ttl=120)
    assert again.subnet == lease.subnet
    raw = etcd.client().get(lease.key(PREFIX))[0]
    assert parse_lease(lease.key(PREFIX), raw).backend_data == {"VtepMAC": "aa:aa:aa:aa:aa:03"}
    assert etcd_ttl(etcd, held_id(again_sm, again)) > 100          # a fresh etcd lease with the new TTL
    assert etcd_ttl(etcd, old_id) == -1                             # the old one was revoked
    leases, _ = again_sm.list_leases()
    assert len(leases) == 2
    # The network was changed under it: the old lease does not fit, a new one is taken.
    put_config(etcd, CONFIG.replace("10.244.", "10.245."))
    moved = manager(etcd).acquire_lease("192.168.50.7", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:03"}, ttl=60)
    assert str(moved.subnet).startswith("10.245.")
    assert etcd.client().get(lease.key(PREFIX)) == []


def test_renew_extends_the_ttl(etcd):
    put_config(etcd)
    sm = manager(etcd, renew_margin=3)
    lease = sm.acquire_lease("192.168.50.9", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:09"}, ttl=6)
    assert 2 <= sm.renew_delay(lease) <= 3
    time.sleep(2.2)
    assert etcd_ttl(etcd, held_id(sm, lease)) <= 4
    renewed = sm.renew_lease(lease)
    assert renewed == lease and renewed.expiration > lease.expiration + 1.5
    assert etcd_ttl(etcd, held_id(sm, lease)) >= 5
    # A renewal is a keepalive: same key, same etcd lease, no new value.
    kv = etcd.client().get(lease.key(PREFIX), metadata=True)[0][1]
    assert int(kv["lease"]) == held_id(sm, renewed) and kv["version"] == "1"
    # From another manager (the daemon restarted since acquiring) it works too.
    assert manager(etcd).renew_lease(lease).expiration > time.time() + 4


def test_renew_recreates_a_deleted_lease_and_detects_a_lost_one(etcd):
    from flanneld.subnet.etcd import LeaseLostError
    put_config(etcd)
    sm = manager(etcd)
    lease = sm.acquire_lease("192.168.50.10", "udp", None, ttl=30)
    etcd.client().delete(lease.key(PREFIX))          # an operator removed it by hand
    renewed = sm.renew_lease(lease)
    assert etcd.client().get(lease.key(PREFIX)) == [lease.value().encode()]
    assert renewed.expiration > time.time() + 25
    # Our lease expired while we were cut off and another node took the subnet.
    etcd.client().put(lease.key(PREFIX), Lease(lease.subnet, parse_ip("192.168.50.11"), "udp").value())
    with pytest.raises(LeaseLostError, match="is now held by 192.168.50.11"):
        sm.renew_lease(renewed)


# ---- watching -----------------------------------------------------------------------

def test_watch_sees_other_nodes_put_change_delete_and_expiry(etcd, watches):
    put_config(etcd)
    me = manager(etcd)
    mine = me.acquire_lease("192.168.50.1", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:01"}, ttl=60)
    leases, revision = me.list_leases()
    assert leases == [mine]
    w = watches(me, revision)
    other = manager(etcd)
    lease = other.acquire_lease("192.168.50.2", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:02"}, ttl=60)
    kind, got = w.wait_for(lambda k, p: k == "put")
    assert got == lease and got.backend_data == {"VtepMAC": "aa:aa:aa:aa:aa:02"}
    other.acquire_lease("192.168.50.2", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:22"}, ttl=60)
    kind, got = w.wait_for(lambda k, p: k == "put")
    assert got.subnet == lease.subnet and got.backend_data == {"VtepMAC": "aa:aa:aa:aa:aa:22"}
    assert other.release_lease(lease)
    assert w.wait_for(lambda k, p: k == "delete") == ("delete", lease.subnet)
    # A short TTL that nobody renews: etcd deletes the key and the watcher sees it.
    short = manager(etcd).acquire_lease("192.168.50.3", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:03"}, ttl=2)
    w.wait_for(lambda k, p: k == "put" and p.subnet == short.subnet)
    t0 = time.monotonic()
    assert w.wait_for(lambda k, p: k == "delete", timeout=6) == ("delete", short.subnet)
    assert time.monotonic() - t0 < 4
    assert me.list_leases()[0] == [mine]


def test_watch_survives_an_etcd_restart(etcd, watches, caplog):
    from flanneld.subnet.etcd import EtcdError
    put_config(etcd)
    me = manager(etcd)
    mine = me.acquire_lease("192.168.50.1", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:01"}, ttl=30)
    _, revision = me.list_leases()
    w = watches(me, revision)
    other = manager(etcd)
    theirs = other.acquire_lease("192.168.50.2", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:02"}, ttl=30)
    w.wait_for(lambda k, p: k == "put")
    with caplog.at_level(logging.WARNING, logger="flanneld.subnet.etcd"):
        etcd.stop()
        with pytest.raises(EtcdError, match="connection refused"):
            me.renew_lease(mine)
        time.sleep(2.5)
        assert w.error is None and w.thread.is_alive()
        etcd.start()
        kind, leases = w.wait_for(lambda k, p: k == "resync", timeout=10)
    assert sorted(str(l.public_ip) for l in leases) == ["192.168.50.1", "192.168.50.2"]
    assert any("etcd watch interrupted" in r.getMessage() for r in caplog.records)
    assert me.renew_lease(mine).expiration > time.time() + 25
    # The watch goes on after the resync.
    other.release_lease(theirs)
    assert w.wait_for(lambda k, p: k == "delete") == ("delete", theirs.subnet)


def test_compacted_revision_gives_a_resync(etcd, watches):
    put_config(etcd)
    sm = manager(etcd)
    a = sm.acquire_lease("192.168.50.1", "udp", None, ttl=60)
    _, old_revision = sm.list_leases()
    b = manager(etcd).acquire_lease("192.168.50.2", "udp", None, ttl=60)
    c = etcd.client()
    c.put("/unrelated", "1")                    # the watch must start below the compaction point
    current = int(c.post(c.get_url("/kv/range"), json={"key": "eA=="})["header"]["revision"])
    c.post(c.get_url("/kv/compaction"), json={"revision": current, "physical": True})
    w = watches(sm, old_revision)
    kind, leases = w.wait_for(lambda k, p: True)
    assert kind == "resync" and set(leases) == {a, b}
    manager(etcd).acquire_lease("192.168.50.3", "udp", None, ttl=60)
    assert str(w.wait_for(lambda k, p: True)[1].public_ip) == "192.168.50.3"


def test_watch_ends_promptly_when_stopped(etcd):
    put_config(etcd)
    sm = manager(etcd)
    stop = threading.Event()
    events = sm.watch_leases(sm.list_leases()[1], stop)
    done = threading.Event()
    threading.Thread(target=lambda: (list(events), done.set()), daemon=True).start()
    time.sleep(0.3)
    stop.set()
    assert done.wait(2)


def test_malformed_entries_are_skipped_with_a_log(etcd, watches, caplog):
    put_config(etcd, SMALL)
    c = etcd.client()
    c.put(PREFIX + "/subnets/10.5.0.4-30", "{not json")
    c.put(PREFIX + "/subnets/10.5.0.8-30", '{"BackendType": "udp"}')          # no PublicIP
    c.put(PREFIX + "/subnets/garbage", '{"PublicIP": "192.168.50.9"}')        # not a subnet key
    sm = manager(etcd)
    with caplog.at_level(logging.WARNING, logger="flanneld.subnet.etcd"):
        leases, revision = sm.list_leases()
    assert leases == []
    text = caplog.text
    assert "10.5.0.4-30" in text and "10.5.0.8-30" in text and "garbage" in text
    # Their subnets still count as taken: the only free one is 10.5.0.12/30.
    lease = sm.acquire_lease("192.168.50.1", "udp", None, ttl=60)
    assert str(lease.subnet) == "10.5.0.12/30"
    w = watches(sm, revision)
    w.wait_for(lambda k, p: k == "put")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flanneld.subnet.etcd"):
        c.put(lease.key(PREFIX), "garbage")
        assert w.wait_for(lambda k, p: True) == ("delete", lease.subnet)
    assert "malformed lease" in caplog.text


# ---- TLS ----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make test certificates")
def test_tls_with_client_certificates(tmp_path, watches):
    from flanneld.subnet.etcd import EtcdError
    certs = make_certs(str(tmp_path / "pki"))
    server = EtcdServer(str(tmp_path), tls=certs)
    try:
        server.start()
        sm = manager(server, cafile=certs["ca.crt"], certfile=certs["client.crt"], keyfile=certs["client.key"])
        sm._post("/kv/put", {"key": "L2NvcmVvcy5jb20vbmV0d29yay9jb25maWc=",      # /coreos.com/network/config
                             "value": __import__("base64").b64encode(CONFIG.encode()).decode()})
        assert str(sm.get_network_config().network) == "10.244.0.0/16"
        lease = sm.acquire_lease("192.168.50.1", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:01"}, ttl=60)
        leases, revision = sm.list_leases()
        assert leases == [lease]
        w = watches(sm, revision)
        other = manager(server, cafile=certs["ca.crt"], certfile=certs["client.crt"], keyfile=certs["client.key"])
        theirs = other.acquire_lease("192.168.50.2", "vxlan", {"VtepMAC": "aa:aa:aa:aa:aa:02"}, ttl=60)
        assert w.wait_for(lambda k, p: k == "put") == ("put", theirs)
        assert sm.renew_lease(lease).expiration > time.time() + 55
        with pytest.raises(EtcdError, match=r"TLS handshake failed \(check --etcd-cafile\)"):
            manager(server).get_network_config()
        with pytest.raises(EtcdError, match="client certificate"):
            manager(server, cafile=certs["ca.crt"]).get_network_config()
        with pytest.raises(ValueError, match="needs both"):
            manager(server, cafile=certs["ca.crt"], certfile=certs["client.crt"])
    finally:
        server.stop()
