"""The Triton kernels against the reference, in Triton's interpreter on CPU (tests/conftest.py
sets TRITON_INTERPRET=1 without CUDA) and on the GPU when there is one. Small, odd shapes:
the interpreter runs every program in Python."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from lowrank import nf4, ops  # noqa: E402
from lowrank.ops import backends, triton_gemv, triton_matmul, triton_nf4_tile  # noqa: E402
from tests.ops.bounds import assert_matmul_close  # noqa: E402
from tests.ops.test_library import assert_layouts_give_the_same_results, fields, opcheck_args, weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True, params=triton_nf4_tile.LOOKUPS)
def triton_backend(monkeypatch, request):
    """Every test with both NF4 lookups, with the split-K GEMV up to MAX_M rows and the fused kernels
    above (the default route, dequantize + F.linear, has its own tests below). See Note: two ways to
    look up an NF4 value, and Note: fused or dequantize + cuBLAS."""
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    monkeypatch.setattr(triton_nf4_tile, "LOOKUP", request.param)
    monkeypatch.setattr(triton_matmul, "FUSED", True)
    monkeypatch.setattr(triton_matmul, "SKINNY", True)


def on_device(q):
    return q.to(DEVICE)


# -- dequantize: exactly the reference ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, blocksize, double_quant",
    [
        ((16, 64), 64, True),  # whole blocks
        ((9, 13), 32, True),  # 117 elements: blocks straddle rows, a short last block, an odd byte
        ((3, 300), 256, False),  # float32 scales
        ((70, 40), 32, True),  # 88 blocks, several programs
        ((600, 512), 64, True),  # 4800 blocks: more than one nested (256-block) scale group
    ],
)
def test_dequantize_is_bit_exact(shape, blocksize, double_quant, dtype):
    q = on_device(weight(*shape, blocksize=blocksize, double_quant=double_quant))
    assert torch.equal(ops.nf4_dequantize(q, dtype), nf4.dequantize(q, dtype))


@settings(max_examples=12)
@given(
    n_out=st.integers(1, 40), k_in=st.integers(1, 70), blocksize=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-30, 1.0, 1e30]),
)  # fmt: skip
def test_dequantize_is_bit_exact_any_shape(n_out, k_in, blocksize, dtype, scale):
    w = torch.randn(n_out, k_in) * scale  # tiny and huge scales: subnormal and overflowing bf16/fp16 values
    q = on_device(nf4.quantize(w, blocksize))
    assert torch.equal(ops.nf4_dequantize(q, dtype), nf4.dequantize(q, dtype))


# -- nf4_linear and its input gradient: within the derived bound of the reference ---------

# (M, N, K, blocksize): M = 1 (GEMV), 3 and 17 (skinny, split-K), 70 (> MAX_M: tiled);
# N, K not multiples of the tiles; K = 100 and 37 not multiples of the blocksize (blocks straddle rows)
SHAPES = [(1, 40, 96, 32), (3, 33, 64, 64), (17, 20, 100, 32), (70, 24, 64, 32), (70, 9, 37, 32), (1, 7, 9, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n_out, k_in, blocksize", SHAPES)
def test_linear_within_bound_of_reference(m, n_out, k_in, blocksize, dtype):
    q = on_device(weight(n_out, k_in, blocksize))
    x = torch.randn(m, k_in, device=DEVICE).to(dtype)
    b = torch.randn(n_out, device=DEVICE).to(dtype)
    w = nf4.dequantize(q, dtype)  # (N, K): the operand both sides use (bit-exact, tested above)
    assert_matmul_close(ops.nf4_linear(x, q, b), F.linear(x, w, b), x, w.T, b)
    assert_matmul_close(ops.nf4_linear(x, q), F.linear(x, w), x, w.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n_out, k_in, blocksize", [(1, 40, 96, 32), (17, 20, 100, 32), (70, 24, 64, 32)])
def test_grad_input_within_bound_of_reference(m, n_out, k_in, blocksize, dtype):
    q = on_device(weight(n_out, k_in, blocksize))
    gy = torch.randn(m, n_out, device=DEVICE).to(dtype)
    w = nf4.dequantize(q, dtype)  # (N, K)
    gx = torch.ops.lowrank.nf4_linear_grad_input(gy, *fields(q))  # (M, N) @ (N, K)
    assert_matmul_close(gx, gy @ w, gy, w)


def test_gradients_match_autograd_through_the_reference():
    q = on_device(weight(24, 64, 32))
    x = torch.randn(2, 35, 64, device=DEVICE).to(torch.bfloat16).requires_grad_()  # 70 rows: the tiled kernels
    b = torch.randn(24, device=DEVICE).to(torch.bfloat16).requires_grad_()
    g = torch.randn(2, 35, 24, device=DEVICE).to(torch.bfloat16)
    ops.nf4_linear(x, q, b).backward(g)
    w = nf4.dequantize(q, torch.bfloat16)  # (24, 64)
    x_ref, b_ref = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.linear(x_ref, w, b_ref).backward(g)  # plain autograd through the reference's dense W
    assert_matmul_close(x.grad, x_ref.grad, g.view(70, 24), w)
    assert_matmul_close(b.grad, b_ref.grad, torch.ones(1, 70, device=DEVICE, dtype=torch.bfloat16), g.view(70, 24))


@pytest.mark.parametrize("skinny", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_kernel_choice_rule(monkeypatch, fused, skinny):
    """# See Note: skinny or tiled. M <= MAX_M rows go to the split-K kernel (SKINNY), more (or all,
    without SKINNY) to the tiled one (FUSED) or to the Triton dequantize and F.linear."""
    calls = []
    monkeypatch.setattr(triton_matmul, "FUSED", fused)
    monkeypatch.setattr(triton_matmul, "SKINNY", skinny)
    monkeypatch.setattr(triton_gemv, "linear", lambda *a: calls.append("gemv") or torch.zeros(()))
    monkeypatch.setattr(triton_matmul, "linear", lambda *a: calls.append("tiled") or torch.zeros(()))
    real = triton_matmul.triton_dequantize.dequantize
    monkeypatch.setattr(triton_matmul.triton_dequantize, "dequantize", lambda *a: calls.append("dequantize") or real(*a))
    q = weight(8, 32)
    for m in (1, triton_gemv.MAX_M, triton_gemv.MAX_M + 1):
        triton_matmul.nf4_linear(torch.randn(m, 32), *fields(q), None)
    other = "tiled" if fused else "dequantize"
    assert calls == (["gemv", "gemv"] if skinny else [other, other]) + [other]


@pytest.mark.parametrize("rows", [3, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_then_cublas_route_within_bound(monkeypatch, dtype, rows):
    """The default route at every M (FUSED = SKINNY = False): forward, grad_x and autograd."""
    monkeypatch.setattr(triton_matmul, "FUSED", False)
    monkeypatch.setattr(triton_matmul, "SKINNY", False)
    q = on_device(weight(24, 100, 32))
    x = torch.randn(rows, 100, device=DEVICE).to(dtype).requires_grad_()
    b = torch.randn(24, device=DEVICE).to(dtype)
    g = torch.randn(rows, 24, device=DEVICE).to(dtype)
    w = nf4.dequantize(q, dtype)  # (N, K)
    y = ops.nf4_linear(x, q, b)
    assert_matmul_close(y, F.linear(x, w, b), x.detach(), w.T, b)
    y.backward(g)
    assert_matmul_close(x.grad, g @ w, g, w)


def test_split_k_really_splits():
    """The interpreter plans with 2 SMs, so a 64-column K is split in two: the partial sums
    and their reduction are exercised on CPU (test_linear_... checks the values)."""
    assert triton_gemv._split(40, 96, 32, torch.device("cpu")) == 64  # 96 columns -> splits of 64 + 32
    assert triton_gemv._split(40, 32, 32, torch.device("cpu")) == 32  # a single K step is never split


def test_empty_shapes_need_no_kernel():
    q = on_device(weight(5, 32))
    b = torch.randn(5, device=DEVICE)
    assert torch.equal(ops.nf4_linear(torch.randn(0, 32, device=DEVICE), q, b), torch.empty(0, 5, device=DEVICE))
    gy = torch.randn(0, 5, device=DEVICE)
    assert torch.ops.lowrank.nf4_linear_grad_input(gy, *fields(q)).shape == (0, 32)


def test_empty_weight_gives_zero_gradients():
    # N = 0: grad_input reshaped grad_y by N before its empty-shape check and raised
    q = on_device(weight(0, 32))
    gy = torch.randn(4, 0, device=DEVICE)
    assert torch.equal(torch.ops.lowrank.nf4_linear_grad_input(gy, *fields(q)), torch.zeros(4, 32, device=DEVICE))


def test_every_layout_the_checks_accept_gives_the_same_results():
    # strided fields and bias were read as flat arrays: wrong values, and a stride-0 bias read past its storage
    assert_layouts_give_the_same_results(weight(70, 128, blocksize=32), device=DEVICE)


def test_opcheck_triton():
    args = opcheck_args(torch.bfloat16, m=3)
    args["nf4_linear_tiled"] = opcheck_args(torch.float32, double_quant=False, m=70)["nf4_linear"]
    for name, a in args.items():
        a = tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in a)
        torch.library.opcheck(getattr(torch.ops.lowrank, name.removesuffix("_tiled")).default, a)
    assert backends.choose("nf4_linear", torch.device(DEVICE))[0] == "triton"
