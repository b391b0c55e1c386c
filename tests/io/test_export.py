"""merge_and_export: transformers loads the directory and computes what the adapted model
computes (see Note: the export tolerance, in export_helpers.py); the user's model is left
as it was; shards, index, config; 4-bit bases; requantize; sizes; atomic directories."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank import shards  # noqa: E402
from lowrank.export import merge_and_export, merged_weight  # noqa: E402
from lowrank.quant import nf4  # noqa: E402
from tests.io.export_helpers import assert_export_close, logits, reference64, saved_base, tokenizer  # noqa: E402
from tests.tuners import models  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "llama64": ["q_proj", "v_proj", "down_proj"],
           "gpt2": ["c_attn", "c_fc"]}
X = models.ids(batch=4, seq=16)


def adapted(kind, tmp_path, dora=False, dtype=torch.float32, quantize=False):
    """(plain copy, adapted model) of a saved tiny model, adapter weights made non-zero."""
    model = saved_base(kind, tmp_path / "base", dtype)
    if quantize:
        lowrank.quantize(model, lowrank.NF4Config(compute_dtype=dtype))
    plain = copy.deepcopy(model)
    lowrank.inject(model, lowrank.LoraConfig(r=4, alpha=8, targets=TARGETS[kind], dora=dora))
    models.randomize_adapters(model)
    return plain, model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind, dora", [("llama", False), ("llama", True), ("gpt2", False)])
def test_transformers_loads_the_merged_model(kind, dora, tmp_path):
    plain, model = adapted(kind, tmp_path, dora)
    before = snapshot(model)
    result = merge_and_export(model, tmp_path / "out", max_shard_size="40KB")
    assert len(result.files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == result.files
    for f in result.files:  # no shard above the limit unless it is one tensor alone
        sd = safetensors_torch.load_file(tmp_path / "out" / f)
        assert sum(t.numel() * t.element_size() for t in sd.values()) <= 40_000 or len(sd) == 1
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    bound = assert_export_close(exported, model, reference64(plain, model, tmp_path), X)
    with lowrank.disabled(model):  # the adapter matters far more than the tolerance
        assert (logits(model, X) - logits(exported, X)).abs().max() > 100 * bound
    assert not any(".lora_" in k or ".base." in k for k in index["weight_map"])
    after = snapshot(model)  # the user's model is not changed
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert lowrank.adapter_names(model) == ["default"] and not any(m.merged for m in model.modules()
                                                                   if hasattr(m, "merged") and m is not model)


def test_tied_gpt2_head_written_once_and_config_kept(tmp_path):
    _, model = adapted("gpt2", tmp_path)
    merge_and_export(model, tmp_path / "out")
    keys = set(safetensors_torch.load_file(tmp_path / "out" / "model.safetensors"))
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # as save_pretrained writes it
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_embd"] == 32 and "quantization_config" not in cfg
    assert (tmp_path / "out" / "generation_config.json").exists()


def test_a_given_tokenizer_is_saved_beside_the_model(tmp_path):
    pytest.importorskip("tokenizers")
    _, model = adapted("llama", tmp_path)  # its base directory has no tokenizer: nothing to copy
    merge_and_export(model, tmp_path / "bare")
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    merge_and_export(model, tmp_path / "out", tokenizer=tokenizer())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("w3 w9")["input_ids"] == [3, 9]


@pytest.mark.parametrize("dtype, dora", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
                                         (torch.float16, False)])
def test_already_merged_model_exports_the_same(tmp_path, dtype, dora):
    plain, model = adapted("llama", tmp_path, dora, dtype)
    merge_and_export(model, tmp_path / "a")
    lowrank.merge(model)
    merge_and_export(model, tmp_path / "b")
    a = safetensors_torch.load_file(tmp_path / "a" / "model.safetensors")
    b = safetensors_torch.load_file(tmp_path / "b" / "model.safetensors")
    # merge() adds s B A to W0 in float32, as merged_weight does: the same sum, the same rounding
    # (forming a bf16 adapter's s B A in bf16 rounded it once more, and the two files differed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_several_adapters_merged_in_place_write_what_export_writes(tmp_path, dtype):
    """Two float32 adapters on a half-precision model: merge sums both in float32 and rounds once,
    as merged_weight does (it had rounded after each adapter)."""
    plain = models.llama().to(dtype)
    model = copy.deepcopy(plain)
    for name in ("a", "b"):
        lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj", "down_proj"]), name=name, dtype=torch.float32)
    lowrank.set_active(model, ["a", "b"])
    lowrank.mark_trainable(model)
    models.randomize_adapters(model, std=0.3)  # both adapters' weights (it draws for those that require grad)
    merge_and_export(model, tmp_path / "a")
    lowrank.merge(model)
    merge_and_export(model, tmp_path / "b")
    a = safetensors_torch.load_file(tmp_path / "a" / "model.safetensors")
    b = safetensors_torch.load_file(tmp_path / "b" / "model.safetensors")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], plain.model.layers[0].self_attn.q_proj.weight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_4bit_base_exports_its_dequantized_weight_in_the_compute_dtype(tmp_path):
    plain, model = adapted("llama", tmp_path, dtype=torch.bfloat16, quantize=True)
    original = saved_base("llama", tmp_path / "again", torch.bfloat16)  # the full-precision weights
    result = merge_and_export(model, tmp_path / "out")
    assert result.dtype == torch.bfloat16
    sd = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.endswith(".absmax") for k in sd) and all(t.dtype == torch.bfloat16 for t in sd.values())
    layers = dict(model.named_modules())
    k = layers["model.layers.0.self_attn.k_proj"]  # 4-bit, no adapter: exactly its dequantized weight
    assert torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], k.dequantize(torch.bfloat16))
    assert not torch.equal(sd["model.layers.0.self_attn.k_proj.weight"],
                           original.get_submodule("model.layers.0.self_attn.k_proj").weight)
    q = layers["model.layers.0.self_attn.q_proj"]  # LoRA on 4-bit: bf16(deq_bf16 + s B A), s B A from the
    with torch.no_grad():  # bf16 factors in float32 and the sum in float32: one rounding, to bf16
        delta = q.lora_B["default"].weight.float() @ q.lora_A["default"].weight.float() * q.scaling["default"]
    expect = q.base.dequantize(torch.bfloat16).float() + delta
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], expect.to(torch.bfloat16))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.dtype == torch.bfloat16
    assert_export_close(exported, model, reference64(plain, model, tmp_path), X)


def test_4bit_gpt2_exports_conv1d_weights_in_their_layout(tmp_path):
    """GPT-2's Conv1D weights are (in, out); quantized they are (out, in) (Note: 4-bit GPT-2):
    the dense export writes them back as the model class builds them."""
    plain, model = adapted("gpt2", tmp_path, dtype=torch.bfloat16, quantize=True)
    merge_and_export(model, tmp_path / "out")
    sd = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # (in, out), LoRA on it
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (128, 32)  # (in, out), 4-bit only
    c_proj = model.get_submodule("transformer.h.0.attn.c_proj")  # square: a transpose would load silently
    assert torch.equal(sd["transformer.h.0.attn.c_proj.weight"], c_proj.dequantize(torch.bfloat16).T)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_export_close(exported, model, reference64(plain, model, tmp_path), X)


def test_requantize_writes_nf4_and_reports_its_error(tmp_path, caplog):
    bnb = pytest.importorskip("bitsandbytes")
    _, model = adapted("llama64", tmp_path, dtype=torch.bfloat16, quantize=True)  # See Note in llama64
    with caplog.at_level(logging.INFO, logger="lowrank"):
        result = merge_and_export(model, tmp_path / "out", requantize=True)
    assert sorted(result.requantize_error) == result.merged and len(result.merged) == 2 * 3
    assert "re-quantizing to NF4 added a relative error of at most" in caplog.text
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit"] and cfg["llm_int8_skip_modules"] == ["lm_head"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    layers = dict(model.named_modules())
    for name, m in theirs.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        got = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        if name in result.merged:  # NF4 of the merged weight, and the error is what was reported
            w = merged_weight(layers[name]).to(torch.bfloat16)
            back = nf4.dequantize(nf4.quantize(w, 64, True), torch.float32)
            assert torch.equal(got, back.to(torch.bfloat16).float())  # bnb returns the quant_state's dtype, bf16
            rel = (torch.linalg.norm(back - w.float()) / torch.linalg.norm(w.float())).item()
            assert rel == pytest.approx(result.requantize_error[name], rel=1e-6) and 0 < rel < 0.2
        else:  # no adapter: the very codes it had
            assert torch.equal(got, layers[name].dequantize(torch.bfloat16).float())


def test_refusals(tmp_path):
    dense = saved_base("llama", tmp_path / "base")
    with pytest.raises(ValueError, match="requantize=True .* has none"):
        merge_and_export(dense, tmp_path / "out", requantize=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        merge_and_export(dense, tmp_path / "out", dtype=torch.int8)
    lowrank.inject(dense, lowrank.AdapterConfig())
    with pytest.raises(ValueError, match="AdapterLayer adapter, which cannot be merged"):
        merge_and_export(dense, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_what_cannot_be_written_right_is_refused_and_nothing_written(tmp_path):
    """A merged sum that is not finite (lowrank.merge refuses it too), a cast to fp16 that would
    turn a weight into inf, a weight computed by a parametrization (its merged weight had no
    state-dict key to go to: the export was the base model, silently)."""
    from torch.nn.utils import parametrizations

    def model(weight_scale=1.0, factor=1.0):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        lowrank.inject(m, lowrank.LoraConfig(targets="0"))
        with torch.no_grad():
            m[0].base.weight.mul_(weight_scale)
            m[0].lora_A["default"].weight.fill_(factor)
            m[0].lora_B["default"].weight.fill_(factor)
        return m

    with pytest.raises(ValueError, match="'0' gives non-finite weights"):
        merge_and_export(model(factor=1e20), tmp_path / "out")
    with pytest.raises(ValueError, match=r"0.weight: its values reach .* torch.float16 cannot hold"):
        merge_and_export(model(weight_scale=1e6), tmp_path / "out", dtype="fp16")
    with pytest.raises(ValueError, match=r"1.weight: its values reach"):  # a weight no adapter touches
        m = model()
        with torch.no_grad():
            m[1].weight.fill_(1e5)
        merge_and_export(m, tmp_path / "out", dtype="fp16")
    computed = torch.nn.Sequential(parametrizations.weight_norm(torch.nn.Linear(8, 8)))
    lowrank.inject(computed, lowrank.LoraConfig(targets=torch.nn.Linear))
    with pytest.raises(ValueError, match="not a state-dict entry '0.weight' but computed"):
        merge_and_export(computed, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    merge_and_export(model(weight_scale=1e6), tmp_path / "out")  # float32 holds it


@pytest.mark.parametrize("size, expect", [(1000, 1000), ("2GB", 2 * 10**9), ("500MB", 500 * 10**6),
                                          ("1GiB", 2**30), ("1.5kb", 1500), (" 7 B ", 7)])
def test_sizes(size, expect):
    assert shards.parse_size(size) == expect


@pytest.mark.parametrize("size", ["2 gigs", "", "-1GB", 0, True, 1.5, "GB", None])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError, match=r"max_shard_size must be .* got"):
        shards.parse_size(size)


def test_directory_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    _, model = adapted("llama", tmp_path)
    calls = []

    def broken(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, filename, metadata)

    real = safetensors_torch.save_file
    monkeypatch.setattr(safetensors_torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        merge_and_export(model, tmp_path / "out", max_shard_size="40KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no out, no temporary directory
    monkeypatch.setattr(safetensors_torch, "save_file", real)
    merge_and_export(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_and_export(model, tmp_path / "out")
    merge_and_export(model, tmp_path / "out", dtype="fp16", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # the old one is gone
    assert safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"].dtype == torch.float16


def test_extra_files_come_inside_the_swap_or_the_old_directory_stays(tmp_path, monkeypatch):
    _, model = adapted("llama", tmp_path)
    (tmp_path / "notes.json").write_text('{"template": "chatml"}')
    merge_and_export(model, tmp_path / "out", extra_files={"notes.json": tmp_path / "notes.json"})
    assert (tmp_path / "out" / "notes.json").read_text() == '{"template": "chatml"}'
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    for name in ("config.json", "generation_config.json", "model-00001-of-00002.safetensors"):  # refused up front
        with pytest.raises(ValueError, match=f"'{name}' is a file the export itself writes"):
            merge_and_export(model, tmp_path / "out", overwrite=True, extra_files={name: tmp_path / "notes.json"})
    from lowrank import export_files  # a name only the copy finds taken: after the weights, still no swap
    monkeypatch.setattr(export_files, "written", lambda model, tokenizer: set())
    with pytest.raises(ValueError, match="'config.json' is a file the export itself writes"):
        merge_and_export(model, tmp_path / "out", overwrite=True, dtype="fp16",
                         extra_files={"config.json": tmp_path / "notes.json"})
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # the copy failed: no swap
    for bad, error in [({"a/b": tmp_path / "notes.json"}, "a plain file name"), ({"x": tmp_path / "none"}, "no file at"),
                       ([("x", "y")], "must be a dict")]:
        with pytest.raises((ValueError, FileNotFoundError, TypeError), match=error):
            merge_and_export(model, tmp_path / "other", extra_files=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "notes.json", "out"]


def test_requantized_sizes_are_planned_at_most():
    """merge_and_export plans a re-quantized weight's shard bytes before making it: its
    quant-state JSON holds the new offset, whose text may be longer than the old one's."""
    import math

    from lowrank.export import _nf4_sizes, _requantized

    torch.manual_seed(0)
    like = lowrank.Linear4bit(lowrank.nf4.quantize(torch.randn(64, 128) * 1e-3, 64, True))
    for scale in (1e-30, 1e-7, 1.0, 3e4):  # offsets whose text is short and long
        w = torch.randn(64, 128) * scale
        made = {k: t.numel() * t.element_size() for k, t in _requantized(w, like, "w", "n", torch.float32, {}).items()}
        planned = _nf4_sizes("w", like, torch.float32, requantized=True)
        assert planned.keys() == made.keys() and all(planned[k] >= made[k] for k in made), (scale, planned, made)
        assert math.isclose(sum(planned.values()), sum(made.values()), abs_tol=32)
