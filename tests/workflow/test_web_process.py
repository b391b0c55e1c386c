"""`lowrank web` and the Streamlit server it starts end together: SIGTERM to lowrank alone (kill
PID, docker stop, a supervisor) stops the server too, rather than leaving it holding the port.
Needs Streamlit only (no browser); skips without it."""

import contextlib
import importlib.util
import os
import pathlib
import signal
import sys
import time

import pytest

from lowrank.commands import web

from . import web_server

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("streamlit") is None,
                                 reason="streamlit is not installed (pip install streamlit)"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")]


def _children(pid: int) -> list[int]:
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended while we looked
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_lowrank_web_stops_its_server(model_dir, sig):
    proc, _ = web_server.start(model_dir)
    try:
        server = _children(proc.pid)
        assert len(server) == 1, server
        proc.send_signal(sig)  # to lowrank alone, not its process group
        code = proc.wait(timeout=60)
        assert code in ((0, 128 + sig) if sig == signal.SIGHUP else (0,)), code  # Streamlit handles TERM and INT
        deadline = time.monotonic() + 10  # the server was waited for: gone by now, not orphaned
        while _alive(server[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server[0]), f"the Streamlit server {server[0]} outlived lowrank web"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the session, should the test fail
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP (Windows)")
def test_web_under_nohup_does_not_pass_a_sighup_on_to_the_server():
    # nohup: SIGHUP ignored. The server inherits that and must keep running when the session closes;
    # passing the SIGHUP on killed it (exit 129)
    hangs_up = "import os, signal, time; os.kill(os.getppid(), signal.SIGHUP); time.sleep(0.5)"
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert web._serve([sys.executable, "-c", hangs_up]) == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # left as it was
    finally:
        signal.signal(signal.SIGHUP, before)
