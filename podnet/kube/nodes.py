"""Node objects: reading one, patching its status, and what a Node says about pod networking.

The read side of Nodes in bulk is the list + watch of podnet.kube.api (kind "Node");
this module is the rest a node agent needs, on the `kubernetes` client (imported
lazily):

    client = NodeClient(make_client(api_url, kubeconfig))
    node = client.get_node("node1")                  # the Node as a plain dict, None if absent
    pod = client.get_pod("kube-flannel", "kube-flannel-ds-x2b9c")
    client.patch_node_status("node1", {"metadata": {"annotations": {...}}})

`patch_node_status` is a strategic-merge PATCH of `nodes/NAME/status` (Content-Type
`application/strategic-merge-patch+json`): the one write that a DaemonSet such as
kube-flannel is granted (its ClusterRole allows pods get, nodes get/list/watch and
nodes/status patch, nothing more). The client must be told the content type: left to
itself, kubernetes 37's generated `patch_node_status` picks the first JSON type of the
API's list, `application/json-patch+json` (a list of operations), and only its REST
layer's special case turns a dict body back into a strategic merge. Passing it
explicitly does not depend on that.

Responses are read raw (`_preload_content=False`) and parsed as plain JSON, as the
sources do: consumers work on the API's JSON shapes, not the generated classes.

`pod_cidrs` reads spec.podCIDRs / spec.podCIDR as the API defines them: podCIDRs, when
set, holds at most one CIDR per family with podCIDR as its first entry; older objects
carry only podCIDR.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from podnet.kube.objects import InvalidObject, short
from podnet.net.ip import IPNet, parse_cidr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

log = logging.getLogger("podnet.kube.nodes")

STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"
DEFAULT_TIMEOUT = (10.0, 30.0)          # (connect, read) seconds of every call


class NodeNameError(RuntimeError):
    """Nothing tells this agent which Node it runs on (a configuration error: waiting will not help)."""


def make_client(api_url: str | None = None, kubeconfig: str | None = None) -> Any:
    """A kubernetes.client.ApiClient as client-go's BuildConfigFromFlags builds one: from
    the kubeconfig when one is given (api_url, if also given, overrides its server); from
    api_url alone (no credentials: an insecure local endpoint or a proxy); else the
    in-cluster service account when running in a Pod, else the default kubeconfig."""
    from kubernetes import client, config
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    elif api_url:
        pass
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration)
    if api_url:
        configuration.host = api_url.rstrip("/")
    return client.ApiClient(configuration)


class NodeClient:
    """The few Node and Pod calls of a node agent, every one bounded by `timeout`."""

    def __init__(self, api_client: Any, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        self.api_client = api_client
        self.timeout = timeout

    def _core(self) -> Any:
        from kubernetes.client import CoreV1Api
        return CoreV1Api(self.api_client)

    def _json(self, call: Callable[..., Any], *args: Any, **kw: Any) -> dict[str, Any] | None:
        """call(...)'s response body as a dict; None on 404."""
        from kubernetes.client.rest import ApiException
        try:
            resp = call(*args, _preload_content=False, _request_timeout=self.timeout, **kw)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        try:
            data = json.loads(resp.data)
        finally:
            resp.release_conn()
        if not isinstance(data, dict):
            raise ValueError("the API answered %s, not an object" % short(data))
        return data

    def get_node(self, name: str) -> dict[str, Any] | None:
        """GET nodes/NAME; None if there is no such Node."""
        return self._json(self._core().read_node, name)

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """GET namespaces/NAMESPACE/pods/NAME; None if there is no such Pod."""
        return self._json(self._core().read_namespaced_pod, name, namespace)

    def patch_node_status(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Strategic-merge PATCH of nodes/NAME/status; the Node as the API returns it."""
        node = self._json(self._core().patch_node_status, name, dict(patch), _content_type=STRATEGIC_MERGE_PATCH)
        if node is None:
            raise LookupError("node %s does not exist" % name)
        return node


def node_name_from_env(environ: Mapping[str, str], get_pod: Callable[[str, str], dict[str, Any] | None]) -> str:
    """The Node this agent runs on, as flannel finds it: $NODE_NAME, else the spec.nodeName
    of its own Pod ($POD_NAMESPACE/$POD_NAME, set through the downward API).
    NodeNameError when neither variable is set; LookupError when the Pod does not exist or
    is not scheduled, and the API's own errors pass through (both may be retried)."""
    name = environ.get("NODE_NAME", "")
    if name:
        return name
    pod_name, namespace = environ.get("POD_NAME", ""), environ.get("POD_NAMESPACE", "")
    if not pod_name or not namespace:
        raise NodeNameError("set NODE_NAME, or POD_NAME and POD_NAMESPACE (the downward API's "
                            "spec.nodeName, metadata.name and metadata.namespace)")
    pod = get_pod(namespace, pod_name)
    if pod is None:
        raise LookupError("pod %s/%s does not exist" % (namespace, pod_name))
    spec = pod.get("spec")
    node = spec.get("nodeName") if isinstance(spec, dict) else None
    if not isinstance(node, str) or not node:
        raise LookupError("pod %s/%s has no spec.nodeName (not scheduled yet?)" % (namespace, pod_name))
    return node


def node_annotations(node: Mapping[str, Any]) -> dict[str, str]:
    """metadata.annotations; values that are not strings are left out (the API allows none)."""
    meta = node.get("metadata")
    raw = meta.get("annotations") if isinstance(meta, dict) else None
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def pod_cidrs(node: Mapping[str, Any]) -> list[IPNet]:
    """spec.podCIDRs, or [spec.podCIDR] when only that is set; [] when neither is (the node
    controller has not allocated one yet). InvalidObject for a CIDR that does not parse or
    for more than two (one per family)."""
    spec = node.get("spec")
    if not isinstance(spec, dict):
        return []
    many = spec.get("podCIDRs")
    if many:
        if not isinstance(many, list):
            raise InvalidObject("spec.podCIDRs: %s is not a list" % short(many))
        if len(many) > 2:
            raise InvalidObject("spec.podCIDRs: %d CIDRs, at most one IPv4 and one IPv6" % len(many))
        texts, where = list(many), "spec.podCIDRs"
    else:
        one = spec.get("podCIDR")
        if not one:
            return []
        texts, where = [one], "spec.podCIDR"
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(parse_cidr(text).masked())
        except ValueError:
            raise InvalidObject("%s%s: %s is not a CIDR" % (where, "[%d]" % i if where.endswith("s") else "",
                                                          short(text))) from None
    return out


def node_condition(conditions: object, kind: str) -> dict[str, Any] | None:
    """The status.conditions entry of type `kind`, if any."""
    if isinstance(conditions, list):
        for c in conditions:
            if isinstance(c, dict) and c.get("type") == kind:
                return c
    return None
