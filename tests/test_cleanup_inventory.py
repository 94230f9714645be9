"""`podnet cleanup`'s pure half (cli/cleanup.py): what is ours, from the record, the configs and
what the kernel shows; and nothing else. No root: plain data in, lines out.
(netns_tests/test_podnet_cleanup.py runs the whole command on lab nodes.)"""
from cli import cleanup
from cli.cleanup import Kernel, LinkInfo, kernel_inventory, targets_from
from cni.iptables_names import chain_name, owner_comment
from podnet.net.iptables import quote


def dn_rule(network, cid, port):
    """portmap's jump into a container's chain, as iptables-save prints it."""
    return "-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment %s -m multiport --dports %d -j %s" % (
        quote(owner_comment(network, cid, "dnat ")), port, chain_name(network, cid, "DN-"))


def masq_jump(network, cid):
    """the bridge plugin's jump into a container's masquerade chain."""
    return "-A POSTROUTING -s 10.244.1.5/32 -m comment --comment %s -j %s" % (
        quote(owner_comment(network, cid)), chain_name(network, cid))


def nat(*rules, chains=()):
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]
    lines += [":%s - [0:0]" % c for c in chains] + list(rules) + ["COMMIT"]
    return "\n".join(lines) + "\n"


def test_targets_come_from_the_record_and_the_plugins_own_keys():
    record = {"conflists": [{"path": "/etc/cni/net.d/10-flannel.conflist", "network": "cbr0", "sha256": "ab"}]}
    configs = {"/etc/cni/net.d/10-flannel.conflist": {"name": "cbr0", "plugins": [
        {"type": "flannel", "subnetFile": "/run/f/subnet.env", "delegate": {"bridge": "br-pods"},
         "ipam": {"dataDir": "/data/ipam"}},
        {"type": "portmap"}]}}
    t = targets_from(record, configs, networks=["extra"])
    assert t.networks == {"cbr0", "extra"}
    assert t.conflists == {"/etc/cni/net.d/10-flannel.conflist": "ab"}
    assert t.bridges == {"br-pods"}
    assert t.ipam_dirs == {"/data/ipam/cbr0", "/var/lib/cni/networks/extra"}
    assert t.subnet_files == {"/run/f/subnet.env", cleanup.DEFAULT_SUBNET_FILE}
    assert t.flannel_data_dirs == {cleanup.DEFAULT_FLANNEL_DATA_DIR}
    calico = targets_from({}, {"c": {"name": "k8s-pod-network", "plugins": [
        {"type": "calico", "nodeBlocksFile": "/run/x/blocks", "ipam": {"type": "host-local"}}]}})
    assert calico.blocks_files == {"/run/x/blocks", cleanup.DEFAULT_BLOCKS_FILE}
    assert calico.ipam_dirs == {"/var/lib/cni/networks/k8s-pod-network"} and calico.bridges == set()
    assert targets_from({}, {}).bridges == {"cni0"}       # nothing recorded: the stock bridge name


