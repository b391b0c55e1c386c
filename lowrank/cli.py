"""The `lowrank` command line: `lowrank <command> ...` or `python -m lowrank <command> ...`.

Each command is a module of lowrank.commands with `add_parser(subparsers)` (declares its
arguments) and `run(args) -> int` (does the work); this file only lists them. Errors a user
can fix (a bad config, data file, path or option) print as one line and exit 2
(LOWRANK_TRACEBACK=1: raised, with the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = ("train", "merge", "chat", "web")  # modules of lowrank.commands, in the order `lowrank --help` lists them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank", description="Parameter-efficient fine-tuning with lowrank.")
    parser.add_argument("--version", action="version", version=_versions())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {name: importlib.import_module(f"lowrank.commands.{name}") for name in COMMANDS}
    for module in modules.values():
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return modules[args.command].run(args) or 0
    except (ValueError, TypeError, OSError, NotImplementedError, FloatingPointError) as e:  # OSError: paths, files
        # the workflow's ConfigError / DataError / TemplateError are ValueErrors
        if os.environ.get("LOWRANK_TRACEBACK", "") not in ("", "0"):  # for a bug report: the whole story
            raise
        print(f"lowrank {args.command}: error: {e}", file=sys.stderr)  # one clear line, no traceback
        return 2


def _versions() -> str:
    """lowrank's version and those of what it runs on, for a bug report."""
    import platform

    import torch

    from . import __version__

    return f"lowrank {__version__} (Python {platform.python_version()}, torch {torch.__version__})"


if __name__ == "__main__":
    sys.exit(main())
