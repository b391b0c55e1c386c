"""NF4Config(parameters=...) naming the weight of an nn.Linear subclass that is a router
(PhiMoE's PhimoeTopKRouter: its forward returns routing, not x W^T): the refusal told the user
to name the layer in targets, which quantize then refuses too (a Linear4bit would compute
something else). It now says that neither can be quantized, and why; a plain linear layer's
weight still gets the advice to name the layer (lowrank/quant/quantize.py check_parameters)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from tests.tuners.models import phimoe  # noqa: E402


def test_a_routers_weight_is_refused_without_pointing_at_targets():
    model = phimoe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="PhimoeTopKRouter, an nn.Linear with a forward of its own"):
        lowrank.quantize(model, lowrank.NF4Config(targets=["router"]))  # the advice the parameter's error gave
    with pytest.raises(ValueError) as e:
        lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=["router.weight"]))
    message = str(e.value)
    assert "'model.layers.0.mlp.router.weight'" in message and "nor the layer" in message
    assert "PhimoeTopKRouter, an nn.Linear with a forward of its own" in message
    assert "name the layer in targets" not in message
    after = model.state_dict()  # refused before anything changed
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_plain_linear_layers_weight_still_points_at_targets():
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' of the linear layer "
                                         r"'model.layers.0.self_attn.q_proj' on its own; name the layer in targets"):
        lowrank.quantize(phimoe(), lowrank.NF4Config(targets=None, parameters=["q_proj.weight"]))
