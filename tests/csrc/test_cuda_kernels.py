"""lowrank._C's CUDA kernels against the reference on the GPU, at real sizes: dequantize bit for
bit, the GEMV within the derived bound of tests/ops/bounds.py (the reference there is
nf4.dequantize in x.dtype, then F.linear, i.e. cuBLAS). Every kernel of each op is tested
(the GEMV kernels "mma", "simt", "mma-staged", "mma-staged2" and "mma-lut" of csrc/nf4_cuda.h), not only
the default. mma-lut multiplies another operand than the reference's (T(NF4[code]) * scale, its block sums
scaled: csrc/nf4_cuda_gemv_lut.cu, Note: pairs and block sums), so it is checked against the float64
product of that operand with the a-priori bound of tests/ops/bounds.py instead."""

import pytest
import torch

from lowrank import nf4
from tests.csrc.operands import lut_operand
from tests.ops.bounds import assert_matmul_close, assert_within_bound

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def C():
    from lowrank import _C

    if not _C.with_cuda:
        pytest.skip("lowrank._C was built without CUDA (a CPU torch, or no nvcc at build time)")
    return _C


def fields(q):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)


MMA, SIMT, STAGED, STAGED2, LUT, DEEP = 1, 2, 3, 4, 5, 6  # csrc/nf4_cuda.h kGemvMma, kGemvSimt, kGemvMmaStaged, kGemvMmaStaged2, kGemvMmaLut, kGemvMmaLutDeep


def bits(t):
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


# Llama-2-7B projections, odd numel with a short last block, a weight smaller than one CTA.
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (333, 777), (3, 5)])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_dequantize_is_bit_exact(C, shape, blocksize, double_quant):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = nf4.quantize(torch.randn(shape, device="cuda", generator=g), blocksize, double_quant)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ours = C.nf4_dequantize_cuda(*fields(q), dtype)
        assert torch.equal(bits(ours), bits(nf4.dequantize(q, dtype))), f"{shape} {blocksize} {dtype}"


@pytest.mark.parametrize("numel", [1, 7, 9, 4099])
def test_cuda_dequantize_short_and_misaligned(C, numel):
    """Fewer than 8 elements (the tail alone), odd sizes, and a packed view one byte in (the scalar path)."""
    q = nf4.quantize(torch.randn(numel, device="cuda"), 64, True)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(bits(C.nf4_dequantize_cuda(*fields(q), dtype)), bits(nf4.dequantize(q, dtype)))
    padded = torch.cat([torch.zeros(1, dtype=torch.uint8, device="cuda"), q.packed])[1:]  # data_ptr % 4 == 1
    ours = C.nf4_dequantize_cuda(padded, *fields(q)[1:], torch.bfloat16)
    assert torch.equal(bits(ours), bits(nf4.dequantize(q, torch.bfloat16)))


def check_gemv(C, shape, m, dtype, kernel, blocksize=64, double_quant=True):
    g = torch.Generator(device="cuda").manual_seed(m)
    q = nf4.quantize(torch.randn(shape, device="cuda", generator=g), blocksize, double_quant)
    w = nf4.dequantize(q, dtype)  # (N, K), the reference's operand
    x = torch.randn(m, shape[1], device="cuda", generator=g).to(dtype)
    bias = torch.randn(shape[0], device="cuda", generator=g).to(dtype)
    ours = C.nf4_linear_cuda(x, *fields(q), bias, kernel=kernel)
    assert ours.dtype == dtype and ours.shape == (m, shape[0])
    assert_matmul_close(ours, torch.nn.functional.linear(x, w, bias), x, w.T, bias)


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (96, 256)])
@pytest.mark.parametrize("m", [1, 3, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_simt_gemv_within_the_derived_bound(C, shape, m, dtype):
    check_gemv(C, shape, m, dtype, SIMT)


# Llama shapes; N not a multiple of 16 and K not a multiple of the 128-column tile; K % blocksize != 0
# (blocks straddle rows); fewer tiles than warps; every M bucket of the kernel (8, 16, 32, 64 rows)
@pytest.mark.parametrize("shape, blocksize", [((4096, 4096), 64), ((11008, 4096), 64), ((4096, 11008), 64),
                                              ((333, 800), 64), ((50, 800), 256), ((40, 96), 32), ((17, 4128), 4096)])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize("kernel, dtype", [(MMA, torch.float16), (MMA, torch.bfloat16), (STAGED, torch.bfloat16)])
def test_cuda_mma_gemv_within_the_derived_bound(C, shape, blocksize, m, dtype, kernel):
    check_gemv(C, shape, m, dtype, kernel, blocksize)


@pytest.mark.parametrize("shape, blocksize", [((4096, 4096), 64), ((11008, 4096), 64), ((4096, 11008), 64),
                                              ((333, 800), 64), ((50, 800), 256), ((40, 96), 32), ((17, 4128), 4096)])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16])
