"""The LoRA ops' dropout (lowrank/ops/lora_ops.py, Note: dropout in the LoRA ops; csrc/lora.cpp) against its
oracle, eager autograd through the dropout F.dropout runs (its composite path: x * noise, MulBackward0) or
at::native_dropout (a bool mask, NativeDropoutBackward0; what F.dropout runs on CUDA): outputs and every
gradient equal bit for bit, for lora_add and nf4_lora_linear, C++ and Python; dropout_parts drawing
F.dropout's random numbers; and LoraLinear's use of it (a 4-bit base, its adapter and a training dropout
in one op), down to a QLoRA Llama trained with dropout, with and without activation checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank import ops
from lowrank.ops import csrc, lora_ops
from lowrank.ops.lora_ops import dropout_parts
from lowrank.tuners.lora import LoraLinear
from tests.ops import test_lora_add as la
from tests.ops import test_nf4_lora_linear as qa

CPP = csrc.CPP_AUTOGRAD
P = 0.3


def eager_dropout(x, p, mask):
    """x dropped out as eager autograd records it: F.dropout (x * noise on the CPU), or with mask
    at::native_dropout (a bool mask and 1 / (1 - p), F.dropout's path on CUDA)."""
    return torch.native_dropout(x, p, True)[0] if mask else F.dropout(x, p, True)


def parts(x, p, mask):
    """The ops' dropout arguments for the same random numbers as eager_dropout."""
    if not mask:
        return dropout_parts(x, p)
    with torch.no_grad():
        dropped, keep = torch.native_dropout(x, p, True)
    return dropped, keep, 1.0 / (1.0 - p)


def lora_add_pair(mask, p=P):
    """(the op, its eager oracle) as functions of (y, x, A, B, scale), each drawing from seed 7."""
    def op(y, x, A, B, scale):
        torch.manual_seed(7)
        return torch.ops.lowrank.lora_add(y, x, A, B, scale, *parts(x, p, mask))

    def eager(y, x, A, B, scale):
        torch.manual_seed(7)
        return la.eager(y, eager_dropout(x, p, mask), A, B, scale)

    return op, eager


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape", [(2, 5, 40), (7, 40)])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("scale", [la.SCALE, 2.0])
def test_lora_add_with_dropout_equals_eager_autograd_bit_for_bit(device, dtype, x_shape, mask, scale):
    args = la.operands(x_shape, 4, 12, dtype, device=device)
    op, eager = lora_add_pair(mask)
    for needs in la.NEEDS:
        la.assert_same(la.outputs_and_grads(op, *args, needs, scale), la.outputs_and_grads(eager, *args, needs, scale))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("x_shape", [(2, 5, 192), (1, 192)])
def test_nf4_lora_linear_with_dropout_equals_the_two_ops_and_eager_dropout(device, dtype, mask, x_shape):
    q = qa.weight(24, 192).to(device)
    x, _, A, B, b, grad = qa.operands(x_shape, 8, q, dtype, device=device)

    def fused(x, q, A, B, scale, bias, x_lora):
        torch.manual_seed(7)
        return torch.ops.lowrank.nf4_lora_linear(x_lora, A, B, scale, x, *ops.library._fields(q), bias,
                                                 *parts(x_lora, P, mask))

    def two_ops(x, q, A, B, scale, bias, x_lora):
        torch.manual_seed(7)
        y = ops.nf4_linear(x, q, bias)
        return ops.lora_add(y, eager_dropout(x_lora, P, mask), A, B, scale)

    for needs in qa.NEEDS:
        qa.assert_same(qa.outputs_and_grads(fused, q, x, x, A, B, b, grad, needs, same_x=True),
                       qa.outputs_and_grads(two_ops, q, x, x, A, B, b, grad, needs, same_x=True))


@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), k=st.integers(1, 40), out=st.integers(1, 9),
       r=st.integers(1, 5), p=st.floats(0.01, 0.99), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       needs=st.sampled_from(la.NEEDS), seed=st.integers(0, 2**31 - 1))
