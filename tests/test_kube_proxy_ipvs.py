"""The IPVS mode's desired state and its proxier's decisions, without root: a fake kernel
(IPVS table, links and addresses, ipsets, iptables chains) records every change."""
import errno

import pytest

from kube_proxy import ipvs as kipvs
from kube_proxy import model
from kube_proxy.proxier import Config
from kube_proxy.server import MODES, make_proxier
from kube_proxy.tracker import ChangeTracker
from lab import manifests as k8s
from podnet.net import ipvs as nipvs
from podnet.net.ip import IPNet, parse_ip

CIDR = ("10.244.0.0/16",)
CONFIG = Config(cluster_cidr=CIDR, node_ip="192.168.50.1")
NODE_IPS = ("192.168.50.1",)
HTTP = {"name": "http", "port": 80, "targetPort": 8080}
HTTP_EP = {"name": "http", "port": 8080}


# ---- a fake kernel -------------------------------------------------------------------------------

class FakeIpvs:
    def __init__(self, k):
        self.k = k

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def close(self):
        pass

    def services(self):
        return [svc for svc, _ in self.k.vs.values()]

    def dests(self, svc):
        if svc.key not in self.k.vs:
            raise OSError(errno.ESRCH, "No such process")
        return list(self.k.vs[svc.key][1].values())

    def table(self):
        return {key: (svc, dict(dests)) for key, (svc, dests) in self.k.vs.items()}

    def add_service(self, svc):
        assert svc.key not in self.k.vs, svc
        self.k.vs[svc.key] = (svc, {})
        self.k.log.append(("add_service", svc.key))

    def update_service(self, svc):
        self.k.vs[svc.key] = (svc, self.k.vs[svc.key][1])
        self.k.log.append(("update_service", svc.key))

    def del_service(self, svc):
        self.k.vs.pop(svc.key, None)
        self.k.log.append(("del_service", svc.key))

    def flush(self):
        self.k.vs.clear()
        self.k.log.append(("flush",))

    def add_dest(self, svc, dest):
        dests = self.k.vs[svc.key][1]
        assert dest.key not in dests
        dests[dest.key] = nipvs.Dest(dest.address, dest.port, dest.weight)
        self.k.log.append(("add_dest", svc.key, dest.key))

    def update_dest(self, svc, dest):
        old = self.k.vs[svc.key][1][dest.key]
        old.weight = dest.weight
        self.k.log.append(("update_dest", svc.key, dest.key, dest.weight))

    def del_dest(self, svc, dest):
        self.k.vs[svc.key][1].pop(dest.key, None)
        self.k.log.append(("del_dest", svc.key, dest.key))


class FakeLink:
    def __init__(self, index, name, kind):
        self.index, self.name, self.kind, self.up = index, name, kind, False


class FakeAddr:
    def __init__(self, index, net):
        self.index, self.net, self.scope = index, net, 0


class FakeNetlink:
    def __init__(self, k):
        self.k = k

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def link(self, name):
        return self.k.links.get(name)

    def add_dummy(self, name):
        self.k.links[name] = FakeLink(len(self.k.links) + 1, name, "dummy")
        self.k.log.append(("add_dummy", name))

    def del_link(self, index):
        name = next(n for n, link in self.k.links.items() if link.index == index)
        del self.k.links[name]
        self.k.addrs = [a for a in self.k.addrs if a.index != index]
        self.k.log.append(("del_link", name))

    def addrs(self, index=None, family=0):
        return [a for a in self.k.addrs if index is None or a.index == index]

    def add_addr(self, index, net, nodad=False, replace=False, noprefixroute=False):
        assert net.prefixlen == 32 and noprefixroute
        self.k.addrs.append(FakeAddr(index, net))
        self.k.log.append(("add_addr", str(net.ip)))

    def del_addr(self, index, net):
        self.k.addrs = [a for a in self.k.addrs if not (a.index == index and a.net.ip == net.ip)]
        self.k.log.append(("del_addr", str(net.ip)))


BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}


