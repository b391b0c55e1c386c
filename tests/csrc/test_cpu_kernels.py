"""lowrank._C's CPU kernels against the reference (lowrank/quant/nf4.py), on every instruction
set this CPU has (scalar, avx2, avx512, avx512bf16): dequantize bit for bit, the GEMV exactly where the
math is exact and within the derived bound of tests/ops/bounds.py elsewhere."""

import functools
import os

import pytest
import torch

from lowrank import nf4
from lowrank.quant.nf4 import BLOCKSIZES, DYNAMIC_CODE
from tests.ops.bounds import assert_matmul_close

if os.environ.get("LOWRANK_NO_EXT") == "1":
    pytest.skip("LOWRANK_NO_EXT=1: lowrank._C is not built", allow_module_level=True)
from lowrank import _C  # noqa: E402  (not built is a failure here, not a skip)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_ISAS = ("scalar", "avx2", "avx512", "avx512bf16")  # avx512bf16: the vdpbf16ps GEMV of bf16 x
ISAS = list(ALL_ISAS[: ALL_ISAS.index(_C.best_cpu_isa()) + 1])


@pytest.fixture(params=ISAS)
def isa(request):
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(_C.best_cpu_isa())


@functools.lru_cache(maxsize=None)
def weight(shape, blocksize, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nf4.quantize(torch.randn(shape, generator=g), blocksize, double_quant)


def fields(q):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)


def bits(t):  # compare bit patterns: equal values with a different sign of zero or NaN would not pass
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


# (1,): one element, one odd byte; (33, 77) and (5, 4099): odd numel, a short last block;
# (300, 512): 153600 elements, at blocksize 32 19 nested blocks of 256 scales.
SHAPES = [(1,), (33, 77), (5, 4099), (64, 96), (300, 512)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_is_bit_exact(isa, shape, blocksize, double_quant):
    q = weight(shape, blocksize, double_quant)
    for dtype in DTYPES:
        ours = _C.nf4_dequantize_cpu(*fields(q), dtype)
        assert ours.shape == q.shape and ours.dtype == dtype
        assert torch.equal(bits(ours), bits(nf4.dequantize(q, dtype))), f"{isa} {shape} {blocksize} {dtype}"


def test_dequantize_large_outputs_are_ordinary_tensors():
    """Outputs of 4 MiB and more come from the huge-page allocator (csrc/bindings.cpp, Note: huge
    pages for the output): still bit-exact, and a tensor like any other (offset 0, resizable)."""
    q = weight((1024, 2048), 64, True)
    for dtype in DTYPES:  # 8 MiB float32, 4 MiB float16 / bfloat16
        ours = _C.nf4_dequantize_cpu(*fields(q), dtype)
        assert ours.storage_offset() == 0 and ours.data_ptr() % (1 << 21) == 0
        assert torch.equal(bits(ours), bits(nf4.dequantize(q, dtype)))
        into = torch.empty_like(ours)
        _C.nf4_dequantize_cpu_into(into, *fields(q))
        assert torch.equal(bits(into), bits(ours))
        ours.resize_(3000, 2048)  # the storage grows through the same allocator
        assert torch.equal(bits(ours[:1024]), bits(nf4.dequantize(q, dtype)))


def test_dequantize_every_scale_code_and_byte(isa):
    """All 256 codes of the dynamic map (csrc/nf4_common.h holds them as hex literals) and all
    256 packed bytes, with nested scales and an offset that make the two roundings matter."""
    g = torch.Generator().manual_seed(1)
    blocks = 4 * 256 + 3  # 5 nested blocks, the last one short
    codes = torch.arange(blocks, dtype=torch.int64).remainder(256).to(torch.uint8)
    packed = torch.randint(0, 256, (blocks * 32,), dtype=torch.uint8, generator=g)
    packed[:256] = torch.arange(256, dtype=torch.uint8)
    nested = torch.rand(5, generator=g) * 3
    q = nf4.NF4Weight(packed, codes, torch.Size([blocks * 64]), torch.float32, 64, nested, torch.tensor(0.37))
    assert torch.equal(torch.tensor(DYNAMIC_CODE.tolist()), DYNAMIC_CODE)
    for dtype in DTYPES:
        assert torch.equal(bits(_C.nf4_dequantize_cpu(*fields(q), dtype)), bits(nf4.dequantize(q, dtype)))


def test_dequantize_rounding_at_the_edges_of_each_dtype(isa):
    """Scales whose products are float16 subnormals, float16 overflows, bfloat16 and float32
    subnormals: the conversion of each instruction set rounds exactly as torch does."""
    scales = torch.tensor([1e-6, 3e-5, 6.1e-5, 7e4, 1e5, 1e-39, 2.5e-38, 3e38, 1.0, 0.0], dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    packed = torch.randint(0, 256, (scales.numel() * 32,), dtype=torch.uint8, generator=g)
    q = nf4.NF4Weight(packed, scales, torch.Size([scales.numel() * 64]), torch.float32, 64)
    for dtype in DTYPES:
        assert torch.equal(bits(_C.nf4_dequantize_cpu(*fields(q), dtype)), bits(nf4.dequantize(q, dtype)))


@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_of_one_hot_rows_is_a_column_of_w(isa, blocksize, dtype):
    """x = rows of the identity: y[m] = W[:, k_m] with one nonzero product a sum, so the float32
    sum is exact and y must equal the dequantized column bit for bit (every decode path)."""
    n_out, k_in = 40, 512
    q = weight((n_out, k_in), blocksize, True)
    w = nf4.dequantize(q, dtype)  # (N, K), the reference's operand
    for ks in (torch.arange(16), torch.arange(k_in - 16, k_in), torch.randperm(k_in, generator=torch.Generator().manual_seed(3))[:13]):
        x = torch.eye(k_in, dtype=dtype)[ks]  # (M, K)
        y = _C.nf4_linear_cpu(x, *fields(q), None)  # (M, N)
        assert torch.equal(bits(y), bits(w[:, ks].T.contiguous())), f"{isa} rows {ks.tolist()}"


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_within_the_derived_bound(isa, m, dtype):
    """y = x @ W^T + b against the reference (W dequantized in x.dtype, then F.linear): both
    compared to the float64 product of the same operands. See Note: the matmul error bound
    (tests/ops/bounds.py): |ours - y64| <= |ref - y64| + 2 E + 2 u_d (|y64| + E), elementwise."""
    g = torch.Generator().manual_seed(m)
    for (n_out, k_in), blocksize in (((48, 256), 32), ((72, 1024), 64), ((16, 4096), 128)):
        q = weight((n_out, k_in), blocksize, True)
        w = nf4.dequantize(q, dtype)  # (N, K)
        x = torch.randn(m, k_in, generator=g).to(dtype)
        for bias in (None, torch.randn(n_out, generator=g).to(dtype)):
            ours = _C.nf4_linear_cpu(x, *fields(q), bias)
            ref = torch.nn.functional.linear(x, w, bias)
            assert ours.dtype == dtype and ours.shape == (m, n_out)
            assert_matmul_close(ours, ref, x, w.T, bias)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 11, 16])
