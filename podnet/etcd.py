"""The one etcd v3 client of podnet's agents (flanneld's subnet leases, calico-lite's datastore).

    etcd = EtcdClient(["https://10.0.0.1:2379", "https://10.0.0.2:2379"],
                      cafile=..., certfile=..., keyfile=...)
    kv, revision = etcd.get("/a/key")                 # KV or None, the store's revision
    kvs, revision = etcd.get_prefix("/a/")            # every key starting with "/a/"
    etcd.put("/a/key", "value")
    ok = etcd.txn([cmp_absent("/a/new")], [op_put("/a/new", "v")])   # create if absent
    lease_id, ttl = etcd.lease_grant(60)
    changed = etcd.watch_once("/a/", revision + 1, timeout=5)       # True if anything changed
    for result in etcd.watch("/a/", revision + 1, stop_event): ...   # the raw watch stream

Why one layer: both agents speak to the same etcd the same way (endpoint
failover, TLS files, base64 keys, prefix ranges, transactions, watches), and
agents never import each other, so the transport lives here once. What a key
*means* (a lease, a block) stays with each agent.

Why etcd3gw: see docs/decisions.md, "etcd client: etcd3gw over aetcd" (TLS
with client certificates through a requests.Session we configure, blocking
calls that fit our threads, pure Python). Only its API-path discovery
(`get_url`), its session and `post` are used. Its watch helpers are not: they
swallow compaction and a dropped connection, so `watch` reads the gateway's
watch stream itself and reports both.

etcd3gw and requests are imported on first use, never at import time: they
cost ~130 ms, and the CLI and the CNI plugins import modules that import this
one without ever talking to etcd.

Threads: every method may be called from any thread; each thread gets its own
HTTP session per endpoint (a requests.Session is not meant to be shared).
"""
from __future__ import annotations

import os
import threading
from collections import namedtuple
from urllib.parse import urlsplit

from podnet.net.ip import parse_cidr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Mapping
    from typing import Any, NamedTuple, TypeVar

    import requests
    from etcd3gw.client import Etcd3Client

    from podnet.net.ip import IPNet

    T = TypeVar("T")

DEFAULT_PORT = 2379


class EtcdError(RuntimeError):
    """etcd could not be reached, refused the request, or answered nonsense."""


class WatchCompacted(EtcdError):
    """The watch's start revision was compacted away: events may have been missed."""

    def __init__(self, start_revision: int, compact_revision: int | str) -> None:
        super().__init__("revision %d was compacted (oldest kept: %s)" % (start_revision, compact_revision))
        self.start_revision = start_revision
        self.compact_revision = compact_revision


if TYPE_CHECKING:         # the same tuples as below, with their fields' types
    class Endpoint(NamedTuple):
        scheme: str
        host: str
        port: int
        url: str

    class KV(NamedTuple):
        key: str
        value: bytes
        mod_revision: int
        create_revision: int
        lease: int
else:
    Endpoint = namedtuple("Endpoint", "scheme host port url")

    # One key as read: key decoded to str, value raw bytes, the rest ints (0 when absent).
    KV = namedtuple("KV", "key value mod_revision create_revision lease")


# ---- pure: encoding, keys, endpoints, request bodies -------------------------------------

def b64(data: str | bytes) -> str:
    """str or bytes -> the base64 text the JSON gateway wants for keys and values."""
    import base64
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(text: str | None) -> bytes:
    """The gateway's base64 (None or "" for an empty value) -> bytes."""
    import base64
    return base64.b64decode(text or "")


