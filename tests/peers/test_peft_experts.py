"""LoRA on parameters (LoraConfig.parameters, PEFT's target_parameters) against PEFT 0.21 on
tiny transformers 5 mixture-of-experts models: Mixtral (experts (E, out, in)), GPT-OSS
(experts (E, in, out), `is_transposed`) and a 2-D router weight.

Equality is exact: W' is formed with the same torch calls in the same dtype as PEFT's
parametrization (lowrank/tuners/lora_param.py, Note: W' as PEFT forms it), and the model then
runs the same code on the same tensors, so any difference is a difference in formulation.
"""

from __future__ import annotations

import copy
import json
import zlib

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from tests.tuners.models import phimoe  # noqa: E402

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def mixtral(experts: str | None = None) -> torch.nn.Module:
    """`experts`: transformers' experts implementation ("eager" loops over experts; its default,
    grouped_mm, takes no float64)."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    if experts is not None:
        cfg._experts_implementation = experts
    return transformers.MixtralForCausalLM(cfg)


def gpt_oss() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2)
    return transformers.GptOssForCausalLM(cfg)


MODELS = {"mixtral": (mixtral, EXPERTS + ["mlp.gate.weight"]), "gpt_oss": (gpt_oss, EXPERTS)}


def peft_model(base, params, dtype=None, **kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=params, **kw)
    pm = peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=dtype is None)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # B = 0 at init would hide every mistake in B's layout
                p.normal_(generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
    return pm


def ours_named(model) -> dict[str, torch.Tensor]:
    """Our adapter parameters under PEFT's names (no adapter name; our `base` is its `base_layer`)."""
    return {k.replace(".default", "").replace(".base.", ".base_layer."): p
            for k, p in model.named_parameters() if "lora_" in k}


def theirs_named(pm) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model.").replace(".default", ""): p
            for k, p in pm.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_peft_file_loads_and_computes_the_same_bit_for_bit(kind, tmp_path):
    make, params = MODELS[kind]
    base = make()
    pm = peft_model(base, params)
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    result = lowrank.load_adapter(ours, tmp_path)
    assert sum(m.endswith(tuple(params)) for m in result.modules) == len(params) * 2  # every parameter, both layers
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    a, b = pm(ids).logits, ours(ids).logits
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    theirs, mine = theirs_named(pm), ours_named(ours)
    assert sorted(theirs) == sorted(mine)
    for k in theirs:
        assert torch.equal(theirs[k].grad, mine[k].grad), k


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_saved_file_is_peft_format(kind, tmp_path):
    make, params = MODELS[kind]
    base = make()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=4, alpha=8, targets=["q_proj"], parameters=params))
    with torch.no_grad():
        for k, p in ours.named_parameters():
            if "lora_" in k:
                p.normal_(generator=torch.Generator().manual_seed(zlib.crc32(k.encode())))
    lowrank.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    picked = {n for n, _ in base.named_parameters()  # by PEFT's rule: the full name or a "."-suffix of it
              if any(n == t or n.endswith("." + t) for t in config["target_parameters"])}
    assert config["target_modules"] == ["q_proj"]
    assert picked == {n for n, _ in base.named_parameters() if n.endswith(tuple(params))}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pm(ids).logits, ours(ids).logits)
    theirs, mine = theirs_named(pm), ours_named(ours)
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_bf16_model(adapter_dtype, tmp_path):
    """bf16 experts with float32 adapters (PEFT's default) and with bf16 ones."""
    base = mixtral().to(torch.bfloat16)
    pm = peft_model(base, EXPERTS + ["mlp.gate.weight"], dtype=None if adapter_dtype == torch.float32 else adapter_dtype)
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    lowrank.load_adapter(ours, tmp_path, dtype=adapter_dtype)
    assert {p.dtype for p in ours_named(ours).values()} == {adapter_dtype}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pm(ids).logits, ours(ids).logits)


