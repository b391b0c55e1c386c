"""Prompt tuning on models whose cache is a recurrent state that counts no tokens: Mamba (a
transformers cache of linear-attention layers only, whose get_seq_length raises) and RWKV (its
`state` argument). A decode step is a call with a state already there: the prompt is in it and
is not prepended again. Before, Mamba's generate raised inside the prompt hook, and RWKV got
the prompt again before every new token."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import models

transformers = pytest.importorskip("transformers")

N = 3


def mamba():
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=models.VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2)
    return transformers.MambaForCausalLM(cfg).eval()


def rwkv():
    torch.manual_seed(0)
    cfg = transformers.RwkvConfig(vocab_size=models.VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                  intermediate_size=64, context_length=64)
    return transformers.RwkvForCausalLM(cfg).eval()


def with_prompt(make):
    base, ours = make().requires_grad_(False), make()  # frozen as inject leaves ours (Mamba rounds
    # differently with trainable weights, by ~1e-7: measured, not ours)
    lowrank.inject(ours, lowrank.PromptConfig(num_virtual_tokens=N))
    prompt = ours.get_input_embeddings().prompts["default"]  # (n, d)
    return base, ours, prompt


def test_mamba_generates_with_its_state_as_from_the_prompt_embeddings():
    base, ours, prompt = with_prompt(mamba)
    ids = models.ids(2, 6)
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)  # [P; E(x)]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    out = ours.generate(input_ids=ids, **kwargs)
    want = base.generate(inputs_embeds=embeds, **kwargs)  # transformers' own generate, the prompt as embeddings
    assert torch.equal(out.sequences[:, ids.shape[1]:], want.sequences)
    for a, b in zip(out.logits, want.logits):
        assert torch.equal(a, b)  # the same calls on the same tensors


def test_rwkv_decode_steps_continue_its_state_without_the_prompt_again():
    base, ours, prompt = with_prompt(rwkv)
    ids, new = models.ids(2, 6), models.ids(2, 1, seed=2)
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    first = base(inputs_embeds=embeds, use_cache=True)
    want = base(input_ids=new, state=first.state, use_cache=True).logits
    first = ours(input_ids=ids, use_cache=True)
    assert first.logits.shape[1] == N + ids.shape[1]
    assert torch.equal(ours(input_ids=new, state=first.state, use_cache=True).logits, want)
