"""bench_optim checks each optimizer's first two updates against torch.optim.AdamW's before timing it
(_common, Note: check before timing): a provider that updates otherwise (here: another learning
rate) stops the run with what differed and by how much."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_optim  # noqa: E402


def test_another_update_stops_the_run(tmp_path, monkeypatch):
    real = bench_optim.providers
    monkeypatch.setattr(bench_optim, "providers", lambda: {**real(), "wrong": lambda ps: torch.optim.AdamW(ps, lr=2e-4)})
    monkeypatch.setattr(_common, "bench", lambda *a, **k: (1.0, 1.0, 1.0))  # the check, not the timing
    with pytest.raises(_common.WrongResult, match=r"wrong's first two updates against torch AdamW's differs from its "
                                                  r"reference: relative error 1 \(allowed 0\.1\)"):
        bench_optim.main(["--quick", "--out", str(tmp_path / "o.json")])


def test_the_8bit_providers_pass():
    for name, make in bench_optim.providers().items():
        bench_optim.check_update(name, make, 1, torch.device("cpu"))
