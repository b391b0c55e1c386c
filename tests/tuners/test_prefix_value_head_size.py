"""A prefix has one head size for its keys and values. Attention whose values have another head
size than its keys (MiMo-V2-Flash: head_dim 16, v_head_dim 8 here; DeepSeek's MLA) is refused at
inject; before, the first forward failed inside torch.cat ("Sizes of tensors must match except in
dimension 2"). A module that does not say so (no v_head_dim) and hands cache.update values of
another shape gets an error naming the values' layout at the first forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank

from . import models

transformers = pytest.importorskip("transformers")


def test_values_of_another_head_size_are_refused_at_inject():
    cfg = transformers.AutoConfig.for_model("mimo_v2_flash", vocab_size=models.VOCAB, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=16, v_head_dim=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(TypeError, match=r"has no attention module a prefix can go on .*one head size for keys and "
                                        r"values"):
        lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    assert not lowrank.adapter_names(model)


class NarrowValues(nn.Module):
    """Keys of head size 8, values of head size 4, handed to cache.update."""

    def __init__(self):
        super().__init__()
        self.layer_idx, self.head_dim, self.num_heads = 0, 8, 2
        self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, hidden_states, attention_mask=None, cache=None):
        B, T, _ = hidden_states.shape
        k = self.k_proj(hidden_states).view(B, T, 2, 8).transpose(1, 2)  # (B, 2, T, 8)
        v = self.v_proj(hidden_states).view(B, T, 2, 4).transpose(1, 2)  # (B, 2, T, 4)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return (k.sum(-1, keepdim=True) * v).sum(2)


def test_values_in_another_layout_are_named_at_the_first_forward():
    model = nn.Sequential(NarrowValues())
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3, targets=["0"]))
    with pytest.raises(RuntimeError, match=r"prefix values are \(batch, heads, P, head_dim\) = \(1, 2, 3, 8\) but the "
                                           r"attention module's values are \(1, 2, 5, 4\)"):
        model(torch.randn(1, 5, 16))
