"""DoRA on a convolution and on an embedding under CPU bf16 autocast, with and without a training
dropout, and with a plain LoRA adapter active before it (the DoRA rescales the output so far):
PEFT 0.21's outputs bit for bit, dtype included (tests/peers/test_peft_dora_conv.py and
test_peft_dora_embedding.py have the plain cases)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import lowrank  # noqa: E402
from lowrank.inject import set_active  # noqa: E402

CASES = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 5, 5)),
    "embedding": (lambda: nn.Embedding(9, 5), lambda: torch.tensor([[1, 2, 8], [0, 4, 4]])),
}


def _key(k):  # PEFT's m is a module's weight: "...lora_magnitude_vector.<name>.weight"
    return k.removeprefix("base_model.model.").removesuffix(".weight" if "magnitude" in k else "")


def theirs_and_ours(case, dropout, with_lora):
    torch.manual_seed(0)
    make, data = CASES[case]
    base = nn.Sequential(make())
    dora = dict(r=2, target_modules=["0"], use_dora=True, lora_dropout=dropout)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**dora), adapter_name="d")
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=["0"], dora=True, dropout=dropout), "d")
    if with_lora:  # a plain adapter first: DoRA rescales its addition too, as PEFT's running result
        theirs.add_adapter("l", peft.LoraConfig(r=2, target_modules=["0"]))
        theirs.base_model.set_adapter(["l", "d"])
        lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=["0"]), "l")
        set_active(ours, ["l", "d"])
    g, mine = torch.Generator().manual_seed(3), dict(ours.named_parameters())
    with torch.no_grad():
        for k, p in theirs.named_parameters():
            if "lora_" in k:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                mine[_key(k)].copy_(p)
    return data(), theirs, ours


@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("case", list(CASES))
def test_under_bf16_autocast_as_peft(case, dropout, with_lora):
    x, theirs, ours = theirs_and_ours(case, dropout, with_lora)
    theirs.train(dropout > 0), ours.train(dropout > 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        want = theirs(x)
        torch.manual_seed(1)
        got = ours(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
