# out[M, N] = x[M, K] @ W[N, K]^T + bias[N]   for M <= MAX_M (token generation: GEMV and skinny GEMM)
"""Triton kernels: split-K GEMV / skinny GEMM against an NF4 weight, for few rows.

With M <= 64 the product is bound by reading the packed weight (4.127 bits a parameter),
and a grid over N alone has too few programs to keep every SM streaming: a 4096x4096
weight in 128-row tiles is 32 programs for an H100's 132 SMs. So the grid is also split
along K: program (n, s) reduces columns [s*K_SPLIT, (s+1)*K_SPLIT) of BLOCK_N rows into
partial[s, :, n-tile] (fp32), and a second small kernel sums the SPLITS partials in a
fixed order, adds the bias and rounds once. Deterministic (no atomics), and only the
(SPLITS, M, N) fp32 partials travel twice, a few percent of the weight's bytes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_nf4_tile import (
    LAUNCH_OPTIONS, dot, interpreting, load_w_pairs, load_w_tile, lookup, row_aligned, to_dtype, weight_args,
)

# Note: the GEMV's inner loop. The first version summed each step's (BLOCK_N, BLOCK_K) products
# across the threads of a row (tl.sum every step) and interleaved the two nibbles of each byte
# into one tile before decoding it; the H200 ran it at 0.14x bf16 (docs/benchmarks.md). Now each
# thread keeps its own float32 partial sums, one per tile element, which meet once after the
# loop; and the high and low nibbles stay in two tiles, multiplied by the even and the odd
# columns of x (one contiguous load of x, split in registers: two strided loads cost ~4
# instructions an element), so no tile changes layout. Compiled for sm_90
# (benchmarks/sass_triton.py, Triton 3.9) a trip of the loop went from 26-51 instructions a
# weight, with 192-384 shuffles, 6-12 barriers and 168-180 registers, to 11-13 a weight, no
# shuffle, 0-2 barriers and 48-125 registers (not yet timed on a GPU). tl.fma: the kernels run
# without fp contraction (Note: no fused multiply-add), so a plain `acc += w * x` would round twice.
MAX_M = 64  # See Note: skinny or tiled (triton_matmul.py). A first guess from the roofline; retune with GPU numbers.

# See Note: autotune lists (triton_dequantize.py). Hopper: 64-256 rows of W a program, the
# K loop pipelined 4 deep so that several tiles of packed bytes are in flight per SM.
_HOPPER = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
]
_INTERPRETER = [triton.Config({"BLOCK_N": 16}, num_warps=4)]
_NOMINAL_BLOCK_N = 128  # the tile width the split-K heuristic plans with
_WAVES = 4  # programs per SM the split aims for


@triton.autotune(configs=_INTERPRETER if interpreting() else _HOPPER, key=["N", "K", "M_BUCKET", "BLOCKSIZE"])
@triton.jit
def _splitk_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, partial_ptr,
    # sizes
    M, N, K, M_BUCKET, K_SPLIT,  # K_SPLIT: columns a program reduces, a multiple of BLOCK_K
    # strides (partial is contiguous (SPLITS, M, N))
    stride_xm, stride_xk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOOKUP: tl.constexpr,
):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    k_start = pid_s * K_SPLIT
    k_stop = tl.minimum(k_start + K_SPLIT, K)
    if BLOCK_M == 1 and ROW_ALIGNED:  # GEMV: See Note: the GEMV's inner loop.
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            even, odd = load_w_pairs(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, offs_n, k0, N, K,
                                     BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, LOOKUP)  # (BN, BK/2) each
            even = to_dtype(even, x_ptr.dtype.element_ty).to(tl.float32)  # the reference's W, held in fp32
            odd = to_dtype(odd, x_ptr.dtype.element_ty).to(tl.float32)
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,) in bounds: K % BLOCK_K == 0
            x = tl.load(x_ptr + offs_k * stride_xk).to(tl.float32)  # one contiguous load, then its even and odd columns
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))
            acc2 = tl.fma(even, x_even[None, :], acc2)
            acc2 = tl.fma(odd, x_odd[None, :], acc2)
        tl.store(partial_ptr + pid_s * N + offs_n, tl.sum(acc2, axis=1), mask=offs_n < N)
    elif BLOCK_M == 1:  # GEMV, blocks straddling rows: each element decodes its own byte and scale
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)  # (BK,)
            w = load_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, offs_n, k0, N, K,
                            BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, LOOKUP)  # (BN, BK)
            w = to_dtype(w, x_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.fma(w, x[None, :], acc)
        tl.store(partial_ptr + pid_s * N + offs_n, tl.sum(acc, axis=1), mask=offs_n < N)
    else:  # skinny GEMM: M <= BLOCK_M rows in one tile, tl.dot on the tensor cores
        offs_m = tl.arange(0, BLOCK_M)  # (BM,)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = load_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, offs_n, k0, N, K,
                            BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, LOOKUP)  # (BN, BK)
            w = to_dtype(w, x_ptr.dtype.element_ty)
            acc = dot(x, tl.trans(w), acc, DOT_PRECISION)  # (BM, BK) @ (BK, BN) -> (BM, BN)
        out = partial_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _reduce_kernel(
    # pointers
    partial_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, SPLITS,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat index into out (M, N)
    mask = idx < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):  # a fixed order: the result does not depend on scheduling
        acc += tl.load(partial_ptr + s * M * N + idx, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + idx % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (asked once: this runs on every decoding step); 2 elsewhere, so
    that the interpreter tests exercise more than one split."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _split(n_out: int, k_in: int, block_k: int, device: torch.device) -> int:
    """K_SPLIT: enough splits for _WAVES programs per SM, each split at least two K steps."""
    sms = _sm_count(device)
    n_tiles = triton.cdiv(n_out, _NOMINAL_BLOCK_N)
    splits = max(1, min(_WAVES * sms // n_tiles, triton.cdiv(k_in, 2 * block_k)))
    return triton.cdiv(triton.cdiv(k_in, splits), block_k) * block_k


def linear(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias) -> torch.Tensor:
    """x (..., K) with at most MAX_M rows -> (..., N)."""
    from .triton_matmul import _block_k  # one rule for the reduction step of every kernel

    n_out, k_in = shape
    x2 = x.reshape(-1, k_in)  # (M, K)
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"the split-K kernel takes at most MAX_M = {MAX_M} rows, got {m}; use triton_matmul.linear")
    block_k = _block_k(k_in, blocksize)
    k_split = _split(n_out, k_in, block_k, x.device)
    splits = triton.cdiv(k_in, k_split)
    partial = torch.empty((splits, m, n_out), dtype=torch.float32, device=x.device)  # (SPLITS, M, N)
    args, double_quant = weight_args(packed, absmax, nested_absmax, offset)
    _splitk_kernel[lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), splits)](
        x2, *args, partial, m, n_out, k_in, triton.next_power_of_2(m), k_split,
        x2.stride(0), x2.stride(1),
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, ROW_ALIGNED=row_aligned(k_in, blocksize),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_K=block_k,
        BLOCK_M=1 if m == 1 else max(16, triton.next_power_of_2(m)), LOOKUP=lookup(), **LAUNCH_OPTIONS,
    )
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)  # (M, N)
    block = 256 if interpreting() else 1024
    _reduce_kernel[(triton.cdiv(m * n_out, block),)](
        partial, bias.contiguous() if bias is not None else out, out, m, n_out, splits,  # the kernel reads bias flat
        HAS_BIAS=bias is not None, BLOCK=block, **LAUNCH_OPTIONS,
    )
    return out.view(*x.shape[:-1], n_out)  # (..., N)
