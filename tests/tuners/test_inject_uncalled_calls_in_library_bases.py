"""inject's warning of modules their model never calls (lowrank/targets.py, Note: modules their model
never calls) is a guess from the class's source: it reads `self.<name>.weight` and never calls
`self.<name>`. The source of torch's classes was left out of it, so a subclass of one that reads
the weight (to initialize it) while torch's forward calls the module was told its adapter would
never run. The call in the library base now counts: no warning, and the adapter does run."""

import warnings

import pytest

import torch
from torch import nn

import lowrank
from tests.tuners import models


class ZeroFeedForward(nn.TransformerEncoderLayer):
    """An encoder layer whose feed-forward starts at zero (as in ReZero-style inits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.zeros_(self.linear2.weight)


def test_a_torch_layer_subclass_that_reads_the_weight_does_not_warn_and_its_adapter_runs():
    torch.manual_seed(0)
    model = nn.Sequential(ZeroFeedForward(16, 2, 32, dropout=0.0, batch_first=True)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["linear1", "linear2"]))
    models.randomize_adapters(model, std=1.0)
    x = torch.randn(2, 3, 16)
    out = model(x)
    with torch.no_grad(), lowrank.disabled(model):
        assert not torch.equal(out, model(x))  # the adapter on linear2 changes the output: it runs
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "linear2.lora_" in n}
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_a_model_that_reads_the_weight_alone_still_warns():
    class ReadsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return nn.functional.linear(x, self.proj.weight)

    with pytest.warns(UserWarning, match=r"LoRA on \['0.proj'\] \(1 modules\) would never run"):
        lowrank.inject(nn.Sequential(ReadsOnly()), lowrank.LoraConfig(r=2, targets=["proj"]))
