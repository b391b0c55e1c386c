"""lowrank::nf4_lora_linear (lowrank/ops/lora_ops.py, Note: nf4_lora_linear; csrc/lora.cpp, Note: QLoRA in one
node) against its oracle, the two ops it fuses, lora_add(nf4_linear(x, W, bias), x_lora, A, B, s)
(each checked against its own oracle in test_library.py / test_lora_add.py): outputs and every
gradient equal bit for bit; and LoraLinear's use of it on a 4-bit base (lowrank/tuners/lora.py,
Note: QLoRA in one op), down to a Llama's parameter gradients over training steps, with the cases
that keep the two ops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank import LoraConfig, NF4Config, inject, ops, quantize
from lowrank.ops import csrc
from lowrank.quant import nf4
from lowrank.tuners.lora import LoraLinear
from tests.ops.test_lora_add import _node_names, run_with_python_ops

SCALE = 0.37  # not a power of two: the multiplication rounds
CPP = csrc.CPP_AUTOGRAD
NODE = "torch::autograd::CppNode<lowrank::NF4LoraLinear>"
NODE_PY = "GeneratedBackwardFor_lowrank_nf4_lora_linear_defaultBackward"
TWO_OPS = "torch::autograd::CppNode<lowrank::LoraAdd>"


def weight(out, k, double_quant=True, blocksize=64, seed=0):
    return nf4.quantize(torch.randn(out, k, generator=torch.Generator().manual_seed(seed)), blocksize, double_quant)


def operands(x_shape, r, q, dtype, seed=1, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out, k = q.shape
    x = torch.randn(*x_shape, generator=g).to(device, dtype)
    x_lora = torch.randn(*x_shape, generator=g).to(device, dtype)  # another input for the adapter (dropout's)
    A = (torch.randn(r, k, generator=g) / max(k, 1) ** 0.5).to(device, dtype)
    B = torch.randn(out, r, generator=g).to(device, dtype)
    b = torch.randn(out, generator=g).to(device, dtype) if bias else None
    grad = torch.randn(*x_shape[:-1], out, generator=g).to(device, dtype)
    return x, x_lora, A, B, b, grad


def two_ops(x, q, A, B, scale, bias, x_lora):
    return ops.lora_add(ops.nf4_linear(x, q, bias), x_lora, A, B, scale)


def fused(x, q, A, B, scale, bias, x_lora):
    return ops.nf4_lora_linear(x, q, A, B, scale, bias, x_lora)


def outputs_and_grads(fn, q, x, x_lora, A, B, bias, grad, needs, same_x, scale=SCALE):
    """fn's output and the gradients of (x, x_lora, A, B, bias) that `needs` asks for; with
    same_x, x_lora is x itself (one leaf, two uses: its gradient is the sum)."""
    x, x_lora, A, B = (t.detach().clone().requires_grad_(n) for t, n in zip((x, x_lora, A, B), needs))
    bias = None if bias is None else bias.detach().clone().requires_grad_(needs[4])
    if same_x:
        x_lora = x
    out = fn(x, q, A, B, scale, bias, x_lora)
    leaves = [x, None if same_x else x_lora, A, B, bias]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return out.detach(), [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def assert_same(ours, theirs):
    (out, grads), (want, want_grads) = ours, theirs
    assert out.dtype == want.dtype and out.is_contiguous() and torch.equal(out, want)
    for g, w in zip(grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        assert g is None or (g.shape == w.shape and torch.equal(g, w))


NEEDS = [(True, True, True, True, True), (False, False, True, True, False), (True, False, False, False, False),
         (False, True, True, False, True), (False, False, False, False, True), (False, False, False, False, False)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(2, 5, 192), (7, 192), (192,), (1, 1, 192)])
@pytest.mark.parametrize("double_quant, bias", [(True, False), (False, True)])
def test_nf4_lora_linear_equals_the_two_ops_bit_for_bit(device, dtype, x_shape, double_quant, bias):
    """Every listed subset of inputs needing grad, x_lora another tensor or x itself; one row of
    x takes the GEMV where the device has one, more rows dequantize + matmul."""
    q = weight(24, 192, double_quant).to(device)
    args = operands(x_shape, 8, q, dtype, bias=bias, device=device)
    for needs in NEEDS:
        for same_x in (False, True):
            assert_same(outputs_and_grads(fused, q, *args, needs, same_x),
                        outputs_and_grads(two_ops, q, *args, needs, same_x))


@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), k=st.integers(1, 100), out=st.integers(1, 9),
       r=st.integers(1, 6), blocksize=st.sampled_from([32, 64]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       needs=st.tuples(*[st.booleans()] * 5), same_x=st.booleans(), bias=st.booleans(),
       scale=st.floats(-4, 4, allow_nan=False), seed=st.integers(0, 2**16))
def test_nf4_lora_linear_equals_the_two_ops_for_any_shape(lead, k, out, r, blocksize, dtype, needs, same_x, bias,
                                                           scale, seed):
    """Leading dimensions none or of size 0, K not a multiple of the blocksize, any subset of
    inputs needing grad: the same bits as the two ops."""
    q = weight(out, k, blocksize=blocksize, seed=seed)
    args = operands((*lead, k), r, q, dtype, seed=seed, bias=bias)
    assert_same(outputs_and_grads(fused, q, *args, needs, same_x, scale),
                outputs_and_grads(two_ops, q, *args, needs, same_x, scale))


def test_nf4_lora_linear_double_backward_equals_the_two_ops():
    q = weight(12, 64)
    x, _, A, B, bias, grad = operands((2, 3, 64), 4, q, torch.float32)
    results = []
    for fn in (fused, two_ops):
        xs, As, Bs, bs = (t.detach().clone().requires_grad_() for t in (x, A, B, bias))
        gx, gA = torch.autograd.grad(fn(xs, q, As, Bs, SCALE, bs, xs), (xs, As), grad, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum() + gA.square().sum(), (xs, As, Bs)))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_nf4_lora_linear_node_and_opcheck():
    q = weight(12, 64)
    x, x_lora, A, B, bias, _ = operands((2, 3, 64), 4, q, torch.float32)
    out = fused(x.requires_grad_(), q, A.requires_grad_(), B.requires_grad_(), SCALE, bias, x)
    assert out.grad_fn.name() == (NODE if CPP else NODE_PY)
    w = (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)
    for args in ((x_lora, A, B, SCALE, x, *w, bias), (x[0, 0], A, B, -1.5, x[0, 0], *w, None)):
        torch.library.opcheck(torch.ops.lowrank.nf4_lora_linear.default, args)


@pytest.mark.parametrize("case, match", [
    (lambda x, xl, A, B, b: (x, xl, A, B[:-1], b), r"y must have the output's shape \[2, 3, 11\].*got \[2, 3, 12\]"),
    (lambda x, xl, A, B, b: (x, xl[..., :-1], A, B, b), r"x \(\.\.\., in\) must match lora_A \(r, in\).*got x \[2, 3, 63\]"),
    (lambda x, xl, A, B, b: (x[..., :-1], xl, A, B, b), r"x has 63 features in its last dimension; the weight \[12, 64\] takes 64"),
    (lambda x, xl, A, B, b: (x, xl, A.double(), B, b), r"one floating dtype"),
    (lambda x, xl, A, B, b: (x, xl, A, B, b[:-1]), r"bias must have shape \(12,\), got \(11,\)"),
])
def test_nf4_lora_linear_refuses_bad_arguments_with_what_it_saw(case, match):
    """The two ops' checks and messages (y is the base's output, which the op computes)."""
    q = weight(12, 64)
    x, x_lora, A, B, bias, _ = operands((2, 3, 64), 4, q, torch.float32)
    x, x_lora, A, B, bias = case(x, x_lora, A, B, bias)
    with pytest.raises(RuntimeError, match=match):
        ops.nf4_lora_linear(x, q, A, B, SCALE, bias, x_lora)


@pytest.mark.parametrize("changed", [1, 2])
def test_a_factor_changed_before_backward_is_refused(changed):
    """A and B are kept by reference with their versions (csrc/lora.cpp, Note: the factors are
    references): a change in place before backward raises, as eager autograd's saved tensors do."""
    q = weight(12, 64)
    x, _, A, B, _, _ = operands((2, 3, 64), 4, q, torch.float32)
    leaves = [t.requires_grad_() for t in (x, A, B)]
    out = fused(leaves[0], q, leaves[1], leaves[2], SCALE, None, leaves[0])
    with torch.no_grad():
        leaves[changed].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# The Python kernel and autograd (library.py), the op's specification, in a child process where
