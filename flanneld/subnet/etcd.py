"""Subnet leases in etcd v3, in flannel's layout, through etcd's JSON gateway.

    sm = EtcdSubnetManager(["https://10.0.0.1:2379"], cafile=..., certfile=..., keyfile=...)
    config = sm.get_network_config()
    lease = sm.acquire_lease(public_ip, "vxlan", {"VtepMAC": "..."})
    leases, revision = sm.list_leases()
    for kind, payload in sm.watch_leases(revision, stop_event):
        ...   # ("put", Lease) | ("delete", IPNet) | ("resync", [Lease])
    lease = sm.renew_lease(lease)         # on a timer, renew_margin before lease.expiration

Each subnet key carries its own etcd lease (TTL, default 24 h), so a node that
goes away loses its subnet when the TTL runs out and the watchers of the other
nodes see a delete. A node that comes back with the same public IP gets its
old subnet back. New subnets are created with a transaction "create if
absent", so two nodes can never hold the same one.

The client is etcd3gw (see docs/decisions.md, "etcd client: etcd3gw over
aetcd"). Its own watch helper is not used: it swallows compaction and
connection loss, so the watch stream is read here, with resync and reconnect.

Threads: every method may be called from any thread (each thread gets its own
HTTP session; the table of etcd lease IDs is locked), so the daemon can watch
in one thread while another renews.
"""
import contextlib
import json
import logging
import os
import socket
import threading
import time
from urllib.parse import urlsplit

from flanneld.config import ConfigError, parse
from flanneld.subnet import (DEFAULT_PREFIX, DEFAULT_TTL, Lease, LeaseError, choose_subnet, parse_lease,
                             subnet_from_key, subnet_key)

log = logging.getLogger("flanneld.subnet.etcd")

RENEW_MARGIN = 3600      # flannel renews a lease one hour before it expires
ACQUIRE_ATTEMPTS = 10    # create-if-absent conflicts before giving up (each retry re-lists)


class EtcdError(RuntimeError):
    """etcd could not be reached, refused the request, or answered nonsense."""


class ConfigMissingError(LookupError):
    """There is no network config at <prefix>/config (yet)."""


class NetworkFullError(RuntimeError):
    """Every subnet of the network is leased."""


class LeaseLostError(RuntimeError):
    """Our subnet is now held by another node (our lease had expired)."""


def _b64(text):
    import base64
    if isinstance(text, str):
        text = text.encode()
    return base64.b64encode(text).decode("ascii")


def _unb64(text):
    import base64
    return base64.b64decode(text or "")


