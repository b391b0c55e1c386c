"""PEFT's PROMPT_TUNING file names no module, and load_adapter puts its prompt where
PromptConfig's default targets do. A prompt injected elsewhere (targets=: a later encoder layer,
a second encoder) was saved all the same and loaded at the default place, computing something
else without a word; it is refused at save now, naming both places, and nothing is written.
A prompt at the default place, named explicitly, still round-trips exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank

N = 3


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


class TwoEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = encoder(), encoder()

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("make, target, default", [(encoder, "layers.1", "layers.0"), (TwoEncoders, "second", "first")])
def test_a_prompt_away_from_the_default_place_is_refused_at_save(tmp_path, make, target, default):
    model = make()
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N, targets=[target]))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match=rf"prompt adapter 'default' sits on '{target}'.*default targets do "
                                         rf"\('{default}' here\)"):
        lowrank.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]  # nothing written


def test_a_prompt_named_at_the_default_place_round_trips(tmp_path):
    base = encoder()
    model = copy.deepcopy(base)
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N, targets=["layers.0"]))
    lowrank.save_adapter(model, tmp_path / "a")
    lowrank.load_adapter(base, tmp_path / "a")
    x = torch.randn(2, 6, 32)
    assert torch.equal(base(x), model(x))  # the same prompt at the same place: the same computation
