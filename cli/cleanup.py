"""`podnet cleanup`: remove everything podnet put on this node, and nothing else.

What is ours is decided by name and by record, never by "looks like a network thing":

- CNI: the network configs `podnet install-cni` recorded (bin_dir/.podnet/installed.json;
  removed only while they hold what was written), the executables carrying our marker,
  the copied plugin code; per network named in those configs (or --network): the bridge
  plugin's masquerade chains and portmap's CNI-DN- chains (chosen by the plugins' own
  owner comments), the shared CNI-HOSTPORT-* chains once no other network's port mapping
  uses them, the bridge (cni0 unless the config names another) with the veths on it, the
  calico plugin's cali* veths, host-local's store <dataDir>/<network>, flannel's saved
  delegate configs (its dataDir), libcni's cached results of those networks;
- kube-proxy: every mode's own cleanup() (iptables, IPVS, nftables), as `podnet kube-proxy
  --cleanup` runs them;
- the NetworkPolicy agent: its table `inet podnet-network-policy` (its dataplane's cleanup());
- flanneld: FLANNEL-POSTRTG / FLANNEL-FWD and the jumps to them (flanneld.ipmasq.remove),
  the VTEP flannel.<VNI>, the TUN flannel0, routes of protocol 77, subnet.env;
- calico_lite: routes of protocol 78 (blackholes included), tunl0 brought back down
  (the kernel's fallback device cannot be deleted), the blocks file;
- then iptables-nft tables that this left holding nothing but empty ACCEPT built-in chains
  (they hold no rule, so deleting them changes no packet's fate; a fresh node has none).

The node's state is read before and after (pure `kernel_inventory` / `file_inventory` over
what was read); `--dry-run` prints what would go, a real run prints what went, and
anything of ours still there afterwards is an error (exit 1). A step that fails is
reported and the others still run. Sysctls (ip_forward, br_netfilter's) are not reset:
no record says what they were, and other things on the node depend on forwarding.
"""
from __future__ import annotations

import errno
import functools
import glob
import hashlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cli.install import CODE_DIR, read_record
from cni.executable import read_marker

log = logging.getLogger("podnet.cleanup")

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CACHE_DIR = "/var/lib/cni"
DEFAULT_IPAM_DIR = "/var/lib/cni/networks"          # ipam.store.DEFAULT_DATA_DIR
DEFAULT_FLANNEL_DATA_DIR = "/var/lib/cni/flannel"   # cni.plugins.flannel.DEFAULT_DATA_DIR
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"     # flanneld's and the flannel plugin's
DEFAULT_BLOCKS_FILE = "/run/calico-lite/blocks"     # calico_lite's agent and the calico plugin's
DEFAULT_BRIDGE = "cni0"

