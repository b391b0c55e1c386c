"""Linear4bit.load_state_dict without assign writes the checkpoint into the tensors the layer
holds, as torch's param.copy_ does. It made new tensors for every layer: loading a state dict
that holds the model's own tensors (model.state_dict(), or torch.distributed.checkpoint's, which
reads into them and then calls load_state_dict) kept both, doubling the 4-bit model's memory for
the load, and replaced the layer's Parameter objects. A checkpoint of another layout (blocksize,
double quantization) still loads into new tensors."""

from __future__ import annotations

import torch
from torch import nn

from lowrank.quant.linear4bit import Linear4bit


def _layer(seed: int, **kw) -> Linear4bit:
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(128, 64), **kw)


def test_a_load_writes_into_the_tensors_the_layer_holds():
    layer, other = _layer(0), _layer(1)
    params = dict(layer.named_parameters())
    storages = {n: p.data_ptr() for n, p in params.items()} | {"offset": layer.offset.data_ptr()}
    layer.load_state_dict(layer.state_dict())  # its own tensors: nothing new allocated
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} | {"offset": layer.offset.data_ptr()} == storages
    assert all(p is params[n] for n, p in layer.named_parameters())

    sd = other.state_dict()
    layer.load_state_dict(sd)  # another layer's values, in the same tensors, not shared with the dict
    assert all(p is params[n] for n, p in layer.named_parameters()) and layer.offset.data_ptr() == storages["offset"]
    assert layer.weight == other.weight and layer.packed.data_ptr() != sd["weight"].data_ptr()
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)  # the same bits, the same kernel


def test_another_layout_loads_into_new_tensors():
    layer, plain = _layer(0), _layer(1, double_quant=False)  # the checkpoint has no nested scales
    layer.load_state_dict(plain.state_dict())
    assert layer.weight == plain.weight and layer.nested_absmax is None and layer.offset is None
    small = _layer(2, blocksize=128)
    layer.load_state_dict(small.state_dict())
    assert layer.weight == small.weight and layer.blocksize == 128
