"""lowrank train CONFIG [--resume] [--print-config] [--set FIELD=VALUE ...]"""

from __future__ import annotations

import os
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a causal LM on conversations (YAML or Python config)",
                              description="Fine-tune a causal LM on conversations with LoRA, QLoRA, DoRA or adapters.")
    p.add_argument("config", nargs="?", help="training config: .yaml/.yml or .py (see --print-config)")
    p.add_argument("--resume", action="store_true", help="continue from the last epoch_<n> checkpoint in output_dir")
    p.add_argument("--print-config", action="store_true",
                   help="print the config (every field, defaults filled in) and exit; without CONFIG, the defaults")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field; VALUE is read as YAML (e.g. --set epochs=1 --set lr=1e-4)")


def _overrides(pairs: list[str]) -> dict:
    from ..workflow.config import ConfigError, require

    yaml = require("yaml", "pyyaml")
    out = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not field:
            raise ConfigError(f"--set {pair!r}: expected FIELD=VALUE")
        try:
            out[field] = yaml.safe_load(value)
        except yaml.YAMLError as e:  # not a ValueError: the command line would print a traceback
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML: {' '.join(str(e).split())} "
                              "(quote it to give a string: --set 'FIELD=\"...\"')") from None
    return out


def run(args) -> int:
    from ..workflow import config as cfg
    from ..workflow.train import train

    if args.config is None:
        if not args.print_config:
            raise cfg.ConfigError("give a CONFIG file (lowrank train --print-config shows every field)")
        sys.stdout.write(cfg.to_yaml())
        return 0
    config = cfg.load(args.config, _overrides(args.set))
    if args.print_config:
        sys.stdout.write(cfg.to_yaml(config))
        return 0
    summary = train(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun (distributed: ddp / fsdp) rank 0 reports
        print(f"done:\n{summary.lines()}")
    return 0
