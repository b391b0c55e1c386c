"""`lowrank web` and the Streamlit server it starts end together: SIGTERM to lowrank alone (kill
PID, docker stop, a supervisor) stops the server too, rather than leaving it holding the port.
Needs Streamlit only (no browser); skips without it."""

import contextlib
import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("streamlit") is None,
                                 reason="streamlit is not installed (pip install streamlit)"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_lowrank_web_stops_its_server(model_dir, sig):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowrank", "web", str(model_dir), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"lowrank web did not come up:\n{proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.5)
        server = _children(proc.pid)
        assert len(server) == 1, server
        proc.send_signal(sig)  # to lowrank alone, not its process group
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10  # the server was waited for: gone by now, not orphaned
        while _alive(server[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server[0]), f"the Streamlit server {server[0]} outlived lowrank web"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the session, should the test fail
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
