"""The image runs the cluster: podnet's daemons as podman containers from localhost/podnet:<version>.

A two-node flannel (vxlan) lab cluster (lab/cluster.py, etcd in its own namespace as the lab runs
it) in which every podnet daemon and CNI plugin on the nodes comes from the image `./dev image`
builds (deploy/image.sh), each daemon a container started as its DaemonSet's pod would be:

- the init step: `podnet install-cni --copy-code` with the node's CNI directories bind-mounted at
  their own paths (hostPath), writing the plugin executables, the code they run and the conflist
  (the stand-in for the kube-flannel-cfg ConfigMap's cni-conf.json, mounted read-only);
- flanneld: `--network ns:/run/netns/<node>` (hostNetwork), no capability but NET_ADMIN and
  NET_RAW (deploy/podnet-flannel.yaml adds those two to the default set), the node's directory
  as /run/flannel;
- kube-proxy (iptables mode): the same two capabilities; the NetworkPolicy agent: privileged, as
  the manifest has it (it turns br_netfilter's sysctls on); both read a manifests directory (the
  stand-in for the API server: none can run here) mounted read-only.

Pods are attached as the node's runtime would: the lab's add_pod (libcni's part, run from this
tree) with the node's own CNI directories, so the ADD runs the executables and code the image
installed, on the host's python3; the pods' echo servers are the workload, also from this tree. Traffic is real: pings across nodes, HTTP through a ClusterIP Service, a NetworkPolicy
that drops. Every container is removed by ID however the test ends.

Skipped when podman is missing or the image is missing or older than the tree (`deploy/image.sh
--check`); PODNET_IMAGE_TEST=1 builds it first (`./dev image`: 40 s from nothing, 5 s when only
podnet's code changed, under a second when nothing did).
"""
import json
import os
import resource
import shutil
import subprocess
import time

import pytest

import podnet
from lab import manifests as k8s
from lab.cluster import _SOURCE_ROOT, Cluster, Lab, pid_alive, stale_pattern

from helpers import allocation_files, requires_etcd, wait_until

pytestmark = requires_etcd

IMAGE = "localhost/podnet:%s" % podnet.__version__
PODMAN = shutil.which("podman")
TIMEOUT = 30
SERVICE_IP, SERVICE_PORT, ECHO_PORT = "10.96.0.10", 80, 8080
XTABLES_LOCK = "/run/xtables.lock"


def _podman(*args, timeout=60, check=True):
    proc = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError("podman %s: exit %d\n%s%s" % (" ".join(args), proc.returncode, proc.stdout, proc.stderr))
    return proc


def _image_exists():
    return _podman("image", "exists", IMAGE, check=False).returncode == 0


def _remove_stale_containers():
    """Containers an earlier run of this test left (named after its lab, its pid dead: killed)."""
    pattern = stale_pattern()
    for line in _podman("ps", "--all", "--format", "{{.ID}} {{.Names}}").stdout.splitlines():
        cid, _, name = line.partition(" ")
        match = pattern.match(name)
        if match and not pid_alive(int(match.group(1))):
            _podman("rm", "--force", "--time", "5", cid)


@pytest.fixture(scope="module")
def image():
    global PODMAN
    if os.environ.get("PODNET_IMAGE_TEST") == "1":
        # idempotent: installs podman and its kin, builds what is missing or stale (a second or two
        # when nothing changed)
        build = subprocess.run([os.path.join(_SOURCE_ROOT, "dev"), "image"], capture_output=True, text=True,
                               timeout=1200)
        assert build.returncode == 0, "./dev image failed:\n%s%s" % (build.stdout, build.stderr[-4000:])
        PODMAN = shutil.which("podman")
        assert PODMAN, "./dev image left no podman"
    elif PODMAN is None:
        pytest.skip("podman is not installed (./dev image installs it and builds %s)" % IMAGE)
    elif not _image_exists():
        pytest.skip("image %s is not built: run ./dev image (or set PODNET_IMAGE_TEST=1 to build it here)" % IMAGE)
    else:
        # an image of older code would test that code, not this tree's
        check = subprocess.run([os.path.join(_SOURCE_ROOT, "deploy", "image.sh"), "--check"], capture_output=True,
                               text=True, timeout=120)
        if check.returncode != 0:
            pytest.skip("image %s is not built from this tree as it is now: run ./dev image (or set "
                        "PODNET_IMAGE_TEST=1 to build it here)\n%s%s" % (IMAGE, check.stdout, check.stderr))
    _remove_stale_containers()
    return IMAGE


