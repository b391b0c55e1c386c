"""Multiple-choice models (BertForMultipleChoice, RobertaForMultipleChoice) take (B, choices, T)
token ids and call their inner model with them flattened to (B * choices, T). The prompt and the
prefix's position shift now leave the outer call alone and act on the inner one, which sees
(B, T)-shaped calls: before, the prompt raised a misleading attention-mask error and the prefix
numbered `choices` positions instead of T (a RuntimeError in BERT's embeddings)."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import models
from .test_prefix_positions import cache_path

transformers = pytest.importorskip("transformers")

B, C, T, N = 2, 3, 6, 3


def model(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    if kind == "bert":
        return transformers.BertForMultipleChoice(transformers.BertConfig(**common)).eval()
    return transformers.RobertaForMultipleChoice(transformers.RobertaConfig(**common, pad_token_id=1)).eval()


def batch():
    ids = torch.randint(2, models.VOCAB, (B, C, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 1, 4:] = 0  # one choice padded on the right
    ids[0, 1, 4:] = 1
    return ids, mask


def scores(mc, pooled):
    return mc.classifier(pooled).view(B, C)  # what the model does with its inner model's pooled output


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_a_prompt_goes_before_each_choice(kind):
    base, ours = model(kind), model(kind)
    lowrank.inject(ours, lowrank.PromptConfig(num_virtual_tokens=N))
    prompt = ours.get_input_embeddings().prompts["default"]  # (n, d)
    ids, mask = batch()
    flat, flat_mask = ids.view(-1, T), mask.view(-1, T)
    inner = base.base_model
    embeds = torch.cat([prompt.expand(B * C, -1, -1), inner.get_input_embeddings()(flat)], dim=1)  # [P; E(x)]
    want = scores(base, inner(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(B * C, N, dtype=torch.long),
                                                                              flat_mask], 1)).pooler_output)
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_a_prefix_numbers_each_choice_as_a_sequence(kind):
    base, ours = model(kind), model(kind)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=N))
    ids, mask = batch()
    flat, flat_mask = ids.view(-1, T), mask.view(-1, T)
    # transformers' own cache path (the prefix as N past tokens) on the flattened call: it numbers positions
    want = scores(base, cache_path(base.base_model, ours, input_ids=flat, attention_mask=flat_mask).pooler_output)
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, want)
