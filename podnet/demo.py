"""The main job for now: one node in a network namespace, pods attached by our
own CNI plugins (loopback, bridge + host-local), and a printed connectivity
check. Everything lives in namespaces the Lab created and is removed at the end.
"""
import os
import time

from cni.executable import install
from podnet.cluster import Lab

POD_CIDR = "10.244.1.0/24"


def network_config(data_dir):
    return {
        "cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni0",
        "isGateway": True, "ipMasq": True, "hairpinMode": True,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                 "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir},
    }


def _step(text):
    print("  " + text, flush=True)


def run_demo(pods=3, keep=False):
    with Lab() as lab:
        print("podnet demo: lab %s" % lab.prefix)
        bin_dir = os.path.join(lab.workdir, "bin")
        install(bin_dir, "/usr/bin/python3")
        underlay = lab.underlay("192.168.50.0/24")
        node = lab.node("node1", underlay)
        _step("node %s on the underlay at %s" % (node.name, node.underlay_ip))
        conf = network_config(os.path.join(lab.workdir, "ipam"))
        lo_conf = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}

        members = []
        for i in range(1, pods + 1):
            pod = lab.pod_netns("pod%d" % i)
            cid = "demo-pod%d" % i
            for plugin, c, ifname in (("loopback", lo_conf, "lo"), ("bridge", conf, "eth0")):
                started = time.perf_counter()
                out = node.run_cni(os.path.join(bin_dir, plugin), "ADD", cid, pod.path, ifname, c, bin_dir)
                elapsed = (time.perf_counter() - started) * 1000
                if out.returncode != 0:
                    print("CNI ADD (%s) for %s failed: %s %s" % (plugin, cid, out.stdout, out.stderr))
                    return 1
            address = out.result["ips"][0]["address"].split("/")[0]
            gateway = out.result["ips"][0]["gateway"]
            members.append(("pod%d" % i, pod, cid, address))
            _step("pod%d: eth0 %s via bridge+host-local (ADD %.0f ms)" % (i, address, elapsed))

        print("connectivity (ping, 1 packet each):")
        failures = 0
        targets = [("gateway", gateway)] + [(name, a) for name, _, _, a in members]
        for pod_name, pod, _, address in members:
            row = []
            for name, target in targets:
                if target == address:
                    continue
                ok = pod.run(["ping", "-c1", "-W2", "-q", target], check=False).returncode == 0
                failures += not ok
                row.append("%s %s" % (name, "ok" if ok else "FAIL"))
            _step("%s (%s) -> %s" % (pod_name, address, ", ".join(row)))

        if keep:
            input("lab is up; press Enter to tear it down ")
        for _, pod, cid, _ in members:
            node.run_cni(os.path.join(bin_dir, "bridge"), "DEL", cid, pod.path, "eth0", conf, bin_dir)
        leftover = [l for l in node.link_names() if l.startswith("veth")]
        _step("after DEL: %d veths left in the node" % len(leftover))
    print("RESULT: %s" % ("all pods reach each other and the gateway" if not failures
                          else "%d pings failed" % failures))
    return 0 if not failures and not leftover else 1
