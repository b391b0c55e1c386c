"""bench_load measures each provider in a child process with its output captured: when one fails,
the error says why (the child's traceback), not only "returned non-zero exit status 1"."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_load  # noqa: E402


def test_a_failing_child_reports_its_own_error(tmp_path):
    missing = tmp_path / "no_checkpoint_here"
    with pytest.raises(RuntimeError, match="'from_pretrained\\+quantize' process failed") as info:
        bench_load.measure(str(missing), "from_pretrained+quantize")
    assert "Traceback" in str(info.value) and "no_checkpoint_here" in str(info.value)
