"""DoRA with a training dropout on a convolution subclass that pads in its forward (a causal conv):
W0 * x was recomputed from the dropped-out x with F.convNd alone (as PEFT 0.21 does), leaving out
the subclass's padding, so the output came out shorter than the base's and the sum raised a shape
error. Now such a base's own forward computes it, less the bias (lowrank/tuners/dora.py: conv_delta)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import lowrank
from tests.tuners import models


class Causal(nn.Conv1d):
    """A causal convolution that pads in its forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


def test_a_dropout_on_a_conv_that_pads_in_its_forward_uses_that_forward():
    torch.manual_seed(0)
    model = nn.Sequential(Causal(3, 4, 3))
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"], dora=True, dropout=0.5))
    models.randomize_adapters(model)
    layer, x = model[0], torch.randn(2, 3, 8)
    assert model.train()(x).shape == (2, 4, 8)
    with torch.no_grad():
        recomputed = layer._dora_delta("default", x, None)  # as after a dropout
        from_base = layer._dora_delta("default", x, layer.base(x))
    assert torch.equal(recomputed, from_base)  # the same forward, the same bias taken off
