"""The reference implementation of every `lowrank::` op: the codec of lowrank/quant/nf4.py
and plain PyTorch. It runs on every device, is the fallback wherever no faster kernel is
registered, and is the oracle of every kernel test (tests/ops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import nf4
from ..quant.nf4_weight import NF4Weight
from . import backends


def _weight(packed, absmax, nested_absmax, offset, shape, blocksize, dtype) -> NF4Weight:
    # the ops check sizes by numel, so packed may come as bitsandbytes stores it, (bytes, 1), and the
    # offset as (1, 1): NF4Weight keeps its fields flat, as the codec's arithmetic expects
    return NF4Weight(packed, absmax, torch.Size(shape), dtype, blocksize, nested_absmax, offset)


@backends.register("nf4_dequantize", "reference")
def nf4_dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, dtype):
    return nf4.dequantize(_weight(packed, absmax, nested_absmax, offset, shape, blocksize, dtype))


@backends.register("nf4_linear", "reference")
def nf4_linear(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias):
    w = nf4.dequantize(_weight(packed, absmax, nested_absmax, offset, shape, blocksize, x.dtype))  # (N, K)
    return F.linear(x, w, bias)  # (..., K) @ (K, N) -> (..., N)


@backends.register("nf4_linear_grad_input", "reference")
def nf4_linear_grad_input(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize):
    w = nf4.dequantize(_weight(packed, absmax, nested_absmax, offset, shape, blocksize, grad_y.dtype))  # (N, K)
    return grad_y @ w  # (..., N) @ (N, K) -> (..., K)
