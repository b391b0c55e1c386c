"""lowrank::lora_add (lowrank/ops/lora_ops.py, Note: lora_add; csrc/lora.cpp, Note: LoRA in one node) against
its oracle, the eager LoRA path it replaces (y + F.linear(F.linear(x, A), B) * s, the calls of
PEFT's and lowrank's LoRA modules): outputs and every gradient equal bit for bit, the same
products computed for the gradients asked for; and LoraLinear's use of it (Note: LoRA in one
op), with the cases that keep the modules."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank import LoraConfig, NF4Config, inject, quantize
from lowrank.inject import set_active
from lowrank import ops
from lowrank.ops import csrc, lora_ops

SCALE = 0.37  # not a power of two: the multiplication rounds
CPP = csrc.CPP_AUTOGRAD  # lowrank._C's op and autograd; else library.py's (LOWRANK_NO_EXT / PYTHON_OPS)


def eager(y, x, A, B, scale):
    return y + F.linear(F.linear(x, A), B) * scale


def operands(x_shape, r, out, dtype, seed=0, contiguous=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(*x_shape, generator=g).to(device, dtype)
    if not contiguous:  # the same values, transposed storage
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    A = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype)
    B = torch.randn(out, r, generator=g).to(device, dtype)
    y = torch.randn(*x_shape[:-1], out, generator=g).to(device, dtype)
    grad = torch.randn(*x_shape[:-1], out, generator=g).to(device, dtype)
    return y, x, A, B, grad


def outputs_and_grads(fn, y, x, A, B, grad, needs, scale=SCALE):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((y, x, A, B), needs)]
    out = fn(*leaves, scale)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return out.detach(), [next(grads) if t.requires_grad else None for t in leaves]


NEEDS = [(True, True, True, True), (False, False, True, True), (False, True, False, False), (True, False, True, False),
         (False, False, False, True), (False, False, False, False)]


def assert_same(ours, theirs):
    (out, grads), (want, want_grads) = ours, theirs
    assert out.dtype == want.dtype and torch.equal(out, want)
    assert out.is_contiguous()
    for g, w in zip(grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        assert g is None or (g.shape == w.shape and torch.equal(g, w))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(2, 5, 384), (7, 384), (384,), (1, 1, 16), (1, 16), (3, 2, 4, 48)])
@pytest.mark.parametrize("r", [1, 8])
def test_lora_add_equals_the_eager_path_bit_for_bit(device, dtype, x_shape, r):
    """Every combination of inputs that need grad; K = 384 and 48 cross the BLAS blockings, one
    row and r = 1 take autograd's column-major branches (mm_mat1_backward / mm_mat2_backward).
    On CUDA the same calls reach the same cuBLAS kernels."""
    args = operands(x_shape, r, 24, dtype, device=device)
    for needs in NEEDS:
        assert_same(outputs_and_grads(torch.ops.lowrank.lora_add, *args, needs),
                    outputs_and_grads(eager, *args, needs))


@settings(max_examples=150, deadline=None)
@given(lead=st.lists(st.integers(0, 5), min_size=0, max_size=3), k=st.integers(0, 70), r=st.integers(1, 9),
       out=st.integers(1, 9), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       needs=st.tuples(*[st.booleans()] * 4),
       scale=st.one_of(st.floats(-4, 4, allow_nan=False), st.sampled_from([1.0, -1.0, 2.0, -4.0, 0.5, 64.0])),
       seed=st.integers(0, 2**16))
def test_lora_add_equals_the_eager_path_for_any_shape(lead, k, r, out, dtype, needs, scale, seed):
    """Any leading dimensions (none, or sizes of zero included), in-features from 0, any subset of
    inputs needing grad, three dtypes: the same bits as the eager path."""
    args = operands((*lead, k), r, out, dtype, seed=seed)
    assert_same(outputs_and_grads(torch.ops.lowrank.lora_add, *args, needs, scale),
                outputs_and_grads(eager, *args, needs, scale))


POWERS = [1.0, -1.0, 2.0, -2.0, 4.0, 1024.0, 0.5, 0.25]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", POWERS)
def test_lora_add_with_a_scale_of_a_power_of_two_equals_the_eager_path(device, dtype, scale):
    """|s| = 2^k, k >= 0 (alpha = r, alpha = 2r): the output is one add with alpha = s (csrc/lora.cpp,
    Note: a scale of a power of two; float16 only at |s| = 1), s = 1 skips the gradient's
    multiplication: the same bits as the eager mul and add, outputs and gradients; below 1 the
    eager calls run."""
    for x_shape in ((2, 5, 384), (1, 16), (3, 48)):
        args = operands(x_shape, 8, 24, dtype, device=device)
        for needs in NEEDS:
            assert_same(outputs_and_grads(torch.ops.lowrank.lora_add, *args, needs, scale),
                        outputs_and_grads(eager, *args, needs, scale))


@pytest.mark.parametrize("dtype, scale, folds", [(torch.bfloat16, 2.0, True), (torch.float32, -1.0, True),
                                                 (torch.float16, 1.0, True), (torch.float16, 2.0, False),
                                                 (torch.float32, 0.5, False), (torch.bfloat16, SCALE, False)])
def test_lora_add_folds_only_scales_it_keeps_exact(dtype, scale, folds):
    """Which calls the forward makes: add with alpha and no mul where the scale folds; and backward
    multiplies the output's gradient by s unless s is 1."""
    y, x, A, B, grad = operands((2, 3, 32), 4, 8, dtype)
    with CountOps() as mode:  # the kernel's calls (library.py's Python kernel is one op to the mode)
        (torch.ops.lowrank.lora_add if CPP else lora_ops.lora_add_kernel)(y, x, A, B, scale)
    assert mode.counts.get("mul", 0) == (0 if folds else 1)
    assert mode.counts.get("add", 0) + mode.counts.get("add_", 0) == 1
    out = torch.ops.lowrank.lora_add(y, x, A.requires_grad_(), B.requires_grad_(), scale)
    with CountOps() as mode:
        torch.autograd.grad(out, (A, B), grad)
    assert mode.counts.get("mul", 0) == (scale != 1.0)


