# out[n] = NF4[code[n]] * scale[n // blocksize]   (n over the row-major flattening of W)
# scale[b] = DYNAMIC[qabsmax[b]] * nested_absmax[b // 256] + offset, decoded in this kernel
"""Triton kernel: dequantize an NF4 weight (double-quantized scales decoded in the same
kernel) to float32 / float16 / bfloat16, bit-exact with lowrank.quant.nf4.dequantize.

Each program writes BLOCKS_PER_PROGRAM whole quantization blocks: a (blocks, blocksize)
tile. It reads blocksize/2 contiguous bytes per block and one scale per block, so the
scale decode (three small gathers) is paid once per block, not per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backends
from .triton_nf4_tile import LAUNCH_OPTIONS, decode_scale, interpreting, lookup, nf4_value, to_dtype, weight_args

# Note: autotune lists. On a GPU a short list tuned for H100/H200 (memory-bound: enough
# bytes in flight per SM, 4-8 warps); in Triton's CPU interpreter ONE config, because the
# interpreter runs every program in Python and autotuning there only costs test time.
_ELEMS = [1024] if interpreting() else [4096, 8192, 16384]
_CONFIGS = [
    triton.Config({"ELEMS_PER_PROGRAM": e}, num_warps=w)
    for e in _ELEMS
    for w in ([4] if interpreting() else [4, 8])
]


# Note: decode, then interleave. The high and low nibbles of the bytes are looked up, scaled
# and rounded as two tiles, and only the results are interleaved into W's order; and when every
# program's tile lies inside W (n a multiple of the elements a program writes: every Llama
# shape) the kernel has no masks. Compiled for sm_90 (benchmarks/sass_triton.py, Triton 3.9)
# that is 10-12 instructions an element, against 14-18 when the codes were interleaved first and
# every load and store was masked.
@triton.autotune(configs=_CONFIGS[:1] if interpreting() else _CONFIGS, key=["n", "BLOCKSIZE"])
@triton.heuristics({"WHOLE": lambda a: a["n"] % max(a["ELEMS_PER_PROGRAM"], a["BLOCKSIZE"]) == 0})
@triton.jit
def _kernel(
    # pointers
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dyn_ptr, out_ptr,
    # sizes
    n,  # elements of W
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, LOOKUP: tl.constexpr, ELEMS_PER_PROGRAM: tl.constexpr,
    WHOLE: tl.constexpr,  # n is a multiple of the elements a program writes
):
    NB: tl.constexpr = max(ELEMS_PER_PROGRAM // BLOCKSIZE, 1)  # quantization blocks per program
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * NB + tl.arange(0, NB)  # (NB,) block indices
    n_blocks = tl.cdiv(n, BLOCKSIZE)
    byte_idx = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # (NB, BS/2)
    if WHOLE:  # See Note: decode, then interleave.
        byte = tl.load(packed_ptr + byte_idx)
    else:
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (n + 1) // 2, other=0)
    scale = decode_scale(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, blocks, blocks < n_blocks, DOUBLE_QUANT)  # (NB,)
    # each value NF4[code] * scale in float32, exactly the reference's product, rounded once to nearest even
    first = to_dtype(nf4_value((byte >> 4).to(tl.int32), nf4_ptr, LOOKUP) * scale[:, None], out_ptr.dtype.element_ty)
    second = to_dtype(nf4_value((byte & 0xF).to(tl.int32), nf4_ptr, LOOKUP) * scale[:, None], out_ptr.dtype.element_ty)
    w = tl.interleave(first, second)  # (NB, BS): the first element of a byte is its high nibble
    idx = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (NB, BS) flat index
    if WHOLE:
        tl.store(out_ptr + idx, w)
    else:
        tl.store(out_ptr + idx, w, mask=idx < n)


def dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, dtype) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = out.numel()
    if n == 0:
        return out
    args, double_quant = weight_args(packed, absmax, nested_absmax, offset)

    def grid(meta):
        return (triton.cdiv(n, max(meta["ELEMS_PER_PROGRAM"], blocksize)),)

    _kernel[grid](*args, out, n, BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, LOOKUP=lookup(), **LAUNCH_OPTIONS)
    return out


backends.register("nf4_dequantize", "triton")(dequantize)
