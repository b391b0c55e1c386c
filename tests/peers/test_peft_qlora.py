"""QLoRA against the usual stack: lowrank's quantize + inject and PEFT 0.21's LoRA on
bitsandbytes' Linear4bit, from the same dense weights (the NF4 codes are bit-exact with
bitsandbytes', tests/peers/test_nf4_bitsandbytes.py) and the same adapter tensors, give the same
outputs and the same gradients, bit for bit, in training mode (dropout included: both draw the
same random numbers in the same order).

The dtype settings: a bfloat16 model computing in bfloat16 (every tensor bfloat16: lowrank takes
its one-op paths, lowrank/tuners/lora.py, Note: QLoRA in one op), and settings where activations
meet adapters of another dtype (lowrank/tuners/lora_base.py, Note: x in the adapter's dtype,
which follows PEFT's bitsandbytes layer; before it, such a call raised in F.linear): a float32
model computing in bfloat16 (the layer's output float32); a bfloat16 model with float32
adapters, PEFT's own default (its autocast_adapter_dtype=True; lowrank's inject(dtype=)); and, one layer only (see its test), a bfloat16 model computing in
float32 (its output bfloat16: the adapter's float32 addition is cast back before it is added, as
PEFT's bitsandbytes layer does; PEFT's plain Linear layer instead adds in float32 and rounds the
sum once) and a float32 model computing in bfloat16 on bfloat16 x.

Why equality is exact: see tests/peers/test_peft_lora.py, Note: why equality is exact. Here the 4-bit
bases also agree: with more than 16 rows of x lowrank's op dequantizes W in the compute dtype and
calls F.linear, as bitsandbytes' MatMul4Bit does on the CPU (one rounding of the same float32
product either way); at 16 rows or fewer lowrank's CPU GEMV sums in another order, which is
checked against a bound elsewhere (tests/csrc), not for equality.
"""

from __future__ import annotations

import copy
import pathlib
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from lowrank import LoraConfig, NF4Config, inject, quantize  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
from _qlora_build import bnb_quantize  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def ours_name(peft_name: str) -> str:
    """PEFT's parameter name -> lowrank's (its wrapped layer is `base_layer`; DoRA's m is a module)."""
    name = peft_name.replace(".base_layer.", ".base.")
    return name.removesuffix(".weight") if "lora_magnitude_vector." in name else name


def pair(model_dtype: torch.dtype, compute_dtype: torch.dtype, dora: bool, dropout: float,
         adapter_dtype: torch.dtype | None = None):
    """(ours, PEFT's) from one tiny Llama in model_dtype, 4-bit layers computing in compute_dtype,
    and the same non-zero adapter tensors (ours, in the dtype lowrank makes them or in
    adapter_dtype, given to PEFT)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaModel(cfg).to(model_dtype)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    quantize(ours, NF4Config(compute_dtype=compute_dtype))
    bnb_quantize(theirs, compute_dtype, torch.device("cpu"))
    inject(ours, LoraConfig(r=4, alpha=8, targets=TARGETS, dora=dora, dropout=dropout), dtype=adapter_dtype)
    theirs.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: PEFT then makes its bitsandbytes layers
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora,
                                                 lora_dropout=dropout), theirs)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:  # random, so that B A != 0 and the check means something
                p.add_(torch.randn_like(p) * 0.1)
                assert adapter_dtype is None or p.dtype == adapter_dtype
    assert all(type(m).__module__ == "peft.tuners.lora.bnb" for m in theirs.modules() if hasattr(m, "lora_A"))
    ours_params = dict(ours.named_parameters())
    theirs_trained = [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]
    assert sorted(ours_name(n) for n, _ in theirs_trained) == sorted(n for n, p in ours_params.items() if p.requires_grad)
    for name, p in theirs_trained:
        p.data = ours_params[ours_name(name)].detach().clone()  # PEFT keeps float32 adapters by default: take ours
    return ours.train(), theirs.train()


def outputs_and_grads(model, ids):
    torch.manual_seed(5)  # the dropout's random numbers: the same on both sides
    out = model(input_ids=ids).last_hidden_state
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)  # every direction counts
    (out * g).sum().backward()
    return out, {ours_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("model_dtype, compute_dtype, adapter_dtype", [
    (torch.bfloat16, torch.bfloat16, None), (torch.float32, torch.bfloat16, None),
    # PEFT's own default: float32 adapters on a half-precision model (get_peft_model's
    # autocast_adapter_dtype=True); in lowrank, inject(..., dtype=torch.float32)
    (torch.bfloat16, torch.bfloat16, torch.float32),
], ids=["bf16", "fp32-model-bf16-compute", "bf16-model-fp32-adapters"])
def test_qlora_equals_peft_on_bitsandbytes(model_dtype, compute_dtype, adapter_dtype, dora, dropout):
    ours, theirs = pair(model_dtype, compute_dtype, dora, dropout, adapter_dtype)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))  # 18 rows: see the docstring
    out_ours, grads_ours = outputs_and_grads(ours, ids)
    out_theirs, grads_theirs = outputs_and_grads(theirs, ids)
    assert out_ours.dtype == out_theirs.dtype == model_dtype
    assert torch.equal(out_ours, out_theirs)
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) == 6 * (2 + dora)  # 2 layers x 3 targets
    for name, grad in grads_ours.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(grad, grads_theirs[name]), name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("model_dtype, compute_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-model-fp32-compute", "fp32-model-bf16-compute"])
def test_a_4bit_layer_on_bf16_x_equals_peft(model_dtype, compute_dtype, dora, dropout):
    """One layer on bfloat16 x. A bfloat16 model whose 4-bit layers compute in float32: the
    adapters are float32, their addition comes back in bfloat16. A float32 model computing in
    bfloat16: x already in the adapters' dtype, but DoRA's magnitude is float32 (the weight's
    dtype), so its sum is wider and comes back in bfloat16 too. One layer and an x without grad,
    because a whole model's gradients would also go through the base's backward, where
    bitsandbytes 0.50 rounds W to the dtype it was stored in (MatMul4Bit.backward dequantizes in
    quant_state.dtype) while its forward does not; lowrank uses the compute-dtype W both ways. The
    adapters' gradients do not depend on it."""
    ours, theirs = pair(model_dtype, compute_dtype, dora, dropout)
    ours_layer, theirs_layer = ours.layers[0].self_attn.q_proj, theirs.layers[0].self_attn.q_proj
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    results = []
    for layer in (ours_layer, theirs_layer):
        torch.manual_seed(5)
        out = layer(x)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).bfloat16()).sum().backward()
        results.append((out, {ours_name(n): p.grad for n, p in layer.named_parameters() if p.requires_grad}))
    (out_ours, grads_ours), (out_theirs, grads_theirs) = results
    assert out_ours.dtype == out_theirs.dtype == torch.bfloat16 and torch.equal(out_ours, out_theirs)
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) == 2 + dora
    for name, grad in grads_ours.items():
        assert grad.abs().sum() > 0 and torch.equal(grad, grads_theirs[name]), name


