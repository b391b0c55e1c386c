"""load_and_quantize and mixture-of-experts checkpoints: experts read straight into 4 bits
(NF4Config.parameters), what transformers keeps in float32, and the errors that name a key."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank.quant import NF4Config, quantize
from lowrank.quant.load import checkpoint_files, load_and_quantize, skeleton
from tests.tuners import models

from .test_load import _saved, _state, phimoe, qwen2_moe

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("layout", ["transformers4", "fused"])
@pytest.mark.parametrize("build", [models.mixtral, phimoe, qwen2_moe], ids=["mixtral", "phimoe", "qwen2_moe"])
def test_experts_read_straight_into_4_bits(tmp_path, build, layout):
    """NF4Config.parameters: each experts tensor quantized as soon as it is whole (Note: 4-bit
    parameters as they are read), from per-expert keys (what save_pretrained writes) or from the
    3-D tensors themselves; equal to quantize of the loaded model."""
    config = NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"], skip=["router"])
    dense = _saved(tmp_path, build)
    if layout == "fused":
        for f in checkpoint_files(tmp_path):
            f.unlink()
        (tmp_path / "model.safetensors.index.json").unlink()
        save_file({k: v.contiguous() for k, v in dense.state_dict().items() if k != "lm_head.weight"
                   or not dense.config.tie_word_embeddings}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    names = quantize(expected, config)
    assert sum(".experts." in n for n in names) == 4
    with skeleton():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    assert load_and_quantize(model, tmp_path, config) == names
    got, want = _state(model), _state(expected)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    model.eval()
    assert torch.equal(model(input_ids=models.ids()).logits, expected(input_ids=models.ids()).logits)


def test_experts_a_checkpoint_cannot_quantize_are_named(tmp_path):
    _saved(tmp_path, models.mixtral, shard="10GB")
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.1.block_sparse_moe.experts.2.w2.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with skeleton():
        model = models.mixtral()
    with pytest.raises(ValueError, match=r"cannot quantize 'model.layers.1.mlp.experts.down_proj'.*non-finite"):
        load_and_quantize(model, tmp_path, NF4Config(parameters="experts.down_proj"))
    with skeleton():
        model = models.mixtral()
    with pytest.raises(ValueError, match="1-D parameter"):
        load_and_quantize(model, tmp_path, NF4Config(parameters="norm.weight"))


def glm4_moe():
    """A router (gate.weight, e_score_correction_bias) transformers keeps in float32 (`_keep_in_fp32_modules_strict`)."""
    torch.manual_seed(0)
    return transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
        vocab_size=models.VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        head_dim=16, n_shared_experts=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_what_transformers_keeps_in_float32_stays_so(tmp_path, dtype):
    """Read in half precision, the router stays float32 as from_pretrained keeps it (Note: tensors
    transformers keeps in float32); with the experts in 4 bits, the result is quantize's of it."""
    _saved(tmp_path, glm4_moe)
    config = NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"])
    expected = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert expected.model.layers[1].mlp.gate.weight.dtype == torch.float32
    names = quantize(expected, config)
    with skeleton():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    assert load_and_quantize(model, tmp_path, config, dtype=dtype) == names
    got, want = _state(model), _state(expected)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("parameters", [None, ["experts.gate_up_proj", "experts.down_proj"]], ids=["dense", "4bit"])
def test_an_expert_read_twice_is_named(tmp_path, parameters):
    """Two shards holding one expert's rows: named so, whether its fused tensor is still dense or
    already in 4 bits when the second copy comes."""
    _saved(tmp_path, models.mixtral)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    save_file({key: load_file(tmp_path / index["weight_map"][key])[key]}, tmp_path / "zz.safetensors",
              metadata={"format": "pt"})
    index["weight_map"]["zz-only"] = "zz.safetensors"  # the last shard; the first copy stays where it was
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with skeleton():
        model = models.mixtral()
    with pytest.raises(ValueError, match=r"block_sparse_moe\.experts\.0\.w1\.weight: rows of expert 0 read twice"):
        load_and_quantize(model, tmp_path, NF4Config(parameters=parameters))


