"""A cluster made of network namespaces, for end-to-end tests and the demo.

A `Lab` creates and owns everything: a "switch" namespace holding a Linux
bridge plays the underlay network, each node is a namespace attached to it
with a veth pair, and pods get empty namespaces as a container runtime would
make them. Nothing is ever created in the root namespace: links are added with
`ip -n <ours> ...` and their peers are moved straight into another of our
namespaces, so deleting the namespaces removes every trace.

All names share one prefix, "pn<pid>x<4 hex>", e.g. "pn4711xa3f9-node1". The
pid is the owning process: `Lab.teardown_stale` removes only namespaces whose
owner is dead, so parallel runs never tear down each other's labs.

Standard library only; unlike the CNI hot path, start-up time does not matter
here, so subprocess and ipaddress are fine.
"""
import atexit
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import namedtuple

NETNS_DIR = "/var/run/netns"
PREFIX = "pn"
IFNAMSIZ = 15           # longest interface name the kernel accepts
DEFAULT_TIMEOUT = 60    # seconds any one command may take
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_ROLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,%d}\Z" % IFNAMSIZ)


class CommandFailed(subprocess.CalledProcessError):
    """A command exited non-zero; unlike the base class, says what it printed."""

    def __str__(self):
        text = (self.stderr or self.stdout or "").strip()
        return "%s\n%s" % (super().__str__(), text) if text else super().__str__()


# --- names ------------------------------------------------------------------

def lab_prefix(prefix=PREFIX, pid=None, tag=None):
    """The name prefix of one lab: <prefix><owner pid>x<4 hex digits>."""
    pid = os.getpid() if pid is None else pid
    tag = os.urandom(2).hex() if tag is None else tag
    return "%s%dx%s" % (prefix, pid, tag)


def stale_pattern(prefix=PREFIX):
    """Matches netns names made by lab_prefix(prefix); group 1 is the owner pid."""
    return re.compile(r"^%s(\d+)x[0-9a-f]{4}-" % re.escape(prefix))


def check_role(role):
    if not isinstance(role, str) or not _ROLE_RE.match(role) or len(role) > 64:
        raise ValueError("bad namespace role %r: use letters, digits, '_', '.', '-'" % (role,))
    return role


def port_name(node_role, index):
    """The switch-side veth name for a node: "ve-<node>" if that fits, else "ve-<index>".

    It lives in the switch namespace only, so it need not carry the lab prefix.
    """
    name = "ve-" + node_role
    if len(name) <= IFNAMSIZ and _IFNAME_RE.match(name):
        return name
    return "ve-%d" % index


def parse_netns_list(text):
    """Names from `ip netns list` output (lines like "name (id: 3)" or "name")."""
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


# --- addresses --------------------------------------------------------------

class AddressPool:
    """Host addresses of a subnet, handed out lowest first; explicit picks are honoured."""

    def __init__(self, subnet):
        self.subnet = ipaddress.ip_network(subnet, strict=True)
        self.taken = set()

    def is_host(self, address):
        net = self.subnet
        if address not in net:
            return False
        # /31 and /32 (RFC 3021) have no network or broadcast address to avoid.
        return net.num_addresses <= 2 or address not in (net.network_address,
                                                         net.broadcast_address)

    def take(self, address=None):
        """Reserve `address` (must be a free host address here) or the lowest free one."""
        if address is None:
            for host in self.subnet.hosts():
                if host not in self.taken:
                    self.taken.add(host)
                    return host
            raise ValueError("no free address left in %s" % self.subnet)
        address = ipaddress.ip_address(address)
        if not self.is_host(address):
            raise ValueError("%s is not a host address of %s" % (address, self.subnet))
        if address in self.taken:
            raise ValueError("%s is already in use" % address)
        self.taken.add(address)
        return address


# --- running things inside a namespace ---------------------------------------

def exec_argv(netns, cmd):
    """argv running `cmd` (argv list, or a shell string) inside netns `netns`."""
    if isinstance(cmd, str):
        cmd = ["sh", "-c", cmd]
    return ["ip", "netns", "exec", netns] + [str(a) for a in cmd]


def _run(argv, input=None, check=True, timeout=DEFAULT_TIMEOUT, env=None):
    proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


CniOutcome = namedtuple("CniOutcome", "returncode stdout result stderr")
CniOutcome.__doc__ = "One plugin run: exit code, stdout text, stdout parsed as JSON (or None), stderr."


def cni_env(command, container_id, netns_path, ifname, cni_path, extra_env=None):
    """The environment a runtime gives a CNI plugin: a plain PATH plus CNI_*."""
    env = {
        "PATH": SYSTEM_PATH,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path or "",
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni_path,
    }
    env.update(extra_env or {})
    return env


def run_cni(namespace, plugin_path, command, container_id, netns_path, ifname, conf,
            cni_path, extra_env=None, timeout=DEFAULT_TIMEOUT):
    """Run a CNI plugin executable inside `namespace` (a node), config on stdin.

    Running it in the node namespace is what puts the bridge, the host side
    of the veth and any iptables rules there rather than in the root namespace.
    `conf` is a dict (sent as JSON) or str/bytes sent verbatim, e.g. to test
    malformed input. Never raises for a failing plugin: look at the outcome.
    """
    if isinstance(conf, dict):
        conf = json.dumps(conf)
    elif isinstance(conf, bytes):
        conf = conf.decode()
    env = cni_env(command, container_id, netns_path, ifname, cni_path, extra_env)
    proc = _run(exec_argv(namespace.name, [plugin_path]), input=conf, check=False,
                timeout=timeout, env=env)
    try:
        result = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        result = None
    return CniOutcome(proc.returncode, proc.stdout, result, proc.stderr)


