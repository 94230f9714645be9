"""`podnet cleanup` leaves a node exactly as a fresh one.

A flannel cluster (vxlan; --ip-masq on node1, the bridge's per-pod masquerade on node2)
whose nodes ran everything podnet has: the CNI
plugins installed by `podnet install-cni --copy-code` with the conflist step, pods
attached through them (one with a host port: portmap's chains), kube-proxy (iptables
mode on node1, nftables mode on node2: a proxy removes the other modes' rules as it
starts, so one node cannot hold both), the NetworkPolicy agent with a policy; and a
calico_lite cluster (routes of protocol 78, the block's blackhole, cali veths). Then
a crash: the daemons stop and the pods' namespaces are deleted without any CNI DEL.
`podnet cleanup`, run inside the node with the node's directories, must bring the node
to the state of a fresh node on the same underlay that ran nothing: links,
addresses, routes, `iptables-save`/`ip6tables-save` (counters aside), `nft list
ruleset`, and the files under the node's directories, with the node's own address
and link-local addresses (MAC-derived) written as placeholders.
"""
import json
import os
import re
import subprocess

import pytest

from lab import manifests as k8s
from lab.cluster import _SOURCE_ROOT, CalicoCluster, Cluster

from helpers import wait_until

PYTHON_ENV = dict(os.environ, PYTHONPATH=_SOURCE_ROOT)
# what a node has before any CNI is installed: the directories kubelet's and the runtime's packages make
SKELETON = ("opt/cni/bin", "etc/cni/net.d", "var/lib/cni", "run")
TIMEOUT = 30


def root_of(lab, node):
    return os.path.join(lab.workdir, "roots", node.role)


def make_skeleton(root):
    for d in SKELETON:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    return root


def paths(root):
    """The node's CNI directories and daemon files, under its root."""
    return {"bin": os.path.join(root, "opt/cni/bin"), "netd": os.path.join(root, "etc/cni/net.d"),
            "cache": os.path.join(root, "var/lib/cni"), "ipam": os.path.join(root, "var/lib/cni/networks"),
            "flannel": os.path.join(root, "var/lib/cni/flannel"),
            "subnet": os.path.join(root, "run/flannel/subnet.env"),
            "blocks": os.path.join(root, "run/calico-lite/blocks")}


def cleanup_argv(python, root, *extra):
    p = paths(root)
    return [python, "-m", "cli.main", "cleanup", "--cni-bin-dir", p["bin"], "--cni-cache-dir", p["cache"],
            "--ipam-data-dir", p["ipam"], "--flannel-data-dir", p["flannel"], "--subnet-file", p["subnet"],
            "--blocks-file", p["blocks"]] + list(extra)


def install_cni(node, python, root, conflist, name):
    p = paths(root)
    src = os.path.join(root, "..", "%s-cni-conf.json" % node.role)
    with open(src, "w") as f:
        json.dump(conflist, f)
    node.run([python, "-m", "cli.main", "install-cni", "--dest", p["bin"], "--copy-code",
              "--conflist-src", src, "--conflist-dest", os.path.join(p["netd"], name)], env=PYTHON_ENV)
    return os.path.join(p["netd"], name)


def add_pod(cluster, node, root, conf_path, name, port_mappings=None):
    p = paths(root)
    ns = cluster.lab.pod_netns(name)
    argv = [cluster.python, "-m", "cli.main", "cni", "add", ns.path, "--conflist", conf_path,
            "--container-id", "%s-%s" % (cluster.lab.prefix, name), "--cni-path", p["bin"], "--cache-dir", p["cache"]]
    if port_mappings:
        argv += ["--cap-args", json.dumps({"portMappings": port_mappings})]
    result = json.loads(node.run(argv, env=PYTHON_ENV).stdout)
    return ns, result["ips"][0]["address"].split("/")[0]


def crash_pods(pods):
    """The pods' containers gone as in a crash: their namespaces deleted, no CNI DEL ran."""
    for ns in pods:
        subprocess.run(["ip", "netns", "delete", ns.name], check=True, timeout=30)


def fresh_node(cluster, name, gateway=None):
    """A node on the same underlay that never ran anything of podnet (as Cluster._new_node
    makes them, not joined to the cluster)."""
    node = cluster.lab.node(name, cluster.underlay, ip_forward=True)
    node.ip("route", "add", "default", *(["via", gateway] if gateway else ["dev", node.underlay_if]))
    return node


def settled_state(node, root):
    """state() once duplicate address detection is over (until then the link-local address
    has no local route yet)."""
    wait_until(lambda: not node.run(["ip", "-6", "addr", "show", "tentative"]).stdout.strip(), TIMEOUT,
               "DAD to finish on " + node.role)
    return state(node, root)


# ---- the node's state, comparable between nodes ----------------------------------------------

LINK_LOCAL = re.compile(r"fe80::[0-9a-f:]+")
COUNTERS = re.compile(r"\[\d+:\d+\]")


