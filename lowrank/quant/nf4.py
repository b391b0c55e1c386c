"""The NF4 double-quantization codec in plain PyTorch: the specification.

Every kernel (Triton, C++, CUDA) is tested against the functions in this file, and
every function here agrees bit for bit with bitsandbytes 0.50 on the CPU
(`bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`). docs/nf4.md lays out
the format byte by byte and derives the error bound.

The codec is four named stages, then two more for the scales:

    w (any shape) --flatten--> x[n]                        (row-major order)
      1. block_absmax   x[n]          -> absmax[B]          B = ceil(n / blocksize)
      2. normalize      x[n], absmax  -> s[n] in [-1, 1]
      3. nearest_code   s[n]          -> codes[n] in 0..15  (index into NF4_CODE)
      4. pack           codes[n]      -> packed[ceil(n/2)]  (first element in the high nibble)
    double quantization of the scales:
      5. quantize_scales   absmax[B]  -> qabsmax[B] (uint8), nested_absmax[ceil(B/256)], offset
      6. dequantize_scales            -> absmax[B] (float32), what dequantize multiplies by
"""

from __future__ import annotations

import math

import torch

from .nf4_weight import NF4Weight

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "NF4_CODE",
    "NF4Weight",
    "block_absmax",
    "dequantize",
    "dequantize_scales",
    "dynamic_map",
    "nearest_code",
    "normalize",
    "pack",
    "quantize",
    "quantize_8bit",
    "quantize_scales",
    "unpack",
]

