"""A 4-bit layer's load_state_dict of a state dict whose entries are on the meta device (the
state dict of a model built under lowrank.skeleton() or from meta weights, not loaded): the
quant state is a meta tensor too, and reading its JSON raised torch's bare NotImplementedError
'Cannot copy out of meta tensor; no data!' naming no key, for a layer with values and for a meta
layer alike. torch's nn.Linear lists such a copy among the load's errors (RuntimeError, with the
key) and copies meta into meta as a no-op; the 4-bit layers now do the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.quant.linear4bit import Linear4bit
from lowrank.quant.params4bit import quantize_parameter, stored


def _meta_layer() -> Linear4bit:
    with torch.device("meta"):
        dense = nn.Linear(128, 64)
    return Linear4bit.from_linear(dense)


def test_meta_entries_into_a_layer_with_values_are_a_load_error_naming_the_keys():
    with torch.device("meta"):
        dense = nn.Linear(128, 64)
    with pytest.raises(RuntimeError, match="Cannot copy out of meta tensor"):  # the peer: torch's own layer
        nn.Linear(128, 64).load_state_dict(dense.state_dict())
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 64))
    before = layer.weight.dequantize().clone()
    with pytest.raises(RuntimeError, match=r"(?s)Error\(s\) in loading state_dict for Linear4bit.*4-bit weight 'weight': "
                                           r"the checkpoint's entries are on the meta device.*'bias'"):
        layer.load_state_dict(_meta_layer().state_dict())
    assert torch.equal(layer.weight.dequantize(), before)  # the codes untouched


def test_meta_entries_into_a_meta_layer_are_a_no_op():
    layer = _meta_layer()
    layer.load_state_dict(_meta_layer().state_dict())
    assert layer.packed.is_meta and layer.shape == (64, 128)


def test_a_4bit_parameter_likewise():
    def owner(device):
        with torch.device(device):
            m = nn.Module()
            m.experts = nn.Parameter(torch.randn(2, 64, 64))
        quantize_parameter(m, "experts", 64, True, None)
        return m

    real, meta = owner("cpu"), owner("meta")
    with pytest.raises(RuntimeError, match="4-bit weight 'experts': the checkpoint's entries are on the meta device"):
        real.load_state_dict(meta.state_dict())
    assert not stored(real, "experts").packed.is_meta
    meta.load_state_dict(owner("meta").state_dict())
    assert stored(meta, "experts").packed.is_meta
