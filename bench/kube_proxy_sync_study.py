#!/usr/bin/env python3
"""kube-proxy iptables mode at scale: how to sync fast without flushing others' chains.

    sudo .venv/bin/python bench/kube_proxy_sync_study.py [--services 1000,10000] [--runs 3]

Everything runs inside network namespaces made by a podnet Lab (never the
root namespace's tables); no packet is sent. The nat table holds kube-proxy's
layout for N Services x 5 endpoints (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*,
KUBE-MARK-MASQ, KUBE-POSTROUTING, KUBE-NODEPORTS, chain names hashed the way
kube-proxy hashes them) plus "foreign" chains other agents put into nat
(CNI-* per container, CNI-HOSTPORT-*, FLANNEL-POSTRTG, DOCKER) with their
jumps from the built-in chains. Each figure is the median wall time of whole
`iptables-restore` / `iptables-save` / `nft` processes over --runs runs.

Results are in docs/kube-proxy-sync-design.md. Scenarios:
  full sync, cold (table holds only the foreign chains), full sync, warm
  (our whole ruleset is already there), reading the foreign chains, a
  concurrent foreign writer during a full sync, and partial syncs.
"""
import argparse
import base64
import hashlib
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.cluster import Lab  # noqa: E402
from podnet.net.netns import open_netns, setns  # noqa: E402

ENDPOINTS = 5
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_NET = (10 << 24) | (96 << 16)          # 10.96.0.0/12
SERVICE_BITS = 20                               # host bits of the /12
BUCKET_BITS = 8                                 # 256 dispatch buckets of /20 each
BUILTIN = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
FOREIGN_CNI = 20                                # per-container CNI-<hash> masquerade chains


# ---- the ruleset ---------------------------------------------------------

def _hash16(text):
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def _ip(value):
    return "%d.%d.%d.%d" % (value >> 24, (value >> 16) & 255, (value >> 8) & 255, value & 255)


def cluster_ip(i):
    """A ClusterIP spread over 10.96.0.0/12 as the apiserver's random allocator does."""
    offset = int(hashlib.sha256(b"ip%d" % i).hexdigest()[:8], 16) % ((1 << SERVICE_BITS) - 2) + 1
    return SERVICE_NET + offset


def bucket_chain(ip_value):
    prefix = ip_value >> (SERVICE_BITS - BUCKET_BITS) << (SERVICE_BITS - BUCKET_BITS)
    return "KUBE-SVCB-%08X" % prefix, "%s/%d" % (_ip(prefix), 32 - SERVICE_BITS + BUCKET_BITS)


