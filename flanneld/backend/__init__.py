"""flanneld backends: one module each, behind flanneld.backend.base.Backend."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flanneld.backend.base import Backend


def backend_class(backend_type: str) -> type[Backend]:
    """The Backend class for a config's Backend.Type (imported on demand)."""
    cls: type[Backend]
    if backend_type == "vxlan":
        from flanneld.backend.vxlan import VXLANBackend as cls
    elif backend_type == "host-gw":
        from flanneld.backend.host_gw import HostGWBackend as cls
    elif backend_type == "udp":
        from flanneld.backend.udp import UDPBackend as cls
    else:
        raise ValueError("unknown backend type %r" % backend_type)
    return cls
