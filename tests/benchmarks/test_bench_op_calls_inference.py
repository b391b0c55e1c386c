"""bench_op_calls timed bitsandbytes' Linear4bit in training mode only, where a decoding step calls
it in eval mode under no_grad (on a CPU with AVX512-BF16 another kernel, on a repacked weight). It
now adds inference rows: fresh layers in eval mode, checked in that mode before timing, timed under
no_grad; the training rows stay as they were."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_op_calls  # noqa: E402

TRAINING = ["forward, no grad", "forward, x requires grad", "forward + backward"]


def test_inference_rows_time_eval_layers_under_no_grad(tmp_path, monkeypatch):
    seen = {}  # case -> {provider: (training, grad enabled when timed)}
    calls = []
    real_call = bench_op_calls.call

    def call(model, case, x):
        calls.append(model)
        return real_call(model, case, x)

    def measure(fns, *args):
        models, calls[:] = list(calls), []
        grad = torch.is_grad_enabled()
        seen[len(seen)] = {name: (m.training, grad) for name, m in zip(fns, models)}
        return {name: (1.0, 1.0, 1.0) for name in fns}

    monkeypatch.setattr(bench_op_calls, "call", call)
    monkeypatch.setattr(bench_op_calls, "measure", measure)
    rows = bench_op_calls.main(["--quick", "--out", str(tmp_path / "o.json")])
    cases = list(dict.fromkeys(r["case"] for r in rows))
    assert cases == TRAINING + [c + " (LoRA)" for c in TRAINING] + [bench_op_calls.INFERENCE]
    inference = seen[len(seen) - 1]
    want = ["bf16 nn.Linear", "lowrank Linear4bit"]
    if "bitsandbytes Linear4bit" in seen[0]:  # bitsandbytes importable
        want.append("bitsandbytes Linear4bit")
    assert list(inference) == want == [r["provider"] for r in rows if r["case"] == bench_op_calls.INFERENCE]
    assert all(state == (False, False) for state in inference.values())  # eval mode, no grad
    assert all(training for timed in list(seen.values())[:-1] for training, _ in timed.values())  # as before


def test_inference_rows_are_checked_before_timing(tmp_path, monkeypatch):
    """A bitsandbytes layer computing something else in eval mode stops the run, untimed."""
    pytest.importorskip("bitsandbytes")
    built = []
    real = bench_op_calls.providers

    def providers(*args):
        out = real(*args)
        built.append(out)
        if len(built) == 3:  # the inference layers (after the training ones, without and with LoRA)
            layer = out["bitsandbytes Linear4bit"][0]
            layer.weight.data = layer.weight.data.flip(0)  # the codes in another order
        return out

    timed = []
    monkeypatch.setattr(bench_op_calls, "providers", providers)
    monkeypatch.setattr(bench_op_calls, "measure", lambda fns, *a: timed.append(list(fns)) or
                        {name: (1.0, 1.0, 1.0) for name in fns})
    with pytest.raises(_common.WrongResult, match=r"bitsandbytes Linear4bit's output against lowrank Linear4bit's "
                                                  r"differs from its reference: relative error [0-9.]+"):
        bench_op_calls.main(["--quick", "--out", str(tmp_path / "o.json")])
    assert len(timed) == 6 and not built[2]["bitsandbytes Linear4bit"].training  # checked in eval mode, not timed
