"""LoRA files of transformers 4's mixture-of-experts layout (per-expert linear layers, a linear
router) loaded into transformers 5's fused experts (lowrank/io_moe.py): each expert's update is
the one the file describes (checked on the merged weights against float64), and PEFT 0.21,
which converts such files too, computes the same bit for bit (except with rsLoRA, where PEFT
scales the fused pair by sqrt(2) too much: see lowrank/io_moe.py)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lowrank  # noqa: E402
from lowrank.walk import _unwrap  # noqa: E402

E, H, I, R = 4, 32, 48, 4
NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"), "phimoe": ("block_sparse_moe", "w1", "w3", "w2")}
ROUTER = {"phimoe": "router"}  # transformers 5's name for transformers 4's `gate`, where it changed


def model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=I, num_local_experts=E, **common))
    if kind == "phimoe":
        cfg = transformers.PhimoeConfig(intermediate_size=I, num_local_experts=E, **common)
        return transformers.PhimoeForCausalLM(cfg)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=I, intermediate_size=64, num_experts=E, head_dim=8,
                                          decoder_sparse_step=1, mlp_only_layers=[], **common)
        return transformers.Qwen3MoeForCausalLM(cfg)
    cfg = transformers.Qwen2MoeConfig(moe_intermediate_size=I, intermediate_size=64, shared_expert_intermediate_size=64,
                                      num_experts=E, decoder_sparse_step=1, mlp_only_layers=[], **common)
    return transformers.Qwen2MoeForCausalLM(cfg)


def write_v4(path, kind: str, rslora: bool = False, alpha: float = 8, router: bool = True) -> dict[str, torch.Tensor]:
    """A transformers 4 LoRA file: q_proj, the router `gate` (if `router`), every expert's three
    projections, and Qwen2-MoE's shared expert (linear layers of the same names)."""
    moe, gate, up, down = NAMES[kind]
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer in range(2):
        p = f"base_model.model.model.layers.{layer}."
        t[p + "self_attn.q_proj.lora_A.weight"], t[p + "self_attn.q_proj.lora_B.weight"] = (
            torch.randn(R, H, generator=g), torch.randn(H, R, generator=g))
        if router:
            t[p + f"{moe}.gate.lora_A.weight"], t[p + f"{moe}.gate.lora_B.weight"] = (
                torch.randn(R, H, generator=g), torch.randn(E, R, generator=g))
        if kind == "qwen2_moe":
            for name, (n_in, n_out) in ((gate, (H, 64)), (up, (H, 64)), (down, (64, H))):
                t[p + f"mlp.shared_expert.{name}.lora_A.weight"] = torch.randn(R, n_in, generator=g)
                t[p + f"mlp.shared_expert.{name}.lora_B.weight"] = torch.randn(n_out, R, generator=g)
        for e in range(E):
            for name, (n_in, n_out) in ((gate, (H, I)), (up, (H, I)), (down, (I, H))):
                t[p + f"{moe}.experts.{e}.{name}.lora_A.weight"] = torch.randn(R, n_in, generator=g)
                t[p + f"{moe}.experts.{e}.{name}.lora_B.weight"] = torch.randn(n_out, R, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": R, "lora_alpha": alpha, "target_modules": ["q_proj", gate, up, down] + ["gate"] * router,
              "lora_dropout": 0.0, "use_rslora": rslora, "bias": "none", "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return t


@pytest.mark.parametrize("kind", sorted(NAMES))
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("patterns", [False, True], ids=["alpha", "alpha_pattern"])
def test_each_expert_gets_the_update_the_file_describes(kind, rslora, patterns, tmp_path):
    base = model(kind)
    t = write_v4(tmp_path, kind, rslora)
    moe, gate, up, down = NAMES[kind]
    alphas = {down: 16, "gate": 4} if patterns else {}  # per module, as PEFT reads alpha_pattern: (.*\.)?(key)$
    if patterns:
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": alphas}))
    ours = copy.deepcopy(base)
    lowrank.load_adapter(ours, tmp_path)
    lowrank.merge(ours)
    eps = torch.finfo(torch.float32).eps
    for layer in range(2):
        p = f"base_model.model.model.layers.{layer}.{moe}"
        w0 = _unwrap(base.model.layers[layer].mlp.experts)
        merged = _unwrap(ours.model.layers[layer].mlp.experts)

        def delta(module, size=abs):  # s B A in float64, or with size=abs: s |B| |A|, what rounding scales with
            alpha = alphas.get(module.rsplit(".", 1)[-1], 8)
            s = alpha / (math.sqrt(R) if rslora else R)  # the scale the file was trained with
            return s * (size(t[f"{p}.{module}.lora_B.weight"].double()) @ size(t[f"{p}.{module}.lora_A.weight"].double()))

        for e in range(E):
            ex = f"experts.{e}"
            for param, parts in (("gate_up_proj", [f"{ex}.{gate}", f"{ex}.{up}"]), ("down_proj", [f"{ex}.{down}"])):
                want = torch.cat([delta(m, lambda x: x) for m in parts])
                size = torch.cat([delta(m) for m in parts])
                before, after = getattr(w0, param)[e].double(), getattr(merged, param)[e].double()
                # float32 against float64: r products and the sum rounded, each within eps of what it adds
                assert ((after - before - want).abs() <= (R + 2) * eps * (before.abs() + size)).all()
        router_name = ROUTER.get(kind, "gate")
        router = getattr(base.model.layers[layer].mlp, router_name).weight.double()
        got = _unwrap(getattr(ours.model.layers[layer].mlp, router_name)).weight.double()
        assert ((got - router - delta("gate", lambda x: x)).abs() <= (R + 2) * eps * (router.abs() + delta("gate"))).all()


# PEFT 0.21 converts Mixtral's and Qwen3-MoE's files; Qwen2-MoE's it loads without its experts
# (model_type "qwen2_moe" is missing from its table), and it refuses a Qwen router (not linear)
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_equal_to_peft_bit_for_bit(kind, tmp_path):
    base = model(kind)
    write_v4(tmp_path, kind, router=kind == "mixtral")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ours = copy.deepcopy(base)
    result = lowrank.load_adapter(ours, tmp_path)
    assert "model.layers.1.mlp.experts.gate_up_proj" in result.modules and "model.layers.1.mlp.experts.down_proj" in result.modules
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pm(ids).logits, ours(ids).logits)
    # saved again: transformers 5's layout, which PEFT loads without converting
    lowrank.save_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    assert torch.equal(again(ids).logits, ours(ids).logits)