IPTABLES_TABLES = ("nat", "filter")
BUILTIN_CHAINS = {"nat": {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
                  "filter": {"INPUT", "FORWARD", "OUTPUT"},
                  "mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
                  "raw": {"PREROUTING", "OUTPUT"},
                  "security": {"INPUT", "FORWARD", "OUTPUT"}}
FAMILIES = ("ip", "ip6")
HOSTPORT_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")
VTEP_NAME = re.compile(r"flannel\.\d+\Z")


# ---- what is ours: from the record, our configs and the flags (pure) ---------------------

@dataclass
class Targets:
    bin_dir: str = DEFAULT_BIN_DIR
    cache_dir: str = DEFAULT_CACHE_DIR
    networks: set[str] = field(default_factory=set)
    conflists: dict[str, str | None] = field(default_factory=dict)     # path -> sha256 written (None: unknown)
    bridges: set[str] = field(default_factory=set)
    ipam_dirs: set[str] = field(default_factory=set)            # <dataDir>/<network>
    flannel_data_dirs: set[str] = field(default_factory=set)
    subnet_files: set[str] = field(default_factory=set)
    blocks_files: set[str] = field(default_factory=set)


def _ipam_dir(plugin: Mapping[str, Any], default: str) -> str:
    ipam = plugin.get("ipam")
    data_dir = ipam.get("dataDir") if isinstance(ipam, dict) else None
    return data_dir if isinstance(data_dir, str) and data_dir else default


def _str(plugin: Mapping[str, Any], key: str, default: str) -> str:
    value = plugin.get(key)
    return value if isinstance(value, str) and value else default


def targets_from(record: Mapping[str, Any], configs: Mapping[str, Any], bin_dir: str = DEFAULT_BIN_DIR,
                 cache_dir: str = DEFAULT_CACHE_DIR, ipam_dir: str = DEFAULT_IPAM_DIR,
                 flannel_data_dir: str = DEFAULT_FLANNEL_DATA_DIR, subnet_file: str = DEFAULT_SUBNET_FILE,
                 blocks_file: str = DEFAULT_BLOCKS_FILE, networks: Iterable[str] = (),
                 bridges: Iterable[str] = ()) -> Targets:
    """What is ours. record: install-cni's record; configs: {path: parsed config} of the
    recorded conflists still present (their plugins name the paths and devices they use:
    a plugin's own key wins over the flag, which gives the default). The daemons' files
    (subnet.env, the blocks file) are always targets: the daemons write them whether or not
    a config names them."""
    t = Targets(bin_dir=bin_dir, cache_dir=cache_dir, networks=set(networks), bridges=set(bridges),
                subnet_files={subnet_file}, blocks_files={blocks_file})
    for entry in record.get("conflists", []):
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            t.conflists[entry["path"]] = entry.get("sha256") if isinstance(entry.get("sha256"), str) else None
            if isinstance(entry.get("network"), str):
                t.networks.add(entry["network"])
    for conf in configs.values():
        if not isinstance(conf, dict) or not isinstance(conf.get("name"), str):
            continue
        network = conf["name"]
        t.networks.add(network)
        listed = conf.get("plugins")
        plugins: list[Any] = listed if isinstance(listed, list) else [conf]
        for plugin in plugins:
            if not isinstance(plugin, dict):
                continue
            kind = plugin.get("type")
            if kind == "flannel":
                t.subnet_files.add(_str(plugin, "subnetFile", subnet_file))
                t.flannel_data_dirs.add(_str(plugin, "dataDir", flannel_data_dir))
                delegate = plugin.get("delegate")
                t.bridges.add(_str(delegate if isinstance(delegate, dict) else {}, "bridge", DEFAULT_BRIDGE))
                t.ipam_dirs.add(os.path.join(_ipam_dir(plugin, ipam_dir), network))
            elif kind == "bridge":
                t.bridges.add(_str(plugin, "bridge", DEFAULT_BRIDGE))
                t.ipam_dirs.add(os.path.join(_ipam_dir(plugin, ipam_dir), network))
            elif kind == "calico":
                t.blocks_files.add(_str(plugin, "nodeBlocksFile", blocks_file))
                t.ipam_dirs.add(os.path.join(_ipam_dir(plugin, ipam_dir), network))
    for network in t.networks:          # networks given by flag: the default store
        if not any(os.path.basename(d) == network for d in t.ipam_dirs):
            t.ipam_dirs.add(os.path.join(ipam_dir, network))
    if not t.bridges and not configs:
        t.bridges.add(DEFAULT_BRIDGE)
    if not t.flannel_data_dirs:
        t.flannel_data_dirs.add(flannel_data_dir)
    return t


# ---- the kernel's state, read; and what of it is ours (pure) -------------------------------

@dataclass
class LinkInfo:
    name: str
    kind: str
    master: str = ""
    up: bool = False
    addresses: tuple[str, ...] = ()


@dataclass
class Kernel:
    iptables: dict[tuple[str, str], str] = field(default_factory=dict)     # (family, table) -> iptables-save
    nft_tables: list[tuple[str, str]] = field(default_factory=list)        # (family, name)
    links: list[LinkInfo] = field(default_factory=list)
    routes: list[tuple[str, int, str]] = field(default_factory=list)       # (family, protocol, dst)


def kube_proxy_chains(table: str, declared: Iterable[str]) -> list[str]:
    """kube-proxy's chains (any mode) among `declared`, by the modes' own lists."""
    from kube_proxy import iptables as kp
    from kube_proxy import ipvs, rules
    own = set(kp.NAT_BASE if table == "nat" else kp.FILTER_BASE)
    own |= set(ipvs.NAT_CHAINS if table == "nat" else ipvs.FILTER_CHAINS)
    own |= set(rules.SHARED_CHAINS.get(table, ()))
    return [c for c in declared if c in own or kp.is_our_chain(c)]


def cni_chains(saved: str, networks: Iterable[str]) -> list[str]:
    """Our networks' per-attachment chains in a nat table, found by the plugins' own rules:
    bridge masquerade chains (jumped to from POSTROUTING with the network's comment) and
    portmap's CNI-DN- chains; then the shared CNI-HOSTPORT-* chains unless a CNI-DN- chain
    of another network stays."""
    from cni.plugins import bridge, portmap
    from podnet.net.iptables import declared_chains, rules_jumping_to
    chains: list[str] = []
    for network in sorted(networks):
        chains += bridge.stale_masq_chains(saved, network, ())
        chains += portmap.stale_chains(saved, network, ())
    declared = declared_chains(saved)
    others = [c for c in declared if c.startswith("CNI-DN-") and c not in chains]
    others += [r.split(" ", 2)[1] for c in others for r in rules_jumping_to(saved, c)
               if not r.startswith("-A CNI-HOSTPORT-")]
    if not others:
        chains += [c for c in HOSTPORT_CHAINS if c in declared]
    return chains


def flannel_chains(table: str, declared: Iterable[str]) -> list[str]:
    from flanneld import ipmasq
    ours = {chain for t, (_, chain, _) in ipmasq.TABLES.items() if t == table}
    return [c for c in declared if c in ours]


def nft_tables_ours() -> set[tuple[str, str]]:
    from kube_proxy import nftables as kpn
    from network_policy import nftables as npn
    return {("ip", kpn.TABLE), ("ip6", kpn.TABLE), (npn.FAMILY, npn.TABLE)}


def route_protocols() -> dict[int, str]:
    from calico_lite.routes import ROUTE_PROTOCOL as CALICO
    from flanneld.backend.base import ROUTE_PROTOCOL as FLANNEL
    return {FLANNEL: "flanneld", CALICO: "calico-lite"}


def link_is_ours(link: LinkInfo, bridges: Iterable[str]) -> bool:
    from flanneld.backend.udp import TUN_NAME
    from kube_proxy.ipvs import DUMMY
    bridges = set(bridges)
    return ((link.kind == "vxlan" and bool(VTEP_NAME.match(link.name)))
            or (link.kind == "tun" and link.name == TUN_NAME)
            or (link.kind == "bridge" and link.name in bridges)
            or (link.kind == "veth" and (link.master in bridges or link.name.startswith("cali")))
            or (link.kind == "dummy" and link.name == DUMMY))


def kernel_inventory(kernel: Kernel, targets: Targets) -> list[str]:
    """What of the kernel's state is ours, as lines an operator reads."""
    from podnet.net.iptables import declared_chains
    out = []
    for (family, table), saved in sorted(kernel.iptables.items()):
        tool = "iptables" if family == "ip" else "ip6tables"
        declared = declared_chains(saved)
        ours = kube_proxy_chains(table, declared) + flannel_chains(table, declared)
        if table == "nat":
            ours += cni_chains(saved, targets.networks)
        out += ["%s %s chain %s" % (tool, table, c) for c in sorted(set(ours))]
    mine = nft_tables_ours()
    out += ["nft table %s %s" % t for t in sorted(kernel.nft_tables) if t in mine]
    for link in sorted(kernel.links, key=lambda x: x.name):
        if link_is_ours(link, targets.bridges):
            out.append("link %s (%s)" % (link.name, link.kind))
        elif link.kind == "ipip" and link.name == "tunl0" and (link.up or link.addresses):
            out.append("link tunl0 configuration (up, addresses %s)" % (",".join(link.addresses) or "none"))
    protocols = route_protocols()
    out += ["route %s proto %d (%s)" % (dst, proto, protocols[proto])
            for family, proto, dst in sorted(kernel.routes) if proto in protocols]
    return out


# ---- files (read from the file system) -------------------------------------------------

def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def our_executables(bin_dir: str) -> list[str]:
    try:
        names = sorted(os.listdir(bin_dir))
    except FileNotFoundError:
        return []
    return [p for p in (os.path.join(bin_dir, n) for n in names) if os.path.isfile(p) and read_marker(p)]


def cached_results(cache_dir: str, networks: Iterable[str]) -> list[str]:
    """libcni's cached results (and ours, `podnet cni`) of our networks: results/<network>-<id>-<ifname>."""
    out: list[str] = []
    for network in sorted(networks):
        out += sorted(glob.glob(os.path.join(glob.escape(cache_dir), "results", glob.escape(network) + "-*")))
    return out


def file_inventory(targets: Targets) -> tuple[list[str], list[str]]:
    """(paths of ours that exist, in removal order; configs left because they changed since
    podnet wrote them)."""
    paths: list[str] = []
    changed = []
    for path, digest in sorted(targets.conflists.items()):
        if os.path.lexists(path):
            if digest is None or _sha256(path) == digest:
                paths.append(path)
            else:
                changed.append(path)
    paths += cached_results(targets.cache_dir, targets.networks)
    paths += [p for p in sorted(targets.ipam_dirs) if os.path.lexists(p)]
    paths += [p for p in sorted(targets.flannel_data_dirs) if os.path.lexists(p)]
    paths += [p for p in sorted(targets.subnet_files | targets.blocks_files) if os.path.lexists(p)]
    paths += our_executables(targets.bin_dir)
    code = os.path.join(targets.bin_dir, CODE_DIR)
    if os.path.lexists(code):
        paths.append(code)
    return paths, changed


def parent_dirs(targets: Targets) -> list[str]:
    """Directories our files are made in by our own code or for it: the daemons' run
    directories (/run/flannel, /run/calico-lite), host-local's root (/var/lib/cni/networks),
    libcni's results/ cache. Removed when removing our files leaves them empty (whoever uses
    them again makes them again); the bin and config directories, which the runtime watches,
    never are."""
    dirs = {os.path.dirname(p) for p in targets.subnet_files | targets.blocks_files | targets.ipam_dirs}
    dirs.add(os.path.join(targets.cache_dir, "results"))
    return sorted(dirs)


# ---- reading and changing the kernel ---------------------------------------------------------

def read_kernel() -> Kernel:
    from podnet.net import iptables, nft
    from podnet.net.netlink import AF_INET, AF_INET6, Netlink
    k = Kernel()
    for family in FAMILIES:
        for table in IPTABLES_TABLES:
            try:
                k.iptables[(family, table)] = iptables.save(table, ipv6=family == "ip6")
            except (OSError, iptables.IptablesError) as e:
                log.warning("%s-save -t %s: %s", "iptables" if family == "ip" else "ip6tables", table, e)
    try:
        for line in nft.list_text("tables").splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "table":
                k.nft_tables.append((words[1], words[2]))
    except (OSError, nft.NftError) as e:
        log.warning("nft list tables: %s", e)
    with Netlink() as nl:
        links = nl.links()
        names = {link.index: link.name for link in links}
        for link in links:
            addrs = tuple(str(a.net) for a in nl.addrs(link.index) if a.scope == 0)
            k.links.append(LinkInfo(link.name, link.kind, names.get(link.master, "") if link.master else "",
                                    link.up, addrs))
        for family, af in (("ip", AF_INET), ("ip6", AF_INET6)):
            k.routes += [(family, r.protocol, str(r.dst)) for r in nl.routes(af)]
    return k


def _step(what: str, action: Callable[[], object], problems: list[str]) -> None:
    try:
        action()
    except Exception as e:      # one failing step never stops the others: reported, exit 1
        problems.append("%s: %s" % (what, e))
        log.error("%s failed: %s", what, e)


def remove_kube_proxy() -> None:
    from kube_proxy.proxier import Config
    from kube_proxy.server import MODES, make_proxier
    for mode in MODES:
        make_proxier(mode, Config()).cleanup()


def remove_network_policy() -> None:
    from network_policy.model import PolicyModel
    from network_policy.nftables import NftablesDataplane
    NftablesDataplane(PolicyModel("podnet-cleanup")).cleanup()


def remove_flannel_rules() -> None:
    from flanneld import ipmasq
    ipmasq.remove()


def chain_removal(saved: str, table: str, chains: Iterable[str]) -> list[str]:
    """Restore inputs deleting `chains` of `table` and every rule jumping to them: first the
    jumps and the chains' rules, then (iptables-nft refuses to delete a chain in the
    transaction that removes its last reference) the chains. [] when none exists."""
    from podnet.net.iptables import chain_exists, rules_jumping_to
    chains = [c for c in chains if chain_exists(saved, c)]
    if not chains:
        return []
    doomed = set(chains)
    unlink = ["-D" + r[2:] for c in chains for r in rules_jumping_to(saved, c) if r.split(" ", 2)[1] not in doomed]
    first = ["*" + table] + unlink + ["-F " + c for c in chains] + ["COMMIT"]
    return ["\n".join(first) + "\n", "\n".join(["*" + table] + ["-X " + c for c in chains] + ["COMMIT"]) + "\n"]


def remove_cni_chains(networks: Iterable[str]) -> None:
    from podnet.net import iptables
    for ipv6 in (False, True):
        saved = iptables.save("nat", ipv6=ipv6)
        for text in chain_removal(saved, "nat", cni_chains(saved, networks)):
            iptables.restore(text, ipv6=ipv6)


def remove_links(bridges: Iterable[str]) -> None:
    from podnet.net.netlink import Netlink, NetlinkError
    bridges = set(bridges)
    with Netlink() as nl:
        links = nl.links()
        names = {link.index: link.name for link in links}
        # ports first: a veth on the bridge outlives the bridge's deletion otherwise
        ordered = sorted(links, key=lambda link: link.kind == "bridge")
        for link in ordered:
            info = LinkInfo(link.name, link.kind, names.get(link.master, "") if link.master else "")
            if link_is_ours(info, bridges):
                try:
                    nl.del_link(link.index)
                except NetlinkError as e:
                    if e.errno != errno.ENODEV:   # its peer's deletion took it along
                        raise
        tunl = nl.link("tunl0")
        if tunl is not None and tunl.kind == "ipip":
            # the fallback device of the ipip module: it cannot be deleted, only put back as it came
            for addr in nl.addrs(tunl.index):
                nl.del_addr(tunl.index, addr.net)
            if tunl.up:
                nl.set_link(tunl.index, up=False)


def remove_routes() -> None:
    from podnet.net.netlink import AF_INET, AF_INET6, Netlink, NetlinkError
    protocols = route_protocols()
    with Netlink() as nl:
        for af in (AF_INET, AF_INET6):
            for r in nl.routes(af):
                if r.protocol in protocols:
                    try:
                        nl.del_route(r.dst, r.gateway, r.oif, r.table, r.priority, r.protocol)
                    except NetlinkError as e:
                        if e.errno != errno.ESRCH:    # gone with its device meanwhile
                            raise


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def empty_iptables_tables() -> list[tuple[str, str]]:
    """iptables-nft tables holding no rule and only empty built-in chains with policy accept."""
    from podnet.net import nft
    out = []
    for line in nft.list_text("tables").splitlines():
        words = line.split()
        if len(words) != 3 or words[1] not in FAMILIES or words[2] not in BUILTIN_CHAINS:
            continue
        family, name = words[1], words[2]
        objects = nft.list_json("table", family, name)
        chains = [o["chain"] for o in objects if "chain" in o]
        if any(k not in ("table", "chain") for o in objects for k in o):
            continue        # rules, sets, maps...: not empty
        if all(c.get("name") in BUILTIN_CHAINS[name] and c.get("hook") and c.get("policy", "accept") == "accept"
               for c in chains):
            out.append((family, name))
    return out


def remove_empty_tables(tables: Iterable[tuple[str, str]]) -> None:
    from podnet.net import nft
    text = "".join("delete table %s %s\n" % t for t in tables)
    if text:
        nft.apply(text)


# ---- the command ------------------------------------------------------------------------------

def load_configs(paths: Iterable[str]) -> dict[str, Any]:
    import json
    out = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                out[path] = json.loads(f.read())
        except (OSError, ValueError):
            continue
    return out


def make_targets(opts: Any) -> Targets:
    record = read_record(opts.cni_bin_dir)
    recorded = [c["path"] for c in record.get("conflists", [])
                if isinstance(c, dict) and isinstance(c.get("path"), str)]
    return targets_from(record, load_configs(recorded), bin_dir=opts.cni_bin_dir, cache_dir=opts.cni_cache_dir,
                        ipam_dir=opts.ipam_data_dir, flannel_data_dir=opts.flannel_data_dir,
                        subnet_file=opts.subnet_file, blocks_file=opts.blocks_file, networks=opts.network,
                        bridges=opts.bridge)


def cmd_cleanup(opts: Any) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    targets = make_targets(opts)
    before = read_kernel()
    ours_before = kernel_inventory(before, targets)
    files, changed = file_inventory(targets)
    for path in changed:
        print("left %s: it changed since podnet wrote it" % path)
    tables_before = set(before.nft_tables)
    if opts.dry_run:
        for line in ours_before + ["file %s" % p for p in files]:
            print("would remove %s" % line)
        return 0
    problems: list[str] = []
    _step("kube-proxy's cleanup", remove_kube_proxy, problems)
    _step("the NetworkPolicy table", remove_network_policy, problems)
    _step("flanneld's iptables chains", remove_flannel_rules, problems)
    _step("the CNI plugins' chains", lambda: remove_cni_chains(targets.networks), problems)
    _step("links", lambda: remove_links(targets.bridges), problems)
    _step("routes", remove_routes, problems)
    for path in files:
        _step("removing %s" % path, functools.partial(remove_path, path), problems)
    for directory in parent_dirs(targets):
        # a mount point (the cleanup container's hostPath) cannot go and needs not: the host's stays empty
        if os.path.isdir(directory) and not os.listdir(directory) and not os.path.ismount(directory):
            _step("removing %s" % directory, functools.partial(os.rmdir, directory), problems)
            files.append(directory)
    had_ours = {(("ip" if line.startswith("iptables") else "ip6"), line.split()[1])
                for line in ours_before if line.startswith(("iptables ", "ip6tables "))}
    empty: list[tuple[str, str]] = []

    def find_empty() -> None:
        empty.extend(t for t in empty_iptables_tables() if t in had_ours or t not in tables_before)
    _step("finding empty iptables tables", find_empty, problems)
    _step("removing empty iptables tables", lambda: remove_empty_tables(empty), problems)
    after = read_kernel()
    ours_after = set(kernel_inventory(after, targets))
    for line in ours_before:
        if line not in ours_after:
            print("removed %s" % line)
    for family, name in empty:
        print("removed nft table %s %s (iptables table left empty)" % (family, name))
    for path in files:
        if not os.path.lexists(path):
            print("removed file %s" % path)
    left = [line for line in kernel_inventory(after, targets)] + [p for p in files if os.path.lexists(p)]
    for line in left:
        print("left %s" % line, file=sys.stderr)
    for problem in problems:
        print("podnet cleanup: %s" % problem, file=sys.stderr)
    return 1 if left or problems else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cleanup", help="remove everything podnet created on this node (rules, devices, routes, "
                                       "CNI configs and state); --dry-run lists it")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    p.add_argument("--cni-bin-dir", default=DEFAULT_BIN_DIR, help="default: %(default)s")
    p.add_argument("--cni-cache-dir", default=DEFAULT_CACHE_DIR, help="libcni's cache (results/); default: "
                   "%(default)s")
    p.add_argument("--ipam-data-dir", default=DEFAULT_IPAM_DIR,
                   help="host-local's store when a config names none (default: %(default)s)")
    p.add_argument("--flannel-data-dir", default=DEFAULT_FLANNEL_DATA_DIR,
                   help="the flannel plugin's saved configs when a config names none (default: %(default)s)")
    p.add_argument("--subnet-file", default=DEFAULT_SUBNET_FILE, help="flanneld's (default: %(default)s)")
    p.add_argument("--blocks-file", default=DEFAULT_BLOCKS_FILE, help="calico_lite's (default: %(default)s)")
    p.add_argument("--network", action="append", default=[], metavar="NAME",
                   help="a CNI network of ours besides those install-cni recorded (repeatable)")
    p.add_argument("--bridge", action="append", default=[], metavar="NAME",
                   help="a bridge of ours besides those our configs name (repeatable; cni0 when no config "
                        "is recorded)")
    p.set_defaults(func=cmd_cleanup)