def test_lora_add_with_any_noise_equals_eager_autograd(lead, k, out, r, p, dtype, needs, seed):
    """Any shape (zero-size leading dimensions too), keep probability and noise: the op with
    dropped = x * noise equals y + F.linear(F.linear(x * noise, A), B) * s and its gradients."""
    args = la.operands((*lead, k), r, out, dtype, seed=seed % 1000)
    x = args[1]
    noise = torch.empty_like(x).bernoulli_(1 - p, generator=torch.Generator().manual_seed(seed)).div_(1 - p)

    def op(y, x, A, B, scale):
        return torch.ops.lowrank.lora_add(y, x, A, B, scale, x.detach() * noise, noise, 1.0)

    def eager(y, x, A, B, scale):
        return la.eager(y, x * noise, A, B, scale)

    la.assert_same(la.outputs_and_grads(op, *args, needs), la.outputs_and_grads(eager, *args, needs))


@pytest.mark.skipif(not CPP, reason="the autocast rule is lowrank._C's (csrc/lora.cpp)")
@pytest.mark.parametrize("mask", [False, True])
def test_lora_add_with_dropout_under_autocast_equals_eager_autograd(mask):
    """float32 x, A, B under bf16 autocast: the rule casts dropped (not x) with A and B, and x's
    gradient goes back through the dropout in float32, as eager autograd's cast node hands it on."""
    _, x, A, B, grad = la.operands((2, 3, 40), 4, 10, torch.float32)
    W = torch.randn(10, 40, generator=torch.Generator().manual_seed(9))
    results = []
    for fn in lora_add_pair(mask):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(F.linear(leaves[0], W), *leaves, la.SCALE)
        assert out.dtype == torch.bfloat16
        results.append((out.detach(), torch.autograd.grad(out, leaves, grad.bfloat16())))
    (out1, g1), (out2, g2) = results
    assert torch.equal(out1, out2) and all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(g1, g2))