class Containers:
    """The podman containers this test made, by ID: remove_all() removes every one of them.

    Limits are explicit and no higher than this process's: podman's default RLIMIT_NOFILE
    (1048576) needs CAP_SYS_RESOURCE, which root lacks on some machines (this one included).
    """

    def __init__(self, image, prefix):
        self.image, self.prefix = image, prefix
        self.ids = []
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.limits = ["--ulimit", "nproc=4096:4096"]
        if nofile != resource.RLIM_INFINITY:
            self.limits += ["--ulimit", "nofile=%d:%d" % (nofile, nofile)]

    def create(self, name, netns, args, mounts=(), privileged=False, log=None):
        """A container of the image in network namespace `netns` (a path); its ID. mounts:
        (host path, container path, "ro" | "rw")."""
        argv = ["create", "--pull=never", "--name", "%s-%s" % (self.prefix, name), "--network", "ns:" + netns,
                *self.limits]
        argv += ["--privileged"] if privileged else ["--cap-drop", "all", "--cap-add", "NET_ADMIN,NET_RAW"]
        for src, dst, mode in mounts:
            argv += ["--mount", "type=bind,src=%s,dst=%s%s" % (src, dst, ",ro" if mode == "ro" else "")]
        if log:
            argv += ["--log-driver", "k8s-file", "--log-opt", "path=%s" % log]
        cid = _podman(*argv, self.image, *args).stdout.strip()
        self.ids.append(cid)
        return cid

    def start(self, cid):
        _podman("start", cid)

    def run(self, name, netns, args, mounts=(), timeout=60):
        """Create, run to completion (attached) and remove; its CompletedProcess."""
        cid = self.create(name, netns, args, mounts)
        proc = _podman("start", "--attach", cid, timeout=timeout, check=False)
        self.remove(cid)
        return proc

    def state(self, cid):
        return json.loads(_podman("inspect", "--format", "{{json .State}}", cid).stdout)

    def restart(self, cid):
        _podman("restart", "--time", "10", cid, timeout=60)

    def remove(self, cid):
        _podman("rm", "--force", "--time", "5", cid, timeout=60)
        self.ids.remove(cid)

    def remove_all(self):
        errors = []
        for cid in list(self.ids):
            try:
                self.remove(cid)
            except Exception as e:      # keep going: remove every other one
                errors.append("%s: %s" % (cid[:12], e))
        assert not errors, "containers not removed:\n" + "\n".join(errors)


class ImageCluster(Cluster):
    """Cluster whose node daemons and CNI install come from the image (see the module's doc)."""

    def __init__(self, lab, containers, **kw):
        super().__init__(lab, nodes=2, backend="vxlan", **kw)
        self.containers = containers
        self.flanneld_ids, self.kube_proxy_ids, self.network_policy_ids = {}, {}, {}    # node role -> ID

    # the node's own CNI directories, as /opt/cni/bin and /etc/cni/net.d would be on a real node
    def cni_bin(self, node):
        return os.path.join(self.node_dir(node), "opt-cni-bin")

    def cni_conf_dir(self, node):
        return os.path.join(self.node_dir(node), "etc-cni-net.d")

    def conflist_path(self, node):
        return os.path.join(self.cni_conf_dir(node), "10-flannel.conflist")

    def write_conflist(self, node):
        return self.conflist_path(node)     # installed by install_cni, never rewritten by the lab

    @staticmethod
    def _xtables_lock():
        """The host's iptables lock shared as the manifests share it (iptables-nft takes none: it may be absent)."""
        return [(XTABLES_LOCK, XTABLES_LOCK, "rw")] if os.path.exists(XTABLES_LOCK) else []

    def install_cni(self, node):
        """The init containers' step: executables, their code and the conflist onto the node."""
        cfg = os.path.join(self.node_dir(node), "kube-flannel-cfg")
        os.makedirs(cfg, exist_ok=True)
        with open(os.path.join(cfg, "cni-conf.json"), "w") as f:
            json.dump(self.conflist(node), f)
        for d in (self.cni_bin(node), self.cni_conf_dir(node)):
            os.makedirs(d, exist_ok=True)
        proc = self.containers.run(
            "%s-install-cni" % node.role, node.path,
            ["install-cni", "--dest", self.cni_bin(node), "--copy-code",
             "--conflist-src", "/etc/kube-flannel/cni-conf.json", "--conflist-dest", self.conflist_path(node)],
            mounts=[(cfg, "/etc/kube-flannel", "ro"), (self.cni_bin(node), self.cni_bin(node), "rw"),
                    (self.cni_conf_dir(node), self.cni_conf_dir(node), "rw")])
        assert proc.returncode == 0, "install-cni on %s:\n%s%s" % (node.role, proc.stdout, proc.stderr)
        return proc

    def start_flanneld(self, node, extra=()):
        args = ["flanneld", "--etcd-endpoints", self.etcd_url, "--iface", node.underlay_if] \
            + self.flanneld_args + list(extra) + (["--ip-masq"] if self.ip_masq else [])
        cid = self.containers.create("%s-flanneld" % node.role, node.path, args,
                                     mounts=[(self.node_dir(node), "/run/flannel", "rw")] + self._xtables_lock(),
                                     log=self.flanneld_log(node))
        self.containers.start(cid)
        self.flanneld_ids[node.role] = cid
        return cid

    def start_kube_proxy(self, node, manifests, extra=()):
        args = ["kube-proxy", "--manifests", manifests, "--manifests-interval", "0.2", "--hostname-override",
                node.role, "--cluster-cidr", self.network, "--min-sync-period", "0.2"] + list(extra)
        cid = self.containers.create("%s-kube-proxy" % node.role, node.path, args,
                                     mounts=[(manifests, manifests, "ro")] + self._xtables_lock(),
                                     log=self.kube_proxy_log(node))
        self.containers.start(cid)
        self.kube_proxy_ids[node.role] = cid
        return cid

    def start_network_policy(self, node, manifests, extra=()):
        args = ["network-policy", "--manifests", manifests, "--manifests-interval", "0.2", "--hostname-override",
                node.role, "--min-sync-period", "0.2"] + list(extra)
        self.network_policy_manifests[node.role] = manifests
        cid = self.containers.create("%s-network-policy" % node.role, node.path, args, privileged=True,
                                     mounts=[(manifests, manifests, "ro")], log=self.network_policy_log(node))
        self.containers.start(cid)
        self.network_policy_ids[node.role] = cid
        return cid

    def start(self):
        self.start_etcd()
        self.put_network_config()
        for i in range(1, self.node_count + 1):
            node = self._new_node("node%d" % i, self.underlay)
            self.install_cni(node)
            self.start_flanneld(node)
        self.wait_ready()
        return self


