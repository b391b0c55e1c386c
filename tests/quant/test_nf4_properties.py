"""Properties of the NF4 codec that hold for every input (hypothesis).

The bounds used here are derived in docs/nf4.md ("Error bound"); each test names the step.
"""

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lowrank import NF4Weight, nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = 2.0**-24  # unit roundoff of float32

# Half the largest gap between neighbouring codes: the worst distance from a value in
# [-1, 1] to its nearest code.
H4 = float((nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max()) / 2  # 0.1519, between -1 and -0.6962
H8 = float((nf4.DYNAMIC_CODE[1:] - nf4.DYNAMIC_CODE[:-1]).max()) / 2  # 0.0070, near 1
GRID_STEP = 2.0 / 65535  # the 65536-point grid the 8-bit codes are read from (nf4.py Note)


@st.composite
def weights(draw, max_numel=4000):
    """A weight of 1-3 dims: a random body (seeded, so hypothesis can shrink the seed) in
    one of several distributions and scales, with a few hand-picked values planted in it."""
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, 70), min_size=ndim, max_size=ndim))
    assume(math.prod(shape) <= max_numel)
    n = math.prod(shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "uniform", "heavy", "sparse", "constant"]))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 300.0]))
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "uniform":
        x = torch.rand(n, generator=g) * 2 - 1
    elif kind == "heavy":  # a few outliers per block, like real LLM weights
        x = torch.randn(n, generator=g) * torch.where(torch.rand(n, generator=g) < 0.01, 50.0, 1.0)
    elif kind == "sparse":
        x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.1)
    else:
        x = torch.full((n,), draw(st.sampled_from([0.0, 1.0, -0.37])))
    x = x * scale
    planted = st.one_of(st.just(0.0), st.floats(2.0**-20, 1e3, width=32), st.floats(-1e3, -(2.0**-20), width=32))
    for i, v in draw(st.lists(st.tuples(st.integers(0, n - 1), planted), max_size=4)):
        x[i] = v
    dtype = draw(st.sampled_from(DTYPES))
    return x.view(shape).to(dtype)


blocksizes = st.sampled_from(nf4.BLOCKSIZES)


def exact_absmax(w, blocksize):
    """Block maxima computed another way: pad with zeros to whole blocks."""
    x = w.reshape(-1).float()
    pad = (-x.numel()) % blocksize
    return torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize).abs().amax(dim=1)


def per_element(t, blocksize, n):
    return t.repeat_interleave(blocksize)[:n]


# 1. The scales are the block maxima, exactly.
@given(weights(), blocksizes)
def test_absmax_is_the_block_max(w, blocksize):
    q = nf4.quantize(w, blocksize, double_quant=False)
    assert torch.equal(q.absmax, exact_absmax(w, blocksize))


# 2. Each code is the nearest NF4 value to x / absmax. Normalizing in float32 moves s by at
#    most 2 * EPS32 (reciprocal, then product), so the chosen code is within 4 * EPS32 of
#    the best distance measured in float64.
@given(weights(), blocksizes)
def test_codes_are_nearest(w, blocksize):
    q = nf4.quantize(w, blocksize, double_quant=False)
    n = w.numel()
    a = per_element(q.absmax.double(), blocksize, n)
    s = torch.where(a > 0, w.reshape(-1).double() / a, torch.zeros_like(a))  # (n,)
    dist = (s[:, None] - nf4.NF4_CODE.double()[None, :]).abs()  # (n, 16)
    chosen = dist.gather(1, nf4.unpack(q.packed, n).long()[:, None]).squeeze(1)
    assert torch.all(chosen <= dist.min(dim=1).values + 4 * EPS32)


# 3. Round-trip error per element without double quantization:
#    |x - deq| <= absmax * (H4 + 4 EPS32) + EPS32 * absmax   (nearest code, then one rounding).
@given(weights(), blocksizes)
def test_round_trip_error_bound(w, blocksize):
    q = nf4.quantize(w, blocksize, double_quant=False)
    n = w.numel()
    a = per_element(q.absmax.double(), blocksize, n)
    err = (nf4.dequantize(q, torch.float32).reshape(-1).double() - w.reshape(-1).double()).abs()
    assert torch.all(err <= a * (H4 + 5 * EPS32))


