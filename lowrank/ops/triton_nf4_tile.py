"""Decoding a tile of an NF4 weight inside a Triton kernel: the one place every Triton
kernel of lowrank turns packed codes and double-quantized scales into numbers.

    W[n, k] = NF4[code(i)] * scale(i // blocksize),   i = n*K + k  (row-major flat index)
    scale(b) = DYNAMIC[qabsmax[b]] * nested_absmax[b // 256] + offset      (double quant)
             = absmax[b]                                                  (otherwise)

each product and sum rounded to float32 in that order, as lowrank.quant.nf4.dequantize_scales
does, so a decoded tile is bit-exact with the reference before it is cast to the compute
dtype (tests/ops/test_triton_dequantize.py checks it with torch.equal).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant import nf4
from . import backends

# Note: no fused multiply-add. scale = dyn * nested + offset must round the product before
# the sum to match the reference; Triton contracts a*b+c into one FMA by default
# (TRITON_DEFAULT_FP_FUSION), which rounds once and changes the last bit of some scales.
# Every lowrank Triton kernel is launched with these options. The matmuls lose nothing:
# tl.dot runs on the tensor cores whatever this flag says, and a GEMV is memory-bound.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1): then the
    kernels get one small fixed config, so tests stay fast (see Note: autotune lists)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Note: rounding to bfloat16 in the interpreter. Triton 3.9's interpreter converts float32
# to bfloat16 with ties rounded away from zero (and no carry into the exponent), unlike the
# GPU's round-to-nearest-even; torch rounds to nearest even. So under the interpreter
# `to_dtype` rounds by hand with integer ops (exact RNE for finite values); on a GPU it
# is the native conversion. Both are checked bit for bit (tests/ops, CPU and gpu-marked).
_INTERPRET = tl.constexpr(interpreting())


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """float32 x rounded to nearest even in `dtype`. See Note: rounding to bfloat16 in the interpreter."""
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even at bit 16
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. # Note: bfloat16 dot in the interpreter. Triton
    3.9's interpreter multiplies bfloat16 operands as their raw 16-bit integers, so there
    the (exact) float32 upcasts go to tl.dot: the same products, accumulated in float32."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def code_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 values (16,), dynamic map (256,)) as float32 on `device`, copied there once:
    the kernels read them with gathers that stay in L1/L2."""
    if device not in _TABLES:
        _TABLES[device] = (nf4.NF4_CODE.to(device), nf4.DYNAMIC_CODE.to(device))
    return _TABLES[device]


# Note: two ways to look up an NF4 value. "gather" loads NF4[code] from a 16-entry table in
# global memory (it stays in L1): one load instruction an element. "select" picks the value
# out of 16 constants with a tree of 15 selects on the code's bits: no memory traffic, more
# instructions. Which is faster depends on the kernel and the GPU, so the launchers pass
# LOOKUP as a compile-time constant; benchmarks/bench_nf4_linear.py times both. Both are exact.
LOOKUPS = ("gather", "select")
LOOKUP = "gather"  # what the launchers pass (benchmarks set it; see the Note)

(_V0, _V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10, _V11, _V12, _V13, _V14, _V15) = (
    tl.constexpr(float(v)) for v in nf4.NF4_CODE.tolist()  # float32 values, exact as Python floats
)


def lookup() -> str:
    """LOOKUP, checked: the value each launcher passes to its kernel."""
    if LOOKUP not in LOOKUPS:
        raise ValueError(f"triton_nf4_tile.LOOKUP must be one of {LOOKUPS}, got {LOOKUP!r}")
    return LOOKUP


@triton.jit
def nf4_value(code, nf4_ptr, LOOKUP: tl.constexpr):
    """NF4[code] in float32 for an int32 tensor of codes 0..15. See Note: two ways to look up an NF4 value."""
    if LOOKUP == "select":
        b0 = (code & 1) != 0
        b1 = (code & 2) != 0
        b2 = (code & 4) != 0
        p0 = tl.where(b0, _V1, _V0)
        p1 = tl.where(b0, _V3, _V2)
        p2 = tl.where(b0, _V5, _V4)
        p3 = tl.where(b0, _V7, _V6)
        p4 = tl.where(b0, _V9, _V8)
        p5 = tl.where(b0, _V11, _V10)
        p6 = tl.where(b0, _V13, _V12)
        p7 = tl.where(b0, _V15, _V14)
        q0 = tl.where(b1, p1, p0)
        q1 = tl.where(b1, p3, p2)
        q2 = tl.where(b1, p5, p4)
        q3 = tl.where(b1, p7, p6)
        r0 = tl.where(b2, q1, q0)
        r1 = tl.where(b2, q3, q2)
        return tl.where((code & 8) != 0, r1, r0)
    else:
        return tl.load(nf4_ptr + code)