def start_cni(namespace, plugin_path, command, container_id, netns_path, ifname, conf, cni_path):
    """Start a CNI plugin inside `namespace` without waiting (for concurrency tests)."""
    env = cni_env(command, container_id, netns_path, ifname, cni_path)
    proc = subprocess.Popen(exec_argv(namespace.name, [plugin_path]), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(json.dumps(conf).encode())
    proc.stdin.close()
    return proc


def finish_cni(procs, timeout=DEFAULT_TIMEOUT):
    """Wait for plugins from start_cni: [(returncode, stdout, stderr)] in order."""
    out = []
    for proc in procs:
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        proc.wait(timeout)
        proc.stdout.close()
        proc.stderr.close()
        out.append((proc.returncode, stdout.decode(), stderr.decode()))
    return out


class Namespace:
    """One named network namespace made by a Lab."""

    def __init__(self, lab, name, role):
        self.lab = lab
        self.name = name            # the netns name, as `ip netns` knows it
        self.role = role            # the short name it was asked for, e.g. "node1"
        self.path = os.path.join(NETNS_DIR, name)
        self.processes = []         # Popen objects started with popen(), killed at cleanup

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.name)

    def run(self, cmd, input=None, check=True, timeout=DEFAULT_TIMEOUT, env=None):
        """Run argv (or a shell string) inside; CompletedProcess with text output."""
        return _run(exec_argv(self.name, cmd), input=input, check=check, timeout=timeout,
                    env=env)

    def ip(self, *args, check=True):
        """`ip -n <this namespace> args...`"""
        return _run(["ip", "-n", self.name] + [str(a) for a in args], check=check)

    def ip_json(self, *args):
        """`ip -j -n <ns> args...` parsed, e.g. ns.ip_json("addr", "show", "eth0")."""
        out = self.ip("-j", *args).stdout
        return json.loads(out) if out.strip() else []

    def link_names(self):
        return {link["ifname"] for link in self.ip_json("link", "show")}

    def sysctl(self, key, value):
        self.run(["sysctl", "-q", "-w", "%s=%s" % (key, value)])

    def popen(self, argv, **kw):
        """Start a background process inside; it is killed at cleanup.

        It gets its own session (process group = its pid), so cleanup also
        reaches children it forked, and a Ctrl-C in the terminal does not.
        """
        kw["start_new_session"] = True
        proc = subprocess.Popen(exec_argv(self.name, argv), **kw)
        self.processes.append(proc)
        return proc

    def run_cni(self, plugin_path, command, container_id, netns_path, ifname, conf,
                cni_path, extra_env=None, timeout=DEFAULT_TIMEOUT):
        return run_cni(self, plugin_path, command, container_id, netns_path, ifname, conf,
                       cni_path, extra_env, timeout)


class Node(Namespace):
    """A node: a namespace with an `eth0` on an underlay.

    `role` is the node name you gave (e.g. "node1"); `name` is the netns name.
    Later code (etcd, flanneld, kubelet-ish pod set-up) extends this class.
    """

    def __init__(self, lab, name, role):
        super().__init__(lab, name, role)
        self.underlay = None
        self.underlay_ip = None     # str, e.g. "192.168.50.1"
        self.underlay_if = "eth0"

    @property
    def underlay_cidr(self):
        return "%s/%d" % (self.underlay_ip, self.underlay.subnet.prefixlen)


class Underlay:
    """The network between nodes: a bridge `br0` in its own switch namespace."""

    BRIDGE = "br0"

    def __init__(self, switch, subnet):
        self.switch = switch
        self.pool = AddressPool(subnet)
        self.subnet = self.pool.subnet
        self.ports = []             # switch-side veth names, one per attached namespace

    def attach(self, ns, ip=None, ifname="eth0"):
        """Connect `ns` to the switch by a veth pair and address its end; returns the address.

        Both ends are created inside the switch namespace and the peer is moved
        straight into `ns`: neither end ever exists in the root namespace.
        """
        address = self.pool.take(ip)
        port, n = port_name(ns.role, len(self.ports)), len(self.ports)
        while port in self.ports:           # e.g. two long node names
            n += 1
            port = "ve-%d" % n
        self.switch.ip("link", "add", port, "type", "veth",
                       "peer", "name", ifname, "netns", ns.name)
        self.ports.append(port)
        self.switch.ip("link", "set", port, "master", self.BRIDGE, "up")
        ns.ip("addr", "add", "%s/%d" % (address, self.subnet.prefixlen), "dev", ifname)
        ns.ip("link", "set", ifname, "up")
        return str(address)


