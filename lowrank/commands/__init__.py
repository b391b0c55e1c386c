"""Subcommands of the `lowrank` command line, one module each (see lowrank/cli.py)."""
