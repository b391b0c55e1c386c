"""inject's refusal of LoraConfig(parameters=...) that match nothing adds a hint where a name is
a 4-bit linear layer's weight (packed codes, no parameter): name the layer in targets=. The
hint came with every model that had any 4-bit layer, so a typo in another parameter's name (a
4-bit Mixtral's experts) was answered with "name the layer in targets=" and 4-bit layers it
never named. It now names only the 4-bit layers whose weight the names match."""

from __future__ import annotations

import pytest
import torch

import lowrank


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.experts = torch.nn.Parameter(torch.randn(2, 16, 16))  # a parameter that LoRA can take

    def forward(self, x):
        return self.proj(x) + (x @ self.experts).sum(0)


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(Block(), Block())
    lowrank.quantize(model, lowrank.NF4Config(skip=[]))  # each proj in 4 bits, the experts dense
    return model


def test_a_typo_in_another_parameter_gets_no_4bit_hint():
    model = _model()
    with pytest.raises(ValueError, match=r"matched parameters=\('0.expert',\)") as e:
        lowrank.inject(model, lowrank.LoraConfig(r=2, parameters=["0.expert"]))
    assert "4-bit" not in str(e.value) and "targets=" not in str(e.value)
    assert lowrank.inject(model, lowrank.LoraConfig(r=2, targets=None, parameters=["0.experts"])) == ["0.experts"]


def test_the_hint_names_the_4bit_layers_the_names_match():
    model = _model()
    with pytest.raises(ValueError, match=r"a 4-bit linear layer's weight \(e.g. of \['1.proj'\]\) is no parameter"):
        lowrank.inject(model, lowrank.LoraConfig(r=2, parameters=["1.proj.weight"]))
