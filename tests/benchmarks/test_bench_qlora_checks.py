"""bench_qlora checks that lowrank's and PEFT + bitsandbytes' models are the same before timing their
steps (_common, Note: a model's output and its adapters' gradients): a bitsandbytes layer whose
packed weight is read in another layout stops the run with what differed and by how much. The
first losses would hardly show it: a random model's loss is near log(vocab) whatever one layer does."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_qlora  # noqa: E402


def test_a_wrong_bitsandbytes_layer_stops_the_run(tmp_path, monkeypatch):
    real = bench_qlora.bnb_quantize

    def bnb_quantize(model, dtype, device):  # one layer's codes in another order: a wrong layout
        real(model, dtype, device)
        weight = model.model.layers[0].self_attn.o_proj.weight
        weight.data = weight.data.flip(0)

    monkeypatch.setattr(bench_qlora, "bnb_quantize", bnb_quantize)
    with pytest.raises(_common.WrongResult, match=r"qlora_train_step: lowrank's logits against peft\+bitsandbytes's "
                                                  r"differs from its reference: relative error [0-9.]+ \(allowed 0\.001\)"):
        bench_qlora.main(["--quick", "--out", str(tmp_path / "q.json")])
    assert not (tmp_path / "q.json").exists()


def test_the_same_models_pass_with_dropout(tmp_path):
    """Dropout is off for the check only: the models compare equal, and the timed steps keep it."""
    rows = bench_qlora.main(["--quick", "--reps", "1", "--dropout", "0.1", "--out", str(tmp_path / "q.json")])
    assert [r["provider"] for r in rows] == ["lowrank", "peft+bitsandbytes"] and "dropout 0.1" in rows[0]["shape"]


def test_outputs_restores_dropout_and_clears_grads():
    model = bench_qlora.llama(64, 1).train()
    bench_qlora.inject(model, bench_qlora.LoraConfig(r=4, dropout=0.1, targets=bench_qlora.TARGETS))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    logits, grads, keys = _common.outputs(model, torch.randint(0, 1024, (1, 8)))
    assert drops and all(m.training for m in drops) and all(p.grad is None for p in model.parameters())
    assert logits.shape == (1, 8, 1024) and keys and all("lora_" in k for k in keys) and grads.abs().sum() > 0
