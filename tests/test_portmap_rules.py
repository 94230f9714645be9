"""portmap's rule rendering and table parsing, without a kernel (netns_tests/test_portmap.py
runs the plugin for real)."""
import pytest

from cni.errors import CNIError
from cni.plugins import portmap
from cni.skel import CmdArgs
from podnet.net.ip import AF_INET, AF_INET6

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
                   {"name": "veth1", "mac": "aa:aa:aa:aa:aa:02"},
                   {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/var/run/netns/p"}],
    "ips": [{"interface": 1, "address": "10.9.9.9/24"},      # host side: skipped
            {"interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"},
            {"interface": 2, "address": "10.244.1.3/24"},    # second of a family: skipped
            {"interface": 2, "address": "fd00:244:1::2/64"}],
}
CHAIN = "CNI-DN-8d87cf900ee13eb96b07b"      # the reference's name for podnet + ctr-a


def conf(mappings=(), strict=True, **extra):
    c = {"cniVersion": "1.0.0", "name": "podnet", "type": "portmap", "prevResult": PREV,
         "runtimeConfig": {"portMappings": list(mappings)}}
    c.update(extra)
    args = CmdArgs("ADD", "ctr-a", "/var/run/netns/p", "eth0", "", [], b"", c, "1.0.0")
    return portmap.PortMapConf(args, strict=strict)


def test_chain_name_and_container_ips():
    pm = conf()
    assert pm.chain == CHAIN
    assert {f: str(n) for f, n in pm.ips.items()} == {AF_INET: "10.244.1.2/24",
                                                        AF_INET6: "fd00:244:1::2/64"}


def test_mapping_defaults_and_normalisation():
    m = portmap.parse_mapping({"hostPort": 80, "containerPort": 8080}, 0)
    assert (m.protocol, m.host_ip, m.family) == ("tcp", None, None)
    m = portmap.parse_mapping({"hostPort": 80, "containerPort": 1, "protocol": "UDP", "hostIP": "0.0.0.0"}, 0)
    assert (m.protocol, m.host_ip, m.family) == ("udp", None, AF_INET)
    m = portmap.parse_mapping({"hostPort": 80, "containerPort": 1, "hostIP": "FD00:0::1"}, 0)
    assert (m.host_ip, m.family) == ("fd00::1", AF_INET6)


def test_mapping_keys_match_as_gos_json_decoder_does():
    # containerd 1.6 (go-cni) sends its struct's Go field names; the reference decodes them
    # case-insensitively, so a hostPort pod under containerd depends on it
    m = portmap.parse_mapping({"HostPort": 30080, "ContainerPort": 8080, "Protocol": "UDP", "HostIP": ""}, 0)
    assert (m.host_port, m.container_port, m.protocol, m.host_ip) == (30080, 8080, "udp", None)
    m = portmap.parse_mapping({"hostPort": 80, "HostPort": 81, "containerPort": 1}, 0)
    assert m.host_port == 80      # the exact key first, as Go does


@pytest.mark.parametrize("entry, message", [
    ({"containerPort": 1}, "Invalid host port number: missing"),
    ({"hostPort": 65536, "containerPort": 1}, "Invalid host port number: 65536"),
    ({"hostPort": 1, "containerPort": -1}, "Invalid container port number: -1"),
    ({"hostPort": 1.0, "containerPort": 1}, "Invalid host port number: 1.0"),
    ({"hostPort": 1, "containerPort": 1, "protocol": "icmp"}, "Unknown protocol"),
    ({"hostPort": 1, "containerPort": 1, "protocol": 6}, "Unknown protocol"),
    ({"hostPort": 1, "containerPort": 1, "hostIP": "1.2.3"}, "Invalid hostIP"),
])
def test_bad_mappings(entry, message):
    with pytest.raises(CNIError) as e:
        portmap.parse_mapping(entry, 0)
    assert e.value.code == 7 and message in e.value.msg