@pytest.mark.parametrize("layout", ["transformers4", "fused"])
def test_experts_a_real_model_never_gets_are_named(tmp_path, layout):
    """Into a model not built under skeleton() (its tensors have values): experts the checkpoint
    lacks entirely are missing, as a linear layer's weight is, not left dense and called 4-bit."""
    dense = _saved(tmp_path, models.mixtral, shard="10GB")
    sd = load_file(tmp_path / "model.safetensors")
    if layout == "fused":
        sd = {k: v.contiguous() for k, v in dense.state_dict().items() if k != "model.layers.1.mlp.experts.down_proj"}
    else:
        sd = {k: v for k, v in sd.items() if not (k.startswith("model.layers.1.") and k.endswith(".w2.weight"))}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not in the checkpoint: \['model.layers.1.mlp.experts.down_proj'\]"):
        load_and_quantize(models.mixtral(), tmp_path, NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"]))


def test_a_3d_experts_key_read_twice_is_named(tmp_path):
    dense = models.mixtral()
    sd = {k: v.contiguous() for k, v in dense.state_dict().items()}
    key = "model.layers.1.mlp.experts.down_proj"
    save_file(sd, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file({key: sd[key]}, tmp_path / "b.safetensors", metadata={"format": "pt"})
    weight_map = {k: "a.safetensors" for k in sd} | {"extra": "b.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with skeleton():
        model = models.mixtral()
    with pytest.raises(ValueError, match=rf"{key}: its tensor is 4-bit already \(read twice"):
        load_and_quantize(model, tmp_path, NF4Config(parameters=["experts.down_proj"]))


def test_an_expert_index_past_the_models_is_named(tmp_path):
    _saved(tmp_path, models.mixtral, shard="10GB")
    sd = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.4.w2.weight"  # the model has experts 0-3
    sd[key] = sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for parameters in (None, ["experts.down_proj"]):  # read while its tensor is dense, or 4-bit already
        with skeleton():
            model = models.mixtral()
        with pytest.raises(ValueError, match=rf"{key}: expert index 4, and model.layers.1.mlp.experts has 4 experts"):
            load_and_quantize(model, tmp_path, NF4Config(parameters=parameters))


def t5():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=models.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_t5s_wo_stays_float32_in_float16_only(tmp_path, dtype):
    """`_keep_in_fp32_modules` (T5's `wo`): float32 when read in float16, as from_pretrained keeps it."""
    _saved(tmp_path, t5)
    expected = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, dtype=dtype)
    assert (expected.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32) == (dtype == torch.float16)
    names = quantize(expected, NF4Config())
    with skeleton():
        model = transformers.AutoModelForSeq2SeqLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    assert load_and_quantize(model, tmp_path, NF4Config(), dtype=dtype) == names
    got, want = _state(model), _state(expected)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("parameters", [None, ["experts.gate_up_proj", "experts.down_proj"]], ids=["dense", "4bit"])
@pytest.mark.parametrize("whole_first", [False, True, "partly"], ids=["rows-first", "whole-first", "some-rows-first"])
def test_experts_held_both_whole_and_as_rows_are_named(tmp_path, parameters, whole_first):
    """A checkpoint with a fused experts tensor and transformers 4's per-expert keys of it: named
    once, whichever comes first, without what it leaves missing (which follows from it) but with
    an unrelated problem (a missing q_proj); dense, the later copy used to win silently."""
    dense = models.mixtral()
    sd = {k: v.contiguous() for k, v in dense.state_dict().items() if k != "model.layers.1.self_attn.q_proj.weight"}
    fused = sd["model.layers.0.mlp.experts.gate_up_proj"]  # (E, 2 I, H): rows [w1; w3] of each expert
    rows = {f"model.layers.0.mlp.experts.{e}.{w}.weight": fused[e].chunk(2)[i].clone()
            for e in range(fused.shape[0]) for i, w in enumerate(("w1", "w3"))}
    if whole_first == "partly":  # expert 0's rows, then the whole tensor, then the other experts' rows
        zero = {k: v for k, v in rows.items() if ".experts.0." in k}
        sd = zero | sd
        rows = {k: v for k, v in rows.items() if k not in zero}
    first, second = (sd, rows) if whole_first else (rows, sd)
    save_file(first, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file(second, tmp_path / "b.safetensors", metadata={"format": "pt"})
    weight_map = {k: "a.safetensors" for k in first} | {k: "b.safetensors" for k in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with skeleton():
        model = models.mixtral()
    both = (r"into MixtralForCausalLM: experts held twice: \[\"[^\"]*: the checkpoint holds model.layers.0.mlp.experts.gate_up_proj both as one tensor and as its "
            r"experts' rows \(transformers 4's experts.N.\* keys\); it should hold one of them\"\]; 1 tensors the "
            r"model needs are not in the checkpoint: \['model.layers.1.self_attn.q_proj.weight'\]$")
    with pytest.raises(ValueError, match=both):
        load_and_quantize(model, tmp_path, NF4Config(parameters=parameters))
