"""kube_proxy.iptables: rendering kube-proxy's chains (pure; no root, no iptables run).

Expected rule texts are iptables-save's canonical form as iptables 1.8.9
(nf_tables) prints them; chain-name vectors are the ones in kube-proxy's own
proxier tests (ns1/svc1:p80 -> KUBE-SVC-XPGD46QRK7WJZT7O).
"""
from kube_proxy import iptables as ipt
from kube_proxy import model
from kube_proxy.model import Endpoint, ServicePort, ServicePortName
from kube_proxy.proxier import Config

NAME = ServicePortName("ns1", "svc1", "p80", "TCP")
CFG = Config(cluster_cidr=("10.244.0.0/16",))
SVC = "KUBE-SVC-XPGD46QRK7WJZT7O"
SVL = "KUBE-SVL-XPGD46QRK7WJZT7O"
EXT = "KUBE-EXT-XPGD46QRK7WJZT7O"
FW = "KUBE-FW-XPGD46QRK7WJZT7O"


def port(**kw):
    base = dict(name=NAME, type="ClusterIP", cluster_ip="172.30.0.41", port=80, protocol="TCP", target_port=80)
    base.update(kw)
    return ServicePort(**base)


def ep(ip, local=False, ready=True, serving=None, terminating=False, port=80):
    return Endpoint(ip, port, ready, ready if serving is None else serving, terminating, local)


def sep(ip, port=80, name=NAME):
    return ipt.endpoint_chain(name, Endpoint(ip, port))


def test_chain_names_are_kube_proxys():
    assert ipt.service_chain(NAME) == SVC
    assert ipt.endpoint_chain(NAME, Endpoint("10.180.0.1", 80)) == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert (ipt.local_chain(NAME), ipt.external_chain(NAME), ipt.firewall_chain(NAME)) == (SVL, EXT, FW)
    assert ipt.is_our_chain(SVC) and not ipt.is_our_chain("CNI-HOSTPORT-DNAT") and not ipt.is_our_chain("KUBE-SERVICES")


def test_probability_is_what_the_kernel_stores():
    assert [ipt.probability(n) for n in (2, 3, 4, 5)] == ["0.50000000000", "0.33333333349", "0.25000000000",
                                                         "0.20000000019"]


def test_cluster_ip_three_endpoints():
    r = ipt.render_service_port(port(), (ep("10.180.0.1"), ep("10.180.0.2"), ep("10.180.0.3")), CFG)
    s1, s2, s3 = sep("10.180.0.1"), sep("10.180.0.2"), sep("10.180.0.3")
    assert r.nat_services == ('-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment '
                              '"ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j ' + SVC,)
    assert r.chains[SVC] == (
        '-A %s ! -s 10.244.0.0/16 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" '
        '-m tcp --dport 80 -j KUBE-MARK-MASQ' % SVC,
        '-A %s -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random '
        '--probability 0.33333333349 -j %s' % (SVC, s1),
        '-A %s -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m statistic --mode random '
        '--probability 0.50000000000 -j %s' % (SVC, s2),
        '-A %s -m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" -j %s' % (SVC, s3))
    assert r.chains[s1] == (
        '-A %s -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ' % s1,
        '-A %s -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80' % s1)
    assert set(r.chains) == {SVC, s1, s2, s3}
    assert r.filter_services == r.filter_external == r.nat_nodeports == ()


def test_no_endpoints_rejects_in_filter_and_has_no_nat_chains():
    r = ipt.render_service_port(port(type="NodePort", node_port=3001, external_ips=("192.168.99.11",)),
                                (ep("10.180.0.1", ready=False),), CFG)
    assert r.chains == {} and r.nat_services == () and r.nat_nodeports == ()
    assert r.filter_services == ('-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment '
                                 '"ns1/svc1:p80 has no endpoints" -m tcp --dport 80 -j REJECT --reject-with '
                                 'icmp-port-unreachable',)
    assert r.filter_external == (
        '-A KUBE-EXTERNAL-SERVICES -d 192.168.99.11/32 -p tcp -m comment --comment "ns1/svc1:p80 has no '
        'endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable',
        '-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m addrtype '
        '--dst-type LOCAL -m tcp --dport 3001 -j REJECT --reject-with icmp-port-unreachable')