def test_dnat_rules_as_iptables_save_prints_them():
    pm = conf([{"hostPort": 8080, "containerPort": 80},
               {"hostPort": 9090, "containerPort": 90, "protocol": "udp", "hostIP": "192.168.50.1"},
               {"hostPort": 9091, "containerPort": 91, "hostIP": "fd00::1"}])
    assert portmap.dnat_rules(pm, AF_INET, pm.ips[AF_INET]) == [
        "-A %s -s 10.244.1.0/24 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK" % CHAIN,
        "-A %s -s 127.0.0.1/32 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK" % CHAIN,
        "-A %s -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.1.2:80" % CHAIN,
        "-A %s -s 10.244.1.0/24 -d 192.168.50.1/32 -p udp -m udp --dport 9090 -j CNI-HOSTPORT-SETMARK" % CHAIN,
        "-A %s -s 127.0.0.1/32 -d 192.168.50.1/32 -p udp -m udp --dport 9090 -j CNI-HOSTPORT-SETMARK" % CHAIN,
        "-A %s -d 192.168.50.1/32 -p udp -m udp --dport 9090 -j DNAT --to-destination 10.244.1.2:90" % CHAIN,
    ]
    assert portmap.dnat_rules(pm, AF_INET6, pm.ips[AF_INET6]) == [
        "-A %s -s fd00:244:1::/64 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK" % CHAIN,
        "-A %s -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:244:1::2]:80" % CHAIN,
        "-A %s -s fd00:244:1::/64 -d fd00::1/128 -p tcp -m tcp --dport 9091 -j CNI-HOSTPORT-SETMARK" % CHAIN,
        "-A %s -d fd00::1/128 -p tcp -m tcp --dport 9091 -j DNAT --to-destination [fd00:244:1::2]:91" % CHAIN,
    ]
    nosnat = conf([{"hostPort": 8080, "containerPort": 80}], snat=False)
    assert portmap.dnat_rules(nosnat, AF_INET, nosnat.ips[AF_INET]) == [
        "-A %s -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.1.2:80" % CHAIN]
    ext = conf([{"hostPort": 8080, "containerPort": 80}], externalSetMarkChain="KUBE-MARK-MASQ")
    assert portmap.dnat_rules(ext, AF_INET, ext.ips[AF_INET])[0].endswith("-j KUBE-MARK-MASQ")


def test_entry_rules_group_by_protocol_fifteen_ports_each():
    pm = conf([{"hostPort": 1000 + i, "containerPort": 1} for i in range(17)]
              + [{"hostPort": 53, "containerPort": 53, "protocol": "udp"}],
              conditionsV4=["-s", "10.0.0.0/8", "-m", "comment", "--comment", 'a "b"'])
    rules = portmap.entry_rules(pm, AF_INET)
    comment = '-m comment --comment "dnat name: \\"podnet\\" id: \\"ctr-a\\""'
    tail = ' -s 10.0.0.0/8 -m comment --comment "a \\"b\\"" -j ' + CHAIN
    assert rules == [
        "-A CNI-HOSTPORT-DNAT %s -m multiport -p tcp --destination-ports %s%s"
        % (comment, ",".join(str(1000 + i) for i in range(15)), tail),
        "-A CNI-HOSTPORT-DNAT %s -m multiport -p tcp --destination-ports 1015,1016%s" % (comment, tail),
        "-A CNI-HOSTPORT-DNAT %s -m multiport -p udp --destination-ports 53%s" % (comment, tail),
    ]
    assert portmap.entry_rules(pm, AF_INET6)[0].endswith("1014 -j " + CHAIN)     # no conditionsV6


def test_add_never_declares_a_shared_chain():
    """`:CHAIN` in --noflush mode flushes it: shared chains are only ever `-N`ed."""
    pm = conf([{"hostPort": 8080, "containerPort": 80}])
    fresh = portmap.add_restore_input(pm, AF_INET, pm.ips[AF_INET], "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")
    lines = fresh.splitlines()
    for chain in ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ"):
        assert "-N " + chain in lines
        assert not any(l.startswith(":" + chain) for l in lines)
    assert ":%s - [0:0]" % CHAIN in lines
    assert lines[-1] == "COMMIT"
    assert '-I POSTROUTING 1 -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ' in lines

    # The table as that restore leaves it: nothing shared is added again, the old
    # jump to our chain is replaced.
    saved = "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]", ":CNI-HOSTPORT-DNAT - [0:0]",
                       ":CNI-HOSTPORT-MASQ - [0:0]", ":CNI-HOSTPORT-SETMARK - [0:0]", ":%s - [0:0]" % CHAIN,
                       "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                       "-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                       '-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ',
                       '-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \\"podnet\\" id: \\"ctr-a\\"" '
                       '-m multiport --dports 7070 -j ' + CHAIN,
                       "-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE",
                       '-A CNI-HOSTPORT-SETMARK -m comment --comment "CNI portfwd masquerade mark" '
                       '-j MARK --set-xmark 0x2000/0x2000', "COMMIT"])
    again = portmap.add_restore_input(pm, AF_INET, pm.ips[AF_INET], saved).splitlines()
    assert not any(l.startswith(("-N", "-I", "-A PREROUTING", "-A OUTPUT", "-A CNI-HOSTPORT-MASQ",
                                 "-A CNI-HOSTPORT-SETMARK")) for l in again)
    assert not any(l.startswith(":CNI-HOSTPORT") for l in again)
    assert again[1].startswith("-D CNI-HOSTPORT-DNAT -p tcp") and again[1].endswith("--dports 7070 -j " + CHAIN)
    # Another mark bit: its own MASQ and SETMARK rules join the existing chains.
    other = conf([{"hostPort": 8080, "containerPort": 80}], markMasqBit=5)
    added = portmap.add_restore_input(other, AF_INET, other.ips[AF_INET], saved).splitlines()
    assert "-A CNI-HOSTPORT-MASQ -m mark --mark 0x20/0x20 -j MASQUERADE" in added
    assert not any(l.startswith("-N") for l in added)


