"""flanneld backends and ipmasq as pure functions, no root, no kernel.

- desired() of vxlan and host-gw from lease sets: the entries flannel would
  program, and every lease that must be skipped (another backend type, no or
  a bad VtepMAC, IPv6, outside the network, ours, duplicates; for host-gw a
  remote off our L2 segment) is skipped with a log line, the others kept.
- the plain-data diff the syncs are built on.
- ipmasq: flannel's rule layout rendered in iptables-save spelling, and the
  restore input computed from a saved table (nothing when up to date, the
  jump only once, stale rules replaced, removal).

Constructing a backend opens no socket (it is opened on first use), which
these tests check by never having one.
"""
import logging

import pytest

from flanneld import config as cfgmod
from flanneld import ipmasq
from flanneld.backend import backend_class
from flanneld.backend.base import Backend, ExternalInterface
from flanneld.backend.host_gw import HostGWBackend
from flanneld.backend.routes import diff, routes_by_dst
from flanneld.backend.vxlan import VXLANBackend, parse_mac, random_mac
from flanneld.subnet import Lease
from podnet.net.ip import parse_cidr, parse_ip

MAC2, MAC3, MAC4 = "0a:00:00:00:00:02", "0a:00:00:00:00:03", "0a:00:00:00:00:04"


def config(backend=None):
    return cfgmod.parse({"Network": "10.244.0.0/16", "Backend": backend or {"Type": "vxlan"}})


def ext(ip="192.168.50.1", prefixlen=24, mtu=1500):
    return ExternalInterface("eth0", 2, parse_ip(ip), prefixlen, mtu)


def lease(subnet, public_ip, backend_type="vxlan", mac=None, **data):
    if mac is not None:
        data["VtepMAC"] = mac
    return Lease(parse_cidr(subnet).masked(), parse_ip(public_ip), backend_type, data)


def vxlan(backend=None, **kw):
    b = VXLANBackend(config(backend), ext(**kw))
    b.own = lease("10.244.1.0/24", "192.168.50.1", mac="0a:00:00:00:00:01")
    b.mac = "0a:00:00:00:00:01"
    return b


def hostgw(**kw):
    b = HostGWBackend(config({"Type": "host-gw"}), ext(**kw))
    b.configure(lease("10.244.1.0/24", "192.168.50.1", "host-gw"))
    return b


# ---- vxlan ---------------------------------------------------------------------

def test_backend_class_finds_ours():
    assert backend_class("vxlan") is VXLANBackend
    assert backend_class("host-gw") is HostGWBackend


@pytest.mark.parametrize("kind", ["vxlan", "host-gw", "udp"])
def test_every_backend_implements_the_contract(kind):
    cls = backend_class(kind)
    assert issubclass(cls, Backend) and cls.type == kind
    assert not cls.__abstractmethods__      # register, configure, desired, sync, close


def test_a_backend_missing_a_method_cannot_be_made():
    class Half(Backend):
        type = "half"

        def register(self):
            return {}, 1500

    with pytest.raises(TypeError, match="abstract"):
        Half(config(), ext())


def test_vxlan_defaults():
    b = VXLANBackend(config(), ext(mtu=9001))
    assert (b.name, b.vni, b.port, b.learning, b.mtu) == ("flannel.1", 1, 8472, False, 8951)
    assert b._nl is None                     # no socket until something touches the kernel


def test_vxlan_options():
    b = VXLANBackend(config({"Type": "vxlan", "VNI": 42, "Port": 4789}), ext())
    assert (b.name, b.vni, b.port) == ("flannel.42", 42, 4789)
    assert VXLANBackend(config({"Type": "vxlan", "Port": 0}), ext()).port == 8472   # flannel: 0 = default


@pytest.mark.parametrize("bad", [{"VNI": -1}, {"VNI": "1"}, {"VNI": True}, {"VNI": 10 ** 7},
                                 {"Port": 70000}, {"Port": 1.5}])
def test_vxlan_bad_options(bad):
    with pytest.raises(ValueError, match="vxlan"):
        VXLANBackend(config(dict(bad, Type="vxlan")), ext())


