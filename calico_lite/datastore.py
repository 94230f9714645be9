"""calico-lite's cluster data in etcd v3: config, nodes, block affinities.

Key layout (prefix default /calico-lite/v1; values are JSON objects):

    <prefix>/config
        {"asNumber": 64512, "nodeToNodeMesh": true, "ipipMode": "cross-subnet",
         "poolCIDR": "10.65.0.0/16", "blockSize": 26}
        ipipMode: "always" | "cross-subnet" | "never". Every key is optional
        (defaults below), unknown keys are ignored.
    <prefix>/nodes/<name>
        {"ip": "192.168.50.1/24", "asNumber": 64512, "role": "node",
         "rrClusterID": "244.0.0.1"}
        ip: the node's address on the underlay with its prefix length (its
        BGP source address, IPIP endpoint, and the local subnet for
        cross-subnet decisions); asNumber: null to use the cluster's;
        role: "node" or "route-reflector"; rrClusterID: null unless an RR
        (null there means BIRD's default, the router ID).
    <prefix>/blocks/<network>-<prefixlen>      e.g. .../blocks/10.65.3.64-26
        {"node": "node1"}
        the block's affinity. Created only with a "create if absent"
        transaction, so a block can never be given to two nodes.

Pure parts (dataclasses, key names, block arithmetic, choosing a free block)
need no etcd. `Datastore` is the small store on top of podnet.etcd.EtcdClient
(etcd3gw over etcd's JSON gateway, the same layer flanneld uses):

    ds = Datastore(["http://10.0.0.1:2379"])
    ds.put_config(ClusterConfig(pool="10.65.0.0/16", ipip_mode="cross-subnet"))
    ds.put_node(Node("node1", "192.168.50.1/24"))
    block = ds.allocate_block("node1")         # IPNet; the same one on every rerun
    snap = ds.snapshot()                       # config, nodes, blocks, revision
    ds.wait_for_change(snap.revision, 30)      # True if anything under the prefix changed

Block allocation is idempotent for the same node: a node that already holds
a block gets that one back (pass additional=True to claim one more, e.g.
when the first is full). Contention (two nodes taking the same free block at
once) is resolved by the transaction: the loser re-lists and takes the next.
"""
import json
import logging
import re
from dataclasses import dataclass, field

from podnet.etcd import EtcdClient, EtcdError, cmp_absent, cmp_value, net_from_key, net_key_name, op_delete, op_put
from podnet.net.ip import AF_INET, IP, IPNet, parse_cidr, parse_ip

log = logging.getLogger("calico_lite.datastore")

DEFAULT_PREFIX = "/calico-lite/v1"
DEFAULT_AS = 64512
DEFAULT_POOL = "10.65.0.0/16"
DEFAULT_BLOCK_SIZE = 26
IPIP_MODES = ("always", "cross-subnet", "never")
ROLES = ("node", "route-reflector")
ALLOCATE_ATTEMPTS = 10

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?\Z")


class DataError(ValueError):
    """A value in the datastore (or given to it) is malformed."""


class PoolExhaustedError(RuntimeError):
    """Every block of the pool has an affinity."""


# ---- pure: the data -------------------------------------------------------------

def _as_number(value, what):
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 0xFFFFFFFF:
        raise DataError("%s must be an AS number from 1 to 4294967295, not %r" % (what, value))
    return value


def _router_id(value, what):
    """A dotted-quad identifier (BGP router ID / RR cluster ID)."""
    try:
        ip = parse_ip(value)
    except ValueError:
        ip = None
    if ip is None or ip.family != AF_INET or ip.value == 0:
        raise DataError("%s must be a non-zero dotted quad like 244.0.0.1, not %r" % (what, value))
    return str(ip)