def test_terminating_endpoints_are_used_when_none_ready():
    r = ipt.render_service_port(port(), (ep("10.180.0.1", ready=False, serving=True, terminating=True),
                                         ep("10.180.0.2", ready=False)), CFG)
    assert set(r.chains) == {SVC, sep("10.180.0.1")}


def test_masquerade_all_and_no_cluster_cidr():
    r = ipt.render_service_port(port(), (ep("10.180.0.1"),), Config(masquerade_all=True))
    assert r.chains[SVC][0] == ('-A %s -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" '
                                '-m tcp --dport 80 -j KUBE-MARK-MASQ' % SVC)
    r = ipt.render_service_port(port(), (ep("10.180.0.1"),), Config())
    assert len(r.chains[SVC]) == 1 and "KUBE-MARK-MASQ" not in r.chains[SVC][0]


def test_udp_and_sctp():
    for proto in ("UDP", "SCTP"):
        name = ServicePortName("ns1", "svc1", "p53", proto)
        r = ipt.render_service_port(port(name=name, protocol=proto, port=53), (ep("10.180.0.9", port=53),), CFG)
        p = proto.lower()
        assert r.nat_services[0].startswith("-A KUBE-SERVICES -d 172.30.0.41/32 -p %s " % p)
        assert "-m %s --dport 53 -j KUBE-SVC-" % p in r.nat_services[0]
        dnat = r.chains[ipt.endpoint_chain(name, Endpoint("10.180.0.9", 53))][1]
        assert dnat.endswith("-p %s -m comment --comment \"ns1/svc1:p53\" -m %s -j DNAT --to-destination "
                             "10.180.0.9:53" % (p, p))


def test_session_affinity():
    r = ipt.render_service_port(port(session_affinity_timeout=10800), (ep("10.180.0.1"), ep("10.180.0.2")), CFG)
    s1 = sep("10.180.0.1")
    assert r.chains[SVC][1] == ('-A %s -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --rcheck '
                                '--seconds 10800 --reap --name %s --mask 255.255.255.255 --rsource -j %s'
                                % (SVC, s1, s1))
    assert len(r.chains[SVC]) == 1 + 2 + 2
    assert r.chains[s1][1] == ('-A %s -p tcp -m comment --comment "ns1/svc1:p80" -m recent --set --name %s '
                               '--mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.180.0.1:80'
                               % (s1, s1))


def test_nodeport_and_external_ip_cluster_policy():
    r = ipt.render_service_port(port(type="NodePort", node_port=3001, external_ips=("192.168.99.11",)),
                                (ep("10.180.0.1"),), CFG)
    assert r.nat_nodeports == ('-A KUBE-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 3001 '
                               '-j ' + EXT,)
    assert r.nat_services[1] == ('-A KUBE-SERVICES -d 192.168.99.11/32 -p tcp -m comment --comment '
                                 '"ns1/svc1:p80 external IP" -m tcp --dport 80 -j ' + EXT)
    assert r.chains[EXT] == (
        '-A %s -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ'
        % EXT, '-A %s -j %s' % (EXT, SVC))


def test_external_traffic_policy_local():
    p = port(type="LoadBalancer", node_port=3001, external_policy_local=True, health_check_node_port=30000,
             load_balancer_ips=("1.2.3.4",))
    r = ipt.render_service_port(p, (ep("10.180.0.1"), ep("10.180.0.2", local=True)), CFG)
    assert r.chains[EXT] == (
        '-A %s -s 10.244.0.0/16 -m comment --comment "pod traffic for ns1/svc1:p80 external destinations" -j %s'
        % (EXT, SVC),
        '-A %s -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" '
        '-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ' % EXT,
        '-A %s -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" '
        '-m addrtype --src-type LOCAL -j %s' % (EXT, SVC),
        '-A %s -j %s' % (EXT, SVL))
    assert r.chains[SVL] == ('-A %s -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j %s'
                             % (SVL, sep("10.180.0.2")),)
    assert len(r.chains[SVC]) == 3                          # masquerade + 2 endpoints
    assert r.filter_nodeports == ('-A KUBE-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80 health check node '
                                  'port" -m tcp --dport 30000 -j ACCEPT',)
    assert '-d 1.2.3.4/32' in r.nat_services[1] and r.nat_services[1].endswith("-j " + EXT)
    # no local endpoint: external traffic from outside is dropped, but the EXT chain's
    # short-circuits for pods and the node stay
    r = ipt.render_service_port(p, (ep("10.180.0.1"),), CFG)
    assert SVL not in r.chains and len(r.chains[EXT]) == 3
    assert [x.split(" -j ")[-1] for x in r.filter_external] == ["DROP", "DROP"]
    assert all('"ns1/svc1:p80 has no local endpoints"' in x for x in r.filter_external)


