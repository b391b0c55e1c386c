"""A BERT-family decoder with cross-attention (BertLMHeadModel, add_cross_attention=True, as in
bert2bert): its cross-attention class (BertCrossAttention) carries no is_cross_attention flag (its
parent BertAttention does), so it was a default target and the forward raised
("'DynamicCache' object has no attribute 'is_updated'"). The prefix goes on the self-attention only,
and the model computes what transformers' own cache path computes with the prefix as P past tokens
of the self-attention cache."""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank
from lowrank.tuners.prefix import layers

from . import models

transformers = pytest.importorskip("transformers")

P = 3


def decoder():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, is_decoder=True,
                                  add_cross_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertLMHeadModel(cfg).eval()


def test_the_prefix_goes_on_self_attention_only_and_equals_the_cache_path():
    base = decoder()
    ours = copy.deepcopy(base)
    assert lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=P)) == [
        "bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    with pytest.raises(TypeError, match=r"cannot put a prefix on 'bert.encoder.layer.0.crossattention.self', a "
                                        r"BertCrossAttention"):
        lowrank.inject(copy.deepcopy(base), lowrank.PrefixConfig(num_virtual_tokens=P, targets=["crossattention.self"]))
    ids, encoded = models.ids(2, 6), torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(3))
    self_cache = transformers.DynamicCache()
    for i, layer in enumerate(layers(ours, "default")):
        k, v = layer.prefixes(2, torch.float32)
        self_cache.update(k, v, i)
    cache = transformers.EncoderDecoderCache(self_cache, transformers.DynamicCache())
    want = base(input_ids=ids, attention_mask=torch.ones(2, P + 6, dtype=torch.long), encoder_hidden_states=encoded,
                cache=cache).logits
    assert torch.equal(ours(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=encoded).logits,
                       want)
