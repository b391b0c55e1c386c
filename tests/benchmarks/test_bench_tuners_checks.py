"""bench_tuners checks that its providers compute the same model before timing them (_common,
Note: a model's output and its adapters' gradients): PEFT's twin with another LoRA scaling or
another base weight, or a merge that changes the model, stops the run with what differed and by
how much (the loss alone would not tell: a random model's is near log(vocab), and B = 0 at start)."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_tuners  # noqa: E402


def twins_with(monkeypatch, spoil):
    real = bench_tuners.twins

    def twins(base, ours_config, theirs_config):
        ours, theirs = real(base, ours_config, theirs_config)
        with torch.no_grad():
            spoil(theirs)
        return ours, theirs

    monkeypatch.setattr(bench_tuners, "twins", twins)


def test_same_twins_pass():
    torch.manual_seed(0)
    base = bench_tuners.llama(64, 1).train()
    ids = torch.randint(0, 1024, (1, 8))
    import peft

    from lowrank.config import LoraConfig

    ours, theirs = bench_tuners.twins(base, LoraConfig(r=4, alpha=8, targets=bench_tuners.TARGETS),
                                      peft.LoraConfig(r=4, lora_alpha=8, target_modules=bench_tuners.TARGETS))
    _common.check_same_model("t", {"a": ours, "b": theirs}, ids, [("a", "b")], 1e-6)
    assert all(p.grad is None for p in list(ours.parameters()) + list(theirs.parameters()))  # cleared after


def test_another_lora_scaling_is_caught(tmp_path, monkeypatch):
    """A's values doubled on PEFT's side: with B = 0 the logits agree, B's gradients do not."""
    def spoil(theirs):
        for name, p in theirs.named_parameters():
            if "lora_A" in name:
                p.mul_(2)

    twins_with(monkeypatch, spoil)
    with pytest.raises(_common.WrongResult, match=r"train_step: lowrank's adapter gradients against peft's differs"
                                                  r" from its reference: relative error 0\.5 \(allowed 0\.001\)"):
        bench_tuners.main(["--quick", "--out", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()


def test_another_base_is_caught(tmp_path, monkeypatch):
    def spoil(theirs):
        theirs.model.layers[0].self_attn.o_proj.base_layer.weight.mul_(-1)

    twins_with(monkeypatch, spoil)
    with pytest.raises(_common.WrongResult, match="train_step: lowrank's logits against peft's differs"):
        bench_tuners.main(["--quick", "--out", str(tmp_path / "t.json")])


def test_a_merge_that_changes_the_model_is_caught(tmp_path, monkeypatch):
    real = bench_tuners.merge

    def merge(model):
        real(model)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(0.5)

    monkeypatch.setattr(bench_tuners, "merge", merge)
    with pytest.raises(_common.WrongResult, match="merged_inference: the merged model's logits against the adapted"):
        bench_tuners.main(["--quick", "--out", str(tmp_path / "t.json")])
