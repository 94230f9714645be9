"""The Ingress controller: source events in, one nginx configured and reloaded.

    python -m ingress.controller --manifests DIR --state-dir DIR [...]
    python -m ingress.controller --kubeconfig FILE --state-dir DIR [...]

Flow: a source (podnet.kube.events, kinds INGRESS_KINDS) emits events from
its threads into a queue; the main thread keeps the current objects (each one
parsed once, when it arrives: a bad Ingress is logged with its reason then,
and skipped), and after a burst of changes has settled (`debounce`, and at
least `min_sync_interval` after the previous sync) renders the whole
configuration (model.py -> render.py):

1. TLS Secrets in use are written to <state>/certs (mode 0700; files 0600,
   named by their content's hash, so a candidate never overwrites what the
   running configuration reads) and loaded once with Python's TLS library: a
   pair that does not load is logged and its hosts get no HTTPS, instead of a
   configuration nginx would refuse as a whole;
2. the text is compared with the running configuration's: equal, nothing
   to do;
3. otherwise it is written atomically as <state>/nginx.conf.candidate and
   checked with `nginx -t`; rejected, the running configuration stays and the
   reason is logged (and in status.json); accepted, it is renamed over
   <state>/nginx.conf and nginx reloads (SIGHUP to the master);
4. the reload is confirmed by asking nginx's status server (127.0.0.1:
   status-port, /podnet/config), which answers with the hash of the
   configuration its workers run.

nginx runs in the foreground (`daemon off;` in the configuration) as the
controller's own child: the controller knows its master PID from the start
with no pid-file race, notices at once if it dies (and starts it again), and
signals exactly that process: SIGHUP to reload, SIGQUIT (graceful) and then
SIGTERM / SIGKILL on exit. It is started through `setpriv --pdeathsig TERM`
when setpriv exists, so it is stopped even if the controller is SIGKILLed.
A reload is graceful: the master keeps the listening sockets, starts new
workers and lets the old ones finish their requests, so no connection is
refused and no request in flight is cut.

Every file nginx reads or writes (configuration, pid, lock, logs, temp
dirs, certificates) is under the state directory, so several controllers can
run side by side, each in its own network namespace. `nginx -t` opens the
listening sockets too: it must run where nginx runs, never in a namespace
the controller does not own.

--healthz-host:--healthz-port (ingress-nginx's flags, default all addresses,
port 10254) serves /healthz (the loop goes round; nginx runs once started),
/readyz (nginx runs a configuration it confirmed) and, unless
--enable-metrics=false, /metrics with ingress-nginx's reload metrics
(ingress/metrics.py).
"""
import argparse
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

from ingress import model, render
from podnet.kube.cache import ObjectCache
from podnet.kube.endpointslices import merge_endpoints, slice_info
from podnet.kube.events import INGRESS_KINDS, RELIST, drain
from podnet.kube.objects import InvalidObject

log = logging.getLogger("ingress")


# ---- the objects, parsed as they arrive -------------------------------------------------------

