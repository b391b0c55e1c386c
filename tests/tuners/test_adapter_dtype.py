"""inject(..., dtype=): adapters in another dtype than their modules' (float32 on a bf16 model,
PEFT's default), on every kind of base (lowrank/inject.py, Note: adapter dtype). Each equation
is the ops the layer runs, so equality is exact; outside autocast the adapter's input is cast
to its dtype, and on a dense base its addition is summed with the base output in float32 and
the sum rounded once to the model's dtype, as PEFT's dense layers do (tuners/lora_base.py,
Note: x in the adapter's dtype)."""

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig, inject
from lowrank.tuners import dora

from . import models

BF16, F32 = torch.bfloat16, torch.float32


def _wrapped(base: nn.Module, **lora) -> nn.Module:
    holder = nn.Sequential(base.to(BF16))
    inject(holder, LoraConfig(r=4, alpha=8, targets="0", **lora), dtype=F32)
    models.randomize_adapters(holder)
    return holder


def test_linear_casts_x_in_and_the_sum_back_once():
    torch.manual_seed(0)
    holder = _wrapped(nn.Linear(16, 8))
    layer = holder[0]
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.weight.dtype == B.weight.dtype == F32
    x = torch.randn(3, 16, dtype=BF16)
    out = holder(x)
    assert out.dtype == BF16
    assert torch.equal(out, (layer.base(x) + B(A(x.float())) * 2.0).to(BF16))
    assert not torch.equal(out, layer.base(x) + (B(A(x.float())) * 2.0).to(BF16))  # two roundings differ here


def test_gpt2_conv1d_casts_like_a_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    holder = _wrapped(Conv1D(8, 16))  # (nf=out, nx=in)
    layer = holder[0]
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = torch.randn(2, 3, 16, dtype=BF16)
    assert torch.equal(holder(x), (layer.base(x) + B(A(x.float())) * 2.0).to(BF16))


def test_embedding_casts_its_sum_back():
    """Token ids are not cast; before, a float32 addition promoted the embeddings to float32."""
    torch.manual_seed(0)
    holder = _wrapped(nn.Embedding(20, 8))
    layer = holder[0]
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert A.dtype == B.dtype == F32
    ids = torch.tensor([[1, 5, 19], [0, 2, 2]])
    out = holder(ids)
    assert out.dtype == BF16
    assert torch.equal(out, (layer.base(ids) + A.T[ids] @ B.T * 2.0).to(BF16))


def test_conv_casts_x_in_and_the_sum_back():
    """Before, the float32 convolution refused bf16 x."""
    torch.manual_seed(0)
    holder = _wrapped(nn.Conv2d(3, 6, 3, padding=1))
    layer = holder[0]
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = torch.randn(2, 3, 5, 5, dtype=BF16)
    out = holder(x)
    assert out.dtype == BF16
    assert torch.equal(out, (layer.base(x) + B(A(x.float())) * 2.0).to(BF16))


def test_dora_sums_in_float32_and_rounds_once():
    torch.manual_seed(0)
    holder = _wrapped(nn.Linear(16, 8), dora=True)
    layer = holder[0]
    m = layer.lora_magnitude_vector["default"]
    assert m.dtype == F32
    x = torch.randn(3, 16, dtype=BF16)
    base_out = layer.base(x)
    d = dora.delta(x.float(), base_out, weight=layer.base.weight, bias=layer.base.bias,
                   lora_A=layer.lora_A["default"], lora_B=layer.lora_B["default"], scaling=2.0, magnitude=m)
    assert d.dtype == F32
    assert torch.equal(holder(x), (base_out + d).to(BF16))


def test_under_autocast_autocast_casts():
    """Inside autocast nothing is cast by the layer: F.linear computes in autocast's dtype."""
    torch.manual_seed(0)
    holder = _wrapped(nn.Linear(16, 8))
    layer = holder[0]
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=BF16):
        out = holder(x)
        expected = layer.base(x) + B(A(x)) * 2.0
    assert out.dtype == BF16 and torch.equal(out, expected)


