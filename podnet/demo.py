"""The main job: a multi-node cluster in network namespaces, checked end to end.

etcd runs in its own namespace on the underlay; every node runs `flanneld`
(vxlan by default) which leases it a subnet and programs the overlay; pods
are attached by the stock 10-flannel conflist (flannel -> bridge ->
host-local, then portmap) run through podnet's conflist executor, as a
container runtime would. Then every pod pings every other pod on every node,
and the result is printed. Everything lives in namespaces the Lab created and
is removed at the end.
"""
import time

from podnet.cluster import Cluster, Lab


def _step(text):
    print("  " + text, flush=True)


def run_demo(nodes=3, backend="vxlan", pods_per_node=1, keep=False):
    started = time.monotonic()
    with Lab() as lab:
        print("podnet demo: %d nodes, flannel backend %s (lab %s)" % (nodes, backend, lab.prefix))
        cluster = Cluster(lab, nodes=nodes, backend=backend)
        cluster.start()
        _step("etcd at %s; network config %s" % (cluster.etcd_url, cluster.network_config()))
        for node in cluster.nodes:
            with open(cluster.subnet_file(node)) as f:
                env = dict(line.split("=", 1) for line in f.read().split())
            _step("%s (underlay %s): flanneld leased %s, MTU %s"
                  % (node.role, node.underlay_ip, env["FLANNEL_SUBNET"], env["FLANNEL_MTU"]))
        for node in cluster.nodes:
            for i in range(1, pods_per_node + 1):
                pod = cluster.add_pod(node, "%s-pod%d" % (node.role, i))
                _step("pod %s on %s: %s" % (pod.name, node.role, pod.ip))

        print("connectivity (every pod pings every other pod, 1 packet each):")
        matrix = cluster.ping_matrix()
        for pod in cluster.pods:
            row = ["%s %s" % (b, "ok" if ok else "FAIL") for (a, b), ok in matrix.items() if a == pod.name]
            _step("%s -> %s" % (pod.name, ", ".join(row)))
        failures = [pair for pair, ok in matrix.items() if not ok]

        if keep:
            input("cluster is up; press Enter to tear it down ")
        for pod in list(cluster.pods):
            cluster.remove_pod(pod)
    print("RESULT: %s (%.1f s)" % (
        "all %d pod pairs across %d nodes reach each other" % (len(matrix), nodes) if not failures
        else "%d of %d pod pairs FAILED: %s" % (len(failures), len(matrix), failures),
        time.monotonic() - started))
    return 0 if not failures else 1