class Lab:
    """Owns a set of namespaces and processes; `cleanup()` removes all of them.

    Use as a context manager. An atexit hook cleans up labs still open when the
    interpreter exits; `teardown_stale` covers runs that were SIGKILLed.
    """

    _open: set["Lab"] = set()   # labs not yet cleaned up, for the atexit hook

    def __init__(self, prefix=PREFIX, kill_timeout=3.0):
        self.prefix = lab_prefix(prefix)
        self.kill_timeout = kill_timeout
        self.namespaces = []        # in creation order
        self._workdir = None
        self._closed = False
        Lab._open.add(self)

    def __repr__(self):
        return "<Lab %s: %d namespaces>" % (self.prefix, len(self.namespaces))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    @property
    def workdir(self):
        """A private temporary directory (IPAM dataDir, logs...), removed at cleanup."""
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix=self.prefix + "-")
        return self._workdir

    # -- building --

    def namespace(self, role, cls=Namespace, loopback=True, ip_forward=None):
        """Create namespace <prefix>-<role>, lo up unless loopback=False."""
        if self._closed:
            raise RuntimeError("%r is cleaned up" % self)
        name = "%s-%s" % (self.prefix, check_role(role))
        if any(ns.name == name for ns in self.namespaces):
            raise ValueError("namespace %r already exists in this lab" % role)
        _run(["ip", "netns", "add", name])
        ns = cls(self, name, role)
        self.namespaces.append(ns)      # registered at once: cleaned up even if set-up fails
        if loopback:
            ns.ip("link", "set", "lo", "up")
        if ip_forward is not None:
            ns.sysctl("net.ipv4.ip_forward", int(bool(ip_forward)))
        return ns

    def underlay(self, subnet="192.168.50.0/24", name="underlay"):
        """A switch namespace <prefix>-<name> with bridge br0 (no address of its own)."""
        switch = self.namespace(name)
        switch.ip("link", "add", Underlay.BRIDGE, "type", "bridge")
        switch.ip("link", "set", Underlay.BRIDGE, "up")
        return Underlay(switch, subnet)

    def node(self, name, underlay, ip=None, ip_forward=None, cls=Node):
        """A node namespace with eth0 on `underlay`, at `ip` or the next free address."""
        node = self.namespace(name, cls=cls, ip_forward=ip_forward)
        node.underlay = underlay
        node.underlay_ip = underlay.attach(node, ip, node.underlay_if)
        return node

    def pod_netns(self, name):
        """An empty namespace as a runtime makes for a pod: even lo is left to CNI."""
        return self.namespace("pod-" + name, loopback=False)

    # -- tearing down --

    def cleanup(self):
        """Kill our processes, delete our namespaces and workdir. Safe to call twice."""
        errors = []
        _stop_all([proc for ns in self.namespaces for proc in ns.processes], self.kill_timeout)
        for ns in reversed(self.namespaces):
            try:
                _delete_netns(ns.name)
            except Exception as e:      # keep going: delete everything we can
                errors.append("%s: %s" % (ns.name, e))
        self.namespaces = [ns for ns in self.namespaces if os.path.exists(ns.path)]
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._closed = True
        Lab._open.discard(self)
        if errors:
            raise RuntimeError("lab cleanup incomplete:\n" + "\n".join(errors))

    @staticmethod
    def teardown_stale(prefix=PREFIX, include_live=False):
        """Delete namespaces left by crashed runs: ours by name, owner pid dead.

        Returns the names removed. Namespaces of a live owner (a parallel run)
        are kept unless include_live.
        """
        pattern = stale_pattern(prefix)
        removed = []
        for name in parse_netns_list(_run(["ip", "netns", "list"]).stdout):
            match = pattern.match(name)
            if not match:
                continue
            owner = int(match.group(1))
            if owner == os.getpid() or (pid_alive(owner) and not include_live):
                continue
            _delete_netns(name)
            removed.append(name)
        return removed


