"""DoRA on nn.Embedding, with PEFT 0.21 as the oracle: inject refused it ("DoRA is implemented for
linear-like layers only"), so PEFT's DoRA files with embed_tokens could not be loaded. Now m is
PEFT's (dim,) (the norm of each embedding dimension over the vocabulary), the forward (the
output rescaled, plus the addition) and its gradients are PEFT's bit for bit after copying the
same factors and magnitude, merge writes PEFT's table, and files go both ways
(lowrank/tuners/lora.py, Note: DoRA on an embedding)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import lowrank  # noqa: E402
from lowrank.export import merged_weight  # noqa: E402
from tests.peers.both_ways import files_go_both_ways  # noqa: E402
from tests.tuners import models  # noqa: E402


class Scaled(nn.Embedding):
    """Gemma's scaled word embedding: the rows times embed_scale."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(2.5), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def _key(k):  # PEFT's m is a module's weight: "...lora_magnitude_vector.default.weight"
    return k.removeprefix("base_model.model.").removesuffix(".weight" if "magnitude" in k else "")


def theirs_and_ours(make=lambda: nn.Embedding(11, 6, padding_idx=0), dtype=torch.float32, adapter_dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Sequential(make()).to(dtype)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"],
                                                                       use_dora=True),
                                 autocast_adapter_dtype=adapter_dtype == torch.float32)
    models.randomize_adapters(theirs)
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, alpha=3, targets=["0"], dora=True), dtype=adapter_dtype)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for k, p in theirs.named_parameters():
            if "lora_" in k:
                mine[_key(k)].copy_(p)  # same names, same shapes, or KeyError / error
    ids = torch.tensor([[3, 0, 7, 10], [1, 1, 5, 2]])
    return base, ids, theirs, ours


def test_a_fresh_magnitude_is_peft_s():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(11, 6))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=["0"], dora=True))
    want = theirs.base_model.model[0].lora_magnitude_vector["default"].weight
    assert ours[0].lora_magnitude_vector["default"].shape == want.shape == (6,)
    assert torch.equal(ours[0].lora_magnitude_vector["default"], want)


@pytest.mark.parametrize("make", [lambda: nn.Embedding(11, 6, padding_idx=0), lambda: Scaled(11, 6)],
                         ids=["padding_idx", "embed_scale"])
def test_forward_and_gradients_are_peft_s_bit_for_bit(make):
    base, ids, theirs, ours = theirs_and_ours(make)
    theirs.train(), ours.train()
    want, got = theirs(ids), ours(ids)
    assert torch.equal(got, want)
    assert not torch.equal(got, base(ids))
    want.square().sum().backward()
    got.square().sum().backward()
    grads = {_key(k): p.grad for k, p in theirs.named_parameters() if "lora_" in k}
    for k, p in ours.named_parameters():
        if "lora_" in k:
            assert torch.equal(p.grad, grads[k]), k


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_a_bf16_table_is_peft_s_bit_for_bit(adapter_dtype):
    _, ids, theirs, ours = theirs_and_ours(dtype=torch.bfloat16, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        want, got = theirs.eval()(ids), ours.eval()(ids)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_merge_and_unmerge_as_peft():
    base, ids, theirs, ours = theirs_and_ours()
    with torch.no_grad():
        exported = merged_weight(ours[0])  # merge_and_export's
        unmerged = ours.eval()(ids)
        want = theirs.merge_and_unload()[0].weight
        lowrank.merge(ours)
        assert torch.equal(ours[0].base.weight, want) and torch.equal(exported, want)
        out = ours(ids)
        assert torch.allclose(out, unmerged, rtol=0, atol=8 * torch.finfo(torch.float32).eps * float(unmerged.abs().max()))
        lowrank.unmerge(ours)
        assert torch.allclose(ours[0].base.weight, base[0].weight, rtol=1e-6, atol=1e-6)


def test_files_go_both_ways(tmp_path):
    base, ids, theirs, ours = theirs_and_ours()
    files_go_both_ways(base, ids, theirs, ours, tmp_path)
