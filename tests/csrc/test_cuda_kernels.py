"""lowrank._C's CUDA kernels against the reference on the GPU, at real sizes: dequantize bit for
bit, the GEMV within the derived bound of tests/ops/bounds.py (the reference there is
nf4.dequantize in x.dtype, then F.linear, i.e. cuBLAS)."""

import pytest
import torch

from lowrank import nf4
from tests.ops.bounds import assert_matmul_close

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def C():
    from lowrank import _C

    if not _C.with_cuda:
        pytest.skip("lowrank._C was built without CUDA (a CPU torch, or no nvcc at build time)")
    return _C


def fields(q):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)


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


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (96, 256)])
@pytest.mark.parametrize("m", [1, 3, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_gemv_within_the_derived_bound(C, shape, m, dtype):
    g = torch.Generator(device="cuda").manual_seed(m)
    q = nf4.quantize(torch.randn(shape, device="cuda", generator=g), 64, True)
    w = nf4.dequantize(q, dtype)  # (N, K), the reference's operand
    x = torch.randn(m, shape[1], device="cuda", generator=g).to(dtype)
    bias = torch.randn(shape[0], device="cuda", generator=g).to(dtype)
    ours = C.nf4_linear_cuda(x, *fields(q), bias)
    assert ours.dtype == dtype and ours.shape == (m, shape[0])
    assert_matmul_close(ours, torch.nn.functional.linear(x, w, bias), x, w.T, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gemv_of_one_hot_rows_is_a_column_of_w(C, dtype):
    q = nf4.quantize(torch.randn(1024, 512, device="cuda"), 64, True)
    w = nf4.dequantize(q, dtype)
    ks = torch.arange(0, 512, 37, device="cuda")[:16]
    x = torch.eye(512, dtype=dtype, device="cuda")[ks]  # (16, K)
    assert torch.equal(bits(C.nf4_linear_cuda(x, *fields(q), None)), bits(w[:, ks].T.contiguous()))
