"""Default prefix targets are attention modules named so. DeepSeek-V3.2's sparse-attention Indexer
(inside its MLA attention, which takes no prefix: keys and values of different head sizes) has a
layer_idx, a cache argument, heads and a head size, so it was the innermost "attention" and took
the prefix, then raised a misleading error at the first forward ("switch with
set_attn_implementation('sdpa')" on an sdpa model). The model is refused at inject now."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import models

transformers = pytest.importorskip("transformers")


def deepseek_v32():
    cfg = transformers.AutoConfig.for_model(
        "deepseek_v32", vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, index_head_dim=8, index_n_heads=2, index_topk=4, kv_lora_rank=16,
        q_lora_rank=16, qk_head_dim=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=2,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1, topk_group=1)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_a_helper_inside_an_attention_module_is_no_default_target():
    model = deepseek_v32()
    with pytest.raises(TypeError, match=r"DeepseekV32ForCausalLM has no attention module a prefix can go on"):
        lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    assert not lowrank.adapter_names(model)
