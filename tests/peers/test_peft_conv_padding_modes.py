"""LoRA on a convolution that pads with reflect / replicate / circular: lowrank's A pads as the
convolution does (docs/lora.md), PEFT 0.21's with zeros, so an adapter file that goes between them
computes otherwise near the borders, and did so silently. load_adapter and save_adapter now warn,
naming the modules and their padding; convolutions padded with zeros stay equal to PEFT, bit for
bit, with no warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import lowrank  # noqa: E402
from lowrank import io as lio  # noqa: E402
from tests.tuners import models  # noqa: E402

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def conv(padding_mode):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_a_file_for_a_convolution_not_padded_with_zeros_warns_both_ways(mode, tmp_path):
    base = conv(mode)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0", "2"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=rf"padded otherwise than with zeros \(\{{'0': '{mode}'\}}\).*PEFT 0.21 with zeros"):
        lio.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert not torch.equal(ours(X), theirs.eval()(X))  # what the warning is about

    with pytest.warns(UserWarning, match=rf"save_adapter of 'default'.*\{{'0': '{mode}'\}}"):
        lio.save_adapter(ours, tmp_path / "ours")


def test_convolutions_padded_with_zeros_are_equal_to_peft_without_a_warning(tmp_path):
    base = conv("zeros")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0", "2"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lio.load_adapter(ours, tmp_path / "peft")
        lio.save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(ours(X), theirs.eval()(X))
    assert lowrank.adapter_names(ours) == ["default"]
