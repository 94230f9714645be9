"""podnet.etcd without a server: encoding, keys, endpoints, request bodies, error
messages, failover and the watch stream's parsing (etcd3gw clients replaced by
fakes). Against a real etcd: netns_tests/test_etcd_subnet.py and
netns_tests/test_calico_datastore.py, through flanneld and calico-lite."""
import base64
import json
import subprocess
import sys
import threading
import time

import pytest

from podnet import etcd
from podnet.etcd import KV, EtcdClient, EtcdError, WatchCompacted
from podnet.net.ip import parse_cidr


def b64(text):
    return base64.b64encode(text.encode()).decode()


# ---- pure helpers -------------------------------------------------------------------------

def test_base64_both_ways():
    assert etcd.b64("/a/key") == b64("/a/key")
    assert etcd.b64(b"\x00\xff") == "AP8="
    assert etcd.unb64(b64("value")) == b"value"
    assert etcd.unb64(None) == b"" and etcd.unb64("") == b""


def test_prefix_end():
    assert etcd.prefix_end("/coreos.com/network/subnets/") == b"/coreos.com/network/subnets0"
    assert etcd.prefix_end("/calico-lite/v1/") == b"/calico-lite/v10"
    assert etcd.prefix_end(b"a") == b"b"


def test_network_keys():
    net = parse_cidr("10.65.0.64/26")
    assert etcd.net_key_name(net) == "10.65.0.64-26"
    assert etcd.net_from_key("/calico-lite/v1/blocks/10.65.0.64-26") == net
    assert etcd.net_from_key("10.244.3.0-24") == parse_cidr("10.244.3.0/24")
    # host bits are kept: flanneld masks them, calico-lite refuses the key
    assert str(etcd.net_from_key("/x/10.244.3.7-24")) == "10.244.3.7/24"
    for bad in ("/x/garbage", "/x/10.0.0.0", "/x/10.0.0.0-33", "/x/10.0.0.0-", "/x/-24", ""):
        with pytest.raises(ValueError):
            etcd.net_from_key(bad)


def test_parse_endpoints():
    eps = etcd.parse_endpoints("http://10.0.0.1:2379, https://[fd00::1]:2380,http://etcd/ ,")
    assert [tuple(e) for e in eps] == [("http", "10.0.0.1", 2379, "http://10.0.0.1:2379"),
                                       ("https", "fd00::1", 2380, "https://[fd00::1]:2380"),
                                       ("http", "etcd", 2379, "http://etcd")]
    assert eps[1].host == "fd00::1" and eps[2].url == "http://etcd"
    assert etcd.parse_endpoints(["https://h:1"]) == [("https", "h", 1, "https://h:1")]
    for bad in ([], "", " , ", "10.0.0.1:2379", "ftp://h:1", "http://:1"):
        with pytest.raises(ValueError):
            etcd.parse_endpoints(bad)
    with pytest.raises(ValueError, match="bad port"):
        etcd.parse_endpoints("http://h:notaport")


