"""Merging LoRA into an nn.Conv3d, with PEFT 0.21 as the oracle: lowrank formed a 3-D kernel's update
as B (out, r) @ A (r, in * prod(k)), PEFT as F.conv3d(A^T, B)^T, the same sums rounded in another
order, so the merged weights differed from PEFT's by float32 roundings (4e-9 here) where conv1d
and conv2d merges were PEFT's bit for bit. Now conv3d takes PEFT's convolution too, except where
PEFT's 1x1 branch (kernel (1, 1, k)) fails and the matmul stays (lowrank/tuners/lora_conv.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import lowrank  # noqa: E402
from tests.tuners import models  # noqa: E402


@pytest.mark.parametrize("kernel", [2, 3, (2, 1, 1), (2, 3, 1)])
def test_a_conv3d_merge_is_peft_s_bit_for_bit(kernel):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv3d(3, 4, kernel))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"]))
    models.randomize_adapters(theirs)
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, alpha=3, targets=["0"]))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for k, p in theirs.named_parameters():
            if "lora_" in k:
                mine[k.removeprefix("base_model.model.")].copy_(p)
        want = theirs.merge_and_unload()[0].weight
        lowrank.merge(ours)
    assert torch.equal(ours[0].base.weight, want)


def test_a_1x1xk_conv3d_still_merges():
    # PEFT 0.21's merge fails here (its 1x1 branch squeezes a (1, 1, k) kernel); B A as a matmul is exact math
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, (1, 1, 2)))
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"]))
    models.randomize_adapters(model)
    x = torch.randn(1, 3, 2, 3, 4)
    with torch.no_grad():
        want = model(x)
        lowrank.merge(model)
        assert torch.allclose(model(x), want, rtol=0, atol=1e-6 * float(want.abs().max()))
