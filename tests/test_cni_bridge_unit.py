"""The bridge plugin's masquerade rules and their GC, without a kernel
(netns_tests/test_cni_gc.py and test_cni_bad_input.py run them for real)."""
import pytest

from cni.errors import CNIError
from cni.iptables_names import chain_name
from cni.plugins import bridge
from cni.skel import CmdArgs
from podnet.net.ip import parse_cidr
from podnet.net.iptables import quote


def _masq(network, cid, address="10.250.0.2/24"):
    return bridge.masq_restore_input(chain_name(network, cid), bridge._comment(network, cid),
                                     [parse_cidr(address)]).splitlines()[1:-1]


@pytest.mark.parametrize("length", [1, 200, 300, 5000])
def test_the_comment_is_what_iptables_keeps(length):
    """Regression (issue 12, defect 9): the whole comment went into the restore input;
    past 1,024 characters iptables-restore refused it ("Parameter too long!") and the
    ADD failed with 999. The reference passes it to iptables, which keeps 255."""
    cid = "c" * length
    comment = bridge._comment("podnet", cid)
    assert comment == ('name: "podnet" id: "%s"' % cid)[:255]
    lines = _masq("podnet", cid)
    assert all(len(line) < 1024 for line in lines)
    assert lines[1] == "-A POSTROUTING -s 10.250.0.2/32 -m comment --comment %s -j %s" % (
        quote(comment), chain_name("podnet", cid))


def _table(*attachments, extra=()):
    rows = ["*nat", ":POSTROUTING ACCEPT [0:0]"]
    for network, cid, address in attachments:
        rows += _masq(network, cid, address)        # as iptables-save shows what we restore
    return "\n".join(rows + list(extra) + ["COMMIT"]) + "\n"


def test_gc_finds_the_masquerade_chains_of_attachments_not_valid():
    long_id = "l" * 400
    saved = _table(("podnet", "keep", "10.250.0.2/24"), ("podnet", "gone", "10.250.0.3/24"),
                   ("podnet", long_id, "10.250.0.4/24"), ("other", "gone", "10.9.0.2/24"),
                   extra=['-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" '
                          "-j CNI-HOSTPORT-MASQ",
                          # looks like ours, but the chain is not that container's: left alone
                          '-A POSTROUTING -s 10.250.0.9/32 -m comment --comment "name: \\"podnet\\" '
                          'id: \\"x\\"" -j ' + chain_name("podnet", "y")])
    stale = bridge.stale_masq_chains(saved, "podnet", {"keep"})
    assert sorted(stale) == sorted([chain_name("podnet", "gone"), chain_name("podnet", long_id)])
    text = bridge.gc_restore_input(saved, stale)
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    for chain in stale:
        assert "-X " + chain in lines and ":%s - [0:0]" % chain in lines
        assert [l for l in lines if l.startswith("-D POSTROUTING") and l.endswith(chain)]
    assert not any(chain_name("podnet", "keep") in l or chain_name("other", "gone") in l for l in lines)
    assert bridge.gc_restore_input(saved, []) is None


def _args(conf, command="GC"):
    base = {"cniVersion": "1.1.0", "name": "podnet", "type": "bridge"}
    base.update(conf)
    return CmdArgs(command, "", "", "", "", [], b"", base, "1.1.0")


@pytest.mark.parametrize("attachments", [
    "c1", [["c1", "eth0"]], [{"containerID": 5, "ifname": "eth0"}], [{"containerID": "c1"}],
])
def test_gc_refuses_malformed_valid_attachments(attachments):
    with pytest.raises(CNIError) as e:
        bridge.cmd_gc(_args({"cni.dev/valid-attachments": attachments}))
    assert e.value.code == 7 and "valid-attachments" in e.value.msg