def test_cuda_staged2_gemv_within_the_derived_bound(C, shape, blocksize, m):
    """Two m16 row tiles a warp, 16 warps a CTA (up to 16 rows of x): the same shapes as the mma
    kernels. (The staged kernels share the mma kernel's float16 / bfloat16 code, Mma<T>: float16 is
    tested on them through the one-hot rows below.)"""
    check_gemv(C, shape, m, torch.bfloat16, STAGED2, blocksize)


@pytest.mark.parametrize("kernel", [MMA, STAGED, STAGED2])
def test_cuda_mma_gemv_without_double_quant(C, kernel):
    check_gemv(C, (1000, 1024), 7, torch.bfloat16, kernel, double_quant=False)


# mma-staged: K = 16 x 128 + 96 at blocksize 32 gives 17 tiles, 3 a warp: each warp one batch and a
# tile after it, the last warp a whole tile and the partial one (lanes past K); N = 17: a second CTA
# of one row. K = 16384 at blocksize 32: 8194 scales a CTA, five rounds of the prologue's loads.
# K = 32768 at blocksize 32: the scales do not fit in shared memory (16 K / blocksize + 2 >
# kStagedScales), so the call runs the mma kernel instead.
# mma-staged2: 32 rows a CTA, so N = 17 is one CTA and 40 two; its scales fit up to half the K
# (K = 16384 at blocksize 32 runs the mma kernel), and K = 8192 gives it two rounds of 4096.
@pytest.mark.parametrize("shape, blocksize, m", [((17, 2144), 32, 3), ((40, 16384), 32, 9), ((64, 32768), 32, 1),
                                                 ((40, 8192), 32, 9)])
@pytest.mark.parametrize("kernel", [STAGED, STAGED2])
def test_cuda_staged_gemv_remainders_and_large_k(C, shape, blocksize, m, kernel):
    check_gemv(C, shape, m, torch.bfloat16, kernel, blocksize)


@pytest.mark.parametrize("shape, blocksize, m", [((4096, 4096), 64, 1), ((333, 800), 64, 9), ((17, 2144), 32, 3),
                                                 ((50, 800), 256, 33), ((1024, 4096), 64, 64)])