def row_aligned(k_in: int, blocksize: int) -> bool:
    """Whether every quantization block lies within one row of W[N, K] (K % blocksize == 0).

    # Note: two decode paths. When it holds (every Llama-style shape), a tile of BLOCK_K <=
    # blocksize columns starting at a multiple of BLOCK_K lies in ONE block per row: one
    # scale per row, and the codes of a row are whole bytes loaded contiguously. Otherwise
    # blocks straddle rows and a row may start in the middle of a byte: each element finds
    # its own byte, nibble and scale. Both are exact; the second only loads more.
    """
    return k_in % blocksize == 0


@triton.jit
def decode_scale(
    absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,  # pointers
    block, mask,  # block indices (any shape) and where they are valid
    DOUBLE_QUANT: tl.constexpr,
):
    """float32 scale of each quantization block in `block`; 0 where masked."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)  # uint8 code into the dynamic map
        value = tl.load(dyn_ptr + q)  # always in 0..255
        nested = tl.load(nested_ptr + block // 256, mask=mask, other=0.0)
        # See Note: no fused multiply-add.
        scale = value * nested + tl.load(offset_ptr)
        return tl.where(mask, scale, 0.0)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def load_w_pairs(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr,  # pointers
    offs_n, k0, N, K,  # rows of the tile, its first column, size of W
    BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, LOOKUP: tl.constexpr,
):
    """(even, odd): W[offs_n, k0 + 2j] and W[offs_n, k0 + 2j + 1] for j < BLOCK_K / 2, in float32,
    bit-exact with the reference; 0 for rows past N. Two (len(offs_n), BLOCK_K / 2) tiles, the
    high and low nibbles of the same bytes. Rows aligned to blocks only (ROW_ALIGNED): one scale
    a row. See Note: two decode paths."""
    row = offs_n.to(tl.int64) * K  # (BN,) flat index of W[n, 0]
    mask_n = offs_n < N  # (BN,)
    # whole bytes: columns k0 + 2j and k0 + 2j + 1 share byte (row + k0) / 2 + j
    byte_idx = (row + k0)[:, None] // 2 + tl.arange(0, BLOCK_K // 2)[None, :]  # (BN, BK/2)
    byte = tl.load(packed_ptr + byte_idx, mask=mask_n[:, None], other=0)
    scale = decode_scale(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, (row + k0) // BLOCKSIZE, mask_n, DOUBLE_QUANT)  # (BN,)
    even = nf4_value((byte >> 4).to(tl.int32), nf4_ptr, LOOKUP)  # the high nibble comes first
    odd = nf4_value((byte & 0xF).to(tl.int32), nf4_ptr, LOOKUP)
    return even * scale[:, None], odd * scale[:, None]


@triton.jit
def load_w_tile(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr,  # pointers
    offs_n, k0, N, K,  # rows of the tile, its first column, size of W
    BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    LOOKUP: tl.constexpr,
):
    """W[offs_n, k0 : k0 + BLOCK_K] in float32, bit-exact with the reference; 0 outside W.
    Returns a (len(offs_n), BLOCK_K) tile. See Note: two decode paths."""
    if ROW_ALIGNED:
        even, odd = load_w_pairs(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, offs_n, k0, N, K,
                                 BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, LOOKUP)
        return tl.interleave(even, odd)  # (BN, BK)
    else:
        row = offs_n.to(tl.int64) * K  # (BN,) flat index of W[n, 0]
        mask_n = offs_n < N  # (BN,)
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        mask = mask_n[:, None] & (offs_k < K)[None, :]  # (BN, BK)
        idx = row[:, None] + offs_k[None, :]  # (BN, BK) flat index
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0)
        shift = ((1 - idx % 2) * 4).to(tl.uint8)  # even index: high nibble
        value = nf4_value(((byte >> shift) & 0xF).to(tl.int32), nf4_ptr, LOOKUP)
        scale = decode_scale(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, idx // BLOCKSIZE, mask, DOUBLE_QUANT)  # (BN, BK)
        return value * scale


def weight_args(packed, absmax, nested_absmax, offset):
    """The pointer arguments of load_w_tile, in order; a placeholder where there is no
    double quantization (the kernel never reads it then). The kernels index the fields as flat
    arrays, so a strided field (the ops accept any layout) is copied to a contiguous one."""
    packed, absmax, nested_absmax, offset = backends.contiguous_fields(packed, absmax, nested_absmax, offset)
    nf4_values, dynamic = code_tables(packed.device)
    double_quant = nested_absmax is not None
    nested = nested_absmax if double_quant else absmax
    off = offset if double_quant else absmax
    return (packed, absmax, nested, off, nf4_values, dynamic), double_quant
