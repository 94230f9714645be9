"""kube_proxy: a kube-proxy replacement (iptables, nftables and IPVS modes).

Layout (docs/architecture.md): the ground floor's podnet.kube sources turn the
Kubernetes API or a manifests directory into events; model.py turns Service and EndpointSlice objects into
plain immutable data; tracker.py accumulates changes and hands one sync the
whole desired state plus what changed; one proxier per mode renders and applies.
"""
