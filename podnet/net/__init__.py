"""The one layer that talks to the kernel: netlink, TUN, netns, iptables/nft, sysctl.

Each module imports only what it uses; nothing is imported here.
"""