class Store:
    """Current objects per kind (the shared podnet.kube cache), each parsed once when it
    arrives or changes."""

    def __init__(self, kinds=INGRESS_KINDS):
        self.objects = ObjectCache(kinds)
        self.ingresses = {}         # (ns, name) -> model.Ingress
        self.invalid = {}           # (ns, name) -> reason (bad Ingresses)
        self.classes = {}           # name -> model.IngressClass
        self.slices = {}            # (ns, name) -> podnet.kube.endpointslices.SliceInfo
        self.secrets = {}           # (ns, name) -> model.TlsSecret
        self.bad_secrets = {}       # (ns, name) -> reason

    @property
    def ready(self):
        """Every kind has been listed once: a sync before that would drop what is not there yet."""
        return self.objects.ready

    @property
    def services(self):
        return dict(self.objects.items("Service")) if "Service" in self.objects.kinds else {}

    def apply(self, event):
        """One podnet.kube Event -> True if anything changed (the first list of a kind counts)."""
        first = event.type == RELIST and event.kind in self.objects.kinds \
            and event.kind not in self.objects.listed
        changes = self.objects.apply(event)
        for change in changes:
            self._parse(change.kind, change.key, change.new)
        return bool(changes) or first

    def _parse(self, kind, key, obj):
        if kind == "Ingress":
            self.ingresses.pop(key, None)
            self.invalid.pop(key, None)
            if obj is not None:
                ing, reason = model.ingress_or_error(obj)
                if ing is not None:
                    self.ingresses[key] = ing
                else:
                    self.invalid[key] = reason
        elif kind == "IngressClass":
            self.classes.pop(key[1], None)
            if obj is not None:
                try:
                    self.classes[key[1]] = model.parse_ingress_class(obj)
                except InvalidObject as e:
                    log.warning("skipping IngressClass %s: %s", key[1], e)
        elif kind == "EndpointSlice":
            self.slices.pop(key, None)
            if obj is not None:
                family = 6 if obj.get("addressType") == "IPv6" else 4
                info = slice_info(obj, family)
                if info is not None:
                    self.slices[key] = info
        elif kind == "Secret":
            self.secrets.pop(key, None)
            self.bad_secrets.pop(key, None)
            if obj is not None:
                try:
                    self.secrets[key] = model.parse_tls_secret(obj)
                except InvalidObject as e:
                    self.bad_secrets[key] = str(e)
                    log.warning("TLS Secret %s/%s is unusable: %s", key[0], key[1], e)

    def endpoints(self):
        return merge_endpoints(self.slices.values())


# ---- files in the state directory ---------------------------------------------------------------

def write_atomic(path, data, mode=0o644):
    """Write `data` to `path` by a temporary file in the same directory and rename."""
    if isinstance(data, str):
        data = data.encode()
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class CertStore:
    """TLS Secrets as files nginx reads: <dir>/<hash>.crt and .key, mode 0600 in a 0700 dir."""

    def __init__(self, directory):
        self.directory = directory
        self._checked = {}          # digest -> "" (loads) or the reason it does not

    def materialize(self, secret):
        """-> ((crt path, key path), None) or (None, reason)."""
        digest = hashlib.sha256(secret.cert + b"\0" + secret.key).hexdigest()[:24]
        crt, key = (os.path.join(self.directory, digest + ext) for ext in (".crt", ".key"))
        if self._checked.get(digest):
            return None, self._checked[digest]
        if not (os.path.exists(crt) and os.path.exists(key)):
            write_atomic(crt, secret.cert, 0o600)
            write_atomic(key, secret.key, 0o600)
        if digest not in self._checked:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(crt, key)
                self._checked[digest] = ""
            except (ssl.SSLError, OSError, ValueError) as e:
                self._checked[digest] = "tls.crt / tls.key do not load as a certificate and its key: %s" % e
                for path in (crt, key):
                    _unlink(path)
                return None, self._checked[digest]
        return (crt, key), None

    def collect(self, keep):
        """Remove certificate files not in `keep` (paths the running configuration uses)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            if path not in keep:
                _unlink(path)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unreachable_for_others(path):
    """The first directory on the way to `path` that others may not enter (no o+x), or None."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except FileNotFoundError:
            return None
    return None


# ---- nginx ----------------------------------------------------------------------------------

