"""lowrank::nf4_experts_linear (lowrank/ops/experts_ops.py): each row times its own expert of a
4-bit experts tensor. Its kernels against the float64 product of the exactly dequantized
experts (tests/ops/bounds.py, Note: the matmul error bound), its gradient, opcheck, its errors."""

from __future__ import annotations

import re

import pytest
import torch

from lowrank import nf4
from lowrank.ops import backends, experts_ops
from tests.ops.bounds import assert_matmul_close

# triton: under its interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA)
BACKENDS = [b for b in ("csrc", "triton", "reference") if b in backends.available(experts_ops.OP)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", request.param)
    return request.param


def experts(shape, blocksize=64, double_quant=True, seed=0):
    """(fields for the op, the dense float32 experts (E, a, b) the codes decode to exactly)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    q = nf4.quantize(w, blocksize, double_quant)
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(shape), blocksize), nf4.dequantize(q, torch.float32)


# (E, a, b), blocksize: an expert starting inside a nested group of 256 scales (64 x 96 / 64 = 96
# blocks), whole groups, a blocksize of 32 and of 128, widths that are no multiple of 32
SHAPES = [((4, 64, 96), 64), ((3, 128, 128), 64), ((5, 16, 64), 32), ((2, 40, 128), 128), ((3, 24, 48), 64)]


@pytest.mark.parametrize("shape, blocksize", SHAPES, ids=["mid-group", "whole-groups", "bs32", "bs128", "narrow"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("transposed", [False, True], ids=["xWT", "xW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_each_row_times_its_expert(backend, shape, blocksize, double_quant, transposed, dtype):
    """Rows in any order, experts repeated and skipped, 1 to 19 rows: within the derived bound of
    each row's own product with its expert (dequantized in x's dtype, exactly)."""
    f, dense = experts(shape, blocksize, double_quant, seed=sum(shape))
    g = torch.Generator().manual_seed(7)
    width = shape[1] if transposed else shape[2]
    w_in_dtype = dense.to(dtype)  # what the codec decodes in dtype: the float32 values rounded once
    for rows in (1, 3, 19):
        ids = torch.randint(0, shape[0], (rows,), generator=g)
        x = torch.randn(rows, width, generator=g).to(dtype)
        y = torch.ops.lowrank.nf4_experts_linear(x, ids, *f, transposed)
        assert y.shape == (rows, shape[2] if transposed else shape[1]) and y.dtype == dtype
        for p in range(rows):
            b = w_in_dtype[ids[p]] if transposed else w_in_dtype[ids[p]].T
            ref = (x[p : p + 1].double() @ b.double()).to(dtype)  # a correct rounding of the exact product
            assert_matmul_close(y[p : p + 1], ref, x[p : p + 1], b)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_the_gathered_experts_are_the_whole_tensors(double_quant):
    """The reference's gathered experts (in any order, repeated) decode bit for bit to the whole
    tensor's, in each dtype; nf4.scales_at decodes the blocks asked for as the whole tensor's
    scales are decoded."""
    for shape, blocksize in SHAPES:
        f, _ = experts(shape, blocksize, double_quant)
        picks = torch.tensor([shape[0] - 1, 0, 1, 0, shape[0] - 1])
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            whole = torch.ops.lowrank.nf4_dequantize(*f, dtype)
            assert torch.equal(experts_ops.gathered(picks, *f, dtype), whole[picks]), (shape, dtype)
        if double_quant:
            blocks = torch.tensor([[5, 0], [f[1].numel() - 1, 300 % f[1].numel()]])
            want = nf4.dequantize_scales(f[1], f[2], f[3])[blocks]
            assert torch.equal(nf4.scales_at(f[1], f[2], f[3], blocks), want)


@pytest.mark.parametrize("transposed", [False, True], ids=["xWT", "xW"])
def test_gradient_is_the_transposed_product(backend, transposed):
    """x's gradient is each row's gradient through its dense expert (float32, within the bound of
    the product it is), and itself differentiable."""
    f, dense = experts((4, 64, 96), seed=3)
    ids = torch.tensor([2, 0, 2, 3, 1, 1])
    width = 64 if transposed else 96
    x = torch.randn(6, width, generator=torch.Generator().manual_seed(1), requires_grad=True)
    gy = torch.randn(6, 96 if transposed else 64, generator=torch.Generator().manual_seed(2))
    torch.ops.lowrank.nf4_experts_linear(x, ids, *f, transposed).backward(gy)
    for p in range(6):
        w = dense[ids[p]]  # (64, 96)
        b = w.T if transposed else w  # gx[p] = gy[p] @ (W^T if y = x W else W)
        assert_matmul_close(x.grad[p : p + 1], (gy[p : p + 1].double() @ b.double()).float(), gy[p : p + 1], b)
    # the gradient is the op again, with `transposed` flipped: differentiable in gy, giving the op
    xx, gy = x.detach().requires_grad_(), gy.requires_grad_()
    gx = torch.autograd.grad(torch.ops.lowrank.nf4_experts_linear(xx, ids, *f, transposed), xx, gy, create_graph=True)[0]
    v = torch.randn(gx.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.autograd.grad(gx, gy, v)[0], torch.ops.lowrank.nf4_experts_linear(v, ids, *f, transposed))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("transposed", [False, True], ids=["xWT", "xW"])
def test_opcheck(backend, double_quant, transposed):
    f, _ = experts((3, 24, 64), 64, double_quant)
    x = torch.randn(5, 24 if transposed else 64, requires_grad=True)
    ids = torch.tensor([2, 0, 2, 1, 0])
    torch.library.opcheck(torch.ops.lowrank.nf4_experts_linear.default, (x, ids, *f, transposed))


def test_no_rows(backend):
    f, _ = experts((3, 24, 64))
    y = torch.ops.lowrank.nf4_experts_linear(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), *f, False)
    assert y.shape == (0, 24)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {**a, "ids": torch.tensor([0, 3, 1])}, IndexError, "ids must lie in [0, 3) (the experts), got values from 0 to 3"),
    (lambda a: {**a, "ids": torch.tensor([0, -1, 1])}, IndexError, "ids must lie in [0, 3) (the experts), got values from -1 to 1"),
    (lambda a: {**a, "ids": torch.tensor([0.0, 1, 1])}, RuntimeError, "ids must be integer (rows,) = (3,)"),
    (lambda a: {**a, "ids": torch.tensor([0, 1])}, RuntimeError, "ids must be integer (rows,) = (3,), got torch.int64 [2]"),
    (lambda a: {**a, "x": torch.randn(3, 24)}, RuntimeError, "x must be (rows, 64) for experts [3, 24, 64], got [3, 24]"),
    (lambda a: {**a, "x": torch.randn(3, 64).double()}, RuntimeError, "x must be one of"),
    (lambda a: {**a, "shape": [72, 64]}, RuntimeError, "an experts tensor has shape [E, a, b], got [72, 64]"),
    (lambda a: {**a, "shape": [4, 24, 64]}, RuntimeError, "packed must hold"),
], ids=["too-large", "negative", "float-ids", "short-ids", "width", "float64", "two-d", "numel"])
def test_bad_arguments_are_named(backend, change, error, message):
    f, _ = experts((3, 24, 64))
    args = dict(x=torch.randn(3, 64), ids=torch.tensor([0, 2, 1]), packed=f[0], absmax=f[1], nested_absmax=f[2],
                offset=f[3], shape=f[4], blocksize=f[5], transposed=False)
    with pytest.raises(error, match=re.escape(message)):
        torch.ops.lowrank.nf4_experts_linear(*change(args).values())


def test_an_expert_must_be_whole_blocks():
    w = nf4.quantize(torch.randn(2, 8, 4), 64)  # 32 values an expert, blocks of 64
    with pytest.raises(RuntimeError, match=re.escape("each expert must be whole blocks: 8 x 4 is not a multiple of blocksize 64")):
        torch.ops.lowrank.nf4_experts_linear(torch.randn(1, 4), torch.tensor([0]), w.packed, w.absmax, w.nested_absmax,
                                             w.offset, [2, 8, 4], 64, False)


@pytest.mark.skipif("csrc" not in BACKENDS, reason="lowrank._C is not built")
def test_csrc_makes_one_product_per_expert_with_rows(monkeypatch):
    """The csrc kernel calls nf4_linear once for each expert that has rows, on views of its codes."""
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    f, _ = experts((6, 24, 64))
    calls, real = [], experts_ops.times
    monkeypatch.setattr(experts_ops, "times", lambda x, fields, t: calls.append((x.shape[0], fields[0])) or real(x, fields, t))
    torch.ops.lowrank.nf4_experts_linear(torch.randn(5, 64), torch.tensor([4, 1, 4, 4, 1]), *f, False)
    assert [c for c, _ in calls] == [2, 3]  # experts 1 and 4
    assert all(codes.untyped_storage().data_ptr() == f[0].untyped_storage().data_ptr() for _, codes in calls)


def test_ids_changed_in_place_before_backward_raise(backend):
    """The op saves ids for backward with save_for_backward: changing them in place is caught,
    as for torch's own ops, not a silently wrong gradient."""
    f, _ = experts((4, 24, 64))
    x, ids = torch.randn(3, 64, requires_grad=True), torch.tensor([0, 2, 1])
    y = torch.ops.lowrank.nf4_experts_linear(x, ids, *f, False)
    ids[0] = 3
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["xWT", "xW"])
def test_on_the_gpu_and_in_a_cuda_graph(transposed):
    """bf16 on CUDA, each backend within the derived bound of each row's product; captured into a
    CUDA graph (where the csrc kernel, which reads the rows per expert on the host, runs the
    reference) and replayed, the reference's result bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    f, dense = experts((8, 512, 256), seed=5)
    f = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in f)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.tensor([5, 1, 5, 7], device="cuda")
    x = torch.randn(4, 512 if transposed else 256, device="cuda", generator=g).bfloat16()
    w = dense.cuda().bfloat16()
    ys = {}
    for b in backends.available(experts_ops.OP):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOWRANK_BACKEND", b)
            ys[b] = torch.ops.lowrank.nf4_experts_linear(x, ids, *f, transposed)
        for p in range(4):
            m = w[ids[p]] if transposed else w[ids[p]].T
            assert_matmul_close(ys[b][p : p + 1], (x[p : p + 1].double() @ m.double()).bfloat16(), x[p : p + 1], m)
    torch.ops.lowrank.nf4_experts_linear(x, ids, *f, transposed)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.lowrank.nf4_experts_linear(x, ids, *f, transposed)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ys["reference"])
