"""kube_proxy.model: Services and EndpointSlices -> plain immutable data (no root needed)."""
import copy
import logging

import pytest

from kube_proxy import model
from kube_proxy.model import Endpoint, ServicePortName


def svc(name="web", ns="default", ports=None, **spec):
    spec.setdefault("clusterIP", "10.96.0.10")
    spec.setdefault("ports", ports if ports is not None else [{"port": 80, "targetPort": 8080}])
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def eps(service="web", ns="default", name=None, ports=None, endpoints=(), address_type="IPv4"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or service + "-abc12", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": address_type,
            "ports": ports if ports is not None else [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": list(endpoints)}


def ep(ip, ready=None, serving=None, terminating=None, node=None):
    cond = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
            if v is not None}
    out = {"addresses": [ip], "conditions": cond}
    if node:
        out["nodeName"] = node
    return out


# ---- Services ----

def test_cluster_ip_service_single_unnamed_port():
    ports = model.build_service_ports(svc())
    spn = ServicePortName("default", "web", "", "TCP")
    assert list(ports) == [spn]
    p = ports[spn]
    assert (p.cluster_ip, p.port, p.protocol, p.target_port, p.node_port, p.type) == \
        ("10.96.0.10", 80, "TCP", 8080, 0, "ClusterIP")
    assert str(spn) == "default/web"
    assert not p.session_affinity and not p.externally_accessible


def test_multiple_ports_and_protocols():
    ports = model.build_service_ports(svc(ports=[
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"},
        {"name": "sctp", "port": 9999, "protocol": "SCTP"}]))
    names = {str(k): (v.protocol, v.port, v.target_port) for k, v in ports.items()}
    assert names == {"default/web:dns": ("UDP", 53, 5353), "default/web:dns-tcp": ("TCP", 53, "dns-tcp"),
                     "default/web:sctp": ("SCTP", 9999, 9999)}


def test_values_are_hashable_and_compare_by_value():
    a = model.build_service_ports(svc())
    b = model.build_service_ports(copy.deepcopy(svc()))
    assert a == b and hash(tuple(a.values())) == hash(tuple(b.values()))
    c = model.build_service_ports(svc(ports=[{"port": 81, "targetPort": 8080}]))
    assert a != c
    with pytest.raises(AttributeError):
        next(iter(a.values())).port = 1          # frozen


def test_nodeport_externalips_loadbalancer_and_policies():
    obj = svc(type="LoadBalancer", externalIPs=["192.0.2.10", "2001:db8::1", "192.0.2.10"],
              externalTrafficPolicy="Local", internalTrafficPolicy="Local", healthCheckNodePort=32000,
              loadBalancerSourceRanges=["203.0.113.0/24", "10.0.0.1/8"],
              ports=[{"port": 80, "nodePort": 30080}])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "lb.example"},
                                                  {"ip": "198.51.100.8", "ipMode": "Proxy"}]}}
    p = next(iter(model.build_service_ports(obj).values()))
    assert p.node_port == 30080 and p.type == "LoadBalancer"
    assert p.external_ips == ("192.0.2.10",)                   # IPv4 family only, deduplicated
    assert p.load_balancer_ips == ("198.51.100.7",)            # hostnames and ipMode Proxy skipped
    assert p.load_balancer_source_ranges == ("203.0.113.0/24", "10.0.0.0/8")
    assert p.external_policy_local and p.internal_policy_local and p.health_check_node_port == 32000
    # Cluster endpoints too: pod traffic to its external addresses short-circuits to them
    assert p.externally_accessible and p.uses_local_endpoints and p.uses_cluster_endpoints


def test_external_policy_local_only_for_nodeport_and_loadbalancer():
    p = next(iter(model.build_service_ports(svc(externalIPs=["192.0.2.1"],
                                                externalTrafficPolicy="Local")).values()))
    assert not p.external_policy_local           # as kube-proxy: ClusterIP type ignores it
    p = next(iter(model.build_service_ports(svc(type="NodePort", ports=[{"port": 80, "nodePort": 30001}],
                                                externalTrafficPolicy="Local")).values()))
    assert p.external_policy_local and p.uses_cluster_endpoints and p.uses_local_endpoints


def test_session_affinity_client_ip_default_and_custom_timeout():
    p = next(iter(model.build_service_ports(svc(sessionAffinity="ClientIP")).values()))
    assert p.session_affinity_timeout == 10800
    p = next(iter(model.build_service_ports(svc(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})).values()))
    assert p.session_affinity and p.session_affinity_timeout == 60