def test_gemv_of_bf16_x_on_every_tile_and_row_tail(isa, m):
    """bf16 x with blocksize 64 and 128 is the vdpbf16ps kernel on avx512bf16 (tiles of 1..4 rows
    of x times 4 rows of W); N = 37 leaves rows of W past the last tile of 4 and of 16."""
    g = torch.Generator().manual_seed(100 + m)
    for blocksize in (64, 128):
        q = weight((37, 512), blocksize, True)
        w = nf4.dequantize(q, torch.bfloat16)
        x = torch.randn(m, 512, generator=g).to(torch.bfloat16)
        assert_matmul_close(_C.nf4_linear_cpu(x, *fields(q), None), torch.nn.functional.linear(x, w), x, w.T)


def test_gemv_of_bf16_x_with_subnormal_operands_falls_back_exactly(isa):
    """vdpbf16ps flushes subnormal inputs and products to zero (Note: subnormals in
    csrc/nf4_cpu_avx512.cpp): a subnormal in x, or a scale small enough to make a weight or a
    product subnormal, sends the call to the FMA path. x = scaled rows of the identity: one
    product a sum, so y must be that float32 product rounded to bf16 (a subnormal, not zero)."""
    q = weight((24, 256), 64, False)
    cases = (
        (q, 3e-39),  # x holds bf16 subnormals, the weights are normal
        (nf4.NF4Weight(q.packed, torch.full_like(q.absmax, 1e-20), q.shape, q.dtype, 64), 1e-20),  # subnormal products
        (nf4.NF4Weight(q.packed, torch.full_like(q.absmax, 1e-39), q.shape, q.dtype, 64), 1.0),  # subnormal weights
    )
    for qc, scale in cases:
        w = nf4.dequantize(qc, torch.bfloat16)  # (N, K)
        ks = torch.tensor([0, 5, 64, 255])
        x = (torch.eye(256)[ks] * scale).to(torch.bfloat16)  # (4, K)
        expected = (x[torch.arange(4), ks].float()[:, None] * w[:, ks].T.float()).to(torch.bfloat16)
        assert (expected != 0).any()
        assert torch.equal(bits(_C.nf4_linear_cpu(x, *fields(qc), None)), bits(expected)), f"{isa} x scale {scale}"


def test_gemv_keeps_leading_dimensions(isa):
    q = weight((24, 64), 32, False)
    x = torch.randn(2, 3, 64)
    y = _C.nf4_linear_cpu(x, *fields(q), None)  # (2, 3, 24)
    assert y.shape == (2, 3, 24)
    assert_matmul_close(y.view(6, 24), torch.nn.functional.linear(x, nf4.dequantize(q)).view(6, 24), x.view(6, 64), nf4.dequantize(q).T)


def test_errors_say_what_was_seen():
    q = weight((24, 64), 32, True)
    with pytest.raises(RuntimeError, match="1 to 16 rows.*got 17"):
        _C.nf4_linear_cpu(torch.randn(17, 64), *fields(q), None)
    with pytest.raises(RuntimeError, match="absmax must be 48 contiguous"):
        _C.nf4_dequantize_cpu(q.packed, q.absmax[:-1], q.nested_absmax, q.offset, [24, 64], 32, torch.float32)
    with pytest.raises(ValueError, match="cpu isa must be one of"):
        _C.set_cpu_isa("sse9")
