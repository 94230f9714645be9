"""bridge + host-local ADDs killed with SIGKILL at random points, then DEL: nothing leaks.

A runtime gives up on a plugin (its context deadline, an OOM kill, a node
agent restart) at any instant of an ADD, then calls DEL for that attachment,
as the spec asks. Whatever the instant, that DEL must succeed and leave no
address file, no veth, no masquerade chain or jump; and the store must still
hand out distinct addresses afterwards.

The kill hits the plugin process only (as a runtime's exec timeout does); a
child it started (iptables-restore) is allowed to finish before DEL runs,
which is what a real DEL, seconds later, sees too.
"""
import json
import os
import random
import signal
import subprocess
import time

from lab.cluster import cni_env, exec_argv, finish_cni, start_cni

from helpers import allocation_files

NETWORK = "podnet"
SUBNET = "10.244.0.0/22"
KILLS = int(os.environ.get("PODNET_KILLED_ADDS", "500"))
FRESH = 50
POOL = 25                  # pod namespaces, reused once their DEL has run
SEED = int(os.environ.get("PODNET_KILL_SEED", "12"))


def bridge_conf(data_dir):
    return {"cniVersion": "1.0.0", "name": NETWORK, "type": "bridge", "bridge": "cni0",
            "isGateway": True, "ipMasq": True,
            "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": data_dir}}


def residue(node, pods, data_dir):
    veths = {link["ifname"] for link in node.ip_json("link", "show", "type", "veth")} - {"eth0"}
    nat = [line for line in node.run(["iptables-save", "-t", "nat"]).stdout.splitlines()
           if "CNI-" in line and not line.startswith("#")]
    in_pods = [pod.name for pod in pods if any(link["ifname"] == "eth0" for link in pod.ip_json("link", "show"))]
    return {"allocations": allocation_files(data_dir, NETWORK), "veths": sorted(veths), "nat": nat, "pod eth0": in_pods}


def killed_add(node, plugin, conf, cid, pod, cni_bin, delay):
    """Start ADD, SIGKILL the plugin after `delay` s (if it is still running), then wait until
    every process it started has ended. Returns whether the kill came before the ADD finished."""
    env = cni_env("ADD", cid, pod.path, "eth0", cni_bin)
    proc = subprocess.Popen(exec_argv(node.name, [plugin]), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    proc.stdin.write(json.dumps(conf).encode())
    proc.stdin.close()
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:          # orphans of the session (iptables-restore) finish
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    else:
        raise AssertionError("processes of the killed ADD %s still running after 10 s" % cid)
    return killed


def test_killed_adds_leak_nothing_and_the_store_stays_sound(lab, cni_bin):
    node = lab.node("node1", lab.underlay())
    data_dir = os.path.join(lab.workdir, "ipam")
    conf = bridge_conf(data_dir)
    plugin = os.path.join(cni_bin, "bridge")
    pods = [lab.pod_netns("k%02d" % i) for i in range(POOL)]
    rng = random.Random(SEED)

    # How long a whole ADD takes here: kills are spread over that span (and a little past it).
    t0 = time.monotonic()
    (rc, _, err), = finish_cni([start_cni(node, plugin, "ADD", "probe", pods[0].path, "eth0", conf, cni_bin)])
    span = time.monotonic() - t0
    assert rc == 0, err
    (rc, _, err), = finish_cni([start_cni(node, plugin, "DEL", "probe", pods[0].path, "eth0", conf, cni_bin)])
    assert rc == 0, err

    killed = 0
    for i in range(KILLS):
        pod = pods[i % POOL]
        cid = "kill%04d" % i
        killed += killed_add(node, plugin, conf, cid, pod, cni_bin, rng.uniform(0, span * 1.1))
        (rc, out, err), = finish_cni([start_cni(node, plugin, "DEL", cid, pod.path, "eth0", conf, cni_bin)])
        assert rc == 0, "DEL after a killed ADD failed (%s): %s %s" % (cid, out, err)
    assert killed >= KILLS // 4, "ADDs should mostly be killed before they finish (%d of %d)" % (killed, KILLS)
    assert residue(node, pods, data_dir) == {"allocations": [], "veths": [], "nat": [], "pod eth0": []}

    fresh = [lab.pod_netns("f%02d" % i) for i in range(FRESH)]
    results = finish_cni([start_cni(node, plugin, "ADD", "fresh%02d" % i, pod.path, "eth0", conf, cni_bin)
                          for i, pod in enumerate(fresh)])
    assert [rc for rc, _, _ in results] == [0] * FRESH, [r for r in results if r[0]][:2]
    addrs = {json.loads(out)["ips"][0]["address"] for _, out, _ in results}
    assert len(addrs) == FRESH
    results = finish_cni([start_cni(node, plugin, "DEL", "fresh%02d" % i, pod.path, "eth0", conf, cni_bin)
                          for i, pod in enumerate(fresh)])
    assert [rc for rc, _, _ in results] == [0] * FRESH
    assert residue(node, pods + fresh, data_dir) == {"allocations": [], "veths": [], "nat": [], "pod eth0": []}