def test_vxlan_desired_two_remotes():
    b = vxlan()
    want = b.desired([lease("10.244.3.0/24", "192.168.50.3", mac=MAC3),
                      lease("10.244.2.0/24", "192.168.50.2", mac=MAC2.upper())])
    assert want == {
        "routes": [
            {"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "flannel.1", "onlink": True},
            {"dst": "10.244.3.0/24", "via": "10.244.3.0", "dev": "flannel.1", "onlink": True},
        ],
        "neighbours": [
            {"ip": "10.244.2.0", "mac": MAC2, "dev": "flannel.1"},      # lower-cased
            {"ip": "10.244.3.0", "mac": MAC3, "dev": "flannel.1"},
        ],
        "fdb": [
            {"mac": MAC2, "dst": "192.168.50.2", "dev": "flannel.1"},
            {"mac": MAC3, "dst": "192.168.50.3", "dev": "flannel.1"},
        ],
    }


def test_vxlan_desired_other_vni_names_the_device():
    b = vxlan({"Type": "vxlan", "VNI": 7})
    want = b.desired([lease("10.244.2.0/24", "192.168.50.2", mac=MAC2)])
    assert {r["dev"] for r in want["routes"] + want["neighbours"] + want["fdb"]} == {"flannel.7"}


def test_vxlan_desired_nothing():
    assert vxlan().desired([]) == {"routes": [], "neighbours": [], "fdb": []}


@pytest.mark.parametrize("bad, why", [
    (lease("10.244.5.0/24", "192.168.50.5", "host-gw"), "not vxlan"),
    (lease("10.244.5.0/24", "192.168.50.5", "udp"), "not vxlan"),
    (lease("10.244.5.0/24", "192.168.50.5"), "no VtepMAC"),
    (lease("10.244.5.0/24", "192.168.50.5", mac="not-a-mac"), "invalid MAC"),
    (lease("10.244.5.0/24", "192.168.50.5", mac=12), "not a string"),
    (lease("10.244.5.0/24", "192.168.50.5", mac="00:00:00:00:00:00"), "all zeros"),
    (lease("10.244.5.0/24", "192.168.50.5", mac="01:00:5e:00:00:01"), "multicast"),
    (lease("10.244.5.0/24", "192.168.50.5", mac="0a:00:00:00:00:01"), "this node's own"),
    (lease("10.245.5.0/24", "192.168.50.5", mac=MAC4), "outside the network"),
    (lease("0.0.0.0/0", "192.168.50.5", mac=MAC4), "outside the network"),
    (lease("10.244.1.0/24", "192.168.50.5", mac=MAC4), "overlaps this node's subnet"),
    (lease("10.244.5.0/24", "192.168.50.1", mac=MAC4), "public IP is this node's"),
    (lease("10.244.5.0/24", "fd00::5", mac=MAC4), "not IPv4"),
    (lease("10.244.5.0/24", "192.168.50.5", mac=MAC2), "already used by 10.244.2.0/24"),
    (lease("10.244.2.0/24", "192.168.50.9", mac=MAC4), "second lease for the same subnet"),
])
def test_vxlan_skips_unusable_leases(bad, why, caplog):
    good = [lease("10.244.2.0/24", "192.168.50.2", mac=MAC2), lease("10.244.3.0/24", "192.168.50.3", mac=MAC3)]
    with caplog.at_level(logging.WARNING, logger="flanneld.backend.vxlan"):
        want = vxlan().desired(good + [bad])
    assert [r["dst"] for r in want["routes"]] == ["10.244.2.0/24", "10.244.3.0/24"]   # the others keep working
    assert [e["mac"] for e in want["fdb"]] == [MAC2, MAC3]
    assert len(caplog.records) == 1 and why in caplog.text and str(bad.subnet) in caplog.text


def test_parse_mac_and_random_mac():
    assert parse_mac("0A:0B:0C:0D:0E:0F") == "0a:0b:0c:0d:0e:0f"
    for _ in range(50):
        mac = random_mac()
        first = int(mac[:2], 16)
        assert parse_mac(mac) == mac and first & 2 and not first & 1   # local, unicast


# ---- host-gw ---------------------------------------------------------------------

def test_hostgw_register_and_desired():
    b = hostgw(mtu=1480)
    assert b.register() == ({}, 1480)
    want = b.desired([lease("10.244.3.0/24", "192.168.50.3", "host-gw"),
                      lease("10.244.2.0/24", "192.168.50.2", "host-gw")])
    assert want == {"routes": [
        {"dst": "10.244.2.0/24", "via": "192.168.50.2", "dev": "eth0", "onlink": False},
        {"dst": "10.244.3.0/24", "via": "192.168.50.3", "dev": "eth0", "onlink": False},
    ]}


def test_hostgw_refuses_a_remote_off_our_segment(caplog):
    with caplog.at_level(logging.WARNING, logger="flanneld.backend.host_gw"):
        want = hostgw().desired([lease("10.244.2.0/24", "192.168.50.2", "host-gw"),
                                 lease("10.244.4.0/24", "192.168.60.5", "host-gw")])
    assert [r["dst"] for r in want["routes"]] == ["10.244.2.0/24"]
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == ("host-gw requires direct L2 reachability: 10.244.4.0/24 via "
                                   "192.168.60.5 is not on eth0's 192.168.50.0/24")


def test_hostgw_segment_follows_the_prefix_length():
    want = hostgw(prefixlen=16).desired([lease("10.244.4.0/24", "192.168.60.5", "host-gw")])
    assert want["routes"][0]["via"] == "192.168.60.5"


@pytest.mark.parametrize("bad, why", [
    (lease("10.244.5.0/24", "192.168.50.5", "vxlan", mac=MAC4), "not host-gw"),
    (lease("10.244.5.0/24", "192.168.50.5", "udp"), "not host-gw"),
    (lease("10.99.5.0/24", "192.168.50.5", "host-gw"), "outside the network"),
    (lease("10.244.1.0/24", "192.168.50.5", "host-gw"), "overlaps this node's subnet"),
    (lease("10.244.5.0/24", "192.168.50.1", "host-gw"), "public IP is this node's"),
    (lease("10.244.2.0/24", "192.168.50.9", "host-gw"), "second lease for the same subnet"),
])
def test_hostgw_skips_unusable_leases(bad, why, caplog):
    with caplog.at_level(logging.WARNING, logger="flanneld.backend.host_gw"):
        want = hostgw().desired([lease("10.244.2.0/24", "192.168.50.2", "host-gw"), bad])
    assert [r["dst"] for r in want["routes"]] == ["10.244.2.0/24"]
    assert len(caplog.records) == 1 and why in caplog.text


# ---- a bad lease is reported once -------------------------------------------------------

def _udp():
    from flanneld.backend.udp import UDPBackend
    b = UDPBackend(config({"Type": "udp"}), ext())
    b.own = lease("10.244.1.0/24", "192.168.50.1", "udp")
    return b


# backend, its logger, a usable lease, a bad one, the same bad one changed, a word of the reason
SKIP_CASES = {
    "vxlan": (vxlan, "flanneld.backend.vxlan", lease("10.244.2.0/24", "192.168.50.2", mac=MAC2),
              lease("10.244.5.0/24", "192.168.50.5"), lease("10.244.5.0/24", "192.168.50.5", mac="bad"),
              "VtepMAC"),
    "host-gw": (hostgw, "flanneld.backend.host_gw", lease("10.244.2.0/24", "192.168.50.2", "host-gw"),
                lease("10.244.4.0/24", "192.168.60.5", "host-gw"), lease("10.244.4.0/24", "192.168.60.6", "host-gw"),
                "direct L2 reachability"),
    "udp": (_udp, "flanneld.udp", lease("10.244.2.0/24", "192.168.50.2", "udp"),
            lease("10.244.5.0/24", "192.168.50.5", "vxlan"), lease("10.244.5.0/24", "192.168.50.6", "vxlan"),
            "not udp"),
}


@pytest.mark.parametrize("kind", list(SKIP_CASES))
def test_a_bad_lease_is_logged_once_until_it_changes_or_goes_away(kind, caplog):
    """Every event re-syncs every lease: a bad one must not be reported on every
    sync (31,449 lines for ~450 events), only when it first appears, when it
    changes, and when it comes back after having gone or been fixed."""
    make, logger, good, bad, changed, why = SKIP_CASES[kind]
    b = make()

    def said(leases, times=3):
        caplog.clear()
        for _ in range(times):
            b.desired(leases)
        return [r.getMessage() for r in caplog.records]

    with caplog.at_level(logging.WARNING, logger=logger):
        first = said([good, bad], times=5)
        assert len(first) == 1 and why in first[0] and str(bad.subnet) in first[0]
        assert said([good, bad]) == []                          # the same lease, the same reason: quiet
        again = said([good, changed])                           # changed (another public IP): said again
        assert len(again) == 1 and str(changed.public_ip) in again[0]
        assert said([good, changed]) == []
        assert said([good]) == []                               # gone
        assert len(said([good, changed])) == 1                  # and back: said again
        assert said([good]) == [] and said([good, changed]) != []


# ---- the diff ----------------------------------------------------------------------

def test_diff():
    have = {"a": 1, "b": 2, "c": 3}
    want = {"b": 2, "c": 30, "d": 4}
    assert diff(have, want) == (["a"], {"c": 30, "d": 4})
    assert diff(want, want) == ([], {})


def test_routes_by_dst():
    routes = [{"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "flannel.1", "onlink": True}]
    assert routes_by_dst(routes) == {"10.244.2.0/24": {"via": "10.244.2.0", "dev": "flannel.1", "onlink": True}}


# ---- ipmasq ---------------------------------------------------------------------------

NET, SUB = parse_cidr("10.244.0.0/16"), parse_cidr("10.244.1.0/24")

# flannel's masqRules for these, as iptables-save prints them (checked against iptables 1.8.9)
FLANNEL_NAT = """\
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
""".splitlines()

EMPTY_NAT = """# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
"""


def saved_nat(rules, jumps=1, extra=""):
    return EMPTY_NAT.replace("COMMIT", ":FLANNEL-POSTRTG - [0:0]\n" + extra
                             + ('-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG\n'
                                * jumps) + "".join(r + "\n" for r in rules) + "COMMIT")


def test_masq_rules_are_flannels():
    assert ipmasq.masq_rules(NET, SUB) == FLANNEL_NAT
    # host bits are cleared, as flannel prints IP4Nets
    assert ipmasq.masq_rules(parse_cidr("10.244.7.7/16"), parse_cidr("10.244.1.1/24")) == FLANNEL_NAT


def test_masq_rules_without_random_fully():
    rules = ipmasq.masq_rules(NET, SUB, random_fully=False)
    assert [r for r in rules if "MASQUERADE" in r] == [r.replace(" --random-fully", "")
                                                       for r in FLANNEL_NAT if "MASQUERADE" in r]


def test_forward_rules_are_flannels():
    assert ipmasq.forward_rules(NET) == [
        '-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
        '-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    ]
    assert ipmasq.jump_rule("filter") == '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'


def test_rules_for_the_whole_ipv4_space():
    """Network 0.0.0.0/0: iptables-nft refuses `! -s 0.0.0.0/0` (Invalid argument: the
    daemon died after leasing), and iptables-save never prints `-s 0.0.0.0/0`. A
    negated /0 matches nothing, so that rule is left out; a plain /0 is no match at
    all, so it is not written (as iptables-save spells the rule)."""
    everything, sub = parse_cidr("0.0.0.0/0"), parse_cidr("0.0.0.96/30")
    c = '-m comment --comment "flanneld masq"'
    assert ipmasq.masq_rules(everything, sub) == [
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 %s -j RETURN" % c,
        "-A FLANNEL-POSTRTG -s 0.0.0.96/30 %s -j RETURN" % c,
        "-A FLANNEL-POSTRTG -d 0.0.0.96/30 %s -j RETURN" % c,
        "-A FLANNEL-POSTRTG ! -d 224.0.0.0/4 %s -j MASQUERADE --random-fully" % c,
    ]
    assert ipmasq.forward_rules(everything) == [
        '-A FLANNEL-FWD -m comment --comment "flanneld forward" -j ACCEPT']
    assert not any("0.0.0.0/0" in r for r in ipmasq.masq_rules(everything, sub) + ipmasq.forward_rules(everything))


def test_render_into_an_empty_table():
    text = ipmasq.render("nat", EMPTY_NAT, FLANNEL_NAT)
    assert text.splitlines() == (["*nat", ":FLANNEL-POSTRTG - [0:0]",
                                  '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG']
                                 + FLANNEL_NAT + ["COMMIT"])


def test_render_nothing_when_up_to_date():
    assert ipmasq.render("nat", saved_nat(FLANNEL_NAT), FLANNEL_NAT) is None


def test_render_replaces_stale_rules_but_keeps_the_jump():
    old = ipmasq.masq_rules(NET, parse_cidr("10.244.9.0/24"))      # the node had another subnet
    text = ipmasq.render("nat", saved_nat(old), FLANNEL_NAT)
    lines = text.splitlines()
    assert lines[:2] == ["*nat", ":FLANNEL-POSTRTG - [0:0]"]        # declared: flushed
    assert not any(l.startswith("-A POSTROUTING") for l in lines)   # the jump is there already
    assert lines[2:-1] == FLANNEL_NAT


def test_render_deletes_extra_jumps():
    text = ipmasq.render("nat", saved_nat(FLANNEL_NAT, jumps=3), FLANNEL_NAT)
    jump = '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
    assert text.splitlines()[2:4] == ["-D" + jump[2:]] * 2
    assert jump not in text


def test_render_adds_a_missing_jump():
    text = ipmasq.render("nat", saved_nat(FLANNEL_NAT, jumps=0), FLANNEL_NAT)
    assert '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG' in text.splitlines()


def test_render_leaves_other_rules_alone():
    other = "-A POSTROUTING -s 10.1.0.0/16 -j MASQUERADE\n"
    assert ipmasq.render("nat", saved_nat(FLANNEL_NAT, extra=other), FLANNEL_NAT) is None
    text = ipmasq.render("nat", EMPTY_NAT.replace("COMMIT", other + "COMMIT"), FLANNEL_NAT)
    assert "10.1.0.0" not in text


def test_render_removal():
    text = ipmasq.render_removal("nat", saved_nat(FLANNEL_NAT, jumps=2))
    assert text.splitlines() == ["*nat"] + ['-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'] * 2 \
        + ["-F FLANNEL-POSTRTG", "-X FLANNEL-POSTRTG", "COMMIT"]
    assert ipmasq.render_removal("nat", EMPTY_NAT) is None