# 4. Double quantization of the scales: |a - a'| <= na * (H8 + GRID_STEP) + 2 EPS32 (na + |a'|),
#    na = the absmax of (a - offset) over the scale's group of 256 (half a code gap, plus the
#    grid the code is read from, plus two float32 roundings in a' = code * na + offset).
@given(weights(max_numel=4000), st.sampled_from([32, 64]))
def test_double_quantized_scales_error_bound(w, blocksize):
    exact = nf4.quantize(w, blocksize, double_quant=False).absmax.double()  # (B,)
    q = nf4.quantize(w, blocksize, double_quant=True)
    approx = nf4.dequantize_scales(q.absmax, q.nested_absmax, q.offset).double()
    na = per_element(q.nested_absmax.double(), nf4.NESTED_BLOCKSIZE, exact.numel())
    assert torch.all((exact - approx).abs() <= na * (H8 + GRID_STEP) + 2 * EPS32 * (na + approx.abs()))


# 5. ... and the element error with double quantization adds |a - a'| to the bound of 3:
#    |x - code * a'| <= |x - code * a| + |code| |a - a'|, |code| <= 1.
@given(weights(), blocksizes)
def test_round_trip_error_bound_double_quant(w, blocksize):
    q = nf4.quantize(w, blocksize, double_quant=True)
    n = w.numel()
    a = per_element(exact_absmax(w, blocksize).double(), blocksize, n)
    a2 = per_element(nf4.dequantize_scales(q.absmax, q.nested_absmax, q.offset).double(), blocksize, n)
    err = (nf4.dequantize(q, torch.float32).reshape(-1).double() - w.reshape(-1).double()).abs()
    assert torch.all(err <= a * (H4 + 5 * EPS32) + (a - a2).abs() + EPS32 * a2.abs())


# 6. Idempotence: a dequantized weight quantizes to the same codes and scales. Its block
#    max is code 0 or 15 times absmax, which is absmax exactly, and every other value sits
#    on a code, far from any midpoint. With double quantization this holds in every block
#    whose dequantized scale is positive: a block far smaller than its neighbours can get a
#    scale of 0 or below (docs/nf4.md, "Negative scales"), and its values then flip sign.
@given(weights(), blocksizes, st.booleans())
def test_quantize_dequantize_is_idempotent(w, blocksize, double_quant):
    q = nf4.quantize(w, blocksize, double_quant=double_quant)
    w2 = nf4.dequantize(q, torch.float32)
    q2 = nf4.quantize(w2, blocksize, double_quant=double_quant)
    n = w.numel()
    codes, codes2 = nf4.unpack(q.packed, n), nf4.unpack(q2.packed, n)
    if not double_quant:  # the scales too (with double quantization they are re-centred)
        assert torch.equal(codes2, codes)
        assert torch.equal(q2.absmax, q.absmax)
        assert torch.equal(nf4.dequantize(q2, torch.float32), w2)
    else:
        scale = nf4.dequantize_scales(q.absmax, q.nested_absmax, q.offset)
        positive = per_element(scale > 0, blocksize, n)
        assert torch.equal(codes2[positive], codes[positive])


# 7. Zeros: an exact zero takes the zero code and comes back as exactly 0, in any block.
@given(weights(), blocksizes, st.booleans())
def test_exact_zero_is_the_zero_code(w, blocksize, double_quant):
    zero = w.reshape(-1) == 0
    q = nf4.quantize(w, blocksize, double_quant=double_quant)
    assert torch.all(nf4.unpack(q.packed, w.numel())[zero] == nf4.ZERO_CODE)
    assert torch.all(nf4.dequantize(q).reshape(-1)[zero] == 0)


# 8. Scaling by a power of two (exact in float32) scales absmax by it and keeps every code.
@given(weights(), blocksizes, st.integers(-20, 20))
def test_power_of_two_scale_invariance(w, blocksize, k):
    x = w.float()
    q, qs = nf4.quantize(x, blocksize, False), nf4.quantize(x * 2.0**k, blocksize, False)
    assert torch.equal(qs.packed, q.packed)
    assert torch.equal(qs.absmax, q.absmax * 2.0**k)


