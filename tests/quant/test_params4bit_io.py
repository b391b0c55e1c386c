"""4-bit parameters (NF4Config.parameters) in state dicts, copies and exports; the oracle is
the dense twin of tests/quant/test_params4bit.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lowrank

from .test_params4bit import BUILDS, CONFIG, EXPERTS, ids, mixtral, quantized_and_twin, randomized

transformers = pytest.importorskip("transformers")


def test_state_dict_round_trip_and_its_errors():
    model, other = mixtral(), mixtral()
    lowrank.quantize(model, CONFIG)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(generator=torch.Generator().manual_seed(5))
    lowrank.quantize(other, CONFIG)
    sd = model.state_dict()
    other.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(other(ids()).logits, model(ids()).logits)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    res = other.load_state_dict({k: v for k, v in sd.items() if k != key}, strict=False)
    assert res.missing_keys == [key]
    wrong = mixtral()
    lowrank.quantize(wrong, lowrank.NF4Config(targets=CONFIG.targets, parameters=["experts.down_proj"]))
    with pytest.raises(RuntimeError, match="gate_up_proj"):  # 4-bit entries where a dense parameter is expected
        wrong.load_state_dict(sd)
    small = mixtral()
    small.model.layers[0].mlp.experts.gate_up_proj = nn.Parameter(torch.zeros(3, 192, 64))
    lowrank.quantize(small, CONFIG)
    with pytest.raises(RuntimeError, match=r"size mismatch for model.layers.0.mlp.experts.gate_up_proj.*\(4, 192, 64\)"):
        small.load_state_dict(sd)


def test_copies_and_a_failing_forward():
    model, _ = quantized_and_twin(BUILDS["mixtral-eager"])
    with torch.no_grad():
        want = model(ids()).logits
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(copied(ids()).logits, want)
            experts = copied.model.layers[0].mlp.experts
            assert experts.forward.owner is experts  # the copy's forward reads the copy's codes
    experts = model.model.layers[0].mlp.experts
    with pytest.raises(RuntimeError):
        experts(torch.randn(3, 7), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))  # hidden 7, not 64
    assert "gate_up_proj" not in experts.__dict__ and "down_proj" not in experts.__dict__


def test_merge_refused_export_writes_them_dense(tmp_path):
    model, twin = quantized_and_twin(BUILDS["mixtral-eager"])
    for m in (model, twin):
        lowrank.inject(m, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
        randomized(m)
    with pytest.raises(TypeError, match="nothing was merged.*4-bit parameter"):
        lowrank.merge(model)
    from safetensors.torch import load_file

    for requantize in (False, True):
        lowrank.merge_and_export(model, tmp_path / f"q{requantize}", requantize=requantize)
        lowrank.merge_and_export(twin, tmp_path / f"d{requantize}", requantize=requantize)
        a = load_file(tmp_path / f"q{requantize}" / "model.safetensors")
        b = load_file(tmp_path / f"d{requantize}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert a["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 192, 64)  # dense, merged
    lowrank.merge(twin)  # dense experts: W' in float32, rounded once, as the export writes it
    with torch.no_grad():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qFalse").eval()
        loaded.config._experts_implementation = "eager"  # as built; config.json does not say
        assert torch.equal(loaded(ids()).logits, twin(ids()).logits)


@pytest.mark.parametrize("config", [CONFIG, lowrank.NF4Config(targets=None, parameters=EXPERTS, compute_dtype=torch.bfloat16)],
                         ids=["layers-and-experts", "experts-alone-bf16"])
def test_save_quantized_and_load_quantized_keep_them(tmp_path, config):
    """A checkpoint of 4-bit experts (checkpoint.py, Note: 4-bit parameters on disk) reads back into
    a model built on the meta device: the same codes (state dicts equal), the same outputs bit for
    bit, the compute dtype of config.json; each experts tensor is written once, in 4 bits."""
    import json

    from safetensors import safe_open

    model = mixtral()
    lowrank.quantize(model, config)
    lowrank.save_quantized(model, tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    for key, q in model.state_dict(keep_vars=True).items():  # every experts tensor: its codes, once, nothing dense
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert stored[key].dtype == torch.uint8 and stored[key].numel() == q.numel()
    assert not [k for k, t in stored.items() if ".experts." in k and t.is_floating_point() and t.numel() >= 64 * 96]
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert quant["bnb_4bit_compute_dtype"] == str(config.compute_dtype or torch.float32).removeprefix("torch.")
    if not config.targets:  # every linear layer dense: listed for transformers to leave alone
        assert "model.layers.0.self_attn.q_proj" in quant["llm_int8_skip_modules"]
    with lowrank.skeleton():
        again = mixtral()
    names = lowrank.load_quantized(again, tmp_path / "q")
    assert [n for n in names if ".experts." in n] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                       for p in ("down_proj", "gate_up_proj")]
    assert [n for n, _ in again.named_modules()] == [n for n, _ in model.named_modules()]  # installed in the owner's order
    assert (".q_proj" in " ".join(names)) == bool(config.targets)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    experts = again.model.layers[0].mlp.experts
    assert experts._modules["gate_up_proj"].compute_dtype == model.model.layers[0].mlp.experts._modules["gate_up_proj"].compute_dtype
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, model(ids()).logits)
    lowrank.inject(again, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))  # QLoRA on the loaded experts
    randomized(again)
    again(ids(), labels=ids()).loss.backward()
    grads = [p.grad for p in again.parameters() if p.requires_grad]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_load_quantized_of_experts_refuses_what_does_not_fit(tmp_path):
    """A 4-bit parameter of another shape, or none to hold it: named errors, and the model as it
    was (no 4-bit parameter left installed on any owner)."""
    model = mixtral()
    lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=EXPERTS))
    lowrank.save_quantized(model, tmp_path / "q")
    other = mixtral()
    other.model.layers[1].mlp.experts.down_proj = nn.Parameter(torch.zeros(4, 64, 32))  # layer 0's fit, layer 1's not
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"size mismatch for model.layers.1.mlp.experts.down_proj: the checkpoint's "
                                         r"4-bit parameter has shape \(4, 64, 96\), the model's is \(4, 64, 32\)"):
        lowrank.load_quantized(other, tmp_path / "q")
    experts = other.model.layers[0].mlp.experts
    assert "forward" not in experts.__dict__ and not lowrank.quant.params4bit.names_4bit(experts)
    assert not experts._load_state_dict_pre_hooks and isinstance(experts._parameters["gate_up_proj"], nn.Parameter)
    after = other.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    partly = mixtral()  # gate_up_proj already 4-bit: what install added for down_proj goes, what was there stays
    partly.model.layers[1].mlp.experts.down_proj = nn.Parameter(torch.zeros(4, 64, 32))
    lowrank.quantize(partly, lowrank.NF4Config(targets=None, parameters=EXPERTS[:1]))
    experts = partly.model.layers[0].mlp.experts
    forward = experts.__dict__["forward"]
    with pytest.raises(ValueError, match="size mismatch for model.layers.1.mlp.experts.down_proj"):
        lowrank.load_quantized(partly, tmp_path / "q")
    assert lowrank.quant.params4bit.names_4bit(experts) == ("gate_up_proj",) and experts.__dict__["forward"] is forward
    assert isinstance(experts._parameters["down_proj"], nn.Parameter) and len(experts._load_state_dict_pre_hooks) == 1
    del other.model.layers[1].mlp.experts._parameters["down_proj"]
    with pytest.raises(TypeError, match=r"'model.layers.1.mlp.experts.down_proj' is a 4-bit parameter in the checkpoint, "
                                        r"but MixtralExperts has no parameter 'down_proj' to hold it"):
        lowrank.load_quantized(other, tmp_path / "q")


def test_requantize_of_experts_alone_says_why(tmp_path):
    model = mixtral()
    lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=EXPERTS))
    with pytest.raises(ValueError, match="4-bit tensors are parameters .* holds dense.*without requantize"):
        lowrank.merge_and_export(model, tmp_path / "out", requantize=True)
    assert not (tmp_path / "out").exists()


def test_export_keeps_what_transformers_keeps_in_float32(tmp_path):
    """A bf16 GLM-4-MoE, experts in 4 bits: its router, float32 as transformers keeps it, is
    written float32; the rest in the compute dtype (bf16)."""
    from safetensors import safe_open

    from tests.quant.test_load_experts import glm4_moe

    glm4_moe().save_pretrained(tmp_path / "src")
    for lora in (False, True):  # the router merged with LoRA (LoRA on its weight) stays float32 too
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
        lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=EXPERTS))
        if lora:
            lowrank.inject(model, lowrank.LoraConfig(r=2, targets=None, parameters=["mlp.gate.weight"]))
            randomized(model)
        lowrank.merge_and_export(model, tmp_path / f"out{lora}")
        with safe_open(tmp_path / f"out{lora}" / "model.safetensors", "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes.pop("model.layers.1.mlp.gate.weight") == "F32"
        assert dtypes.pop("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
        assert set(dtypes.values()) == {"BF16"}


def test_a_failed_load_into_a_quantized_model_keeps_its_settings(tmp_path):
    """A model already in 4 bits with another blocksize and compute dtype: a load that fails after
    the codes were assigned (an unexpected key) leaves each 4-bit weight's own blocksize and
    compute dtype, and the model computes as before; a load that succeeds takes the checkpoint's."""
    from safetensors.torch import load_file, save_file

    model = mixtral()
    lowrank.quantize(model, lowrank.NF4Config(targets=["q_proj"], parameters=EXPERTS, compute_dtype=torch.bfloat16))
    lowrank.save_quantized(model, tmp_path / "q")
    state = load_file(tmp_path / "q" / "model.safetensors")
    save_file(state | {"extra.key": torch.zeros(1)}, tmp_path / "q" / "model.safetensors")
    other = mixtral()
    lowrank.quantize(other, lowrank.NF4Config(targets=["q_proj"], parameters=EXPERTS, blocksize=128))
    with torch.no_grad():
        before = other(ids()).logits
    with pytest.raises(ValueError, match=r"unexpected keys: \['extra.key'\]"):
        lowrank.load_quantized(other, tmp_path / "q")
    for m in (other.model.layers[0].mlp.experts._modules["gate_up_proj"], other.model.layers[0].self_attn.q_proj):
        assert m.blocksize == 128 and m.compute_dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(other(ids()).logits, before)
    save_file(state, tmp_path / "q" / "model.safetensors")
    lowrank.load_quantized(other, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(other(ids()).logits, model(ids()).logits)
    assert other.model.layers[1].mlp.experts._modules["down_proj"].compute_dtype == torch.bfloat16


@pytest.mark.parametrize("key, message", [
    ("model.norm.weight", "it is a 1-D parameter, which stays dense"),
    ("model.layers.0.self_attn.q_proj.bias", "it belongs to the linear layer Linear, whose weight goes 4-bit as a "
                                             "whole layer and whose other parameters stay dense"),
    ("model.embed_tokens.weight", r"it is tied to a parameter of \['lm_head'\] \(one tensor, shared\), which stays dense"),
    ("lm_head.weight", r"it is tied to \['model.embed_tokens'\] \(one tensor, shared\), which stays dense"),
], ids=["1-D", "linear-bias", "tied", "tied-head"])
def test_load_quantized_refuses_4bit_tensors_quantize_refuses(tmp_path, key, message):
    """A checkpoint holding in 4 bits what quantize would not make 4-bit: refused, named, the model unchanged."""
    from safetensors.torch import load_file, save_file

    from lowrank.quant import nf4
    from lowrank.quant.params4bit import Weight4bit

    model = mixtral()
    model.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.randn(64))
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as tie_word_embeddings ties them
    lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=EXPERTS))
    lowrank.save_quantized(model, tmp_path / "q")
    state = load_file(tmp_path / "q" / "model.safetensors")
    entries = {}  # the tensor's bitsandbytes entries, as a 4-bit parameter would write them
    dense = state.pop(key) if key in state else state["model.embed_tokens.weight"]  # a tied pair is written once
    Weight4bit(nf4.quantize(dense.float(), 64))._save_weight(entries, key, False)
    save_file(state | {k: v.contiguous() for k, v in entries.items()}, tmp_path / "q" / "model.safetensors")
    again = mixtral()
    again.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.randn(64))
    again.lm_head.weight = again.model.embed_tokens.weight
    names = [n for n, _ in again.named_modules()]
    with pytest.raises(ValueError, match=rf"the checkpoint holds '{key}' in 4 bits, which lowrank cannot take: .*{message}"):
        lowrank.load_quantized(again, tmp_path / "q")
    assert [n for n, _ in again.named_modules()] == names and "forward" not in again.model.norm.__dict__