def test_ipv6_family_and_dual_stack():
    obj = svc(clusterIPs=["10.96.0.10", "fd00:96::a"], externalIPs=["2001:db8::1", "192.0.2.1"])
    p6 = next(iter(model.build_service_ports(obj, family=6).values()))
    assert p6.cluster_ip == "fd00:96::a" and p6.external_ips == ("2001:db8::1",)
    assert model.build_service_ports(svc(clusterIP="fd00::1"), family=4) == {}


@pytest.mark.parametrize("spec", [
    {"clusterIP": "None"},                           # headless
    {"type": "ExternalName", "externalName": "example.com", "clusterIP": ""},
    {"clusterIP": ""},                               # not allocated yet
])
def test_ignored_services(spec, caplog):
    with caplog.at_level(logging.WARNING, "kube_proxy.model"):
        assert model.service_ports(svc(**spec)) == {}
    assert not caplog.records                        # ignoring is not an error


@pytest.mark.parametrize("mutate, reason", [
    (lambda o: o["spec"]["ports"][0].update(port=70000), "spec.ports[0].port: 70000 is not a port number"),
    (lambda o: o["spec"]["ports"][0].update(port="80"), "spec.ports[0].port: \"'80'\" is not a port number"),
    (lambda o: o["spec"]["ports"][0].update(port=True), "is not a port number"),
    (lambda o: o["spec"]["ports"][0].pop("port"), "spec.ports[0].port: None is not a port number"),
    (lambda o: o["spec"]["ports"][0].update(protocol="ICMP"), "spec.ports[0].protocol: 'ICMP' is not a supported"),
    (lambda o: o["spec"]["ports"][0].update(targetPort="Bad_Name"), "spec.ports[0].targetPort"),
    (lambda o: o["spec"]["ports"][0].update(targetPort=0), "spec.ports[0].targetPort: 0 is not a port number"),
    (lambda o: o["spec"].update(clusterIP="10.96.0.300"), "spec.clusterIPs[0]: '10.96.0.300' is not an IP"),
    (lambda o: o["spec"].update(externalIPs=["nope"]), "spec.externalIPs[0]: 'nope' is not an IP address"),
    (lambda o: o["spec"].update(externalIPs="192.0.2.1"), "spec.externalIPs: expected a list"),
    (lambda o: o["spec"].update(ports=[]), "spec.ports: a Service needs at least one port"),
    (lambda o: o["spec"].update(type="Weird"), "spec.type: 'Weird' is not a Service type"),
    (lambda o: o["spec"].update(sessionAffinity="Cookie"), "spec.sessionAffinity: 'Cookie'"),
    (lambda o: o["spec"].update(sessionAffinity="ClientIP",
                                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
     "timeoutSeconds: 0 is not in 1-86400"),
    (lambda o: o["spec"].update(externalTrafficPolicy="Nearby"), "spec.externalTrafficPolicy: 'Nearby'"),
    (lambda o: o["spec"]["ports"].append({"port": 81}), "spec.ports[0].name: required when a Service has more"),
    (lambda o: o["spec"].update(ports=[{"name": "a", "port": 1}, {"name": "a", "port": 2}]),
     "spec.ports[1].name: 'a' is used by two ports"),
    (lambda o: o["metadata"].pop("name"), "metadata.name: missing"),
    (lambda o: o["metadata"].update(name="Web_1"), "metadata.name: 'Web_1' is not a valid Service name"),
    (lambda o: o.pop("spec"), "spec: missing"),
    (lambda o: o.update(spec=[1]), "spec: expected an object, got list"),
    (lambda o: o["spec"].update(type="NodePort", ports=[{"port": 80, "nodePort": -1}]),
     "spec.ports[0].nodePort: -1 is not a port number"),
    (lambda o: o["spec"].update(type="LoadBalancer", loadBalancerSourceRanges=["1.2.3.4/99"]),
     "spec.loadBalancerSourceRanges[0]: '1.2.3.4/99' is not a CIDR"),
])
def test_bad_services_are_logged_with_a_specific_reason_and_skipped(mutate, reason, caplog):
    obj = svc()
    mutate(obj)
    with caplog.at_level(logging.WARNING, "kube_proxy.model"):
        ports, why = model.service_ports_or_error(obj)
    assert ports == {} and reason.replace("\"", "") in why.replace("\"", "")
    assert any(reason.replace("\"", "") in r.getMessage().replace("\"", "") for r in caplog.records)
    with pytest.raises(model.InvalidObject):
        model.build_service_ports(obj)


@pytest.mark.parametrize("obj", [None, "text", [1, 2], {"metadata": "x"}, {"metadata": {"name": 5}},
                                 {"metadata": {"name": "a"}, "spec": {"ports": [None]}, "clusterIP": "x"}])
def test_garbage_never_raises(obj, caplog):
    assert model.service_ports(obj) == {}
    assert model.slice_info(obj) is None


# ---- EndpointSlices ----

def test_slice_endpoints_conditions_and_local():
    info = model.build_slice_info(eps(endpoints=[
        ep("10.244.1.5", node="node-a"), ep("10.244.1.4", ready=False), ep("10.244.2.9", ready=False,
                                                                           serving=True, terminating=True)]),
        hostname="node-a")
    spn = ServicePortName("default", "web", "", "TCP")
    [(name, endpoints)] = info.ports
    assert name == spn
    assert [(e.addr, e.ready, e.serving, e.terminating, e.is_local) for e in endpoints] == [
        ("10.244.1.4:8080", False, False, False, False),       # serving defaults to ready
        ("10.244.1.5:8080", True, True, False, True),
        ("10.244.2.9:8080", False, True, True, False)]


def test_named_target_ports_resolved_by_slice_port_names():
    service = svc(ports=[{"name": "http", "port": 80, "targetPort": "web"},
                         {"name": "metrics", "port": 9100, "targetPort": "metrics"}])
    slice_a = eps(name="web-1", ports=[{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}],
                  endpoints=[ep("10.244.1.2")])
    # a second slice: Pods of another version name their port differently (another number)
    slice_b = eps(name="web-2", ports=[{"name": "http", "port": 8081}], endpoints=[ep("10.244.1.3")])
    state = model.build_state([service], [slice_a, slice_b])
    http = ServicePortName("default", "web", "http", "TCP")
    metrics = ServicePortName("default", "web", "metrics", "TCP")
    assert [e.addr for e in state.endpoints_for(http)] == ["10.244.1.2:8080", "10.244.1.3:8081"]
    assert [e.addr for e in state.endpoints_for(metrics)] == ["10.244.1.2:9100"]


def test_slice_port_protocol_must_match_service_port():
    service = svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])
    wrong = eps(ports=[{"name": "dns", "port": 53, "protocol": "TCP"}], endpoints=[ep("10.244.0.2")])
    state = model.build_state([service], [wrong])
    assert dict(state.endpoints) == {}


