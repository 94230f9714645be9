"""Where Services and EndpointSlices come from: the Kubernetes API (kubeapi.py)
or a directory of manifests (manifests.py). Both emit the same `Event`s.

Event types: "ADDED", "MODIFIED", "DELETED" carry one object; "RELIST"
carries every object of that kind (a complete list: anything not in it is
gone), sent after the first list and after every re-list (410 Gone, a lost
watch). Objects are the plain dicts of the Kubernetes JSON shapes.
"""
from typing import NamedTuple

KINDS = ("Service", "EndpointSlice")
ADDED, MODIFIED, DELETED, RELIST = "ADDED", "MODIFIED", "DELETED", "RELIST"


class Event(NamedTuple):
    type: str           # ADDED | MODIFIED | DELETED | RELIST
    kind: str           # Service | EndpointSlice
    obj: object         # the object; for RELIST, the list of all objects of `kind`
