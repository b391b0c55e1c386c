"""save_quantized of a model whose 4-bit layers are still on the meta device (built from meta
weights, Linear4bit.from_linear of a meta nn.Linear, or a skeleton not loaded yet) is refused by
name before anything is written; it raised torch's 'Cannot copy out of meta tensor; no data!'."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from lowrank.quant.linear4bit import Linear4bit


def test_meta_4bit_layers_are_refused_naming_the_tensor(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 32)), Linear4bit.from_linear(nn.Linear(32, 8, device="meta")))
    with pytest.raises(ValueError, match=r"'1\.weight' is on the meta device, with no values to write .*"
                                         r"lowrank\.load_quantized\(model, path\)"):
        lowrank.save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []
    model[1] = Linear4bit.from_linear(nn.Linear(32, 8))  # loaded: written as before
    files = lowrank.save_quantized(model, tmp_path / "q")
    assert files and all((tmp_path / "q" / f).is_file() for f in files)
