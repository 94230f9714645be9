"""Every daemon's /metrics and health endpoints, scraped over real HTTP on loopback and parsed
with prometheus_client's own parser: the documented names, types, labels and buckets.

The daemons' metric objects are driven by their own code paths: kube-proxy's sync loop
(ProxyServer.sync_once over the iptables proxier, restore and save recorded by
tests/test_kube_proxy_isolation.py's FakeTables instead of the kernel), the reflector as a
process with a real BGP session from an in-process speaker (127.0.0.1 <-> 127.0.0.2), and the
Ingress controller with the stand-in nginx of tests/test_ingress_controller.py. The node
agent's metrics are scraped from real agents in netns_tests/test_calico_cluster.py, the
Ingress controller's from a real nginx in netns_tests/test_ingress.py.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from calico_lite.bgp.session import PeerConfig
from calico_lite.bgp.speaker import Speaker
from ingress import controller as ctl
from ingress import render
from kube_proxy import metrics as km
from kube_proxy import server
from podnet import httpd
from podnet.kube.events import Event
from tests.test_ingress_controller import feed, relists, service, slice_, web_ingress
from tests.test_kube_proxy_isolation import FakeTables, ipt_proxier, objects, tracker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBE_PROXY_BUCKETS = ["0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256", "0.512",
                      "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf"]


@pytest.fixture
def serving():
    servers = []

    def serve(routes):
        servers.append(httpd.serve(("127.0.0.1", 0), routes, name="test"))
        return servers[-1].server_address[1]
    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def scrape(port):
    """{family name: family} of /metrics (counters under their name without _total)."""
    status, content_type, body = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4"), (status, content_type)
    return {f.name: f for f in text_string_to_metric_families(body)}


def value(family, sample_name=None, **labels):
    found = [s.value for s in family.samples
             if (sample_name is None or s.name == sample_name) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family.name, sample_name, labels, family.samples)
    return found[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


# ---- kube-proxy -------------------------------------------------------------------------------

def test_kube_proxy_metrics_keep_kube_proxys_names_types_and_buckets(serving):
    metrics = km.Metrics(mode="iptables", health_timeout=60)
    proxy = server.ProxyServer(ipt_proxier(FakeTables()), tracker(6, bad={2}), lambda emit: None, metrics)
    proxy._take(Event("MODIFIED", "Service", objects(1)[0][0]))     # an event as a source gives it
    assert proxy.sync_once() is not None            # a full sync; svc2's rules are refused: quarantined
    metrics_port = serving(metrics.routes("metrics"))
    healthz_port = serving(metrics.routes("healthz"))
    families = scrape(metrics_port)

    for name in ("kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_sync_full_proxy_rules_duration_seconds",
                 "kubeproxy_sync_partial_proxy_rules_duration_seconds"):
        family = families[name]
        assert family.type == "histogram"
        assert [s.labels["le"] for s in family.samples if s.name == name + "_bucket"] == KUBE_PROXY_BUCKETS
    assert value(families["kubeproxy_sync_proxy_rules_duration_seconds"],
                 "kubeproxy_sync_proxy_rules_duration_seconds_count") == 1
    assert value(families["kubeproxy_sync_full_proxy_rules_duration_seconds"],
                 "kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 1
    assert value(families["kubeproxy_sync_partial_proxy_rules_duration_seconds"],
                 "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 0
    expected_types = {
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
        "kubeproxy_sync_proxy_rules_iptables_total": "gauge",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures": "counter",
        "kubeproxy_proxy_healthz": "counter",
        "kubeproxy_proxy_livez": "counter",
        "podnet_sync_proxy_rules_quarantined_service_ports": "gauge",
        "podnet_sync_proxy_rules_service_port_quarantines": "counter",
        "podnet_sync_changed_service_ports": "counter",
        "podnet_service_ports": "gauge",
        "podnet_endpoints": "gauge",
    }
    assert {name: families[name].type for name in expected_types} == expected_types
    assert "podnet_sync_proxy_rules_total" not in families          # the nftables/ipvs name
    assert abs(value(families["kubeproxy_sync_proxy_rules_last_timestamp_seconds"]) - time.time()) < 60
    assert value(families["kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"]) > 0
    assert value(families["kubeproxy_sync_proxy_rules_iptables_total"], table="nat") > 0
    assert value(families["podnet_sync_proxy_rules_quarantined_service_ports"]) == 1
    assert value(families["podnet_sync_proxy_rules_service_port_quarantines"]) == 1
    assert value(families["kubeproxy_sync_proxy_rules_iptables_restore_failures"]) >= 1
    assert value(families["podnet_service_ports"]) == 6
    assert not any(name.endswith("_created") for name in families)      # kube-proxy has none

    # the metrics port: /proxyMode and the generic /healthz as kube-proxy's
    assert get(metrics_port, "/proxyMode")[::2] == (200, "iptables")
    assert get(metrics_port, "/healthz")[::2] == (200, "ok")
    # --healthz-bind-address: kube-proxy's JSON, and every answer counted by code
    status, content_type, body = get(healthz_port, "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert set(json.loads(body)) == {"lastUpdated", "currentTime", "nodeEligible"}
    status, _, body = get(healthz_port, "/livez")
    assert status == 200 and set(json.loads(body)) == {"lastUpdated", "currentTime"}
    families = scrape(metrics_port)
    assert value(families["kubeproxy_proxy_healthz"], code="200") == 1
    assert value(families["kubeproxy_proxy_livez"], code="200") == 1

    # a change waiting longer than the timeout: 503 from both, counted
    metrics.sync_health.timeout = 0
    metrics.queued()
    time.sleep(0.01)
    assert get(healthz_port, "/healthz")[0] == 503 and get(healthz_port, "/livez")[0] == 503
    assert value(scrape(metrics_port)["kubeproxy_proxy_healthz"], code="503") == 1


def test_kube_proxy_nftables_mode_names():
    metrics = km.Metrics(mode="nftables")
    metrics.failed()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    assert families["podnet_sync_proxy_rules_total"].type == "gauge"
    assert "kubeproxy_sync_proxy_rules_iptables_total" not in families
    assert value(families["kubeproxy_sync_proxy_rules_nftables_sync_failures"]) == 1
    assert value(families["kubeproxy_sync_proxy_rules_iptables_restore_failures"]) == 1
    with pytest.raises(ValueError):
        metrics.routes("elsewhere")


# ---- calico_lite: the reflector process ---------------------------------------------------------

def test_reflector_metrics_and_health_follow_a_real_session(tmp_path):
    metrics_port, health_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "calico_lite.reflector", "--router-id", "10.0.0.1", "--as", "64512",
                             "--listen", "127.0.0.1", "--port", "0", "--peer", "127.0.0.2,client,passive",
                             "--announce", "10.99.0.0/24,next_hop=127.0.0.1", "--dump-file", str(tmp_path / "dump"),
                             "--prometheus-metrics-enabled", "--prometheus-metrics-host", "127.0.0.1",
                             "--prometheus-metrics-port", str(metrics_port),
                             "--health-port", str(health_port)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, FELIX_HEALTHENABLED="true"),
                            stderr=subprocess.PIPE, text=True)
    client = None
    try:
        wait_for(lambda: os.path.exists(tmp_path / "dump"), what="the reflector to start")
        with open(tmp_path / "dump") as f:
            bgp_port = json.load(f)["port"]
        families = scrape(metrics_port)
        state = families["calico_lite_bgp_session_state"]
        assert state.type == "gauge"
        assert {s.labels["state"] for s in state.samples} == {"Idle", "Connect", "Active", "OpenSent", "OpenConfirm",
                                                                "Established"}
        assert value(state, peer="127.0.0.2", state="Established") == 0
        status, _, reason = get(metrics_port, "/readyz")
        assert status == 503 and "BGP not established with 127.0.0.2" in reason, reason
        assert get(metrics_port, "/healthz")[::2] == (200, "ok\n")
        assert get(health_port, "/liveness")[0] == 200              # Felix's paths on Felix's health port
        assert get(health_port, "/readiness")[0] == 503

        client = Speaker(64512, "10.0.0.2", listen_address="127.0.0.2", port=None)
        client.start_in_thread()
        client.add_peer(PeerConfig("127.0.0.1", 64512, port=bgp_port, local_address="127.0.0.2", hold_time=9))
        client.announce("10.99.2.0/24")
        client.announce("10.99.3.0/24")
        wait_for(lambda: get(metrics_port, "/readyz")[0] == 200, what="the session to be ready")

        def received():
            return value(scrape(metrics_port)["calico_lite_bgp_prefixes_received"], peer="127.0.0.2")
        wait_for(lambda: received() == 2, what="two prefixes received")
        families = scrape(metrics_port)
        expected_types = {"calico_lite_bgp_session_state": "gauge", "calico_lite_bgp_session_resets": "counter",
                          "calico_lite_bgp_prefixes_received": "gauge", "calico_lite_bgp_prefixes_advertised": "gauge",
                          "calico_lite_bgp_prefixes_originated": "gauge", "calico_lite_bgp_loc_rib_prefixes": "gauge"}
        assert {name: families[name].type for name in expected_types} == expected_types
        assert "calico_lite_routes_installed" not in families       # the reflector installs nothing
        assert value(families["calico_lite_bgp_session_state"], peer="127.0.0.2", state="Established") == 1
        assert value(families["calico_lite_bgp_session_state"], peer="127.0.0.2", state="Idle") == 0
        assert value(families["calico_lite_bgp_prefixes_advertised"], peer="127.0.0.2") == 1   # our --announce
        assert value(families["calico_lite_bgp_prefixes_originated"]) == 1
        assert value(families["calico_lite_bgp_loc_rib_prefixes"]) == 3
        assert value(families["calico_lite_bgp_session_resets"], peer="127.0.0.2") == 0
        assert get(health_port, "/readyz")[0] == 200

        client.stop_thread()                                          # Cease: the session resets
        client = None
        wait_for(lambda: get(metrics_port, "/readyz")[0] == 503, what="readiness to go")
        families = scrape(metrics_port)
        assert value(families["calico_lite_bgp_session_resets"], peer="127.0.0.2") == 1
        assert value(families["calico_lite_bgp_session_state"], peer="127.0.0.2", state="Established") == 0
        assert value(families["calico_lite_bgp_prefixes_received"], peer="127.0.0.2") == 0
    finally:
        if client is not None:
            client.stop_thread()
        proc.terminate()
        assert proc.wait(10) == 0, proc.stderr.read()


def test_felix_environment_sets_the_flag_defaults():
    from calico_lite.reflector import parse_args
    argv = ["--router-id", "10.0.0.1", "--as", "64512"]
    args = parse_args(argv)
    assert (args.prometheus_metrics_enabled, args.prometheus_metrics_host, args.prometheus_metrics_port,
            args.health_enabled, args.health_host, args.health_port) == (False, "", 9091, False, "localhost", 9099)
    import argparse

    from calico_lite import metrics as cm
    p = argparse.ArgumentParser()
    cm.add_flags(p, {"FELIX_PROMETHEUSMETRICSENABLED": "true", "FELIX_PROMETHEUSMETRICSPORT": "9191",
                     "FELIX_HEALTHHOST": "0.0.0.0"})
    args = p.parse_args([])
    assert (args.prometheus_metrics_enabled, args.prometheus_metrics_port, args.health_host) == (True, 9191, "0.0.0.0")
    assert p.parse_args(["--prometheus-metrics-enabled=false"]).prometheus_metrics_enabled is False


def test_agent_metrics_count_kernel_routes_and_readiness_waits_for_them():
    """The node agent's own families (kernel routes by type, syncs, failures) and its readiness:
    the kernel's routes are a callable here, a real dump in netns_tests/test_calico_cluster.py."""
    from calico_lite import metrics as cm
    m = cm.Metrics(lambda: None, lambda: 1, routes=lambda: {"unicast": 2, "blackhole": 1})
    families = {f.name: f for f in text_string_to_metric_families(
        httpd.metrics_handler(m.registry)()[2].decode())}
    assert families["calico_lite_routes_installed"].type == "gauge"
    assert value(families["calico_lite_routes_installed"], type="unicast") == 2
    assert value(families["calico_lite_routes_installed"], type="blackhole") == 1
    assert families["calico_lite_route_syncs"].type == "counter"
    assert families["calico_lite_reconcile_failures"].type == "counter"
    assert m.ready() == (False, "no BGP speaker yet (registering in the datastore)")
    m.beat()
    assert m.alive() == (True, "")
    m.last_beat = m.clock() - cm.HEARTBEAT_TIMEOUT - 1
    assert not m.alive()[0] and "has not gone round" in m.alive()[1]