def test_internal_traffic_policy_local():
    p = port(internal_policy_local=True)
    r = ipt.render_service_port(p, (ep("10.180.0.1"), ep("10.180.0.2", local=True)), CFG)
    assert r.nat_services[0].endswith("-j " + SVL) and SVC not in r.chains
    assert r.chains[SVL][0].startswith("-A %s ! -s 10.244.0.0/16" % SVL)
    r = ipt.render_service_port(p, (ep("10.180.0.1"),), CFG)
    assert r.chains == {} and r.filter_services[0].endswith(
        '"ns1/svc1:p80 has no local endpoints" -m tcp --dport 80 -j DROP')


def test_load_balancer_source_ranges():
    p = port(type="LoadBalancer", node_port=3001, load_balancer_ips=("1.2.3.4",),
             load_balancer_source_ranges=("203.0.113.0/25", "192.168.0.0/16"))
    r = ipt.render_service_port(p, (ep("10.180.0.1"),), Config(cluster_cidr=("10.244.0.0/16",),
                                                                node_ip="192.168.1.5"))
    assert r.nat_services[1].endswith("-j " + FW)
    assert r.chains[FW] == (
        '-A %s -s 203.0.113.0/25 -m comment --comment "ns1/svc1:p80 loadbalancer IP" -j %s' % (FW, EXT),
        '-A %s -s 192.168.0.0/16 -m comment --comment "ns1/svc1:p80 loadbalancer IP" -j %s' % (FW, EXT),
        '-A %s -s 1.2.3.4/32 -m comment --comment "ns1/svc1:p80 loadbalancer IP" -j %s' % (FW, EXT),
        '-A %s -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"' % FW)
    assert r.filter_firewall == ('-A KUBE-PROXY-FIREWALL -d 1.2.3.4/32 -p tcp -m comment --comment "ns1/svc1:p80 '
                                 'traffic not accepted by %s" -m tcp --dport 80 -j DROP' % FW,)


def test_ipv6():
    name = ServicePortName("ns1", "svc1", "p80", "TCP")
    r = ipt.render_service_port(port(cluster_ip="fd00::41", session_affinity_timeout=60),
                                (Endpoint("fd00:244::1", 80),), Config(family=6))
    s = ipt.endpoint_chain(name, Endpoint("fd00:244::1", 80))
    assert "-d fd00::41/128" in r.nat_services[0]
    assert r.chains[s][1].endswith("--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -m tcp -j DNAT "
                                   "--to-destination [fd00:244::1]:80")
    r = ipt.render_service_port(port(cluster_ip="fd00::41"), (), Config(family=6))
    assert r.filter_services[0].endswith("-j REJECT --reject-with icmp6-port-unreachable")


# ---- whole rulesets and restore input ----

def state_of(n, eps=2):
    ports, endpoints = {}, {}
    for i in range(n):
        name = ServicePortName("ns", "s%d" % i, "http", "TCP")
        ports[name] = port(name=name, cluster_ip="10.96.%d.%d" % (i >> 8, i & 255))
        endpoints[name] = tuple(Endpoint("10.244.%d.%d" % (i >> 8, (i & 255)), 8080 + e) for e in range(eps))
    return model.ProxyState.of(ports, endpoints)


