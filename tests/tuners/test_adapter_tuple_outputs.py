"""A module that returns a namedtuple, or one of torch's structseqs (torch.return_types.max: `values`,
`indices`), keeps returning that type under a bottleneck adapter, its first item adapted: the adapter
rebuilt a plain tuple, and the caller's `out.hidden` / `out.values` raised AttributeError (a structseq
has no `_fields`, and its constructor takes one sequence). A plain tuple stays a plain tuple."""

import collections

import pytest
import torch
from torch import nn

from lowrank.config import AdapterConfig
from lowrank.inject import inject

Out = collections.namedtuple("Out", "hidden aux")


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return Out(self.lin(x), x.sum())


class Structseq(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.stack((self.lin(x), x)).max(dim=0)  # values and indices, each x's shape


class Model(nn.Module):
    def __init__(self, block: nn.Module, fields: tuple[str, str]):
        super().__init__()
        self.block, self.fields = block, fields

    def forward(self, x):
        out = self.block(x)
        return getattr(out, self.fields[0]) * 2 + getattr(out, self.fields[1])  # its own code reads them by name


@pytest.mark.parametrize("block, fields", [(Named, ("hidden", "aux")), (Structseq, ("values", "indices"))],
                         ids=["namedtuple", "structseq"])
@pytest.mark.parametrize("parallel", [False, True])
def test_a_tuple_like_output_keeps_its_type(block, fields, parallel):
    torch.manual_seed(0)
    model, x = Model(block(), fields), torch.randn(2, 5, 8)
    base = model.block(x)
    inject(model, AdapterConfig(targets="block", parallel=parallel, bottleneck_size=2))
    adapter = model.block.adapters["default"]
    nn.init.normal_(adapter.up.weight)
    with torch.no_grad():
        out = model.block(x)
        first, second = fields
        assert type(out) is type(base) and torch.equal(getattr(out, second), getattr(base, second))
        source = x if parallel else getattr(base, first)  # what the adapter reads
        assert torch.equal(getattr(out, first), getattr(base, first) + adapter(source))
        assert torch.equal(model(x), getattr(out, first) * 2 + getattr(out, second))


def test_a_plain_tuple_stays_a_plain_tuple():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    holder = nn.ModuleDict({"attn": mha})
    inject(holder, AdapterConfig(targets="attn"))
    x = torch.randn(2, 3, 8)
    out = holder["attn"](x, x, x)
    assert type(out) is tuple and len(out) == 2
