"""podnet: container networking for Kubernetes.

Kept empty on purpose: CNI plugins import podnet.net.* on the pod start-up
path, and every import here would be paid by every pod.
"""
__version__ = "0.1.0"
