"""IP address management plugins (host-local) and their allocator."""
