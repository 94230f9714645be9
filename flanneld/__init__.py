"""flanneld: the per-node overlay daemon (flannel's etcd layout and flags).

Leases a subnet for this node from etcd, writes subnet.env for the `flannel`
CNI plugin, and programs one backend (vxlan, host-gw, udp) so that every
node's pod subnet is reachable. Each module keeps the pattern: inputs (network
config, leases) -> desired state as plain data -> diff with the kernel -> apply.
"""