def test_external_set_mark_chain_needs_no_shared_mark_chains():
    pm = conf([{"hostPort": 8080, "containerPort": 80}], externalSetMarkChain="KUBE-MARK-MASQ")
    text = portmap.add_restore_input(pm, AF_INET, pm.ips[AF_INET], "")
    assert "SETMARK" not in text and "MASQ " not in text and "POSTROUTING" not in text


SAVED_OTHERS = "\n".join([
    "*nat",
    ":CNI-DN-aaaa - [0:0]", ":CNI-DN-bbbb - [0:0]", ":CNI-DN-stale - [0:0]",
    '-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \\"n\\" id: \\"a\\"" -m multiport --dports 80 -j CNI-DN-aaaa',
    '-A CNI-HOSTPORT-DNAT -p udp -m comment --comment "dnat name: \\"n\\" id: \\"b\\"" -m multiport --dports 53 -j CNI-DN-bbbb',
    "-A CNI-DN-aaaa -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.2:80",
    "-A CNI-DN-bbbb -d 192.168.1.1/32 -p udp -m udp --dport 53 -j DNAT --to-destination 10.0.0.3:53",
    "-A CNI-DN-stale -p tcp -m tcp --dport 81 -j DNAT --to-destination 10.0.0.4:80",
    "COMMIT",
])


def test_mapped_ports_of_other_live_containers():
    assert portmap.mapped_ports(SAVED_OTHERS, CHAIN) == [
        ("tcp", 80, None, "CNI-DN-aaaa", 'dnat name: "n" id: "a"'),
        ("udp", 53, "192.168.1.1", "CNI-DN-bbbb", 'dnat name: "n" id: "b"'),
    ]
    assert portmap.mapped_ports(SAVED_OTHERS, "CNI-DN-aaaa")[0][3] == "CNI-DN-bbbb"


@pytest.mark.parametrize("mapping, clash", [
    ({"hostPort": 80, "containerPort": 1}, "CNI-DN-aaaa"),
    ({"hostPort": 80, "containerPort": 1, "hostIP": "192.168.1.7"}, "CNI-DN-aaaa"),
    ({"hostPort": 53, "containerPort": 1, "protocol": "udp"}, "CNI-DN-bbbb"),
    ({"hostPort": 53, "containerPort": 1, "protocol": "udp", "hostIP": "192.168.1.1"}, "CNI-DN-bbbb"),
    ({"hostPort": 53, "containerPort": 1, "protocol": "udp", "hostIP": "192.168.1.2"}, None),
    ({"hostPort": 53, "containerPort": 1}, None),
    ({"hostPort": 81, "containerPort": 1}, None),          # a chain nothing jumps to
])
def test_conflicts(mapping, clash):
    pm = conf([mapping])
    if clash is None:
        portmap.check_conflicts(pm, AF_INET, SAVED_OTHERS)
        return
    with pytest.raises(CNIError) as e:
        portmap.check_conflicts(pm, AF_INET, SAVED_OTHERS)
    assert e.value.code == 103 and clash in e.value.details


def test_duplicates_within_one_request():
    with pytest.raises(CNIError) as e:
        conf([{"hostPort": 80, "containerPort": 1}, {"hostPort": 80, "containerPort": 2, "hostIP": "::"}])
    assert e.value.code == 7 and "twice" in e.value.msg
    conf([{"hostPort": 80, "containerPort": 1, "hostIP": "0.0.0.0"},
          {"hostPort": 80, "containerPort": 2, "hostIP": "::"},
          {"hostPort": 80, "containerPort": 3, "protocol": "udp"}])