# The 16 NF4 values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero at
# index 7 (QLoRA, Dettmers et al. 2023, appendix E; the float32 values are those of
# bitsandbytes `get_4bit_type("nf4")`).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
ZERO_CODE = 7

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # scales are double-quantized in blocks of 256 (QLoRA, section 3)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Note: smallest scale. A block of zeros has absmax 0; like bitsandbytes we divide by
# max(absmax, 1e-38) so such a block normalizes to 0 (code 7) instead of NaN. The stored
# absmax stays 0, so it dequantizes to exact zeros.
_TINY = 1e-38


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic map (Dettmers 2016, arXiv:1511.04561): 256 sorted float32 values.

    Signed (the double-quantized scales, the first moment of AdamW8bit), in [-0.993, 1]: for
    exponent e = 0..6 the 2**e midpoints of a linspace(0.1, 1) grid of 2**e + 1 points, times
    10**(e - 6), with both signs; then 0 and 1. Unsigned (the second moment, never negative),
    in [0, 1]: the same with 2**(e+1) midpoints a exponent and no negatives. The arithmetic
    (float32 linspace, float32 midpoints, then a float32 product) is what makes the values
    equal bitsandbytes' `create_dynamic_map(signed=...)` exactly.
    """
    values = [0.0, 1.0]
    for e in range(7):
        grid = torch.linspace(0.1, 1.0, 2 ** (e if signed else e + 1) + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scaled = (10.0 ** (e - 6)) * mids
        values += scaled.tolist() + ((-scaled).tolist() if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()
UNSIGNED_DYNAMIC_CODE = dynamic_map(signed=False)


# ---------------------------------------------------------------------------------------
# Stages 1-4: weight -> packed codes
# ---------------------------------------------------------------------------------------


def block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """absmax[b] = max |x[b*blocksize : (b+1)*blocksize]| for a flat float32 x; the last
    block may be short. Returns float32 of shape (ceil(n / blocksize),)."""
    n = x.numel()
    full = n - n % blocksize
    absmax = x[:full].view(-1, blocksize).abs().amax(dim=1)  # (B_full,)
    if full < n:
        absmax = torch.cat([absmax, x[full:].abs().amax().view(1)])
    return absmax


def normalize(x: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """s = clamp(x / absmax[block], -1, 1) for a flat float32 x.

    # Note: order of operations. Full blocks multiply by the float32 reciprocal of the
    # scale, the short last block divides by it. The two differ in the last bit for some
    # inputs, and a different last bit can flip a code on a midpoint; this is the order
    # bitsandbytes 0.50 uses, so it is ours.
    """
    n = x.numel()
    full = n - n % blocksize
    safe = absmax.clamp(min=_TINY)
    s = x[:full].view(-1, blocksize) * safe[: full // blocksize].reciprocal().unsqueeze(1)  # (B_full, bs)
    s = s.view(-1)
    if full < n:
        s = torch.cat([s, x[full:] / safe[-1]])
    return s.clamp_(-1.0, 1.0)


# Note: nearest code without a search. NF4 midpoints are at least 0.08 apart, so a grid of
# 128 cells over [-1, 1] (width 1/64, widened by float32 rounding to well under 0.02) puts
# at most one midpoint in any cell. _CELL_BASE[c] is the code of the lowest value that can
# land in cell c, and the code of s is _CELL_BASE[c] or one more: one lookup and one
# comparison with the true midpoint, equal to a binary search (torch.bucketize) over the
# 15 midpoints, ties included (a value exactly on a midpoint takes the lower code).
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,) float32
_CELLS = 128
_MID_ABOVE = torch.cat([_NF4_MIDPOINTS, torch.tensor([math.inf])])  # (16,) midpoint above code i
_CELL_BASE = torch.bucketize(
    torch.arange(_CELLS + 1, dtype=torch.float64) / (_CELLS / 2) - 1 - 1e-3,  # cell's low edge, less slack
    _NF4_MIDPOINTS.double(),
).to(torch.uint8)  # (129,): the value 1.0 lands in cell 128
_CELL_MID = _MID_ABOVE[_CELL_BASE.long()]  # (129,): the one midpoint a cell can hold, else +inf


def nearest_code(s: torch.Tensor) -> torch.Tensor:
    """codes[i] = index of the NF4 value nearest to s[i] in [-1, 1] (uint8, 0..15)."""
    cell = (s + 1.0).mul_(_CELLS / 2).to(torch.int32)  # truncation == floor, as s + 1 >= 0
    base = torch.index_select(_CELL_BASE.to(s.device), 0, cell)  # index_select: 3x faster than t[idx] on CPU
    above = s > torch.index_select(_CELL_MID.to(s.device), 0, cell)
    return base.add_(above.view(torch.uint8))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte, the first in the high nibble; an odd count is padded with
    the zero code (7), as bitsandbytes does. uint8 of shape (ceil(n / 2),)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
    pairs = codes.view(-1, 2)  # (n/2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


# (256, 2): the two NF4 values of every byte, high nibble first.
_NF4_PAIRS = torch.stack([NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 0xF]], dim=1)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack: uint8 codes of shape (n,)."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1)  # (n_bytes, 2)
    return codes.view(-1)[:n]


# ---------------------------------------------------------------------------------------
# Stages 5-6: double quantization of the scales
# ---------------------------------------------------------------------------------------

# Note: how a scale finds its 8-bit code. bitsandbytes 0.50 on the CPU does not search the
# 256-value dynamic map. It puts s = a / absmax_256 on a grid of 65536 points over [-1, 1],
# index = trunc((s + 1) / 2 * 65535 + 0.5) in float32, and reads the code from a table
# built per grid point v (code i when midpoint[i-1] < v <= midpoint[i]). Near zero, where
# the dynamic map is denser than the grid, that code is not always the nearest one, but
# its error stays under half a grid step (1 / 65535) plus half a code gap, times the nested
# absmax (docs/nf4.md). We reproduce it exactly so that the 8-bit scales are identical;
# dequantization is the same lookup times scale whichever code was picked. Whether
# bitsandbytes' compiler fuses the last multiply-add changes no index: tests/peers checks
# every grid boundary +- 6 ulps.
_LUT_SIZE = 65536
_LUT_POINTS = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)


def _grid_lut(code: torch.Tensor) -> torch.Tensor:
    """(65536,) uint8: the code of each grid point v, i when midpoint[i-1] < v <= midpoint[i]."""
    return torch.searchsorted(0.5 * (code[:-1] + code[1:]), _LUT_POINTS).to(torch.uint8)


_LUTS = {True: _grid_lut(DYNAMIC_CODE), False: _grid_lut(UNSIGNED_DYNAMIC_CODE)}  # signed -> table
_ON_DEVICE: dict[tuple[str, bool, torch.device], torch.Tensor] = {}  # (what, signed, device) -> table there


def _table(what: str, signed: bool, device: torch.device) -> torch.Tensor:
    """The grid table, the map of the signed / unsigned code, or (what="pairs") the NF4 values of
    each byte's two codes, on `device`, copied there once: an optimizer step codes every state
    tensor on every step, and a copy from the host cannot be captured in a CUDA graph."""
    key = (what, signed, device)
    if key not in _ON_DEVICE:
        cpu = {"lut": _LUTS[signed], "pairs": _NF4_PAIRS}.get(what, DYNAMIC_CODE if signed else UNSIGNED_DYNAMIC_CODE)
        _ON_DEVICE[key] = cpu.to(device)
    return _ON_DEVICE[key]


def quantize_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE,
                  signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a flat float32 x with the dynamic map (signed, or the
    unsigned one for x >= 0): each block scaled by its absmax, each value coded as in Note: how
    a scale finds its 8-bit code. Returns (codes uint8 (n,), absmax float32 (ceil(n / blocksize),))."""
    absmax = block_absmax(x, blocksize)  # (B2,)
    zero_block = absmax == 0
    # An all-zero block stores code 0; a subnormal absmax (where bitsandbytes divides by
    # it and gets Inf) is clamped like the NF4 scales, see Note: smallest scale.
    inv = absmax.clamp(min=_TINY).reciprocal().masked_fill_(zero_block, 0.0)
    inv = inv.repeat_interleave(blocksize)[: x.numel()]  # (n,)
    s = (x * inv).clamp_(-1.0, 1.0)
    grid = ((s + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int32)  # (n,) in 0..65535
    grid.clamp_(0, _LUT_SIZE - 1)  # a NaN (a NaN or inf in its block: absmax NaN) cast to int32 is out of range
    codes = _table("lut", signed, x.device)[grid]
    codes.masked_fill_(zero_block.repeat_interleave(blocksize)[: x.numel()], 0)  # no boolean indexing: no GPU sync
    return codes, absmax


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE,
                    signed: bool = True) -> torch.Tensor:
    """The inverse of quantize_8bit: x[i] = map[codes[i]] * absmax[i // blocksize], one float32
    product (bitsandbytes' dequantize_blockwise). Flat float32 (n,)."""
    values = torch.index_select(_table("map", signed, codes.device), 0, codes.to(torch.int32))  # 4-byte indices
    return values * absmax.repeat_interleave(blocksize)[: values.numel()]


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization (QLoRA, section 3): offset = mean(absmax), and absmax - offset
    quantized to 8 bits in blocks of 256.

    Returns (qabsmax uint8 (B,), nested_absmax float32 (ceil(B/256),), offset float32 0-d).
    """
    if absmax.numel() == 0:
        return absmax.to(torch.uint8), absmax.new_zeros(0), absmax.new_zeros(())
    offset = absmax.mean()
    if offset.device.type != "meta" and not torch.isfinite(offset):  # finite maxima near float32's max (3.4e38) whose mean overflows
        raise ValueError(f"double quantization needs the mean of the block maxima in float32, and it overflows (the "
                         f"largest is {absmax.max().item():.4g}); use double_quant=False for such weights")
    qabsmax, nested_absmax = quantize_8bit(absmax - offset)
    return qabsmax, nested_absmax, offset


def dequantize_scales(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """absmax[b] = dynamic[qabsmax[b]] * nested_absmax[b // 256] + offset, each step
    rounded to float32 in that order."""
    return dequantize_8bit(qabsmax, nested_absmax) + offset.to(qabsmax.device)


def scales_at(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
              blocks: torch.Tensor) -> torch.Tensor:
    """dequantize_scales(qabsmax, nested_absmax, offset)[blocks], bit for bit, decoding only
    the blocks asked for (integer indices of any shape; the result has their shape)."""
    values = _table("map", True, qabsmax.device)[qabsmax[blocks].long()]
    return values * nested_absmax[blocks // NESTED_BLOCKSIZE] + offset.to(qabsmax.device)


# ---------------------------------------------------------------------------------------
# The two entry points
# ---------------------------------------------------------------------------------------


def _check_weight(w: torch.Tensor, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if type(blocksize) is not int or blocksize not in BLOCKSIZES:  # 64.0 and True are refused too
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if w.dtype not in DTYPES:
        raise TypeError(
            f"w must be a floating-point tensor of dtype {', '.join(map(str, DTYPES))}; got {w.dtype}. "
            "Cast it first, e.g. w.float()."
        )


def _raise_non_finite(w: torch.Tensor) -> None:
    bad = ~torch.isfinite(w)
    first = tuple(int(i) for i in torch.nonzero(bad)[0]) if w.dim() else ()
    raise ValueError(
        f"w has {int(bad.sum())} non-finite value(s) (NaN or Inf) of {w.numel()}; the first is "
        f"{w[first].item()} at index {first}. NF4 scales are block maxima and cannot hold them."
    )


# Note: chunks. On the CPU, quantize and dequantize walk the weight in chunks of 2**18
# elements (a multiple of every blocksize and of 2, so blocks and bytes never straddle two
# chunks). The arithmetic is the same as on the whole tensor; the temporaries of a chunk
# (1 MiB of float32) stay in the L2 cache, which made quantize 4.5x faster on a 4096x4096
# weight on the 2-core CI machine. On a GPU one chunk is the whole tensor: there, many
# small chunks only multiply the kernel launches (dequantize took 6.6 ms on an H200).
_CPU_CHUNK = 2**18


def _chunk(device: torch.device, n: int) -> int:
    return _CPU_CHUNK if device.type == "cpu" else max(n, 1)


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a weight of any shape to NF4 (blockwise absmax along the row-major
    flattening), with double-quantized scales unless double_quant=False.

    w is read, never modified. An empty tensor gives an empty NF4Weight that dequantizes
    to an empty tensor of the same shape and dtype.
    """
    _check_weight(w, blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool (True or False); got {double_quant!r}")
    flat = w.detach().reshape(-1)  # (n,) a view when w is contiguous
    # See Note: chunks.
    absmax, packed = [], []
    chunk = _chunk(flat.device, flat.numel())
    meta = flat.device.type == "meta"  # shapes only: a meta weight gives a meta NF4Weight, no values to check
    for start in range(0, flat.numel(), chunk):
        x = flat[start : start + chunk].float()  # (chunk,) float32; a copy unless w is float32
        a = block_absmax(x, blocksize)
        if not meta and not torch.isfinite(a).all():  # a block max is NaN or Inf exactly when the block holds one
            _raise_non_finite(w)
        absmax.append(a)
        packed.append(pack(nearest_code(normalize(x, a, blocksize))))
    absmax = torch.cat(absmax) if absmax else flat.new_zeros(0, dtype=torch.float32)
    packed = torch.cat(packed) if packed else flat.new_zeros(0, dtype=torch.uint8)
    if double_quant:
        qabsmax, nested_absmax, offset = quantize_scales(absmax)
        return NF4Weight(packed, qabsmax, w.shape, w.dtype, blocksize, nested_absmax, offset)
    return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)


def dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight: NF4_CODE[code] * absmax[block] in float32, then rounded once to
    `dtype` (default: the dtype the weight was quantized from)."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q must be an NF4Weight (what nf4.quantize returns); got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
    n, bs = q.numel, q.blocksize
    absmax = dequantize_scales(q.absmax, q.nested_absmax, q.offset) if q.double_quant else q.absmax
    pairs = _table("pairs", True, q.device)
    out = torch.empty(n, dtype=dtype, device=q.device)
    chunk = _chunk(q.device, n)  # See Note: chunks.
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        codes = q.packed[start // 2 : (stop + 1) // 2].int()
        values = torch.index_select(pairs, 0, codes).view(-1)[: stop - start]  # (chunk,) float32: 2 values a byte
        full = (stop - start) // bs * bs
        b0 = start // bs
        out[start : start + full].view(-1, bs).copy_(values[:full].view(-1, bs) * absmax[b0 : b0 + full // bs, None])
        if start + full < stop:  # the short last block
            out[start + full : stop] = values[full:] * absmax[-1]
    return out.view(q.shape)