def test_render_whole_ruleset():
    rs = ipt.render(state_of(3), CFG)
    nat, filt = rs["nat"], rs["filter"]
    assert list(nat)[:4] == ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    assert len(nat["KUBE-SERVICES"]) == 4 and "KUBE-NODEPORTS" in nat["KUBE-SERVICES"][-1]
    assert "--dst-type LOCAL" in nat["KUBE-SERVICES"][-1]
    assert nat["KUBE-MARK-MASQ"] == ("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",)
    assert nat["KUBE-POSTROUTING"][-1].endswith("-j MASQUERADE --random-fully")
    assert len([c for c in nat if c.startswith("KUBE-SEP-")]) == 6
    assert set(filt) == set(ipt.FILTER_BASE) and filt["KUBE-FORWARD"][0].endswith("INVALID -j DROP")
    assert ipt.render(state_of(3), CFG) == rs                            # deterministic


def test_nodeport_addresses_and_localhost():
    cfg = Config(nodeport_addresses=("192.168.1.5", "10.0.0.7"))
    assert [r.split(" -d ")[1].split()[0] for r in ipt.nodeport_dispatch(cfg)] == ["192.168.1.5/32", "10.0.0.7/32"]
    assert "! -d 127.0.0.0/8" in ipt.nodeport_dispatch(Config(localhost_nodeports=False))[0]
    assert "! -d ::1/128" in ipt.nodeport_dispatch(Config(family=6))[0]


def test_large_clusters_drop_per_endpoint_comments():
    rs = ipt.render(state_of(600, eps=2), CFG)                          # 1,200 endpoints
    seps = [c for c in rs["nat"] if c.startswith("KUBE-SEP-")]
    assert "comment" not in rs["nat"][seps[0]][0]
    svc = [c for c in rs["nat"] if c.startswith("KUBE-SVC-")][0]
    assert "cluster IP" in rs["nat"][svc][0] and "comment" not in rs["nat"][svc][1]


def test_port_rules_cache_is_used_and_filled():
    state = state_of(2)
    cache = {}
    first = ipt.render(state, CFG, cache)
    assert len(cache) == 2
    assert ipt.render(state, CFG, cache) == first


def test_full_restore_input_declares_only_ours_and_uses_S_for_many_chains():
    small = ipt.restore_input(ipt.render(state_of(2), CFG))
    assert small.startswith("*filter\n:KUBE-SERVICES - [0:0]\n") and "\n-S\n" not in small
    assert small.count("COMMIT") == 2 and "POSTROUTING -" not in small.replace("KUBE-POSTROUTING", "")
    big = ipt.restore_input(ipt.render(state_of(200), CFG))
    assert "*nat\n-S\n:KUBE-SERVICES - [0:0]\n" in big


def test_partial_restore_for_one_endpoint_change_leaves_kube_services_alone():
    state = state_of(50)
    old = ipt.render(state, CFG)
    name = ServicePortName("ns", "s7", "http", "TCP")
    endpoints = dict(state.endpoints)
    endpoints[name] = (endpoints[name][0], Endpoint("10.244.99.99", 8080))
    new = ipt.render(model.ProxyState.of(state.service_ports, endpoints), CFG)
    text = ipt.restore_input(new, old)
    gone = ipt.endpoint_chain(name, state.endpoints[name][1])
    added = ipt.endpoint_chain(name, Endpoint("10.244.99.99", 8080))
    svc = ipt.service_chain(name)
    assert text.startswith("*nat\n")                                     # filter untouched: not even named
    declared = [line[1:].split()[0] for line in text.splitlines() if line.startswith(":")]
    assert sorted(declared) == sorted([svc, added, gone])
    assert text.rstrip().endswith("-X %s\nCOMMIT" % gone)
    assert "KUBE-SERVICES" not in text
    assert ipt.restore_input(new, new) == ""


def test_partial_restore_when_a_service_loses_its_endpoints():
    state = state_of(3)
    old = ipt.render(state, CFG)
    name = ServicePortName("ns", "s1", "http", "TCP")
    endpoints = dict(state.endpoints)
    del endpoints[name]
    new = ipt.render(model.ProxyState.of(state.service_ports, endpoints), CFG)
    text = ipt.restore_input(new, old, stale=[("nat", "KUBE-SEP-LEFTOVER0000000")])
    filter_part, nat_part = text.split("*nat\n")
    # the shared dispatch chains are edited, not rewritten: one -I in filter, one -D in nat
    assert filter_part == ('*filter\n-I KUBE-SERVICES 1 -d 10.96.0.1/32 -p tcp -m comment --comment '
                           '"ns/s1:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with '
                           'icmp-port-unreachable\nCOMMIT\n')
    assert ":KUBE-SERVICES" not in nat_part
    assert ('-D KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "ns/s1:http cluster IP" -m tcp '
            '--dport 80 -j %s' % ipt.service_chain(name)) in nat_part
    assert "-X %s" % ipt.service_chain(name) in nat_part and "-X KUBE-SEP-LEFTOVER0000000" in nat_part
    assert nat_part.index("-D KUBE-SERVICES") < nat_part.index("-X ")