def test_only_our_chains_devices_and_routes():
    ours_dn = chain_name("cbr0", "c1", "DN-")
    ours_masq = chain_name("cbr0", "c2")
    kernel = Kernel(
        iptables={("ip", "nat"): nat(
            dn_rule("cbr0", "c1", 8080), masq_jump("cbr0", "c2"),
            "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
            '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
            "-A POSTROUTING -j DOCKER-POSTROUTING",
            chains=("CNI-HOSTPORT-DNAT", ours_dn, ours_masq, "KUBE-POSTROUTING", "KUBE-SVC-ABC", "KUBE-KUBELET-CANARY",
                    "KUBE-FIREWALL", "DOCKER-POSTROUTING", "FLANNEL-POSTRTG")),
            ("ip", "filter"): "*filter\n:FORWARD ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n:KUBE-FIREWALL - [0:0]\n"
                              ":KUBE-FORWARD - [0:0]\nCOMMIT\n"},
        nft_tables=[("ip", "nat"), ("ip", "kube-proxy"), ("inet", "podnet-network-policy"), ("inet", "firewalld")],
        links=[LinkInfo("eth0", "veth"), LinkInfo("flannel.1", "vxlan"), LinkInfo("vxlan0", "vxlan"),
               LinkInfo("cni0", "bridge"), LinkInfo("veth1234", "veth", "cni0"),
               LinkInfo("docker0", "bridge"), LinkInfo("vethd0c", "veth", "docker0"),
               LinkInfo("cali0123456789a", "veth"), LinkInfo("flannel0", "tun"), LinkInfo("tun0", "tun"),
               LinkInfo("tunl0", "ipip"), LinkInfo("kube-ipvs0", "dummy")],
        routes=[("ip", 77, "10.244.2.0/24"), ("ip", 78, "10.65.0.0/26"), ("ip", 2, "192.168.50.0/24"),
                ("ip", 4, "10.0.0.0/8")])
    lines = kernel_inventory(kernel, targets_from({}, {}, networks=["cbr0"]))
    assert lines == [
        "iptables filter chain FLANNEL-FWD",
        "iptables filter chain KUBE-FORWARD",
    ] + ["iptables nat chain %s" % c for c in sorted(
        [ours_dn, ours_masq, "CNI-HOSTPORT-DNAT", "FLANNEL-POSTRTG", "KUBE-POSTROUTING", "KUBE-SVC-ABC"])] + [
        "nft table inet podnet-network-policy",
        "nft table ip kube-proxy",
        "link cali0123456789a (veth)",
        "link cni0 (bridge)",
        "link flannel.1 (vxlan)",
        "link flannel0 (tun)",
        "link kube-ipvs0 (dummy)",
        "link veth1234 (veth)",
        "route 10.244.2.0/24 proto 77 (flanneld)",
        "route 10.65.0.0/26 proto 78 (calico-lite)",
    ]
    # kubelet's KUBE-FIREWALL / KUBE-KUBELET-CANARY, docker's chains and devices, a tunl0 that is
    # down without addresses, other vxlan and tun devices, kernel and static routes: not ours


def test_shared_hostport_chains_stay_while_another_network_maps_ports():
    theirs = chain_name("other", "c9", "DN-")
    saved = nat(dn_rule("cbr0", "c1", 8080), dn_rule("other", "c9", 9090),
                chains=("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", chain_name("cbr0", "c1", "DN-"), theirs))
    assert cleanup.cni_chains(saved, ["cbr0"]) == [chain_name("cbr0", "c1", "DN-")]
    assert set(cleanup.cni_chains(saved, ["cbr0", "other"])) == {
        chain_name("cbr0", "c1", "DN-"), theirs, "CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK"}


def test_a_tunl0_calico_configured_is_reported():
    kernel = Kernel(links=[LinkInfo("tunl0", "ipip", up=True, addresses=("10.65.0.1/32",))])
    assert kernel_inventory(kernel, targets_from({}, {})) == ["link tunl0 configuration (up, addresses 10.65.0.1/32)"]


def test_chain_removal_unlinks_first_then_deletes():
    saved = nat("-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                "-A CNI-HOSTPORT-DNAT -j CNI-DN-x", chains=("CNI-HOSTPORT-DNAT", "CNI-DN-x"))
    first, second = cleanup.chain_removal(saved, "nat", ["CNI-HOSTPORT-DNAT", "CNI-DN-x", "CNI-GONE"])
    assert first == ("*nat\n-D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n"
                     "-F CNI-HOSTPORT-DNAT\n-F CNI-DN-x\nCOMMIT\n")
    assert second == "*nat\n-X CNI-HOSTPORT-DNAT\n-X CNI-DN-x\nCOMMIT\n"
    assert cleanup.chain_removal(saved, "nat", ["CNI-GONE"]) == []
