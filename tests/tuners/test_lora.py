"""LoRA invariants: a fresh adapter is the identity; merged equals unmerged within a derived
bound; merge then unmerge restores the weight within a derived bound; merge is idempotent
and safe; frozen weights don't move after an optimizer step; eject restores the state dict
exactly; the same code wraps a frozen 4-bit (NF4) base."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowrank.config import LoraConfig
from lowrank.inject import eject, inject, merge, unmerge
from lowrank.quant import Linear4bit
from lowrank.tuners.lora import LoraLinear

from . import models
from .bounds import U32, gamma, lora_linear_bound


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D, re-declared so the layout test needs no transformers: (in, out) weight."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).reshape(*x.shape[:-1], self.nf)


def single(base: nn.Module, **cfg) -> nn.Module:
    holder = nn.Sequential(base)
    inject(holder, LoraConfig(r=4, alpha=8, targets="0", **cfg))
    models.randomize_adapters(holder)
    return holder


@pytest.mark.parametrize("make", [lambda: models.llama(), lambda: models.gpt2(), lambda: models.bert(),
                                  lambda: models.encoder(), lambda: models.mlp()],
                         ids=["llama", "gpt2", "bert", "encoder", "mlp"])
@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapter_is_the_identity(make, dora):
    # B = 0 makes s B A x exactly 0.0, and DoRA's m / n exactly 1.0 (m and n are the same norm
    # of the same W): the sum adds exact zeros, so the output is bit-for-bit the base output.
    model = make()  # train mode with dropout 0: no fused eval-only kernels to change the rounding
    x = torch.randn(2, 5, 16 if isinstance(model, nn.Sequential) else 32) if not hasattr(model, "config") else models.ids()
    model.requires_grad_(False)  # as inject leaves it: torch picks attention kernels by requires_grad
    before = models.run(model, x)
    inject(model, LoraConfig(r=4, targets="all-linear", dora=dora))
    assert torch.equal(models.run(model, x), before)


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
def test_merged_equals_unmerged_within_rounding_bound(kind):
    torch.manual_seed(0)
    base = nn.Linear(48, 24) if kind == "linear" else Conv1D(24, 48)
    holder = single(base)
    layer = holder[0]
    x = torch.randn(16, 48)
    unmerged = holder(x)
    W = base.weight.detach().clone()
    W = W.T if kind == "conv1d_gpt2" else W  # (out, in)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    assert merge(holder) == ["0"]
    merged = holder(x)
    bound = lora_linear_bound(x, W, A.detach(), B.detach(), s, base.bias.detach())
    assert ((merged - unmerged).abs() <= 2 * bound).all()  # each path within `bound` of the exact value


def test_dora_merged_equals_unmerged_within_rounding_bound():
    torch.manual_seed(0)
    base = nn.Linear(48, 24)
    holder = single(base, dora=True)
    layer = holder[0]
    x = torch.randn(16, 48)
    W = base.weight.detach().clone()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s, m = layer.scaling["default"], layer.lora_magnitude_vector["default"].detach()
    unmerged = holder(x)
    merge(holder)
    merged = holder(x)
    f = (m / torch.linalg.norm(W + s * B @ A, dim=1)).abs()  # (out,)
    # The paths differ by the roundings of lora_linear_bound plus those of the factor f: the
    # row norm (K squares summed, a sqrt: K + 2) and the divide (1), on both sides: (K + 3)
    # more rounded steps, and the unmerged path's extra (f - 1) W x term (|W| |x|, one more).
    K = W.shape[1]
    bound = lora_linear_bound(x, W, A, B, s, base.bias.detach(), extra_ops=K + 4) * (f + 1)
    assert ((merged - unmerged).abs() <= 2 * bound).all()


@pytest.mark.parametrize("kind, dora, dtype", [("linear", False, torch.float32), ("conv1d_gpt2", False, torch.float32),
                                               ("embedding", False, torch.float32), ("conv2d", False, torch.float32),
                                               ("linear", True, torch.float32), ("conv1d_gpt2", True, torch.float32),
                                               ("linear", False, torch.bfloat16), ("linear", True, torch.bfloat16),
                                               ("embedding", False, torch.float16)])
def test_merge_then_unmerge_restores_the_weight(kind, dora, dtype):
    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(48, 24), "conv1d_gpt2": lambda: Conv1D(24, 48),
            "embedding": lambda: nn.Embedding(40, 16), "conv2d": lambda: nn.Conv2d(3, 8, 3)}[kind]().to(dtype)
    holder = single(base, dora=dora)
    W0 = base.weight.detach().float()
    d = holder[0]._delta_weight("default", torch.float32).detach()  # the float32 update merge adds and unmerge subtracts
    merge(holder)
    merged = base.weight.detach().clone()
    merge(holder)  # idempotent: a second merge changes nothing
    assert torch.equal(base.weight, merged)
    unmerge(holder)
    unmerge(holder)  # idempotent
    # LoRA: t = fl(fl(W + d) - d) = W + e with |e| <= gamma(2) (|W| + |W + d|).
    # DoRA: t = fl(fl(fl(f (W + d)) / f) - d): two more roundings on |W + d|: gamma(4).
    # In bf16 / fp16 each of those steps is a float32 one and then, at the copy, one in the
    # weight's dtype: unit roundoff u16 + u32 per step, inside gamma(n, 2 u16).
    u = {torch.float32: U32, torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}[dtype]
    assert ((base.weight.float() - W0).abs() <= gamma(4 if dora else 2, u) * (W0.abs() + (W0 + d).abs())).all()


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing():
    holder = single(nn.Linear(8, 8))
    with torch.no_grad():
        holder[0].lora_B["default"].weight[0, 0] = float("inf")
    W0 = holder[0].base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        merge(holder)
    assert torch.equal(holder[0].base.weight, W0) and holder[0].merged == ()


def test_merge_is_not_a_side_effect_of_eval():
    holder = single(nn.Linear(8, 8))
    W0 = holder[0].base.weight.detach().clone()
    holder.eval()
    holder.train()
    assert torch.equal(holder[0].base.weight, W0) and holder[0].merged == ()


@pytest.mark.parametrize("dora", [False, True])
def test_frozen_weights_do_not_move_after_an_optimizer_step(dora):
    model = models.llama()
    inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj", "embed_tokens"] if not dora else ["q_proj", "v_proj"],
                             dora=dora))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # two steps: the first moves only B (A gets no gradient while B = 0)
        model(input_ids=models.ids(), labels=models.ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in trainable.items())


def test_eject_restores_the_state_dict_exactly_same_objects():
    model = models.gpt2()
    before = model.state_dict(keep_vars=True)
    modules_before = dict(model.named_modules())
    inject(model, LoraConfig(r=4, targets=["c_attn", "wte"]))
    models.randomize_adapters(model)
    model(input_ids=models.ids()).logits.sum().backward()
    eject(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)  # the very same Parameter objects, values untouched
    assert all(m is modules_before[n] for n, m in model.named_modules())


def test_eject_of_the_last_adapter_restores_requires_grad():
    model = models.gpt2()
    model.transformer.wte.requires_grad_(False)  # the user's own choice of what trains
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inject(model, LoraConfig(r=4, targets=["c_attn"]), name="a")
    inject(model, LoraConfig(r=4, targets=["c_proj"]), name="b")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    eject(model, "a")  # one adapter left: the base stays frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    eject(model, "b")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_eject_keep_merged_leaves_a_plain_fine_tuned_model():
    torch.manual_seed(0)
    mlp = models.mlp()
    inject(mlp, LoraConfig(r=4, targets="all-linear"))
    models.randomize_adapters(mlp)
    x = torch.randn(5, 16)
    y = mlp(x)
    merge(mlp)
    eject(mlp, keep_merged=True)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.GELU) for m in mlp.modules())
    torch.testing.assert_close(mlp(x), y)  # rounding only: exact bounds are per layer, above


def test_a_frozen_4bit_base_takes_the_same_lora_and_dora_code(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")  # nf4_linear is then F.linear on the dequantized W
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 24))
    for dora in (False, True):
        holder = single(copy.deepcopy(base), dora=dora)
        layer = holder[0]
        assert isinstance(layer, LoraLinear)
        x = torch.randn(3, 64)
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        expected = F.linear(x, base.dequantize(), base.bias) + (x @ A.T @ B.T) * s if not dora else None
        out = holder(x)
        if expected is not None:
            torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the very ops of the layer: exact
        out.sum().backward()
        assert A.grad is not None and B.grad is not None
        with pytest.raises(TypeError, match="4-bit"):
            merge(holder)


def test_embedding_bases_lora_refuses_or_takes_as_their_forward_needs():
    """max_norm renormalizes the table's rows at every lookup (a merge would not compute what the
    adapter did): refused. sparse=True: the base is frozen, so A's lookup is dense and backward
    runs (it crashed in the matmul on a sparse gradient), with the dense base's gradients."""
    with pytest.raises(ValueError, match="max_norm is not supported: '0' has max_norm=1.0"):
        inject(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)), LoraConfig(targets="0"))
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 4, sparse=sparse))
        inject(model, LoraConfig(targets="0"))
        with torch.no_grad():
            model[0].lora_embedding_A["default"].normal_()
        model(torch.tensor([[1, 2, 2, 7]])).square().sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_an_embedding_that_reads_rows_by_position_is_refused():
    """BART's embed_positions (an nn.Embedding subclass) numbers positions from the input's shape:
    LoRA's rows, read by id, would be added to other rows (PEFT takes it and fails in the forward)."""
    class Positions(nn.Embedding):
        def forward(self, ids):
            return super().forward(torch.arange(ids.shape[-1], device=ids.device).expand_as(ids))

    class Scaled(nn.Embedding):  # Gemma's kind: the rows times embed_scale, which LoRA scales the same
        embed_scale = 2.0

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    class RoundedScale(nn.Embedding):  # Gemma 3's with bf16 weights and a float32 scale: it rounds the scale first
        def __init__(self, *args):
            super().__init__(*args, dtype=torch.bfloat16)
            self.register_buffer("embed_scale", torch.tensor(96**0.5))

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale.to(self.weight.dtype)

    with pytest.raises(ValueError, match=r"LoRA on '0', a Positions, is not supported: its forward does not return"):
        inject(nn.Sequential(Positions(10, 4)), LoraConfig(targets="0"))
    assert inject(nn.Sequential(Scaled(10, 4)), LoraConfig(targets="0")) == ["0"]
    assert inject(nn.Sequential(RoundedScale(10, 96)), LoraConfig(targets="0")) == ["0"]


