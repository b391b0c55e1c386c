"""The `lowrank` command: argparse subcommands, one module each in lowrank.commands
(add_parser(subparsers) and run(args)). Errors a user can fix print as one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("train", "chat", "web")  # modules of lowrank.commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank", description="Parameter-efficient fine-tuning with lowrank.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {name: importlib.import_module(f"lowrank.commands.{name}") for name in COMMANDS}
    for module in modules.values():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    from .workflow.config import ConfigError
    from .workflow.data import DataError
    from .workflow.template import TemplateError

    try:
        return modules[args.command].run(args)
    except (ConfigError, DataError, TemplateError) as e:
        print(f"lowrank {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
