"""Prefix adapters on disk in PEFT's PREFIX_TUNING format, against PEFT 0.21 both ways, on
tiny Llama (GQA) and GPT-2 built from config. Outputs must be EQUAL: see Note: why forward
equality is exact, in tests/peers/test_peft_prefix.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.tuners.prefix import layers  # noqa: E402
from tests.tuners import models  # noqa: E402

MODELS = {"llama": models.llama, "gpt2": models.gpt2}


def logits(model):
    with torch.no_grad():
        return models.run(model.eval(), models.ids())


@pytest.mark.parametrize("hidden", [None, 16])
@pytest.mark.parametrize("kind", MODELS)
def test_ours_to_peft(kind, hidden, tmp_path):
    """A reparameterised adapter is saved folded (as PEFT saves prefix_projection=True)."""
    base = MODELS[kind]().eval()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=3, projection_hidden=hidden))
    lowrank.save_adapter(ours, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["prefix_projection"] == (hidden is not None)
    tensors = safetensors_torch.load_file(tmp_path / "a" / "adapter_model.safetensors")
    found = layers(ours, "default")
    assert list(tensors) == ["prompt_embeddings"]
    assert tensors["prompt_embeddings"].shape == (3, len(found) * 2 * found[0].width)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert torch.equal(logits(theirs), logits(ours))
    assert not torch.equal(logits(base), logits(ours))  # the prefix does something


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", MODELS)
def test_peft_to_ours(kind, projection, tmp_path):
    base = MODELS[kind]().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=16))
    theirs.save_pretrained(tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))  # as saved: folded
    ours = copy.deepcopy(base)
    result = lowrank.load_adapter(ours, tmp_path / "p")
    assert result.modules == [n for n, _ in ours.named_modules() if n.endswith(("self_attn", ".attn"))]
    assert torch.equal(logits(ours), logits(theirs))


def test_round_trip_and_a_prefix_beside_lora(tmp_path):
    model = models.llama().eval()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="q_proj"), "lora")
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2), "pre")
    lowrank.set_active(model, ["pre"])
    lowrank.save_adapter(model, tmp_path / "pre", name="pre")
    again = models.llama().eval()
    lowrank.load_adapter(again, tmp_path / "pre", name="pre")
    assert torch.equal(logits(again), logits(model))
    assert lowrank.adapter_names(again) == ["pre"]


def test_a_prefix_on_some_layers_is_refused_at_save(tmp_path):
    """PEFT's format has a prefix for every layer (num_layers), and so does loading: a prefix on
    a subset of the attention modules would save a file neither could load."""
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2, targets=["model.layers.1.self_attn"]))
    with pytest.raises(ValueError, match=r"prefix adapter 'default' is on \['model.layers.1.self_attn'\], but PEFT's "
                                         r"format .* the default targets \['model.layers.0.self_attn', "
                                         r"'model.layers.1.self_attn'\]"):
        lowrank.save_adapter(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_an_adapter_for_another_model_is_refused_and_nothing_changes(tmp_path):
    source = models.gpt2().eval()
    lowrank.inject(source, lowrank.PrefixConfig(num_virtual_tokens=2))
    lowrank.save_adapter(source, tmp_path / "g")
    target = models.llama().eval()
    before = logits(target)
    with pytest.raises(ValueError, match="does not fit LlamaForCausalLM"):
        lowrank.load_adapter(target, tmp_path / "g")
    assert lowrank.adapter_names(target) == [] and not target._forward_pre_hooks
    assert torch.equal(logits(target), before)


def test_encoder_decoder_prefix_files_are_refused(tmp_path):
    model = models.llama()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
    lowrank.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "num_transformer_submodules": 2}))
    with pytest.raises(NotImplementedError, match="num_transformer_submodules=2"):
        lowrank.load_adapter(models.llama(), tmp_path / "a")


def test_strict_false_reports_keys_it_has_no_place_for(tmp_path):
    # as for LoRA and prompt files: strict=False loads what fits and says what did not
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
    models.randomize_adapters(model)
    lowrank.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    safetensors_torch.save_file({**safetensors_torch.load_file(file), "extra.weight": torch.zeros(2)}, file)
    with pytest.raises(ValueError, match=r"unexpected keys for a prefix adapter: \['extra.weight'\]"):
        lowrank.load_adapter(models.llama().eval(), tmp_path / "a")
    again = models.llama().eval()
    result = lowrank.load_adapter(again, tmp_path / "a", strict=False)
    assert result.unexpected == ["extra.weight"] and result.missing == []
    assert torch.equal(logits(again), logits(model))