class FakeKernel(kipvs.Kernel):
    def __init__(self, has_ipvs=True):
        super().__init__(4)
        self.has_ipvs = has_ipvs
        self.vs = {}
        self.links = {"lo": FakeLink(1, "lo", ""), "eth0": FakeLink(2, "eth0", "veth")}
        self.addrs = [FakeAddr(1, IPNet(parse_ip("127.0.0.1"), 8)), FakeAddr(2, IPNet(parse_ip("192.168.50.1"), 24))]
        self.sets = {}
        self.chains = {t: {c: [] for c in BUILTIN[t]} for t in BUILTIN}
        self.log = []
        self.sysctls = {}

    def ipvs(self):
        if not self.has_ipvs:
            raise nipvs.IpvsUnavailable(errno.ENOENT, "this kernel has no IPVS (ip_vs): no family 'IPVS'")
        return FakeIpvs(self)

    def netlink(self):
        return FakeNetlink(self)

    def sysctl(self, name, value):
        self.sysctls[name] = value

    # iptables-save / iptables-restore --noflush
    def iptables_save(self, table):
        lines = ["*" + table] + [":%s %s [0:0]" % (c, "ACCEPT" if c in BUILTIN[table] else "-")
                                 for c in self.chains[table]]
        for rules in self.chains[table].values():
            lines += rules
        return "\n".join(lines + ["COMMIT"]) + "\n"

    def iptables_restore(self, text):
        self.log.append(("iptables-restore",))
        chains = {t: {c: list(r) for c, r in cs.items()} for t, cs in self.chains.items()}
        table = None
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chains[table][line[1:].split()[0]] = []
            elif line.startswith("-A "):
                chains[table][line.split()[1]].append(line)
            elif line.startswith("-I "):
                _, chain, _, rest = line.split(" ", 3)
                chains[table][chain].insert(0, "-A %s %s" % (chain, rest))
            elif line.startswith("-D "):
                chain = line.split()[1]
                chains[table][chain].remove("-A " + line[3:])
            elif line.startswith("-X "):
                chain = line.split()[1]
                for rules in chains[table].values():
                    assert not any(r.endswith("-j " + chain) for r in rules), "chain %s in use" % chain
                del chains[table][chain]
        for t in chains:
            for rules in chains[t].values():
                for r in rules:
                    if "--match-set" in r:
                        assert r.split()[r.split().index("--match-set") + 1] in self.sets, r
        self.chains = chains

    # ipset list -n / save / restore
    def ipset(self, args, text=""):
        if args == ["list", "-n"]:
            return "".join(name + "\n" for name in self.sets)
        if args == ["save"]:
            out = []
            for name, members in self.sets.items():
                out.append("create %s %s" % (name, kipvs.SETS[name][0] if name in kipvs.SETS else "hash:ip"))
                out += ["add %s %s" % (name, m) for m in sorted(members)]
            return "\n".join(out) + "\n"
        assert args[0] == "restore"
        self.log.append(("ipset-restore", text.count("\n")))
        for line in text.splitlines():
            verb, name, *rest = line.split(" ", 2)
            if verb == "create":
                self.sets.setdefault(name, set())
            elif verb == "add":
                self.sets[name].add(rest[0])
            elif verb == "del":
                self.sets[name].discard(rest[0])
            elif verb == "destroy":
                for t in self.chains.values():
                    for rules in t.values():
                        assert not any("--match-set %s " % name in r for r in rules), "set %s in use" % name
                self.sets.pop(name, None)
        return ""

    # what a test looks at
    def bound(self):
        dummy = self.links.get(kipvs.DUMMY)
        return sorted(str(a.net.ip) for a in self.addrs if dummy and a.index == dummy.index)

    def servers(self):
        return {key: {d.key: d.weight for d in dests.values()} for key, (_, dests) in self.vs.items()}

    def changes(self):
        out, self.log = self.log, []
        return out


# ---- helpers ------------------------------------------------------------------------------------------

def sp(name="web", ip="10.96.0.10", **kw):
    """One ServicePort (as model builds it)."""
    obj = k8s.service(name, ip, [dict(HTTP, nodePort=kw.pop("node_port"))] if "node_port" in kw else [HTTP],
                      **kw)
    (port,) = model.build_service_ports(obj).values()
    return port


def ep(ip, local=False, ready=True, **kw):
    return model.Endpoint(ip, 8080, ready=ready, is_local=local, node_name="node1" if local else "node2", **kw)


def state_tracker(*services):
    """A ChangeTracker fed with (service object, [(ip, node)]) pairs."""
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    t.replace("Service", [svc for svc, _ in services])
    t.replace("EndpointSlice", [k8s.endpoint_slice(svc["metadata"]["name"], eps, [HTTP_EP])
                                for svc, eps in services if eps])
    return t


def proxier(kernel=None, **kw):
    kw.setdefault("graceful_interval", None)
    kernel = kernel or FakeKernel()
    p = kipvs.IpvsProxier(CONFIG, kernel=kernel, **kw)
    return p, kernel


# ---- rendering one service port --------------------------------------------------------------------------------

