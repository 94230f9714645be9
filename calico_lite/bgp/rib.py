"""Routing information bases and the BGP decision process, as pure data.

- Adj-RIB-In: what each peer sent us, after import (loop checks, LOCAL_PREF
  for eBGP routes). Kept as one table of candidates per prefix plus an index
  per peer, so a session loss finds its routes without scanning every prefix.
- Loc-RIB: the best candidate per prefix (`select_best`, RFC 4271 §9.1.2.2
  with the RFC 4456 §9 tie-breaks).
- Adj-RIB-Out: `export_attributes` says what (if anything) a given peer
  should be sent for a Loc-RIB route: eBGP/iBGP rules, split horizon and
  route reflection. The speaker keeps the last attributes sent per peer and
  sends only differences.

Nothing here does I/O, so every rule is unit-tested directly.
"""
from dataclasses import dataclass

from calico_lite.bgp.messages import ip_key

DEFAULT_LOCAL_PREF = 100


class Source:
    """Where routes come from: one peer session, or the speaker itself (`local`).

    Compared by identity: a peer that reconnects gets a new Source, so late
    events of the old session can never touch the new session's routes.
    """
    __slots__ = ("address", "router_id", "remote_as", "ibgp", "rr_client", "local")

    def __init__(self, address, router_id, remote_as, ibgp, rr_client=False, local=False):
        self.address = address          # peer address (str), None for local routes
        self.router_id = router_id      # the BGP identifier it sent in its OPEN
        self.remote_as = remote_as
        self.ibgp = ibgp
        self.rr_client = rr_client
        self.local = local

    def __repr__(self):
        return "<Source %s>" % ("local" if self.local else self.address)


def local_source(router_id, local_as):
    return Source(None, router_id, local_as, ibgp=True, local=True)


@dataclass(frozen=True, slots=True, eq=True)
class Route:
    """One path to a prefix: its attributes and the source it came from.

    `next_hop` is None only for our own announcements made without one (the
    next hop is then our address towards each peer)."""
    prefix: str
    attrs: object               # messages.PathAttributes
    source: Source

    @property
    def next_hop(self):
        return self.attrs.next_hop

    @property
    def peer(self):
        """The address of the peer that sent it; None for a route we originate."""
        return self.source.address

    @property
    def is_local(self):
        return self.source.local

    @property
    def local_pref(self):
        lp = self.attrs.local_pref
        return DEFAULT_LOCAL_PREF if lp is None else lp


# ---- import ------------------------------------------------------------------------

def import_attributes(attrs, source, local_as, router_id, cluster_id):
    """The attributes to keep for a route received from `source`, or None to drop it.

    `cluster_id` is ours when we reflect routes (else None): a CLUSTER_LIST
    holding it means the route went round our cluster (RFC 4456 §8).
    """
    if source.ibgp:
        if attrs.originator_id == router_id:
            return None         # our own route, reflected back to us
        if cluster_id is not None and cluster_id in attrs.cluster_list:
            return None
        return attrs
    if local_as in attrs.as_numbers():
        return None             # an eBGP loop (RFC 4271 §9.1.2)
    # LOCAL_PREF is ours to set for external routes; iBGP-only attributes do not cross AS borders.
    return attrs.replace(local_pref=DEFAULT_LOCAL_PREF, originator_id=None, cluster_list=())


# ---- the decision process -------------------------------------------------------------

def _keep(routes, key, prefer=min):
    best = prefer(key(r) for r in routes)
    return [r for r in routes if key(r) == best]


def _router_id(route):
    # RFC 4456 §9: a reflected route competes with the ORIGINATOR_ID in place of the peer's router id.
    return ip_key(route.attrs.originator_id or route.source.router_id)


def _peer_address(route):
    return b"" if route.source.address is None else ip_key(route.source.address)


def select_best(routes):
    """The best of the candidate routes for one prefix (None if there are none).

    Each step keeps the routes that tie on it:
      0. a route we originate (as a configured "weight" would; our own block wins)
      1. highest LOCAL_PREF         2. shortest AS_PATH        3. lowest ORIGIN
      4. lowest MED, compared only between routes from the same neighbour AS (missing MED = 0)
      5. eBGP over iBGP             6. lowest router id, ORIGINATOR_ID for reflected routes
      7. shortest CLUSTER_LIST      8. lowest peer address
    """
    candidates = list(routes)
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    steps = (
        (lambda r: r.source.local, max),
        (lambda r: r.local_pref, max),
        (lambda r: r.attrs.as_path_length, min),
        (lambda r: r.attrs.origin, min),
    )
    for key, prefer in steps:
        candidates = _keep(candidates, key, prefer)
        if len(candidates) == 1:
            return candidates[0]
    candidates = _med_filter(candidates)
    for key, prefer in ((lambda r: not r.source.ibgp, max), (_router_id, min),
                        (lambda r: len(r.attrs.cluster_list), min), (_peer_address, min)):
        if len(candidates) == 1:
            break
        candidates = _keep(candidates, key, prefer)
    return candidates[0]


def _med_filter(routes):
    """Drop every route with a worse MED than another route from the same neighbour AS."""
    lowest = {}
    for r in routes:
        med = r.attrs.med or 0
        group = r.attrs.neighbour_as
        if group not in lowest or med < lowest[group]:
            lowest[group] = med
    return [r for r in routes if (r.attrs.med or 0) == lowest[r.attrs.neighbour_as]]


