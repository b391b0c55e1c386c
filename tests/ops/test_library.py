"""The lowrank:: ops on the reference backend: schemas, fake kernels and their messages,
autograd, opcheck, torch.compile, the backend table."""

import re

import pytest
import torch
import torch.nn.functional as F

from lowrank import nf4
from lowrank import ops
from lowrank.ops import backends
from lowrank.ops.library import OPS
from tests.ops.bounds import assert_matmul_close


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")


def weight(n_out, k_in, blocksize=32, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nf4.quantize(torch.randn(n_out, k_in, generator=g), blocksize, double_quant)


def fields(q):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)


def test_schemas_are_the_published_ones():
    for name, schema in OPS.items():
        assert str(getattr(torch.ops.lowrank, name).default._schema) == f"lowrank::{schema}"
    assert OPS["nf4_linear"].startswith("nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax")


@pytest.mark.parametrize("double_quant", [True, False])
def test_reference_dequantize_is_the_codec(reference, double_quant):
    q = weight(9, 13, double_quant=double_quant)  # 117 elements: a short block and an odd byte
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(ops.nf4_dequantize(q, dtype), nf4.dequantize(q, dtype))
    assert ops.nf4_dequantize(q).dtype == torch.float32  # default: the dtype it was quantized from


def test_reference_linear_and_gradients_match_plain_autograd(reference):
    q = weight(11, 40)
    x = torch.randn(2, 3, 40, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    y = ops.nf4_linear(x, q, b)  # (2, 3, 11)
    g = torch.randn_like(y)
    y.backward(g)
    x_ref, b_ref = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    w = nf4.dequantize(q, torch.float32)  # (11, 40)
    F.linear(x_ref, w, b_ref).backward(g)
    assert_matmul_close(y.detach(), F.linear(x_ref, w, b_ref).detach(), x.detach().view(6, 40), w.T, b.detach())
    assert_matmul_close(x.grad, x_ref.grad, g.view(6, 11), w)
    assert_matmul_close(b.grad, b_ref.grad, torch.ones(1, 6), g.view(6, 11))
    assert q.packed.grad is None and not q.packed.requires_grad  # the weight stays frozen


def test_double_backward(reference):
    q = weight(7, 32)
    x = torch.randn(3, 32, dtype=torch.float64).float().requires_grad_()
    (gx,) = torch.autograd.grad(ops.nf4_linear(x, q).square().sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    w = nf4.dequantize(q).double()  # d/dx sum(2 (x W^T) W) = 2 * (1 W^T) W, independent of x
    expect = 2 * (torch.ones(3, 32, dtype=torch.float64) @ w.T) @ w
    assert torch.allclose(ggx.double(), expect, rtol=1e-5, atol=1e-5)


def test_fake_kernels_give_shapes_without_data():
    q = weight(24, 64).to("meta")
    x = torch.empty(5, 2, 64, device="meta", dtype=torch.bfloat16)
    assert ops.nf4_linear(x, q).shape == (5, 2, 24)
    assert ops.nf4_dequantize(q, torch.float16).shape == (24, 64)
    gy = torch.empty(4, 24, device="meta")
    assert torch.ops.lowrank.nf4_linear_grad_input(gy, *fields(q)).shape == (4, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": torch.randn(3, 33)}, "x has 33 features in its last dimension; the weight [8, 64] takes 64"),
        (lambda a: {**a, "bias": torch.randn(9)}, "bias must have shape (8,), got (9,)"),
        (lambda a: {**a, "bias": torch.randn(8, dtype=torch.float64)}, "bias must have x's dtype"),
        (lambda a: {**a, "bias": torch.empty(8, device="meta")}, "bias is on meta but x is on cpu"),  # Triton would read it
        (lambda a: {**a, "blocksize": 48}, "blocksize must be one of"),
        (lambda a: {**a, "packed": a["packed"][:-1]}, "packed must hold ceil(n/2) = 256 bytes"),
        (lambda a: {**a, "offset": None}, "nested_absmax and offset come together"),
        (lambda a: {**a, "absmax": a["absmax"].float()}, "absmax must be torch.uint8 (codes, with nested_absmax)"),
        (lambda a: {**a, "x": torch.randn(3, 64, dtype=torch.float64)}, "x must be one of"),
        (lambda a: {**a, "shape": [512]}, "a linear weight has shape [N, K]"),
    ],
)
def test_bad_arguments_are_named(reference, change, message):
    q = weight(8, 64)
    args = dict(x=torch.randn(3, 64), packed=q.packed, absmax=q.absmax, nested_absmax=q.nested_absmax,
                offset=q.offset, shape=[8, 64], blocksize=32, bias=None)  # fmt: skip
    args = change(args)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.lowrank.nf4_linear(*args.values())


def opcheck_args(dtype, double_quant=True, m=3, n_out=10, k_in=40):
    """Arguments for opcheck of each op: small, odd shapes, grads required where allowed."""
    q = weight(n_out, k_in, double_quant=double_quant)
    x = torch.randn(m, k_in, dtype=dtype, requires_grad=True)
    b = torch.randn(n_out, dtype=dtype, requires_grad=True)
    gy = torch.randn(m, n_out, dtype=dtype, requires_grad=True)
    return {
        "nf4_dequantize": (*fields(q), dtype),
        "nf4_linear": (x, *fields(q), b),
        "nf4_linear_grad_input": (gy, *fields(q)),
    }


@pytest.mark.parametrize("double_quant", [True, False])
def test_opcheck_reference(reference, double_quant):
    for name, args in opcheck_args(torch.float32, double_quant).items():
        torch.library.opcheck(getattr(torch.ops.lowrank, name).default, args)


def test_backend_table_and_override(monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    assert backends.choose("nf4_linear", torch.device("cpu"))[0] in ("csrc", "reference")
    assert backends.choose("nf4_linear", torch.device("meta"))[0] == "reference"
    on_cuda = backends.choose("nf4_linear", torch.device("cuda"))[0]
    assert on_cuda == next(b for b in backends.PREFERENCE["cuda"] if b in backends.available("nf4_linear"))
    monkeypatch.setenv("LOWRANK_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LOWRANK_BACKEND must be one of"):
        backends.choose("nf4_linear", torch.device("cpu"))
    if "triton" in backends.available("nf4_linear"):  # Triton on CPU tensors outside its interpreter: said plainly
        monkeypatch.setenv("LOWRANK_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="Triton runs on a GPU, or on the CPU in its interpreter only"):
            backends.choose("nf4_linear", torch.device("cpu"))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backends.choose("nf4_linear", torch.device("cpu"))[0] == "triton"


def test_compile_fullgraph_matches_eager(reference):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = weight(12, 32)
            self.bias = torch.nn.Parameter(torch.randn(12))

        def forward(self, x):
            return ops.nf4_linear(x, self.q, self.bias).relu()  # (B, 12)

    model, x = Tiny(), torch.randn(5, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert torch.equal(compiled, eager)  # the same op runs in both: nothing to re-round


def _strided(t):
    """t's values at stride 2 (a view into a larger tensor)."""
    wide = t.new_zeros(2 * t.numel())
    wide[::2] = t.reshape(-1)
    return wide[::2]


def odd_layouts(q):
    """q's op fields in layouts the ops' checks accept (they check sizes by numel): packed,
    absmax and nested_absmax strided, the offset as a (1, 1) tensor."""
    nested = None if q.nested_absmax is None else _strided(q.nested_absmax)
    offset = None if q.offset is None else q.offset.reshape(1, 1)
    return (_strided(q.packed), _strided(q.absmax), nested, offset, list(q.shape), q.blocksize)


def assert_layouts_give_the_same_results(q, rows=(1, 70), device="cpu"):
    """Every op gives, from odd_layouts(q) and a strided or expanded bias, what it gives from q's
    own contiguous fields: the same values, so the same bits (the Triton kernels read the fields
    and the bias as flat arrays, and the reference broadcast a (1, 1) offset against the scales)."""
    n, k = q.shape
    plain, odd = (tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in f) for f in (fields(q), odd_layouts(q)))
    assert torch.equal(torch.ops.lowrank.nf4_dequantize(*odd, torch.float32),
                       torch.ops.lowrank.nf4_dequantize(*plain, torch.float32))
    for m in rows:
        x, gy = torch.randn(m, k, device=device), torch.randn(m, n, device=device)
        for bias in (_strided(torch.randn(n, device=device)), torch.tensor(1.5, device=device).expand(n)):
            assert torch.equal(torch.ops.lowrank.nf4_linear(x, *odd, bias),
                               torch.ops.lowrank.nf4_linear(x, *plain, bias.contiguous()))
        assert torch.equal(torch.ops.lowrank.nf4_linear_grad_input(gy, *odd),
                           torch.ops.lowrank.nf4_linear_grad_input(gy, *plain))


@pytest.mark.parametrize("backend", [b for b in ("reference", "csrc") if b in backends.available("nf4_linear")])
def test_every_layout_the_checks_accept_gives_the_same_results(monkeypatch, backend):
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    assert_layouts_give_the_same_results(weight(70, 128, blocksize=32))  # 280 blocks: two nested scales
