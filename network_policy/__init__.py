"""The NetworkPolicy agent: networking.k8s.io/v1 NetworkPolicy enforced with nftables on every node."""