@pytest.mark.parametrize("needs", NEEDS[:4])
def test_lora_add_on_non_contiguous_x(needs):
    """x transposed in memory: the output is eager's to the bit, and so are the gradients while A
    needs one (eager matmul then folds x into rows with a copy, as the op does). Otherwise eager
    multiplies x batch by batch (bmm) where the op's backward folds: x's gradient, sums of r
    products, may round differently, each within r * eps * sum |terms| of the exact value."""
    r = 4
    args = operands((3, 5, 64), r, 12, torch.float32, contiguous=False)
    assert not args[1].is_contiguous()
    ours, theirs = outputs_and_grads(torch.ops.lowrank.lora_add, *args, needs), outputs_and_grads(eager, *args, needs)
    if needs[2] or not needs[1]:
        assert_same(ours, theirs)
        return
    assert torch.equal(ours[0], theirs[0])
    _, _, A, B, grad = (t.double() for t in args)
    terms = ((grad * SCALE) @ B).abs() @ A.abs()  # sum over r of |grad_u| |A|, per element of x's gradient
    bound = 2 * r * torch.finfo(torch.float32).eps * terms  # each side's error, at most
    assert ((ours[1][1].double() - theirs[1][1].double()).abs() <= bound).all()


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs", NEEDS[:5])
def test_lora_add_computes_only_the_gradients_asked_for(needs):
    """Backward makes the products eager autograd makes for the same inputs: one mm for B's
    gradient, one for u's, one each for A's and x's, none that nothing asked for (library.py's
    Python autograd, without lowrank._C, recomputes u for B's: one more)."""
    counts = []
    for fn in (torch.ops.lowrank.lora_add, eager):
        y, x, A, B, grad = (t.detach().clone() for t in operands((2, 3, 32), 4, 8, torch.float32))
        leaves = [t.requires_grad_(need) for t, need in zip((y, x, A, B), needs)]
        out = fn(*leaves, SCALE)
        with CountOps() as mode:
            torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad)
        counts.append(mode.counts.get("mm", 0))
    assert counts[1] == needs[3] + (needs[1] or needs[2]) + needs[2] + needs[1]
    assert counts[0] == counts[1] + (needs[3] and not CPP)


