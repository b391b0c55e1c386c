"""Prefix tuning on a model whose last layers share the keys and values of an earlier one
(Gemma 3n, Gemma 4: is_kv_shared_layer). Such a layer never calls cache.update: it attends over
the keys and values its source layer stored after its own update, prefix included, and its cache
layer is a DummyLayer. The first forward raised: with a cache, 'get_seq_length on ... DummyLayer';
without one (use_cache=False), 'ran without calling cache.update'. Now the cached forward, a
decode token by token and the uncached forward agree, past the sliding window too."""

from __future__ import annotations

import pytest
import torch

import lowrank

transformers = pytest.importorskip("transformers")


def gemma3n(window: int = 4, inject: bool = True):
    cfg = transformers.Gemma3nTextConfig(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, hidden_size_per_layer_input=8,
        num_kv_shared_layers=2, laurel_rank=4, altup_num_inputs=2, sliding_window=window,
        layer_types=["sliding_attention", "full_attention"] * 2, activation_sparsity_pattern=[0.0] * 4)
    torch.manual_seed(0)
    model = transformers.Gemma3nForCausalLM(cfg).eval()
    assert [layer.self_attn.is_kv_shared_layer for layer in model.model.layers] == [False, False, True, True]
    if not inject:
        return model
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def test_cached_decoding_and_uncached_forward_agree():
    model = gemma3n()
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        full = model(x, use_cache=False).logits  # raised: never called cache.update
        cached = model(x).logits  # raised: get_seq_length on a DummyLayer
        torch.testing.assert_close(cached, full)
        out = model(x[:, :3])  # then one token at a time, past the sliding window of 4
        steps = [out.logits]
        for t in range(3, 9):
            out = model(x[:, t:t + 1], cache=out.past_key_values)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_peft_computes_the_same(tmp_path):
    # PEFT puts the prefix into the cache of every layer; a shared layer reads its source's, prefix included. A
    # window wider than prefix + text: PEFT's prefix is a cached token that a sliding window drops, ours is not
    peft = pytest.importorskip("peft")
    model = gemma3n(window=64)
    lowrank.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(gemma3n(window=64, inject=False), tmp_path).eval()
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=False).logits, theirs(input_ids=x).logits)


def test_the_shared_layers_read_the_prefix_their_source_stored():
    model = gemma3n()
    x = torch.randint(0, 128, (2, 5))
    model(x, use_cache=False).logits.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for i, shared in enumerate([False, False, True, True]):  # as in PEFT: the source's prefix, not their own
        (g,) = [g for n, g in grads.items() if f"layers.{i}." in n]
        assert (g is None or not g.any()) if shared else g.abs().sum() > 0, i