class Nginx:
    """The nginx master this controller runs: start, check, reload, stop — by its PID only."""

    def __init__(self, state_dir, binary="nginx", status_port=0, stop_grace=5.0):
        self.state_dir = state_dir
        self.binary = binary
        self.status_port = status_port
        self.stop_grace = stop_grace
        self.conf = os.path.join(state_dir, "nginx.conf")
        self.candidate = os.path.join(state_dir, "nginx.conf.candidate")
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def test(self, path):
        """`nginx -t` on a configuration file -> (ok, what nginx said)."""
        proc = subprocess.run([self.binary, "-t", "-q", "-p", self.state_dir, "-c", path],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        out = (proc.stderr + proc.stdout).strip()
        return proc.returncode == 0, out

    def start(self):
        argv = [self.binary, "-p", self.state_dir, "-c", self.conf]
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "TERM", "--"] + argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        log.info("started nginx, master pid %d", self.proc.pid)

    def reload(self):
        os.kill(self.proc.pid, signal.SIGHUP)

    def running_hash(self, timeout=1.0):
        """The configuration hash nginx's workers serve, or None."""
        if not self.status_port:
            return None
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/podnet/config" % self.status_port,
                                        timeout=timeout) as resp:
                return resp.read().decode().strip()
        except (OSError, ValueError):
            return None

    def wait_for(self, digest, timeout=10.0):
        """Until the workers serve configuration `digest` (True), nginx died or time ran out (False)."""
        if not self.status_port:
            return self.running()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                return False
            if self.running_hash(0.5) == digest:
                return True
            time.sleep(0.02)
        return False

    def stop(self):
        """Graceful stop (SIGQUIT), then SIGTERM, then SIGKILL; by PID, and reaped."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGQUIT, self.stop_grace), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        proc.poll()
        log.info("nginx (pid %d) stopped", proc.pid)


# ---- the controller -----------------------------------------------------------------------------

class IngressController:
    """Events in (`enqueue`, from any thread), nginx configured (`run` in the main thread)."""

    def __init__(self, options, class_name=model.CLASS_NAME, controller_name=model.CONTROLLER_NAME,
                 without_class=False, nginx_binary="nginx", debounce=0.1, min_sync_interval=1.0,
                 stop_grace=5.0, clock=time.monotonic):
        self.options = options
        self.state_dir = options.state_dir
        self.class_name = class_name
        self.controller_name = controller_name
        self.without_class = without_class
        self.debounce = debounce
        self.min_sync_interval = min_sync_interval
        self.clock = clock
        self.store = Store()
        self.events = queue.Queue()
        self.stopping = threading.Event()
        self.nginx = Nginx(self.state_dir, nginx_binary, options.status_port, stop_grace)
        self.certs = CertStore(os.path.join(self.state_dir, "certs"))
        self.running_hash = None        # what nginx runs
        self.rejected_hash = None       # the last candidate nginx -t refused
        self.last_error = ""
        self.syncs = self.reloads = 0
        self._dirty_since = None
        self._last_sync = None
        self._said = set()              # warnings of the previous sync, not repeated
        self._started = False           # nginx was started once: keep it running
        self._restart_at = 0.0
        self._status = {}
        from ingress.metrics import Metrics
        self.metrics = Metrics(controller_name)

    # ---- input ----

    def enqueue(self, event):
        """A source's emit: safe from any thread."""
        self.events.put(event)

    def _drain(self, timeout):
        drain(self.events, timeout, self._take)

    def _take(self, event):
        if self.store.apply(event) and self._dirty_since is None:
            self._dirty_since = self.clock()

    # ---- desired state ----

    def desired(self):
        """-> (config text, hash, status dict). Pure apart from writing certificate files."""
        store = self.store
        status = {"ingresses": {}, "conflicts": [], "warnings": []}
        ours = []
        for key, ing in sorted(store.ingresses.items()):
            if model.owned(ing, store.classes, self.class_name, self.controller_name, self.without_class):
                ours.append(ing)
                status["ingresses"]["%s/%s" % key] = "ok"
            else:
                status["ingresses"]["%s/%s" % key] = "not ours (class %s)" % (
                    ing.class_name or ing.class_annotation or "none")
        for key, reason in sorted(store.invalid.items()):
            status["ingresses"]["%s/%s" % key] = "invalid: " + reason
        routes = model.build_routes(ours)
        upstreams = model.resolve_backends(routes.backends(), store.services, store.endpoints())
        warnings = list(routes.conflicts)
        certs = {}
        for secret_key in sorted(routes.secrets()):
            secret = store.secrets.get(secret_key)
            if secret is None:
                reason = store.bad_secrets.get(secret_key, "not found (or not of type kubernetes.io/tls)")
                warnings.append("TLS Secret %s/%s: %s; its hosts are served without HTTPS" % (secret_key + (reason,)))
                continue
            paths, reason = self.certs.materialize(secret)
            if paths is None:
                warnings.append("TLS Secret %s/%s: %s; its hosts are served without HTTPS" % (secret_key + (reason,)))
            else:
                certs[secret_key] = paths
        for up in upstreams.values():
            if up.reason:
                warnings.append("%s: answering 503" % up.reason)
        text, digest = render.render(routes, upstreams, certs, self.options)
        status["conflicts"] = list(routes.conflicts)
        status["warnings"] = warnings
        status["servers"] = [s.host for s in routes.servers]
        status["cert_files"] = sorted(p for pair in certs.values() for p in pair)
        return text, digest, status

    # ---- one sync ----

    def sync(self):
        """Render; if different from what runs, check and apply. -> True if nginx runs the result."""
        self.syncs += 1
        self._dirty_since = None
        self._last_sync = self.clock()
        text, digest, status = self.desired()
        for message in status["warnings"]:
            if message not in self._said:
                log.warning("%s", message)
        self._said = set(status["warnings"])
        self._status = status
        self.metrics.synced(status["ingresses"])
        if digest == self.running_hash and self.nginx.running():
            self.rejected_hash, self.last_error = None, ""
            self._write_status()
            return True
        if digest == self.rejected_hash:
            self._write_status()
            return False
        write_atomic(self.nginx.candidate, text)
        ok, said = self.nginx.test(self.nginx.candidate)
        if not ok:
            self.rejected_hash = digest
            self.last_error = "nginx -t rejected configuration %s: %s" % (digest, said)
            log.error("%s; keeping the running configuration %s (the refused one stays in %s)",
                      self.last_error, self.running_hash or "(none)", self.nginx.candidate)
            self.metrics.refused()
            self._write_status()
            return False
        os.replace(self.nginx.candidate, self.nginx.conf)
        self.rejected_hash = None
        self.last_error = ""
        applied = self._apply(digest)
        if applied:
            self.metrics.applied(digest, len(text.encode()))
            self.certs.collect(set(status["cert_files"]))
        else:
            self.metrics.refused()
        self._write_status()
        return applied

    def _apply(self, digest):
        if not self.nginx.running():
            self.nginx.start()
            self._started = True
            what = "started"
        else:
            self.nginx.reload()
            self.reloads += 1
            what = "reloaded"
        if self.nginx.wait_for(digest):
            log.info("nginx %s with configuration %s", what, digest)
            self.running_hash = digest
            return True
        self.last_error = "nginx did not come up with configuration %s (see its log)" % digest
        log.error("%s", self.last_error)
        self.running_hash = None if not self.nginx.running() else digest
        return False

    def _write_status(self):
        status = dict(self._status, config=self.running_hash, rejected=self.rejected_hash,
                      last_error=self.last_error, nginx_pid=self.nginx.pid, syncs=self.syncs,
                      reloads=self.reloads, time=time.time())
        write_atomic(os.path.join(self.state_dir, "status.json"), json.dumps(status, indent=1, sort_keys=True))

    # ---- the loop ----

    def prepare(self):
        for sub, mode in (("", 0o755), ("logs", 0o755), ("tmp", 0o755), ("certs", 0o700)):
            path = os.path.join(self.state_dir, sub)
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chmod(path, mode)
        blocked = unreachable_for_others(os.path.join(self.state_dir, "tmp"))
        if blocked and os.geteuid() == 0 and self.options.user in ("", "nobody"):
            log.warning("nginx's workers run as nobody and cannot enter %s (mode %o): request bodies over "
                        "16 KiB will fail with 500; make it traversable (o+x) or choose --worker-user",
                        blocked, os.stat(blocked).st_mode & 0o7777)

    def next_sync_at(self):
        if self._dirty_since is None or not self.store.ready:
            return None
        at = self._dirty_since + self.debounce
        if self._last_sync is not None:
            at = max(at, self._last_sync + self.min_sync_interval)
        return at

    def run_once(self, timeout=0.5):
        """Take events for up to `timeout` s, sync if due, mind nginx. For tests and run()."""
        self.metrics.beat()
        now = self.clock()
        at = self.next_sync_at()
        self._drain(min(timeout, at - now) if at is not None else timeout)
        at = self.next_sync_at()
        if at is not None and self.clock() >= at:
            try:
                self.sync()
            except Exception:
                log.exception("sync failed; trying again")
                self._dirty_since = self.clock()
        if self._started and not self.nginx.running() and not self.stopping.is_set() \
                and self._dirty_since is None:
            now = self.clock()
            if now >= self._restart_at:
                log.error("nginx (pid %s) is not running (exit status %s); starting it again",
                          self.nginx.pid, self.nginx.proc.returncode if self.nginx.proc else "?")
                self._restart_at = now + 2.0
                self.running_hash = None
                self.metrics.stopped()
                self._dirty_since = now

    def run(self, source):
        """Run until stop(): `source` has start() and stop(); its emit must be self.enqueue."""
        self.prepare()
        source.start()
        try:
            while not self.stopping.is_set():
                self.run_once()
        finally:
            source.stop()
            self.nginx.stop()

    def stop(self):
        self.stopping.set()

    # ---- health (ingress/metrics.py) ----

    def alive(self):
        """The loop goes round, and nginx runs once it was started."""
        alive, reason = self.metrics.loop_alive()
        if alive and self._started and not self.nginx.running():
            return False, "nginx (pid %s) is not running" % self.nginx.pid
        return alive, reason

    def ready(self):
        """nginx runs a configuration it confirmed."""
        if self.running_hash is None or not self.nginx.running():
            return False, self.last_error or "nginx runs no configuration yet"
        return True, ""