def test_lenient_parse_for_del():
    pm = conf([{"hostPort": "x"}], strict=False, markMasqBit=99)
    assert not pm.valid and pm.raw_mappings
    pm = conf(strict=False, runtimeConfig={"portMappings": "nope"})
    assert not pm.valid and pm.raw_mappings
    pm = conf(strict=False)
    assert pm.valid and not pm.raw_mappings


def test_diff_del_input():
    assert portmap.diff_del_input(SAVED_OTHERS, (CHAIN,)) is None
    text = portmap.diff_del_input(SAVED_OTHERS, ("CNI-DN-aaaa", "CNI-SN-none"))
    assert text.splitlines() == [
        "*nat",
        '-D CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \\"n\\" id: \\"a\\"" -m multiport --dports 80 -j CNI-DN-aaaa',
        ":CNI-DN-aaaa - [0:0]", "-X CNI-DN-aaaa", "COMMIT"]


def test_comment_is_cut_to_what_iptables_takes():
    args = CmdArgs("ADD", "c" * 300, "", "eth0", "", [], b"", {"name": "n"}, "1.0.0")
    assert len(portmap.PortMapConf(args).comment()) == 255


def test_failed_check_names_the_rule():
    rules = ["-A X -j A", "-A X -j B"]
    assert portmap._failed_rule("iptables-restore: line 3 failed: Bad rule", rules) == "missing: -A X -j B"
    assert portmap._failed_rule("iptables-restore v1.8.9 (nf_tables): Chain 'X' does not exist\n"
                                "Error occurred at line: 2\nTry ...", rules) == "missing: -A X -j A"
    assert portmap._failed_rule("something else", rules) == "something else"


# ---- a " -j " inside a condition (issue 12, defect 5) ------------------------------

def _entry(comment, conditions, chain=CHAIN, ports="8080"):
    return ('-A CNI-HOSTPORT-DNAT -m comment --comment "dnat name: \\"podnet\\" id: \\"%s\\"" '
            "-m multiport -p tcp --destination-ports %s %s -j %s" % (comment, ports, conditions, chain))


# As iptables-save prints them: a comment with spaces is quoted, a bare "-j" is not.
TRICKY = [
    _entry("ctr-a", '-m comment --comment "a -j b"'),
    _entry("ctr-a", "-m comment --comment -j"),
    _entry("ctr-a", '-m comment --comment "-j CNI-DN-other"'),
]


@pytest.mark.parametrize("entry", TRICKY)
def test_del_finds_the_jump_whatever_the_conditions_say(entry):
    """Regression: the jump finder took the first "-j" token, so the jump to the
    container's chain was never deleted and the `-X` of the chain always failed."""
    saved = "\n".join(["*nat", ":CNI-HOSTPORT-DNAT - [0:0]", ":%s - [0:0]" % CHAIN, entry,
                       "-A %s -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.1.2:80" % CHAIN,
                       "COMMIT"])
    text = portmap.diff_del_input(saved, (CHAIN,))
    assert text.splitlines() == ["*nat", "-D" + entry[2:], ":%s - [0:0]" % CHAIN, "-X " + CHAIN, "COMMIT"]
    # a repeated ADD drops that old jump before adding the new one
    pm = conf([{"hostPort": 8080, "containerPort": 80}])
    assert "-D" + entry[2:] in portmap.add_restore_input(pm, AF_INET, pm.ips[AF_INET], saved).splitlines()


@pytest.mark.parametrize("entry", TRICKY)
def test_conflicts_seen_whatever_the_conditions_say(entry):
    other = entry.replace("ctr-a", "ctr-b").replace(CHAIN, "CNI-DN-bbbb")
    saved = "\n".join(["*nat", ":CNI-DN-bbbb - [0:0]", other,
                       "-A CNI-DN-bbbb -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.3:80",
                       "COMMIT"])
    assert [m[:4] for m in portmap.mapped_ports(saved, CHAIN)] == [("tcp", 8080, None, "CNI-DN-bbbb")]


@pytest.mark.parametrize("conditions, message", [
    (["--comment", "x" * 1100], "too long"),
    (["-s", "10.0.0.0/8"] * 800, "too long"),
])
def test_conditions_iptables_restore_cannot_take_are_refused(conditions, message):
    with pytest.raises(CNIError) as e:
        conf([{"hostPort": 80, "containerPort": 1}], conditionsV4=conditions)
    assert e.value.code == 7 and message in e.value.msg