def test_ipv6_slice_and_family_filter():
    s6 = eps(address_type="IPv6", endpoints=[ep("fd00:244::5")])
    assert model.build_slice_info(s6, family=4) is None
    info = model.build_slice_info(s6, family=6)
    assert info.ports[0][1][0].addr == "[fd00:244::5]:8080"
    assert model.build_slice_info(eps(address_type="FQDN")) is None


def test_duplicate_address_across_slices_prefers_ready():
    a = eps(name="web-1", endpoints=[ep("10.244.1.2", ready=False)])
    b = eps(name="web-2", endpoints=[ep("10.244.1.2", ready=True)])
    merged = model.merge_endpoints([model.build_slice_info(a), model.build_slice_info(b)])
    [(spn, endpoints)] = merged.items()
    assert len(endpoints) == 1 and endpoints[0].ready


def test_bad_endpoint_is_skipped_rest_of_slice_kept(caplog):
    obj = eps(endpoints=[ep("10.244.1.2"), ep("banana"), {"addresses": []}, ep("fd00::1"),
                         {"addresses": ["10.244.1.3"], "conditions": {"ready": "yes"}}])
    with caplog.at_level(logging.WARNING, "kube_proxy.model"):
        info = model.slice_info(obj)
    assert [e.ip for e in info.ports[0][1]] == ["10.244.1.2"]
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "endpoints[1].addresses[0]: 'banana' is not an IP address" in text
    assert "endpoints[2].addresses: empty" in text
    assert "endpoints[3].addresses[0]: fd00::1 is not an IPv4 address" in text
    assert "endpoints[4].conditions.ready: expected a boolean" in text


@pytest.mark.parametrize("mutate, reason", [
    (lambda o: o["metadata"]["labels"].clear(), "no kubernetes.io/service-name label"),
    (lambda o: o.update(addressType="IPX"), "addressType: 'IPX' is not IPv4, IPv6 or FQDN"),
    (lambda o: o.pop("addressType"), "addressType: missing"),
    (lambda o: o["ports"][0].update(port=0), "ports[0].port: 0 is not a port number"),
    (lambda o: o["ports"][0].update(protocol="GRE"), "ports[0].protocol: 'GRE' is not a supported"),
    (lambda o: o.update(endpoints={"a": 1}), "endpoints: expected a list"),
    (lambda o: o["ports"].append({"name": "", "port": 9}), "ports[1].name: ''/TCP appears twice"),
])
def test_bad_slices_are_skipped_with_reason(mutate, reason, caplog):
    obj = eps(endpoints=[ep("10.244.1.2")])
    mutate(obj)
    with caplog.at_level(logging.WARNING, "kube_proxy.model"):
        info, why = model.slice_info_or_error(obj)
    assert info is None and reason in why
    assert any(reason in r.getMessage() for r in caplog.records)


