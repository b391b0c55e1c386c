"""lowrank web MODEL [--adapter DIR] [--port P]: a Streamlit chat page on localhost."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from .chat import add_generation_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("web", help="serve a Streamlit chat page on localhost")
    add_generation_options(p)
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--title", default="lowrank chat")


def run(args) -> int:
    from ..workflow.config import ConfigError, require

    require("streamlit", "streamlit")
    if args.adapter is not None and not os.path.isdir(args.adapter):
        raise ConfigError(f"--adapter {args.adapter!r} is not a directory")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ConfigError(f"model: {args.model!r} has no config.json; expected a transformers model directory")
    page = pathlib.Path(__file__).resolve().parent.parent / "workflow" / "web_app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(page), "--server.headless", "true",
           "--server.address", "localhost", "--server.port", str(args.port), "--browser.gatherUsageStats", "false",
           "--", args.model, "--dtype", args.dtype, "--device", args.device, "--title", args.title]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    cmd += ["--allow-other-base"] * args.allow_other_base + ["--trust-remote-code"] * args.trust_remote_code
    print(f"serving on http://localhost:{args.port} (Ctrl-C stops)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