def _has_network_policy_agent():
    return os.path.exists(os.path.join(_SOURCE_ROOT, "network_policy", "server.py"))


class Env:
    pass


@pytest.fixture(scope="module")
def env(image, netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        containers = Containers(image, lab.prefix)
        try:
            e = Env()
            e.lab, e.containers = lab, containers
            e.cluster = cluster = ImageCluster(lab, containers).start()
            e.node1, e.node2 = cluster.nodes
            e.a = cluster.add_pod(e.node1, "a")
            e.b = cluster.add_pod(e.node2, "b")
            e.veths_node1 = veths(e.node1)
            for pod in (e.a, e.b):
                cluster.start_echo(pod, port=ECHO_PORT)
            e.manifests = os.path.join(lab.workdir, "manifests")        # kube-proxy's
            e.netpol = os.path.join(lab.workdir, "netpol")              # the NetworkPolicy agent's
            http = [("http", ECHO_PORT, "TCP")]
            k8s.write(e.manifests, "web.json",
                      k8s.service("web", SERVICE_IP, [{"name": "http", "port": SERVICE_PORT, "targetPort": ECHO_PORT}]),
                      k8s.endpoint_slice("web", [(e.a.ip, "node1"), (e.b.ip, "node2")],
                                         [{"name": "http", "port": ECHO_PORT}]))
            default_ns = {"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}
            k8s.write(e.netpol, "pods.json", default_ns,
                      cluster.pod_manifest(e.a, labels={"app": "a"}, ports=http),
                      cluster.pod_manifest(e.b, labels={"app": "b"}, ports=http))
            for node in cluster.nodes:
                cluster.start_kube_proxy(node, e.manifests)
                if _has_network_policy_agent():
                    cluster.start_network_policy(node, e.netpol)
            yield e
        finally:
            containers.remove_all()
    assert _podman("ps", "--all", "--quiet", "--filter", "name=^%s-" % lab.prefix).stdout.strip() == ""


def veths(node):
    return {link for link in node.link_names() if link.startswith("veth")}


def get(e, ns, url, count=1, timeout=2.0):
    return e.cluster.echo(ns, "get", url, "--count", count, "--timeout", timeout)


def test_install_cni_from_the_image_puts_plugins_code_and_conflist_on_the_node(env):
    for node in env.cluster.nodes:
        bin_dir = env.cluster.cni_bin(node)
        with open(os.path.join(bin_dir, "flannel")) as f:
            head = f.read()
        # run by the host's interpreter, from the code copied next to the executables: not the image's tree
        assert head.startswith("#!/usr/bin/python3 -IS\n"), head
        assert os.path.join(bin_dir, ".podnet") in head and "/opt/podnet" not in head, head
        for name in ("bridge", "host-local", "portmap", "loopback", "flannel"):
            assert os.access(os.path.join(bin_dir, name), os.X_OK), name
        with open(env.cluster.conflist_path(node)) as f:
            assert json.load(f) == env.cluster.conflist(node)
        # a rerun of the init step (a restarted pod) writes nothing
        mtime = os.stat(env.cluster.conflist_path(node)).st_mtime_ns
        out = env.cluster.install_cni(node).stdout
        assert "wrote" not in out and "unchanged %s" % env.cluster.conflist_path(node) in out, out
        assert os.stat(env.cluster.conflist_path(node)).st_mtime_ns == mtime


def test_daemons_run_as_containers_of_the_image(env):
    image_id = _podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    ids = list(env.cluster.flanneld_ids.values()) + list(env.cluster.kube_proxy_ids.values()) \
        + list(env.cluster.network_policy_ids.values())
    for cid in ids:
        assert env.containers.state(cid)["Running"], cid
        assert _podman("inspect", "--format", "{{.Image}}", cid).stdout.strip() == image_id
    for node in env.cluster.nodes:
        # the VTEP the containerised flanneld made lives in the node's namespace
        assert "flannel.1" in node.link_names()
        assert os.path.exists(env.cluster.subnet_file(node))


def test_pods_reach_each_other_across_nodes(env):
    matrix = env.cluster.ping_matrix()
    assert all(matrix.values()), matrix


def test_a_pod_comes_and_goes_through_the_installed_plugins(env):
    ipam = os.path.join(env.cluster.node_dir(env.node1), "ipam")
    before = allocation_files(ipam, "cbr0")
    pod = env.cluster.add_pod(env.node1, "c")
    assert pod.ip in allocation_files(ipam, "cbr0")
    assert len(veths(env.node1) - env.veths_node1) == 1
    r = env.b.ns.run(["ping", "-c", "1", "-W", "2", "-q", pod.ip], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    env.cluster.remove_pod(pod)
    assert allocation_files(ipam, "cbr0") == before
    assert veths(env.node1) == env.veths_node1


def test_cluster_ip_service_through_kube_proxy_in_a_container(env):
    url = "%s:%d" % (SERVICE_IP, SERVICE_PORT)
    for client in (env.a, env.b):       # each client's own node's kube-proxy DNATs its connections
        wait_until(lambda c=client: get(env, c.ns, url)["answers"], TIMEOUT,
                   "kube-proxy's rules for %s on %s" % (url, client.node.role))
    for client in (env.a, env.b):
        out = get(env, client.ns, url, count=40)
        assert out["errors"] == {} and set(out["answers"]) == {"a", "b"}, out
    for node in env.cluster.nodes:      # kube-proxy's own /healthz, in the node's namespace
        r = node.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:10256/healthz"],
                     check=False)
        assert r.stdout == "200", r


@pytest.mark.skipif(not _has_network_policy_agent(), reason="network_policy/server.py does not exist yet")
def test_network_policy_agent_in_a_container_drops_and_allows(env):
    c = env.cluster
    for node in c.nodes:
        wait_until(lambda n=node: c.network_policy_get(n, "/readyz")[0] == 200, TIMEOUT,
                   "the NetworkPolicy agent on %s to be ready" % node.role)
    url_b = "%s:%d" % (env.b.ip, ECHO_PORT)
    assert get(env, env.a.ns, url_b)["answers"] == {"b": 1}
    k8s.write(env.netpol, "policy.json", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-isolated", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}})
    try:
        since = time.time()
        for node in c.nodes:
            c.wait_network_policy(node, since)
        out = get(env, env.a.ns, url_b, timeout=1.0)
        assert out["answers"] == {}, out
        out = get(env, env.b.ns, "%s:%d" % (env.a.ip, ECHO_PORT))       # a is not isolated
        assert out["answers"] == {"a": 1}, out
    finally:
        k8s.remove(env.netpol, "policy.json")
        since = time.time()
        for node in c.nodes:
            c.wait_network_policy(node, since)
    assert get(env, env.a.ns, url_b)["answers"] == {"b": 1}


def test_a_restarted_flanneld_container_leaves_traffic_alone(env):
    cid = env.cluster.flanneld_ids["node2"]
    started = env.containers.state(cid)["StartedAt"]
    pinger = env.a.ns.popen(["ping", "-i", "0.05", "-c", "100", "-q", env.b.ip], stdout=subprocess.PIPE, text=True)
    env.containers.restart(cid)
    state = env.containers.state(cid)
    assert state["Running"] and state["StartedAt"] != started, state
    out, _ = pinger.communicate(timeout=30)
    env.a.ns.processes.remove(pinger)
    assert " 0% packet loss" in out, out
    assert all(env.cluster.ping_matrix().values())