def test_cluster_ip_is_a_virtual_server_with_the_ready_endpoints_bound_on_the_dummy():
    port = kipvs.render_port(sp(), [ep("10.244.1.2", local=True), ep("10.244.2.2"), ep("10.244.2.3", ready=False,
                                                                                          serving=False)],
                             CONFIG, NODE_IPS, frozenset(NODE_IPS))
    (vs,) = port.servers
    assert vs.key == ("TCP", "10.96.0.10", 80) and vs.scheduler == "rr" and vs.timeout == 0
    assert vs.dests == {("10.244.1.2", 8080), ("10.244.2.2", 8080)}
    assert port.addresses == ("10.96.0.10",)
    assert set(port.members) == {(kipvs.CLUSTER_IP, "10.96.0.10,tcp:80"),
                                 (kipvs.LOOP_BACK, "10.244.1.2,tcp:8080,10.244.1.2")}    # hairpin: local ones


def test_nodeport_external_ip_and_affinity():
    svc = sp(type="NodePort", node_port=30080, external_ips=["172.30.0.10", "192.168.50.1"],
             session_affinity_timeout=60)
    port = kipvs.render_port(svc, [ep("10.244.2.2")], CONFIG, ("192.168.50.1", "10.0.0.1"),
                             frozenset({"192.168.50.1", "10.0.0.1", "127.0.0.1"}), scheduler="lc")
    keys = [vs.key for vs in port.servers]
    assert keys == [("TCP", "10.96.0.10", 80), ("TCP", "172.30.0.10", 80), ("TCP", "192.168.50.1", 80),
                    ("TCP", "192.168.50.1", 30080), ("TCP", "10.0.0.1", 30080)]
    assert all(vs.timeout == 60 and vs.scheduler == "lc" for vs in port.servers)
    assert all(vs.service().flags == nipvs.F_PERSISTENT for vs in port.servers)
    # an external IP that is the node's own address is not bound again
    assert port.addresses == ("10.96.0.10", "172.30.0.10")
    assert (kipvs.EXTERNAL_IP, "172.30.0.10,tcp:80") in port.members
    assert (kipvs.NODE_PORT["TCP"], "30080") in port.members
    assert not any(name == kipvs.NO_ENDPOINTS for name, _ in port.members)


def test_external_policy_local_uses_local_endpoints_for_external_traffic_only():
    svc = sp(type="LoadBalancer", node_port=30081, load_balancer_ips=["172.30.0.20"],
             external_traffic_policy="Local", health_check_node_port=30200)
    eps = [ep("10.244.1.2", local=True), ep("10.244.2.2")]
    port = kipvs.render_port(svc, eps, CONFIG, NODE_IPS, frozenset(NODE_IPS))
    by_key = {vs.key: vs.dests for vs in port.servers}
    assert by_key[("TCP", "10.96.0.10", 80)] == {("10.244.1.2", 8080), ("10.244.2.2", 8080)}
    assert by_key[("TCP", "172.30.0.20", 80)] == {("10.244.1.2", 8080)}
    assert by_key[("TCP", "192.168.50.1", 30081)] == {("10.244.1.2", 8080)}
    members = set(port.members)
    assert {(kipvs.LB, "172.30.0.20,tcp:80"), (kipvs.LB_LOCAL, "172.30.0.20,tcp:80"),
            (kipvs.NODE_PORT["TCP"], "30081"), (kipvs.NODE_PORT_LOCAL["TCP"], "30081"),
            (kipvs.HEALTH_CHECK, "30200")} <= members
    # no local endpoint: kube-proxy falls back to the cluster's (pods of this node still get answers)
    remote_only = kipvs.render_port(svc, [ep("10.244.2.2")], CONFIG, NODE_IPS, frozenset(NODE_IPS))
    assert {vs.key: vs.dests for vs in remote_only.servers}[("TCP", "172.30.0.20", 80)] == {("10.244.2.2", 8080)}


def test_internal_policy_local_without_local_endpoints_has_no_real_server():
    svc = sp(internal_traffic_policy="Local")
    local = kipvs.render_port(svc, [ep("10.244.1.2", local=True), ep("10.244.2.2")], CONFIG, NODE_IPS)
    assert local.servers[0].dests == {("10.244.1.2", 8080)}
    remote = kipvs.render_port(svc, [ep("10.244.2.2")], CONFIG, NODE_IPS)
    assert remote.servers[0].dests == frozenset()
    assert not any(name == kipvs.NO_ENDPOINTS for name, _ in remote.members)   # it has endpoints, elsewhere