def test_an_adapter_of_part_of_a_fusion_is_refused(tmp_path):
    base = model("mixtral")
    t = write_v4(tmp_path, "mixtral")
    save_file({k: v for k, v in t.items() if ".w3." not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapts only \['w1'\] of the projections transformers 5 fuses"):
        lowrank.load_adapter(base, tmp_path)
    assert not lowrank.adapter_names(base)


def test_a_dropout_the_experts_cannot_take_is_left_out_with_a_warning(tmp_path):
    base = model("mixtral")
    write_v4(tmp_path, "mixtral")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.05}))
    with pytest.warns(UserWarning, match="lora_dropout=0.05"):
        lowrank.load_adapter(base, tmp_path)
    assert "model.layers.0.mlp.experts" in dict(base.named_modules())


def test_an_adapter_of_the_experts_alone_loads(tmp_path):
    """target_modules ["w1", "w2", "w3"]: names transformers 5 has fused away, so no module target is left."""
    base = model("mixtral")
    t = write_v4(tmp_path, "mixtral", router=False)
    save_file({k: v for k, v in t.items() if ".experts." in k}, tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["w1", "w2", "w3"]}))
    result = lowrank.load_adapter(base, tmp_path)
    assert sorted(result.modules) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]


def load_into_both(quantized, twin, path):
    """Fill `twin` with `quantized`'s 4-bit tensors dequantized, load the file at `path` into both, check
    that they got the same adapter and compute the same logits bit for bit; the quantized one's LoadResult."""
    for name, m in quantized.named_modules():
        if isinstance(m, lowrank.quant.params4bit.Weight4bit):
            owner, p = name.rsplit(".", 1)
            setattr(twin.get_submodule(owner), p, torch.nn.Parameter(m.dense(), requires_grad=False))
    a, b = lowrank.load_adapter(quantized, path), lowrank.load_adapter(twin, path)
    assert a.modules == b.modules
    ours = {k: p for k, p in quantized.named_parameters() if "lora_" in k}
    theirs = {k: p for k, p in twin.named_parameters() if "lora_" in k}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, twin(ids).logits)
    return a


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_a_v4_file_loads_onto_4bit_experts_as_onto_dense_ones(kind, tmp_path, monkeypatch):
    """The experts in 4 bits (NF4Config.parameters): the file's fused factors are the same tensors,
    and the model computes what its dense twin (each 4-bit tensor dequantized) computes with them
    (bit for bit on the dense path; the routed one: tests/quant/test_experts4bit.py)."""
    monkeypatch.setenv("LOWRANK_EXPERTS", "dense")
    write_v4(tmp_path, kind)
    quantized, twin = model(kind).eval(), model(kind).eval()
    lowrank.quantize(quantized, lowrank.NF4Config(targets=["q_proj"], parameters=["experts.gate_up_proj",
                                                                                   "experts.down_proj"]))
    lowrank.quantize(twin, lowrank.NF4Config(targets=["q_proj"]))
    a = load_into_both(quantized, twin, tmp_path)
    assert any(".experts." in m for m in a.modules)
