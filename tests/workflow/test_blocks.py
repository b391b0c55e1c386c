"""decoder_blocks / compile_blocks (lowrank/workflow/model.py): which modules count as the
repeated blocks, and the error when a model names none. Compiling itself: tests/quant and
test_e2e.py."""

import pytest
import torch
from torch import nn

from lowrank.workflow.config import ConfigError
from lowrank.workflow.model import compile_blocks, decoder_blocks


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()  # a block class inside another block: not a block of its own

    def forward(self, x):
        return self.inner(x)


class Model(nn.Module):
    _no_split_modules = ["Outer", "Inner"]

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Outer(), Inner(), Outer()])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_the_outermost_blocks_in_order():
    model = Model()
    assert decoder_blocks(model) == list(model.layers)
    assert decoder_blocks(nn.Sequential(nn.Linear(2, 2))) == []


def test_compile_blocks_compiles_each_block_in_place():
    model = Model()
    x = torch.randn(3, 4)
    want = model(x)
    names = sorted(model.state_dict())
    torch._dynamo.reset()
    assert compile_blocks(model) == 3
    assert all(layer._compiled_call_impl is not None for layer in model.layers)
    assert model.head._compiled_call_impl is None and model.layers[0].inner._compiled_call_impl is None
    assert sorted(model.state_dict()) == names  # in place: no _orig_mod. prefix
    assert torch.equal(model(x), want)  # Inductor calls the same addmm for each Linear: the same numbers


def test_a_model_without_blocks_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"compile: Sequential names no decoder block class \(_no_split_modules\)"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2)))
