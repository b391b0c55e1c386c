"""bench_qlora_moe checks its pairs of providers that hold the same model before timing them (_common,
Note: a model's output and its adapters' gradients): the routed 4-bit experts against the dense
path of the same model, lowrank's dense experts against PEFT + bitsandbytes. A pair that differs
stops the run with what differed and by how much."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_qlora_moe  # noqa: E402


def test_another_peft_experts_adapter_stops_the_run(tmp_path, monkeypatch):
    real = bench_qlora_moe.same_adapters

    @torch.no_grad()
    def same_adapters(models):
        real(models)
        for name, p in models["peft+bitsandbytes"].named_parameters():
            if "experts.lora_B" in name:  # PEFT's down_proj update doubled
                p.mul_(2)

    monkeypatch.setattr(bench_qlora_moe, "same_adapters", same_adapters)
    with pytest.raises(_common.WrongResult, match=r"lowrank-dense-experts's (logits|adapter gradients) against "
                                                  r"peft\+bitsandbytes's differs .*relative error"):
        bench_qlora_moe.main(["--quick", "--out", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


def test_routed_and_dense_path_are_compared(tmp_path, monkeypatch):
    """The second 4-bit model (timed on the dense path) built otherwise: caught before any timing."""
    real, built = bench_qlora_moe.ours, []

    def ours(base, dtype, four_bit_experts):
        model = real(base, dtype, four_bit_experts)
        built.append(model)
        if len(built) == 2:
            with torch.no_grad():
                model.model.norm.weight.mul_(-1)
        return model

    monkeypatch.setattr(bench_qlora_moe, "ours", ours)
    monkeypatch.setattr(_common, "bench", lambda *a, **k: pytest.fail("timed before the check"))
    with pytest.raises(_common.WrongResult, match="lowrank-4bit-experts's logits against lowrank-4bit-dense-path's"):
        bench_qlora_moe.main(["--quick", "--out", str(tmp_path / "m.json")])

