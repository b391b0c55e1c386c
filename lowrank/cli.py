"""The `lowrank` command line: `lowrank <command> ...` or `python -m lowrank <command> ...`.

Each command is a module with `add_parser(subparsers)` (declares its arguments) and
`run(args) -> int` (does the work); this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("lowrank.commands.merge",)  # one module per command, in the order `lowrank --help` lists them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank", description="Parameter-efficient fine-tuning with lowrank.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(subparsers)  # each sets its `run` as the default `func`
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        print(f"lowrank {args.command}: error: {e}", file=sys.stderr)  # one clear line, no traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
