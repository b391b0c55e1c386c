"""nf4_linear on the CPU where the GEMV does not go: W dequantized a chunk of rows at a time
(csrc/nf4_cpu_chunks.cpp, Note: W a chunk at a time; 8 MiB of W a chunk, so 1024 rows of K = 4096
in bf16, 512 in float32). Every output element comes from one product of x and a dequantized row,
so the result is the reference's (dequantize whole + F.linear) within the product's derived bound,
across chunk boundaries, the last partial chunk, a bias, leading dimensions and the three dtypes;
the Python kernel (lowrank/ops/csrc.py) computes the same bits as the C++ one."""

import pytest
import torch

from lowrank import nf4, ops
from lowrank.ops import backends
from tests.ops.bounds import assert_matmul_close

pytest.importorskip("lowrank._C")

N, K = 2500, 4096  # bf16: chunks of 1024, 1024 and 452 rows; float32: 512 rows, 5 chunks


@pytest.fixture(scope="module")
def q():
    g = torch.Generator().manual_seed(0)
    return nf4.quantize(torch.randn(N, K, generator=g), 64, True)


def fields(q):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead, bias", [((17,), False), ((2, 9), True)])  # M = 17 and 18, past the GEMV's 16
def test_chunks_of_w_give_the_reference_product(q, dtype, lead, bias, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "csrc")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    w = nf4.dequantize(q, dtype)  # the reference's operand
    ours = ops.nf4_linear(x, q, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert ours.shape == ref.shape == (*lead, N) and ours.dtype == dtype and ours.is_contiguous()
    x2 = x.reshape(-1, K)
    assert_matmul_close(ours.reshape(-1, N), ref.reshape(-1, N), x2, w.T, b)


def test_the_python_kernel_computes_the_same_bits(q, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "csrc")
    x = torch.randn(20, K, dtype=torch.bfloat16)
    cpp = torch.ops.lowrank.nf4_linear(x, *fields(q), None)
    python = backends.implementation("nf4_linear", "csrc")(x, *fields(q), None)
    assert torch.equal(cpp, python)
