"""What the sources of Kubernetes objects emit: the Kubernetes API (api.py) and a
directory of manifests (manifests.py) both emit the same `Event`s, and both are a
`Source` to their consumer, which keeps what they emit in an `ObjectCache` (cache.py).

Event types: "ADDED", "MODIFIED", "DELETED" carry one object; "RELIST"
carries every object of that kind (a complete list: anything not in it is
gone), sent after the first list and after every re-list (410 Gone, a lost
watch). Objects are the plain dicts of the Kubernetes JSON shapes.

A consumer names the kinds it wants. kube-proxy wants `KINDS` (Services and
EndpointSlices, the default); the Ingress controller wants `INGRESS_KINDS`
(those plus Ingresses, IngressClasses and TLS Secrets); NetworkPolicies, Pods,
Namespaces and Nodes are there for the agents that need them. `RESOURCES` says
where each kind lives in the API.

Secrets are the one kind filtered and trimmed at the source (`keep`): only
type kubernetes.io/tls is asked for (a field selector in the API, a check in
the manifests), and only what serving a certificate needs is kept — name,
namespace, resourceVersion, uid, creationTimestamp, type and data's
tls.crt / tls.key. Annotations (kubectl's last-applied-configuration holds
the whole Secret in clear), labels, managedFields, ca.crt and any other data
are dropped, so no more secret material than needed stays in memory or
reaches a log.
"""
from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    import queue
    from collections.abc import Iterable

KINDS = ("Service", "EndpointSlice")        # the default: what kube-proxy asks for
INGRESS_KINDS = ("Service", "EndpointSlice", "Ingress", "IngressClass", "Secret")
ADDED, MODIFIED, DELETED, RELIST = "ADDED", "MODIFIED", "DELETED", "RELIST"
TLS_SECRET_TYPE = "kubernetes.io/tls"
TLS_KEYS = ("tls.crt", "tls.key")


class Resource(NamedTuple):
    api_class: str          # kubernetes.client class
    list_func: str          # its list (+ watch) method
    api_version: str        # apiVersion of the objects
    list_kind: str          # kind of the list response
    namespaced: bool
    field_selector: str = ""    # always asked for (combined with a caller's by a comma)

    @property
    def namespaced_list_func(self) -> str:
        """The list method of one namespace: list_X_for_all_namespaces -> list_namespaced_X."""
        if not self.namespaced:
            raise ValueError("%s is not namespaced" % self.list_kind[:-len("List")])
        return "list_namespaced_" + self.list_func.removeprefix("list_").removesuffix("_for_all_namespaces")


RESOURCES = {
    "Service": Resource("CoreV1Api", "list_service_for_all_namespaces", "v1", "ServiceList", True),
    "EndpointSlice": Resource("DiscoveryV1Api", "list_endpoint_slice_for_all_namespaces",
                              "discovery.k8s.io/v1", "EndpointSliceList", True),
    "Ingress": Resource("NetworkingV1Api", "list_ingress_for_all_namespaces", "networking.k8s.io/v1",
                        "IngressList", True),
    "IngressClass": Resource("NetworkingV1Api", "list_ingress_class", "networking.k8s.io/v1",
                             "IngressClassList", False),
    "Secret": Resource("CoreV1Api", "list_secret_for_all_namespaces", "v1", "SecretList", True,
                       "type=" + TLS_SECRET_TYPE),
    # for the NetworkPolicy agent and flanneld's Kubernetes subnet manager
    "NetworkPolicy": Resource("NetworkingV1Api", "list_network_policy_for_all_namespaces",
                              "networking.k8s.io/v1", "NetworkPolicyList", True),
    "Pod": Resource("CoreV1Api", "list_pod_for_all_namespaces", "v1", "PodList", True),
    "Namespace": Resource("CoreV1Api", "list_namespace", "v1", "NamespaceList", False),
    "Node": Resource("CoreV1Api", "list_node", "v1", "NodeList", False),
}


class Event(NamedTuple):
    type: str           # ADDED | MODIFIED | DELETED | RELIST
    kind: str           # Service | EndpointSlice | Ingress | IngressClass | Secret
    obj: Any            # the object (a dict); for RELIST, the list of all objects of `kind`


Emit = Callable[[Event], None]      # where a source hands its events (a queue's put, a list's append)


class Source(Protocol):
    """What every source (api.py, manifests.py) is to its consumer: started once, it emits
    Events from its own thread(s) until stopped."""
    kinds: tuple[str, ...]

    def start(self) -> object: ...

    def stop(self, timeout: float = 5) -> None: ...


def check_kinds(kinds: Iterable[str] | None) -> tuple[str, ...]:
    """The kinds a consumer asked for, as a tuple (default KINDS); unknown ones are an error."""
    kinds = tuple(kinds) if kinds else KINDS
    unknown = [k for k in kinds if k not in RESOURCES]
    if unknown:
        raise ValueError("unknown kind(s) %s; known: %s" % (", ".join(unknown), ", ".join(RESOURCES)))
    return kinds


def keep(kind: str, obj: Any) -> Any:
    """The object as a consumer gets it, or None when the source drops it (a Secret not of
    type kubernetes.io/tls). Objects of other kinds pass unchanged."""
    if kind != "Secret":
        return obj
    if not isinstance(obj, dict) or obj.get("type") != TLS_SECRET_TYPE:
        return None
    return trim_secret(obj)


def trim_secret(obj: dict[str, Any]) -> dict[str, Any]:
    """Only what serving a certificate needs (see the module's docstring). A manifest's
    stringData is folded into data as the API server does (base64)."""
    meta: dict[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    out_meta = {k: meta[k] for k in ("name", "namespace", "resourceVersion", "uid", "creationTimestamp")
                if k in meta}
    data: dict[str, str] = {}
    src = obj.get("data")
    if isinstance(src, dict):
        data.update((k, src[k]) for k in TLS_KEYS if k in src)
    strings = obj.get("stringData")
    if isinstance(strings, dict):
        for k in TLS_KEYS:
            if isinstance(strings.get(k), str):
                data[k] = base64.b64encode(strings[k].encode()).decode()
    out = {"apiVersion": obj.get("apiVersion", "v1"), "kind": "Secret", "metadata": out_meta,
           "type": TLS_SECRET_TYPE, "data": data}
    return out


def drain(events: queue.Queue[Event], timeout: float, handle: Callable[[Event], object]) -> None:
    """Wait up to `timeout` s for one event on queue `events`, then hand it and every
    event already queued behind it to handle(event): what sources emitted from their
    threads reaches the single-threaded consumer in order, a burst at a time."""
    import queue
    try:
        event = events.get(timeout=max(0.0, timeout))
    except queue.Empty:
        return
    while True:
        handle(event)
        try:
            event = events.get_nowait()
        except queue.Empty:
            return