# ---- the command -----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="podnet ingress", description="podnet's Ingress controller (nginx)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--manifests", metavar="DIR", help="read objects from a directory of manifests")
    src.add_argument("--kubeconfig", metavar="FILE", help="list and watch the Kubernetes API with this "
                     "kubeconfig (default: in-cluster configuration when running in a Pod)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--recursive", action="store_true", help="--manifests: read subdirectories too")
    p.add_argument("--poll-interval", type=float, default=1.0, help="--manifests: seconds between scans")
    p.add_argument("--ingress-class", default=model.CLASS_NAME, help="IngressClass name served (default %(default)s)")
    p.add_argument("--controller-name", default=model.CONTROLLER_NAME,
                   help="spec.controller of the IngressClasses served (default %(default)s)")
    p.add_argument("--watch-ingress-without-class", action="store_true",
                   help="also serve Ingresses that name no class when no default IngressClass is ours")
    p.add_argument("--state-dir", default="/var/lib/podnet/ingress",
                   help="nginx configuration, certificates, pid, logs, temp files (default %(default)s)")
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--https-port", type=int, default=443)
    p.add_argument("--status-port", type=int, default=10246,
                   help="nginx status server on 127.0.0.1 (reload confirmation); 0: none")
    p.add_argument("--ipv6", action="store_true", help="listen on [::] too")
    p.add_argument("--healthz-port", type=int, default=10254,
                   help="port of /healthz, /readyz and /metrics (ingress-nginx's; default %(default)s); 0: none")
    p.add_argument("--healthz-host", default="", help='address of that port (default "": all addresses)')
    p.add_argument("--enable-metrics", type=lambda v: v.strip().lower() in ("1", "true", "yes", "on"),
                   nargs="?", const=True, default=True, help="serve /metrics there (default true)")
    p.add_argument("--workers", default="auto", help="nginx worker_processes (default %(default)s)")
    p.add_argument("--worker-user", default="", help="user nginx's workers run as, when started by root "
                   "(default: nginx's own, nobody)")
    p.add_argument("--upstream-keepalive", type=int, default=32,
                   help="idle connections kept open to each upstream, per worker; 0: none")
    p.add_argument("--access-log", action="store_true", help="write <state-dir>/logs/access.log")
    p.add_argument("--nginx", default="nginx", help="the nginx binary")
    p.add_argument("--debounce", type=float, default=0.1, help="seconds of quiet before a sync")
    p.add_argument("--min-sync-interval", type=float, default=1.0, help="seconds between two syncs at least")
    p.add_argument("--print-config", action="store_true",
                   help="--manifests: print the nginx configuration they give and exit (nginx is not run)")
    p.add_argument("-v", "--verbose", action="store_true")
    opts = p.parse_args(argv)
    for name in ("http_port", "https_port"):
        if not 1 <= getattr(opts, name) <= 65535:
            p.error("--%s: not a port number" % name.replace("_", "-"))
    if not 0 <= opts.status_port <= 65535:
        p.error("--status-port: not a port number")
    if not 0 <= opts.healthz_port <= 65535 or opts.healthz_port and opts.healthz_port in (
            opts.http_port, opts.https_port, opts.status_port):
        p.error("--healthz-port: not a port number, or one of the other ports")
    if len({opts.http_port, opts.https_port, opts.status_port} - {0}) != 3:
        p.error("--http-port, --https-port and --status-port must differ")
    if opts.workers != "auto" and not (opts.workers.isdigit() and int(opts.workers) > 0):
        p.error("--workers: a positive number or auto")
    if opts.worker_user and not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]*( [A-Za-z_][A-Za-z0-9_.-]*)?\Z",
                                         opts.worker_user):
        p.error("--worker-user: a user name, or 'user group'")
    if opts.upstream_keepalive < 0:
        p.error("--upstream-keepalive: not negative")
    if opts.print_config and not opts.manifests:
        p.error("--print-config needs --manifests")
    if not opts.manifests and not opts.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        p.error("say where objects come from: --manifests DIR or --kubeconfig FILE (or run in a Pod)")
    return opts