def test_two_active_adapters_sum_as_in_peft(tmp_path):
    base = mixtral()
    pm = peft_model(base, EXPERTS)
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], target_parameters=EXPERTS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n and "second" in n:
                p.normal_(generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    lowrank.load_adapter(ours, tmp_path)
    lowrank.load_adapter(ours, tmp_path / "second", name="second")
    pm.base_model.set_adapter(["default", "second"])
    lowrank.set_active(ours, ["default", "second"])
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pm(ids).logits, ours(ids).logits)


def test_merge_unmerge_eject_and_export(tmp_path):
    base = mixtral(experts="eager")  # a float64 reference runs too
    ours = copy.deepcopy(base)
    own = ours.model.layers[0].mlp.experts
    lowrank.inject(ours, lowrank.LoraConfig(r=4, alpha=8, targets=None, parameters=EXPERTS))
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    with torch.no_grad():
        for k, p in ours.named_parameters():
            if "lora_" in k:
                p.normal_(generator=torch.Generator().manual_seed(zlib.crc32(k.encode())))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    adapted = ours(ids).logits.detach()
    ref = copy.deepcopy(ours).double()(ids).logits  # the adapted model in float64
    tol = max(4 * (adapted - ref).abs().max().item(), 64 * torch.finfo(torch.float32).eps * ref.abs().max().item())

    assert lowrank.merge(ours) == ["model.layers.0.mlp.experts"] * 2 + ["model.layers.1.mlp.experts"] * 2
    # W0 + s B_e A_e (s = alpha / r = 2), against float64: one rounding of the sum and of r products
    inner = ours.model.layers[0].mlp.experts.base  # gate_up_proj's layer, inside down_proj's
    A = inner.lora_A["default"].weight.double().view(4, 4, 32)  # (E, r, in): See Note: PEFT's factor layout
    B = inner.lora_B["default"].weight.double().view(96, 4, 4).permute(2, 0, 1)  # (E, out, r)
    w = w0["model.layers.0.mlp.experts.gate_up_proj"].double()
    bound = (4 + 2) * torch.finfo(torch.float32).eps * (w.abs() + 2.0 * torch.bmm(B.abs(), A.abs()))
    assert ((own.gate_up_proj.double() - (w + 2.0 * torch.bmm(B, A))).abs() <= bound).all()
    assert (ours(ids).logits - ref).abs().max().item() <= tol
    lowrank.unmerge(ours)
    assert ((own.gate_up_proj.double() - w).abs() <= 2 * bound).all()

    result = lowrank.merge_and_export(ours, tmp_path / "merged")
    assert result.merged == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "merged")
    assert (again(ids).logits - ref).abs().max().item() <= tol

    lowrank.save_adapter(ours, tmp_path / "parameters-only")  # no module targets: target_modules [] (null: PEFT's defaults)
    assert json.loads((tmp_path / "parameters-only" / "adapter_config.json").read_text())["target_modules"] == []
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "parameters-only")
    assert torch.equal(pm(ids).logits, ours(ids).logits)

    lowrank.eject(ours)
    assert ours.model.layers[0].mlp.experts is own and sorted(ours.state_dict()) == sorted(base.state_dict())


def test_inject_then_eject_leaves_the_model_as_it_was():
    base = mixtral()
    ours = copy.deepcopy(base)
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in ours.named_parameters()}
    names = lowrank.inject(ours, lowrank.LoraConfig(r=2, parameters=EXPERTS + ["mlp.gate.weight"]))
    assert "model.layers.1.mlp.experts.down_proj" in names and "model.layers.0.self_attn.q_proj" in names  # all-linear too
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    lowrank.eject(ours)
    after = dict(ours.named_parameters())
    assert sorted(after) == sorted(before)
    assert all(after[n] is p and torch.equal(p, v) and p.requires_grad == g for n, (p, v, g) in before.items())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours(ids).logits, base(ids).logits)