def test_slice_port_without_number_is_ignored():
    info = model.build_slice_info(eps(ports=[{"name": ""}], endpoints=[ep("10.244.1.2")]))
    assert info.ports == ()


# ---- choosing endpoints ----

def port(**kw):
    base = dict(name=ServicePortName("default", "web"), type="ClusterIP", cluster_ip="10.96.0.1",
                port=80, protocol="TCP")
    base.update(kw)
    return model.ServicePort(**base)


def E(ip, ready=True, serving=None, terminating=False, local=False):
    return Endpoint(ip, 80, ready, ready if serving is None else serving, terminating, local)


def test_ready_endpoints_only():
    cats = model.categorize_endpoints(port(), (E("10.0.0.1"), E("10.0.0.2", ready=False),
                                                E("10.0.0.3", ready=False, serving=True, terminating=True)))
    assert [e.ip for e in cats.cluster] == ["10.0.0.1"] and cats.has_any and cats.local == ()


def test_terminating_serving_endpoints_are_the_fallback():
    cats = model.categorize_endpoints(port(), (E("10.0.0.2", ready=False),
                                                E("10.0.0.3", ready=False, serving=True, terminating=True),
                                                E("10.0.0.4", ready=False, serving=False, terminating=True)))
    assert [e.ip for e in cats.cluster] == ["10.0.0.3"] and cats.has_any


def test_no_usable_endpoints():
    cats = model.categorize_endpoints(port(), (E("10.0.0.2", ready=False),))
    assert cats == model.EndpointCategories((), (), (), False)
    assert model.categorize_endpoints(port(), ()).has_any is False


def test_internal_traffic_policy_local():
    p = port(internal_policy_local=True)
    cats = model.categorize_endpoints(p, (E("10.0.0.1"), E("10.0.0.2", local=True)))
    assert [e.ip for e in cats.local] == ["10.0.0.2"] and cats.cluster == ()
    assert cats.all_reachable == cats.local and cats.has_any
    cats = model.categorize_endpoints(p, (E("10.0.0.1"),))
    assert cats.local == () and cats.has_any            # -> DROP, not REJECT


def test_external_policy_local_keeps_cluster_endpoints_for_cluster_ip():
    p = port(type="NodePort", node_port=30080, external_policy_local=True)
    cats = model.categorize_endpoints(p, (E("10.0.0.1"), E("10.0.0.2", local=True),
                                           E("10.0.0.3", ready=False, serving=True, terminating=True, local=True)))
    assert [e.ip for e in cats.cluster] == ["10.0.0.1", "10.0.0.2"]
    assert [e.ip for e in cats.local] == ["10.0.0.2"]
    assert [e.ip for e in cats.all_reachable] == ["10.0.0.1", "10.0.0.2"]
    cats = model.categorize_endpoints(p, (E("10.0.0.1"), E("10.0.0.3", ready=False, serving=True,
                                                             terminating=True, local=True)))
    assert [e.ip for e in cats.local] == ["10.0.0.3"]    # local terminating fallback


def test_build_state_keeps_other_services_when_one_is_bad(caplog):
    good = svc("good")
    bad = svc("bad", ports=[{"port": 0}])
    state = model.build_state([bad, good], [eps("good", endpoints=[ep("10.244.0.9")]),
                                            eps("bad", endpoints=[ep("10.244.0.8")]),
                                            eps("orphan", endpoints=[ep("10.244.0.7")])])
    assert [str(k) for k in state.service_ports] == ["default/good"]
    assert [str(k) for k in state.endpoints] == ["default/good"]
    assert "skipping Service default/bad: spec.ports[0].port: 0 is not a port number" in caplog.text


# ---- issue 12: one object must not be able to break the restore input ------------------------------

