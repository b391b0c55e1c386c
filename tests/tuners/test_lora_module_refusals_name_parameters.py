"""LoRA on a module that cannot take it as a module but whose weights can take it as parameters
(lowrank/tuners/lora.py check, lora_param.instead): a router that subclasses nn.Linear and
returns routing (PhiMoE's) was wrapped, and every forward then failed with "can only
concatenate tuple (not "Tensor") to tuple"; it is refused at inject now. That refusal, and the
one for a MoE layer's experts module, name the parameters LoRA can go on instead."""

from __future__ import annotations

import copy
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from tests.tuners.models import phimoe  # noqa: E402


def test_a_router_that_subclasses_linear_is_refused_at_inject():
    model = phimoe()
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(TypeError, match=re.escape("cannot put LoRA on 'model.layers.0.mlp.router', a PhimoeTopKRouter; "
                                                  "its forward returns routing")) as e:
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["router"]))
    assert "LoraConfig(parameters=['model.layers.0.mlp.router.weight'])" in str(e.value)
    assert not lowrank.adapter_names(model)  # nothing changed: the model still runs as before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # the named alternative works
    assert lowrank.inject(model, lowrank.LoraConfig(r=2, targets=None, parameters=["model.layers.0.mlp.router.weight"]))


def test_an_experts_module_names_its_parameters():
    model = phimoe()
    with pytest.raises(TypeError, match="a PhimoeExperts; LoRA wraps") as e:
        lowrank.inject(copy.deepcopy(model), lowrank.LoraConfig(r=2, targets=["experts"]))
    want = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    assert f"LoraConfig(parameters={want!r})" in str(e.value)
    assert sorted(lowrank.inject(model, lowrank.LoraConfig(r=2, targets=None, parameters=want))) == sorted(want)


def test_a_module_without_such_weights_gets_no_such_advice():
    with pytest.raises(TypeError) as e:
        lowrank.inject(torch.nn.Sequential(torch.nn.LayerNorm(8)), lowrank.LoraConfig(r=2, targets=["0"]))
    assert "a LayerNorm; LoRA wraps" in str(e.value) and "parameters" not in str(e.value)


def test_a_4bit_layers_weight_given_as_a_parameter_says_to_name_the_layer():
    # a 4-bit linear layer's weight is packed codes and scales, no parameter named weight: the refusal said only
    # that nothing matched, listing no parameter at all
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    lowrank.quantize(model, lowrank.NF4Config(skip=[]))
    with pytest.raises(ValueError, match=r"matched parameters=\('0.weight',\).* a 4-bit linear layer's weight "
                                         r"\(e.g. of \['0'\]\) is no parameter: name the layer in targets="):
        lowrank.inject(model, lowrank.LoraConfig(r=2, parameters=["0.weight"]))
    assert lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"])) == ["0"]
