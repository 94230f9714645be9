"""podnet trace and podnet doctor: where a packet goes, why it stops, and what has drifted on a node.

On the top floor beside the lab: it reads every agent's desired state and the kernel's, so it may
import the agents; nothing imports it but the command."""
