"""benchmarks/bench_decode.py: a run times the three models after checking that both 4-bit
ones compute the dequantized model's logits, and stops rather than time a model that computes
something else (a baseline in another layout, See Note: checked baselines in bench_nf4_cpu.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_decode  # noqa: E402


def test_the_three_models_are_checked_then_timed(tmp_path):
    out = tmp_path / "decode.json"
    rows = {r["provider"]: r for r in bench_decode.main(["--quick", "--out", str(out)])}
    assert json.loads(out.read_text())["rows"] == list(rows.values())
    assert set(rows) == {"bf16", "lowrank", "bitsandbytes"}
    assert rows["bf16"]["vs_bf16"] == 1 and rows["bitsandbytes"]["vs_bnb"] == 1
    # the 4-bit models compute the dequantized model (up to bf16 rounding); the bf16 one differs
    # from it by quantizing at all, far more
    assert rows["lowrank"]["logits_err"] < 2**-6 and rows["bitsandbytes"]["logits_err"] < 2**-4
    assert rows["bf16"]["logits_err"] > 4 * max(rows["lowrank"]["logits_err"], rows["bitsandbytes"]["logits_err"])
    assert rows["lowrank"]["weights_mb"] < rows["bf16"]["weights_mb"] / 2


def test_a_model_computing_something_else_is_not_timed(tmp_path, monkeypatch):
    real = bench_decode.to_bitsandbytes

    def another(model, device):  # the codes of other weights
        with torch.no_grad():
            for p in model.model.layers.parameters():
                p.mul_(-1)
        return real(model, device)

    monkeypatch.setattr(bench_decode, "to_bitsandbytes", another)
    with pytest.raises(SystemExit, match="bitsandbytes's logits differ from the dequantized model's"):
        bench_decode.main(["--quick", "--out", str(tmp_path / "decode.json")])