# LOWRANK_PYTHON_OPS=1 registers them instead of lowrank._C's.
_PYTHON_OPS = r"""
import torch
from lowrank.ops import csrc
from tests.ops import test_nf4_lora_linear as t
assert not csrc.CPP_AUTOGRAD
for dtype in (torch.float32, torch.bfloat16):
    for shape in ((2, 5, 192), (1, 192), (192,)):
        for double_quant, bias in ((True, False), (False, True)):
            q = t.weight(24, 192, double_quant)
            args = t.operands(shape, 8, q, dtype, bias=bias)
            for needs in t.NEEDS:
                for same_x in (False, True):
                    t.assert_same(t.outputs_and_grads(t.fused, q, *args, needs, same_x),
                                  t.outputs_and_grads(t.two_ops, q, *args, needs, same_x))
t.test_nf4_lora_linear_double_backward_equals_the_two_ops()
t.test_nf4_lora_linear_node_and_opcheck()
print("ok")
"""


@pytest.mark.skipif(csrc._C is None, reason="lowrank._C is not built (this run already tests the Python version)")
def test_the_python_nf4_lora_linear_equals_the_two_ops_too():
    done = run_with_python_ops(_PYTHON_OPS)  # its asserts run in the child; it prints ok at the end
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# LoraLinear's use of it (lora.py, Note: QLoRA in one op)
# ---------------------------------------------------------------------------------------------
def _two_ops(monkeypatch):
    """LoraLinear as it was: the base module, then lora_add."""
    monkeypatch.setattr(LoraLinear, "_qlora", lambda self, base, x, name: None)