def test_conv_factors_take_the_bases_class_or_a_plain_convolution():
    """A subclass that takes a convolution's arguments gives the factors its class, as PEFT does
    (one that pads in its forward, a causal conv, needs A to pad the same); one with other
    constructor arguments crashed inside inject, and gets plain nn.Conv1d/2d/3d factors."""
    class Causal(nn.Conv1d):
        def __init__(self, cin, cout, kernel, stride=1, padding=0, dilation=1, groups=1, bias=True):  # transformers' style
            super().__init__(cin, cout, kernel, stride, padding, dilation, groups, bias)

        def forward(self, x):
            return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))

    torch.manual_seed(0)
    causal = nn.Sequential(Causal(3, 5, 4))
    inject(causal, LoraConfig(targets="0"))
    assert type(causal[0].lora_A["default"]) is Causal
    with torch.no_grad():
        causal[0].lora_B["default"].weight.normal_()
    x = torch.randn(2, 3, 9)
    unmerged = causal(x)
    assert unmerged.shape == (2, 5, 9)
    merge(causal)
    # float32: (W + s B A) * x against W * x + s B (A * x), a few roundings of sums of 12 terms of size ~1
    torch.testing.assert_close(causal(x), unmerged, rtol=1e-5, atol=1e-5)

    class Standardized(nn.Conv2d):
        def __init__(self, cin, cout):
            super().__init__(cin, cout, 3, padding=1, padding_mode="circular")

        def forward(self, x):
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return self._conv_forward(x, w, self.bias)

    model = nn.Sequential(Standardized(3, 5))
    inject(model, LoraConfig(targets="0"))
    a, b = model[0].lora_A["default"], model[0].lora_B["default"]
    assert type(a) is nn.Conv2d and type(b) is nn.Conv2d and a.padding_mode == "circular"
    assert model(torch.randn(1, 3, 6, 6)).shape == (1, 5, 6, 6)


def test_dora_refuses_a_base_whose_weight_is_not_dense():
    """A bitsandbytes Linear4bit is an nn.Linear with uint8 codes as `weight` and no dequantize():
    DoRA's norms read the dense weight, so it is refused at inject (plain LoRA works)."""
    layer = nn.Linear(16, 8)
    layer.weight = nn.Parameter(torch.zeros(64, 1, dtype=torch.uint8), requires_grad=False)
    model = nn.Sequential(nn.Linear(8, 16), layer)
    with pytest.raises(ValueError, match=r"DoRA needs the dense weight of '1', a Linear whose weight is torch.uint8"):
        inject(model, LoraConfig(dora=True, targets=nn.Linear))
    assert type(model[0]) is nn.Linear