@dataclass(frozen=True)
class ClusterConfig:
    as_number: int = DEFAULT_AS
    node_to_node_mesh: bool = True
    ipip_mode: str = "always"
    pool: str = DEFAULT_POOL          # CIDR, masked
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self):
        _as_number(self.as_number, "asNumber")
        if not isinstance(self.node_to_node_mesh, bool):
            raise DataError("nodeToNodeMesh must be true or false, not %r" % (self.node_to_node_mesh,))
        if self.ipip_mode not in IPIP_MODES:
            raise DataError("ipipMode must be one of %s, not %r" % ("|".join(IPIP_MODES), self.ipip_mode))
        try:
            pool = parse_cidr(self.pool)
        except ValueError:
            raise DataError("poolCIDR %r is not a CIDR" % (self.pool,)) from None
        if pool.family != AF_INET:
            raise DataError("poolCIDR %s: only IPv4 pools are supported" % self.pool)
        if pool.ip != pool.network:
            raise DataError("poolCIDR %s has host bits set (did you mean %s?)" % (self.pool, pool.masked()))
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or not pool.prefixlen <= bs <= 32:
            raise DataError("blockSize must be a prefix length from %d (the pool's) to 32, not %r"
                            % (pool.prefixlen, bs))

    @property
    def pool_net(self):
        return parse_cidr(self.pool)

    def to_dict(self):
        return {"asNumber": self.as_number, "nodeToNodeMesh": self.node_to_node_mesh,
                "ipipMode": self.ipip_mode, "poolCIDR": self.pool, "blockSize": self.block_size}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise DataError("the config must be a JSON object")
        kw = {}
        for key, attr in (("asNumber", "as_number"), ("nodeToNodeMesh", "node_to_node_mesh"),
                          ("ipipMode", "ipip_mode"), ("poolCIDR", "pool"), ("blockSize", "block_size")):
            if d.get(key) is not None:
                kw[attr] = d[key]
        return cls(**kw)


@dataclass(frozen=True)
class Node:
    name: str
    ip: str                             # underlay address with prefix length, "192.168.50.1/24"
    as_number: int | None = None        # None: the cluster's
    role: str = "node"
    rr_cluster_id: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise DataError("node name %r: use lower-case letters, digits, '-' and '.' (at most 253)"
                            % (self.name,))
        try:
            net = parse_cidr(self.ip)
        except ValueError:
            raise DataError("node %s: ip %r must be an address with its prefix length, e.g. "
                            "192.168.50.1/24" % (self.name, self.ip)) from None
        if net.family != AF_INET:
            raise DataError("node %s: only IPv4 underlay addresses are supported" % self.name)
        if self.as_number is not None:
            _as_number(self.as_number, "node %s asNumber" % self.name)
        if self.role not in ROLES:
            raise DataError("node %s: role must be one of %s, not %r" % (self.name, "|".join(ROLES), self.role))
        if self.rr_cluster_id is not None:
            if self.role != "route-reflector":
                raise DataError("node %s: rrClusterID is only for a route-reflector" % self.name)
            object.__setattr__(self, "rr_cluster_id", _router_id(self.rr_cluster_id,
                                                                 "node %s rrClusterID" % self.name))

    @property
    def address(self):
        """The underlay address alone (IP)."""
        return parse_cidr(self.ip).ip

    @property
    def subnet(self):
        """The underlay subnet the node is directly attached to (IPNet, masked)."""
        return parse_cidr(self.ip).masked()

    @property
    def is_route_reflector(self):
        return self.role == "route-reflector"

    def asn(self, config):
        """The node's AS number: its own, or the cluster's."""
        return self.as_number if self.as_number is not None else config.as_number

    def to_dict(self):
        return {"ip": self.ip, "asNumber": self.as_number, "role": self.role,
                "rrClusterID": self.rr_cluster_id}

    @classmethod
    def from_dict(cls, name, d):
        if not isinstance(d, dict):
            raise DataError("node %s must be a JSON object" % name)
        return cls(name, d.get("ip"), d.get("asNumber"), d.get("role") or "node", d.get("rrClusterID"))


