"""bench_op_calls times every provider doing the same work: the bf16 baseline's weight is frozen like
the 4-bit layers', so its forward + backward forms x's gradient only, not also a weight gradient."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_op_calls  # noqa: E402


def test_no_base_weight_trains():
    cpu = torch.device("cpu")
    plain, lora = bench_op_calls.providers(False, cpu), bench_op_calls.providers(True, cpu)
    assert "bf16 nn.Linear" in plain
    for name, model in plain.items():  # without LoRA nothing trains
        assert not [n for n, p in model.named_parameters() if p.requires_grad], name
    for name, model in lora.items():  # with LoRA only the adapters do
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n in trained), (name, trained)


def test_baseline_backward_forms_only_x_grad():
    plain = bench_op_calls.providers(False, torch.device("cpu"))
    x = torch.randn(1, 1, bench_op_calls.FEATURES).to(torch.bfloat16)
    step = bench_op_calls.call(plain["bf16 nn.Linear"], "forward + backward", x)
    step()
    assert plain["bf16 nn.Linear"][0].weight.grad is None
