"""DoRA on convolutions beyond what PEFT computes (tests/peers/test_peft_dora_conv.py has PEFT's
cases): a zero output channel is refused as on a linear layer, a training dropout recomputes
W0 * x with the base's own padding mode, an unbatched input keeps its shape, and merge /
unmerge give back what the unmerged layer computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from tests.tuners import models

EPS = torch.finfo(torch.float32).eps


def test_a_zero_output_channel_is_refused_naming_it():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[2] = 0  # m = ||W0||_c = 0 there: m / n is 0 / 0
    model = nn.Sequential(conv)
    with pytest.raises(ValueError, match=r"DoRA cannot go on '0': 1 of its 4 output rows of W0 are all zeros \(rows \[2\]\)"):
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"], dora=True))
    assert type(model[0]) is nn.Conv2d


@pytest.mark.parametrize("mode", ["reflect", "circular", "zeros"])
def test_a_dropout_recomputes_w0_x_with_the_base_s_padding(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"], dora=True, dropout=0.5))
    models.randomize_adapters(model)
    layer, x = model[0], torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        recomputed = layer._dora_delta("default", x, None)  # W0 * x from x, as after a dropout
        from_base = layer._dora_delta("default", x, layer.base(x))  # W0 * x as base(x) - b
    # equal but for the bias's rounding in base(x) - b: |error| <= eps |base(x)| per element, times |m / n - 1|
    assert torch.allclose(recomputed, from_base, rtol=0, atol=4 * EPS * float(layer.base(x).abs().max()))


def test_an_unbatched_input_keeps_its_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 5, 3))
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"], dora=True))
    models.randomize_adapters(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert model(x).shape == (5, 6)
        assert torch.equal(model(x), model(x[None])[0])


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 5, 3), nn.Conv2d(3, 5, (2, 3), stride=2), nn.Conv3d(2, 3, 2)])
def test_merge_computes_the_unmerged_layer_and_unmerge_gives_w0_back(conv):
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    w0 = conv.weight.detach().clone()
    lowrank.inject(model, lowrank.LoraConfig(r=2, alpha=4, targets=["0"], dora=True))
    models.randomize_adapters(model)
    x = torch.randn((2, conv.in_channels) + (5,) * (conv.weight.dim() - 2))
    with torch.no_grad():
        want = model(x)
        assert lowrank.merge(model) == ["0"]
        got = model(x)
        # float32 roundings of the kernel W' and of the two forms' sums: a few eps of the output's scale
        assert torch.allclose(got, want, rtol=0, atol=64 * EPS * float(want.abs().max()))
        lowrank.unmerge(model)
        assert torch.allclose(model[0].base.weight, w0, rtol=0, atol=8 * EPS * float(w0.abs().max()))
        # unmerged again: the adapter's own forward, on W0 back within its roundings
        assert torch.allclose(model(x), want, rtol=0, atol=64 * EPS * float(want.abs().max()))
