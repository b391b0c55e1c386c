"""load_adapter into a torch.compile'd model: the file names the model inside the wrapper (save_adapter
writes them so), and the load looked for `_orig_mod.`-prefixed names: a bottleneck adapter was
refused ("no module of OptimizedModule matched"), a LoRA one had every key missing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.config import AdapterConfig, LoraConfig  # noqa: E402


@pytest.mark.parametrize("config", [LoraConfig(r=2, targets=nn.Linear), AdapterConfig(targets=nn.Linear)],
                         ids=["lora", "bottleneck"])
def test_an_adapter_loads_into_a_compiled_model(config, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    model = copy.deepcopy(base)
    lowrank.inject(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    x = torch.randn(3, 8)
    want = model(x)
    lowrank.save_adapter(model, tmp_path / "a")

    compiled = torch.compile(copy.deepcopy(base), backend="eager")  # the wrapper, without inductor's compile time
    result = lowrank.load_adapter(compiled, tmp_path / "a")
    assert result.modules == ["0", "2"] and result.missing == result.unexpected == []
    assert torch.equal(compiled(x), want)
    lowrank.eject(compiled)
    assert torch.equal(compiled(x), base(x))
