"""Start `lowrank web` in a session of its own and wait until its Streamlit server answers
(tests/workflow/test_web.py and test_web_process.py)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from .conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _hangup_default() -> None:
    """SIGHUP as a terminal session has it, even when the tests run under nohup (lowrank web keeps an ignored
    SIGHUP ignored, so test_web_process's SIGHUP would not reach the server)."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """(`python -m lowrank web ARGS --port P` running, its URL) once /_stcore/health says ok; the
    process leads a new session, so the caller can end it and its server with os.killpg."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowrank", "web", *map(str, args), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_hangup_default)
    url, deadline = f"http://localhost:{port}", time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"lowrank web did not come up:\n{proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.5)
