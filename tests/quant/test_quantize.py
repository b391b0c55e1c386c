"""quantize(model, NF4Config): which layers it replaces, that a quantized model computes
exactly the dense model whose weights are their dequantized values, that full-precision
weights are freed as it goes, the 4-bit state dict round trip, and QLoRA on top of it:
only adapters move, the loss falls, checkpointing, torch.compile and bf16 autocast."""

import copy
import dataclasses
import weakref

import pytest
import torch
from torch import nn

from lowrank.config import LoraConfig
from lowrank.inject import inject, summary
from lowrank.quant import Linear4bit, NF4Config, nf4, quantize

from ..tuners import models

LLAMA_LINEAR = [f"model.layers.{i}.{m}" for i in range(2) for m in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")  # nf4_linear is F.linear on the dequantized W


def dequantized_copy(model: nn.Module, names, config=NF4Config()) -> nn.Module:
    """The dense model whose named linear weights are replaced by their NF4 round trip."""
    dense = copy.deepcopy(model)
    for name in names:
        w = dense.get_submodule(name).weight
        with torch.no_grad():
            w.copy_(nf4.dequantize(nf4.quantize(w, config.blocksize, config.double_quant)))
    return dense


# -- the config ------------------------------------------------------------------------

def test_config_checks_itself_and_is_frozen():
    with pytest.raises(ValueError, match="blocksize must be one of .* got 48"):
        NF4Config(blocksize=48)
    with pytest.raises(TypeError, match="double_quant must be a bool; got 1"):
        NF4Config(double_quant=1)
    with pytest.raises(ValueError, match="compute_dtype must be None or one of"):
        NF4Config(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="targets is empty"):
        NF4Config(targets=[])
    config = NF4Config(skip="lm_head")
    assert config.targets == ("all-linear",) and config.skip == ("lm_head",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.blocksize = 128


# -- which layers ----------------------------------------------------------------------

def test_llama_all_linear_but_the_head(reference):
    model = models.llama()
    head = model.lm_head.weight.clone()
    dense = dequantized_copy(model, LLAMA_LINEAR)
    ids = models.ids()
    assert quantize(model) == LLAMA_LINEAR
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, head)
    assert all(isinstance(model.get_submodule(n), Linear4bit) for n in LLAMA_LINEAR)
    # Exact invariant: each Linear4bit computes F.linear(x, dequantize(q), b), which is what
    # nn.Linear computes with the dequantized weight; every other op is the same op.
    assert torch.equal(model(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_mlp_with_skip_and_compute_dtype(reference):
    model = models.mlp()
    dense = dequantized_copy(model, ["0", "2"])
    config = NF4Config(skip="4", compute_dtype=torch.float32)
    assert quantize(model, config) == ["0", "2"]
    assert type(model[4]) is nn.Linear
    x = torch.randn(5, 16)
    assert torch.equal(model(x), dense(x))


@pytest.mark.parametrize("make", [lambda: nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]), models.llama],
                         ids=["sequential", "llama"])
def test_full_precision_weights_are_freed_as_it_goes(monkeypatch, make):
    # See Note: no references to the layers (lowrank/quant/quantize.py). When layer k is
    # quantized, layers 0..k-1 must already have lost their last reference; holding the
    # originals (e.g. in the match list) until the end keeps them all alive and fails here.
    model = make()
    refs = [weakref.ref(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    seen = []
    real = nf4.quantize

    def spy(w, *args):
        seen.append([r() is not None for r in refs])
        return real(w, *args)

    monkeypatch.setattr(nf4, "quantize", spy)
    quantize(model)
    assert seen == [[k <= i for i in range(len(refs))] for k in range(len(refs))]
    assert all(r() is None for r in refs)


@pytest.mark.gpu
def test_quantizes_on_the_weights_device():
    model = models.mlp().cuda()
    dense = dequantized_copy(model, ["0", "2", "4"])
    quantize(model)
    assert all(b.device.type == "cuda" for b in model.buffers())
    x = torch.randn(5, 16, device="cuda")
    torch.testing.assert_close(model(x), dense(x))


@pytest.mark.gpu
def test_a_qlora_layer_never_waits_for_the_gpu():
    """A 4-bit layer with LoRA, forward and backward in bfloat16 on CUDA (the GEMV at 4 rows,
    dequantize + cuBLAS at 64), makes no host-device synchronization that torch can see
    (set_sync_debug_mode raises on one): an eager training step can run ahead of the GPU."""
    model = nn.Sequential(nn.Linear(256, 512)).cuda().to(torch.bfloat16)
    quantize(model, NF4Config(compute_dtype=torch.bfloat16))
    inject(model, LoraConfig(r=8, targets=["0"]))
    xs = [torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for rows in (4, 64)]
    model(xs[0]).sum().backward()  # warm-up: first calls may allocate, load kernels, read the environment
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs:
            model(x).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(x.grad is not None for x in xs)


# -- the state dict --------------------------------------------------------------------

def test_model_state_dict_round_trip():
    source, target = models.llama(), models.llama()
    with torch.no_grad():
        for p in target.parameters():
            p.normal_()  # different weights everywhere
    quantize(source), quantize(target, NF4Config(blocksize=128, double_quant=False))
    sd = source.state_dict()
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in sd
    assert sd["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    result = target.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in target.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = models.ids()
    assert torch.equal(target(input_ids=ids).logits, source(input_ids=ids).logits)


# -- QLoRA -----------------------------------------------------------------------------

def qlora_llama(r=8):
    model = models.llama()
    quantize(model)
    inject(model, LoraConfig(r=r, alpha=16))
    return model


def test_a_step_moves_only_the_adapters():
    model = qlora_llama()
    models.randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = models.ids()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved)
    assert not any(".weight." in k or k.endswith("proj.weight") for k in moved)  # 4-bit entries bit-identical


def test_the_loss_falls():
    torch.manual_seed(0)
    model = models.llama()
    # The frozen head must be able to express confident logits: with the config's 0.02 init
    # they stay within about +-1 whatever the adapters do, and the loss cannot fall far.
    nn.init.normal_(model.lm_head.weight, std=0.3)
    quantize(model)
    inject(model, LoraConfig(r=8, alpha=16))
    ids = models.ids(batch=4, seq=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # memorising four random sequences through rank-8 adapters on the frozen 4-bit model;
    # measured: 5.7 -> 0.1 in 30 steps. Without gradients through the 4-bit layers only the
    # last layer's adapters would learn.
    assert losses[-1] < 0.25 * losses[0], losses


def lora_grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_grads():
    # Checkpointing recomputes the same ops on the same inputs (CPU, deterministic): exact.
    model = qlora_llama()
    models.randomize_adapters(model)
    model.train()
    ids = models.ids()
    plain = lora_grads(model, ids)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = lora_grads(model, ids)
    assert plain.keys() == checkpointed.keys() and plain
    for n in plain:
        assert torch.equal(plain[n], checkpointed[n]), n


def test_bf16_autocast_is_the_dense_dequantized_model_under_autocast(reference):
    # Under autocast the 4-bit layer computes F.linear(x.bf16, dequantize(q, bf16), b.bf16);
    # nn.Linear under autocast computes F.linear(x.bf16, W.bf16, b.bf16), and dequantize
    # rounds NF4_CODE * absmax (float32) once to bf16, as W.bf16 rounds the dequantized
    # float32 W once: the same bf16 operands, the same op, so the logits are equal exactly.
    model = models.llama()
    dense = dequantized_copy(model, LLAMA_LINEAR)
    quantize(model)
    for m in (model, dense):
        torch.manual_seed(0)  # A's kaiming init draws from the global generator
        inject(m, LoraConfig(r=4))
        models.randomize_adapters(m)
    ids = models.ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


# Note: the compile bound. Inductor may sum in another order and fuse the LoRA branch and
# the GELU into other kernels (the 4-bit op itself is opaque: the same kernel runs). Any
# float32 evaluation of a layer y = W h + b + s B (A h) (W: the dequantized float32 operand)
# has, by Higham's Thm 3.1 with n = K + r + 3 terms and roundings,
#     |y - y_exact| <= |W + s B A| e_in + gamma_n (|W| |h| + |b| + s |B| (|A| |h|)),
# and GELU (max slope 1.1289) adds 1.1289 e plus its own libm error, taken as 4 ulp
# (glibc / SLEEF erf are within 2). Propagated layer by layer in float64, this bounds each of
# eager and compiled against the exact result; they differ by at most twice the bound.
GELU_LIPSCHITZ = 1.1289


def mlp_error_bound(model, x):
    """(y_exact, elementwise bound) for the quantized + LoRA MLP. See Note: the compile bound."""
    from ..ops.bounds import U_ACCUMULATE as u

    h, err = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    for m in model:
        if isinstance(m, nn.GELU):
            h = torch.nn.functional.gelu(h)
            err = GELU_LIPSCHITZ * err + 4 * u * h.abs()
            continue
        W, b = m.base.dequantize().double(), m.base.bias.double()  # (out, K), (out,)
        A, B = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()  # (r, K), (out, r)
        s = m.scaling["default"]
        n = W.shape[1] + A.shape[0] + 3
        gamma = n * u / (1 - n * u)
        size = h.abs() @ W.abs().T + b.abs() + s * (h.abs() @ A.abs().T) @ B.abs().T  # (M, out)
        err = err @ (W.abs() + s * B.abs() @ A.abs()).T * (1 + gamma) + gamma * size
        h = h @ W.T + b + s * (h @ A.T) @ B.T  # (M, K) -> (M, out)
    return h, err


def test_torch_compile_matches_eager():
    model = models.mlp()
    quantize(model)
    torch.manual_seed(0)
    inject(model, LoraConfig(r=4))
    models.randomize_adapters(model)
    x = torch.randn(5, 16)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(x)  # fullgraph: the op's fake kernel traces, no break
    exact, bound = mlp_error_bound(model, x)
    assert ((eager.double() - exact).abs() <= bound).all()  # the derivation holds for eager
    assert ((compiled.double() - eager.double()).abs() <= 2 * bound).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_blocks_under_checkpointing_are_as_accurate_as_eager(device):
    """compile_blocks (`lowrank train`'s `compile: true`) on a QLoRA Llama with activation
    checkpointing: each decoder layer compiles whole (fullgraph: the 4-bit op, LoRA and the
    checkpoint's recompute need no graph break), and the loss and adapter gradients stay as
    close to the exact ones (the float64 model with the same dequantized weights and adapters)
    as eager float32's: Inductor sums in other orders, so a small factor of eager's own error,
    plus one float32 rounding of the value."""
    from lowrank.workflow.model import compile_blocks

    model = models.llama()
    exact = dequantized_copy(model, LLAMA_LINEAR).double().to(device)
    model.to(device)
    quantize(model)  # on the GPU: Inductor's Triton kernels around the CUDA kernels of the 4-bit op
    for m in (model, exact):
        inject(m, LoraConfig(r=4, alpha=8))
    models.randomize_adapters(model)
    with torch.no_grad():  # the same adapter values, exactly, in float64
        for name, p in model.named_parameters():
            if p.requires_grad:
                exact.get_parameter(name).copy_(p)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = models.ids().to(device)

    def loss_and_grads(m):
        m.zero_grad()
        logits = m(input_ids=ids).logits  # the loss here: transformers' would cast float64 logits to float32
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}}

    want, eager = loss_and_grads(exact), loss_and_grads(model)
    torch._dynamo.reset()
    assert compile_blocks(model, fullgraph=True) == 2
    compiled = loss_and_grads(model)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert want.keys() == eager.keys() == compiled.keys() and len(want) == 1 + 2 * len(LLAMA_LINEAR)
    u = 2.0**-24  # float32 unit roundoff
    for name, w in want.items():
        err_eager = (eager[name].double() - w).norm()
        err_compiled = (compiled[name].double() - w).norm()
        assert err_compiled <= 4 * err_eager + u * w.norm(), (name, err_compiled, err_eager)


def test_qlora_on_a_bf16_model_without_autocast():
    """The adapters take the 4-bit layer's compute dtype (bf16), not its float32 scales'."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128, bias=False), nn.GELU(), nn.Linear(128, 64, bias=False)).bfloat16()
    quantize(mlp, NF4Config(targets="all-linear"))
    inject(mlp, LoraConfig(r=4, targets="all-linear"))
    lora_params = [p for n, p in mlp.named_parameters() if "lora_" in n]
    assert lora_params and all(p.dtype == torch.bfloat16 for p in lora_params)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = mlp(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in lora_params)


def test_summary_counts_the_4bit_weights():
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    dense_total = sum(p.numel() for p in mlp.parameters())
    quantize(mlp, NF4Config(targets="all-linear"))
    inject(mlp, LoraConfig(r=4, targets="all-linear"))
    s = summary(mlp)
    lora = 4 * (64 + 128) * 2
    assert s.trainable == lora and s.total == dense_total + lora and s.per_adapter == {"default": lora}
