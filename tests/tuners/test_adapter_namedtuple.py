"""A module that returns a namedtuple keeps returning one under a bottleneck adapter (its first
item adapted): the adapter rebuilt a plain tuple, and the caller's `out.hidden` raised
AttributeError."""

import collections

import pytest
import torch
from torch import nn

from lowrank.config import AdapterConfig
from lowrank.inject import inject

Out = collections.namedtuple("Out", "hidden aux")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return Out(self.lin(x), x.sum())


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        out = self.block(x)
        return out.hidden * 2 + out.aux


@pytest.mark.parametrize("parallel", [False, True])
def test_a_namedtuple_output_stays_a_namedtuple(parallel):
    torch.manual_seed(0)
    model, x = Model(), torch.randn(2, 8)
    base = model.block(x)
    inject(model, AdapterConfig(targets="block", parallel=parallel, bottleneck_size=2))
    adapter = model.block.adapters["default"]
    nn.init.normal_(adapter.up.weight)
    out = model.block(x)
    assert type(out) is Out and torch.equal(out.aux, base.aux)
    with torch.no_grad():
        want = base.hidden + adapter(x if parallel else base.hidden)
    assert torch.equal(out.hidden, want)
    assert model(x).shape == (2, 8)  # the model's own code reads out.hidden


def test_a_plain_tuple_stays_a_plain_tuple():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    holder = nn.ModuleDict({"attn": mha})
    inject(holder, AdapterConfig(targets="attn"))
    x = torch.randn(2, 3, 8)
    out = holder["attn"](x, x, x)
    assert type(out) is tuple and len(out) == 2