@dataclass(frozen=True)
class Snapshot:
    """Everything under the prefix at one etcd revision."""
    config: ClusterConfig | None
    nodes: dict = field(default_factory=dict)     # name -> Node
    blocks: dict = field(default_factory=dict)    # IPNet -> node name
    revision: int = 0

    def blocks_of(self, name):
        """The blocks with affinity to node `name`, lowest first."""
        return sorted((b for b, n in self.blocks.items() if n == name),
                      key=lambda b: (b.network.value, b.prefixlen))


# ---- pure: keys and blocks ----------------------------------------------------------

def _prefix(prefix):
    return "/" + prefix.strip("/")


def config_key(prefix=DEFAULT_PREFIX):
    return _prefix(prefix) + "/config"


def node_key(name, prefix=DEFAULT_PREFIX):
    return "%s/nodes/%s" % (_prefix(prefix), name)


def block_key(block, prefix=DEFAULT_PREFIX):
    return "%s/blocks/%s" % (_prefix(prefix), net_key_name(block))


def block_from_key(key):
    """'.../blocks/10.65.3.64-26' -> IPNet; DataError if malformed."""
    try:
        net = net_from_key(key)
    except ValueError:
        raise DataError("%s is not a block key (want .../blocks/<network>-<prefixlen>)" % key) from None
    if net.ip != net.network:
        raise DataError("%s: block has host bits set" % key)
    return net


def node_from_key(key):
    return key.rsplit("/", 1)[-1]


def pool_blocks(config):
    """Every block of the pool, lowest first (a generator: a /8 pool has 262144 /26s)."""
    pool = config.pool_net
    step = 1 << (32 - config.block_size)
    for value in range(pool.network.value, pool.broadcast.value + 1, step):
        yield IPNet(IP(AF_INET, value), config.block_size)


def choose_block(config, taken):
    """The lowest block of the pool not in `taken` (a set of IPNets), or None if all are."""
    for block in pool_blocks(config):
        if block not in taken:
            return block
    return None


def block_count(config):
    return 1 << (config.block_size - config.pool_net.prefixlen)


def parse_snapshot(prefix, kvs, revision):
    """[(key str, value bytes)] under `prefix` -> Snapshot. Malformed entries are
    logged and skipped, except that a malformed block value still marks its block
    as taken (by node None), so it is never handed out twice."""
    prefix = _prefix(prefix)
    config, nodes, blocks = None, {}, {}
    for key, value in kvs:
        rest = key[len(prefix):]
        try:
            if rest == "/config":
                config = ClusterConfig.from_dict(_json(key, value))
            elif rest.startswith("/nodes/"):
                name = node_from_key(key)
                nodes[name] = Node.from_dict(name, _json(key, value))
            elif rest.startswith("/blocks/"):
                block = block_from_key(key)
                blocks[block] = None
                owner = _json(key, value).get("node")
                if not isinstance(owner, str) or not owner:
                    raise DataError("%s has no node" % key)
                blocks[block] = owner
        except (DataError, TypeError) as e:
            log.warning("skipping %s: %s", key, e)
    return Snapshot(config, nodes, blocks, revision)


def _json(key, value):
    try:
        out = json.loads(value.decode("utf-8") if isinstance(value, bytes) else value)
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError("%s is not JSON: %s" % (key, e)) from None
    if not isinstance(out, dict):
        raise DataError("%s is not a JSON object" % key)
    return out


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


# ---- the store ------------------------------------------------------------------------