def _stop_all(procs, timeout):
    """SIGTERM the process groups we started; SIGKILL what is left after `timeout`.

    One shared deadline, so many stubborn processes cost `timeout` once.
    """
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        # Children of the leader may outlive it; the group id is still our pid.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _delete_netns(name):
    """Kill what still runs in our namespace `name`, then delete it.

    Anything in a namespace a lab made was started by that lab (directly or by
    a plugin it ran). Left alive it would keep the namespace, and its
    interfaces, existing unnamed after `ip netns delete`.
    """
    if not os.path.exists(os.path.join(NETNS_DIR, name)):
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        # Exited processes (zombies included) are no longer listed.
        pids = [int(p) for p in _run(["ip", "netns", "pids", name], check=False).stdout.split()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    _run(["ip", "netns", "delete", name])


@atexit.register
def _cleanup_open_labs():
    for lab in list(Lab._open):
        try:
            lab.cleanup()
        except Exception:
            pass


# --- a whole cluster: etcd, flanneld per node, pods through the flannel conflist ---

class Pod:
    __slots__ = ("name", "node", "ns", "container_id", "ip")

    def __init__(self, name, node, ns, container_id, ip):
        self.name, self.node, self.ns, self.container_id, self.ip = name, node, ns, container_id, ip

    def __repr__(self):
        return "Pod(%s on %s, %s)" % (self.name, self.node.role, self.ip)


class Cluster:
    """A multi-node cluster in one Lab, wired like a real flannel cluster:

    - an underlay switch; etcd in its own namespace on it (the last address);
    - per node: a namespace on the underlay running `podnet flanneld`, podnet's
      CNI executables and the stock 10-flannel.conflist (flannel + portmap),
      all paths under the lab's workdir;
    - pods: empty namespaces attached with `podnet cni add` run in the node,
      exactly as a container runtime would run the conflist.
    """

    ETCD_PORT = 2379

    def __init__(self, lab, nodes=3, backend="vxlan", network="10.244.0.0/16",
                 underlay="192.168.50.0/24", ip_masq=True, python=None, flanneld_args=()):
        self.lab = lab
        self.node_count = nodes
        self.backend = backend
        self.network = network
        self.ip_masq = ip_masq
        self.flanneld_args = list(flanneld_args)    # extra arguments for every node's daemon
        self.python = python or _venv_python()
        self.underlay = lab.underlay(underlay)
        self.nodes = []
        self.flanneld = {}          # node role -> Popen
        self.kube_proxy = {}        # node role -> Popen
        self.network_policy = {}    # node role -> Popen (`podnet network-policy`)
        self.network_policy_manifests = {}      # node role -> the manifests directory its agent reads
        self.pods = []
        self.etcd_ns = None
        self.etcd_url = None
        self.etcd_proc = None
        self.bin_dir = os.path.join(lab.workdir, "bin")

    # -- etcd --
    def start_etcd(self):
        self.etcd_ns = self.lab.namespace("etcd")
        ip = str(self.underlay.subnet.broadcast_address - 1)
        self.underlay.attach(self.etcd_ns, ip)
        self.etcd_url = "http://%s:%d" % (ip, self.ETCD_PORT)
        self._spawn_etcd()

    def _spawn_etcd(self):
        data = os.path.join(self.lab.workdir, "etcd")
        with open(os.path.join(self.lab.workdir, "etcd.log"), "a") as log:
            self.etcd_proc = self.etcd_ns.popen(
                ["etcd", "--name", "etcd", "--data-dir", data,
                 "--listen-client-urls", "%s,http://127.0.0.1:%d" % (self.etcd_url, self.ETCD_PORT),
                 "--advertise-client-urls", self.etcd_url,
                 "--listen-peer-urls", "http://127.0.0.1:2380",
                 "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                 "--initial-cluster", "etcd=http://127.0.0.1:2380"],
                stdout=log, stderr=subprocess.STDOUT)
        _wait(lambda: self.etcdctl("endpoint", "health", check=False).returncode == 0, 60, "etcd to start")

    def stop_etcd(self, timeout=10):
        """SIGTERM etcd (an outage); its data dir is kept for restart_etcd()."""
        proc, self.etcd_proc = self.etcd_proc, None
        _stop_one(self.etcd_ns, proc, timeout)

    def restart_etcd(self):
        """Start etcd again on the same data dir (stopping it first if it runs)."""
        if self.etcd_proc is not None:
            self.stop_etcd()
        self._spawn_etcd()

    def etcdctl(self, *args, check=True):
        env = {"ETCDCTL_API": "3", "PATH": SYSTEM_PATH}
        return self.etcd_ns.run(["etcdctl", "--endpoints", "http://127.0.0.1:%d" % self.ETCD_PORT] + list(args),
                                check=check, env=env)

    def network_config(self):
        backend = {"Type": self.backend}
        if self.backend == "vxlan":
            backend.update({"VNI": 1, "Port": 8472})
        return json.dumps({"Network": self.network, "SubnetLen": 24, "Backend": backend})

    def put_network_config(self, text=None):
        self.etcdctl("put", "/coreos.com/network/config", text or self.network_config())

    # -- nodes --
    def node_dir(self, node):
        path = os.path.join(self.lab.workdir, node.role)
        os.makedirs(path, exist_ok=True)
        return path

    def subnet_file(self, node):
        return os.path.join(self.node_dir(node), "subnet.env")

    def subnet_env(self, node):
        """The node's subnet.env as flanneld wrote it: {"FLANNEL_SUBNET": ..., ...}."""
        with open(self.subnet_file(node)) as f:
            return dict(line.split("=", 1) for line in f.read().split())

    def node_by_role(self, role):
        return next(n for n in self.nodes if n.role == role)

    def add_node(self, name, extra=()):
        node = self._new_node(name, self.underlay)
        self.start_flanneld(node, extra)
        return node

    def _new_node(self, name, underlay, gateway=None):
        node = self.lab.node(name, underlay, ip_forward=True)
        # Real nodes have a default route; without one, traffic to a Service IP that is
        # not DNATed (a Service without endpoints) dies in routing ("network unreachable")
        # before kube-proxy's REJECT can answer it. On-link (without a gateway): it only
        # ever ARPs on our underlay.
        if gateway:
            node.ip("route", "add", "default", "via", gateway)
        else:
            node.ip("route", "add", "default", "dev", node.underlay_if)
        self.nodes.append(node)
        return node

    def start_flanneld(self, node, extra=()):
        argv = [self.python, "-m", "flanneld.daemon", "--etcd-endpoints", self.etcd_url,
                "--iface", node.underlay_if, "--subnet-file", self.subnet_file(node)] \
            + self.flanneld_args + list(extra)
        if self.ip_masq:
            argv.append("--ip-masq")
        with open(self.flanneld_log(node), "a") as log:
            self.flanneld[node.role] = node.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=_SOURCE_ROOT,
                                                  env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
        return self.flanneld[node.role]

    def flanneld_log(self, node):
        return os.path.join(self.node_dir(node), "flanneld.log")

    def stop_flanneld(self, node, timeout=10):
        """SIGTERM the node's daemon and wait for it (the datapath stays)."""
        _stop_one(node, self.flanneld.pop(node.role), timeout)

    # -- Services --
    def start_kube_proxy(self, node, manifests, extra=()):
        """`podnet kube-proxy` in the node, reading Services/EndpointSlices from `manifests`."""
        argv = [self.python, "-m", "cli.main", "kube-proxy", "--manifests", manifests,
                "--manifests-interval", "0.2", "--hostname-override", node.role,
                "--cluster-cidr", self.network, "--min-sync-period", "0.2"] + list(extra)
        with open(self.kube_proxy_log(node), "a") as log:
            self.kube_proxy[node.role] = node.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=_SOURCE_ROOT,
                                                    env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
        return self.kube_proxy[node.role]

    def kube_proxy_log(self, node):
        return os.path.join(self.node_dir(node), "kube-proxy.log")

    def stop_kube_proxy(self, node, timeout=10):
        """SIGTERM the node's kube-proxy (its rules stay, as on a real node)."""
        _stop_one(node, self.kube_proxy.pop(node.role), timeout)

    # -- NetworkPolicy --
    NETWORK_POLICY_METRICS_PORT = 10265     # the agent's default --metrics-bind-address port

    def start_network_policy(self, node, manifests, extra=()):
        """`podnet network-policy` in the node, reading NetworkPolicies, Pods and Namespaces from
        `manifests` (polled every 0.2 s, syncs at most every 0.2 s), its /metrics, /healthz and
        /readyz on 127.0.0.1:10265 inside the node. Works for flannel and calico clusters alike."""
        argv = [self.python, "-m", "cli.main", "network-policy", "--manifests", manifests,
                "--manifests-interval", "0.2", "--hostname-override", node.role,
                "--min-sync-period", "0.2"] + list(extra)
        self.network_policy_manifests[node.role] = manifests
        with open(self.network_policy_log(node), "a") as log:
            self.network_policy[node.role] = node.popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                        cwd=_SOURCE_ROOT,
                                                        env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
        return self.network_policy[node.role]

    def network_policy_log(self, node):
        return os.path.join(self.node_dir(node), "network-policy.log")

    def stop_network_policy(self, node, timeout=10):
        """SIGTERM the node's agent and wait for it (its rules stay, as on a real node)."""
        _stop_one(node, self.network_policy.pop(node.role), timeout)

    def network_policy_get(self, node, path, port=None):
        """(HTTP status, body) of GET `path` from the node's agent (curl inside the node);
        status 0 when nothing answers."""
        url = "http://127.0.0.1:%d%s" % (port or self.NETWORK_POLICY_METRICS_PORT, path)
        out = node.run(["curl", "-s", "-m", "2", "-o", "-", "-w", "\\n%{http_code}", url], check=False).stdout
        body, _, status = out.rpartition("\n")
        return int(status) if status.isdigit() else 0, body

    def network_policy_synced_through(self, node, port=None):
        """The agent's podnet_network_policy_synced_through_timestamp_seconds (unix time): what its
        manifests directory held then is in the kernel; None if it does not answer yet."""
        status, body = self.network_policy_get(node, "/metrics", port)
        found = re.search(r"^podnet_network_policy_synced_through_timestamp_seconds (\S+)$", body, re.M) \
            if status == 200 else None
        return float(found.group(1)) if found else None

    def wait_network_policy(self, node, since, timeout=20, port=None):
        """Until the node's agent enforces what its manifests directory held at `since` (a
        time.time()) and at the last change of the directory's files, whichever is later, so
        `since` may be taken before or after writing. The agent marks each scan of the directory
        with the time the scan started; a scan that started after a write has read it. The
        seconds it took; TimeoutError (with the agent's log) after `timeout`."""
        mark = max(since, _newest_change(self.network_policy_manifests.get(node.role)))
        started = time.monotonic()
        _wait(lambda: (self.network_policy_synced_through(node, port) or 0) > mark, timeout,
              "the NetworkPolicy agent on %s to sync what changed by %.3f" % (node.role, mark),
              lambda: _tail(self.network_policy_log(node)))
        return time.monotonic() - started

    @staticmethod
    def pod_manifest(pod, name=None, namespace="default", labels=None, ports=(), host_network=False):
        """The Pod object an API server would hold for lab pod `pod` (running, its real address,
        spec.nodeName the node's role as --hostname-override says it). ports: [(name, port,
        protocol)] of its one container."""
        container = {"name": "main", "image": "podnet/echo"}
        if ports:
            container["ports"] = [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]
        spec = {"nodeName": pod.node.role, "containers": [container]}
        if host_network:
            spec["hostNetwork"] = True
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name or pod.name, "namespace": namespace, "labels": dict(labels or {})},
                "spec": spec,
                "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}}

    def start_echo(self, pod, port=8080, udp_port=8081):
        """A server in the pod that answers with the pod's name (lab.echo)."""
        proc = pod.ns.popen([self.python, "-m", "lab.echo", "serve", "--name", pod.name, "--port", str(port),
                             "--udp-port", str(udp_port)], cwd=_SOURCE_ROOT,
                            env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
        return proc

    def echo(self, ns, *args, timeout=60):
        """lab.echo's client (get/udp ...) run in namespace `ns`; its parsed JSON output."""
        out = ns.run([self.python, "-m", "lab.echo"] + [str(a) for a in args], timeout=timeout,
                     env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
        return json.loads(out.stdout)

    def wait_ready(self, timeout=30):
        """Until every node has written subnet.env (its lease is in etcd)."""
        _wait(lambda: all(os.path.exists(self.subnet_file(n)) for n in self.nodes), timeout,
              "flanneld to write subnet.env on every node", self._logs)

    def conflist(self, node):
        d = self.node_dir(node)
        return {"name": "cbr0", "cniVersion": "1.0.0", "plugins": [
            {"type": "flannel", "subnetFile": self.subnet_file(node), "dataDir": os.path.join(d, "flannel"),
             "delegate": {"hairpinMode": True, "isDefaultGateway": True},
             "ipam": {"dataDir": os.path.join(d, "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}

    def start(self):
        from cni.executable import install
        install(self.bin_dir, "/usr/bin/python3")
        self.start_etcd()
        self.put_network_config()
        for i in range(1, self.node_count + 1):
            self.add_node("node%d" % i)
        self.wait_ready()
        return self

    # -- pods --
    def cni_bin(self, node):
        """The directory of the CNI executables the node's runtime runs (one for every node here)."""
        return self.bin_dir

    def conflist_path(self, node):
        """The network config list the node's runtime loads."""
        return os.path.join(self.node_dir(node), "10-flannel.conflist")

    def write_conflist(self, node):
        """conflist(node) written at conflist_path(node), before a pod is attached; that path."""
        path = self.conflist_path(node)
        with open(path, "w") as f:
            json.dump(self.conflist(node), f)
        return path

    def add_pod(self, node, name, port_mappings=None):
        ns = self.lab.pod_netns(name)
        conf_path = self.write_conflist(node)
        cid = "%s-%s" % (self.lab.prefix, name)
        argv = [self.python, "-m", "cli.main", "cni", "add", ns.path, "--conflist", conf_path,
                "--container-id", cid, "--cni-path", self.cni_bin(node),
                "--cache-dir", os.path.join(self.node_dir(node), "cache")]
        if port_mappings:
            argv += ["--cap-args", json.dumps({"portMappings": port_mappings})]
        out = node.run(argv, env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
        result = json.loads(out.stdout)
        ns.ip("link", "set", "lo", "up")
        pod = Pod(name, node, ns, cid, result["ips"][0]["address"].split("/")[0])
        self.pods.append(pod)
        return pod

    def remove_pod(self, pod):
        pod.node.run([self.python, "-m", "cli.main", "cni", "del", pod.ns.path, "--conflist",
                      self.conflist_path(pod.node), "--container-id", pod.container_id, "--cni-path",
                      self.cni_bin(pod.node),
                      "--cache-dir", os.path.join(self.node_dir(pod.node), "cache")],
                     env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
        self.pods.remove(pod)

    def ping_matrix(self, count=1, timeout=2):
        """{(from pod, to pod): True/False} for every ordered pair of distinct pods."""
        out = {}
        for a in self.pods:
            for b in self.pods:
                if a is not b:
                    r = a.ns.run(["ping", "-c", str(count), "-W", str(timeout), "-q", b.ip], check=False)
                    out[(a.name, b.name)] = r.returncode == 0
        return out

    def _logs(self):
        text = []
        for node in self.nodes:
            path = self.flanneld_log(node)
            if os.path.exists(path):
                with open(path) as f:
                    text.append("--- %s flanneld.log ---\n%s" % (node.role, f.read()[-3000:]))
        return "\n".join(text)


_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stop_one(ns, proc, timeout):
    """SIGTERM one process `ns.popen` started, wait, and forget it: a reaped pid may be
    reused, so cleanup must not signal it (or its group) again."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        if proc in ns.processes and proc.returncode is not None:
            ns.processes.remove(proc)


# file timestamps come from the kernel's coarse clock, up to a tick behind time.time()
_FS_CLOCK_LAG = 0.02


def _newest_change(directory):
    """The latest time a file in `directory` (or the directory itself: a rename, a removal)
    changed, plus the file system clock's lag; 0 when there is no such directory."""
    if not directory:
        return 0.0
    try:
        times = [os.stat(directory).st_mtime]
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    times.append(entry.stat().st_ctime)
                except FileNotFoundError:       # removed meanwhile: the directory's mtime says so
                    pass
    except FileNotFoundError:
        return 0.0
    return max(times) + _FS_CLOCK_LAG


def _tail(path, size=3000):
    try:
        with open(path) as f:
            return "--- %s ---\n%s" % (path, f.read()[-size:])
    except OSError:
        return ""


def _venv_python():
    import sys
    return sys.executable


def _wait(predicate, timeout, what, on_timeout=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    detail = on_timeout() if on_timeout else ""
    raise TimeoutError("timed out after %ss waiting for %s\n%s" % (timeout, what, detail))


class CalicoCluster(Cluster):
    """A cluster in calico_lite mode: pure L3, no bridge and no overlay.

    etcd holds the calico-lite datastore; every node runs `podnet calico agent`
    (BGP speaker + kernel routes) and attaches pods with the `calico` CNI
    plugin (a veth and a /32 route per pod). With route_reflector=True one
    extra node runs the agent as a route reflector and the node-to-node mesh is
    off. With two underlay subnets, a router namespace joins them (nodes route
    everything else through it), and IPIP (`ipip`: always / cross-subnet /
    never) carries pod traffic between the subnets.
    """

    def __init__(self, lab, nodes=3, pool="10.65.0.0/16", block_size=26, ipip="cross-subnet",
                 route_reflector=True, subnets=("192.168.50.0/24",), hold_time=9, python=None,
                 reflector="agent", ready_timeout=40, graceful_restart_time=None, bird_debug=None):
        """reflector: what runs on the route-reflector node: "agent" (`podnet calico agent
        --role route-reflector`) or "bird" (BIRD 2 with the config calico_lite renders).
        graceful_restart_time: every agent's --graceful-restart-time (None: the agent's default;
        it is how long peers keep a killed agent's block). bird_debug: BIRD's `debug
        protocols` (e.g. "all": every route added or removed goes to its log)."""
        super().__init__(lab, nodes=nodes, network=pool, underlay=subnets[0], python=python)
        self.reflector = reflector
        self.graceful_restart_time = graceful_restart_time
        self.bird_debug = bird_debug
        self.agent_extra = {}       # node role -> the extra arguments its agent was started with
        self.ready_timeout = ready_timeout      # longer under emulation (the full-kernel lane)
        self.bird = None
        self.block_size = block_size
        self.ipip = ipip
        self.route_reflector = route_reflector
        self.hold_time = hold_time
        self.agents = {}            # node role -> Popen
        self.underlays = [self.underlay]
        self.gateways = [None]
        self.router = None
        if len(subnets) > 1:
            self.router = lab.namespace("router", ip_forward=True)
            self.gateways = []
            for i, subnet in enumerate(subnets):
                underlay = self.underlay if i == 0 else lab.underlay(subnet, name="underlay%d" % (i + 1))
                if i:
                    self.underlays.append(underlay)
                gateway = str(underlay.subnet.broadcast_address - 2)
                underlay.attach(self.router, gateway, "eth%d" % i)
                self.gateways.append(gateway)

    def network_config(self):
        return json.dumps({"asNumber": 64512, "nodeToNodeMesh": not self.route_reflector,
                           "ipipMode": self.ipip, "poolCIDR": self.network, "blockSize": self.block_size})

    def put_network_config(self, text=None):
        self.etcdctl("put", "/calico-lite/v1/config", text or self.network_config())

    def start_etcd(self):
        super().start_etcd()
        if self.router is not None:
            self.etcd_ns.ip("route", "add", "default", "via", self.gateways[0])

    def add_node(self, name, extra=(), subnet_index=0, role="node"):
        node = self._new_node(name, self.underlays[subnet_index], self.gateways[subnet_index])
        self.start_agent(node, role, extra)
        return node

    def start_agent(self, node, role="node", extra=()):
        argv = [self.python, "-m", "cli.main", "calico", "agent", "--etcd-endpoints", self.etcd_url,
                "--node-name", node.role, "--iface", node.underlay_if, "--role", role,
                "--blocks-file", self.blocks_file(node), "--hold-time", str(self.hold_time),
                "--route-grace", "2"]
        if self.graceful_restart_time is not None:
            argv += ["--graceful-restart-time", str(self.graceful_restart_time)]
        argv += list(extra)
        self.agent_extra[node.role] = list(extra)
        with open(self.agent_log(node), "a") as log:
            self.agents[node.role] = node.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=_SOURCE_ROOT,
                                                env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT))
        node.calico_role = role
        return self.agents[node.role]

    def stop_agent(self, node, sig=signal.SIGTERM, timeout=10):
        """Stop the node's agent with `sig` (by its pid, SIGTERM: as a service manager does;
        SIGKILL: a crash) and wait for it; routes stay in the kernel."""
        proc = self.agents.pop(node.role)
        if sig == signal.SIGTERM:
            _stop_one(node, proc, timeout)
            return
        os.kill(proc.pid, sig)
        proc.wait(timeout)
        if proc in node.processes:
            node.processes.remove(proc)

    def restart_agent(self, node, sig=signal.SIGTERM, timeout=10):
        """stop_agent, then the same agent again (same role and arguments)."""
        self.stop_agent(node, sig, timeout)
        return self.start_agent(node, getattr(node, "calico_role", "node"), self.agent_extra.get(node.role, ()))

    def agent_log(self, node):
        return os.path.join(self.node_dir(node), "calico-agent.log")

    def blocks_file(self, node):
        return os.path.join(self.node_dir(node), "blocks")

    def workers(self):
        return [n for n in self.nodes if getattr(n, "calico_role", "node") == "node"]

    def start(self):
        from cni.executable import install
        install(self.bin_dir, "/usr/bin/python3")
        self.start_etcd()
        self.put_network_config()
        if self.route_reflector and self.reflector == "agent":
            self.add_node("rr1", role="route-reflector")
        elif self.route_reflector:
            rr = self._new_node("rr1", self.underlays[0], self.gateways[0])
            rr.calico_role = "route-reflector"
            self.etcdctl("put", "/calico-lite/v1/nodes/rr1", json.dumps(
                {"ip": "%s/%d" % (rr.underlay_ip, self.underlay.subnet.prefixlen), "role": "route-reflector"}))
        for i in range(1, self.node_count + 1):
            self.add_node("node%d" % i, subnet_index=(i - 1) % len(self.underlays))
        if self.route_reflector and self.reflector == "bird":
            workers = self.workers()
            _wait(lambda: all(os.path.exists(self.blocks_file(n)) for n in workers), self.ready_timeout,
                  "every node to register and claim a block", self._logs)
            self.start_bird(next(n for n in self.nodes if n.role == "rr1"))
        self.wait_ready()
        return self

    def start_bird(self, node, recovery=False):
        """BIRD 2 on `node` with the configuration calico_lite renders for it from the datastore
        (recovery: `bird -R`, a graceful restart: R and F bits towards its peers)."""
        # rendered where etcd is reachable (its namespace), by the command operators use
        argv = [self.python, "-m", "cli.main", "calico", "bird-config", "--etcd-endpoints",
                "http://127.0.0.1:%d" % self.ETCD_PORT, "--node", node.role, "--iface", node.underlay_if]
        if self.bird_debug:
            argv += ["--debug-protocols", self.bird_debug]
        text = self.etcd_ns.run(argv, env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT)).stdout
        d = self.node_dir(node)
        conf, sock, pid = (os.path.join(d, n) for n in ("bird.conf", "bird.ctl", "bird.pid"))
        with open(conf, "w") as f:
            f.write(text)
        with open(os.path.join(d, "bird.log"), "a") as log:
            self.bird = node.popen(["bird", "-c", conf, "-s", sock, "-P", pid, "-f"] + (["-R"] if recovery else []),
                                   stdout=log, stderr=subprocess.STDOUT)
        self.bird_socket = sock
        return self.bird

    def restart_bird(self, down_for=0.0, timeout=10):
        """A graceful restart of BIRD: `birdc graceful restart` (its sessions close without a
        NOTIFICATION), `down_for` seconds without it, then `bird -R` with the configuration
        rendered again."""
        node = next(n for n in self.nodes if n.role == "rr1")
        proc = self.bird
        self.birdc("graceful", "restart")
        proc.wait(timeout)
        if proc in node.processes:
            node.processes.remove(proc)
        time.sleep(down_for)
        return self.start_bird(node, recovery=True)

    def birdc(self, *args):
        node = next(n for n in self.nodes if n.role == "rr1")
        return node.run(["birdc", "-s", self.bird_socket] + list(args), check=False).stdout

    def bird_log(self):
        node = next(n for n in self.nodes if n.role == "rr1")
        return os.path.join(self.node_dir(node), "bird.log")

    @staticmethod
    def bird_protocol(node):
        """The name of BIRD's BGP protocol for `node` when BIRD reflects (calico_lite.bird's naming)."""
        return "client_" + node.underlay_ip.replace(".", "_")

    def wait_ready(self, timeout=None):
        """Until every worker has its block and a route to every other worker's block."""
        timeout = timeout or self.ready_timeout
        workers = self.workers()
        _wait(lambda: all(os.path.exists(self.blocks_file(n)) for n in workers), timeout,
              "every node to claim a block", self._logs)
        _wait(lambda: all(len(self.routes_via_bgp(n)) >= len(workers) - 1 for n in workers), timeout,
              "every node to learn every other node's block over BGP", self._logs)

    def routes_via_bgp(self, node):
        """The node's routes installed by the agent from BGP (not its own blackholes)."""
        return [r for r in node.ip_json("route", "show", "proto", "78") if r.get("type") != "blackhole"]

    def conflist(self, node):
        d = self.node_dir(node)
        mtu = 1500 - 20 if self.ipip != "never" else 1500
        return {"name": "k8s-pod-network", "cniVersion": "1.0.0", "plugins": [
            {"type": "calico", "mtu": mtu, "nodeBlocksFile": self.blocks_file(node),
             "ipam": {"type": "host-local", "subnet": "useNodeBlock", "dataDir": os.path.join(d, "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}

    def _logs(self):
        text = []
        for node in self.nodes:
            path = self.agent_log(node)
            if os.path.exists(path):
                with open(path) as f:
                    text.append("--- %s calico-agent.log ---\n%s" % (node.role, f.read()[-3000:]))
        return "\n".join(text)


class KubeFlannelCluster(Cluster):
    """A flannel cluster in Kubernetes mode: `flanneld --kube-subnet-mgr` on every node,
    against an API server at `api_url` (no etcd). Each node's NODE_NAME is its role, its
    net-conf.json (the kube-flannel-cfg ConfigMap's net-conf.json) is network_config() in
    its directory. The API server is the caller's: give it a namespace on the underlay
    with api_namespace(), serve there, then set api_url (or pass --kubeconfig-file in
    flanneld_args), and create each node's Node object (with its podCIDR) before start()."""

    API_PORT = 6443

    def __init__(self, lab, api_url=None, **kw):
        super().__init__(lab, **kw)
        self.api_url = api_url
        self.api_ns = None
        self.api_ip = None

    def api_namespace(self):
        """(namespace, address) for the API server: on the underlay, the last address but one."""
        self.api_ns = self.lab.namespace("apiserver")
        self.api_ip = str(self.underlay.subnet.broadcast_address - 2)
        self.underlay.attach(self.api_ns, self.api_ip)
        return self.api_ns, self.api_ip

    def net_conf_path(self, node):
        return os.path.join(self.node_dir(node), "net-conf.json")

    def start_flanneld(self, node, extra=()):
        with open(self.net_conf_path(node), "w") as f:
            f.write(self.network_config())
        argv = [self.python, "-m", "flanneld.daemon", "--kube-subnet-mgr",
                "--net-config-path", self.net_conf_path(node), "--subnet-file", self.subnet_file(node)]
        if self.api_url:
            argv += ["--kube-api-url", self.api_url]
        argv += self.flanneld_args + list(extra)
        if not any(a.startswith("--iface") for a in argv):
            argv += ["--iface", node.underlay_if]
        if self.ip_masq:
            argv.append("--ip-masq")
        env = dict(os.environ, PYTHONPATH=_SOURCE_ROOT, NODE_NAME=node.role)
        with open(self.flanneld_log(node), "a") as log:
            self.flanneld[node.role] = node.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=_SOURCE_ROOT,
                                                  env=env)
        return self.flanneld[node.role]

    def start(self):
        from cni.executable import install
        install(self.bin_dir, "/usr/bin/python3")
        for i in range(1, self.node_count + 1):
            self.add_node("node%d" % i)
        self.wait_ready()
        return self
