"""DoRA on nn.Embedding beyond PEFT's cases (tests/peers/test_peft_dora_embedding.py): a per-sample
route computes each sample as the active adapter does, an all-zero embedding dimension is refused
as a zero row is on a linear layer, and a Llama's embed_tokens with DoRA round-trips through PEFT's
files with its other layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank import io as lio
from lowrank.inject import per_sample
from tests.tuners import models

EPS = torch.finfo(torch.float32).eps


def test_a_per_sample_route_computes_the_active_adapter_s_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 5))
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"], dora=True), "a")
    models.randomize_adapters(model)
    ids = torch.tensor([[1, 4, 8], [0, 2, 2]])
    with torch.no_grad():
        want = model(ids)
        with per_sample(model, ["a", "__base__"]):
            got = model(ids)
    # (m/n - 1) y + (m/n) s A^T[ids] B^T summed onto y, against (m/n) y + ...: one rounding of y's scale apart
    assert torch.allclose(got[0], want[0], rtol=0, atol=4 * EPS * float(want.abs().max()))
    assert torch.equal(got[1], model[0].base(ids[1]))


def test_an_all_zero_embedding_dimension_is_refused_naming_it():
    emb = nn.Embedding(9, 5)
    with torch.no_grad():
        emb.weight[:, 3] = 0  # dimension 3 is 0 for every token: m = ||E^T||_c = 0 there
    model = nn.Sequential(emb)
    with pytest.raises(ValueError, match=r"DoRA cannot go on '0': 1 of its 5 output rows of W0 are all zeros \(rows \[3\]\)"):
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"], dora=True))
    assert type(model[0]) is nn.Embedding


def test_a_llama_s_embed_tokens_round_trips_through_peft_s_files(tmp_path):
    peft = pytest.importorskip("peft")
    base = models.llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["embed_tokens", "q_proj"], use_dora=True))
    models.randomize_adapters(theirs)
    theirs.eval().save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    lio.load_adapter(ours, tmp_path / "p")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    lio.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours(ids).logits)
