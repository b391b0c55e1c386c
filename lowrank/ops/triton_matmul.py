# out[M, N]    = x[M, K]      @ W[N, K]^T + bias[N]     (forward,  _linear_kernel)
# grad_x[M, K] = grad_y[M, N] @ W[N, K]                 (backward, _grad_input_kernel)
"""Triton kernels: matmuls against an NF4 weight that is decoded tile by tile inside the
reduction loop and never written to global memory (training and prefill, M > 64).

Both kernels are tiled matmuls with fp32 accumulation (tl.dot on the tensor cores). The
W tile of each step comes from triton_nf4_tile.load_w_tile: packed codes and the
double-quantized scales decoded in registers, rounded to the compute dtype exactly as the
reference rounds its dense W, then fed to tl.dot. The forward walks W along K (a tile of
BLOCK_N rows x BLOCK_K columns per step); the backward walks W along N (BLOCK_N rows x
BLOCK_K columns, the output tile's columns), the transposed access of the same weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import backends, triton_dequantize, triton_gemv
from .triton_nf4_tile import LAUNCH_OPTIONS, dot, interpreting, load_w_tile, lookup, row_aligned, to_dtype, weight_args

# See Note: autotune lists (triton_dequantize.py). Hopper: 128x128 / 128x256 tiles, 8 warps,
# 3-4 stages, the shapes Triton's own Hopper matmul tutorials settle on for bf16; BLOCK_K is
# not tuned but set by the launcher (see Note: BLOCK_K follows the blocksize).
_HOPPER = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_INTERPRETER = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2}, num_warps=4)]
_CONFIGS = _INTERPRETER if interpreting() else _HOPPER

# Note: fused or dequantize + cuBLAS. Above triton_gemv.MAX_M rows the op can run the fused
# kernels below (W decoded tile by tile, never in global memory) or dequantize W once with the
# Triton kernel and hand the product to torch (cuBLAS). On the H200 (docs/benchmarks.md) the
# fused kernels ran 20-30x slower than bf16 cuBLAS while a dequantize costs a fraction of one
# bf16 matmul at M = 4096, so the default is False; the fused path stays for a GPU whose
# memory cannot hold one dense W, and the tests and benchmarks run both.
FUSED = False
# SKINNY: up to triton_gemv.MAX_M rows, the split-K GEMV (True) or the same route as above MAX_M
# (False, the default). On the H200 (2026-11-28 and 2026-11-30, docs/benchmarks.md) the Triton
# dequantize plus bf16 cuBLAS, timed apart and added, took less than the GEMV in every case timed:
# at 4096x4096 M = 1 0.073 against 0.129 ms and 0.13 against 0.35, M = 16 0.13 against 0.26; at
# 4096x14336 0.10 against 0.14 (M = 1) and 0.40 (M = 16). The GEMV stays for the tests and the
# benchmarks (bench_nf4_linear.py's lowrank-triton-gemv), and for when it gets faster.
SKINNY = False


def _block_k(k_in: int, blocksize: int) -> int:
    """# Note: BLOCK_K follows the blocksize. With K % blocksize == 0 the reduction step is
    min(64, blocksize) columns, so one step of a row stays inside one quantization block and
    needs one scale (see Note: two decode paths). Otherwise 32 (each element decodes its own)."""
    if not row_aligned(k_in, blocksize):
        return 32
    return min(32 if interpreting() else 64, blocksize)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row tiles share each W column tile while it
    is in L2, so the packed weight is read from memory about M / (GROUP_M*BLOCK_M) times."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % size_m), (pid % (GROUP_M * n_n)) // size_m


@triton.autotune(configs=_CONFIGS, key=["N", "K", "M_BUCKET", "BLOCKSIZE"])
@triton.jit
def _linear_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, M_BUCKET,  # M_BUCKET: M rounded up to a power of two, the autotune key
    # strides
    stride_xm, stride_xk, stride_om, stride_on,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, LOOKUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = load_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, offs_n, k0, N, K,
                        BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, LOOKUP)  # (BN, BK) float32
        w = to_dtype(w, x_ptr.dtype.element_ty)  # rounded once, like the reference's dense W
        acc = dot(x, tl.trans(w), acc, DOT_PRECISION)  # (BM, BK) @ (BK, BN) -> (BM, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, to_dtype(acc, out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=_CONFIGS, key=["N", "K", "M_BUCKET", "BLOCKSIZE"])
@triton.jit
def _grad_input_kernel(
    # pointers
    gy_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, gx_ptr,
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_gym, stride_gyn, stride_gxm, stride_gxk,
    # meta-parameters (the output tile is BLOCK_M x BLOCK_K; BLOCK_N rows of W per step)
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, LOOKUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
    gy_rows = gy_ptr + offs_m.to(tl.int64)[:, None] * stride_gym  # (BM, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        gy = tl.load(gy_rows + offs_n[None, :] * stride_gyn, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = load_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, offs_n, k0, N, K,
                        BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, LOOKUP)  # (BN, BK) float32
        w = to_dtype(w, gy_ptr.dtype.element_ty)
        acc = dot(gy, w, acc, DOT_PRECISION)  # (BM, BN) @ (BN, BK) -> (BM, BK)
    out = gx_ptr + offs_m.to(tl.int64)[:, None] * stride_gxm + offs_k[None, :] * stride_gxk
    tl.store(out, to_dtype(acc, gx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def _meta(x: torch.Tensor, k_in: int, blocksize: int) -> dict:
    # fp32 inputs: full fp32 products ("ieee"), as the reference; TF32 would lose 13 bits
    return dict(
        BLOCKSIZE=blocksize, ROW_ALIGNED=row_aligned(k_in, blocksize), BLOCK_K=_block_k(k_in, blocksize),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", LOOKUP=lookup(), **LAUNCH_OPTIONS,
    )


def linear(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias) -> torch.Tensor:
    """Tiled fused kernel for any M (the table sends M <= triton_gemv.MAX_M to the GEMV)."""
    n_out, k_in = shape
    x2 = x.reshape(-1, k_in)  # (M, K)
    m = x2.shape[0]
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)  # (M, N)
    args, double_quant = weight_args(packed, absmax, nested_absmax, offset)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    _linear_kernel[grid](
        x2, *args, bias.contiguous() if bias is not None else out, out,  # the kernel reads bias flat
        m, n_out, k_in, triton.next_power_of_2(m),
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
        DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None, **_meta(x, k_in, blocksize),
    )
    return out.view(*x.shape[:-1], n_out)  # (..., N)


@backends.register("nf4_linear_grad_input", "triton")
def grad_input(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize) -> torch.Tensor:
    n_out, k_in = shape
    if min(math.prod(grad_y.shape[:-1]), n_out, k_in) == 0:  # See Note: empty shapes (before a reshape by N = 0).
        return grad_y.new_zeros((*grad_y.shape[:-1], k_in))
    gy2 = grad_y.reshape(-1, n_out)  # (M, N)
    m = gy2.shape[0]
    if not FUSED:  # See Note: fused or dequantize + cuBLAS.
        w = triton_dequantize.dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, grad_y.dtype)
        return grad_y @ w  # (..., N) @ (N, K) -> (..., K)
    gx = torch.empty((m, k_in), dtype=grad_y.dtype, device=grad_y.device)  # (M, K)
    args, double_quant = weight_args(packed, absmax, nested_absmax, offset)
    meta = _meta(grad_y, k_in, blocksize)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k_in, meta["BLOCK_K"]),)

    _grad_input_kernel[grid](
        gy2, *args, gx, m, n_out, k_in, triton.next_power_of_2(m),
        gy2.stride(0), gy2.stride(1), gx.stride(0), gx.stride(1),
        DOUBLE_QUANT=double_quant, **meta,
    )
    return gx.view(*grad_y.shape[:-1], k_in)  # (..., K)


@backends.register("nf4_linear", "triton")
def nf4_linear(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias) -> torch.Tensor:
    """# Note: empty shapes. With no rows, no outputs or K == 0 there is nothing to decode:
    y is the bias (or zeros), as the reference gives, without launching a kernel.
    # Note: skinny or tiled. Up to triton_gemv.MAX_M rows the product is bound by reading W
    and the split-K GEMV fills the GPU (with SKINNY); above, the tiled kernel reuses each W tile
    BLOCK_M times (with FUSED). Otherwise the Triton dequantize and F.linear: the default at every M."""
    n_out, k_in = shape
    rows = x.numel() // k_in if k_in else 0
    if min(rows, n_out, k_in) == 0:
        y = x.new_zeros((*x.shape[:-1], n_out))
        return y + bias if bias is not None else y
    if SKINNY and rows <= triton_gemv.MAX_M:
        return triton_gemv.linear(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias)
    if not FUSED:  # See Note: fused or dequantize + cuBLAS.
        w = triton_dequantize.dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, x.dtype)  # (N, K)
        return F.linear(x, w, bias)
    return linear(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias)