def tiny_llama(dtype=torch.bfloat16):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    quantize(model, NF4Config(compute_dtype=dtype))
    inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", init="gaussian"))
    with torch.no_grad():  # B = 0 at init: x's LoRA gradients would be zeros, and sums of them exact
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return model


def train(model, steps, checkpointing=False):
    """Losses and every adapter gradient over `steps` SGD steps on fixed tokens."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses, grads = [], []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.skipif(not CPP, reason="LoraLinear uses nf4_lora_linear with lowrank._C's autograd")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_qlora_llama_trains_as_with_the_two_ops_bit_for_bit(monkeypatch, checkpointing):
    """q, k and v share their input, and so do gate and up: x's gradient is a sum over layers,
    which the engine adds in the two ops' order (Note: QLoRA in one node), so losses and every
    gradient over three steps equal the two ops', activation checkpointing or not."""
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert NODE in _node_names(out.logits) and TWO_OPS not in _node_names(out.logits)
    ours = train(model, 3, checkpointing)
    model.load_state_dict(state)
    _two_ops(monkeypatch)
    out = model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert NODE not in _node_names(out.logits) and TWO_OPS in _node_names(out.logits)
    theirs = train(model, 3, checkpointing)
    assert ours[0] == theirs[0]
    for a, b in zip(ours[1], theirs[1], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def qlora_layer(dtype=torch.bfloat16, bias=False, dropout=0.0, adapters=("default",)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24, bias=bias)).to(dtype)
    quantize(model, NF4Config(compute_dtype=dtype, skip=[]))
    for name in adapters:
        inject(model, LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear", init="gaussian"), name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model[0]


@pytest.mark.skipif(not CPP, reason="LoraLinear uses nf4_lora_linear with lowrank._C's autograd")
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_on_a_4bit_base_in_one_op_equals_the_two_ops(monkeypatch, bias):
    layer = qlora_layer(bias=bias)
    if bias:
        layer.base.bias.requires_grad_()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    results = []
    for one_op in (True, False):
        if not one_op:
            _two_ops(monkeypatch)
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        assert (NODE in _node_names(out)) == one_op
        grads = torch.autograd.grad(out.square().sum(), [x] + [p for p in layer.parameters() if p.requires_grad])
        results.append((out.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.skipif(not CPP, reason="LoraLinear uses nf4_lora_linear with lowrank._C's autograd")
def test_lora_linear_with_dropout_in_eval_mode_in_one_op_equals_the_two_ops(monkeypatch):
    """An adapter trained with dropout, evaluated (its dropout then passes x): one op, the two ops' bits."""
    layer = qlora_layer(dropout=0.3).eval()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(8)).bfloat16().requires_grad_()
    results = []
    for one_op in (True, False):
        if not one_op:
            _two_ops(monkeypatch)
        out = layer(x)
        assert (NODE in _node_names(out)) == one_op
        trained = [x] + [p for p in layer.parameters() if p.requires_grad]
        results.append((out.detach(), torch.autograd.grad(out.square().sum(), trained)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.skipif(not CPP, reason="LoraLinear uses nf4_lora_linear with lowrank._C's autograd")
def test_lora_linear_on_a_4bit_base_keeps_two_ops_where_one_could_differ():
    x = torch.randn(3, 5, 64).bfloat16()
    layer = qlora_layer()
    assert NODE in _node_names(layer(x.requires_grad_()))
    # dropout while training is the op's own (test_lora_dropout.py); an in-place one, several adapters: lora_add
    # after the base
    dropped = qlora_layer(dropout=0.2).train()
    assert NODE in _node_names(dropped(x)) and NODE in _node_names(dropped.eval()(x))
    dropped.train().lora_dropout["default"].inplace = True
    names = _node_names(dropped(x.detach().clone()))
    assert TWO_OPS in names and NODE not in names
    two = qlora_layer(adapters=("a", "b"))
    from lowrank.inject import set_active

    set_active(two, ["a", "b"])
    assert NODE not in _node_names(two(x)) and TWO_OPS in _node_names(two(x))
    seen = []
    handle = layer.base.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    names = _node_names(layer(x))
    handle.remove()
    assert seen == [torch.Size([3, 5, 24])] and NODE not in names  # the base's hook ran
    with torch.autocast("cpu", dtype=torch.bfloat16):  # operands already in autocast's dtype: one op still
        assert NODE in _node_names(layer(x))
    with torch.autocast("cpu", dtype=torch.float16):  # the base would compute in float16
        assert NODE not in _node_names(layer(x))
    assert NODE not in _node_names(layer(x[0, 0].detach().requires_grad_()))  # 1-d x
    assert NODE in _node_names(layer(x))
