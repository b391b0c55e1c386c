"""Prompt tuning on an extractive QA model (BertForQuestionAnswering): the answer span's
start_positions / end_positions index the text, which sits n tokens later in [P; x], so they
move by n, and the loss is the model's own on the prompted sequence with the span moved.
Before, the call raised ("does not know how to lengthen argument(s) ['start_positions', ...]").
PEFT 0.21 passes them unmoved, scoring the span n tokens too early (inside the prompt)."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import models

transformers = pytest.importorskip("transformers")

N = 3


def bert_qa():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForQuestionAnswering(cfg).eval()


def test_the_answer_span_moves_with_the_text():
    base, ours = bert_qa(), bert_qa()
    lowrank.inject(ours, lowrank.PromptConfig(num_virtual_tokens=N))
    prompt = ours.get_input_embeddings().prompts["default"]  # (n, d)
    ids = models.ids(2, 8)
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    types[:, 4:] = 1
    start, end = torch.tensor([4, 5]), torch.tensor([6, 7])
    out = ours(input_ids=ids, attention_mask=mask, token_type_ids=types, start_positions=start, end_positions=end)
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)  # [P; E(x)]
    want = base(inputs_embeds=embeds, attention_mask=torch.ones(2, N + 8, dtype=torch.long),
                token_type_ids=torch.cat([torch.zeros(2, N, dtype=torch.long), types], dim=1),
                start_positions=start + N, end_positions=end + N)
    assert torch.equal(out.start_logits, want.start_logits)
    assert torch.equal(out.loss, want.loss)  # the same computation on the same tensors
    assert torch.equal(start, torch.tensor([4, 5]))  # the caller's tensors are not changed
