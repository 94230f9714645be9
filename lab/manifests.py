"""Kubernetes objects as plain dicts (the API's JSON shapes), for demos, tests and benchmarks.

What an API server would hold for a Service and the EndpointSlice its
controller makes; kube_proxy reads them from a manifests directory.
"""
import json
import os


def service(name, cluster_ip, ports, namespace="default", type="ClusterIP", external_ips=(),
            load_balancer_ips=(), external_traffic_policy=None, internal_traffic_policy=None,
            session_affinity_timeout=0, health_check_node_port=0, source_ranges=()):
    """ports: [{"name", "port", "targetPort", "protocol", "nodePort"}] (name/protocol/nodePort optional)."""
    spec = {"type": type, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip] if cluster_ip != "None" else ["None"],
            "ports": [dict({"protocol": "TCP"}, **p) for p in ports]}
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if external_traffic_policy:
        spec["externalTrafficPolicy"] = external_traffic_policy
    if internal_traffic_policy:
        spec["internalTrafficPolicy"] = internal_traffic_policy
    if session_affinity_timeout:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": session_affinity_timeout}}
    if health_check_node_port:
        spec["healthCheckNodePort"] = health_check_node_port
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
           "spec": spec}
    if load_balancer_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in load_balancer_ips]}}
    return obj


def endpoint_slice(service_name, endpoints, ports, namespace="default", name=None):
    """endpoints: [(ip, node name)] or [(ip, node name, {"ready": .., "serving": .., "terminating": ..})];
    ports: [{"name", "port", "protocol"}]."""
    eps = []
    for ep in endpoints:
        ip, node = ep[0], ep[1]
        conditions = dict({"ready": True, "serving": True, "terminating": False}, **(ep[2] if len(ep) > 2 else {}))
        eps.append({"addresses": [ip], "conditions": conditions, "nodeName": node})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name or service_name + "-abcde", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "endpoints": eps, "ports": [dict({"protocol": "TCP"}, **p) for p in ports]}


def write(directory, filename, *objects):
    """Write objects as one JSON List file, atomically (a watcher never sees half of it)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    tmp = os.path.join(directory, "." + filename + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": list(objects)}, f, indent=1)
    os.replace(tmp, path)
    return path


def remove(directory, filename):
    try:
        os.unlink(os.path.join(directory, filename))
    except FileNotFoundError:
        pass