def state(node, root):
    def norm(text):
        return LINK_LOCAL.sub("fe80::LL", re.sub(r"(?<![\d.])%s(?![\d.])" % re.escape(node.underlay_ip), "NODE_IP",
                                                  text))

    links = sorted((link["ifname"], link.get("linkinfo", {}).get("info_kind", ""), link["mtu"],
                    tuple(sorted(f for f in link["flags"] if f != "LOWER_UP")), link.get("master", ""))
                   for link in node.ip_json("-d", "link", "show"))
    addresses = sorted((a["ifname"], i["family"], norm(i["local"]), i["prefixlen"])
                       for a in node.ip_json("addr", "show") for i in a.get("addr_info", []))
    routes = {f: sorted(norm(line) for line in node.run(["ip", f, "route", "show", "table", "all"]).stdout.splitlines())
              for f in ("-4", "-6")}
    rules = {tool: [COUNTERS.sub("[0:0]", line) for line in node.run([tool]).stdout.splitlines()
                    if not line.startswith("#")]
             for tool in ("iptables-save", "ip6tables-save")}
    ruleset = node.run(["nft", "list", "ruleset"]).stdout
    files = sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)
    return {"links": links, "addresses": addresses, "routes": routes, "iptables": rules, "nft": ruleset,
            "files": files}


def assert_same(cleaned, fresh):
    for key in fresh:
        assert cleaned[key] == fresh[key], "%s differs after cleanup:\ncleaned: %s\nfresh:   %s" % (
            key, cleaned[key], fresh[key])


def run_cleanup(node, python, root, *extra):
    return node.run(cleanup_argv(python, root, *extra), check=False, env=PYTHON_ENV, timeout=120)


# ---- flannel mode -------------------------------------------------------------------------------

