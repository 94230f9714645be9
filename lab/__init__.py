"""The lab, on the top floor: clusters of network namespaces (cluster.py), the main job
(demo.py), the echo workload pods run (echo.py) and builders of Kubernetes manifests
(manifests.py). It imports every floor below; nothing below imports it, and nothing on
the CNI hot path needs it."""
