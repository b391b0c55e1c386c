"""NF4Config(targets=["experts"]): a transformers 5 experts module is no linear layer, and the
refusal said only "narrow targets or add it to skip"; it now names the weights that go in 4 bits
through NF4Config(parameters=...), and that advice works (lowrank/quant/quantize.py)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402


def test_the_refusal_names_the_experts_weights():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    model = transformers.MixtralForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="is a MixtralExperts; quantize replaces nn.Linear") as e:
        lowrank.quantize(model, lowrank.NF4Config(targets=["experts"]))
    want = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    assert f"NF4Config(parameters={want!r})" in str(e.value)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert lowrank.quantize(copy.deepcopy(model), lowrank.NF4Config(targets=None, parameters=want)) == want


def test_a_module_without_such_weights_gets_no_such_advice():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    with pytest.raises(TypeError, match="is a LayerNorm") as e:
        lowrank.quantize(model, lowrank.NF4Config(targets=["1"]))
    assert "parameters" not in str(e.value)
