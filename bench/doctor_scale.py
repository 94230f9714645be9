"""Time diagnose() on 10,000 Services (5 endpoints each, their KUBE-SVC/SEP chains) and 1,000 policies.

Run from the source root: .venv/bin/python bench/doctor_scale.py (no root needed: the node's
kernel state is a snapshot written as data, the healthy one of tests/test_doctor_unit.py)."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_doctor_unit import LEASES, NET, FlannelView, healthy  # noqa: E402

from diagnose.doctor import NodeInputs, diagnose
from diagnose.snapshot import Snapshot
from kube_proxy.iptables import endpoint_chain, service_chain
from kube_proxy.model import Endpoint, ServicePortName
from lab import manifests as k8s

N, EPS, POL = 10000, 5, 1000
services, slices, lines = [], [], ["*nat", ":KUBE-SERVICES - [0:0]"]
for i in range(N):
    name = "s%d" % i
    ip = "10.96.%d.%d" % (i // 250, i % 250 + 1)
    services.append(k8s.service(name, ip, [{"name": "http", "port": 80, "targetPort": 8080}]))
    eps = [("10.%d.%d.%d" % (100 + j, i // 250, i % 250 + 1), "node%d" % (j % 2 + 1)) for j in range(EPS)]
    slices.append(k8s.endpoint_slice(name, eps, [{"name": "http", "port": 8080}]))
    spn = ServicePortName("default", name, "http", "TCP")
    svc = service_chain(spn)
    lines.append(":%s - [0:0]" % svc)
    for ipaddr, _ in eps:
        sep = endpoint_chain(spn, Endpoint(ipaddr, 8080))
        lines += [":%s - [0:0]" % sep, "-A %s -j %s" % (svc, sep),
                  "-A %s -p tcp -m tcp -j DNAT --to-destination %s:8080" % (sep, ipaddr)]
lines.append("COMMIT")
pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p%d" % i, "namespace": "default",
         "labels": {"app": "a%d" % (i % POL)}}, "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
         "status": {"phase": "Running", "podIP": "10.244.1.%d" % (i % 250 + 2)}} for i in range(200)]
policies = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "np%d" % i,
             "namespace": "default"}, "spec": {"podSelector": {"matchLabels": {"app": "a%d" % i}},
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a%d" % ((i + 1) % POL)}}}]}]}}
            for i in range(POL)]
snap = Snapshot.from_dict(healthy(iptables_save="\n".join(lines) + "\n"))
view = FlannelView(network=NET, subnet="10.244.1.1/24", mtu=1450, leases=list(LEASES))
objects = {"Service": services, "EndpointSlice": slices, "Pod": pods, "NetworkPolicy": policies}
times = []
for _ in range(3):
    t = time.monotonic()
    found = diagnose(NodeInputs(snapshot=snap, node_name="node1", flannel=view, objects=objects))
    times.append(time.monotonic() - t)
print("nat lines %d, findings %d, diagnose() s: %s" % (len(lines), len(found), ["%.2f" % x for x in times]))
