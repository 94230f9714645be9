"""The one Kubernetes object layer, on the ground floor.

- events.py: what a source emits (Event, the kinds and where they live in the API);
- api.py / manifests.py: the two sources, list+watch of the API and a watched directory;
- cache.py: the informer-style store every consumer keeps its objects in;
- objects.py: checking fields, names, labels, label selectors, ports and IPs;
- endpointslices.py: EndpointSlices as plain data, shared by every consumer of endpoints.

Kept empty: importing the package costs nothing; the `kubernetes` client is imported
only by api.py, when a source starts."""
