"""flanneld backends: one module each, behind flanneld.backend.base.Backend."""


def backend_class(backend_type):
    """The Backend class for a config's Backend.Type (imported on demand)."""
    if backend_type == "vxlan":
        from flanneld.backend.vxlan import VXLANBackend as cls
    elif backend_type == "host-gw":
        from flanneld.backend.host_gw import HostGWBackend as cls
    elif backend_type == "udp":
        from flanneld.backend.udp import UDPBackend as cls
    else:
        raise ValueError("unknown backend type %r" % backend_type)
    return cls
