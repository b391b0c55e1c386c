"""The Triton kernels at real sizes on a CUDA device (skipped without one): Llama-3-8B
layer shapes, the same exactness and derived bounds as the interpreter tests."""

import pytest
import torch
import torch.nn.functional as F

from lowrank import nf4, ops
from lowrank.ops import triton_matmul, triton_nf4_tile
from tests.ops.bounds import assert_matmul_close
from tests.ops.test_library import fields

pytestmark = pytest.mark.gpu
LLAMA = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N, K) of q/o, k/v, up/gate, down


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    # the bound assumes float32 accumulation; cuBLAS may otherwise reduce split-K partials in 16 bits
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)


def cuda_weight(n_out, k_in, blocksize=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return nf4.quantize(torch.randn(n_out, k_in, device="cuda", generator=g) * 0.02, blocksize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, blocksize", [((4096, 4096), 64), ((14336, 4096), 64), ((4095, 4097), 64), ((1000, 999), 128)])
def test_dequantize_bit_exact_large(shape, blocksize, dtype):
    q = cuda_weight(*shape, blocksize)
    assert torch.equal(ops.nf4_dequantize(q, dtype), nf4.dequantize(q, dtype))


@pytest.mark.parametrize("m", [1, 16, 64, 256, 4096])
@pytest.mark.parametrize("n_out, k_in", LLAMA)
def test_linear_llama_shapes(m, n_out, k_in):
    q = cuda_weight(n_out, k_in)
    x = torch.randn(m, k_in, device="cuda", dtype=torch.bfloat16)
    w = nf4.dequantize(q, torch.bfloat16)  # (N, K)
    assert_matmul_close(ops.nf4_linear(x, q), F.linear(x, w), x, w.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m, n_out, k_in", [(1, 4096, 4096), (3, 1000, 4097), (17, 999, 1000), (300, 1030, 4100)])
def test_linear_odd_shapes_and_dtypes(m, n_out, k_in, dtype):
    q = cuda_weight(n_out, k_in)
    x = torch.randn(m, k_in, device="cuda", dtype=dtype)
    b = torch.randn(n_out, device="cuda", dtype=dtype)
    w = nf4.dequantize(q, dtype)
    assert_matmul_close(ops.nf4_linear(x, q, b), F.linear(x, w, b), x, w.T, b)


@pytest.mark.parametrize("lookup", triton_nf4_tile.LOOKUPS)
@pytest.mark.parametrize("m, fused, skinny", [(1, False, True), (16, False, True), (16, False, False), (4096, True, False)])
def test_linear_variants(monkeypatch, lookup, m, fused, skinny):
    """The NF4 lookups, the split-K GEMV and the fused large-M kernel (neither the default route)
    at 4096 x 4096."""
    monkeypatch.setattr(triton_nf4_tile, "LOOKUP", lookup)
    monkeypatch.setattr(triton_matmul, "FUSED", fused)
    monkeypatch.setattr(triton_matmul, "SKINNY", skinny)
    q = cuda_weight(4096, 4096)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w = nf4.dequantize(q, torch.bfloat16)
    assert torch.equal(ops.nf4_dequantize(q, torch.bfloat16), w)
    assert_matmul_close(ops.nf4_linear(x, q), F.linear(x, w), x, w.T)
    if fused:
        g = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        assert_matmul_close(torch.ops.lowrank.nf4_linear_grad_input(g, *fields(q)), g @ w, g, w)


@pytest.mark.parametrize("n_out, k_in", [(4096, 4096), (4096, 14336)])
def test_grad_input_large(n_out, k_in):
    q = cuda_weight(n_out, k_in)
    x = torch.randn(4096, k_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4096, n_out, device="cuda", dtype=torch.bfloat16)
    ops.nf4_linear(x, q).backward(g)
    w = nf4.dequantize(q, torch.bfloat16)  # (N, K)
    assert_matmul_close(x.grad, g @ w, g, w)  # (M, N) @ (N, K)


def test_opcheck_cuda():
    q = cuda_weight(96, 128)
    x = torch.randn(5, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank.nf4_linear.default, (x, *fields(q), None))
    torch.library.opcheck(torch.ops.lowrank.nf4_dequantize.default, (*fields(q), torch.bfloat16))
