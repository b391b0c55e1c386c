"""bench_experts4bit checks that its routed and gathered paths compute what the dense path does
before timing them (_common, Note: check before timing): forward, and with LoRA the output, x's
gradient and the adapters' gradients. A path that differs stops the run, saying which and by how much."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_experts4bit  # noqa: E402
from lowrank.quant import experts4bit  # noqa: E402


@pytest.fixture(autouse=True)
def no_path_set(monkeypatch):
    monkeypatch.delenv("LOWRANK_EXPERTS", raising=False)


def test_a_wrong_gathered_path_stops_the_run(tmp_path, monkeypatch):
    real = experts4bit.gathered_forward
    monkeypatch.setattr(experts4bit, "gathered_forward", lambda *a, **k: 1.1 * real(*a, **k))
    monkeypatch.setattr(_common, "bench", lambda *a, **k: pytest.fail("timed before the check"))
    with pytest.raises(_common.WrongResult, match=r"forward E4 top2 H64 I128 T1 float32: the gathered path's result 0 "
                                                  r"against the dense path's differs .*relative error 0\.1 \(allowed 0\.001\)"):
        bench_experts4bit.main(["--quick", "--out", str(tmp_path / "e.json")])


def test_the_lora_gradients_are_checked(monkeypatch):
    """fwd_bwd_results returns the output, x's gradient and every adapter gradient, and clears them."""
    block = bench_experts4bit.experts_module(4, 2, 64, 128)
    bench_experts4bit.inject(block, bench_experts4bit.LoraConfig(r=4, targets=None, parameters=[
        "experts.gate_up_proj", "experts.down_proj"]))
    x = torch.randn(3, 64)
    weights, index = torch.topk(torch.randn(3, 4).softmax(-1), 2)
    results = bench_experts4bit.fwd_bwd_results(block.experts, x, index, weights)
    trained = [p for p in block.experts.parameters() if p.requires_grad]
    assert len(results) == 2 + len(trained) == 6 and results[1].shape == x.shape and not x.requires_grad
    assert all(p.grad is None for p in trained)
    bench_experts4bit.check_paths("lora", lambda: bench_experts4bit.fwd_bwd_results(block.experts, x, index, weights),
                                  ("routed", "gathered", "dense"), 1e-3)