# ---- the Ingress controller ---------------------------------------------------------------------

def test_ingress_controller_metrics_are_ingress_nginxs(tmp_path, serving):
    from tests.test_ingress_controller import FAKE_NGINX
    fake = tmp_path / "nginx"
    fake.write_text(FAKE_NGINX)
    fake.chmod(0o755)
    c = ctl.IngressController(render.Options(str(tmp_path / "state"), status_port=0), nginx_binary=str(fake),
                              debounce=0, min_sync_interval=0, stop_grace=2)
    c.prepare()
    try:
        port = serving(c.metrics.routes(c.alive, c.ready))
        status, _, reason = get(port, "/readyz")
        assert status == 503 and "no configuration" in reason
        assert get(port, "/healthz")[0] == 200
        feed(c, *relists(Service=[service("web")], EndpointSlice=[slice_("web", ["10.244.1.2"])],
                         Ingress=[web_ingress()]))
        assert c.nginx.running() and c.running_hash
        assert get(port, "/readyz")[::2] == (200, "ok\n")
        families = scrape(port)
        expected_types = {
            "nginx_ingress_controller_config_hash": "gauge",
            "nginx_ingress_controller_config_last_reload_successful": "gauge",
            "nginx_ingress_controller_config_last_reload_successful_timestamp_seconds": "gauge",
            "nginx_ingress_controller_success": "unknown",      # untyped: ingress-nginx's name has no _total
            "nginx_ingress_controller_errors": "unknown",
            "podnet_ingress_config_size_bytes": "gauge",
            "podnet_ingress_syncs": "counter",
            "podnet_ingress_ingresses": "gauge",
        }
        assert {name: families[name].type for name in expected_types} == expected_types
        labels = {"controller_class": c.controller_name, "controller_namespace": "", "controller_pod": ""}
        assert value(families["nginx_ingress_controller_config_hash"], **labels) == int(c.running_hash[:13], 16)
        assert value(families["nginx_ingress_controller_config_last_reload_successful"]) == 1
        assert abs(value(families["nginx_ingress_controller_config_last_reload_successful_timestamp_seconds"])
                   - time.time()) < 60
        assert value(families["nginx_ingress_controller_success"], "nginx_ingress_controller_success") == 1
        assert value(families["nginx_ingress_controller_errors"], "nginx_ingress_controller_errors") == 0
        assert value(families["podnet_ingress_config_size_bytes"]) == os.path.getsize(c.nginx.conf)
        assert value(families["podnet_ingress_ingresses"], status="ok") == 1

        feed(c, Event("ADDED", "Ingress", web_ingress("reject.example.com", "rej")))     # nginx -t refuses it
        families = scrape(port)
        assert value(families["nginx_ingress_controller_config_last_reload_successful"]) == 0
        assert value(families["nginx_ingress_controller_errors"], "nginx_ingress_controller_errors") == 1
        assert get(port, "/readyz")[0] == 200          # the previous configuration still runs

        feed(c, Event("DELETED", "Ingress", web_ingress("reject.example.com", "rej")),
             Event("MODIFIED", "EndpointSlice", slice_("web", ["10.244.1.2", "10.244.1.3"])))
        families = scrape(port)
        assert value(families["nginx_ingress_controller_config_last_reload_successful"]) == 1
        assert value(families["nginx_ingress_controller_success"], "nginx_ingress_controller_success") == 2
        assert value(families["podnet_ingress_syncs"]) == c.syncs

        c.nginx.stop()                                  # nginx gone: not live, not ready
        assert get(port, "/healthz")[0] == 503 and get(port, "/readyz")[0] == 503
    finally:
        c.nginx.stop()
