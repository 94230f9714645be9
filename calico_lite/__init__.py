"""calico_lite: pure-L3 pod networking with BGP (speaker, route reflector, node agent), IPIP and BIRD configs."""
