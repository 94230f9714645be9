"""containerd 1.6 as a lab node's kubelet runtime: its CRI plugin runs podnet's CNI plugins.

Each `Containerd` runs Debian's containerd inside one node's network namespace, with its
own root, state, socket and config under a directory of the test, its CRI plugin's
`bin_dir` holding podnet's plugins (`podnet install-cni --dest`) and its `conf_dir` the
node's conflist. Nothing of it may reach the host, and containerd 1.6 has paths it does not
let a config move: shim sockets go to /run/containerd/s/, libcni (vendored in the CRI
plugin) caches ADD results in /var/lib/cni/results/. So containerd runs in a mount
namespace of its own (the one `ip netns exec` makes, a slave of the host's: nothing
mounted in it propagates back), where /run and /var/lib are covered by directories of the
test. A "holder" process (`sleep`) owns that mount namespace so that a restarted
containerd joins the same one (`nsenter --mount`) and finds what its predecessor mounted:
the pods' network namespaces (bind mounts under the state dir, as
`netns_mounts_under_state_dir` asks: the default is the host's /var/run/netns), the
overlayfs root file systems and the shims' sockets.

The sandbox ("pause") image is built here, from scratch, with the standard library: one
layer holding the static busybox as /bin/sleep, written as an OCI image layout archive and
imported with `ctr -n k8s.io images import`; no registry is needed or reachable.

The pods' network namespaces are mounted only inside containerd's mount namespace, so from
outside a test reaches a pod through its sandbox process: `nsenter --net=/proc/<pid>/ns/net`
(`Containerd.pod_run`), the pid coming from PodSandboxStatus' verbose info.
"""
import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import tarfile
import time
import uuid

from lab.cluster import pid_alive, stale_pattern

import cri

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
BUSYBOX = "/bin/busybox"                # busybox-static: runs in an image with nothing else
SANDBOX_IMAGE = "podnet.test/pause:busybox"
K8S_NAMESPACE = "k8s.io"                # containerd's namespace for the CRI's images and containers
START_TIMEOUT = 30
STOP_TIMEOUT = 10


def unavailable():
    """None when containerd, ctr, runc and the busybox for the sandbox image exist, else why not."""
    for path, package in ((CONTAINERD, "containerd"), (CTR, "containerd"), ("/usr/sbin/runc", "runc"),
                          (BUSYBOX, "busybox-static")):
        if not os.access(path, os.X_OK):
            return "needs %s (Debian package %s; ./dev setup installs it)" % (path, package)
    return cri.available()


# ---- the sandbox image --------------------------------------------------------------------

def _goarch():
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x"}.get(machine, machine)


def _blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _layer_tar():
    """An uncompressed layer: /bin/sleep is the static busybox (it picks the applet from its
    name), plus the directories runc mounts over. Fixed owners and times: the same bytes,
    so the same digest, on every run."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        with open(BUSYBOX, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/sleep")
        info.mode, info.size = 0o755, len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_sandbox_image(path, name=SANDBOX_IMAGE):
    """Write an OCI image layout archive of the sandbox image to `path`: its process sleeps
    until killed, which is all a pod sandbox's process does. Returns the manifest digest."""
    layer_digest, layer = _blob(_layer_tar())
    config_digest, config = _blob(json.dumps({
        "architecture": _goarch(), "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep"], "Cmd": ["infinity"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, sort_keys=True).encode())
    manifest_digest, manifest = _blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer)}],
    }, sort_keys=True).encode())
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": len(manifest), "platform": {"architecture": _goarch(), "os": "linux"},
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
    }]}, sort_keys=True).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(member, data):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for digest, data in ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest)):
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
    return manifest_digest


# ---- containerd's configuration -----------------------------------------------------------