def test_many_dispatch_changes_rewrite_the_chain():
    old = ipt.render(state_of(100), CFG)
    new = ipt.render(state_of(200), CFG)            # 100 new Services: more than the edit limit
    text = ipt.restore_input(new, old)
    assert ":KUBE-SERVICES - [0:0]" in text.split("*nat\n")[1] and "-I KUBE-SERVICES" not in text
    few = ipt.render(state_of(103), CFG)
    text = ipt.restore_input(few, old)
    assert text.count("-I KUBE-SERVICES 1 ") == 3 and ":KUBE-SERVICES" not in text


def test_both_policies_local_on_a_nodeport_still_has_the_cluster_chain():
    """externalTrafficPolicy and internalTrafficPolicy Local: the EXT chain short-circuits pod
    traffic to KUBE-SVC, which must exist (kube-proxy's UsesClusterEndpoints)."""
    sp = port(type="NodePort", node_port=30001, external_policy_local=True, internal_policy_local=True)
    r = ipt.render_service_port(sp, (ep("10.180.0.1", local=True), ep("10.180.0.2")), CFG)
    jumped = {line.split(" -j ")[1].split()[0] for rules in r.chains.values() for line in rules if " -j " in line}
    assert SVC in jumped and SVC in r.chains


# ---- what the iptables-based modes share (kube_proxy/rules.py) ----

def test_shared_names_are_both_modes_and_markers_are_each_modes_own():
    from kube_proxy import ipvs as kipvs
    from kube_proxy import rules
    own_ipt, prefixes = rules.MODE_CHAINS["iptables"]
    assert prefixes == ipt.OUR_PREFIXES
    assert set(own_ipt[rules.NAT]) <= set(ipt.NAT_BASE) and set(own_ipt[rules.FILTER]) <= set(ipt.FILTER_BASE)
    own_ipvs, _ = rules.MODE_CHAINS["ipvs"]
    ipvs_own = set(kipvs.OWN_CHAINS[rules.NAT]) | set(kipvs.OWN_CHAINS[rules.FILTER])
    assert all(set(names) <= ipvs_own for names in own_ipvs.values())
    for table, names in rules.SHARED_CHAINS.items():
        assert set(names) <= set(ipt.NAT_BASE if table == rules.NAT else ipt.FILTER_BASE)
        assert set(names) <= set(kipvs.NAT_CHAINS if table == rules.NAT else kipvs.FILTER_CHAINS)
        assert not set(names) & (set(own_ipt.get(table, ())) | ipvs_own)
    assert set(rules.SHARED_JUMPS) <= set(ipt.BUILTIN_JUMPS) and set(rules.SHARED_JUMPS) <= set(kipvs.JUMPS)
    assert ipt.MASQ_MARK == kipvs.MASQ_MARK == 0x4000


def test_other_mode_present():
    from kube_proxy import rules
    shared = {"nat": ":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n", "filter": ":KUBE-FORWARD - [0:0]\n"}
    assert not rules.other_mode_present("iptables", shared) and not rules.other_mode_present("ipvs", shared)
    with_ipvs = dict(shared, filter=shared["filter"] + ":KUBE-IPVS-FILTER - [0:0]\n")
    assert rules.other_mode_present("iptables", with_ipvs) and not rules.other_mode_present("ipvs", with_ipvs)
    with_ipt = dict(shared, nat=shared["nat"] + ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n")
    assert rules.other_mode_present("ipvs", with_ipt) and not rules.other_mode_present("iptables", with_ipt)
    assert rules.other_mode_present("ipvs", {"filter": ":KUBE-EXTERNAL-SERVICES - [0:0]\n"})
    assert not rules.other_mode_present("ipvs", {})