class RootedCluster(Cluster):
    """Cluster with each node's flannel files where a real node keeps them, under the node's root.
    node2's flanneld runs without --ip-masq, so there the bridge plugin masquerades for each pod
    (a CNI-<hash> chain per pod, as with flanneld's --ip-masq=false)."""

    def start_flanneld(self, node, extra=()):
        self.ip_masq = node.role != "node2"
        return super().start_flanneld(node, extra)

    def subnet_file(self, node):
        path = paths(root_of(self.lab, node))["subnet"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def flannel_conflist(self, node):
        p = paths(root_of(self.lab, node))
        return {"name": "cbr0", "cniVersion": "1.0.0", "plugins": [
            {"type": "flannel", "subnetFile": p["subnet"], "dataDir": p["flannel"],
             "delegate": {"hairpinMode": True, "isDefaultGateway": True}, "ipam": {"dataDir": p["ipam"]}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}


def node_policy_objects(cluster, node, pods):
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "deny-web", "namespace": "default"},
              "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {}}}
    objs = [policy, namespace]
    for i, (_ns, ip) in enumerate(pods):
        objs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p%d" % i, "namespace": "default",
                                                                      "labels": {"app": "web"}},
                     "spec": {"nodeName": node.role, "containers": [{"name": "c", "image": "x"}]},
                     "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    return objs


def test_cleanup_of_a_flannel_node_with_every_component(lab):
    cluster = RootedCluster(lab, nodes=2)
    for i in (1, 2):
        make_skeleton(os.path.join(lab.workdir, "roots", "node%d" % i))
    cluster.start()
    fresh = fresh_node(cluster, "fresh")
    fresh_root = make_skeleton(os.path.join(lab.workdir, "roots", "fresh"))
    fresh_state = settled_state(fresh, fresh_root)

    pods = {}
    for node, mode in zip(cluster.nodes, ("iptables", "nftables")):
        root = root_of(lab, node)
        conf = install_cni(node, cluster.python, root, cluster.flannel_conflist(node), "10-flannel.conflist")
        pods[node.role] = [add_pod(cluster, node, root, conf, "%s-a" % node.role),
                           add_pod(cluster, node, root, conf, "%s-b" % node.role,
                                   [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])]
        manifests = os.path.join(lab.workdir, "manifests-" + node.role)
        (_, ip_a), _ = pods[node.role]
        k8s.write(manifests, "svc.json",
                  k8s.service("web", "10.96.0.10", [{"name": "http", "port": 80, "targetPort": 80,
                                                     "nodePort": 30080}], type="NodePort"),
                  k8s.endpoint_slice("web", [(ip_a, node.role)], [{"name": "http", "port": 80}]),
                  *node_policy_objects(cluster, node, pods[node.role]))
        cluster.start_kube_proxy(node, manifests, ["--proxy-mode", mode])
        cluster.start_network_policy(node, manifests)
    node1, node2 = cluster.nodes
    wait_until(lambda: "KUBE-SVC-" in node1.run(["iptables-save", "-t", "nat"]).stdout, TIMEOUT,
               "kube-proxy's iptables rules on node1")
    wait_until(lambda: "service-" in node2.run(["nft", "list", "table", "ip", "kube-proxy"], check=False).stdout,
               TIMEOUT, "kube-proxy's nftables rules on node2")
    for node in cluster.nodes:
        wait_until(lambda n=node: "deny-web" in n.run(["nft", "list", "table", "inet", "podnet-network-policy"],
                                                      check=False).stdout, TIMEOUT, "the policy on " + node.role)
    for node in cluster.nodes:
        wait_until(lambda n=node: n.run(["ip", "route", "show", "proto", "77"]).stdout.strip(), TIMEOUT,
                   "flanneld's route to the other node on " + node.role)
    before = {n.role: state(n, root_of(lab, n)) for n in cluster.nodes}
    assert any(link[0] == "flannel.1" for link in before["node1"]["links"])
    assert any("CNI-HOSTPORT-DNAT" in line for line in before["node1"]["iptables"]["iptables-save"])
    assert any("FLANNEL-POSTRTG" in line for line in before["node1"]["iptables"]["iptables-save"])
    masq_jumps = [line for line in before["node2"]["iptables"]["iptables-save"]
                  if line.startswith("-A POSTROUTING") and "-j CNI-" in line and "HOSTPORT" not in line]
    assert len(masq_jumps) == 2, before["node2"]["iptables"]["iptables-save"]

    for node in cluster.nodes:          # the crash: daemons gone, pods gone without DEL
        cluster.stop_kube_proxy(node)
        cluster.stop_network_policy(node)
        cluster.stop_flanneld(node)
        crash_pods(ns for ns, _ in pods[node.role])

    for node in cluster.nodes:
        root = root_of(lab, node)
        dry = run_cleanup(node, cluster.python, root, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        for expected in ("link flannel.1 (vxlan)", "link cni0 (bridge)", "iptables filter chain FLANNEL-FWD",
                         "iptables nat chain CNI-HOSTPORT-DNAT", "nft table inet podnet-network-policy",
                         "proto 77 (flanneld)", "file %s" % paths(root)["subnet"],
                         "file %s" % os.path.join(paths(root)["netd"], "10-flannel.conflist"),
                         "file %s" % os.path.join(paths(root)["ipam"], "cbr0")):
            assert expected in dry.stdout, (node.role, expected, dry.stdout)
        assert ("iptables nat chain FLANNEL-POSTRTG" in dry.stdout) == (node is node1)
        bridge_masq = [line for line in dry.stdout.splitlines() if re.match(r"would remove iptables nat chain "
                                                                           r"CNI-[0-9a-f]{24}$", line)]
        assert len(bridge_masq) == (2 if node is node2 else 0), dry.stdout
        assert ("iptables nat chain KUBE-SERVICES" in dry.stdout) == (node is node1)
        assert ("nft table ip kube-proxy" in dry.stdout) == (node is node2)
        assert os.path.exists(paths(root)["subnet"]), "--dry-run removed something"

        done = run_cleanup(node, cluster.python, root)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "removed link flannel.1 (vxlan)" in done.stdout and "removed file" in done.stdout
        assert_same(settled_state(node, root), fresh_state)
        again = run_cleanup(node, cluster.python, root)
        assert again.returncode == 0 and "removed" not in again.stdout, again.stdout
    assert state(fresh, fresh_root) == fresh_state


# ---- calico mode ---------------------------------------------------------------------------------

class RootedCalicoCluster(CalicoCluster):
    def blocks_file(self, node):
        path = paths(root_of(self.lab, node))["blocks"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def calico_conflist(self, node):
        conf = self.conflist(node)
        conf["plugins"][0]["ipam"]["dataDir"] = paths(root_of(self.lab, node))["ipam"]
        return conf


def test_cleanup_of_a_calico_node(lab):
    cluster = RootedCalicoCluster(lab, nodes=2, route_reflector=False, ipip="never")
    for i in (1, 2):
        make_skeleton(os.path.join(lab.workdir, "roots", "node%d" % i))
    cluster.start()
    fresh = fresh_node(cluster, "fresh", cluster.gateways[0])
    fresh_root = make_skeleton(os.path.join(lab.workdir, "roots", "fresh"))
    fresh_state = settled_state(fresh, fresh_root)
    node1 = cluster.nodes[0]
    root = root_of(lab, node1)
    conf = install_cni(node1, cluster.python, root, cluster.calico_conflist(node1), "10-calico.conflist")
    pods = [add_pod(cluster, node1, root, conf, "c-a"),
            add_pod(cluster, node1, root, conf, "c-b", [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])]
    routes = node1.run(["ip", "route", "show", "proto", "78"]).stdout
    assert "blackhole" in routes and len(routes.splitlines()) >= 2, routes
    assert sum(1 for link in node1.link_names() if link.startswith("cali")) == 2
    cluster.stop_agent(node1)
    crash_pods([ns for ns, _ in pods])

    done = run_cleanup(node1, cluster.python, root)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "proto 78 (calico-lite)" in done.stdout and "removed file %s" % paths(root)["blocks"] in done.stdout
    assert_same(settled_state(node1, root), fresh_state)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
