"""QLoRA inside nn.TransformerEncoderLayer takes the one-op path (lowrank::nf4_lora_linear) too.

A 4-bit layer there carries the empty forward pre-hook that keeps torch's fused encoder path off
(lowrank/quant/quantize.py fused_paths_off; tuners/base.py, Note: fused fast paths). LoraLinear read
any hook on its base as a reason to call the base module and add the adapter after (two ops), so
an encoder's 4-bit layers never ran the one-op path. That hook does nothing, so it no longer counts."""

import pytest
import torch
from torch import nn

from lowrank import LoraConfig, NF4Config, inject, quantize
from lowrank.tuners.base import _keep_fused_paths_off
from tests.ops.test_lora_add import _node_names
from tests.ops.test_nf4_lora_linear import CPP, NODE, TWO_OPS, _two_ops


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True).bfloat16()
    quantize(layer, NF4Config(compute_dtype=torch.bfloat16, skip=[]))
    inject(layer, LoraConfig(r=4, alpha=8, targets=["linear1", "linear2"], init="gaussian"))
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return layer


@pytest.mark.skipif(not CPP, reason="LoraLinear uses nf4_lora_linear with lowrank._C's autograd")
@pytest.mark.parametrize("training", [True, False])
def test_encoder_layers_take_the_one_op_path_with_the_same_bits(monkeypatch, training):
    layer = encoder().train(training)
    assert _keep_fused_paths_off in layer.linear1.base._forward_pre_hooks.values()  # what made them two ops
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    results = []
    for one_op in (True, False):
        if not one_op:
            _two_ops(monkeypatch)
        out = layer(x)
        names = _node_names(out)
        assert (NODE in names) == one_op and (TWO_OPS in names) != one_op
        trained = [x] + [p for p in layer.parameters() if p.requires_grad]
        results.append((out.detach(), torch.autograd.grad(out.float().square().sum(), trained)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.skipif(not CPP, reason="LoraLinear uses nf4_lora_linear with lowrank._C's autograd")
def test_a_hook_of_the_users_on_the_base_still_means_two_ops():
    layer = encoder()
    seen = []
    layer.linear1.base.register_forward_pre_hook(lambda m, args: seen.append(m))
    out = layer(torch.randn(2, 5, 64).bfloat16())
    assert seen == [layer.linear1.base] and TWO_OPS in _node_names(out)