def _prefix_end(prefix):
    """The range_end that makes [prefix, end) every key starting with prefix."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b)


def _parse_endpoints(endpoints):
    """["http://h:p", ...] or "http://h:p,https://..." -> [(scheme, host, port, url)]."""
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
            port = parts.port or 2379
        except ValueError:
            raise ValueError("etcd endpoint %r has a bad port" % url) from None
        out.append((parts.scheme, parts.hostname, port, url.rstrip("/")))
    if not out:
        raise ValueError("no etcd endpoints given")
    return out


class _Compacted(Exception):
    pass


class _StreamEnded(Exception):
    pass


class EtcdSubnetManager:
    def __init__(self, endpoints, prefix=DEFAULT_PREFIX, cafile=None, certfile=None, keyfile=None,
                 timeout=5.0, renew_margin=RENEW_MARGIN, retry_min=0.5, retry_max=10.0,
                 watch_idle_timeout=900.0):
        self.endpoints = _parse_endpoints(endpoints)
        self.prefix = "/" + prefix.strip("/")
        self.subnets_prefix = self.prefix + "/subnets/"
        self.config_key = self.prefix + "/config"
        if bool(certfile) != bool(keyfile):
            raise ValueError("an etcd client certificate needs both --etcd-certfile and --etcd-keyfile")
        for what, path in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile)):
            if path and not os.access(path, os.R_OK):
                raise ValueError("etcd %s %s is not readable" % (what, path))
        if (cafile or certfile) and not any(e[0] == "https" for e in self.endpoints):
            raise ValueError("etcd TLS files were given but no endpoint is https://")
        self.cafile, self.certfile, self.keyfile = cafile, certfile, keyfile
        self.timeout = timeout
        self.renew_margin = renew_margin      # seconds before expiration that renew_delay() aims at
        self.retry_min, self.retry_max = retry_min, retry_max
        # etcd sends a progress notification on quiet watches every 10 min (3.4 default):
        # a stream silent for longer than this is taken as a dead connection.
        self.watch_idle_timeout = watch_idle_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._current = 0                     # index of the endpoint that last worked
        self._held = {}                       # subnet -> (etcd lease id, ttl) of leases we own

    def __repr__(self):
        return "EtcdSubnetManager(%s %s)" % (",".join(e[3] for e in self.endpoints), self.prefix)

    # ---- transport -------------------------------------------------------------

    def _client(self, index):
        """This thread's etcd3gw client for endpoint `index` (created on first use)."""
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(index)
        if client is None:
            import etcd3gw
            import requests
            scheme, host, port, _ = self.endpoints[index]
            session = requests.Session()
            # Never take proxies or a CA bundle from the environment: REQUESTS_CA_BUNDLE /
            # CURL_CA_BUNDLE would silently override session.verify (our --etcd-cafile),
            # and HTTP(S)_PROXY would route etcd traffic through a proxy.
            session.trust_env = False
            if scheme == "https":
                session.verify = self.cafile or True
                if self.certfile:
                    session.cert = (self.certfile, self.keyfile)
            client = clients[index] = etcd3gw.client(host=host, port=port, protocol=scheme,
                                                     timeout=self.timeout, session=session)
        return client

    def _describe(self, index, exc):
        """A one-line explanation of an etcd3gw/requests failure, with a hint for TLS."""
        import requests
        url = self.endpoints[index][3]
        cause = exc
        while cause is not None and not isinstance(cause, requests.exceptions.RequestException):
            cause = cause.__context__
        detail = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
        if isinstance(cause, requests.exceptions.SSLError):
            text = str(cause)
            hint = "check --etcd-cafile" if "CERTIFICATE_VERIFY_FAILED" in text else \
                "the server may require a client certificate (--etcd-certfile/--etcd-keyfile)"
            start = text.find("[SSL")
            reason = text[start:text.find(" (_ssl", start)] if start >= 0 and " (_ssl" in text[start:] else text[-200:]
            return "etcd %s: TLS handshake failed (%s): %s" % (url, hint, reason)
        if cause is not None and isinstance(cause, requests.exceptions.ConnectionError):
            text = str(cause)
            if "Connection refused" in text:
                return "etcd %s: connection refused" % url
            if "timed out" in text:
                return "etcd %s: no answer in time (%s)" % (url, "read timed out" if "Read" in text else "connect timed out")
            return "etcd %s: cannot connect: %s" % (url, text[-200:])
        if isinstance(exc, ValueError):
            return "etcd %s: unexpected answer: %s" % (url, exc)
        return "etcd %s: %s" % (url, detail.strip()[:300])

    def _call(self, fn):
        """fn(client) against the endpoints, starting with the last good one; EtcdError if all fail."""
        from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
        import requests
        n = len(self.endpoints)
        start = self._current
        errors = []
        for i in range(n):
            index = (start + i) % n
            try:
                result = fn(self._client(index))
            except (ConnectionFailedError, ConnectionTimeoutError, requests.exceptions.ConnectionError) as e:
                errors.append(self._describe(index, e))
                continue          # try the next endpoint
            except (Etcd3Exception, requests.exceptions.RequestException, ValueError, KeyError) as e:
                raise EtcdError(self._describe(index, e)) from None
            self._current = index
            return result
        raise EtcdError("; ".join(errors))

    def _post(self, path, body):
        return self._call(lambda c: c.post(c.get_url(path), json=body))

    def _range(self, key, range_end=None):
        """(kvs, header revision): kvs as dicts with key/value decoded to str/bytes."""
        body = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        resp = self._post("/kv/range", body)
        kvs = []
        for kv in resp.get("kvs", []):
            kvs.append({"key": _unb64(kv["key"]).decode("utf-8", "replace"),
                        "value": _unb64(kv.get("value")),
                        "mod_revision": int(kv.get("mod_revision", 0)),
                        "create_revision": int(kv.get("create_revision", 0)),
                        "lease": int(kv.get("lease", 0))})
        return kvs, int(resp["header"]["revision"])

    def _grant(self, ttl):
        """(lease id, granted TTL). etcd raises TTLs below its minimum (2 s on defaults)."""
        resp = self._post("/lease/grant", {"TTL": int(ttl), "ID": 0})
        if resp.get("error"):
            raise EtcdError("etcd refused a lease of %ds: %s" % (ttl, resp["error"]))
        return int(resp["ID"]), int(resp["TTL"])

    def _keepalive(self, lease_id):
        """Remaining TTL after a keepalive, or 0 if etcd no longer knows the lease."""
        resp = self._post("/lease/keepalive", {"ID": lease_id})
        return int(resp.get("result", {}).get("TTL", 0))

    def _revoke(self, lease_id):
        try:
            self._post("/kv/lease/revoke", {"ID": lease_id})
        except EtcdError as e:
            log.debug("revoking etcd lease %x: %s", lease_id, e)

    def _txn(self, compare, success):
        resp = self._post("/kv/txn", {"compare": compare, "success": success, "failure": []})
        return bool(resp.get("succeeded"))

    # ---- the network config -----------------------------------------------------

    def get_network_config(self):
        kvs, _ = self._range(self.config_key)
        if not kvs:
            raise ConfigMissingError(
                "no network config at %s in etcd (%s); write one, e.g. etcdctl put %s "
                "'{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}'"
                % (self.config_key, ",".join(e[3] for e in self.endpoints), self.config_key))
        try:
            return parse(kvs[0]["value"].decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError("%s is not UTF-8 text" % self.config_key) from None

    # ---- listing --------------------------------------------------------------------

    def _list(self):
        """(leases, taken subnets, kvs by subnet, revision). A malformed value still takes its subnet."""
        kvs, revision = self._range(self.subnets_prefix, _prefix_end(self.subnets_prefix))
        leases, taken, by_subnet = [], set(), {}
        for kv in kvs:
            try:
                subnet = subnet_from_key(kv["key"])
            except LeaseError as e:
                log.warning("skipping %s", e)
                continue
            taken.add(subnet)
            by_subnet[subnet] = kv
            try:
                leases.append(parse_lease(kv["key"], kv["value"]))
            except LeaseError as e:
                log.warning("skipping %s", e)
        return leases, taken, by_subnet, revision

    def list_leases(self):
        """(every valid lease, the etcd revision of the listing). Malformed ones are logged and skipped."""
        leases, _, _, revision = self._list()
        return leases, revision

    # ---- our own lease --------------------------------------------------------------

    def _compatible(self, config, subnet):
        return (subnet.prefixlen == config.subnet_len
                and config.subnet_min.value <= subnet.network.value <= config.subnet_max.value)

    def acquire_lease(self, public_ip, backend_type, backend_data, ttl=DEFAULT_TTL):
        """Our lease: the subnet this public IP already holds, or a free one, created atomically."""
        from podnet.net.ip import parse_ip
        if isinstance(public_ip, str):
            public_ip = parse_ip(public_ip)
        config = self.get_network_config()
        for attempt in range(ACQUIRE_ATTEMPTS):
            leases, taken, by_subnet, _ = self._list()
            mine = [l for l in leases if l.public_ip == public_ip]
            mine.sort(key=lambda l: not self._compatible(config, l.subnet))     # a usable one first
            for old in mine[1:]:
                log.warning("%s holds a second lease %s; ignoring it", public_ip, old.subnet)
            if mine and not self._compatible(config, mine[0].subnet):
                old = mine[0]
                log.warning("our previous lease %s does not fit the network config %s: releasing it",
                            old.subnet, config)
                kv = by_subnet[old.subnet]
                self._txn([self._cmp_mod(kv)], [{"request_delete_range": {"key": _b64(kv["key"])}}])
                continue
            lease = Lease(mine[0].subnet if mine else None, public_ip, backend_type, backend_data)
            if mine:
                kv = by_subnet[lease.subnet]
                done = self._put_lease(lease, ttl, compare=self._cmp_mod(kv), previous=kv["lease"])
                verb = "reusing"
            else:
                lease.subnet = choose_subnet(config, taken)
                if lease.subnet is None:
                    count = (config.subnet_max.value - config.subnet_min.value >> 32 - config.subnet_len) + 1
                    raise NetworkFullError("network %s is full: all %d /%d subnets from %s to %s are leased"
                                           % (config.network, count, config.subnet_len,
                                              config.subnet_min, config.subnet_max))
                done = self._put_lease(lease, ttl, compare=self._cmp_absent(lease.key(self.prefix)))
                verb = "new"
            if done:
                log.info("acquired %s lease %s for %s (ttl %ds)", verb, lease.subnet, public_ip, ttl)
                return lease
            log.info("lease %s changed under us (attempt %d): retrying", lease.subnet, attempt + 1)
        raise EtcdError("could not acquire a lease after %d attempts: too much contention" % ACQUIRE_ATTEMPTS)

    @staticmethod
    def _cmp_absent(key):
        return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}

    @staticmethod
    def _cmp_mod(kv):
        return {"key": _b64(kv["key"]), "target": "MOD", "result": "EQUAL", "mod_revision": kv["mod_revision"]}

    def _put_lease(self, lease, ttl, compare, previous=0):
        """Put lease.value() under a fresh etcd lease if `compare` holds; sets lease.expiration."""
        lease_id, granted = self._grant(ttl)
        key = lease.key(self.prefix)
        ok = self._txn([compare], [{"request_put": {"key": _b64(key), "value": _b64(lease.value()),
                                                    "lease": lease_id}}])
        if not ok:
            self._revoke(lease_id)
            return False
        lease.expiration = time.time() + granted
        with self._lock:
            self._held[lease.subnet] = (lease_id, ttl)
        if previous and previous != lease_id:
            self._revoke(previous)    # the key moved to the new lease: the old one only holds nothing now
        return True

    def renew_lease(self, lease):
        """The same lease with a new expiration (an etcd keepalive: no watch event for the
        others). If the key or its etcd lease was lost (expired while etcd was unreachable,
        deleted by hand), it is recreated with the same subnet; LeaseLostError if another
        node holds that subnet by now."""
        key = lease.key(self.prefix)
        with self._lock:
            held = self._held.get(lease.subnet)
        kvs, _ = self._range(key)
        if kvs and kvs[0]["lease"] and kvs[0]["value"] == lease.value().encode():
            lease_id = kvs[0]["lease"]
            remaining = self._keepalive(lease_id)
            if remaining > 0:
                with self._lock:
                    self._held[lease.subnet] = (lease_id, remaining)
                log.debug("renewed %s for %ds", lease.subnet, remaining)
                return Lease(lease.subnet, lease.public_ip, lease.backend_type, lease.backend_data,
                             time.time() + remaining)
        ttl = held[1] if held else DEFAULT_TTL
        for _ in range(ACQUIRE_ATTEMPTS):
            renewed = Lease(lease.subnet, lease.public_ip, lease.backend_type, lease.backend_data)
            if not kvs:
                log.warning("lease %s had gone from etcd: recreating it", lease.subnet)
                ok = self._put_lease(renewed, ttl, compare=self._cmp_absent(key))
            else:
                kv = kvs[0]
                try:
                    current = parse_lease(key, kv["value"])
                except LeaseError:
                    current = None
                if current is None or current.public_ip != lease.public_ip:
                    raise LeaseLostError("subnet %s is now held by %s" % (
                        lease.subnet, current.public_ip if current else "a malformed entry"))
                log.warning("lease %s had lost its etcd lease or changed: rewriting it", lease.subnet)
                ok = self._put_lease(renewed, ttl, compare=self._cmp_mod(kv), previous=kv["lease"])
            if ok:
                return renewed
            kvs, _ = self._range(key)
        raise EtcdError("could not renew %s: too much contention" % lease.subnet)

    def renew_delay(self, lease, now=None):
        """Seconds until `lease` should be renewed (renew_margin before it expires), at least 0."""
        if lease.expiration is None:
            return 0.0
        return max(0.0, lease.expiration - self.renew_margin - (now if now is not None else time.time()))

    def release_lease(self, lease):
        """Delete our lease's key (a node leaving). False if it was gone or is another node's."""
        key = lease.key(self.prefix)
        kvs, _ = self._range(key)
        with self._lock:
            held = self._held.pop(lease.subnet, None)
        if not kvs:
            return False
        kv = kvs[0]
        try:
            current = parse_lease(key, kv["value"])
        except LeaseError:
            current = None
        if current is not None and current.public_ip != lease.public_ip:
            log.warning("not releasing %s: it is held by %s", lease.subnet, current.public_ip)
            return False
        ok = self._txn([self._cmp_mod(kv)], [{"request_delete_range": {"key": _b64(key)}}])
        for lease_id in {kv["lease"], held[0] if held else 0} - {0}:
            self._revoke(lease_id)
        return ok

    # ---- watching ---------------------------------------------------------------------

    def watch_leases(self, revision, stop_event):
        """Events after `revision` until stop_event is set:
            ("put", Lease)      a node's lease was created or changed
            ("delete", IPNet)   a lease was deleted or expired (or overwritten with garbage)
            ("resync", [Lease]) the complete set: after a reconnect or a compacted revision,
                                events may have been missed; replace everything you know.
        Never raises on etcd outages: logs them and reconnects with backoff."""
        start = revision + 1
        resync = False
        delay = self.retry_min
        down_since = None
        last_warning = 0.0
        while not stop_event.is_set():
            index = self._current
            try:
                if resync:
                    leases, rev = self.list_leases()
                    yield ("resync", leases)
                    start, resync = rev + 1, False
                with contextlib.closing(self._stream(index, start, stop_event)) as stream:
                    for result in stream:
                        if down_since is not None:
                            log.info("etcd watch on %s is back after %.1fs", self.endpoints[index][3],
                                     time.time() - down_since)
                            down_since, last_warning = None, 0.0
                        delay = self.retry_min
                        header_rev = int(result.get("header", {}).get("revision", 0))
                        events = result.get("events") or []
                        for ev in events:
                            out = self._event(ev)
                            if out is not None:
                                yield out
                        if events:
                            start = max(int(ev["kv"].get("mod_revision", 0)) for ev in events) + 1
                        elif not result.get("created") and header_rev:
                            start = max(start, header_rev + 1)     # progress notification
                if stop_event.is_set():
                    return
                raise _StreamEnded("the watch stream ended")
            except _Compacted as e:
                log.warning("etcd watch: %s: listing everything again", e)
                resync = True
                continue
            except Exception as e:       # any failure: log, back off, re-list
                if stop_event.is_set():
                    return
                resync = True
                with self._lock:
                    self._current = (index + 1) % len(self.endpoints)
                now = time.time()
                if down_since is None:
                    down_since = now
                text = str(e) if isinstance(e, (EtcdError, _StreamEnded)) else self._describe(index, e)
                if now - last_warning > 30:      # once per outage, then every 30 s
                    log.warning("etcd watch interrupted: %s (retrying in %.1fs)", text, delay)
                    last_warning = now
                else:
                    log.debug("etcd watch: %s (retrying in %.1fs)", text, delay)
                if stop_event.wait(delay):
                    return
                delay = min(delay * 2, self.retry_max)

    def _event(self, ev):
        key = _unb64(ev["kv"]["key"]).decode("utf-8", "replace")
        try:
            subnet = subnet_from_key(key)
        except LeaseError as e:
            log.warning("ignoring watch event: %s", e)
            return None
        if ev.get("type") == "DELETE":
            return ("delete", subnet)
        try:
            return ("put", parse_lease(key, _unb64(ev["kv"].get("value"))))
        except LeaseError as e:
            log.warning("%s: treating it as deleted", e)
            return ("delete", subnet)

    def _stream(self, index, start, stop_event):
        """The watch responses ("result" objects) from one gateway stream; raises _Compacted,
        EtcdError, or whatever the HTTP layer raises when the connection breaks."""
        client = self._call_one(index)
        body = {"create_request": {"key": _b64(self.subnets_prefix),
                                   "range_end": _b64(_prefix_end(self.subnets_prefix)),
                                   "start_revision": start, "progress_notify": True}}
        resp = client.session.post(client.get_url("/watch"), json=body, stream=True,
                                   timeout=(self.timeout, self.watch_idle_timeout))
        done = threading.Event()

        def guard():        # a blocked read only wakes up when the socket is shut down
            while not done.wait(0.2):
                if stop_event.is_set():
                    _shutdown(resp)
                    return

        threading.Thread(target=guard, name="etcd-watch-stop", daemon=True).start()
        try:
            if resp.status_code != 200:
                raise EtcdError("etcd %s: watch refused: HTTP %d %s" % (
                    self.endpoints[index][3], resp.status_code, resp.text[:200]))
            buf = b""
            for chunk in resp.iter_content(chunk_size=None):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise EtcdError("etcd %s: watch error: %s" % (self.endpoints[index][3], msg["error"]))
                    result = msg.get("result", {})
                    if int(result.get("compact_revision", 0) or 0):
                        raise _Compacted("revision %d was compacted (oldest kept: %s)"
                                         % (start, result["compact_revision"]))
                    if result.get("canceled"):
                        raise EtcdError("etcd %s: watch canceled: %s" % (
                            self.endpoints[index][3], result.get("cancel_reason", "no reason given")))
                    yield result
        finally:
            done.set()
            resp.close()

    def _call_one(self, index):
        """This thread's client for `index`, with the API path discovered (raises EtcdError)."""
        from etcd3gw.exceptions import Etcd3Exception
        client = self._client(index)
        try:
            client.api_path
        except Etcd3Exception as e:
            raise EtcdError(self._describe(index, e)) from None
        return client


def _shutdown(resp):
    """Wake a thread blocked reading `resp` (closing the fd alone does not)."""
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