@pytest.fixture
def one_thread():
    """A matmul may split its sums by the threads it gets (fewer on a loaded machine): one thread,
    so a recomputed forward repeats the first bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_activation_checkpointing_and_compile_compute_the_same(one_thread):
    base = mixtral()
    lowrank.inject(base, lowrank.LoraConfig(r=4, parameters=EXPERTS))
    with torch.no_grad():
        for k, p in base.named_parameters():
            if "lora_" in k:
                p.normal_(generator=torch.Generator().manual_seed(zlib.crc32(k.encode())))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    base.train()
    loss = base(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in base.named_parameters() if p.grad is not None}
    base.zero_grad()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    again = base(input_ids=ids, labels=ids).loss
    again.backward()  # the recomputed forward swaps W' in again
    assert torch.equal(again, loss)
    assert all(torch.equal(p.grad, grads[k]) for k, p in base.named_parameters() if p.grad is not None)
    base.gradient_checkpointing_disable()
    base.eval()
    with torch.no_grad():
        eager = base(input_ids=ids).logits
        compiled = torch.compile(base)(input_ids=ids).logits
        reference = copy.deepcopy(base).double()
        reference.config._experts_implementation = "eager"  # grouped_mm takes no float64
        ref = reference(input_ids=ids).logits
    # Inductor fuses and reorders float32 sums: as close to float64 as eager float32 is, within a few times
    tol = max(4 * (eager - ref).abs().max().item(), 64 * torch.finfo(torch.float32).eps * ref.abs().max().item())
    assert (compiled - ref).abs().max().item() <= tol


@pytest.mark.parametrize("kind, model_dtype, adapter_dtype, params, second, autocast", [
    ("mixtral", torch.bfloat16, torch.bfloat16, EXPERTS, True, False),  # several adapters: PEFT's einsum, bf16
    ("mixtral", torch.float32, torch.float32, EXPERTS + ["mlp.gate.weight"], True, True),  # under autocast
    ("mixtral", torch.float32, torch.bfloat16, ["mlp.gate.weight"], False, False),  # a 2-D product in float32
    ("gpt_oss", torch.float32, torch.float32, EXPERTS, True, False),  # transposed experts: the einsum's gradients
], ids=["bf16-two", "autocast-two", "2d-bf16-factors", "gpt_oss-two"])
def test_w_prime_as_peft_forms_it(kind, model_dtype, adapter_dtype, params, second, autocast, tmp_path):
    """See Note: W' as PEFT forms it (lowrank/tuners/lora_param.py): outputs and gradients bit for bit."""
    base = MODELS[kind][0]().to(model_dtype)
    pm = peft_model(base, params, dtype=model_dtype)
    names = ["default"]
    if second:
        pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], target_parameters=params),
                       autocast_adapter_dtype=False)
        names.append("second")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # every factor in adapter_dtype, random
                p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()))).to(adapter_dtype)
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    for name in names:
        lowrank.load_adapter(ours, tmp_path if name == "default" else tmp_path / name, name=name, dtype=adapter_dtype)
    pm.base_model.set_adapter(names)
    lowrank.set_active(ours, names)
    lowrank.mark_trainable(ours)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        a, b = pm(ids).logits, ours(ids).logits
    assert torch.equal(a, b)
    a.float().square().sum().backward()
    b.float().square().sum().backward()
    theirs, mine = theirs_named(pm), ours_named(ours)
    assert sorted(theirs) == sorted(mine)
    assert all(torch.equal(theirs[k].grad, mine[k].grad) for k in theirs)


def test_lora_on_a_routers_weight_computes_as_peft():
    """PhiMoE's router subclasses nn.Linear but returns routing, so LoRA on it as a module has no
    output to add to (PEFT's forward fails; lowrank refuses it at inject); on its weight (parameters) it works."""
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    base = phimoe()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[], target_parameters=["router.weight"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=None, parameters="router.weight"))
    with torch.no_grad():
        theirs = theirs_named(pm)
        for k, p in ours_named(ours).items():
            p.copy_(theirs[k])
    assert torch.equal(pm(ids).logits, ours(ids).logits)
