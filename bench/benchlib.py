"""What the benchmark scripts share: timing a plugin run inside a node
namespace, and the summary statistics they report."""
import os
import statistics
import subprocess
import time

from podnet.net.netns import open_netns, setns


def run_plugin(node_path, plugin, command, container_id, netns_path, stdin, cni_path):
    """Run one CNI plugin process inside the node netns; returns (ms, stdout).

    setns happens between fork and exec, so neither side pays `ip netns exec`.
    """
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
           "CNI_CONTAINERID": container_id, "CNI_NETNS": netns_path, "CNI_IFNAME": "eth0",
           "CNI_PATH": cni_path}
    fd = open_netns(node_path)
    try:
        start = time.perf_counter()
        proc = subprocess.run([plugin], input=stdin, env=env, capture_output=True,
                              preexec_fn=lambda: setns(fd), pass_fds=(fd,))
        elapsed = (time.perf_counter() - start) * 1000
    finally:
        os.close(fd)
    if proc.returncode != 0:
        raise SystemExit("%s %s failed: %s %s" % (plugin, command, proc.stdout, proc.stderr))
    return elapsed, proc.stdout


def summary(samples):
    """(median, p90) of a list of numbers."""
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
