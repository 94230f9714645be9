"""The top floor's front door: the `podnet` command (main.py), one subcommand per job.

It imports the agents and the lab lazily, per subcommand, so that `podnet cni ...`
does not pay for a daemon's imports."""
