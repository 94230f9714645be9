"""CNI errors: the spec's well-known codes and the error JSON a plugin prints."""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Codes from the CNI spec ("Error codes"); 100 and up belong to plugins.
INCOMPATIBLE_VERSION = 1       # incompatible CNI version
UNSUPPORTED_FIELD = 2          # unsupported field in network configuration
UNKNOWN_CONTAINER = 3          # container unknown or does not exist
INVALID_ENV = 4                # invalid necessary environment variables
IO_FAILURE = 5                 # I/O failure
DECODING_FAILURE = 6           # failed to decode content
INVALID_NETCONF = 7            # invalid network config
TRY_AGAIN_LATER = 11           # try again later
LIMITED_CONNECTIVITY = 50      # STATUS: plugin cannot serve new ADDs
NO_CONNECTIVITY = 51           # STATUS: existing containers may be damaged
INTERNAL = 999                 # what the reference plugins use for unclassified errors

# podnet's own codes (100+).
NO_ADDRESSES = 100             # IPAM: no free address in the range set(s)
KERNEL = 101                   # a netlink / netfilter operation failed
PLUGIN_NOT_FOUND = 102         # delegate or IPAM plugin not in CNI_PATH
HOST_PORT_IN_USE = 103         # portmap: another container already maps that host port
NOT_AS_ADDED = 104             # CHECK: the container's networking is not what ADD left (docs/decisions.md)


class CNIError(Exception):
    """An error a plugin reports to its caller as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str | None = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details or ""

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        if self.details:
            return "%s; %s" % (self.msg, self.details)
        return self.msg

    def __repr__(self) -> str:
        return "CNIError(%d, %r, %r)" % (self.code, self.msg, self.details)
