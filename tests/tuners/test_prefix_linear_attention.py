"""An attention module that never calls cache.update (MiniMax's lightning attention: linear
attention, its own state in the cache) cannot see a prefix. It is named "Attention" and offers a
layer_idx, a cache and heads, so it takes one by default; with a real cache (generation, use_cache)
its forward ran on the real cache's answers and ignored the prefix without a word (without one it
failed on the stand-in). The first forward now raises naming it, and excluding it works."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import models

transformers = pytest.importorskip("transformers")


def minimax():
    cfg = transformers.AutoConfig.for_model("minimax", vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                                            layer_types=["full_attention", "linear_attention"])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_a_module_that_never_calls_cache_update_is_named():
    model = minimax()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    with pytest.raises(RuntimeError, match=r"MiniMaxLightningAttention ran without calling cache.update"):
        model(input_ids=models.ids(2, 5), use_cache=True)


def test_excluding_it_leaves_the_prefix_on_the_full_attention():
    base, model = minimax(), minimax()
    assert lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3, exclude=["model.layers.1.self_attn"])) == [
        "model.layers.0.self_attn"]
    ids = models.ids(2, 5)
    out = model(input_ids=ids, use_cache=True).logits
    assert not torch.equal(out, base(input_ids=ids).logits)  # the prefix acts
