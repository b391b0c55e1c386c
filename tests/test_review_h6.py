"""Regression tests from review h6 of the day's changes (web's signals, ...)."""

from __future__ import annotations

import signal
import sys

import pytest

from lowrank.commands import web


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