class Datastore:
    """calico-lite's data in one etcd cluster (endpoints tried in turn)."""

    def __init__(self, endpoints, prefix=DEFAULT_PREFIX, timeout=5.0, cafile=None, certfile=None,
                 keyfile=None):
        self.etcd = EtcdClient(endpoints, cafile=cafile, certfile=certfile, keyfile=keyfile, timeout=timeout)
        self.endpoints = [e[:3] for e in self.etcd.endpoints]      # [(scheme, host, port)]
        self.prefix = _prefix(prefix)
        self.timeout = timeout

    def __repr__(self):
        return "Datastore(%s %s)" % (",".join("%s://%s:%d" % e for e in self.endpoints), self.prefix)

    def _get(self, key):
        """The JSON object at `key`, or None if there is no such key."""
        kv, _ = self.etcd.get(key)
        return _json(kv.key, kv.value) if kv is not None else None

    # ---- config and nodes ----
    def get_config(self):
        """The ClusterConfig, or None if none was written yet (DataError if malformed)."""
        d = self._get(config_key(self.prefix))
        return ClusterConfig.from_dict(d) if d is not None else None

    def put_config(self, config):
        self.etcd.put(config_key(self.prefix), _dumps(config.to_dict()))

    def put_node(self, node):
        self.etcd.put(node_key(node.name, self.prefix), _dumps(node.to_dict()))

    def get_node(self, name):
        d = self._get(node_key(name, self.prefix))
        return Node.from_dict(name, d) if d is not None else None

    def delete_node(self, name, release_blocks=True):
        """Remove a node (and, by default, the affinities of its blocks)."""
        if release_blocks:
            for block in self.snapshot().blocks_of(name):
                self.release_block(block, name)
        return self.etcd.delete(node_key(name, self.prefix))

    # ---- reading everything ----
    def snapshot(self):
        """Config, nodes and blocks at one revision (one range request)."""
        kvs, revision = self.etcd.get_prefix(self.prefix + "/")
        return parse_snapshot(self.prefix, [(kv.key, kv.value) for kv in kvs], revision)

    def list_nodes(self):
        return self.snapshot().nodes

    def list_blocks(self):
        """{block IPNet: node name} (None for a malformed entry, which still takes its block)."""
        return self.snapshot().blocks

    # ---- blocks ----
    def allocate_block(self, node_name, additional=False):
        """A block with affinity to `node_name`: the one it holds (lowest first), or a free
        one claimed atomically. additional=True always claims a new one."""
        if not isinstance(node_name, str) or not _NAME_RE.match(node_name):
            raise DataError("bad node name %r" % (node_name,))
        for attempt in range(ALLOCATE_ATTEMPTS):
            snap = self.snapshot()
            if snap.config is None:
                raise DataError("no calico-lite config at %s: write one first (put_config)"
                                % config_key(self.prefix))
            mine = [b for b in snap.blocks_of(node_name) if snap.config.pool_net.contains(b.network)
                    and b.prefixlen == snap.config.block_size]
            if mine and not additional:
                return mine[0]
            block = choose_block(snap.config, set(snap.blocks))
            if block is None:
                raise PoolExhaustedError("pool %s is full: all %d /%d blocks have an affinity"
                                         % (snap.config.pool, block_count(snap.config), snap.config.block_size))
            key = block_key(block, self.prefix)
            if self.etcd.txn([cmp_absent(key)], [op_put(key, _dumps({"node": node_name}))]):
                log.info("block %s now has affinity to %s", block, node_name)
                return block
            log.info("block %s was taken under us (attempt %d): retrying", block, attempt + 1)
        raise EtcdError("could not claim a block after %d attempts: too much contention" % ALLOCATE_ATTEMPTS)

    def release_block(self, block, node_name):
        """Drop `node_name`'s affinity to `block`; False if the block is not (or no longer) its."""
        key = block_key(block, self.prefix)
        return self.etcd.txn([cmp_value(key, _dumps({"node": node_name}))], [op_delete(key)])

    # ---- change notification ----
    def wait_for_change(self, revision, timeout):
        """Block until a key under the prefix changes after `revision`, or `timeout`
        seconds pass; True if something changed (or may have: a compacted `revision`).
        For a level-triggered loop: snapshot(), act on it, wait_for_change(snap.revision,
        ...), repeat. EtcdError if etcd cannot be reached."""
        return self.etcd.watch_once(self.prefix + "/", revision + 1, timeout)