def test_no_endpoints_puts_every_frontend_into_the_reject_set():
    svc = sp(type="NodePort", node_port=30090, external_ips=["172.30.0.10"])
    port = kipvs.render_port(svc, [], CONFIG, NODE_IPS, frozenset(NODE_IPS))
    assert all(vs.dests == frozenset() for vs in port.servers)
    assert {m for name, m in port.members if name == kipvs.NO_ENDPOINTS} == {
        "10.96.0.10,tcp:80", "172.30.0.10,tcp:80", "192.168.50.1,tcp:30090"}
    # terminating but serving endpoints are used when none is ready: not "no endpoints"
    fallback = kipvs.render_port(svc, [ep("10.244.2.2", ready=False, serving=True, terminating=True)],
                                 CONFIG, NODE_IPS)
    assert fallback.servers[0].dests == {("10.244.2.2", 8080)}
    assert not any(name == kipvs.NO_ENDPOINTS for name, _ in fallback.members)


def test_load_balancer_source_ranges():
    svc = sp(type="LoadBalancer", load_balancer_ips=["172.30.0.20"], source_ranges=["10.0.0.0/8", "1.2.3.4/32"])
    port = kipvs.render_port(svc, [ep("10.244.2.2")], CONFIG, NODE_IPS)
    members = set(port.members)
    assert (kipvs.LB_FW, "172.30.0.20,tcp:80") in members
    assert {(kipvs.LB_SOURCE_CIDR, "172.30.0.20,tcp:80,10.0.0.0/8"),
            (kipvs.LB_SOURCE_CIDR, "172.30.0.20,tcp:80,1.2.3.4")} <= members     # ipset prints a /32 bare
    assert port.no_node_access == (("172.30.0.20", "tcp", 80),)                  # the node is not in a range
    mine = sp(type="LoadBalancer", load_balancer_ips=["172.30.0.20"], source_ranges=["192.168.50.0/24"])
    port = kipvs.render_port(mine, [ep("10.244.2.2")], CONFIG, NODE_IPS)
    assert (kipvs.LB_SOURCE_IP, "172.30.0.20,tcp:80,172.30.0.20") in port.members and not port.no_node_access


def test_udp_and_sctp_node_ports():
    obj = k8s.service("dns", "10.96.0.16", [{"name": "dns", "port": 53, "targetPort": 8081, "protocol": "UDP",
                                              "nodePort": 30053},
                                             {"name": "s", "port": 99, "protocol": "SCTP", "nodePort": 30099}],
                      type="NodePort")
    ports = model.build_service_ports(obj)
    udp, sctp = (ports[n] for n in sorted(ports, key=lambda n: n.port))
    assert (kipvs.NODE_PORT["UDP"], "30053") in kipvs.render_port(udp, [], CONFIG, NODE_IPS).members
    members = kipvs.render_port(sctp, [], CONFIG, ("192.168.50.1", "10.0.0.1")).members
    assert {m for name, m in members if name == kipvs.NODE_PORT["SCTP"]} == {"192.168.50.1,sctp:30099",
                                                                               "10.0.0.1,sctp:30099"}


# ---- aggregate, rules, sets ---------------------------------------------------------------------------------

def test_aggregate_refcounts_shared_addresses_and_virtual_servers():
    a = kipvs.render_port(sp("a", "10.96.0.1", external_ips=["172.30.0.10"]), [ep("10.244.1.2")], CONFIG)
    b = kipvs.render_port(sp("b", "10.96.0.2", external_ips=["172.30.0.10"]), [ep("10.244.2.2")], CONFIG)
    agg = kipvs.Aggregate()
    agg.add("a", a)
    agg.add("b", b)
    assert agg.addresses["172.30.0.10"] == 2
    # two Services on one external IP and port: the first name keeps the virtual server
    assert agg.server(("TCP", "172.30.0.10", 80)).dests == {("10.244.1.2", 8080)}
    agg.remove("a")
    assert agg.addresses["172.30.0.10"] == 1 and "10.96.0.1" not in agg.addresses
    assert agg.server(("TCP", "172.30.0.10", 80)).dests == {("10.244.2.2", 8080)}
    assert agg.set_members()[kipvs.IPVS_IPS] == {"10.96.0.2", "172.30.0.10"}
    agg.remove("b")
    assert not agg.servers() and not agg.addresses and not agg.nonempty()