# ---- Loc-RIB ------------------------------------------------------------------------

class Change:
    """The best route of `prefix` went from `old` to `new` (either may be None)."""
    __slots__ = ("prefix", "old", "new")

    def __init__(self, prefix, old, new):
        self.prefix, self.old, self.new = prefix, old, new

    def __repr__(self):
        return "Change(%s: %r -> %r)" % (self.prefix, self.old, self.new)


class Rib:
    """Adj-RIBs-In (all sources) and the Loc-RIB they select."""

    def __init__(self):
        self._paths = {}        # prefix -> {Source: Route}
        self._best = {}         # prefix -> Route
        self._by_source = {}    # Source -> set of prefixes it announced

    def __len__(self):
        return len(self._best)

    def best(self, prefix):
        return self._best.get(prefix)

    def best_routes(self):
        """{prefix: Route}, the Loc-RIB (a copy)."""
        return dict(self._best)

    def prefixes(self):
        return self._best.keys()

    def candidates(self, prefix):
        return list(self._paths.get(prefix, {}).values())

    def adj_rib_in(self, source):
        """{prefix: Route} that `source` announced (and we kept)."""
        return {p: self._paths[p][source] for p in self._by_source.get(source, ())}

    def sources(self):
        return list(self._by_source)

    def prefix_count(self, source):
        return len(self._by_source.get(source, ()))

    def update(self, route):
        """Add or replace `route` (its source's path to its prefix); a Change or None."""
        paths = self._paths.setdefault(route.prefix, {})
        paths[route.source] = route
        self._by_source.setdefault(route.source, set()).add(route.prefix)
        return self._reselect(route.prefix, paths)

    def remove(self, source, prefix):
        """Forget `source`'s path to `prefix` (if any); a Change or None."""
        paths = self._paths.get(prefix)
        if not paths or source not in paths:
            return None
        del paths[source]
        owned = self._by_source.get(source)
        if owned is not None:
            owned.discard(prefix)
            if not owned:
                del self._by_source[source]
        return self._reselect(prefix, paths)

    def remove_source(self, source):
        """Forget everything `source` announced (its session went down); the Changes."""
        changes = []
        for prefix in list(self._by_source.get(source, ())):
            change = self.remove(source, prefix)
            if change is not None:
                changes.append(change)
        self._by_source.pop(source, None)
        return changes

    def _reselect(self, prefix, paths):
        old = self._best.get(prefix)
        new = select_best(paths.values()) if paths else None
        if new is None:
            self._paths.pop(prefix, None)
            self._best.pop(prefix, None)
        else:
            self._best[prefix] = new
        if old == new:
            return None
        return Change(prefix, old, new)


# ---- Adj-RIB-Out ----------------------------------------------------------------------

class ExportPolicy:
    """What export_attributes needs to know about one established peer."""
    __slots__ = ("source", "ibgp", "rr_client", "remote_as", "local_address", "next_hop_self")

    def __init__(self, source, ibgp, rr_client, remote_as, local_address, next_hop_self=None):
        self.source = source                  # the peer's own Source: its routes are not echoed back
        self.ibgp = ibgp
        self.rr_client = rr_client
        self.remote_as = remote_as
        self.local_address = local_address    # our address on the session: "next hop self"
        self.next_hop_self = next_hop_self    # None: automatic (our own routes, and towards eBGP)

    def cache_key(self):
        """Peers with equal keys get identical attributes for any route but their own."""
        return (self.ibgp, self.rr_client, self.remote_as, self.local_address, self.next_hop_self)


def export_attributes(route, peer, local_as, router_id, cluster_id):
    """The attributes to advertise `route` to `peer` with, or None not to advertise it.

    Towards iBGP peers, iBGP-learned routes follow RFC 4456: from a client
    they go to everyone, from a non-client to clients only, and without
    clients (no reflection) never (split horizon). A reflected route keeps its
    next hop and gains ORIGINATOR_ID (if absent) and our CLUSTER_ID.
    """
    src = route.source
    if src is peer.source:
        return None
    attrs = route.attrs
    if not peer.ibgp:
        if peer.remote_as in attrs.as_numbers():
            return None         # they would drop it as a loop anyway
        keep_med = src.local or (src.ibgp and not attrs.as_path)      # MED set inside our AS
        next_hop = attrs.next_hop if peer.next_hop_self is False and attrs.next_hop else peer.local_address
        return attrs.replace(as_path=attrs.prepend(local_as), next_hop=next_hop, local_pref=None,
                             med=attrs.med if keep_med else None, originator_id=None, cluster_list=())
    if src.local:
        next_hop = peer.local_address if peer.next_hop_self or attrs.next_hop is None else attrs.next_hop
        return attrs.replace(next_hop=next_hop, local_pref=route.local_pref)
    if not src.ibgp:
        next_hop = peer.local_address if peer.next_hop_self else attrs.next_hop
        return attrs.replace(next_hop=next_hop, local_pref=route.local_pref)
    if not (src.rr_client or peer.rr_client):
        return None
    return attrs.replace(originator_id=attrs.originator_id or src.router_id,
                         cluster_list=(cluster_id or router_id,) + attrs.cluster_list,
                         local_pref=route.local_pref)
