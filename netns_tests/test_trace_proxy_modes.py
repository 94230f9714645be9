"""`podnet trace` and `podnet doctor` read kube-proxy's rules in the mode it runs in.

nftables (this kernel): a two-node flannel vxlan lab, pods a, b on node1 and c on node2 (echo
servers on 8080), `podnet kube-proxy --proxy-mode nftables` on node1 reading a manifests
directory, Service default/web (10.96.0.30:80 -> c:8080). With no fault the trace from a is
delivered through the nftables table; then kube-proxy is stopped (its table stays, as on a node
whose daemon died) and the endpoint moves to b: trace stops at the kube-proxy-rules hop naming
c's address and the exact nft rule, and doctor reports kube-proxy-stale-endpoint.

IPVS (`fullkernel`: this kernel has no ip_vs): a node namespace holding a virtual server for
tests/test_trace_unit.py's Service, read back by the snapshot over netlink, and that
snapshot's virtual servers traced as node1's with the endpoint moved away.
"""
import json
import os
import sys

import pytest

from kube_proxy.nftables import endpoint_chain
from lab import manifests as k8s
from lab.cluster import _SOURCE_ROOT, Cluster, Lab
from podnet.kube.endpointslices import Endpoint, ServicePortName

from helpers import wait_until

CLUSTER_IP = "10.96.0.30"
WEB = ServicePortName("default", "web", "", "TCP")


def web(pod):
    return [k8s.service("web", CLUSTER_IP, [{"port": 80, "targetPort": 8080}]),
            k8s.endpoint_slice("web", [(pod.ip, pod.node.role)], [{"port": 8080}])]


class Env:
    pass


