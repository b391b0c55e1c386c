"""Operands the CUDA kernel tests compare against (test_cuda_kernels.py on a GPU, test_cuda_emulated.py
on the CPU emulator)."""

from __future__ import annotations

import torch

from lowrank.quant import nf4


def lut_operand(q, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) float64 on q's device: what mma-lut multiplies, T(NF4[code]) * scale, exact in float64
    (csrc/nf4_cuda_gemv_lut.cu, Note: pairs and block sums)."""
    n, k = q.shape
    codes = nf4.unpack(q.packed, n * k).long()
    scales = q.absmax if q.nested_absmax is None else nf4.dequantize_scales(q.absmax, q.nested_absmax, q.offset)
    per_weight = scales.double().repeat_interleave(q.blocksize)[: n * k]
    return (nf4.NF4_CODE.to(q.packed.device, dtype).double()[codes] * per_weight).reshape(n, k)
