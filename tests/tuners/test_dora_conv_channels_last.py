"""DoRA on a convolution of a channels_last model (a diffusion UNet is usually run so): B A was
formed with PEFT's `view`, which raised on A's channels_last (not contiguous) weight at every
forward (PEFT 0.21 raises too); now with reshape, the same product on a contiguous A, so
the channels_last model computes what the contiguous one does (lowrank/tuners/dora.py:
conv_lora_weight)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from tests.tuners import models

EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dim", [2, 3])
def test_a_channels_last_model_computes_as_the_contiguous_one(dim):
    torch.manual_seed(0)
    conv, fmt = ((nn.Conv2d, torch.channels_last) if dim == 2 else (nn.Conv3d, torch.channels_last_3d))
    model = nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 1))
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0", "2"], dora=True, dropout=0.1))
    models.randomize_adapters(model)  # B, A and m away from their initial values
    last = copy.deepcopy(model).to(memory_format=fmt)
    assert not last[0].lora_A["default"].weight.is_contiguous()  # what `view` could not flatten
    x = torch.randn((2, 3) + (5,) * dim)
    want, got = model.eval()(x), last.eval()(x.contiguous(memory_format=fmt))
    # the same sums, the convolutions' perhaps in another order: a few roundings of the output's scale
    assert torch.allclose(got, want, rtol=0, atol=8 * EPS * float(want.abs().max()))
    want.square().sum().backward()
    got.square().sum().backward()
    grads = dict(model.named_parameters())
    for k, p in last.named_parameters():
        if "lora_" in k:
            assert torch.allclose(p.grad, grads[k].grad, rtol=1e-5, atol=1e-5 * float(grads[k].grad.abs().max())), k
    last.train()(x.contiguous(memory_format=fmt))  # the dropout path recomputes W0 * x: it runs too
    with torch.no_grad():
        lowrank.merge(last.eval())
        lowrank.merge(model)
        for i in (0, 2):  # the merged kernels: B A from the same factors, the same values
            assert torch.allclose(last[i].base.weight, model[i].base.weight, rtol=0, atol=4 * EPS)
