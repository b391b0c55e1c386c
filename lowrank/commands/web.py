"""lowrank web MODEL [--adapter DIR] [--port P]: a Streamlit chat page on localhost."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

from .adapter_checks import refuse_before_loading
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
    refuse_before_loading(args.adapter, args.model, allow_pickle=args.allow_pickle,
                          allow_other_base=args.allow_other_base)
    page = pathlib.Path(__file__).resolve().parent.parent / "workflow" / "web_app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(page), "--server.headless", "true",
           "--server.address", "localhost", "--server.port", str(args.port), "--browser.gatherUsageStats", "false",
           "--", args.model, "--dtype", args.dtype, "--device", args.device, "--title", args.title]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    cmd += ["--allow-other-base"] * args.allow_other_base + ["--trust-remote-code"] * args.trust_remote_code
    cmd += ["--allow-pickle"] * args.allow_pickle
    print(f"serving on http://localhost:{args.port} (Ctrl-C stops)", flush=True)
    return _serve(cmd)


def _serve(cmd: list[str]) -> int:
    """Run the server `cmd` until it ends; SIGTERM, SIGINT and SIGHUP sent to this process (`kill
    PID`, docker stop, a supervisor, a closed ssh session) are passed on to it and we wait for it
    to stop. Otherwise it outlived us, orphaned and holding the port. Ctrl-C reaches both (one
    process group): the server then gets SIGINT twice, and Streamlit's handler stops it either
    way. The handlers go in before the server starts: a signal in between is passed on once it has.
    A SIGHUP this process ignores (nohup) is not passed on: the server ignores it too."""
    child, pending = None, []

    def forward(signum, frame):
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    # a SIGHUP ignored (nohup) stays ignored, by the server too (it inherits that): forwarded, it stopped the server
    # that nohup was to keep running once the ssh session closed
    hup = getattr(signal, "SIGHUP", None)
    passed = [s for s in (signal.SIGTERM, signal.SIGINT, hup)
              if s is not None and not (s == hup and signal.getsignal(s) == signal.SIG_IGN)]
    previous = {s: signal.signal(s, forward) for s in passed}
    try:
        child = subprocess.Popen(cmd)
        for signum in pending:
            child.send_signal(signum)
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code  # ended by a signal: the shell's 128 + its number