@pytest.fixture(scope="module")
def env(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    with Lab() as lab:
        cluster = Cluster(lab, nodes=2).start()
        e = Env()
        e.lab, e.cluster = lab, cluster
        e.node1, e.node2 = cluster.nodes
        e.a, e.b = cluster.add_pod(e.node1, "a"), cluster.add_pod(e.node1, "b")
        e.c = cluster.add_pod(e.node2, "c")
        for pod in (e.a, e.b, e.c):
            cluster.start_echo(pod)
        e.manifests = os.path.join(lab.workdir, "manifests")
        k8s.write(e.manifests, "pods.json", *[cluster.pod_manifest(p, labels={"app": p.name},
                                                                   ports=[("http", 8080, "TCP")]) for p in (e.a, e.b, e.c)],
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        k8s.write(e.manifests, "web.json", *web(e.c))
        cluster.start_kube_proxy(e.node1, e.manifests, extra=["--proxy-mode", "nftables"])
        wait_until(lambda: e.a.ns.run(["curl", "-s", "-m", "1", "http://%s:80/" % CLUSTER_IP],
                                      check=False).returncode == 0, 30, "the Service to answer through nftables")
        yield e
        if e.node1.role in cluster.kube_proxy:
            cluster.stop_kube_proxy(e.node1)


def podnet(e, node, *args):
    out = node.run([e.cluster.python, "-m", "cli.main"] + list(args), check=False,
                   env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT), timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return out.stdout


def trace(e):
    remote = os.path.join(e.lab.workdir, "node2-snapshot.json")
    with open(remote, "w") as f:
        f.write(podnet(e, e.node2, "trace", "--snapshot", "--hostname-override", e.node2.role))
    return json.loads(podnet(e, e.node1, "trace", "default/a", "svc/default/web:80", "--manifests", e.manifests,
                             "--etcd-endpoints", e.cluster.etcd_url, "--hostname-override", e.node1.role,
                             "--remote-snapshot", remote, "--json"))


def kube_proxy_findings(e):
    report = json.loads(podnet(e, e.node1, "doctor", "--json", "--hostname-override", e.node1.role,
                               "--subnet-file", e.cluster.subnet_file(e.node1), "--etcd-endpoints", e.cluster.etcd_url,
                               "--manifests", e.manifests))
    return [f for f in report["findings"] if f["code"].startswith("kube-proxy-")]


def test_nftables_mode_delivered_then_a_stale_endpoint_named_by_trace_and_doctor(env):
    e = env
    result = trace(e)
    assert result["verdict"] == "delivered", json.dumps(result, indent=1)
    hop = next(h for h in result["hops"] if h["step"] == "kube-proxy-rules")
    assert hop["status"] == "ok" and hop["what"].startswith("nftables mode: service-"), hop
    assert hop["rule"].startswith("add element ip kube-proxy service-ips { %s . tcp . 80 : goto " % CLUSTER_IP), hop
    assert kube_proxy_findings(e) == []

    e.cluster.stop_kube_proxy(e.node1)          # its table stays
    try:
        k8s.write(e.manifests, "web.json", *web(e.b))
        hop = trace(e)["failed_hop"]
        stale = "%s:8080" % e.c.ip
        assert hop["step"] == "kube-proxy-rules" and stale in hop["what"] and "nftables" in hop["what"], hop
        assert hop["rule"] == "add rule ip kube-proxy %s meta l4proto tcp dnat to %s" % (
            endpoint_chain(WEB, Endpoint(e.c.ip, 8080)), stale), hop
        found = {f["code"]: f for f in kube_proxy_findings(e)}      # c is stale, b is missing
        assert sorted(found) == ["kube-proxy-endpoint-missing", "kube-proxy-stale-endpoint"], found
        finding = found["kube-proxy-stale-endpoint"]
        assert stale in finding["what"] and "dnat to %s" % stale in finding["what"], finding
        assert finding["object"] == "Service default/web port 80"
        assert "%s:8080" % e.b.ip in found["kube-proxy-endpoint-missing"]["what"]
    finally:
        k8s.write(e.manifests, "web.json", *web(e.c))
        e.cluster.start_kube_proxy(e.node1, e.manifests, extra=["--proxy-mode", "nftables"])


# ---- IPVS, in the full-kernel lane -----------------------------------------------------------------------

@pytest.mark.fullkernel
def test_ipvs_virtual_servers_read_from_the_kernel_and_a_stale_one_traced(netns_usable):
    if not netns_usable:
        pytest.skip("needs root and network namespaces (run as root)")
    if not os.path.exists("/proc/net/ip_vs"):
        pytest.skip("this kernel has no IPVS (ip_vs)")
    sys.path.insert(0, os.path.join(_SOURCE_ROOT, "tests"))    # the unit tests' two-node world
    from test_trace_unit import C, world

    from diagnose.snapshot import Snapshot, take
    from diagnose.trace import NodeState, walk
    from podnet.net.ipvs import Dest, Ipvs, Service
    from podnet.net.netns import entered

    with Lab() as lab:
        node = lab.namespace("ipvs-node")
        with entered(node.path), Ipvs() as ipvs:        # what kube-proxy's IPVS mode writes for default/web
            svc = Service("TCP", "10.96.0.20", 80)
            ipvs.add_service(svc)
            ipvs.add_dest(svc, Dest(C, 8080))
        snap = take(node.path)
    assert [(v.address, v.port, [(r.address, r.port) for r in v.real_servers]) for v in snap.ipvs] == \
        [("10.96.0.20", 80, [(C, 8080)])]
    assert not any("ipvs" in err for err in snap.errors), snap.errors
    view, snaps = world()
    snaps["node1"]["iptables_save"] = "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
    snaps["node1"]["ipvs"] = snap.to_dict()["ipvs"]
    states = {n: NodeState(n, Snapshot.from_dict(s)) for n, s in snaps.items()}
    assert walk(view, states, "default/a", "svc/default/web:80", "node1").verdict == "delivered"
    view.slices = [k8s.endpoint_slice("web", [("10.244.1.3", "node1")], [{"port": 8080}])]
    hop = walk(view, states, "default/a", "svc/default/web:80", "node1").failed
    assert hop.step == "kube-proxy-rules" and "%s:8080" % C in hop.what
    assert hop.rule == "ipvsadm -a -t 10.96.0.20:80 -r %s:8080 -m -w 1" % C
