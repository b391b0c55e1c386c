"""4-bit checkpoints with transformers + bitsandbytes as the oracle (both on CPU): a
directory lowrank.save_quantized writes loads in transformers as a bitsandbytes 4-bit model,
and one transformers writes loads into lowrank, with identical dequantized weights both ways
(exact: dequantization is a table lookup times a scale, docs/nf4.md)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.quant.linear4bit import Linear4bit  # noqa: E402
from tests.io.export_helpers import llama64  # noqa: E402
from tests.tuners import models  # noqa: E402


def bnb_layers(model) -> dict[str, torch.Tensor]:
    """module name -> bitsandbytes' own dequantization of its 4-bit weight."""
    return {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def ours_layers(model) -> dict[str, Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def empty(config):
    """A model built from `config` with its parameters on the meta device (buffers real)."""
    with lowrank.skeleton():
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    llama64().save_pretrained(path)  # See Note in llama64: widths of 64 for bitsandbytes on CPU
    return path


def test_transformers_loads_ours(dense_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    lowrank.quantize(model, lowrank.NF4Config(compute_dtype=torch.bfloat16))
    files = lowrank.save_quantized(model, tmp_path / "q", max_shard_size="30KB")
    assert len(files) > 1
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["load_in_4bit"] and cfg["bnb_4bit_quant_type"] == "nf4" and cfg["bnb_4bit_use_double_quant"]
    assert cfg["bnb_4bit_compute_dtype"] == "bfloat16" and cfg["llm_int8_skip_modules"] == ["lm_head"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    got, ours = bnb_layers(theirs), ours_layers(model)
    assert sorted(got) == sorted(ours) and len(got) == 14
    for name, w in got.items():
        assert torch.equal(w, ours[name].dequantize(w.dtype)), name
    assert torch.equal(theirs.lm_head.weight, model.lm_head.weight)  # the head stays dense


def test_ours_loads_transformers(dense_dir, tmp_path):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "q")
    for model in (empty(theirs.config), transformers.AutoModelForCausalLM.from_config(theirs.config)):
        names = lowrank.load_quantized(model, tmp_path / "q")
        ours, got = ours_layers(model), bnb_layers(theirs)
        assert names == sorted(got) == sorted(ours)
        for name, w in got.items():
            assert torch.equal(ours[name].dequantize(w.dtype), w), name
            assert ours[name].compute_dtype == torch.float32  # from config.json's bnb_4bit_compute_dtype
        assert torch.equal(model.model.embed_tokens.weight, theirs.model.embed_tokens.weight)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=models.ids()).logits).all()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ours_round_trip_is_exact(kind, tmp_path):
    model = getattr(models, kind)().eval()
    lowrank.quantize(model)
    lowrank.save_quantized(model, tmp_path / "q")
    if kind == "gpt2":  # a tied head is written once, as save_pretrained does
        assert "lm_head.weight" not in safetensors_torch.load_file(tmp_path / "q" / "model.safetensors")
    again = empty(model.config)
    lowrank.load_quantized(again, tmp_path / "q")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        x = models.ids()
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)


def test_refusals(dense_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    with pytest.raises(ValueError, match="no 4-bit layers"):
        lowrank.save_quantized(model, tmp_path / "q")
    lowrank.quantize(model)
    lowrank.inject(model, lowrank.LoraConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="the model has adapters"):
        lowrank.save_quantized(model, tmp_path / "q")
    lowrank.eject(model)
    mixed = copy.deepcopy(model)
    mixed.model.layers[0].self_attn.q_proj.compute_dtype = torch.bfloat16  # the format holds one compute dtype
    with pytest.raises(ValueError, match=r"compute in several dtypes \(.*'bfloat16': \['model.layers.0.self_attn.q_proj'\]"):
        lowrank.save_quantized(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    lowrank.save_quantized(model, tmp_path / "q")
    other = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(dense_dir, intermediate_size=192))
    with pytest.raises(ValueError, match=r"size mismatch for model.layers.0.mlp.down_proj.weight.*\(64, 128\)"):
        lowrank.load_quantized(other, tmp_path / "q")
    with torch.device("meta"):  # buffers on meta too: rotary inv_freq is not in any checkpoint
        meta = transformers.AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(ValueError, match=r"still on the meta device.*lowrank.skeleton\(\)"):
        lowrank.load_quantized(meta, tmp_path / "q")
    cfg_file = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"quantization_config": cfg["quantization_config"] | {"load_in_8bit": True}}))
    with pytest.raises(NotImplementedError, match="quantized as 8-bit; load_quantized reads bitsandbytes NF4"):
        lowrank.load_quantized(empty(model.config), tmp_path / "q")
    cfg_file.write_text(json.dumps(cfg))
    f = tmp_path / "q" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        lowrank.load_quantized(empty(model.config), tmp_path / "q")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_says_so_in_its_config(tmp_path, dtype):
    """config.json's dtype is the model's: it counted tensors, and the float32 quant-state tensors of
    each 4-bit layer outnumbered a bf16 model's own, so it said float32 and transformers loaded the
    biases in float32 beside bf16 weights (Phi's forward then raised)."""
    torch.manual_seed(0)
    cfg = transformers.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 vocab_size=128)
    model = transformers.PhiForCausalLM(cfg).to(dtype).eval()
    lowrank.quantize(model, lowrank.NF4Config(compute_dtype=dtype))
    lowrank.save_quantized(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert {p.dtype for n, p in theirs.named_parameters() if n.endswith("bias")} == {dtype}
    with torch.no_grad():
        assert theirs(input_ids=torch.randint(0, 128, (1, 6))).logits.dtype == dtype


def _t5():
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def _llama_classifier():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=64, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg)


@pytest.mark.parametrize("build", [_t5, _llama_classifier])
def test_transformers_loads_what_the_default_targets_quantize(build, tmp_path):
    """T5 keeps `wo` in float32 (_keep_in_fp32_modules) and transformers never quantizes it: the
    default targets leave it dense too (lowrank/quant/quantize.py, Note: modules kept in float32).
    A classifier's `score` is the model's last module, which transformers skips unless the config
    lists the modules to skip: llm_int8_skip_modules is now always a list. Either way transformers
    refused lowrank's checkpoint (a size mismatch)."""
    torch.manual_seed(0)
    model = build().eval()
    replaced = lowrank.quantize(model, lowrank.NF4Config())
    assert not any(n.endswith(".wo") for n in replaced)
    lowrank.save_quantized(model, tmp_path / "q")
    theirs = transformers.AutoConfig.from_pretrained(tmp_path / "q").architectures[0]
    theirs = getattr(transformers, theirs).from_pretrained(tmp_path / "q", device_map="cpu")
    got, ours = bnb_layers(theirs), ours_layers(model)
    assert sorted(got) == sorted(ours) == sorted(replaced)
    for name, w in got.items():
        assert torch.equal(w, ours[name].dequantize(w.dtype)), name


def test_transformers_refuses_our_4bit_experts(tmp_path):
    """transformers + bitsandbytes keep a MoE model's experts dense: a directory with 4-bit experts
    (checkpoint.py, Note: 4-bit parameters on disk) is refused by its size check, not loaded with
    experts left uninitialized; load_quantized reads it."""
    from tests.quant.test_params4bit import CONFIG, mixtral

    model = mixtral()
    lowrank.quantize(model, CONFIG)
    lowrank.save_quantized(model, tmp_path / "q")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    again = empty(model.config)
    assert any(".experts." in n for n in lowrank.load_quantized(again, tmp_path / "q"))
