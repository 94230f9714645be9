"""CNI GC (spec 1.1.0) of the firewall state: bridge's masquerade chains and portmap's
DNAT chains of attachments the runtime no longer has (issue 12, defect 11).

A runtime that lost its cache can only GC: libcni then has no attachment to DEL, and
each plugin gets the list of valid attachments. Before, host-local freed the address
but every chain stayed, and a new container asking for the same hostPort was refused
with 103 ("already mapped by another container") for as long as the node lived.

The runtime side is `podnet cni add|gc` (cni/conflist.py, libcni's way), run inside
a node namespace of the lab; the plugins are ours, one process each.
"""
import json
import os
import re
import shutil
import sys

import pytest

from cni.iptables_names import chain_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30


class Network:
    """One conflist (bridge with ipMasq + portmap) on `node`, its own bridge and subnet."""

    def __init__(self, lab, node, bin_dir, name, bridge, subnet4, subnet6):
        self.lab, self.node, self.bin_dir, self.name = lab, node, bin_dir, name
        self.dir = os.path.join(lab.workdir, name)
        os.makedirs(self.dir)
        self.cache = os.path.join(self.dir, "cache")
        self.ipam = os.path.join(self.dir, "ipam")
        conflist = {"cniVersion": "1.1.0", "name": name, "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True,
             "ipam": {"type": "host-local", "dataDir": self.ipam,
                      "ranges": [[{"subnet": subnet4}], [{"subnet": subnet6}]]}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}
        self.path = os.path.join(self.dir, "net.conflist")
        with open(self.path, "w") as f:
            json.dump(conflist, f)
        self.pods = {}

    def cni(self, action, cid=None, *extra, check=True):
        argv = [sys.executable, "-m", "cli.main", "cni", action]
        if cid is not None:
            argv += [self.pods[cid].path, "--container-id", cid]
        argv += ["--conflist", self.path, "--cni-path", self.bin_dir, "--cache-dir", self.cache]
        out = self.node.run(argv + list(extra), check=False, timeout=TIMEOUT,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": ROOT})
        if check:
            assert out.returncode == 0, "%s %s %s: %s %s" % (self.name, action, cid, out.stdout, out.stderr)
        return out

    def add(self, cid, host_port, check=True):
        self.pods[cid] = self.lab.pod_netns("%s-%s" % (self.name, cid))
        maps = {"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]}
        return self.cni("add", cid, "--cap-args", json.dumps(maps), check=check)

    def add_without_runtime(self, cid, host_port):
        """bridge then portmap run directly (no conflist: its cache file could not be named
        after an ID this long), as the conflist would run them."""
        pod = self.pods[cid] = self.lab.pod_netns("%s-direct%d" % (self.name, len(self.pods)))
        with open(self.path) as f:
            conflist = json.load(f)
        prev = None
        for plugin in conflist["plugins"]:
            conf = dict(plugin, name=self.name, cniVersion=conflist["cniVersion"])
            if prev is not None:
                conf["prevResult"] = prev
            if plugin["type"] == "portmap":
                conf["runtimeConfig"] = {"portMappings": [{"hostPort": host_port, "containerPort": 80}]}
            out = self.node.run_cni(os.path.join(self.bin_dir, plugin["type"]), "ADD", cid, pod.path, "eth0",
                                    conf, self.bin_dir)
            assert out.returncode == 0, out.stdout + out.stderr
            prev = out.result

    def allocations(self):
        store = os.path.join(self.ipam, self.name)
        out = {}
        for f in os.listdir(store):
            if f != "lock" and not f.startswith("last_reserved_ip"):
                with open(os.path.join(store, f)) as fh:
                    out[f] = fh.read().split()[0]
        return out

    def chains(self, cid):
        return chain_name(self.name, cid), chain_name(self.name, cid, "DN-")


def nat(node):
    """Both nat tables without the timestamp comments and counters."""
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        out += [re.sub(r"\[\d+:\d+\]", "", l) for l in node.run([tool, "-t", "nat"]).stdout.splitlines()
                if not l.startswith("#")]
    return out


def lines_of(table, chains):
    return [l for l in table if any(c in l for c in chains)]


@pytest.fixture
def site(lab, cni_bin):
    node = lab.node("node1", lab.underlay())
    ours = Network(lab, node, cni_bin, "podnet", "cni0", "10.244.7.0/24", "fd00:244:7::/64")
    other = Network(lab, node, cni_bin, "othernet", "cni1", "10.245.7.0/24", "fd00:245:7::/64")
    return node, ours, other


def test_gc_removes_lost_attachments_firewall_state(site):
    node, net, other = site
    net.add("keep", 8080)
    net.add("lost", 8081)
    net.add_without_runtime("x" * 300, 8082)    # a long ID: its comments are cut, its chains found
    other.add("elsewhere", 9090)        # another network's: GC of "podnet" never touches it
    before = nat(node)
    keep_rules = lines_of(before, net.chains("keep"))
    other_rules = lines_of(before, other.chains("elsewhere"))
    assert len(keep_rules) > 6 and len(other_rules) > 6
    for cid in ("lost", "x" * 300):
        assert len(lines_of(before, net.chains(cid))) > 6

    # The runtime loses its cache: nothing left to DEL, only GC.
    shutil.rmtree(os.path.join(net.cache, "results"))
    net.cni("gc", None, "--valid", "keep/eth0")

    after = nat(node)
    for cid in ("lost", "x" * 300):
        assert lines_of(after, net.chains(cid)) == [], cid
    assert lines_of(after, net.chains("keep")) == keep_rules
    assert lines_of(after, other.chains("elsewhere")) == other_rules
    assert sorted(set(net.allocations().values())) == ["keep"]       # host-local GC as before
    assert sorted(set(other.allocations().values())) == ["elsewhere"]

    # The lost container's hostPort is free for a new one (before: refused with 103).
    out = net.add("new", 8081)
    assert json.loads(out.stdout)["ips"]
    assert lines_of(nat(node), net.chains("new"))
    # GC again with everything valid changes nothing.
    table = nat(node)
    net.cni("gc", None, "--valid", "keep/eth0", "--valid", "new/eth0")
    assert nat(node) == table

    # (keep's cache is gone too: its DEL needs the mappings given again, as from a runtime)
    net.cni("del", "keep", "--cap-args", json.dumps({"portMappings": [{"hostPort": 8080, "containerPort": 80}]}))
    net.cni("del", "new")
    other.cni("del", "elsewhere")
    left = nat(node)
    assert not [l for l in left if re.search(r"CNI-(DN-)?[0-9a-f]{20}", l)], left


def test_gc_with_malformed_valid_attachments_touches_nothing(site):
    node, net, _ = site
    net.add("keep", 8090)
    before = nat(node)
    for plugin in ("bridge", "portmap"):
        conf = {"cniVersion": "1.1.0", "name": "podnet", "type": plugin,
                "cni.dev/valid-attachments": [{"containerID": 5, "ifname": "eth0"}]}
        if plugin == "bridge":
            conf["ipam"] = {"type": "host-local", "dataDir": net.ipam, "subnet": "10.244.7.0/24"}
        out = node.run_cni(os.path.join(net.bin_dir, plugin), "GC", "", "", "", conf, net.bin_dir)
        assert out.returncode == 1 and out.result["code"] == 7, out.stdout
        assert "Traceback" not in out.stderr
    assert nat(node) == before
    assert sorted(set(net.allocations().values())) == ["keep"]
    net.cni("del", "keep")
