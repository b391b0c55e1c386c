"""nn.TransformerDecoder: the default targets are the self-attention modules, also once a prefix
sits on the cross-attention (`multihead_attn`, by targets=). Its PrefixLayer hid the cross-attention
from the check, so a second prefix with the default targets went on the cross-attention too; and
saving the cross-attention prefix was refused as "on 2 of the model's 4 attention modules" (it has
two self-attention modules), where the check by count would have let through a file that
load_adapter puts on the self-attention. It is refused naming both places now."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank


def decoder():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    return nn.TransformerDecoder(layer, num_layers=2).eval()


SELF = ["layers.0.self_attn", "layers.1.self_attn"]
CROSS = ["layers.0.multihead_attn", "layers.1.multihead_attn"]


def test_default_targets_stay_the_self_attention_beside_a_cross_attention_prefix(tmp_path):
    model = decoder()
    base = copy.deepcopy(model)
    assert lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3, targets=["multihead_attn"]), "cross") == CROSS
    assert lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3), "self") == SELF
    with pytest.raises(ValueError, match=r"prefix adapter 'cross' is on \['layers.0.multihead_attn', "
                                         r"'layers.1.multihead_attn'\], but .* the default targets "
                                         r"\['layers.0.self_attn', 'layers.1.self_attn'\]"):
        lowrank.save_adapter(model, tmp_path / "cross", name="cross")
    assert not (tmp_path / "cross").exists()
    lowrank.save_adapter(model, tmp_path / "self", name="self")
    lowrank.load_adapter(base, tmp_path / "self")
    lowrank.set_active(model, "self")
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    assert torch.equal(base(tgt, memory), model(tgt, memory))  # the same prefixes on the same modules
