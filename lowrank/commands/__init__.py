"""One module per `lowrank` subcommand, each with add_parser(subparsers) and run(args) (see lowrank/cli.py)."""