def test_transaction_bodies():
    k = b64("/k")
    assert etcd.cmp_absent("/k") == {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}
    assert etcd.cmp_mod("/k", 7) == {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": 7}
    assert etcd.cmp_value("/k", "v") == {"key": k, "target": "VALUE", "result": "EQUAL", "value": b64("v")}
    assert etcd.op_put("/k", "v") == {"request_put": {"key": k, "value": b64("v")}}
    assert etcd.op_put("/k", b"v", lease=42) == {"request_put": {"key": k, "value": b64("v"), "lease": 42}}
    assert etcd.op_delete("/k") == {"request_delete_range": {"key": k}}


def test_decode_kv_and_event():
    raw = {"key": b64("/k"), "value": b64("v"), "mod_revision": "7", "create_revision": "5", "lease": "99"}
    assert etcd.decode_kv(raw) == KV("/k", b"v", 7, 5, 99)
    assert etcd.decode_kv({"key": b64("/k")}) == KV("/k", b"", 0, 0, 0)
    assert etcd.decode_event({"kv": raw}) == ("PUT", KV("/k", b"v", 7, 5, 99))
    assert etcd.decode_event({"type": "DELETE", "kv": {"key": b64("/k"), "mod_revision": "8"}}) == \
        ("DELETE", KV("/k", b"", 8, 0, 0))


def test_compaction_is_an_etcd_error():
    e = WatchCompacted(5, "9")
    assert isinstance(e, EtcdError) and (e.start_revision, e.compact_revision) == (5, "9")
    assert str(e) == "revision 5 was compacted (oldest kept: 9)"


def test_importing_does_not_load_the_client():
    code = ("import sys, podnet.etcd; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('etcd3gw', 'requests', 'urllib3')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- the client without a server ------------------------------------------------------------

@pytest.mark.parametrize("endpoints, files, words", [
    ("http://h:1", {"cafile": "ca"}, "no endpoint is https"),
    ("https://h:1", {"certfile": "ca"}, "needs both"),
    ("https://h:1", {"keyfile": "ca"}, "needs both"),
    ("https://h:1", {"cafile": "missing"}, "cafile .*missing is not readable"),
])
def test_constructor_refuses_bad_tls_arguments(tmp_path, endpoints, files, words):
    (tmp_path / "ca").write_text("x")
    with pytest.raises(ValueError, match=words):
        EtcdClient(endpoints, **{k: str(tmp_path / v) for k, v in files.items()})


def test_constructor_takes_good_arguments_without_connecting(tmp_path):
    ca = str(tmp_path / "ca")
    (tmp_path / "ca").write_text("x")
    c = EtcdClient("http://h:1,http://h:2", timeout=2)
    assert [e.port for e in c.endpoints] == [1, 2] and c.current == 0 and c.timeout == 2
    c = EtcdClient(["http://h:1", "https://h:2"], cafile=ca, certfile=ca, keyfile=ca)
    assert (c.cafile, c.certfile, c.keyfile) == (ca, ca, ca)


def test_sessions_ignore_the_environment_and_use_the_tls_files(tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent")
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    c = EtcdClient(["http://h:1", "https://h:2"], cafile=str(ca), certfile=str(ca), keyfile=str(ca))
    plain, tls = c._client(0).session, c._client(1).session
    assert not plain.trust_env and not tls.trust_env
    assert tls.verify == str(ca) and tls.cert == (str(ca), str(ca))
    assert plain.cert is None
    assert c._client(1) is c._client(1)                      # one per thread and endpoint
    other = []
    t = threading.Thread(target=lambda: other.append(c._client(1)))
    t.start()
    t.join()
    assert other[0] is not c._client(1)


def test_error_descriptions():
    import requests
    from etcd3gw.exceptions import ConnectionFailedError, Etcd3Exception
    c = EtcdClient("http://h:1")

    def chained(outer, inner):
        try:
            try:
                raise inner
            except Exception:
                raise outer  # noqa: B904 (an implicitly chained error is the case under test)
        except Exception as e:
            return e

    refused = requests.exceptions.ConnectionError("... [Errno 111] Connection refused")
    assert c.describe(0, chained(ConnectionFailedError(str(refused)), refused)) == "etcd http://h:1: connection refused"
    timeout = requests.exceptions.ConnectionError("Read timed out. (read timeout=5)")
    assert c.describe(0, timeout) == "etcd http://h:1: no answer in time (read timed out)"
    ssl = requests.exceptions.SSLError("HTTPSConnectionPool: Max retries (Caused by SSLError(SSLCertVerificationError("
                                       "1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed (_ssl.c:992)')))")
    assert c.describe(0, ssl) == ("etcd http://h:1: TLS handshake failed (check --etcd-cafile): "
                                  "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    alert = requests.exceptions.SSLError("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert (_ssl.c:2580)")
    assert "may require a client certificate" in c.describe(0, alert)
    assert c.describe(0, Etcd3Exception("etcdserver: key not found\n")) == "etcd http://h:1: etcdserver: key not found"
    assert c.describe(0, ValueError("Expecting value")) == "etcd http://h:1: unexpected answer: Expecting value"


class FakeClient:
    """Stands in for an etcd3gw client: post() answers from `answer(path, body)` or raises it."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []
        self.api_path = "/v3/"

    def get_url(self, path):
        return "fake" + path

    def post(self, url, json=None):
        self.calls.append((url[len("fake"):], json))
        result = self.answer(url[len("fake"):], json)
        if isinstance(result, Exception):
            raise result
        return result


def fake_client(monkeypatch, *answers):
    c = EtcdClient(",".join("http://h:%d" % (i + 1) for i in range(len(answers))))
    fakes = [FakeClient(a) for a in answers]
    monkeypatch.setattr(c, "_client", lambda index: fakes[index])
    return c, fakes


def test_failover_moves_to_the_next_endpoint_and_remembers_it(monkeypatch):
    import requests
    down = lambda path, body: requests.exceptions.ConnectionError("[Errno 111] Connection refused")  # noqa: E731
    up = lambda path, body: {"header": {"revision": "12"}, "kvs": [                # noqa: E731
        {"key": b64("/p/a"), "value": b64("1"), "mod_revision": "3"}]}
    c, (f1, f2) = fake_client(monkeypatch, down, up)
    assert c.get_prefix("/p/") == ([KV("/p/a", b"1", 3, 0, 0)], 12)
    assert f2.calls == [("/kv/range", {"key": b64("/p/"), "range_end": b64("/p0")})]
    assert c.current == 1
    assert c.get("/p/a") == (KV("/p/a", b"1", 3, 0, 0), 12)
    assert len(f1.calls) == 1                        # the good one is asked first now
    c, _ = fake_client(monkeypatch, down, down)
    with pytest.raises(EtcdError, match=r"^etcd unreachable: http://h:1: connection refused; "
                                        r"http://h:2: connection refused$"):
        c.put("/k", "v")


def test_a_refusal_is_not_retried_elsewhere(monkeypatch):
    from etcd3gw.exceptions import Etcd3Exception
    c, (f1, f2) = fake_client(monkeypatch, lambda p, b: Etcd3Exception("etcdserver: too many requests"),
                              lambda p, b: {})
    with pytest.raises(EtcdError, match="^etcd http://h:1: etcdserver: too many requests$"):
        c.delete("/k")
    assert f2.calls == []


def test_requests_bodies_and_answers(monkeypatch):
    answers = {"/kv/put": {}, "/kv/deleterange": {"deleted": "1"}, "/kv/txn": {"succeeded": True},
               "/lease/grant": {"ID": "77", "TTL": "60"}, "/lease/keepalive": {"result": {"TTL": "59"}},
               "/kv/lease/revoke": {}, "/kv/range": {"header": {"revision": "4"}}}
    c, (f,) = fake_client(monkeypatch, lambda path, body: answers[path])
    c.put("/k", "v", lease=77)
    assert c.delete("/k") is True
    assert c.txn([etcd.cmp_absent("/k")], [etcd.op_put("/k", "v")]) is True
    assert c.lease_grant(60) == (77, 60)
    assert c.lease_keepalive(77) == 59
    c.lease_revoke(77)
    assert c.get("/nothing") == (None, 4)
    assert f.calls[:3] == [
        ("/kv/put", {"key": b64("/k"), "value": b64("v"), "lease": 77}),
        ("/kv/deleterange", {"key": b64("/k")}),
        ("/kv/txn", {"compare": [etcd.cmp_absent("/k")], "success": [etcd.op_put("/k", "v")], "failure": []})]
    answers["/kv/deleterange"], answers["/kv/txn"] = {}, {}
    answers["/lease/grant"], answers["/lease/keepalive"] = {"error": "too small"}, {"result": {}}
    assert c.delete("/k") is False and c.txn([], []) is False and c.lease_keepalive(77) == 0
    with pytest.raises(EtcdError, match="refused a lease of 1s: too small"):
        c.lease_grant(1)


# ---- the watch stream ---------------------------------------------------------------------

class FakeResponse:
    """A streamed HTTP answer: `chunks`, then (hang=True) a read that blocks on a real
    socket until the watch's stop guard shuts it down, as with a quiet etcd."""

    def __init__(self, chunks, status_code=200, hang=False):
        import socket
        self.chunks, self.status_code, self.hang = chunks, status_code, hang
        self.text = "refused"
        self.closed = threading.Event()
        self.sock, self.peer = socket.socketpair()
        self.raw = self.sock              # _shutdown() uses raw.fileno()

    def iter_content(self, chunk_size=None):
        yield from self.chunks
        if self.hang:
            data = self.sock.recv(1)      # b"" once shut down
            if data:
                yield data

    def close(self):
        self.closed.set()
        self.sock.close()
        self.peer.close()


def watch_client(monkeypatch, resp):
    c = EtcdClient("http://h:1")
    fake = FakeClient(lambda p, b: {})
    posted = []

    class Session:
        def post(self, url, json=None, stream=False, timeout=None):
            posted.append((url, json, stream, timeout))
            if isinstance(resp, Exception):
                raise resp
            return resp

    fake.session = Session()
    monkeypatch.setattr(c, "_client", lambda index: fake)
    return c, posted


def line(result=None, **top):
    msg = dict(top) if top else {"result": result}
    return (json.dumps(msg) + "\n").encode()


def test_watch_yields_results_split_across_chunks(monkeypatch):
    event = {"kv": {"key": b64("/p/a"), "value": b64("1"), "mod_revision": "9"}}
    data = line({"header": {"revision": "8"}, "created": True}) + b"\n" + line({"events": [event]})
    resp = FakeResponse([data[:7], data[7:40], data[40:]])
    c, posted = watch_client(monkeypatch, resp)
    results = list(c.watch("/p/", 8, threading.Event(), idle_timeout=30))
    assert [r.get("created") for r in results] == [True, None]
    assert etcd.decode_event(results[1]["events"][0]) == ("PUT", KV("/p/a", b"1", 9, 0, 0))
    url, body, stream, timeout = posted[0]
    assert url == "fake/watch" and stream and timeout == (5.0, 30)
    assert body == {"create_request": {"key": b64("/p/"), "range_end": b64("/p0"), "start_revision": 8,
                                       "progress_notify": True}}
    assert resp.closed.is_set()


@pytest.mark.parametrize("data, error, words", [
    (line({"compact_revision": "20", "canceled": True}), WatchCompacted, "revision 8 was compacted"),
    (line({"canceled": True, "cancel_reason": "permission denied"}), EtcdError, "watch canceled: permission denied"),
    (line(error={"grpc_code": 14, "message": "unavailable"}), EtcdError, "watch error"),
])
def test_watch_reports_compaction_cancellation_and_errors(monkeypatch, data, error, words):
    c, _ = watch_client(monkeypatch, FakeResponse([data]))
    with pytest.raises(error, match=words):
        list(c.watch("/p/", 8, threading.Event()))


def test_watch_refused(monkeypatch):
    c, _ = watch_client(monkeypatch, FakeResponse([], status_code=404))
    with pytest.raises(EtcdError, match="watch refused: HTTP 404 refused"):
        list(c.watch("/p/", 1, threading.Event()))


def test_watch_once(monkeypatch):
    created = line({"created": True})
    event = line({"events": [{"kv": {"key": b64("/p/a"), "mod_revision": "9"}, "type": "DELETE"}]})
    c, _ = watch_client(monkeypatch, FakeResponse([created, event], hang=True))
    assert c.watch_once("/p/", 9, timeout=5) is True
    c, _ = watch_client(monkeypatch, FakeResponse([line({"compact_revision": "20"})]))
    assert c.watch_once("/p/", 9, timeout=5) is True           # may have missed changes: look again
    resp = FakeResponse([created], hang=True)
    c, _ = watch_client(monkeypatch, resp)
    t0 = time.monotonic()
    assert c.watch_once("/p/", 9, timeout=0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 2 and resp.closed.is_set()


def test_watch_once_connection_failure_is_an_etcd_error_and_fails_over(monkeypatch):
    import requests
    c, _ = watch_client(monkeypatch, requests.exceptions.ConnectionError("[Errno 111] Connection refused"))
    c.endpoints = etcd.parse_endpoints("http://h:1,http://h:2")
    with pytest.raises(EtcdError, match="^etcd http://h:1: connection refused$"):
        c.watch_once("/p/", 1, timeout=5)
    assert c.current == 1
