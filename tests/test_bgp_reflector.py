"""The reflector process: peer specs, the peers file (re-read on SIGHUP), the dump
file and a clean Cease on SIGTERM, over loopback (no root)."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from calico_lite.bgp.session import PeerConfig
from calico_lite.bgp.speaker import Speaker
from calico_lite.reflector import node_address, parse_announce, parse_args, parse_peer, read_peers_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peer_specs():
    assert parse_peer("192.0.2.1", 64512) == PeerConfig("192.0.2.1", 64512)
    p = parse_peer("192.0.2.2,client,passive,as=65001,port=1179,hold=9,local=192.0.2.100,next-hop-self", 64512,
                   hold_time=30, connect_retry=2)
    assert (p.address, p.rr_client, p.passive, p.remote_as, p.port, p.hold_time, p.local_address, p.next_hop_self,
            p.connect_retry) == ("192.0.2.2", True, True, 65001, 1179, 9, "192.0.2.100", True, 2)
    # md5 comes last and keeps its commas and equals signs
    assert parse_peer("192.0.2.3,client,md5=a,b=c", 64512).md5_password == "a,b=c"
    for bad in ("192.0.2.4,bogus", "not-an-ip", "192.0.2.5,hold=1", "192.0.2.6,as=x", "192.0.2.7,local="):
        with pytest.raises(ValueError):
            parse_peer(bad, 64512)


def test_announce_specs_and_arguments():
    assert parse_announce("10.1.0.0/26") == ("10.1.0.0/26", None)
    assert parse_announce("10.1.0.0/26,next_hop=192.0.2.9") == ("10.1.0.0/26", "192.0.2.9")
    for bad in ("10.1.0.1/26", "10.1.0.0/26,via=1.2.3.4", "10.1.0.0/26,next_hop=x"):
        with pytest.raises(ValueError):
            parse_announce(bad)
    args = parse_args(["--router-id", "10.0.0.1", "--as", "64512", "--peer", "192.0.2.1,client"])
    assert args.local_as == 64512 and args.peer_configs[0].rr_client
    assert args.listen is None          # found at start: node_address()
    # graceful restart and idle hold reach every peer
    p = args.peer_configs[0]
    assert p.graceful_restart and p.stale_time == 360 and (p.idle_hold_time, p.idle_hold_max) == (1.0, 60.0)
    args = parse_args(["--router-id", "10.0.0.1", "--as", "64512", "--peer", "192.0.2.1", "--graceful-restart-time",
                       "0", "--idle-hold-time", "5", "--idle-hold-max", "2", "--stale-time", "30"])
    p = args.peer_configs[0]
    assert not p.graceful_restart and p.stale_time == 30 and (p.idle_hold_time, p.idle_hold_max) == (5.0, 5.0)
    for bad in (["--graceful-restart-time", "5000"], ["--listen", "somewhere"]):
        with pytest.raises(SystemExit):
            parse_args(["--router-id", "10.0.0.1", "--as", "64512"] + bad)
    with pytest.raises(SystemExit):
        parse_args(["--router-id", "10.0.0.1", "--as", "64512", "--peer", "192.0.2.1,nonsense"])


def test_node_address_is_the_router_id_if_local_else_the_route_source():
    # every 127/8 address is this host's (on lo)
    assert node_address("127.0.0.5") == ("127.0.0.5", "the router id is an address of this host")
    # a router id that is no address of ours: the source address towards the first peer
    address, how = node_address("192.0.2.77", ["127.0.0.2"])
    assert address.startswith("127.") and how == "the source address of the route to peer 127.0.0.2"


def test_node_address_without_any_route_asks_for_listen(monkeypatch):
    from calico_lite import reflector
    monkeypatch.setattr(reflector, "_source_towards", lambda address: None)
    with pytest.raises(ValueError, match="give --listen"):
        node_address("192.0.2.77", ["192.0.2.78"])
    monkeypatch.setattr(reflector, "_source_towards", lambda address: "198.51.100.7" if address == "192.0.2.1" else None)
    assert node_address("192.0.2.77", ["192.0.2.78"]) == ("198.51.100.7", "the source address of the default route")


def test_reflector_listens_on_the_node_address_not_everywhere(tmp_path):
    dump = tmp_path / "dump.json"
    proc = subprocess.Popen([sys.executable, "-m", "calico_lite.reflector", "--router-id", "127.0.0.3", "--as", "64512",
                             "--port", "0", "--dump-file", str(dump)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: read_dump(dump) is not None, what="the dump file")
        state = read_dump(dump)
        assert state["listen"] == "127.0.0.3"
        socket.create_connection(("127.0.0.3", state["port"]), 2).close()
        # 0.0.0.0 would accept this too
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.4", state["port"]), 2).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "listening on 127.0.0.3:%d (the router id is an address of this host)" % state["port"] \
            in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_peers_file(tmp_path):
    path = tmp_path / "peers"
    path.write_text("# route reflector clients\n192.0.2.1,client\n\n192.0.2.2,client,md5=x # trailing\n")
    peers = read_peers_file(str(path), 64512, 9, 1.0)
    assert [p.address for p in peers] == ["192.0.2.1", "192.0.2.2"]
    assert peers[1].md5_password == "x" and peers[0].hold_time == 9


def read_dump(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


def test_reflector_process_reloads_peers_and_ceases(tmp_path):
    peers_file = tmp_path / "peers"
    peers_file.write_text("127.0.0.2,client,passive\n")
    dump = tmp_path / "dump.json"
    proc = subprocess.Popen([sys.executable, "-m", "calico_lite.reflector", "--router-id", "10.0.0.1", "--as", "64512",
                             "--listen", "127.0.0.1", "--port", "0", "--peers-from-file", str(peers_file),
                             "--announce", "10.99.0.0/24,next_hop=127.0.0.1", "--dump-file", str(dump)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: read_dump(dump) is not None, what="the dump file")
        port = read_dump(dump)["port"]
        assert [p["address"] for p in read_dump(dump)["peers"]] == ["127.0.0.2"]

        async def client():
            got, down = {}, asyncio.Event()
            speaker = Speaker(64512, "10.0.0.2", listen_address="127.0.0.2", port=None)
            speaker.subscribe(lambda prefix, route: got.__setitem__(prefix, route))
            speaker.subscribe_sessions(lambda address, old, new, reason: down.set()
                                       if old == "Established" else None)
            await speaker.start()
            speaker.add_peer(PeerConfig("127.0.0.1", 64512, port=port, local_address="127.0.0.2", hold_time=9))
            speaker.announce("10.99.2.0/24")
            while "10.99.0.0/24" not in got:
                await asyncio.sleep(0.01)
            assert got["10.99.0.0/24"].next_hop == "127.0.0.1"
            await asyncio.get_running_loop().run_in_executor(None, wait_for, lambda: any(
                r["prefix"] == "10.99.2.0/24" for r in (read_dump(dump) or {}).get("routes", [])))
            # a new peer in the file, the old one gone: SIGHUP applies both
            peers_file.write_text("127.0.0.3,client,passive\n")
            proc.send_signal(signal.SIGHUP)
            await asyncio.wait_for(down.wait(), 5)
            status = speaker.peer_status()[0]
            assert "peer de-configured" in status["last_error"]
            await speaker.stop()
        asyncio.run(asyncio.wait_for(client(), 15))
        wait_for(lambda: [p["address"] for p in read_dump(dump)["peers"]] == ["127.0.0.3"], what="the reload")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        log = proc.stderr.read()
        assert "peer 127.0.0.3 added (peers file)" in log and "stopping: sending Cease" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