def prefix_end(prefix: str | bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with prefix."""
    b = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    b[-1] += 1
    return bytes(b)


def net_key_name(net: IPNet) -> str:
    """IPNet -> "10.65.0.64-26": how flannel (and calico-lite after it) name a network in a key."""
    return "%s-%d" % (net.network, net.prefixlen)


def net_from_key(key: str) -> IPNet:
    """".../10.65.0.64-26" -> IPNet as written (host bits kept: callers decide); ValueError if not one."""
    addr, sep, plen = key.rsplit("/", 1)[-1].rpartition("-")
    if not sep:
        raise ValueError("no '-' in %r" % key)
    return parse_cidr("%s/%s" % (addr, plen))


def parse_endpoints(endpoints: str | Iterable[str]) -> list[Endpoint]:
    """["http://h:p", ...] or "http://h:p,https://..." -> [Endpoint]; ValueError if none or malformed."""
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    out = []
    for url in endpoints:
        url = url.strip()
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("etcd endpoint %r must look like http://HOST:PORT or https://HOST:PORT" % url)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError("etcd endpoint %r has a bad port" % url) from None
        out.append(Endpoint(parts.scheme, parts.hostname, port, url.rstrip("/")))
    if not out:
        raise ValueError("no etcd endpoints given")
    return out


def cmp_absent(key: str | bytes) -> dict[str, Any]:
    """Transaction compare: `key` does not exist."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}


def cmp_mod(key: str | bytes, mod_revision: int) -> dict[str, Any]:
    """Transaction compare: `key` was last changed at `mod_revision` (nobody wrote it since we read it)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision}


def cmp_value(key: str | bytes, value: str | bytes) -> dict[str, Any]:
    """Transaction compare: `key` holds exactly `value`."""
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def op_put(key: str | bytes, value: str | bytes, lease: int = 0) -> dict[str, Any]:
    """Transaction operation: put (under etcd lease `lease` if not 0)."""
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def op_delete(key: str | bytes) -> dict[str, Any]:
    """Transaction operation: delete `key`."""
    return {"request_delete_range": {"key": b64(key)}}


def decode_kv(kv: Mapping[str, Any]) -> KV:
    """A gateway key-value object (base64, numbers as strings) -> KV."""
    return KV(unb64(kv["key"]).decode("utf-8", "replace"), unb64(kv.get("value")),
              int(kv.get("mod_revision", 0)), int(kv.get("create_revision", 0)), int(kv.get("lease", 0)))


def decode_event(event: Mapping[str, Any]) -> tuple[str, KV]:
    """A watch event as the gateway sends it -> ("PUT" | "DELETE", KV)."""
    return event.get("type", "PUT"), decode_kv(event["kv"])


# ---- the client ---------------------------------------------------------------------------

class EtcdClient:
    """One etcd cluster: its endpoints tried in turn, starting with the last that answered."""

    def __init__(self, endpoints: str | Iterable[str], cafile: str | None = None,
                 certfile: str | None = None, keyfile: str | None = None, timeout: float = 5.0) -> None:
        self.endpoints = parse_endpoints(endpoints)
        if bool(certfile) != bool(keyfile):
            raise ValueError("an etcd client certificate needs both --etcd-certfile and --etcd-keyfile")
        for what, path in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile)):
            if path and not os.access(path, os.R_OK):
                raise ValueError("etcd %s %s is not readable" % (what, path))
        if (cafile or certfile) and not any(e.scheme == "https" for e in self.endpoints):
            raise ValueError("etcd TLS files were given but no endpoint is https://")
        self.cafile, self.certfile, self.keyfile = cafile, certfile, keyfile
        self.timeout = timeout
        self.current = 0                  # index of the endpoint that last answered
        self._local = threading.local()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "EtcdClient(%s)" % ",".join(e.url for e in self.endpoints)

    def failover_from(self, index: int) -> None:
        """Start the next calls with the endpoint after `index` (which just failed)."""
        with self._lock:
            self.current = (index + 1) % len(self.endpoints)

    # ---- transport ----

    def _client(self, index: int) -> Etcd3Client:
        """This thread's etcd3gw client for endpoint `index` (created on first use)."""
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(index)
        if client is None:
            import etcd3gw
            import requests
            ep = self.endpoints[index]
            session = requests.Session()
            # Never take proxies or a CA bundle from the environment: REQUESTS_CA_BUNDLE /
            # CURL_CA_BUNDLE would silently override session.verify (our --etcd-cafile),
            # and HTTP(S)_PROXY would route etcd traffic through a proxy.
            session.trust_env = False
            if ep.scheme == "https":
                session.verify = self.cafile or True
                if self.certfile:
                    if TYPE_CHECKING:   # __init__ refuses a certfile without a keyfile
                        assert self.keyfile is not None
                    session.cert = (self.certfile, self.keyfile)
            client = clients[index] = etcd3gw.client(host=ep.host, port=ep.port, protocol=ep.scheme,
                                                     timeout=self.timeout, session=session)
        return client

    @staticmethod
    def _detail(exc: BaseException) -> str:
        """What went wrong, in a few words, with a hint for TLS (which file to check).
        etcd3gw's exceptions keep their text in detail_text (str() is empty), and the
        requests exception that says what really happened is often in the context chain."""
        import requests
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, requests.exceptions.RequestException):
            cause = cause.__context__
        if isinstance(cause, requests.exceptions.SSLError):
            text = str(cause)
            hint = "check --etcd-cafile" if "CERTIFICATE_VERIFY_FAILED" in text else \
                "the server may require a client certificate (--etcd-certfile/--etcd-keyfile)"
            start = text.find("[SSL")
            reason = text[start:text.find(" (_ssl", start)] if start >= 0 and " (_ssl" in text[start:] else text[-200:]
            return "TLS handshake failed (%s): %s" % (hint, reason)
        if isinstance(cause, requests.exceptions.ConnectionError):
            text = str(cause)
            if "Connection refused" in text:
                return "connection refused"
            if "timed out" in text:
                return "no answer in time (%s)" % ("read timed out" if "Read" in text else "connect timed out")
            return "cannot connect: %s" % text[-200:]
        if isinstance(exc, ValueError):
            return "unexpected answer: %s" % exc
        detail = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
        return detail.strip()[:300]

    def describe(self, index: int, exc: BaseException) -> str:
        """A one-line explanation of an etcd3gw/requests failure on endpoint `index`."""
        return "etcd %s: %s" % (self.endpoints[index].url, self._detail(exc))

    def call(self, fn: Callable[[Etcd3Client], T]) -> T:
        """fn(etcd3gw client) against the endpoints, starting with the last good one.
        A connection failure moves on to the next endpoint; any other failure, or all of
        them failing to connect, raises EtcdError."""
        import requests
        from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
        n = len(self.endpoints)
        start = self.current
        errors = []
        for i in range(n):
            index = (start + i) % n
            try:
                result = fn(self._client(index))
            except (ConnectionFailedError, ConnectionTimeoutError, requests.exceptions.ConnectionError) as e:
                errors.append("%s: %s" % (self.endpoints[index].url, self._detail(e)))
                continue
            except (Etcd3Exception, requests.exceptions.RequestException, ValueError, KeyError) as e:
                raise EtcdError(self.describe(index, e)) from None
            self.current = index
            return result
        raise EtcdError("etcd unreachable: " + "; ".join(errors))

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST a JSON body to the v3 API (path like "/kv/range"); the decoded JSON answer."""
        return self.call(lambda c: c.post(c.get_url(path), json=body))

    # ---- keys ----

    def range(self, key: str | bytes, range_end: str | bytes | None = None) -> tuple[list[KV], int]:
        """([KV], the store's revision) for `key`, or for [key, range_end) if range_end is given."""
        body = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        resp = self.post("/kv/range", body)
        return [decode_kv(kv) for kv in resp.get("kvs", [])], int(resp["header"]["revision"])

    def get(self, key: str | bytes) -> tuple[KV | None, int]:
        """(KV or None, the store's revision)."""
        kvs, revision = self.range(key)
        return (kvs[0] if kvs else None), revision

    def get_prefix(self, prefix: str | bytes) -> tuple[list[KV], int]:
        """([KV] of every key starting with `prefix`, in key order; the store's revision)."""
        return self.range(prefix, prefix_end(prefix))

    def put(self, key: str | bytes, value: str | bytes, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = lease
        self.post("/kv/put", body)

    def delete(self, key: str | bytes) -> bool:
        """True if `key` existed."""
        return int(self.post("/kv/deleterange", {"key": b64(key)}).get("deleted", 0)) > 0

    def txn(self, compare: Iterable[dict[str, Any]], success: Iterable[dict[str, Any]],
            failure: Iterable[dict[str, Any]] = ()) -> bool:
        """Run `success` if every compare (cmp_*) holds, else `failure`; True if they held."""
        resp = self.post("/kv/txn", {"compare": list(compare), "success": list(success),
                                     "failure": list(failure)})
        return bool(resp.get("succeeded"))

    # ---- leases ----

    def lease_grant(self, ttl: int) -> tuple[int, int]:
        """(lease id, granted TTL). etcd raises TTLs below its minimum (2 s on defaults)."""
        resp = self.post("/lease/grant", {"TTL": int(ttl), "ID": 0})
        if resp.get("error"):
            raise EtcdError("etcd refused a lease of %ds: %s" % (ttl, resp["error"]))
        return int(resp["ID"]), int(resp["TTL"])

    def lease_keepalive(self, lease_id: int) -> int:
        """Remaining TTL after a keepalive, or 0 if etcd no longer knows the lease."""
        resp = self.post("/lease/keepalive", {"ID": lease_id})
        return int(resp.get("result", {}).get("TTL", 0))

    def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease (its keys go with it)."""
        self.post("/kv/lease/revoke", {"ID": lease_id})

    # ---- watching ----

    def watch(self, prefix: str | bytes, start_revision: int, stop_event: threading.Event,
              idle_timeout: float = 900.0, index: int | None = None) -> Generator[dict[str, Any], None, None]:
        """The watch responses ("result" objects, events still base64: see decode_event) for
        every key under `prefix` from `start_revision`, on one stream to endpoint `index`
        (default: the current one), until stop_event is set or the stream ends.

        Progress notifications are asked for (etcd sends one on a quiet watch every 10 min
        on 3.4 defaults), so a stream silent for idle_timeout seconds is taken as a dead
        connection. Raises WatchCompacted, EtcdError (refused, canceled, an error
        message), or whatever requests raises when the connection breaks: a caller that
        keeps watching re-lists and starts again (see describe() for the message)."""
        import json

        from etcd3gw.exceptions import Etcd3Exception
        index = self.current if index is None else index
        url = self.endpoints[index].url
        client = self._client(index)
        try:
            client.api_path         # noqa: B018 (a property: discovered from /version on first use)
        except Etcd3Exception as e:
            raise EtcdError(self.describe(index, e)) from None
        body = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                                   "start_revision": start_revision, "progress_notify": True}}
        resp = client.session.post(client.get_url("/watch"), json=body, stream=True,
                                   timeout=(self.timeout, idle_timeout))
        done = threading.Event()

        def guard() -> None:        # a blocked read only wakes up when the socket is shut down
            while not done.wait(0.2):
                if stop_event.is_set():
                    _shutdown(resp)
                    return

        threading.Thread(target=guard, name="etcd-watch-stop", daemon=True).start()
        try:
            if resp.status_code != 200:
                raise EtcdError("etcd %s: watch refused: HTTP %d %s" % (url, resp.status_code, resp.text[:200]))
            buf = b""
            for chunk in resp.iter_content(chunk_size=None):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise EtcdError("etcd %s: watch error: %s" % (url, msg["error"]))
                    result = msg.get("result", {})
                    if int(result.get("compact_revision", 0) or 0):
                        raise WatchCompacted(start_revision, result["compact_revision"])
                    if result.get("canceled"):
                        raise EtcdError("etcd %s: watch canceled: %s" % (
                            url, result.get("cancel_reason", "no reason given")))
                    yield result
        finally:
            done.set()
            resp.close()

    def watch_once(self, prefix: str | bytes, start_revision: int, timeout: float) -> bool:
        """Block until a key under `prefix` changes at or after `start_revision`, or
        `timeout` seconds pass; True if something changed. A compacted start revision
        counts as a change (what happened since is unknown: look again). EtcdError if
        the endpoint cannot be reached (the next call tries the next endpoint)."""
        import contextlib
        stop = threading.Event()
        timer = threading.Timer(timeout, stop.set)
        timer.daemon = True
        timer.start()
        index = self.current
        try:
            with contextlib.closing(self.watch(prefix, start_revision, stop, index=index,
                                               idle_timeout=timeout + self.timeout)) as stream:
                for result in stream:
                    if result.get("events"):
                        return True
            stop.wait()             # the server closed the stream early: still wait out `timeout`
            return False
        except WatchCompacted:
            return True
        except Exception as e:
            if stop.is_set():       # our own shutdown of the socket at the deadline
                return False
            self.failover_from(index)
            if isinstance(e, EtcdError):
                raise
            raise EtcdError(self.describe(index, e)) from None
        finally:
            timer.cancel()


def _shutdown(resp: requests.Response) -> None:
    """Wake a thread blocked reading `resp` (closing the fd alone does not)."""
    import socket
    try:
        sock = socket.socket(fileno=os.dup(resp.raw.fileno()))
    except (OSError, ValueError, AttributeError):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