# ---- GC (issue 12, defect 11) ---------------------------------------------------------

def _gc_table(network="podnet"):
    from cni.iptables_names import chain_name
    rows = ["*nat", ":CNI-HOSTPORT-DNAT - [0:0]"]
    chains = {}
    for cid in ("keep", "gone", "x" * 300):
        chain = chain_name(network, cid, "DN-")
        chains[cid] = chain
        comment = 'dnat name: "%s" id: "%s"' % (network, cid)
        if len(comment) > 255:
            comment = comment[:252] + "..."
        rows += [":%s - [0:0]" % chain,
                 "-A CNI-HOSTPORT-DNAT -m comment --comment %s -m multiport -p tcp --destination-ports 80 "
                 "-m comment --comment \"a -j b\" -j %s" % (_quote(comment), chain),
                 "-A %s -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.2:80" % chain]
    return rows, chains


def _quote(text):
    from podnet.net.iptables import quote
    return quote(text)


def test_gc_removes_the_chains_of_attachments_not_valid():
    rows, chains = _gc_table()
    other_rows, other_chains = _gc_table("othernet")
    saved = "\n".join(rows + other_rows[2:] + [
        ":CNI-DN-handmade - [0:0]",      # no comment naming a network: never ours to remove
        "-A CNI-HOSTPORT-DNAT -p tcp -m multiport --destination-ports 81 -j CNI-DN-handmade", "COMMIT"])
    stale = portmap.stale_chains(saved, "podnet", {"keep"})
    assert sorted(stale) == sorted([chains["gone"], chains["x" * 300]])
    text = portmap.diff_del_input(saved, stale)
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT" and lines.count("COMMIT") == 1
    for chain in stale:
        assert "-X " + chain in lines
        assert any(l.startswith("-D CNI-HOSTPORT-DNAT ") and l.endswith("-j " + chain) for l in lines)
    assert not any(chains["keep"] in l or "othernet" in l or "handmade" in l for l in lines)
    assert portmap.stale_chains(saved, "podnet", {"keep", "gone", "x" * 300}) == []


def test_gc_trusts_a_comment_only_if_the_chain_name_matches_it():
    """A jump whose comment names this network but whose chain is not that container's
    hash (made by hand, or by something else) is left alone."""
    from cni.iptables_names import chain_name
    forged = chain_name("podnet", "someone-else", "DN-")
    saved = "\n".join(["*nat", ":%s - [0:0]" % forged,
                       '-A CNI-HOSTPORT-DNAT -m comment --comment "dnat name: \\"podnet\\" id: \\"gone\\"" '
                       "-m multiport -p tcp --destination-ports 80 -j " + forged, "COMMIT"])
    assert portmap.stale_chains(saved, "podnet", set()) == []


@pytest.mark.parametrize("message", [
    "iptables-restore v1.8.9 (nf_tables): unknown option \"--no-such\"\nError occurred at line: {n}\nTry ...",
    "iptables-restore: Bad argument `..-s'\nError occurred at line: {n}\nTry `iptables-restore -h'",
    "iptables-restore: line {n} failed",
])
def test_conditions_iptables_refuses_are_an_invalid_config(message):
    """Found by the corpus: conditions iptables cannot parse made the restore fail, which
    was reported as a kernel failure (101); it is the config's fault (7)."""
    pm = conf([{"hostPort": 8080, "containerPort": 80}], conditionsV4=["--no-such", "x"])
    text = portmap.add_restore_input(pm, AF_INET, pm.ips[AF_INET], "")
    lines = text.splitlines()
    entry = next(i for i, l in enumerate(lines, 1) if l.startswith("-A CNI-HOSTPORT-DNAT "))
    e = portmap.refused_conditions(pm, AF_INET, text, message.format(n=entry))
    assert e is not None and e.code == 7 and "conditionsV4" in e.msg and "--no-such" in e.details
    # another line, or no conditions: not the conditions' fault
    assert portmap.refused_conditions(pm, AF_INET, text, message.format(n=entry - 1)) is None
    plain = conf([{"hostPort": 8080, "containerPort": 80}])
    text = portmap.add_restore_input(plain, AF_INET, plain.ips[AF_INET], "")
    assert portmap.refused_conditions(plain, AF_INET, text, message.format(n=entry)) is None
