"""State-space (Mamba) mixers take no prefix: they have a layer_idx, a cache argument, heads and a
head size like an attention module, but keep a recurrent state and never call cache.update, so a
prefix there crashed at the first forward (the stand-in cache has no conv state). On a hybrid
(Granite 4 / GraniteMoeHybrid: Mamba and attention layers) the default targets are the attention
layers, and the model computes what transformers' own cache path computes with the prefix as P
past tokens of those layers."""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank
from lowrank.tuners.prefix import layers

from . import models

transformers = pytest.importorskip("transformers")

P = 3


def mamba2():
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=models.VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4,
                                    expand=2, num_heads=8, head_dim=8, n_groups=1)
    return transformers.Mamba2ForCausalLM(cfg).eval()


def hybrid():
    torch.manual_seed(0)
    cfg = transformers.GraniteMoeHybridConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                              mamba_n_heads=8, mamba_d_head=8, mamba_d_state=4,
                                              layer_types=["mamba", "attention", "mamba", "attention"])
    return transformers.GraniteMoeHybridForCausalLM(cfg).eval()


def test_a_mamba_mixer_is_refused_at_inject():
    model = mamba2()
    with pytest.raises(TypeError, match=r"Mamba2ForCausalLM has no attention module a prefix can go on.*state-space"):
        lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=P))
    with pytest.raises(TypeError, match=r"cannot put a prefix on 'backbone.layers.0.mixer', a Mamba2Mixer"):
        lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=P, targets=["backbone.layers.0.mixer"]))
    assert not lowrank.adapter_names(model)


def test_a_hybrid_takes_the_prefix_on_its_attention_layers_only():
    base = hybrid()
    ours = copy.deepcopy(base)
    where = lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=P))
    assert where == ["model.layers.1.self_attn", "model.layers.3.self_attn"]
    ids = models.ids(2, 6)
    # the oracle: transformers' hybrid cache holding the prefix in the attention layers (P past tokens there)
    cache = transformers.DynamicCache(config=base.config)
    for layer in layers(ours, "default"):
        k, v = layer.prefixes(ids.shape[0], torch.float32)
        cache.update(k, v, layer.base.layer_idx)
    want = base(input_ids=ids, attention_mask=torch.ones(2, P + 6, dtype=torch.long), cache=cache).logits
    assert torch.equal(ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, want)  # the same kernels
    # generate with its cache follows the full recompute: float32 rounding of the step-by-step sums only
    out = [ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         pad_token_id=0, use_cache=use, output_logits=True, return_dict_in_generate=True)
           for use in (True, False)]
    assert torch.equal(out[0].sequences, out[1].sequences)
    for a, b in zip(out[0].logits, out[1].logits):
        assert ((a - b).abs() <= 64 * torch.finfo(torch.float32).eps * b.abs().max()).all()