def test_lora_add_double_backward_equals_the_eager_path():
    y, x, A, B, grad = operands((2, 3, 32), 4, 8, torch.float32)
    results = []
    for fn in (torch.ops.lowrank.lora_add, eager):
        xs = [t.detach().clone().requires_grad_() for t in (y, x, A, B)]
        gx, gA = torch.autograd.grad(fn(*xs, SCALE), (xs[1], xs[2]), grad, create_graph=True)
        results.append(torch.autograd.grad((gx.square().sum() + gA.square().sum()), xs[1:]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_python_api_is_the_op():
    y, x, A, B, _ = operands((2, 3, 40), 4, 10, torch.bfloat16)
    assert torch.equal(ops.lora_add(y, x, A, B, 2), eager(y, x, A, B, 2.0))  # an int scale is taken as a float


def test_lora_add_node_and_opcheck():
    y, x, A, B, _ = operands((2, 3, 40), 4, 10, torch.float32)
    out = torch.ops.lowrank.lora_add(y, x.requires_grad_(), A.requires_grad_(), B.requires_grad_(), SCALE)
    want = "torch::autograd::CppNode<lowrank::LoraAdd>" if CPP else "GeneratedBackwardFor_lowrank_lora_add_defaultBackward"
    assert out.grad_fn.name() == want
    for args in ((y, x, A, B, SCALE), (y[0, 0], x[0, 0], A, B, -1.5)):
        torch.library.opcheck(torch.ops.lowrank.lora_add.default, args)


@pytest.mark.parametrize("case, match", [
    (lambda y, x, A, B: (y, x, A[:, :-1], B), r"x \(\.\.\., in\) must match lora_A \(r, in\).*got x \[2, 3, 40\], lora_A \[4, 39\]"),
    (lambda y, x, A, B: (y, x, A, B[:, :-1]), r"lora_B \[10, 3\]"),
    (lambda y, x, A, B: (y, x, A[None], B), r"lora_A must be \(r, in\) and lora_B \(out, r\), got shapes \[1, 4, 40\]"),
    (lambda y, x, A, B: (y[:, :-1], x, A, B), r"y must have the output's shape \[2, 3, 10\].*got \[2, 2, 10\]"),
    (lambda y, x, A, B: (y, x.double(), A, B), r"one floating dtype, got Float, Double, Float, Float|float32, torch.float64"),
    (lambda y, x, A, B: (y.long(), x.long(), A.long(), B.long()), r"one floating dtype"),
    (lambda y, x, A, B: (y, x, A.to("meta"), B), r"one device, got cpu, cpu, meta, cpu"),
])
def test_lora_add_refuses_bad_arguments_with_what_it_saw(case, match):
    y, x, A, B, _ = operands((2, 3, 40), 4, 10, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lowrank.lora_add(*case(y, x, A, B), SCALE)


# The Python kernel and autograd (library.py), the op's specification, against the same oracle:
# in a child process, where LOWRANK_PYTHON_OPS=1 registers them instead of lowrank._C's.
_PYTHON_OPS = r"""
import torch
from lowrank.ops import csrc
from tests.ops import test_lora_add as t
assert not csrc.CPP_AUTOGRAD
for dtype in (torch.float32, torch.bfloat16):
    for shape in ((2, 5, 384), (1, 16), (384,)):
        for r in (1, 8):
            args = t.operands(shape, r, 24, dtype)
            for needs in t.NEEDS:
                t.assert_same(t.outputs_and_grads(torch.ops.lowrank.lora_add, *args, needs),
                              t.outputs_and_grads(t.eager, *args, needs))
t.test_lora_add_double_backward_equals_the_eager_path()
t.test_lora_add_node_and_opcheck()
print("ok")
"""


def run_with_python_ops(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a child process (at the repository root) with LOWRANK_PYTHON_OPS=1."""
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_BACKEND"}
    env["LOWRANK_PYTHON_OPS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)


@pytest.mark.skipif(csrc._C is None, reason="lowrank._C is not built (this run already tests the Python version)")
def test_the_python_lora_add_equals_the_eager_path_too():
    done = run_with_python_ops(_PYTHON_OPS)  # its asserts run in the child; it prints ok at the end
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# LoraLinear's use of it (lora.py, Note: LoRA in one op)
# ---------------------------------------------------------------------------------------------
FUSED = "torch::autograd::CppNode<lowrank::LoraAdd>"
FUSED_QLORA = "torch::autograd::CppNode<lowrank::NF4LoraLinear>"  # one adapter on a 4-bit base (test_nf4_lora_linear.py)


def _fused(out) -> bool:
    """Whether LoRA ran as one op (lora_add, or nf4_lora_linear with its base) somewhere in out's graph."""
    return bool({FUSED, FUSED_QLORA} & _node_names(out))


def lora_model(dtype=torch.float32, dropout=0.0, dora=False, adapters=("default",), device="cpu", four_bit=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).to(device, dtype)
    if four_bit:  # QLoRA: the adapters around lowrank's 4-bit linear
        quantize(model, NF4Config(compute_dtype=dtype, skip=[]))
    for name in adapters:
        inject(model, LoraConfig(r=4, alpha=8, dropout=dropout, dora=dora, targets="all-linear", init="gaussian"), name=name)
    with torch.no_grad():  # B = 0 at init would hide a wrong B gradient path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model


def step(model, x, monkeypatch=None, fused=True):
    """Output and the gradients of every trainable parameter, with LoRA in one op or not."""
    if monkeypatch is not None:
        monkeypatch.setattr(csrc, "CPP_AUTOGRAD", fused and CPP)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, out


@pytest.mark.skipif(not CPP, reason="LoraLinear uses lora_add with lowrank._C's autograd")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapters", [("default",), ("a", "b")])
@pytest.mark.parametrize("four_bit", [False, True])
def test_lora_linear_in_one_op_equals_the_modules(monkeypatch, device, dtype, adapters, four_bit):
    model = lora_model(dtype, adapters=adapters, device=device, four_bit=four_bit)
    assert (type(model[0].base).__name__ == "Linear4bit") == four_bit
    set_active(model, list(adapters))
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).to(device, dtype).requires_grad_()
    fused_out, fused_grads, out = step(model, x, monkeypatch, fused=True)
    assert _fused(out)
    plain_out, plain_grads, out = step(model, x, monkeypatch, fused=False)
    assert not _fused(out)
    assert torch.equal(fused_out, plain_out)
    assert fused_grads.keys() == plain_grads.keys() and all(torch.equal(fused_grads[n], plain_grads[n]) for n in fused_grads)


def _node_names(out) -> set:
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.skipif(not CPP, reason="LoraLinear uses lora_add with lowrank._C's autograd")
def test_lora_linear_dropout_in_one_op_equals_the_modules(monkeypatch):
    model = lora_model(dropout=0.3).train()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    fused = step(model, x, monkeypatch, fused=True)
    torch.manual_seed(5)
    plain = step(model, x, monkeypatch, fused=False)
    assert _fused(fused[2]) and not _fused(plain[2])
    assert torch.equal(fused[0], plain[0]) and all(torch.equal(fused[1][n], plain[1][n]) for n in fused[1])


@pytest.mark.skipif(not CPP, reason="LoraLinear uses lora_add with lowrank._C's autograd")
def test_lora_linear_under_checkpointing_in_one_op_equals_the_modules(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    model = lora_model()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
    results = []
    for fused in (True, False):
        monkeypatch.setattr(csrc, "CPP_AUTOGRAD", fused)
        model.zero_grad(set_to_none=True)
        out = checkpoint(model, x, use_reentrant=False)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.skipif(not CPP, reason="LoraLinear uses lora_add with lowrank._C's autograd")
def test_lora_linear_keeps_the_modules_where_one_op_could_differ():
    model = lora_model()
    layer = model[0]
    x = torch.randn(3, 5, 32)
    assert _fused(layer(x.requires_grad_()))
    assert not _fused(layer(x[0, 0].detach().requires_grad_()))  # 1-d x
    assert not _fused(layer(x.detach().transpose(0, 1).requires_grad_()))  # not contiguous
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the base's output is bf16 there: float32 would promote
        assert _fused(layer(x)) and not _fused(lora_model(torch.float64)[0](x.double()))
    seen = []
    handle = layer.lora_A["default"].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    names = _node_names(layer(x))
    handle.remove()
    assert seen == [torch.Size([3, 5, 4])] and FUSED not in names  # the hook ran
    assert not _fused(lora_model(dora=True)[0](x))
    with nn.modules.module.register_module_forward_hook(lambda m, i, o: None):
        assert not _fused(layer(x))
    assert _fused(layer(x))


@pytest.mark.skipif(not CPP, reason="LoraLinear uses lora_add with lowrank._C's autograd")
def test_lora_linear_under_torch_func_keeps_the_modules():
    """C++ autograd Functions do not run under functorch transforms: the modules do, and give the
    gradient autograd gives."""
    layer = lora_model()[0]
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    gx = torch.func.grad(lambda t: layer(t).square().sum())(x)
    x_ = x.clone().requires_grad_()
    out = layer(x_)
    assert _fused(out)
    (want,) = torch.autograd.grad(out.square().sum(), x_)
    assert torch.equal(gx, want)
    per_row = torch.func.vmap(layer)(x[:, None])
    assert torch.equal(per_row[:, 0], layer(x).detach())


@pytest.mark.parametrize("changed", [2, 3])
def test_a_factor_changed_before_backward_is_refused_as_eager_autograd_refuses_it(changed):
    """The C++ autograd keeps A and B as references with their versions (csrc/lora.cpp, Note: the
    factors are references): changing one in place between forward and backward raises, as it
    does for eager autograd's saved tensors, instead of giving a gradient of other values."""
    for fn in (torch.ops.lowrank.lora_add, eager):
        leaves = [t.requires_grad_() for t in operands((2, 3, 16), 4, 8, torch.float32)[:4]]
        out = fn(*leaves, SCALE)
        with torch.no_grad():
            leaves[changed].mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.skipif(not CPP, reason="LoraLinear uses lora_add with lowrank._C's autograd")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("four_bit", [False, True])
def test_lora_linear_under_autocast_in_one_op_equals_the_modules(monkeypatch, device, four_bit):
    """float32 weights and input under bf16 autocast (a Trainer's bf16=True): LoraLinear casts x,
    A and B as F.linear's autocast rule does, then adds in one op; the output, the float32
    gradients of A and B and x's equal the modules' under autocast, bit for bit."""
    model = lora_model(device=device, four_bit=four_bit)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(6)).to(device).requires_grad_()
    results = []
    for fused in (True, False):
        monkeypatch.setattr(csrc, "CPP_AUTOGRAD", fused)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16 and (_fused(out)) == fused
        (gx,) = torch.autograd.grad(out.float().square().mean(), x, retain_graph=True)
        out.float().square().mean().backward()
        results.append((out.detach(), gx, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (out1, gx1, g1), (out2, gx2, g2) = results
    assert torch.equal(out1, out2) and torch.equal(gx1, gx2)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.skipif(not CPP, reason="the autocast rule is lowrank._C's (csrc/lora.cpp)")
def test_lora_add_under_autocast_casts_as_linear_does():
    """x, A and B in float32 under bf16 autocast: cast as F.linear's rule casts them, through
    autocast's cache (a leaf x used by another linear in the region is cast once, so its gradient
    sums in bfloat16 as eager autograd's does); y is not cast."""
    y, x, A, B, grad = operands((2, 3, 40), 4, 10, torch.float32)
    W = torch.randn(10, 40, generator=torch.Generator().manual_seed(9))
    results = []
    for fn in (torch.ops.lowrank.lora_add, eager):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base = F.linear(leaves[0], W)  # bf16, x cast and cached
            out = fn(base, *leaves, SCALE)
        assert out.dtype == torch.bfloat16
        results.append((out.detach(), torch.autograd.grad(out, leaves, grad.bfloat16())))
    (out1, g1), (out2, g2) = results
    assert torch.equal(out1, out2) and all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(g1, g2))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="one floating dtype"):
        torch.ops.lowrank.lora_add(y, x, A, B, SCALE)  # y float32: eager would promote the sum, the op refuses
