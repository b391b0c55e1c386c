"""Prefix tuning on torch's nn.MultiheadAttention (and so nn.TransformerEncoder / Decoder research
code): equal to torch's own attention over [virtual tokens ; inputs], the options torch takes,
what it cannot compute refused at inject, and the default targets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank.tuners.prefix import layers

from . import models


def _mha_with_virtual_tokens(batch_first: bool, add_zero_attn: bool = False):
    """An nn.MultiheadAttention with a prefix equal to its own projections of P virtual tokens z:
    then attention over [prefix ; K] is torch's attention over the inputs [z ; x]."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, add_zero_attn=add_zero_attn, dtype=torch.float64).eval()
    z = torch.randn(3, 32, dtype=torch.float64)
    wrapper = nn.Sequential(copy.deepcopy(mha))
    lowrank.inject(wrapper, lowrank.PrefixConfig(num_virtual_tokens=3), )
    _, w_k, w_v = mha.in_proj_weight.chunk(3)
    _, b_k, b_v = mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        wrapper[0].kv["default"].copy_(torch.cat([z @ w_k.T + b_k, z @ w_v.T + b_v], dim=1))  # (P, 2 E)
    return mha, wrapper[0], z


@pytest.mark.parametrize("add_zero_attn", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_equals_attention_over_virtual_tokens(batch_first, add_zero_attn):
    """float64 on both paths: they differ only in how projections are batched, so by rounding
    of order 32 * eps64 * |x| ~ 1e-14; a misplaced prefix or mask would show at ~1e-1."""
    mha, layer, z = _mha_with_virtual_tokens(batch_first, add_zero_attn)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    zx = torch.cat([z.expand(2, 3, 32), x], dim=1)  # (B, P + T, E)
    wide_pad = torch.cat([torch.zeros(2, 3, dtype=torch.bool), pad], dim=1)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    wide_causal = torch.cat([torch.zeros(5, 3, dtype=torch.bool), causal], dim=1)
    t = (lambda a: a) if batch_first else (lambda a: a.transpose(0, 1))
    ours = layer(t(x), t(x), t(x), key_padding_mask=pad, attn_mask=causal)[0]
    oracle = mha(t(x), t(zx), t(zx), key_padding_mask=wide_pad, attn_mask=wide_causal)[0]
    assert (ours - oracle).abs().max() <= 1e-12


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_takes_unbatched_inputs_as_torch_does(batch_first):
    """(T, E) inputs with an (S,) padding mask: the batched call's one row (float64, bound as above)."""
    mha, layer, z = _mha_with_virtual_tokens(batch_first)
    x, pad = torch.randn(5, 32, dtype=torch.float64), torch.tensor([False] * 3 + [True] * 2)
    ours = layer(x, x, x, key_padding_mask=pad)[0]
    zx, wide_pad = torch.cat([z, x]), torch.cat([torch.zeros(3, dtype=torch.bool), pad])
    assert ours.shape == (5, 32)
    assert (ours - mha(x, zx, zx, key_padding_mask=wide_pad)[0]).abs().max() <= 1e-12


@pytest.mark.parametrize("kwargs", [{"kdim": 16}, {"add_bias_kv": True}])
def test_multihead_attention_it_cannot_compute_is_refused_at_inject(kwargs):
    model = nn.Sequential(nn.MultiheadAttention(32, 4, **kwargs))
    before = copy.deepcopy(model)
    with pytest.raises(NotImplementedError, match=r"needs kdim == vdim == embed_dim and add_bias_kv=False; got "):
        lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
    assert type(model[0]) is nn.MultiheadAttention and str(model) == str(before)


def test_transformer_encoder_takes_the_prefix_on_every_path():
    """nn.TransformerEncoder's fused eval path must not skip the wrapped attention."""
    model = models.encoder().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # the conditions of torch's fused path: eval, no grad
        before = model(x)
        lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
        assert (model(x) - before).abs().max() > 1e-3
    model.train()
    model(x).sum().backward()
    assert all(layer.kv["default"].grad is not None for layer in layers(model, "default"))


def test_a_torch_decoders_cross_attention_is_no_default_target():
    """Only self-attention by default, as for transformers models (cross-attention: by name only)."""
    layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerDecoder(layer, num_layers=2)
    assert lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2)) == ["layers.0.self_attn", "layers.1.self_attn"]
    lowrank.eject(model)
    assert lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2, targets="multihead_attn")) == [
        "layers.0.multihead_attn", "layers.1.multihead_attn"]
