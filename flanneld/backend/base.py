"""The interface every flanneld backend implements, and what they share.

The daemon drives a backend level-triggered: after any change it hands over
the complete set of remote leases, and the backend makes the kernel match
(desired state as plain data -> diff against what the kernel has -> apply).
A rerun with the same leases changes nothing; a restarted daemon finds its
own earlier state in the kernel and leaves it alone.

Lifecycle, as the daemon calls it:
    backend = BACKENDS[type](network_config, external_interface)
    data, mtu = backend.register()     # create the device; BackendData for our lease, pod MTU
    backend.configure(own_lease)       # device addresses for our subnet
    backend.sync(remote_leases)        # many times: program routes / neighbours / FDB
    backend.close()                    # stop threads; the datapath stays in place

Routes a backend installs carry ROUTE_PROTOCOL, so that the diff recognises
its own routes (and `ip route show proto 77` shows them to an operator).
"""

ROUTE_PROTOCOL = 77      # "podnet flanneld" in route listings


class ExternalInterface:
    """The node's underlay interface: where encapsulated traffic leaves."""

    __slots__ = ("name", "index", "ip", "prefixlen", "mtu")

    def __init__(self, name, index, ip, prefixlen, mtu):
        self.name = name
        self.index = index
        self.ip = ip                # IP: the public IP (flannel's --public-ip)
        self.prefixlen = prefixlen  # of that address: which remotes are on our L2 segment
        self.mtu = mtu

    def __repr__(self):
        return "ExternalInterface(%s %s/%d mtu %d)" % (self.name, self.ip, self.prefixlen, self.mtu)


class Backend:
    type = ""

    def __init__(self, config, ext):
        self.config = config        # flanneld.config.NetworkConfig
        self.ext = ext              # ExternalInterface

    def register(self):
        """Create what the backend needs once; returns (BackendData dict, pod MTU)."""
        raise NotImplementedError

    def configure(self, own_lease):
        """Addresses for this node's subnet on the backend's device (if any)."""
        raise NotImplementedError

    def desired(self, remote_leases):
        """Pure: the kernel state wanted for these leases, as plain data."""
        raise NotImplementedError

    def sync(self, remote_leases):
        """Make the kernel match desired(remote_leases). Idempotent. Leases of
        another backend type, or unusable ones, are logged and skipped."""
        raise NotImplementedError

    def close(self):
        """Stop background work. Never tears down the datapath: pods keep talking
        across a daemon restart."""