def test_rules_depend_on_which_sets_are_used():
    rules = kipvs.render_rules(frozenset({kipvs.CLUSTER_IP, kipvs.NODE_PORT["TCP"], kipvs.NODE_PORT_LOCAL["TCP"],
                                          kipvs.LOOP_BACK, kipvs.IPVS_IPS, kipvs.NO_ENDPOINTS}), CONFIG)
    nat, filt = rules["nat"], rules["filter"]
    assert nat["KUBE-SERVICES"] == (
        "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN",
        '-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment "Kubernetes service cluster ip + port for '
        'masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ',
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT")
    # Local NodePorts return before the masquerade mark
    assert [r.split("--match-set ")[1].split()[0] for r in nat["KUBE-NODE-PORT"]] == [
        "KUBE-NODE-PORT-LOCAL-TCP", "KUBE-NODE-PORT-TCP"]
    assert nat["KUBE-POSTROUTING"][0].endswith("--match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE")
    assert nat["KUBE-MARK-MASQ"] == ("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",)
    assert filt["KUBE-IPVS-FILTER"][0] == (
        '-A KUBE-IPVS-FILTER -m comment --comment "Kubernetes service ip + port without endpoints" -m conntrack '
        '--ctstate NEW -m set --match-set KUBE-NO-ENDPOINTS dst,dst -j REJECT --reject-with icmp-port-unreachable')
    assert filt["KUBE-IPVS-FILTER"][-1].endswith("--match-set KUBE-IPVS-IPS dst -j REJECT --reject-with "
                                                 "icmp-port-unreachable")
    # nothing in LB sets: no rule names them except the unconditional filter RETURNs
    assert not any("KUBE-LOAD-BALANCER " in r for r in nat["KUBE-SERVICES"])
    everything = kipvs.render_rules(frozenset(kipvs.SETS), Config(masquerade_all=True), (("172.30.0.20", "tcp", 80),))
    text = "\n".join(r for t in everything.values() for rs in t.values() for r in rs)
    for name in kipvs.SETS:
        assert "--match-set %s " % name in text, name
    assert "-m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ" in text
    assert "-A KUBE-IPVS-OUT-FILTER -s 172.30.0.20/32 -m ipvs --vproto 6 --vaddr 172.30.0.20 --vport 80 -j DROP" \
        in text
    no_cidr = kipvs.render_rules(frozenset({kipvs.CLUSTER_IP}), Config())
    assert "--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ" in no_cidr["nat"]["KUBE-SERVICES"][1]


def test_rules_restore_input_writes_only_differing_chains_and_parses_back():
    rules = kipvs.render_rules(frozenset({kipvs.CLUSTER_IP}), CONFIG)
    text = kipvs.rules_restore_input(rules)
    assert text.startswith("*filter\n") and "COMMIT\n*nat\n" in text
    saved = {t: "*%s\n%s\n" % (t, "\n".join([":%s - [0:0]" % c for c in rules[t]] +
                                            [r for rs in rules[t].values() for r in rs])) for t in rules}
    parsed = {t: kipvs.parse_saved(saved[t], t) for t in saved}
    assert parsed == rules
    assert kipvs.rules_restore_input(rules, parsed) == ""
    changed = kipvs.render_rules(frozenset({kipvs.CLUSTER_IP, kipvs.LB}), CONFIG)
    text = kipvs.rules_restore_input(changed, parsed)
    assert ":KUBE-SERVICES - [0:0]" in text and ":KUBE-FORWARD" not in text and "*filter" not in text


def test_ipset_restore_input_and_save_parsing():
    saved = ("create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 "
             "initval 0x1\nadd KUBE-CLUSTER-IP 10.96.0.10,tcp:80\nadd KUBE-CLUSTER-IP 10.96.0.11,tcp:80\n"
             "create OTHER hash:ip\nadd OTHER 1.2.3.4\n")
    have = kipvs.parse_ipset_save(saved)
    assert have == {kipvs.CLUSTER_IP: {"10.96.0.10,tcp:80", "10.96.0.11,tcp:80"}}
    text = kipvs.ipset_restore_input({kipvs.CLUSTER_IP: frozenset({"10.96.0.10,tcp:80", "10.96.0.12,tcp:80"})},
                                     have)
    lines = text.splitlines()
    assert "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535" in lines
    assert "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536" not in lines
    assert lines[-2:] == ["add KUBE-CLUSTER-IP 10.96.0.12,tcp:80", "del KUBE-CLUSTER-IP 10.96.0.11,tcp:80"]
    assert "OTHER" not in text


def test_cleanup_input_alone_and_beside_the_iptables_mode():
    rules = kipvs.render_rules(frozenset({kipvs.CLUSTER_IP, kipvs.NODE_PORT["TCP"]}), CONFIG)
    k = FakeKernel()
    k.sets = {name: set() for name in kipvs.SETS}
    k.iptables_restore(kipvs.jumps_input({"filter": "", "nat": ""}))
    k.iptables_restore(kipvs.rules_restore_input(rules))
    saved = {t: k.iptables_save(t) for t in ("filter", "nat")}
    unlink, delete = kipvs.cleanup_input(saved)
    assert "-D PREROUTING" in unlink and "-X" not in unlink and "-X KUBE-SERVICES" in delete
    k.iptables_restore(unlink)
    k.iptables_restore(delete)
    assert k.chains == {t: {c: [] for c in BUILTIN[t]} for t in BUILTIN}

    # the iptables mode is there too (its restart runs our cleanup): its chains and jumps stay
    k = FakeKernel()
    k.sets = {name: set() for name in kipvs.SETS}
    k.iptables_restore(kipvs.jumps_input({"filter": "", "nat": ""}))
    k.iptables_restore(kipvs.rules_restore_input(rules))
    k.iptables_restore("*nat\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SVC-ABC - [0:0]\n"
                       "-A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-ABC\nCOMMIT\n")
    for text in kipvs.cleanup_input({t: k.iptables_save(t) for t in ("filter", "nat")}):
        k.iptables_restore(text)
    nat, filt = k.chains["nat"], k.chains["filter"]
    assert "KUBE-NODE-PORT" not in nat and "KUBE-LOAD-BALANCER" not in nat and "KUBE-IPVS-FILTER" not in filt
    assert nat["KUBE-SERVICES"] == ["-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN",
                                    "-A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-ABC"]
    assert nat["PREROUTING"] == ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES']
    assert filt["INPUT"] == [] and filt["OUTPUT"] == []
    assert filt["FORWARD"] == ['-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD']
    assert "KUBE-MARK-MASQ" in nat and "KUBE-POSTROUTING" in nat
    # nothing of ours left: nothing to do
    assert kipvs.cleanup_input({t: k.iptables_save(t) for t in ("filter", "nat")}) == []


# ---- the proxier against the fake kernel -------------------------------------------------------------------------------

def web_services():
    return [
        (k8s.service("web", "10.96.0.10", [dict(HTTP, nodePort=30080)], type="NodePort",
                     external_ips=["172.30.0.10"]),
         [("10.244.1.2", "node1"), ("10.244.2.2", "node2")]),
        (k8s.service("sticky", "10.96.0.12", [HTTP], session_affinity_timeout=60), [("10.244.2.3", "node2")]),
        (k8s.service("empty", "10.96.0.13", [HTTP]), []),
    ]


def test_setup_creates_the_dummy_sets_chains_and_jumps_once():
    p, k = proxier()
    p.setup()
    assert k.links[kipvs.DUMMY].kind == "dummy" and not k.links[kipvs.DUMMY].up
    assert set(k.sets) == set(kipvs.SETS)
    assert k.sysctls["net/ipv4/vs/conntrack"] == 1 and k.sysctls["net/ipv4/vs/expire_nodest_conn"] == 1
    assert '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER' in \
        k.chains["filter"]["INPUT"]
    k.changes()
    p.setup()
    assert k.changes() == []


def test_setup_on_a_kernel_without_ipvs_exits_with_one_clear_line():
    p, _ = proxier(FakeKernel(has_ipvs=False))
    with pytest.raises(SystemExit) as e:
        p.setup()
    assert "this kernel has no IPVS (ip_vs)" in str(e.value.code)


def test_full_sync_programs_everything_and_a_rerun_changes_nothing():
    p, k = proxier()
    p.setup()
    t = state_tracker(*web_services())
    result = p.sync(t.take())
    assert result.full and p.synced and result.chains_written > 0
    assert k.servers() == {
        ("TCP", "10.96.0.10", 80): {("10.244.1.2", 8080): 1, ("10.244.2.2", 8080): 1},
        ("TCP", "172.30.0.10", 80): {("10.244.1.2", 8080): 1, ("10.244.2.2", 8080): 1},
        ("TCP", "192.168.50.1", 30080): {("10.244.1.2", 8080): 1, ("10.244.2.2", 8080): 1},
        ("TCP", "10.96.0.12", 80): {("10.244.2.3", 8080): 1},
        ("TCP", "10.96.0.13", 80): {},
    }
    sticky = k.vs[("TCP", "10.96.0.12", 80)][0]
    assert sticky.flags == nipvs.F_PERSISTENT and sticky.timeout == 60 and sticky.netmask == 0xFFFFFFFF
    assert k.bound() == ["10.96.0.10", "10.96.0.12", "10.96.0.13", "172.30.0.10"]
    assert k.sets[kipvs.CLUSTER_IP] == {"10.96.0.10,tcp:80", "10.96.0.12,tcp:80", "10.96.0.13,tcp:80"}
    assert k.sets[kipvs.NO_ENDPOINTS] == {"10.96.0.13,tcp:80"}
    assert k.sets[kipvs.NODE_PORT["TCP"]] == {"30080"}
    assert k.sets[kipvs.LOOP_BACK] == {"10.244.1.2,tcp:8080,10.244.1.2"}
    assert k.sets[kipvs.IPVS_IPS] == {"10.96.0.10", "10.96.0.12", "10.96.0.13", "172.30.0.10"}
    assert result.rules["nat"] == sum(len(r) for r in k.chains["nat"].values()) - 3     # minus the jumps
    k.changes()
    t.request_full_sync()
    again = p.sync(t.take())
    assert again.full and again.chains_written == 0
    assert [c for c in k.changes() if c[0] not in ()] == []


def test_partial_sync_touches_only_the_changed_service():
    p, k = proxier()
    p.setup()
    t = state_tracker(*web_services())
    p.sync(t.take())
    k.changes()
    t.update_slice(k8s.endpoint_slice("sticky", [("10.244.2.3", "node2"), ("10.244.2.4", "node2")], [HTTP_EP]))
    result = p.sync(t.take())
    assert not result.full and result.changed == 1
    assert k.changes() == [("add_dest", ("TCP", "10.96.0.12", 80), ("10.244.2.4", 8080))]
    # a new Service: its virtual server, address and set members; the rules stay (no set became non-empty)
    t.update_service(k8s.service("new", "10.96.0.20", [HTTP]))
    t.update_slice(k8s.endpoint_slice("new", [("10.244.2.9", "node2")], [HTTP_EP]))
    p.sync(t.take())
    changes = k.changes()
    assert ("add_service", ("TCP", "10.96.0.20", 80)) in changes and ("add_addr", "10.96.0.20") in changes
    assert ("iptables-restore",) not in changes
    assert "10.96.0.20,tcp:80" in k.sets[kipvs.CLUSTER_IP] and "10.96.0.20" in k.sets[kipvs.IPVS_IPS]
    assert {c[1] for c in changes if c[0] in ("add_service", "add_dest")} == {("TCP", "10.96.0.20", 80)}
    # the empty Service gets an endpoint: out of the reject set, and that set's rule goes (it is now empty)
    t.update_slice(k8s.endpoint_slice("empty", [("10.244.2.5", "node2")], [HTTP_EP]))
    p.sync(t.take())
    assert k.sets[kipvs.NO_ENDPOINTS] == set()
    assert not any("KUBE-NO-ENDPOINTS" in r for r in k.chains["filter"]["KUBE-IPVS-FILTER"])
    # a removed Service: its virtual servers, address, members go; a rerun (full) then changes nothing
    t.delete_service(("default", "web"))
    p.sync(t.take())
    assert not any(key[1] in ("10.96.0.10", "172.30.0.10", "192.168.50.1") for key in k.vs)
    assert "10.96.0.10" not in k.bound() and "172.30.0.10" not in k.bound()
    assert k.sets[kipvs.NODE_PORT["TCP"]] == set() and k.sets[kipvs.EXTERNAL_IP] == set()
    k.changes()
    t.request_full_sync()
    assert p.sync(t.take()).chains_written == 0 and k.changes() == []


def test_full_sync_repairs_drift():
    p, k = proxier()
    p.setup()
    t = state_tracker(*web_services())
    p.sync(t.take())
    del k.vs[("TCP", "10.96.0.12", 80)]
    k.vs[("TCP", "10.96.0.99", 80)] = (nipvs.Service("TCP", "10.96.0.99", 80), {})    # a stale one
    k.sets[kipvs.CLUSTER_IP].discard("10.96.0.10,tcp:80")
    k.chains["nat"]["KUBE-SERVICES"].pop()
    k.addrs = [a for a in k.addrs if str(a.net.ip) != "10.96.0.13"]
    k.changes()
    t.request_full_sync()
    result = p.sync(t.take())
    # the missing virtual server and its real server, the stale one, the member, the address, one restore
    assert result.chains_written == 6
    assert ("TCP", "10.96.0.99", 80) not in k.vs and k.vs[("TCP", "10.96.0.12", 80)][1]
    assert "10.96.0.10,tcp:80" in k.sets[kipvs.CLUSTER_IP] and "10.96.0.13" in k.bound()


def test_node_addresses_change_moves_the_node_ports():
    p, k = proxier()
    p.setup()
    t = state_tracker(*web_services())
    p.sync(t.take())
    k.addrs.append(FakeAddr(2, IPNet(parse_ip("192.168.60.1"), 24)))
    t.request_full_sync()
    p.sync(t.take())
    assert ("TCP", "192.168.60.1", 30080) in k.vs and ("TCP", "192.168.50.1", 30080) in k.vs
    assert not any(key[1] == "127.0.0.1" for key in k.vs)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_removed_endpoint_is_drained_gracefully():
    clock = Clock()
    p, k = proxier(grace_period=30, clock=clock)
    p.setup()
    t = state_tracker(*web_services())
    p.sync(t.take())
    key = ("TCP", "10.96.0.10", 80)
    busy = k.vs[key][1][("10.244.2.2", 8080)]
    busy.active, busy.inactive = 1, 2
    k.changes()
    t.update_slice(k8s.endpoint_slice("web", [("10.244.1.2", "node1")], [HTTP_EP]))
    p.sync(t.take())
    # still has connections here: weight 0 (no new ones) but kept; without any, deleted at once
    assert k.servers()[key] == {("10.244.1.2", 8080): 1, ("10.244.2.2", 8080): 0}
    assert ("10.244.2.2", 8080) not in k.servers()[("TCP", "192.168.50.1", 30080)]
    assert (key, ("10.244.2.2", 8080)) in p.terminating
    clock.now += 10
    assert p.reap_terminating() == 0
    busy.active = 0
    clock.now += 1
    assert p.reap_terminating() == 0          # inactive ones still count
    busy.inactive = 0
    assert p.reap_terminating() == 1 and ("10.244.2.2", 8080) not in k.servers()[key]
    assert not p.terminating


def test_grace_period_ends_the_wait_and_a_returning_endpoint_gets_its_weight_back():
    clock = Clock()
    p, k = proxier(grace_period=30, clock=clock)
    p.setup()
    t = state_tracker(*web_services())
    p.sync(t.take())
    key = ("TCP", "10.96.0.10", 80)
    k.vs[key][1][("10.244.2.2", 8080)].active = 5
    k.vs[("TCP", "172.30.0.10", 80)][1][("10.244.2.2", 8080)].active = 5
    web_eps = [("10.244.1.2", "node1"), ("10.244.2.2", "node2")]
    t.update_slice(k8s.endpoint_slice("web", web_eps[:1], [HTTP_EP]))
    p.sync(t.take())
    t.update_slice(k8s.endpoint_slice("web", web_eps, [HTTP_EP]))
    p.sync(t.take())
    assert k.servers()[key][("10.244.2.2", 8080)] == 1 and not p.terminating
    t.update_slice(k8s.endpoint_slice("web", web_eps[:1], [HTTP_EP]))
    p.sync(t.take())
    clock.now += 31
    assert p.reap_terminating() == 2
    assert ("10.244.2.2", 8080) not in k.servers()[key]


def test_udp_real_servers_are_removed_at_once():
    p, k = proxier()
    p.setup()
    dns = k8s.service("dns", "10.96.0.16", [{"name": "dns", "port": 53, "targetPort": 8081, "protocol": "UDP"}])
    t = ChangeTracker(hostname="node1", min_sync_period=0)
    t.replace("Service", [dns])
    port = [{"name": "dns", "port": 8081, "protocol": "UDP"}]
    t.replace("EndpointSlice", [k8s.endpoint_slice("dns", [("10.244.1.3", "node1"), ("10.244.2.3", "node2")], port)])
    p.sync(t.take())
    k.vs[("UDP", "10.96.0.16", 53)][1][("10.244.2.3", 8081)].inactive = 3
    t.update_slice(k8s.endpoint_slice("dns", [("10.244.1.3", "node1")], port))
    p.sync(t.take())
    assert k.servers()[("UDP", "10.96.0.16", 53)] == {("10.244.1.3", 8081): 1}


def test_cleanup_removes_everything_and_is_safe_without_ipvs():
    p, k = proxier()
    p.setup()
    p.sync(state_tracker(*web_services()).take())
    p.cleanup()
    assert k.vs == {} and kipvs.DUMMY not in k.links and k.sets == {}
    assert k.chains == {t: {c: [] for c in BUILTIN[t]} for t in BUILTIN}
    k.changes()
    p.cleanup()
    assert k.changes() == []
    bare = FakeKernel(has_ipvs=False)
    kipvs.IpvsProxier(CONFIG, kernel=bare, graceful_interval=None).cleanup()
    assert bare.changes() == []


def test_scheduler_from_the_config_or_the_argument_and_registration():
    assert "ipvs" in MODES and make_proxier("ipvs", CONFIG).mode == "ipvs"
    assert kipvs.IpvsProxier(CONFIG, kernel=FakeKernel()).scheduler == "rr"
    assert kipvs.IpvsProxier(CONFIG, scheduler="sh", kernel=FakeKernel()).scheduler == "sh"
    p, k = proxier(scheduler="lc")
    p.setup()
    p.sync(state_tracker(*web_services()).take())
    assert {svc.scheduler for svc, _ in k.vs.values()} == {"lc"}
