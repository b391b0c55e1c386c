"""Position ids given by the caller (as generate passes them) that a prefix shifts past a table
of position embeddings: the error names the count and the limit, as without position ids, and
not an IndexError inside the embedding. A left-padded row, whose padding takes no position,
still runs when its largest position fits."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import models

transformers = pytest.importorskip("transformers")

P, TABLE = 4, 16


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=models.VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=TABLE,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=P))
    return model


def test_given_positions_past_the_table_are_named():
    model = gpt2()
    ids = models.ids(1, TABLE - P + 1)  # P + T = 17 positions, the table holds 16
    with pytest.raises(ValueError, match=rf"needs {TABLE + 1} positions, but GPT2LMHeadModel's position embeddings "
                                         rf"hold {TABLE} \(max_position_embeddings={TABLE}\)"):
        model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None])


def test_generate_past_the_table_is_named():
    model = gpt2()
    ids = models.ids(1, 10)  # 4 + 10 + 2 new tokens fit; the third new one would take position 16
    with pytest.raises(ValueError, match=rf"needs {TABLE + 1} positions.*hold {TABLE}"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                       pad_token_id=0)


def test_given_positions_that_fit_run_as_without_them():
    model = gpt2()
    ids = models.ids(2, TABLE - P)  # exactly the table: positions P .. 15
    positions = torch.arange(ids.shape[1])[None]
    assert torch.equal(model(input_ids=ids, position_ids=positions).logits, model(input_ids=ids).logits)
    # past + P + T = 18 > 16, but row 0's two padding tokens take no position: its largest is P + 11 = 15
    ids = models.ids(1, TABLE - P + 2)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    alone = model(input_ids=ids[:, 2:]).logits
    # the row alone: the same positions and keys; the masked padding keys add exact zeros, but the
    # attention's sums are blocked differently over 2 more keys: float32 rounding of a few reductions
    # of width <= 32, at most 32 * eps32 * the largest logit
    tol = 32 * torch.finfo(torch.float32).eps * alone.abs().max()
    assert ((out[:, 2:] - alone).abs() <= tol).all()