def test_load_quantized_refuses_a_model_with_adapters(tmp_path):
    model = mixtral()
    lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=EXPERTS))
    lowrank.save_quantized(model, tmp_path / "q")
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
    with pytest.raises(ValueError, match="the model has adapters: load_quantized replaces the layers they wrap"):
        lowrank.load_quantized(model, tmp_path / "q")


def test_a_parameter_registered_after_the_first_went_4bit():
    """install keeps the owner's 4-bit parameters in the order it registered them, and one it
    registered after its first parameter went 4-bit joins them (last)."""
    owner = nn.Module()
    owner.a = nn.Parameter(torch.randn(2, 8, 64))
    owner.c = nn.Parameter(torch.randn(2, 8, 64))
    lowrank.quantize(owner, lowrank.NF4Config(targets=None, parameters=["c"]))
    owner.b = nn.Parameter(torch.randn(2, 8, 64))
    lowrank.quantize(owner, lowrank.NF4Config(targets=None, parameters=["b", "a"]))
    assert lowrank.quant.params4bit.names_4bit(owner) == ("a", "c", "b") and list(owner._modules) == ["a", "c", "b"]
    assert [k for k in owner.state_dict() if "." not in k] == ["a", "c", "b"]


def test_a_dense_checkpoint_into_4bit_experts_says_so(tmp_path):
    """A directory whose experts are dense (only the attention 4-bit) loaded into a model whose
    experts are 4-bit: the error names the directory and says what does not fit; the model is
    unchanged."""
    model = mixtral()
    lowrank.quantize(model, lowrank.NF4Config(targets=["q_proj"]))
    lowrank.save_quantized(model, tmp_path / "q")
    other = mixtral()
    lowrank.quantize(other, CONFIG)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"(?s)q: Error\(s\) in loading state_dict.*a tensor the model holds in 4 bits is "
                                           r"dense in the checkpoint"):
        lowrank.load_quantized(other, tmp_path / "q")
    after = other.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