def service_chains(i, endpoints=None):
    """{chain: [rules]} of Service i (its SVC and SEP chains), its KUBE-SERVICES rule, its IP.

    endpoints: the endpoint numbers (default the Service's own 5)."""
    spn = "ns%d/svc%d:http" % (i // 100, i)
    cip = cluster_ip(i)
    svc = "KUBE-SVC-" + _hash16(spn + "tcp")
    chains = {svc: ['-A %s ! -s %s -d %s/32 -p tcp -m comment --comment "%s cluster IP" -m tcp --dport 80 '
                    '-j KUBE-MARK-MASQ' % (svc, CLUSTER_CIDR, _ip(cip), spn)]}
    endpoints = list(range(i * ENDPOINTS, (i + 1) * ENDPOINTS)) if endpoints is None else endpoints
    for e, j in enumerate(endpoints):
        ip = "10.%d.%d.%d" % (244 + (j >> 16), (j >> 8) & 255, j & 255)
        ep = ip + ":8080"
        sep = "KUBE-SEP-" + _hash16(spn + "tcp" + ep)
        left = len(endpoints) - e
        prob = "" if left == 1 else " -m statistic --mode random --probability %0.11f" % (1.0 / left)
        chains[svc].append('-A %s -m comment --comment "%s -> %s"%s -j %s' % (svc, spn, ep, prob, sep))
        chains[sep] = ['-A %s -s %s/32 -m comment --comment "%s" -j KUBE-MARK-MASQ' % (sep, ip, spn),
                       '-A %s -p tcp -m comment --comment "%s" -m tcp -j DNAT --to-destination %s' % (sep, spn, ep)]
    jump = '-A KUBE-SERVICES -d %s/32 -p tcp -m comment --comment "%s cluster IP" -m tcp --dport 80 -j %s' % (
        _ip(cip), spn, svc)
    return chains, jump, cip


NODEPORTS_JUMP = ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be '
                  'the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
OUR_BUILTIN_JUMPS = [
    '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
]


def our_chains(n, layout="flat"):
    """Our whole nat ruleset as an ordered {chain: [rules]}.

    layout "flat": kube-proxy's (one KUBE-SERVICES rule per service port);
    "bucketed": KUBE-SERVICES jumps on the ClusterIP's /20 to one of 256
    KUBE-SVCB-* chains holding the per-Service rules (~n/256 each).
    """
    chains = {"KUBE-SERVICES": [], "KUBE-NODEPORTS": [], "KUBE-MARK-MASQ": ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"],
              "KUBE-POSTROUTING": ["-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
                                   "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
                                   '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring '
                                   'SNAT" -j MASQUERADE --random-fully']}
    buckets = {}
    for i in range(n):
        per_service, jump, cip = service_chains(i)
        chains.update(per_service)
        if layout == "flat":
            chains["KUBE-SERVICES"].append(jump)
        else:
            name, cidr = bucket_chain(cip)
            buckets.setdefault((name, cidr), []).append(jump.replace("-A KUBE-SERVICES ", "-A %s " % name, 1))
    for (name, cidr), rules in sorted(buckets.items()):
        chains["KUBE-SERVICES"].append("-A KUBE-SERVICES -d %s -j %s" % (cidr, name))
        chains[name] = rules
    chains["KUBE-SERVICES"].append(NODEPORTS_JUMP)
    return chains


def foreign_chains():
    """What CNI plugins, flannel and docker put into nat: {chain: [rules]} and built-in jumps."""
    chains = {
        "CNI-HOSTPORT-DNAT": ['-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \\"cbr0\\"" '
                              '-m multiport --dports 8080 -j CNI-DN-0'],
        "CNI-DN-0": ['-A CNI-DN-0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.2:80'],
        "CNI-HOSTPORT-SNAT": [], "CNI-HOSTPORT-MASQ": ["-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE"],
        "FLANNEL-POSTRTG": ["-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
                            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully"],
        "DOCKER": ["-A DOCKER -i docker0 -j RETURN"],
    }
    jumps = ['-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT',
             '-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT',
             '-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ',
             '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
             '-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER']
    for k in range(FOREIGN_CNI):
        name = "CNI-%024x" % k
        chains[name] = ['-A %s -d 10.88.0.0/16 -m comment --comment "name: \\"cbr0\\" id: \\"c%d\\"" -j ACCEPT' % (name, k),
                        '-A %s ! -d 224.0.0.0/4 -m comment --comment "name: \\"cbr0\\" id: \\"c%d\\"" -j MASQUERADE'
                        % (name, k)]
        jumps.append('-A POSTROUTING -s 10.88.0.%d/32 -m comment --comment "name: \\"cbr0\\" id: \\"c%d\\"" -j %s'
                     % (k + 2, k, name))
    return chains, jumps


def restore_text(chains, builtin_rules=(), declare=None, first=None, deletes=(), flushes=()):
    """Restore input for the nat table: declare (":NAME - [0:0]") `declare` (default:
    every chain in `chains`), then their rules; -X for `deletes` (declared first, so flushed)."""
    declare = list(chains) if declare is None else list(declare)
    lines = ["*nat"]
    if first:
        lines.append(first)
    lines += [":%s - [0:0]" % c for c in declare + [d for d in deletes if d not in declare]]
    lines += ["-F %s" % c for c in flushes]
    for rules in chains.values():
        lines += rules
    lines += list(builtin_rules)
    lines += ["-X %s" % c for c in deletes]
    lines.append("COMMIT")
    return ("\n".join(lines) + "\n").encode()


# ---- running things inside the namespace ----------------------------------

class Runner:
    def __init__(self, ns_path):
        self.fd = open_netns(ns_path)

    def run(self, argv, data=b"", check=True, timeout=None):
        """(seconds, completed process); argv runs inside the namespace (setns before exec)."""
        start = time.perf_counter()
        proc = subprocess.run(argv, input=data, capture_output=True, timeout=timeout,
                              preexec_fn=lambda: setns(self.fd), pass_fds=(self.fd,))
        elapsed = time.perf_counter() - start
        if check and proc.returncode != 0:
            raise RuntimeError("%s failed: %s" % (" ".join(argv), proc.stderr.decode(errors="replace")[:400]))
        return elapsed, proc

    def restore(self, text, noflush=True, timeout=None):
        return self.run(["iptables-restore", "-w"] + (["--noflush"] if noflush else []), text, timeout=timeout)[0]

    def reset(self, with_foreign=True):
        """Empty nat (inside our namespace), then the foreign agents' chains."""
        self.run(["iptables", "-t", "nat", "-F"])
        self.run(["iptables", "-t", "nat", "-X"])
        if with_foreign:
            chains, jumps = foreign_chains()
            self.restore(restore_text(chains, jumps))

    def chain_names(self):
        _, proc = self.run(["iptables-save", "-t", "nat"])
        return {line[1:].split()[0] for line in proc.stdout.decode().splitlines() if line.startswith(":")}


def median(samples):
    return statistics.median(samples)


def fmt(seconds):
    if seconds is None:
        return "-"
    if isinstance(seconds, str):
        return seconds
    return "%.0f ms" % (seconds * 1000) if seconds < 1 else "%.2f s" % seconds


# ---- scenarios --------------------------------------------------------------

def read_foreign(r):
    """Strategy (a)'s read: `iptables -S` of the built-in chains, chain names from
    `nft list chains ip`, then `iptables -S` per foreign chain. Returns (chains, built-in
    rules) that are not ours."""
    builtin = {}
    for name in BUILTIN:        # first, so a chain created meanwhile is never a dangling jump
        _, proc = r.run(["iptables", "-t", "nat", "-S", name])
        builtin[name] = [l for l in proc.stdout.decode().splitlines() if l.startswith("-A ")]
    _, proc = r.run(["nft", "list", "chains", "ip"])
    names, table = [], None
    for line in proc.stdout.decode().splitlines():
        words = line.split()
        if words[:1] == ["table"]:
            table = words[2]
        elif words[:1] == ["chain"] and table == "nat":
            names.append(words[1])
    chains, jumps = {}, []
    for name in names:
        if name.startswith("KUBE-"):
            continue
        if name in BUILTIN:
            jumps += [l for l in builtin[name] if " -j KUBE-" not in l]
            continue
        _, proc = r.run(["iptables", "-t", "nat", "-S", name])
        chains[name] = [l for l in proc.stdout.decode().splitlines() if l.startswith("-A ")]
    return chains, jumps


def study(lab, n, runs, log):
    """All scenarios for n Services; returns {row name: seconds or text}."""
    res = {}
    ns = lab.namespace("kp%d" % n)
    r = Runner(ns.path)
    flat = our_chains(n)
    foreign, fjumps = foreign_chains()
    everything = dict(flat)
    everything.update(foreign)
    plain_text = restore_text(everything, OUR_BUILTIN_JUMPS + fjumps)
    ours_text = restore_text(flat, OUR_BUILTIN_JUMPS)
    ours_s_text = restore_text(flat, OUR_BUILTIN_JUMPS, first="-S")
    res["rules / chains / restore input"] = "%dk / %dk / %.1f MB" % (
        round(sum(len(v) for v in flat.values()) / 1000), round(len(flat) / 1000), len(ours_text) / 1e6)
    log("%d services: %s" % (n, res["rules / chains / restore input"]))

    def sample(name, prepare, action, count=runs):
        times = []
        for _ in range(count):
            prepare()
            times.append(action())
        res[name] = median(times)
        log("  %-60s %s" % (name, fmt(res[name])))
        return res[name]

    empty = lambda: r.reset(with_foreign=False)        # noqa: E731
    cold = lambda: r.reset(with_foreign=True)          # noqa: E731

    def warm():
        r.reset(with_foreign=True)
        r.restore(ours_text_s_cached)

    ours_text_s_cached = ours_s_text
    base = sample("B  plain restore of the whole nat table into an empty table", empty,
                  lambda: r.restore(plain_text, noflush=False))
    sample("a1 cold: read foreign chains (nft list chains + iptables -S each) + plain restore", cold,
           lambda: _read_and_plain(r, flat))
    sample("b0 cold: --noflush, every chain declared", cold,
           lambda: _capped(r, ours_text, 300 if n <= 1000 else 90), count=1)
    sample("b1 cold: --noflush, every chain declared, first line `-S`", cold, lambda: r.restore(ours_s_text))
    block = chunk_size(n)
    sample("b2 cold: --noflush in COMMIT blocks of sqrt(N) Services", cold,
           lambda: r.restore(_chunked(flat, block)))
    sample("b2' cold: --noflush in COMMIT blocks of 4 sqrt(N) Services", cold,
           lambda: r.restore(_chunked(flat, block * 4)))
    # warm: the whole ruleset is already there
    sample("w0 warm: plain restore of the whole nat table", lambda: None,
           lambda: r.restore(plain_text, noflush=False))
    if n <= 1000:
        sample("w1 warm: --noflush, every chain declared (kube-proxy's full sync)", warm,
               lambda: _capped(r, ours_text, 300), count=1)
    else:
        res["w1 warm: --noflush, every chain declared (kube-proxy's full sync)"] = "not run (b0 bounds it)"
    sample("w2 warm: --noflush, every chain declared, first line `-S`", warm, lambda: r.restore(ours_s_text))
    warm()
    sample("r1 read: iptables-save -t nat", lambda: None, lambda: r.run(["iptables-save", "-t", "nat"])[0])
    sample("r2 read: nft list chains ip (names only)", lambda: None, lambda: r.run(["nft", "list", "chains", "ip"])[0])
    sample("r3 read: iptables -t nat -S <one chain>", lambda: None,
           lambda: r.run(["iptables", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT"])[0])
    sample("r4 read: all foreign chains (nft list chains + -S per chain, %d chains)" % (len(foreign) + 4),
           lambda: None, lambda: _timed(lambda: read_foreign(r)))
    sample("r5 warm: empty --noflush restore (process + commit floor)", lambda: None,
           lambda: r.restore(b"*nat\nCOMMIT\n"))
    # partial syncs on the warm flat table
    _partials(r, n, flat, sample, "flat")
    # the bucketed layout
    bucketed = our_chains(n, "bucketed")
    btext = restore_text(bucketed, OUR_BUILTIN_JUMPS, first="-S")
    sample("b3 cold: bucketed layout, --noflush, first line `-S`", cold, lambda: r.restore(btext))
    _partials(r, n, bucketed, sample, "bucketed")
    res["baseline"] = base
    return res


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _capped(r, text, cap):
    try:
        return r.restore(text, timeout=cap)
    except subprocess.TimeoutExpired:
        return "> %d s (stopped)" % cap


def _read_and_plain(r, ours, timeout=None):
    start = time.perf_counter()
    chains, jumps = read_foreign(r)
    everything = dict(ours)
    everything.update(chains)
    r.restore(restore_text(everything, OUR_BUILTIN_JUMPS + jumps), noflush=False, timeout=timeout)
    return time.perf_counter() - start


def chunk_size(n):
    """Services per COMMIT block: each commit costs ~table size (the kernel validates the
    table's jumps), each block ~block^2 (iptables-nft's sorted chain list), so ~sqrt(n)."""
    return max(10, int(round(n ** 0.5)))


def _chunked(chains, per_block):
    """Several COMMIT blocks in one process, bottom-up so no jump ever dangles:
    the shared chains, then SEP and SVC chains per block, then the dispatch."""
    names = list(chains)
    first = ["KUBE-MARK-MASQ", "KUBE-POSTROUTING", "KUBE-NODEPORTS"]
    seps = [c for c in names if c.startswith("KUBE-SEP-")]
    svcs = [c for c in names if c.startswith("KUBE-SVC-")]
    skip = set(seps) | set(svcs) | set(first)
    last = [c for c in names if c not in skip]
    out = [restore_text({c: chains[c] for c in first})]
    step = per_block * (ENDPOINTS + 1)
    group = seps + svcs
    for i in range(0, len(group), step):
        out.append(restore_text({c: chains[c] for c in group[i:i + step]}))
    out.append(restore_text({c: chains[c] for c in last}, OUR_BUILTIN_JUMPS))
    return b"".join(out)


def _partials(r, n, chains, sample, layout):
    """Partial syncs on a warm table holding `chains`."""
    full = restore_text(chains, OUR_BUILTIN_JUMPS, first="-S")

    def warm():
        r.reset(with_foreign=True)
        r.restore(full)
    warm()
    victim = n // 2
    old, jump, cip = service_chains(victim)
    svc = [c for c in old if c.startswith("KUBE-SVC-")][0]
    # one endpoint replaced: new SEP, old SEP flushed and deleted, SVC rewritten
    eps = list(range(victim * ENDPOINTS, (victim + 1) * ENDPOINTS))
    new, _, _ = service_chains(victim, [n * ENDPOINTS + 7] + eps[1:])
    new_sep = [c for c in new if c not in old][0]
    old_sep = [c for c in old if c not in new][0]
    text = restore_text({svc: new[svc], new_sep: new[new_sep]}, deletes=[old_sep])
    state = {"flip": False}

    def endpoint_change():
        # alternate between the two versions so every run changes something
        if not state["flip"]:
            t = r.restore(text)
        else:
            t = r.restore(restore_text({svc: old[svc], old_sep: old[old_sep]}, deletes=[new_sep]))
        state["flip"] = not state["flip"]
        return t
    sample("p1 %s: one endpoint replaced (SVC rewritten, SEP added, SEP -X)" % layout, lambda: None, endpoint_change)
    if state["flip"]:
        endpoint_change()
    sample("p2 %s: one Service's SVC + SEP chains rewritten, nothing else" % layout, lambda: None,
           lambda: r.restore(restore_text(old)))
    # add a new Service: its chains + its dispatch rule
    add, add_jump, add_ip = service_chains(n + 1)
    if layout == "flat":
        dispatch = {"KUBE-SERVICES": chains["KUBE-SERVICES"][:-1] + [add_jump, NODEPORTS_JUMP]}
        back = {"KUBE-SERVICES": chains["KUBE-SERVICES"]}
    else:
        name, _ = bucket_chain(add_ip)
        rules = chains.get(name, [])
        dispatch = {name: rules + [add_jump.replace("-A KUBE-SERVICES ", "-A %s " % name, 1)]}
        back = {name: rules}
    add_text = restore_text(dict(add, **dispatch))
    remove_text = restore_text(back, deletes=list(add))

    def add_remove(which):
        return r.restore(add_text if which == "add" else remove_text)
    label = "rewriting KUBE-SERVICES" if layout == "flat" else "rewriting one bucket chain"
    times_add, times_del = [], []
    for _ in range(3):
        times_add.append(add_remove("add"))
        times_del.append(add_remove("remove"))
    sample("p3 %s: Service added (its chains + %s)" % (layout, label), lambda: None,
           lambda: median(times_add), count=1)
    sample("p4 %s: Service removed (-X its chains + %s)" % (layout, label), lambda: None,
           lambda: median(times_del), count=1)
    if layout == "flat":
        ins = restore_text(add, [add_jump.replace("-A KUBE-SERVICES", "-I KUBE-SERVICES 1", 1)])
        dele = restore_text({}, [add_jump.replace("-A KUBE-SERVICES", "-D KUBE-SERVICES", 1)], declare=list(add),
                            deletes=list(add))
        t_ins, t_del = [], []
        for _ in range(3):
            t_ins.append(r.restore(ins))
            t_del.append(r.restore(dele))
        sample("p5 flat: Service added with `-I KUBE-SERVICES 1` (no rewrite)", lambda: None,
               lambda: median(t_ins), count=1)
        sample("p6 flat: Service removed with `-D KUBE-SERVICES <spec>` (no rewrite)", lambda: None,
               lambda: median(t_del), count=1)


# ---- the concurrent foreign writer --------------------------------------------

WRITER = r"""
k=0
while [ ! -e "$STOP" ]; do
    c="CNI-RACE-$TAG-$k"
    if printf '*%s\n:%s - [0:0]\n-A %s -j RETURN\n-A POSTROUTING -j %s\nCOMMIT\n' "$TABLE" "$c" "$c" "$c" \
            | iptables-restore -w --noflush 2>/dev/null; then
        echo "ok $c" >> "$LOG"
    else
        echo "fail $c" >> "$LOG"
    fi
    k=$((k+1))
    sleep "$INTERVAL"
done
"""

RACES = [("a", 0.05, "nat"), ("b1", 0.05, "nat"), ("b1", 0.05, "mangle"), ("b1", 0.5, "nat"), ("b1", 2.0, "nat"),
         ("b2", 0.05, "nat")]


def race(lab, n, log, cap):
    """A foreign agent (a shell loop in the same namespace) adds a CNI-RACE-<k> chain and
    its POSTROUTING jump every `interval` s (to nat, or to mangle: another table) while we
    full-sync, with (a) read foreign + plain restore, (b1) --noflush with `-S`, or (b2)
    --noflush in COMMIT blocks.
    Reports how long the sync took (or that it was still retrying after `cap` s) and what
    happened to the writer's chains."""
    out = {}
    ns = lab.namespace("race%d" % n)
    r = Runner(ns.path)
    flat = our_chains(n)
    ours_s = restore_text(flat, OUR_BUILTIN_JUMPS, first="-S")
    for strategy, interval, table in RACES:
        tag = "%s-%s-%g" % (strategy, table, interval)
        r.reset(with_foreign=True)
        r.run(["iptables", "-t", "mangle", "-F"])
        r.run(["iptables", "-t", "mangle", "-X"])
        r.restore(ours_s)
        stop = os.path.join(lab.workdir, "stop-%s-%d" % (tag, n))
        logf = os.path.join(lab.workdir, "log-%s-%d" % (tag, n))
        env = dict(os.environ, STOP=stop, LOG=logf, TAG=strategy, TABLE=table, INTERVAL=str(interval))
        writer = subprocess.Popen(["sh", "-c", WRITER], env=env, preexec_fn=lambda: setns(r.fd),
                                  pass_fds=(r.fd,))
        outcome = "done"
        try:
            time.sleep(0.3)
            start = time.perf_counter()
            try:
                if strategy == "a":
                    _read_and_plain(r, flat, timeout=cap)
                elif strategy == "b1":
                    r.run(["iptables-restore", "-w", "--noflush"], ours_s, timeout=cap)
                else:
                    r.run(["iptables-restore", "-w", "--noflush"], _chunked(flat, chunk_size(n)), timeout=cap)
            except subprocess.TimeoutExpired:
                outcome = "STARVED: still retrying after %d s (killed)" % cap
            except RuntimeError as e:
                outcome = "FAILED: %s" % (str(e).split("failed: ", 1)[-1].strip().splitlines() or ["?"])[0]
            took = time.perf_counter() - start
            time.sleep(0.3)
        finally:
            open(stop, "w").close()
            writer.wait(timeout=60)
        lines = open(logf).read().split("\n") if os.path.exists(logf) else []
        committed = [line.split()[1] for line in lines if line.startswith("ok ")]
        failed = [line.split()[1] for line in lines if line.startswith("fail ")]
        present = r.chain_names() if table == "nat" else None
        lost = len([c for c in committed if c not in present]) if present is not None else 0
        row = "%s, writer every %g s into %s: sync %s after %.2f s; writer committed %d, failed %d; " \
              "its chains lost: %d" % (strategy, interval, table, outcome, took, len(committed), len(failed), lost)
        log("  race " + row)
        out[tag] = row
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", default="1000,10000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-race", action="store_true")
    parser.add_argument("--race-cap", type=int, default=60, help="seconds before a starved sync is killed")
    parser.add_argument("--only-race", action="store_true")
    parser.add_argument("--races", help="strategy:interval:table,... (default: %s)"
                        % ",".join("%s:%g:%s" % r for r in RACES))
    opts = parser.parse_args()
    if opts.races:
        RACES[:] = [(a, float(b), c) for a, b, c in (x.split(":") for x in opts.races.split(","))]
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")

    def log(text):
        print(text, flush=True)
    with open("/proc/loadavg") as f:
        log("load average: " + " ".join(f.read().split()[:3]))
    results = {}
    with Lab(prefix="pnkp") as lab:
        for n in [int(x) for x in opts.services.split(",")]:
            results[n] = {} if opts.only_race else study(lab, n, opts.runs, log)
            if not opts.no_race:
                results[n]["race"] = race(lab, n, log, opts.race_cap)
    names = [k for k in next(iter(results.values())) if k not in ("baseline", "race")]
    if not names:
        names = []
    print("\n| scenario | " + " | ".join("%d Services" % n for n in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        cells = []
        for res in results.values():
            value = res.get(name)
            cell = fmt(value)
            if isinstance(value, float) and not name.startswith("r") and "baseline" in res:
                cell += " (%.2fx)" % (value / res["baseline"])
            cells.append(cell)
        print("| %s | %s |" % (name, " | ".join(cells)))
    for n, res in results.items():
        for row in res.get("race", {}).values():
            print("race %d: %s" % (n, row))


if __name__ == "__main__":
    main()