@pytest.mark.parametrize("mutate, reason", [
    (lambda o: o["metadata"].update(name="evil\n"), "metadata.name: 'evil\\n' is not a valid Service name"),
    (lambda o: o["metadata"].update(namespace="evil\n"), "metadata.namespace: 'evil\\n' is not a valid namespace"),
    (lambda o: o["spec"]["ports"][0].update(name="http\n"), "spec.ports[0].name: 'http\\n' is not a valid port"),
])
def test_a_service_field_ending_in_a_newline_is_refused(mutate, reason, caplog):
    """`$` matched before a trailing newline: "evil\\n" passed validation and its rules broke every
    later iptables-restore ("Bad argument")."""
    obj = svc()
    mutate(obj)
    with caplog.at_level(logging.WARNING, "kube_proxy.model"):
        ports, why = model.service_ports_or_error(obj)
    assert ports == {} and why is not None and reason in why


@pytest.mark.parametrize("mutate, reason", [
    (lambda o: o["metadata"]["labels"].update({"kubernetes.io/service-name": "web\n"}),
     "metadata.labels[kubernetes.io/service-name]: 'web\\n' is not a Service name"),
    (lambda o: o["metadata"].update(namespace="web\n"), "metadata.namespace: 'web\\n' is not a valid namespace"),
    (lambda o: o["metadata"].update(name="web-abc12\n"), "metadata.name: 'web-abc12\\n' is not a valid"),
    (lambda o: o["ports"][0].update(name="http\n"), "ports[0].name: 'http\\n' is not a valid port name"),
])
def test_a_slice_field_ending_in_a_newline_is_refused(mutate, reason, caplog):
    obj = eps(endpoints=[ep("10.244.1.2")])
    mutate(obj)
    with caplog.at_level(logging.WARNING, "kube_proxy.model"):
        info, why = model.slice_info_or_error(obj)
    assert info is None and why is not None and reason in why


# ---- issue 13: addresses the API refuses never become rules -----------------------------------------

@pytest.mark.parametrize("ip, family", [
    ("0.0.0.0", 4), ("127.0.0.1", 4), ("127.8.9.10", 4), ("169.254.169.254", 4), ("224.0.0.1", 4),
    ("239.1.2.3", 4), ("255.255.255.255", 4),
    ("::", 6), ("::1", 6), ("fe80::1", 6), ("ff02::1", 6), ("ff05::2", 6)])
def test_special_endpoint_addresses_are_skipped_with_a_warning(ip, family, caplog):
    """The API's ValidateEndpointIP refuses unspecified, loopback, link-local and link-local
    multicast addresses; no proxy can DNAT a connection to any multicast or the broadcast address."""
    good = "10.244.1.2" if family == 4 else "fd00::2"
    obj = eps(endpoints=[ep(good), ep(ip)], address_type="IPv%d" % family)
    with caplog.at_level(logging.WARNING, "podnet.kube.endpointslices"):
        info = model.slice_info(obj, family=family)
    assert [e.ip for e in info.ports[0][1]] == [good]
    assert any("endpoints[1].addresses[0]" in r.getMessage() and "may not be" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("mutate, reason", [
    (lambda o: o["spec"].update(externalIPs=["192.0.2.1", "127.0.0.1"]), "spec.externalIPs[1]: 127.0.0.1 may not be"),
    (lambda o: o["spec"].update(externalIPs=["0.0.0.0"]), "spec.externalIPs[0]: 0.0.0.0 may not be"),
    (lambda o: o["spec"].update(externalIPs=["169.254.1.1"]), "spec.externalIPs[0]: 169.254.1.1 may not be"),
    (lambda o: o["spec"].update(externalIPs=["224.0.0.5"]), "spec.externalIPs[0]: 224.0.0.5 may not be"),
    (lambda o: o["spec"].update(clusterIP="127.0.0.1"), "spec.clusterIPs[0]: 127.0.0.1 may not be"),
    (lambda o: o["spec"].update(clusterIP="0.0.0.0"), "spec.clusterIPs[0]: 0.0.0.0 may not be"),
    (lambda o: o["spec"].update(clusterIP="255.255.255.255"), "spec.clusterIPs[0]: 255.255.255.255 may not be"),
])
def test_services_with_special_addresses_are_refused(mutate, reason, caplog):
    obj = svc()
    mutate(obj)
    with caplog.at_level(logging.WARNING, "kube_proxy.model"):
        ports, why = model.service_ports_or_error(obj)
    assert ports == {} and why is not None and reason in why


def test_special_addresses_of_the_other_family_still_only_ignored():
    """A dual-stack Service's IPv6 external IP is not looked at by the IPv4 proxy, but the API
    would have refused ::1 anyway: refused in both families."""
    obj = svc(externalIPs=["192.0.2.1", "::1"])
    assert model.service_ports(obj, 4) == {} and model.service_ports(obj, 6) == {}