def test_cuda_staged_gemv_equals_the_mma_kernel_bit_for_bit(C, shape, blocksize, m):
    """Same lanes, tiles, mma steps and reduction order (csrc/nf4_cuda_gemv_staged.cu, Note: staged
    scales): only the bookkeeping differs, so every output is the same float."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q = nf4.quantize(torch.randn(shape, device="cuda", generator=g), blocksize, True)
    x = torch.randn(m, shape[1], device="cuda", generator=g).bfloat16()
    mma, staged = (C.nf4_linear_cuda(x, *fields(q), None, kernel=k) for k in (MMA, STAGED))
    assert torch.equal(bits(staged), bits(mma))


@pytest.mark.parametrize("kernel, dtype", [(SIMT, torch.float32), (SIMT, torch.bfloat16), (MMA, torch.bfloat16),
                                           (MMA, torch.float16), (STAGED, torch.bfloat16), (STAGED, torch.float16),
                                           (STAGED2, torch.bfloat16), (STAGED2, torch.float16)])
def test_cuda_gemv_of_one_hot_rows_is_a_column_of_w(C, kernel, dtype):
    q = nf4.quantize(torch.randn(1024, 512, device="cuda"), 64, True)
    w = nf4.dequantize(q, dtype)
    ks = torch.arange(0, 512, 37, device="cuda")[:14]
    x = torch.eye(512, dtype=dtype, device="cuda")[ks]  # (14, K): up to 16 rows, every kernel takes it
    assert torch.equal(bits(C.nf4_linear_cuda(x, *fields(q), None, kernel=kernel)), bits(w[:, ks].T.contiguous()))


def test_cuda_gemv_refuses_what_it_cannot_do(C):
    q = nf4.quantize(torch.randn(64, 256, device="cuda"), 64, True)
    for kernel in (MMA, STAGED, STAGED2, LUT):
        with pytest.raises(RuntimeError, match="mma kernels take float16 or bfloat16"):
            C.nf4_linear_cuda(torch.randn(1, 256, device="cuda"), *fields(q), None, kernel=kernel)


def lut_runs(shape, blocksize):
    """Whether mma-lut runs itself (else it runs mma-staged): K % 64 == 0, blocksize >= 64, and its
    16 K / 64 staged scales within 64 KiB (csrc/nf4_cuda_gemv_lut.cu)."""
    return shape[1] % 64 == 0 and blocksize >= 64 and 16 * (shape[1] // 64) <= 16 * 1024


# Llama shapes (K = 4096: 8 tiles a warp, one trip of two batches; K = 11008: 22 tiles a warp, an odd
# number of batches and two tiles after them); 13 tiles (2 a warp, no batch, the last warp idle);
# K % blocksize != 0 (blocks straddle rows); N a single short CTA; K = 65536 (64 KiB of scales, opted
# in); and what it hands to mma-staged: K % 64 == 32, blocksize 32, K = 65600 (over 64 KiB).
# Above 4 rows of x the launcher groups row tiles (Note: row tiles across warps): 2 a CTA at N = 4096
# and 4100 (the last CTA 4 rows), 4 at N = 11008 and 8200 (the last CTA 8 rows: 3 of its 4 row tiles
# all clamped).
# (float16 on the first two shapes; the one-hot test below takes it on every lane and tile.)
@pytest.mark.parametrize("shape, blocksize, dtype", [
    ((4096, 4096), 64, torch.bfloat16), ((4096, 4096), 64, torch.float16), ((11008, 4096), 64, torch.bfloat16),
    ((11008, 4096), 64, torch.float16), ((4096, 11008), 64, torch.bfloat16), ((333, 832), 64, torch.bfloat16),
    ((50, 768), 256, torch.bfloat16), ((17, 4160), 4096, torch.bfloat16), ((5, 65536), 64, torch.bfloat16),
    ((4100, 640), 64, torch.bfloat16), ((8200, 640), 128, torch.float16),
    ((333, 800), 64, torch.bfloat16), ((40, 96), 32, torch.bfloat16), ((16, 65600), 64, torch.bfloat16)])
@pytest.mark.parametrize("m", [1, 5, 9, 17, 64])
def test_cuda_lut_gemv_within_the_bound_of_its_operand(C, shape, blocksize, dtype, m):
    g = torch.Generator(device="cuda").manual_seed(m)
    q = nf4.quantize(torch.randn(shape, device="cuda", generator=g), blocksize, True)
    x = torch.randn(m, shape[1], device="cuda", generator=g).to(dtype)
    bias = torch.randn(shape[0], device="cuda", generator=g).to(dtype)
    ours = C.nf4_linear_cuda(x, *fields(q), bias, kernel=LUT)
    assert ours.dtype == dtype and ours.shape == (m, shape[0])
    if lut_runs(shape, blocksize):
        assert_within_bound(ours, x, lut_operand(q, dtype).T, bias, extra_roundings=shape[1] // 64)
    else:
        assert torch.equal(bits(ours), bits(C.nf4_linear_cuda(x, *fields(q), bias, kernel=STAGED)))


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 14336), (333, 4608)])
def test_cuda_deep_lut_gemv_equals_mma_lut_bit_for_bit(C, shape):
    """csrc/nf4_cuda_gemv_lut.cu, Note: deep batches: the same sums in the same order, so the same bits."""
    g = torch.Generator(device="cuda").manual_seed(shape[0])
    q = nf4.quantize(torch.randn(shape, device="cuda", generator=g), 64, True)
    for m in (1, 4, 8, 16):
        x = torch.randn(m, shape[1], device="cuda", generator=g).bfloat16()
        bias = torch.randn(shape[0], device="cuda", generator=g).bfloat16()
        deep = C.nf4_linear_cuda(x, *fields(q), bias, kernel=DEEP)
        assert torch.equal(bits(deep), bits(C.nf4_linear_cuda(x, *fields(q), bias, kernel=LUT))), (shape, m)


def test_cuda_lut_gemv_groups_fewer_row_tiles_when_the_scales_do_not_fit(C):
    """N = 8192 at 9 rows would take 4 row tiles a CTA, but at K = 20480 their 16 x 4 x 320 scales pass
    64 KiB: the launcher takes 2 (one of the two paths a weight this wide has)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    q = nf4.quantize(torch.randn(8192, 20480, device="cuda", generator=g), 64, True)
    x = torch.randn(9, 20480, device="cuda", generator=g).bfloat16()
    assert_within_bound(C.nf4_linear_cuda(x, *fields(q), None, kernel=LUT), x, lut_operand(q, torch.bfloat16).T,
                        extra_roundings=20480 // 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_lut_gemv_without_double_quant(C, dtype):
    q = nf4.quantize(torch.randn(1000, 1024, device="cuda"), 64, False)
    x = torch.randn(7, 1024, device="cuda").to(dtype)
    assert_within_bound(C.nf4_linear_cuda(x, *fields(q), None, kernel=LUT), x, lut_operand(q, dtype).T,
                        extra_roundings=1024 // 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_lut_gemv_of_one_hot_rows_is_a_column_of_its_operand(C, dtype):
    """x = e_k: every block sum is T(NF4[code]) exactly or 0, so the output is the float32 product
    scale * T(NF4[code]) rounded once to T, bit for bit (the pair table's order, the scale of each row and
    tile, the lanes' columns). 14 rows and N = 4112: two row tiles a CTA, the last CTA 16 rows."""
    n, k = 4112, 512
    q = nf4.quantize(torch.randn(n, k, device="cuda"), 64, True)
    scales = nf4.dequantize_scales(q.absmax, q.nested_absmax, q.offset).repeat_interleave(64)
    codes = nf4.unpack(q.packed, n * k).long()
    expected = (nf4.NF4_CODE.to("cuda", dtype).float()[codes] * scales).to(dtype).reshape(n, k)
    for ks in (torch.arange(0, k, 37, device="cuda")[:14], torch.arange(3, k, 129, device="cuda")):  # 14 rows, 4 rows
        x = torch.eye(k, dtype=dtype, device="cuda")[ks]
        ours = C.nf4_linear_cuda(x, *fields(q), None, kernel=LUT)
        assert torch.equal(bits(ours), bits(expected[:, ks].T.contiguous())), len(ks)


def test_cuda_gemv_refuses_too_many_rows(C):
    """Messages with numbers: on the H200 machine (torch 2.11) a failing TORCH_CHECK that formats a
    number crashed the process (docs/csrc.md, Known problems); these are built with std::to_string.
    benchmarks/gpu_check.sh runs this test in a process of its own."""
    q = nf4.quantize(torch.randn(64, 256, device="cuda"), 64, True)
    with pytest.raises(RuntimeError, match="1 to 16 rows for this kernel, got 17"):
        C.nf4_linear_cuda(torch.randn(17, 256, device="cuda"), *fields(q), None, kernel=SIMT)
    with pytest.raises(RuntimeError, match="1 to 64 rows for this kernel, got 65"):
        C.nf4_linear_cuda(torch.randn(65, 256, device="cuda", dtype=torch.bfloat16), *fields(q), None)
    with pytest.raises(RuntimeError, match="1 to 16 rows for this kernel, got 17"):
        C.nf4_linear_cuda(torch.randn(17, 256, device="cuda", dtype=torch.bfloat16), *fields(q), None, kernel=STAGED2)
    with pytest.raises(RuntimeError, match="1 to 64 rows for this kernel, got 65"):
        C.nf4_linear_cuda(torch.randn(65, 256, device="cuda", dtype=torch.bfloat16), *fields(q), None, kernel=LUT)
    with pytest.raises(RuntimeError, match="kernel must be 0 .auto.*5 .mma-lut. or 6 .mma-lut-deep., got 7"):
        C.nf4_linear_cuda(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), *fields(q), None, kernel=7)


@pytest.mark.parametrize("m", [1, 16, 32, 33, 64, 65])
def test_cuda_op_through_the_backend_table(C, monkeypatch, m):
    """torch.ops.lowrank.nf4_linear on CUDA with the csrc backend: the GEMV up to 32 rows, then dequantize +
    cuBLAS; the same bound either way, and opcheck (fake kernel, autograd registration) passes."""
    from lowrank import ops
    from tests.ops.test_library import fields as op_fields

    monkeypatch.setenv("LOWRANK_BACKEND", "csrc")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    q = nf4.quantize(torch.randn(1024, 2048, device="cuda") * 0.02, 64, True)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    w = nf4.dequantize(q, torch.bfloat16)
    assert_matmul_close(ops.nf4_linear(x, q), torch.nn.functional.linear(x, w), x, w.T)
    torch.library.opcheck(torch.ops.lowrank.nf4_linear.default, (x.requires_grad_(), *op_fields(q), None))


@pytest.mark.parametrize("m", [16, 17, 32])
def test_cuda_op_float32_takes_the_gemv_up_to_its_16_rows(C, monkeypatch, m):
    """float32 x: the CUDA-core GEMV takes 16 rows at most, so 17..32 rows (which float16 / bfloat16
    send to the GEMV) go to dequantize + cuBLAS, within the same bound, from C++ and Python alike."""
    from lowrank import ops
    from lowrank.ops import csrc

    monkeypatch.setenv("LOWRANK_BACKEND", "csrc")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    q = nf4.quantize(torch.randn(512, 1024, device="cuda") * 0.02, 64, True)
    x = torch.randn(m, 1024, device="cuda")
    w = nf4.dequantize(q, torch.float32)
    assert_matmul_close(ops.nf4_linear(x, q), torch.nn.functional.linear(x, w), x, w.T)
    assert csrc._gemv_covers(x, q.shape, 64) == (m <= 16)
    assert csrc._gemv_covers(x.bfloat16(), q.shape, 64)


def test_cuda_op_replays_in_a_cuda_graph(C):
    """Decoding runs the op from CUDA graphs: capture nf4_linear (GEMV and dequantize + cuBLAS),
    change x in place, replay: the same values as an eager call."""
    from lowrank import ops

    q = nf4.quantize(torch.randn(512, 1024, device="cuda"), 64, True)
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    big = torch.randn(200, 1024, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ops.nf4_linear(x, q), ops.nf4_linear(big, q)  # warm-up off the default stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, y_big = ops.nf4_linear(x, q), ops.nf4_linear(big, q)
    x.copy_(torch.randn_like(x))
    big.copy_(torch.randn_like(big))
    graph.replay()
    assert torch.equal(y, ops.nf4_linear(x, q)) and torch.equal(y_big, ops.nf4_linear(big, q))
