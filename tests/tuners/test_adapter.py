"""Bottleneck adapters: identity at start; the default Houlsby / Pfeiffer targets on Llama,
GPT-2, BERT and nn.TransformerEncoder; the parallel variant's equation; tuple outputs."""

import pytest
import torch
from torch import nn

from lowrank.config import AdapterConfig
from lowrank.inject import eject, inject, merge
from lowrank.tuners.adapter import AdapterLayer

from . import models

EXPECTED = {  # (placement) -> wrapped names in layer 0
    ("llama", "pfeiffer"): ["model.layers.0.mlp"],
    ("llama", "houlsby"): ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp"],
    ("gpt2", "pfeiffer"): ["transformer.h.0.mlp"],
    ("gpt2", "houlsby"): ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp"],
    ("bert", "pfeiffer"): ["encoder.layer.0.output.dense"],
    ("bert", "houlsby"): ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"],
    ("encoder", "pfeiffer"): ["layers.0.linear2"],
    ("encoder", "houlsby"): ["layers.0.self_attn", "layers.0.linear2"],
}


def _input(kind):
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)) if kind == "encoder" else models.ids()


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("kind, placement", list(EXPECTED))
def test_default_placements_wrap_the_right_modules_and_start_as_identity(kind, placement, parallel):
    model = getattr(models, kind)()
    x = _input(kind)
    model.requires_grad_(False)  # as inject leaves it: torch picks attention kernels by requires_grad
    before = models.run(model, x)
    wrapped = inject(model, AdapterConfig(placement=placement, parallel=parallel))
    assert sorted(n for n in wrapped if ".0." in n) == sorted(EXPECTED[kind, placement])
    assert len(wrapped) == 2 * len(EXPECTED[kind, placement])  # both layers, nothing else
    # up = 0 makes every addition exactly 0.0: bit-for-bit the base output
    assert torch.equal(models.run(model, x), before)
    models.randomize_adapters(model)
    assert not torch.equal(models.run(model, x), before)  # and the adapters are really in the path


@pytest.mark.parametrize("parallel", [False, True])
def test_forward_is_the_equation(parallel):
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    holder = nn.Sequential(base)
    inject(holder, AdapterConfig(targets="0", parallel=parallel, bottleneck_size=3, activation="gelu", scaling=2.0))
    models.randomize_adapters(holder)
    ad = holder[0].adapters["default"]
    assert (ad.down.in_features, ad.down.out_features, ad.up.out_features) == ((12 if parallel else 20), 3, 20)
    x = torch.randn(4, 12)
    fx = base(x)
    src = x if parallel else fx
    expected = fx + 2.0 * ad.up(nn.functional.gelu(ad.down(src)))  # the same ops: exact
    assert torch.equal(holder(x), expected)


def test_reduction_factor_sets_the_width():
    model = models.llama()
    inject(model, AdapterConfig(reduction_factor=8))
    assert model.model.layers[0].mlp.adapters["default"].down.out_features == 32 // 8


def test_tuple_outputs_adapt_the_first_item_and_keep_the_rest():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    holder = nn.ModuleDict({"attn": mha})
    inject(holder, AdapterConfig(targets=nn.MultiheadAttention))
    models.randomize_adapters(holder)
    x = torch.randn(2, 3, 16)
    out, weights = holder["attn"](x, x, x)
    base_out, base_weights = mha(x, x, x)
    assert torch.equal(weights, base_weights) and not torch.equal(out, base_out)


def test_merge_leaves_bottleneck_adapters_in_the_forward_and_eject_restores():
    model = models.mlp()
    before = model.state_dict(keep_vars=True)
    inject(model, AdapterConfig(targets=["0", "2"]))
    assert merge(model) == []
    assert all(isinstance(model[i], AdapterLayer) for i in (0, 2))
    eject(model)
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in before.items())