# 9. Codes are monotone in the value within a block.
@given(weights(), blocksizes)
def test_codes_are_monotone_within_a_block(w, blocksize):
    n = w.numel()
    q = nf4.quantize(w, blocksize)
    codes = nf4.unpack(q.packed, n).long()
    block = torch.arange(n) // blocksize
    x = w.reshape(-1).float()
    order = torch.argsort(block * 1e6 + torch.argsort(torch.argsort(x)).double(), stable=True)  # by block, then x
    same_block = block[order][1:] == block[order][:-1]
    assert torch.all(codes[order][1:][same_block] >= codes[order][:-1][same_block])


# 10. Shape and dtype come back; the input is untouched; layout does not matter.
@given(weights(), blocksizes, st.booleans())
def test_shape_dtype_and_input_preserved(w, blocksize, double_quant):
    before = w.clone()
    q = nf4.quantize(w.t() if w.dim() == 2 else w, blocksize, double_quant)
    out = nf4.dequantize(q)
    assert out.dtype == w.dtype and out.shape == (w.t() if w.dim() == 2 else w).shape
    assert torch.equal(w, before)
    if w.dim() == 2:
        qc = nf4.quantize(w.t().contiguous(), blocksize, double_quant)
        assert torch.equal(qc.packed, q.packed) and torch.equal(qc.absmax, q.absmax)


# 11. Packing is a bijection on codes.
@given(st.lists(st.integers(0, 15), min_size=1, max_size=300))
def test_pack_unpack_inverse(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = nf4.pack(c)
    assert packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(nf4.unpack(packed, len(codes)), c)


# 12. The state-dict form carries everything: from_state_dict(to_state_dict(q)) == q.
@given(weights(max_numel=1000), blocksizes, st.booleans())
def test_state_dict_round_trip(w, blocksize, double_quant):
    q = nf4.quantize(w, blocksize, double_quant)
    r = NF4Weight.from_state_dict(q.to_state_dict("p.weight"), "p.weight")
    for f in ("packed", "absmax", "nested_absmax", "offset"):
        a, b = getattr(q, f), getattr(r, f)
        assert (a is None and b is None) or torch.equal(a, b)
    assert (r.shape, r.dtype, r.blocksize) == (q.shape, q.dtype, q.blocksize)


# 13. The search-free nearest_code equals a binary search over the midpoints, including on
#     and next to every midpoint (ties take the lower code).
@given(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=200), st.integers(-3, 3))
def test_nearest_code_equals_bucketize(values, ulps):
    mids = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2
    near = mids.clone()
    for _ in range(abs(ulps)):
        near = torch.nextafter(near, torch.full_like(near, math.copysign(2.0, ulps)))
    s = torch.cat([torch.tensor(values, dtype=torch.float32), near, mids, nf4.NF4_CODE]).clamp(-1, 1)
    assert torch.equal(nf4.nearest_code(s).long(), torch.bucketize(s, mids))


# 9. The 8-bit codec of AdamW8bit's moments (lowrank/optim.py, Note: 8-bit states), signed for
#    the first moment and unsigned for the second (x >= 0): |x - x'| <= absmax * (h + GRID_STEP)
#    + EPS32 |x'|, h = half the largest gap of the map (the code is read from the 65536-point
#    grid, so it may be one grid step off the nearest; x' = code * absmax is one rounding).
@given(weights(max_numel=3000), st.booleans())
def test_8bit_round_trip_error_bound(w, signed):
    x = w.reshape(-1).float() if signed else w.reshape(-1).float().abs()
    code = nf4.DYNAMIC_CODE if signed else nf4.UNSIGNED_DYNAMIC_CODE
    h = float((code[1:] - code[:-1]).max()) / 2
    codes, absmax = nf4.quantize_8bit(x, 256, signed=signed)
    back = nf4.dequantize_8bit(codes, absmax, 256, signed=signed).double()
    a = per_element(absmax.double(), 256, x.numel())
    assert torch.all((back - x.double()).abs() <= a * (h + GRID_STEP) + EPS32 * back.abs())
    if not signed:
        assert torch.all(back >= 0)  # the second moment stays non-negative: sqrt(v) is defined