def config_toml(root, state, socket, cni_bin, cni_conf, sandbox_image=SANDBOX_IMAGE):
    """containerd's config (version 2): every path under the test's directory; only the
    plugins a pod sandbox needs (overlayfs, runc v2 shims, the CRI) are left on."""
    q = json.dumps          # a TOML basic string is a JSON string for these paths
    return "\n".join([
        "version = 2",
        "root = %s" % q(root),
        "state = %s" % q(state),
        "disabled_plugins = %s" % q([
            "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.native",
            "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]),
        "",
        "[grpc]",
        "  address = %s" % q(socket),
        "[ttrpc]",
        "  address = %s" % q(socket + ".ttrpc"),
        "[debug]",
        '  level = "info"',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        "  path = %s" % q(os.path.join(root, "opt")),
        '[plugins."io.containerd.grpc.v1.cri"]',
        "  sandbox_image = %s" % q(sandbox_image),
        "  netns_mounts_under_state_dir = true",
        "  disable_tcp_service = true",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  disable_apparmor = true",
        "  restrict_oom_score_adj = true",
        '[plugins."io.containerd.grpc.v1.cri".containerd]',
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
        '  runtime_type = "io.containerd.runc.v2"',
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
        "  Root = %s" % q(os.path.join(state, "runc")),
        '[plugins."io.containerd.grpc.v1.cri".cni]',
        "  bin_dir = %s" % q(cni_bin),
        "  conf_dir = %s" % q(cni_conf),
        "  max_conf_num = 1",
        '  conf_template = ""',
        "",
    ])


# ---- cgroups: runc makes the pods' in the host's hierarchies (there is no other kind) ----

CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_mounts(mountinfo="/proc/self/mountinfo"):
    """[(mount point, fstype, super options)] of what is mounted at or under /sys/fs/cgroup."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            target = fields[4]
            if target == CGROUP_ROOT or target.startswith(CGROUP_ROOT + "/"):
                out.append((target, fields[sep + 1], fields[sep + 3]))
    return out


def cgroup_mount_commands(mountinfo="/proc/self/mountinfo"):
    """Shell commands mounting the cgroup file systems as this process sees them (the tmpfs
    holding them, v1 controllers by their options, the v2 tree). Mounting a hierarchy again
    shows the same kernel objects, not new ones."""
    steps = []
    for target, fstype, options in _cgroup_mounts(mountinfo):
        options = ",".join(o for o in options.split(",") if o not in ("rw", "ro"))
        steps.append("mkdir -p %s" % shlex.quote(target))
        steps.append("mount -t %s %s%s %s" % (fstype, "-o %s " % shlex.quote(options) if options else "",
                                              fstype, shlex.quote(target)))
    return steps


def cgroup_hierarchies():
    """Mount points of the cgroup hierarchies (v1 controllers and the v2 tree)."""
    return [target for target, fstype, _ in _cgroup_mounts() if fstype in ("cgroup", "cgroup2")]


def _cgroup_dirs(path):
    """Every directory of cgroup `path` (e.g. "/pn4711xa3f9-node1") and below it, in every
    hierarchy, deepest first."""
    found = []
    for hierarchy in cgroup_hierarchies():
        found += [d for d, _, _ in os.walk(hierarchy + path)]
    return sorted(found, key=lambda d: -d.count("/"))


def remove_cgroups(path, timeout=5):
    """SIGKILL what is left in cgroup `path` and below (it can only be ours: see
    Containerd.cgroup_root), wait for it to exit, and rmdir the cgroups deepest first."""
    deadline = time.monotonic() + timeout
    while True:
        pids = set()
        for d in _cgroup_dirs(path):
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids.update(int(p) for p in f.read().split())
            except FileNotFoundError:
                pass
        if not pids:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("processes %s stay in cgroup %s" % (sorted(pids), path))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    for d in _cgroup_dirs(path):
        os.rmdir(d)


def sweep_stale_cgroups():
    """Remove the pod cgroups (and kill the sandbox processes in them) of labs whose owner
    died without closing its containerd (a SIGKILLed test run): the lab's namespaces go at
    the next session's start, but a sandbox process lives in a namespace no lab names, so
    its cgroup, named after its node's netns, is how it is found. Returns what went."""
    pattern = stale_pattern()
    stale = set()
    for hierarchy in cgroup_hierarchies():
        try:
            names = os.listdir(hierarchy)
        except OSError:
            continue
        for name in names:
            match = pattern.match(name)
            if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
                stale.add("/" + name)
    for path in sorted(stale):
        remove_cgroups(path)
    return sorted(stale)


# ---- containerd on a node -----------------------------------------------------------------

class Containerd:
    """containerd on lab node `node`, everything under `workdir`; `conflist` (a dict) is the
    node's CNI network; `plugin_dir`, when given, is the CNI bin_dir to use instead of one
    with podnet's plugins (the reference plugins, for comparison). start() also installs
    podnet's plugins and imports the sandbox image;
    stop() is a crash or a restart's first half; close() tears every sandbox down through the
    CRI, then kills what is left by PID."""

    def __init__(self, node, workdir, conflist, python, source_root, plugin_dir=None):
        self.node = node
        self.workdir = workdir
        self.conflist = conflist
        self.python = python
        self.source_root = source_root
        self.root = os.path.join(workdir, "root")
        self.state = os.path.join(workdir, "state")
        self.socket = os.path.join(workdir, "containerd.sock")
        self.cni_bin = plugin_dir or os.path.join(workdir, "cni", "bin")
        self.install_plugins = plugin_dir is None
        self.cni_conf = os.path.join(workdir, "cni", "net.d")
        self.config_path = os.path.join(workdir, "config.toml")
        self.log_path = os.path.join(workdir, "containerd.log")
        self.log_root = os.path.join(workdir, "pods")        # kubelet's /var/log/pods
        # runc makes the pods' cgroups in the host's hierarchies (there is no other kind):
        # under a parent named after the node's netns, unique to the lab, removed by close()
        self.cgroup_root = "/" + node.name
        self.holder = None          # Popen: the process owning containerd's mount namespace
        self.proc = None            # Popen: containerd
        self.client = None          # cri.CriClient
        self.sandbox_pids = {}      # sandbox id -> its process' pid, as PodSandboxStatus said (pod_argv)

    # -- set-up --

    def install_cni(self):
        """podnet's plugins into bin_dir (`podnet install-cni --dest`), the conflist into conf_dir."""
        if self.install_plugins:
            subprocess.run([self.python, "-m", "cli.main", "install-cni", "--dest", self.cni_bin],
                           check=True, capture_output=True, text=True, timeout=60, cwd=self.source_root,
                           env=dict(os.environ, PYTHONPATH=self.source_root))
        os.makedirs(self.cni_conf, exist_ok=True)
        path = os.path.join(self.cni_conf, "10-%s.conflist" % self.conflist["name"])
        with open(path + ".tmp", "w") as f:
            json.dump(self.conflist, f, indent=2)
        os.replace(path + ".tmp", path)     # containerd watches conf_dir: never show it half a file

    def _start_holder(self):
        """A process in the node's netns whose mount namespace (ip netns exec's own) has the
        test's directories over /run and /var/lib and the host's cgroup hierarchies mounted
        again (ip netns exec mounts a fresh sysfs, without them, and runc needs them); it
        sleeps until killed."""
        run_dir, lib_dir = os.path.join(self.workdir, "run"), os.path.join(self.workdir, "var-lib")
        ready = os.path.join(self.workdir, "holder.ready")
        for d in (run_dir, lib_dir, os.path.join(self.workdir, "tmp")):
            os.makedirs(d, exist_ok=True)
        steps = ["mount --bind %s /run" % shlex.quote(run_dir), "mount --bind %s /var/lib" % shlex.quote(lib_dir)]
        steps += cgroup_mount_commands()
        steps += ["touch %s" % shlex.quote(ready), "exec sleep infinity"]
        self.holder = self.node.popen(["sh", "-c", " && ".join(steps)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(ready):
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd's mount namespace holder failed: %s"
                                   % self.holder.stderr.read().decode(errors="replace"))
            time.sleep(0.02)

    def start(self, image_archive=None):
        """Start containerd (and, the first time, its mount namespace); wait until its CRI
        answers and reports the network ready (it has loaded the conflist). With
        `image_archive`, import it into the CRI's namespace and wait until the CRI knows it."""
        if self.holder is None:
            self.install_cni()
            for d in (self.root, self.state, self.log_root):
                os.makedirs(d, exist_ok=True)
            with open(self.config_path, "w") as f:
                f.write(config_toml(self.root, self.state, self.socket, self.cni_bin, self.cni_conf))
            self._start_holder()
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "TMPDIR": os.path.join(self.workdir, "tmp")}     # its unpack mounts too stay ours
        with open(self.log_path, "ab") as log:
            self.proc = self.node.popen(["nsenter", "--mount=/proc/%d/ns/mnt" % self.holder.pid, "--",
                                         CONTAINERD, "--config", self.config_path],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        if self.client is None:
            self.client = cri.CriClient(self.socket)
        self._wait(self._cri_ready, START_TIMEOUT, "containerd's CRI to answer with the network ready")
        if image_archive:
            self.ctr("images", "import", "--snapshotter", "overlayfs", image_archive)
            self._wait(lambda: self.client.image_status(SANDBOX_IMAGE) is not None, 10,
                       "the CRI to know the sandbox image")
        return self

    def _cri_ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError("containerd exited with %s\n%s" % (self.proc.returncode, self.log_tail()))
        with open(self.log_path, errors="replace") as f:
            if 'failed to load plugin io.containerd.grpc.v1.cri"' in f.read():
                raise RuntimeError("containerd could not load its CRI plugin\n%s" % self.log_tail())
        try:
            self.client.version(timeout=1)
            conditions = self.client.conditions()
        except Exception:       # not listening yet: grpc.RpcError
            return False
        return all(conditions.get(kind, (False,))[0] for kind in ("RuntimeReady", "NetworkReady"))

    def ctr(self, *args, timeout=60):
        """`ctr` against this containerd (namespace k8s.io), run inside the node."""
        return self.node.run([CTR, "--address", self.socket, "--namespace", K8S_NAMESPACE] + list(args),
                             timeout=timeout)

    # -- pods --

    def run_pod(self, name, namespace="default", uid=None, attempt=0, port_mappings=()):
        """RunPodSandbox with kubelet's config for pod namespace/name; (sandbox id, status,
        verbose info). As kubelet does, the log directory is made first, and the pod gets a
        cgroup of its own (here under a parent named after the node's netns, removed by close())."""
        uid = uid or str(uuid.uuid4())
        log_dir = os.path.join(self.log_root, "%s_%s_%s" % (namespace, name, uid))
        os.makedirs(log_dir, exist_ok=True)
        config = cri.sandbox_config(name, namespace, uid, attempt=attempt, log_directory=log_dir,
                                    cgroup_parent="%s/pod%s" % (self.cgroup_root, uid), port_mappings=port_mappings)
        sandbox_id = self.client.run_pod_sandbox(config)
        status, info = self.client.pod_sandbox_status(sandbox_id)
        self.sandbox_pids[sandbox_id] = sandbox_pid(info)
        return sandbox_id, status, info

    def pod_argv(self, sandbox_id, argv):
        """argv run in a sandbox's network namespace (entered through its process)."""
        return ["nsenter", "--net=/proc/%d/ns/net" % self.sandbox_pids[sandbox_id], "--"] + [str(a) for a in argv]

    def pod_run(self, sandbox_id, argv, check=True, timeout=30):
        """Run argv in a sandbox's network namespace (from the node; nothing in the root netns)."""
        return self.node.run(self.pod_argv(sandbox_id, argv), check=check, timeout=timeout)

    # -- stopping --

    def stop(self, sig=signal.SIGKILL):
        """Kill containerd by its PID (SIGKILL: a crash) and wait; sandboxes keep running
        under their shims."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
        finally:
            if proc in self.node.processes and proc.returncode is not None:
                self.node.processes.remove(proc)    # reaped: the lab must not signal its pid again

    def restart(self, sig=signal.SIGKILL):
        self.stop(sig)
        return self.start()

    def close(self):
        """Stop and remove every sandbox through the CRI (CNI DEL, as kubelet would), stop
        containerd, then kill by PID whatever of ours is left: the processes in containerd's
        mount namespace (shims, runc), the holder, the sandbox processes (found by their
        cgroups, which are removed). Each step runs even if one before it failed; the first
        error is raised at the end."""
        errors = []
        if self.proc is not None and self.proc.poll() is None and self.client is not None:
            try:
                sandboxes = self.client.list_pod_sandbox()
            except Exception as e:
                errors.append(e)
                sandboxes = []
            for sandbox in sandboxes:
                try:
                    self.client.stop_pod_sandbox(sandbox.id)
                    self.client.remove_pod_sandbox(sandbox.id)
                except Exception as e:
                    errors.append(e)
        try:
            self.stop(signal.SIGTERM)
        except Exception as e:
            errors.append(e)
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.holder is not None:
            self._kill_mount_namespace()
            if self.holder in self.node.processes:
                self.node.processes.remove(self.holder)
            self.holder.stderr.close()
            self.holder = None
        try:
            remove_cgroups(self.cgroup_root)
        except Exception as e:
            errors.append(e)
        if errors:
            raise errors[0]

    def _kill_mount_namespace(self):
        """SIGKILL every process in the holder's mount namespace (shims, runc, anything
        containerd started there), then the holder, and wait for them. The holder lives
        until the others are gone, so the namespace's identity cannot be reused meanwhile."""
        ns = os.readlink("/proc/%d/ns/mnt" % self.holder.pid)
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            inside = []
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) != self.holder.pid:
                    try:
                        if os.readlink("/proc/%s/ns/mnt" % entry) == ns:
                            inside.append(int(entry))
                    except OSError:
                        continue        # gone meanwhile, or a zombie (no namespaces left)
            if not inside or time.monotonic() > deadline:
                break
            for pid in inside:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self.holder.kill()
        self.holder.wait(STOP_TIMEOUT)

    # -- helpers --

    def log_tail(self, size=4000):
        try:
            with open(self.log_path, errors="replace") as f:
                return "--- %s ---\n%s" % (self.log_path, f.read()[-size:])
        except OSError:
            return ""

    def _wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("timed out after %ss waiting for %s on %s\n%s"
                                   % (timeout, what, self.node.role, self.log_tail()))
            time.sleep(0.1)


def sandbox_pid(info):
    """The sandbox process' pid from PodSandboxStatus' verbose info (containerd: info["info"]["pid"])."""
    return int(info["info"]["pid"])


def sandbox_netns_path(info):
    """The network namespace path containerd gave the sandbox: its runtime spec's network
    namespace (a bind mount under the state dir, visible inside containerd's mount namespace)."""
    namespaces = info["info"]["runtimeSpec"]["linux"]["namespaces"]
    return next(ns.get("path", "") for ns in namespaces if ns["type"] == "network")


# ---- side by side: `python netns_tests/containerd_lab.py` ----------------------------------

def bench(rounds=20, reference="/usr/lib/cni"):
    """RunPodSandbox / StopPodSandbox / RemovePodSandbox through containerd's CRI with
    podnet's plugins and with the reference plugins, one node and one containerd each, the
    same bridge + host-local + portmap conflist, calls interleaved round by round. Prints
    medians and p90s in ms."""
    import sys

    from lab.cluster import Lab

    source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    times = {}
    with Lab() as lab:
        underlay = lab.underlay()
        image = os.path.join(lab.workdir, "pause.tar")
        build_sandbox_image(image)
        runtimes = {}
        try:
            for which, plugin_dir in (("podnet", None), ("reference", reference)):
                node = lab.node(which, underlay, ip_forward=True)
                conflist = {"cniVersion": "1.0.0", "name": "bench", "plugins": [
                    {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
                              "dataDir": os.path.join(lab.workdir, which, "ipam")}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]}
                runtimes[which] = Containerd(node, os.path.join(lab.workdir, which), conflist, sys.executable,
                                             source_root, plugin_dir).start(image)
            for i in range(rounds):
                for which, runtime in runtimes.items():
                    started = time.monotonic()
                    sandbox_id = runtime.client.run_pod_sandbox(cri.sandbox_config(
                        "bench-%d" % i, "default", str(uuid.uuid4()),
                        cgroup_parent="%s/bench-%d" % (runtime.cgroup_root, i)))
                    middle = time.monotonic()
                    runtime.client.stop_pod_sandbox(sandbox_id)
                    stopped = time.monotonic()
                    runtime.client.remove_pod_sandbox(sandbox_id)
                    done = time.monotonic()
                    for what, seconds in (("RunPodSandbox", middle - started), ("StopPodSandbox", stopped - middle),
                                          ("RemovePodSandbox", done - stopped)):
                        times.setdefault((what, which), []).append(1000 * seconds)
        finally:
            for runtime in runtimes.values():
                runtime.close()
    print("%-18s %-10s %8s %8s" % ("call", "plugins", "median", "p90"))
    for (what, which), ms in sorted(times.items()):
        ms.sort()
        print("%-18s %-10s %8.1f %8.1f" % (what, which, ms[len(ms) // 2], ms[int(len(ms) * 0.9)]))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=bench.__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    bench(parser.parse_args().rounds)