def test_the_python_api_draws_as_f_dropout():
    """lowrank.ops.lora_add / nf4_lora_linear with dropout=p: F.dropout's random numbers, its bits."""
    y, x, A, B, grad = la.operands((3, 64), 4, 24, torch.bfloat16)
    q = qa.weight(24, 64)
    torch.manual_seed(1)
    ours = [ops.lora_add(y, x, A, B, 0.5, dropout=0.1), ops.nf4_lora_linear(x, q, A, B, 0.5, dropout=0.1)]
    torch.manual_seed(1)
    theirs = [la.eager(y, F.dropout(x, 0.1, True), A, B, 0.5)]
    theirs.append(la.eager(ops.nf4_linear(x, q), F.dropout(x, 0.1, True), A, B, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert torch.equal(ops.lora_add(y, x, A, B, 0.5, dropout=0.0), la.eager(y, x, A, B, 0.5))


def test_dropout_parts_are_f_dropouts_and_refuse_what_f_dropout_does_not_draw_for():
    x = torch.randn(4, 33, dtype=torch.bfloat16)
    torch.manual_seed(2)
    dropped, keep, keep_scale = dropout_parts(x, 0.25)
    after_ours = torch.get_rng_state()
    torch.manual_seed(2)
    assert torch.equal(dropped, F.dropout(x, 0.25, True)) and keep_scale == 1.0
    assert torch.equal(after_ours, torch.get_rng_state())  # the generator moved on as F.dropout moves it
    assert keep.dtype == x.dtype and set(keep.float().unique().tolist()) == {0.0, torch.tensor(1 / 0.75).bfloat16().item()}
    xt = torch.randn(6, 33).t()  # not contiguous: F.dropout's noise takes x's layout, and so does this one
    torch.manual_seed(3)
    dropped = dropout_parts(xt, 0.3)[0]
    torch.manual_seed(3)
    assert torch.equal(dropped, F.dropout(xt, 0.3, True))
    for p, t in ((0.0, x), (1.0, x), (0.5, x[:0]), (-0.1, x)):
        with pytest.raises(ValueError, match=r"needs 0 < p < 1 and a non-empty x on the CPU or CUDA; got p="):
            dropout_parts(t, p)


@pytest.mark.skipif(not CPP, reason="the C++ draws are registered with lowrank._C's autograd")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_cpp_dropout_parts_draws_as_the_python_ones(device):
    """csrc/lora.cpp's dropout_parts (what lora_ops.dropout_parts calls with lowrank._C) against
    the Python calls it copies: the same three results and the same generator state after."""
    assert lora_ops._C_DROPOUT_PARTS is csrc._C.dropout_parts
    for x in (torch.randn(3, 7, 40, device=device).bfloat16(), torch.randn(6, 33, device=device).t()):
        results = []
        for fn in (lora_ops._C_DROPOUT_PARTS, lora_ops._dropout_parts):
            torch.manual_seed(4)
            results.append((fn(x.requires_grad_(), 0.15), torch.get_rng_state()))
        (ours, state), (spec, spec_state) = results
        assert all(torch.equal(a, b) for a, b in zip(ours[:2], spec[:2])) and ours[2] == spec[2]
        assert torch.equal(state, spec_state) and not ours[0].requires_grad
        x.requires_grad_(False)
    with pytest.raises(RuntimeError, match="dropout_parts needs 0 < p < 1"):
        lora_ops._C_DROPOUT_PARTS(x, 1.0)


@pytest.mark.parametrize("case, match", [
    (lambda y, x, A, B, d, k: (y, x, A, B, d, None), r"dropped and keep go together .*got dropped a tensor and keep None"),
    (lambda y, x, A, B, d, k: (y, x, A, B, d[:1], k), r"dropped and keep must have x's shape \[2, 5, 40\], got \[1, 5, 40\]"),
    (lambda y, x, A, B, d, k: (y, x, A, B, d, k.double()), r"keep must be bool \(a dropout mask\) or x's floating dtype"),
    (lambda y, x, A, B, d, k: (y, x.int(), A, B, d, k.int()), r"keep must be bool .*got x (torch\.)?[Ii]nt"),
    (lambda y, x, A, B, d, k: (y, x, A, B, d.double(), k),
     r"y, x \(dropped, when given\), lora_A and lora_B must share one floating dtype, got (torch\.float32|Float), "
     r"(torch\.float64|Double)"),
])
def test_lora_add_refuses_bad_dropout_arguments_with_what_it_saw(case, match):
    y, x, A, B, _ = la.operands((2, 5, 40), 4, 12, torch.float32)
    dropped, keep, _ = dropout_parts(x, P)
    y, x, A, B, dropped, keep = case(y, x, A, B, dropped, keep)
    for fn in (torch.ops.lowrank.lora_add, lora_ops.lora_add_kernel):
        with pytest.raises(RuntimeError, match=match):
            fn(y, x, A, B, la.SCALE, dropped, keep, 1.0)


def test_opcheck_with_dropout():
    """The ops are deterministic given dropped and keep: torch.library.opcheck runs in full."""
    y, x, A, B, _ = la.operands((2, 5, 40), 4, 12, torch.float32)
    leaves = [t.requires_grad_() for t in (y, x, A, B)]
    for mask in (False, True):
        torch.library.opcheck(torch.ops.lowrank.lora_add.default, (*leaves, la.SCALE, *parts(x, P, mask)))
    q = qa.weight(12, 40)
    args = (x, A, B, la.SCALE, x, *ops.library._fields(q), None, *parts(x, P, False))
    torch.library.opcheck(torch.ops.lowrank.nf4_lora_linear.default, args)


_PYTHON_OPS = r"""
import torch
from lowrank.ops import csrc
from tests.ops import test_lora_dropout as t
assert not csrc.CPP_AUTOGRAD
for dtype in (torch.float32, torch.bfloat16):
    for mask in (False, True):
        t.test_lora_add_with_dropout_equals_eager_autograd_bit_for_bit("cpu", dtype, (2, 5, 40), mask, 0.37)
        t.test_nf4_lora_linear_with_dropout_equals_the_two_ops_and_eager_dropout("cpu", dtype, mask, (2, 5, 192))
print("ok")
"""


@pytest.mark.skipif(csrc._C is None, reason="lowrank._C is not built (this run already tests the Python version)")
def test_the_python_ops_with_dropout_equal_eager_autograd_too():
    done = la.run_with_python_ops(_PYTHON_OPS)  # its asserts run in the child; it prints ok at the end
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# LoraLinear's use of it (lora.py: Note: LoRA in one op, Note: QLoRA in one op)
# ---------------------------------------------------------------------------------------------
def _modules(monkeypatch):
    """LoraLinear without the ops: base module, nn.Dropout, lora_A, lora_B, mul, add."""
    monkeypatch.setattr(LoraLinear, "_op_factors", lambda self, name: None)


@pytest.mark.skipif(not CPP, reason="LoraLinear uses the ops with lowrank._C's autograd")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_lora_linear_with_a_training_dropout_is_one_op_equal_to_the_modules(monkeypatch, device, four_bit, autocast):
    """Dropout 0.3 while training, float32 weights and x (under bf16 autocast with autocast) or a bf16
    model: the output and every gradient equal the modules' for the same seed. On a 4-bit base the
    dropout is nf4_lora_linear's own (where the operands are in the base's dtype: not under
    autocast); elsewhere it stays its own node before lora_add (lora.py, Note: LoRA in one op)."""
    dtype = torch.float32 if autocast else torch.bfloat16
    model = la.lora_model(dtype, dropout=P, device=device, four_bit=four_bit).train()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(6)).to(device, dtype).requires_grad_()
    results = []
    for fused in (True, False):
        if not fused:
            _modules(monkeypatch)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        names = la._node_names(out)
        assert ({la.FUSED, la.FUSED_QLORA} & names != set()) == fused
        in_op = fused and four_bit and not autocast
        assert (la.FUSED_QLORA in names) == in_op
        assert (("MulBackward0" if device == "cpu" else "NativeDropoutBackward0") in names) == (not in_op)
        (gx,) = torch.autograd.grad(out.float().square().mean(), x, retain_graph=True)
        out.float().square().mean().backward()
        results.append((out.detach(), gx, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (out1, gx1, g1), (out2, gx2, g2) = results
    assert torch.equal(out1, out2) and torch.equal(gx1, gx2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.skipif(not CPP, reason="LoraLinear uses the ops with lowrank._C's autograd")
def test_qlora_keeps_dropout_a_node_of_its_own_where_the_op_could_not_draw_as_it():
    layer = qa.qlora_layer(dropout=P).train()
    x = torch.randn(3, 5, 64).bfloat16().requires_grad_()
    drop = layer.lora_dropout["default"]
    names = la._node_names(layer(x))
    assert qa.NODE in names and "MulBackward0" not in names
    drop.inplace = True  # F.dropout would change x itself: its own node (mul_), base and lora_add
    names = la._node_names(layer(x * 1))
    assert "MulBackward0" in names and la.FUSED in names and qa.NODE not in names
    drop.inplace = False
    handle = drop.register_forward_hook(lambda m, i, o: None)
    assert "MulBackward0" in la._node_names(layer(x)) and qa.NODE not in la._node_names(layer(x))
    handle.remove()
    drop.p = 0.0  # F.dropout returns x itself at p = 0: no random numbers, one op
    before = torch.get_rng_state()
    names = la._node_names(layer(x))
    assert torch.equal(before, torch.get_rng_state()) and qa.NODE in names and "MulBackward0" not in names


@pytest.mark.skipif(not CPP, reason="LoraLinear uses nf4_lora_linear with lowrank._C's autograd")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_qlora_llama_trains_with_dropout_as_with_the_modules_bit_for_bit(monkeypatch, checkpointing):
    """Dropout 0.1 on every adapter: one nf4_lora_linear node a layer; losses and every gradient over
    three steps equal the modules' path (base, nn.Dropout, lora_A, lora_B) for the same seed, with
    activation checkpointing too (its recomputation replays the random numbers)."""
    model = qa.tiny_llama()
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_dropout["default"] = nn.Dropout(0.1)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for fused in (True, False):
        if not fused:
            _modules(monkeypatch)
        model.load_state_dict(state)
        torch.manual_seed(5)
        out = model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        assert (qa.NODE in la._node_names(out.logits)) == fused
        torch.manual_seed(5)
        results.append(qa.train(model, 3, checkpointing))
    (losses1, grads1), (losses2, grads2) = results
    assert losses1 == losses2
    for a, b in zip(grads1, grads2, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
