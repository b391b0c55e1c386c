"""A module returning one of torch's structseqs (torch.return_types.max: `values`, `indices`)
keeps returning that type under a bottleneck adapter, its first item adapted, as a namedtuple
output already did: the adapter rebuilt a plain tuple (a structseq has no `_fields`, and its
constructor takes one sequence), so the caller's `out.values` raised AttributeError."""

import pytest
import torch
from torch import nn

from lowrank.config import AdapterConfig
from lowrank.inject import inject


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.stack((self.lin(x), x)).max(dim=0)  # values and indices, each x's shape


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = Gate()

    def forward(self, x):
        out = self.pool(x)
        return out.values * 2 + out.indices


@pytest.mark.parametrize("parallel", [False, True])
def test_a_structseq_output_stays_one(parallel):
    torch.manual_seed(0)
    model, x = Model(), torch.randn(2, 5, 8)
    base = model.pool(x)
    inject(model, AdapterConfig(targets=["pool"], parallel=parallel, bottleneck_size=4))
    up = model.pool.adapters["default"].up
    nn.init.normal_(up.weight)
    with torch.no_grad():
        out = model.pool(x)
        assert type(out) is type(base)
        assert torch.equal(out.indices, base.indices)
        source = x if parallel else base.values  # what the adapter reads
        assert torch.equal(out.values, base.values + model.pool.adapters["default"](source))
        assert torch.equal(model(x), out.values * 2 + out.indices)
