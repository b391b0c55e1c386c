"""Prompt tuning on a decoder with cross-attention (BertLMHeadModel with add_cross_attention, GPT-2
with add_cross_attention, the decoders of bert2bert / vision-encoder-decoder setups): the encoder's
states and mask are not indexed by the decoder's positions and pass through unchanged; the call
equals the model's own on [P; E(x)]. Before, it raised ("does not know how to lengthen argument(s)
['encoder_hidden_states']")."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import models

transformers = pytest.importorskip("transformers")

N = 3


def decoder(kind):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, is_decoder=True,
                                      add_cross_attention=True, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        return transformers.BertLMHeadModel(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=models.VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  add_cross_attention=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_the_encoder_states_pass_through(kind):
    base, ours = decoder(kind), decoder(kind)
    lowrank.inject(ours, lowrank.PromptConfig(num_virtual_tokens=N))
    prompt = ours.get_input_embeddings().prompts["default"]  # (n, d)
    ids = models.ids(2, 6)
    encoded = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(3))
    encoded_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = ours(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=encoded,
               encoder_attention_mask=encoded_mask, labels=ids)
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)  # [P; E(x)]
    want = base(inputs_embeds=embeds, attention_mask=torch.ones(2, N + 6, dtype=torch.long),
                encoder_hidden_states=encoded, encoder_attention_mask=encoded_mask,
                labels=torch.cat([torch.full((2, N), -100), ids], dim=1))
    assert torch.equal(out.logits, want.logits)  # the same computation on the same tensors
    assert torch.equal(out.loss, want.loss)