def make_source(opts, emit):
    if opts.manifests:
        from podnet.kube.manifests import ManifestSource
        return ManifestSource(opts.manifests, emit, interval=opts.poll_interval, recursive=opts.recursive,
                              kinds=INGRESS_KINDS)
    from podnet.kube.api import KubeApiSource
    return KubeApiSource(emit, kubeconfig=opts.kubeconfig, context=opts.context, kinds=INGRESS_KINDS)


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s ingress: %(message)s")
    options = render.Options(state_dir=os.path.abspath(opts.state_dir), http_port=opts.http_port,
                             https_port=opts.https_port, status_port=opts.status_port, workers=opts.workers,
                             keepalive=opts.upstream_keepalive, ipv6=opts.ipv6, access_log=opts.access_log,
                             user=opts.worker_user)
    controller = IngressController(options, class_name=opts.ingress_class, controller_name=opts.controller_name,
                                   without_class=opts.watch_ingress_without_class, nginx_binary=opts.nginx,
                                   debounce=opts.debounce, min_sync_interval=opts.min_sync_interval)
    source = make_source(opts, controller.enqueue)
    if opts.print_config:
        controller.prepare()
        source.scan()
        controller._drain(0)
        text, _, status = controller.desired()
        for message in status["warnings"]:
            log.warning("%s", message)
        sys.stdout.write(text)
        return 0
    if shutil.which(opts.nginx) is None:
        log.error("nginx binary %r not found", opts.nginx)
        return 1

    def on_signal(signum, frame):
        log.info("signal %d: shutting down", signum)
        controller.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if opts.healthz_port:
        from podnet import httpd
        try:
            httpd.serve((opts.healthz_host or "0.0.0.0", opts.healthz_port),
                        controller.metrics.routes(controller.alive, controller.ready, opts.enable_metrics),
                        name="ingress-healthz")
        except OSError as e:
            log.error("--healthz-port %d: %s", opts.healthz_port, e)
            return 1
    log.info("serving IngressClass %s (controller %s) from %s; state in %s", opts.ingress_class,
             opts.controller_name, opts.manifests or opts.kubeconfig or "the in-cluster API", options.state_dir)
    controller.run(source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