CONFIGS = {
    "lora": LoraConfig(r=4, targets="all-linear"),
    "dora": LoraConfig(r=4, targets="all-linear", dora=True, dropout=0.1),
    "pfeiffer": AdapterConfig(),
    "houlsby-parallel": AdapterConfig(placement="houlsby", parallel=True),
    "prefix": PrefixConfig(num_virtual_tokens=3),
    "prefix-mlp": PrefixConfig(num_virtual_tokens=3, projection_hidden=8),
    "prompt": PromptConfig(num_virtual_tokens=3),
}


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_float32_adapters_on_a_bf16_llama_keep_small_updates(kind, quantized):
    """Every adapter parameter is float32, the model's outputs stay bf16, and one AdamW step of lr
    1e-5 moves (nearly) every entry that has a gradient: an update that small is under half a bf16
    step of entries ~0.1 (2^-9 * 0.1 = 2e-4), so bf16 adapters would keep most of them."""
    model = models.llama().to(BF16)
    if quantized:
        lowrank.quantize(model)
    inject(model, CONFIGS[kind], dtype=F32)
    models.randomize_adapters(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and {p.dtype for p in params.values()} == {F32}
    model.train()
    before = {n: p.detach().clone() for n, p in params.items()}
    out = models.run(model, models.ids(seq=9))
    assert out.dtype == BF16
    out.float().square().mean().backward()
    torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.0).step()
    for n, p in params.items():
        assert p.grad.dtype == F32 and p.grad.abs().sum() > 0, n
        fed = p.grad != 0  # a ReLU bottleneck's dead units get no gradient, and Adam no step
        moved = (p != before[n])[fed].float().mean().item()
        assert moved > 0.9, (n, moved)
        assert (p.to(BF16) != before[n].to(BF16))[fed].float().mean().item() < 0.5, n  # what bf16 would keep


def test_bad_dtype_is_refused_before_anything_changes():
    model = models.mlp()
    for bad in (torch.int8, "float32", 32):
        with pytest.raises(TypeError, match=r"dtype must be None or a floating torch.dtype .*got"):
            inject(model, LoraConfig(r=2), dtype=bad)
    assert lowrank.adapter_names(model) == [] and all(type(m) is not nn.Sequential or m is model
                                                      for m in model.modules())


def test_per_sample_routes_float32_adapters_on_a_bf16_model():
    model = models.llama().to(BF16)
    for name in ("a", "b"):
        inject(model, LoraConfig(r=4, targets="all-linear", dora=name == "b"), name, dtype=F32)
    models.randomize_adapters(model)
    ids = models.ids(batch=3, seq=5)
    with torch.no_grad(), lowrank.per_sample(model, ["a", "__base__", "b"]):
        mixed = models.run(model, ids)
    alone = []
    for i, name in enumerate(["a", None, "b"]):
        with torch.no_grad():
            if name is None:
                with lowrank.disabled(model):
                    alone.append(models.run(model, ids[i:i + 1]))
            else:
                lowrank.set_active(model, name)
                alone.append(models.run(model, ids[i:i + 1]))
    assert mixed.dtype == BF16
    assert torch.equal(mixed, torch.cat(alone))


@pytest.mark.parametrize("kind", ["lora", "dora", "pfeiffer", "prefix", "prompt"])
def test_load_adapter_keeps_float32_weights_unrounded(tmp_path, kind):
    """Saved from float32 adapters on a bf16 model, loaded with dtype=float32 they are the same
    numbers; loaded without, they are rounded to bf16 (prompts: float32 either way)."""
    model = models.llama().to(BF16)
    fresh = copy.deepcopy(model)
    inject(model, CONFIGS[kind], dtype=F32)
    models.randomize_adapters(model)
    lowrank.save_adapter(model, tmp_path / "a")
    saved = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for dtype in (F32, None):
        target = copy.deepcopy(fresh)
        lowrank.load_adapter(target, tmp_path / "a", dtype=dtype)
        loaded = {n: p.detach() for n, p in target.named_parameters() if p.requires_grad}
        assert loaded.keys() == saved.keys()
        for n, p in loaded.items():
            kept = dtype is F32 or kind == "prompt"
            assert torch.equal(p, saved[n] if kept else saved[n].to(BF16)), (n, dtype)
        if dtype is F32:
            assert torch.equal(models.run(target.eval(), models.ids()), models.run(model.eval(), models.ids()))