def test_lora_on_bitsandbytes_own_layer_casts_as_peft():
    """A model transformers loaded with BitsAndBytesConfig holds bitsandbytes' own Linear4bit:
    lowrank's float32 adapter on it rounds its addition first, as PEFT's bitsandbytes layer does
    (lowrank/tuners/lora_base.py, quantized_base); it took the dense rule (one rounding of the sum)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(64, 64, dtype=torch.bfloat16) * 0.1
    q = bnb.nn.Linear4bit(64, 64, bias=False, device="meta", compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")._quantize("cpu")
    ours, theirs = torch.nn.Sequential(q), copy.deepcopy(torch.nn.Sequential(q))
    theirs.is_loaded_in_4bit = True
    inject(ours, LoraConfig(r=4, alpha=8, targets=["0"]), dtype=torch.float32)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), theirs)
    with torch.no_grad():
        ours[0].lora_B["default"].weight.normal_(0, 0.5)
        for k in ("lora_A", "lora_B"):
            getattr(theirs[0], k)["default"].weight.data = getattr(ours[0], k)["default"].weight.detach().float().clone()
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))
    # an nn.Linear subclass with packed weights and a forward of its own: "all-linear" takes it
    assert inject(copy.deepcopy(torch.nn.Sequential(q)), LoraConfig(r=2)) == ["0"]


def test_dora_then_lora_on_a_4bit_layer_rounds_each_sum_as_peft_bitsandbytes():
    """On a 4-bit base PEFT's bitsandbytes layer casts each adapter's result back to the output's
    dtype before the next adapter (DoRA's sum included); the rule written out from its code."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    quantize(model, NF4Config(compute_dtype=torch.bfloat16))
    inject(model, LoraConfig(r=4, alpha=8, targets=["0"], dora=True), "one", dtype=torch.float32)
    inject(model, LoraConfig(r=4, alpha=8, targets=["0"]), "two", dtype=torch.float32)
    lowrank_layer = model[0]
    import lowrank

    lowrank.set_active(model, ["one", "two"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(16, 64, dtype=torch.bfloat16)
        base = lowrank_layer.base(x)
        one = (base + lowrank_layer._delta("one", x, base, wide=True, running=base)).to(torch.bfloat16)
        want = one + lowrank_layer._delta("two", x, base, running=one)  # LoRA: cast first, then added
        assert torch.equal(model(x), want)
