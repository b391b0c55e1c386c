"""Bottleneck adapters in lowrank's own format (peft_type LOWRANK_BOTTLENECK): round trips
with equal outputs (the same modules, the same float ops), the keys and config written,
refusals; and the base-model check that every load_adapter makes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.config import AdapterConfig, LoraConfig  # noqa: E402
from tests.tuners import models  # noqa: E402

CONFIGS = {
    "pfeiffer": AdapterConfig(),
    "houlsby-parallel": AdapterConfig(placement="houlsby", parallel=True, bottleneck_size=5, activation="gelu",
                                      scaling=4.0),
}


def logits(model):
    with torch.no_grad():
        return models.run(model.eval(), models.ids())


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_round_trip(kind, config, tmp_path):
    base = getattr(models, kind)().eval()
    tuned = copy.deepcopy(base)
    wrapped = lowrank.inject(tuned, CONFIGS[config], name="bn")
    models.randomize_adapters(tuned)
    lowrank.save_adapter(tuned, tmp_path / "a")
    fresh = copy.deepcopy(base)
    result = lowrank.load_adapter(fresh, tmp_path / "a", name="bn")
    assert result.modules == wrapped and result.missing == result.unexpected == []
    assert torch.equal(logits(fresh), logits(tuned))
    assert not torch.equal(logits(fresh), logits(base))


def test_keys_and_config(tmp_path):
    model = models.llama()
    lowrank.inject(model, AdapterConfig(reduction_factor=8))
    lowrank.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOWRANK_BOTTLENECK" and cfg["format_version"] == 1
    assert cfg["target_modules"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert cfg["reduction_factor"] == 8 and cfg["placement"] == "pfeiffer" and cfg["parallel"] is False
    sd = safetensors_torch.load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in sd.items() if ".layers.0." in k} == {
        "base_model.model.model.layers.0.mlp.adapter.down.weight": (4, 32),
        "base_model.model.model.layers.0.mlp.adapter.down.bias": (4,),
        "base_model.model.model.layers.0.mlp.adapter.up.weight": (32, 4),
        "base_model.model.model.layers.0.mlp.adapter.up.bias": (32,),
    }


def test_peft_refuses_it(tmp_path):
    peft = pytest.importorskip("peft")
    model = models.llama()
    lowrank.inject(model, AdapterConfig())
    lowrank.save_adapter(model, tmp_path / "a")
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; PEFT does not know the type
        peft.PeftModel.from_pretrained(models.llama(), str(tmp_path / "a"))


def test_lora_and_bottleneck_side_by_side(tmp_path):
    base = models.llama().eval()
    tuned = copy.deepcopy(base)
    lowrank.inject(tuned, LoraConfig(r=2, targets=["q_proj"]), name="lora")
    lowrank.inject(tuned, AdapterConfig(targets=["mlp"]), name="bn")
    lowrank.set_active(tuned, ["lora", "bn"])
    models.randomize_adapters(tuned)
    with pytest.raises(ValueError, match="pass name="):
        lowrank.save_adapter(tuned, tmp_path / "x")
    lowrank.save_adapter(tuned, tmp_path / "lora", name="lora")
    lowrank.save_adapter(tuned, tmp_path / "bn", name="bn")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    fresh = copy.deepcopy(base)
    lowrank.load_adapter(fresh, tmp_path / "lora", name="lora")
    lowrank.load_adapter(fresh, tmp_path / "bn", name="bn")
    lowrank.set_active(fresh, ["lora", "bn"])
    assert torch.equal(logits(fresh), logits(tuned))


def test_refusals_leave_the_model_as_it_was(tmp_path):
    model = models.llama()
    lowrank.inject(model, AdapterConfig())
    lowrank.save_adapter(model, tmp_path / "a")
    bigger = models.gpt2()  # GPT-2's mlp: another name; a Llama with another width: a shape mismatch
    with pytest.raises(ValueError, match="no module of GPT2LMHeadModel matched"):
        lowrank.load_adapter(bigger, tmp_path / "a")
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=models.VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"shape mismatches.*mlp\.adapter\.down\.weight., \(2, 32\), \(4, 64\)"):
        lowrank.load_adapter(wide, tmp_path / "a")
    assert lowrank.adapter_names(wide) == []
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"format_version": 2}))
    with pytest.raises(ValueError, match="format_version is 2; this lowrank reads version 1"):
        lowrank.load_adapter(models.llama(), tmp_path / "a")
    cfg_file.write_text(json.dumps(cfg | {"gate": True}))
    with pytest.raises(ValueError, match=r"unknown fields \['gate'\]"):
        lowrank.load_adapter(models.llama(), tmp_path / "a")
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        lowrank.load_adapter(models.llama(), tmp_path / "a")


@pytest.mark.parametrize("saved, loading, ok", [
    ("org/model-a", "org/model-b", False),
    ("org/model-a", "/models/Model-A", True),  # the same model, downloaded to a directory
    ("org/model-a", "", True),  # a model built from config: its name is unknown
    (None, "org/model-b", True),
])
def test_base_model_check(saved, loading, ok, tmp_path):
    model = models.llama()
    lowrank.inject(model, LoraConfig(r=2, targets=["q_proj"]))
    lowrank.save_adapter(model, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"base_model_name_or_path": saved}))
    other = models.llama()
    other.config._name_or_path = loading
    if ok:
        lowrank.load_adapter(other, tmp_path / "a")
        return
    with pytest.raises(ValueError, match=r"trained on base model 'org/model-a', but this model is 'org/model-b'"):
        lowrank.load_adapter(other, tmp_path / "a")
    assert lowrank.adapter_names(other) == []
    lowrank.load_adapter(other, tmp_path / "a", allow_other_base=True)
    assert lowrank.adapter_names(other) == ["default"]


@pytest.mark.parametrize("config", [AdapterConfig(), LoraConfig(r=2)], ids=["bottleneck", "lora"])
def test_a_model_with_a_loaded_adapter_pickles_whole(tmp_path, config):
    # load_adapter gave its layers a config whose targets were a local lambda: torch.save(model) failed
    model = models.llama()
    lowrank.inject(model, config)
    models.randomize_adapters(model)
    lowrank.save_adapter(model, tmp_path / "a")
    fresh = models.llama()
    wrapped = lowrank.load_adapter(fresh, tmp_path / "a")
    torch.save(fresh, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(logits(again), logits(model))
    assert lowrank.eject(again) == wrapped.modules
