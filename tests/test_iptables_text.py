"""podnet.net.iptables: reading iptables-save text (no root)."""
from podnet.net.iptables import jump_target, rules_jumping_to, rules_referencing, split_rule

SAVED = """*nat
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment "flanneld masq -j FLANNEL-POSTRTG" -j RETURN
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -s 10.0.0.0/8 -g FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -j MASQUERADE
COMMIT
"""


def test_a_rules_target_is_its_last_jump():
    assert jump_target(split_rule('-A X -m comment --comment "a -j B" -j C')) == "C"
    assert jump_target(split_rule("-A X -s 10.0.0.0/8 -g C")) == "C"
    assert jump_target(split_rule("-A X -s 10.0.0.0/8")) is None


def test_rules_jumping_to_a_chain_ignore_the_word_in_comments():
    # The first -j of the first rule sits in its comment: a finder taking the first -j
    # (as flanneld's removal did) took that rule for a jump to FLANNEL-POSTRTG.
    assert rules_jumping_to(SAVED, "FLANNEL-POSTRTG") == [
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        "-A POSTROUTING -s 10.0.0.0/8 -g FLANNEL-POSTRTG"]
    assert rules_referencing(SAVED, "FLANNEL-POSTRTG") == rules_jumping_to(SAVED, "FLANNEL-POSTRTG") + [
        "-A FLANNEL-POSTRTG -j MASQUERADE"]
