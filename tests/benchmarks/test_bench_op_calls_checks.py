"""bench_op_calls checks every provider's output against lowrank's 4-bit layer's before timing
(_common, Note: check before timing): a bitsandbytes layer reading its codes in another layout
stops the run with what differed and by how much, instead of being timed."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_op_calls  # noqa: E402


def test_a_wrong_bitsandbytes_layer_stops_the_run(tmp_path, monkeypatch):
    real = bench_op_calls.providers

    def providers(lora, device, dropout=0.0):
        out = real(lora, device, dropout)
        layer = out["bitsandbytes Linear4bit"][0]
        layer.weight.data = layer.weight.data.flip(0)  # the codes in another order
        return out

    monkeypatch.setattr(bench_op_calls, "providers", providers)
    monkeypatch.setattr(bench_op_calls, "measure", lambda *a: pytest.fail("timed before the check"))
    with pytest.raises(_common.WrongResult, match=r"bitsandbytes Linear4bit's output against lowrank Linear4bit's "
                                                  r"differs from its reference: relative error [0-9.]+ \(allowed 0\.0625\)"):
        bench_op_calls.main(["--quick", "--out", str(tmp_path / "o.json")])


def test_bitsandbytes_in_eval_mode_passes():
    """bitsandbytes' own CPU inference layout (eval mode converts the weight) computes the same product."""
    models = bench_op_calls.providers(False, torch.device("cpu"))
    models["bitsandbytes Linear4bit"].eval()
    bench_op_calls.check_outputs(models, torch.randn(1, 1, bench_op_calls.FEATURES).to(torch.bfloat16))
