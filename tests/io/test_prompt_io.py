"""Prompt adapters on disk in PEFT's PROMPT_TUNING format, both ways, with PEFT 0.21 as the
oracle. Outputs must be EQUAL: see Note: why equality is exact, in
tests/peers/test_peft_prompt.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from tests.tuners import models  # noqa: E402

N = 5


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=models.ids(), attention_mask=torch.ones(2, 8, dtype=torch.long)).logits


def prompted(base, name="default"):
    model = copy.deepcopy(base)
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N), name=name)
    models.randomize_adapters(model, std=1.0)
    return model


@pytest.mark.parametrize("build", [models.llama, models.gpt2])
def test_ours_to_peft(build, tmp_path):
    base = build().eval()
    ours = prompted(base)
    lowrank.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["num_virtual_tokens"], cfg["token_dim"], cfg["num_transformer_submodules"]) == (N, 32, 1)
    assert safetensors_torch.load_file(tmp_path / "a" / "adapter_model.safetensors").keys() == {"prompt_embeddings"}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert torch.equal(logits(theirs), logits(ours))
    assert logits(ours).shape[1] == N + 8


@pytest.mark.parametrize("build", [models.llama, models.gpt2])
def test_peft_to_ours(build, tmp_path):
    base = build().eval()
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    result = lowrank.load_adapter(ours, tmp_path / "p", name="task")
    assert result.missing == result.unexpected == result.mismatched == []
    assert lowrank.adapter_names(ours) == ["task"] and lowrank.summary(ours).trainable == N * 32
    assert torch.equal(logits(ours), logits(theirs))


def test_round_trip_keeps_the_name_it_is_given_and_errors_leave_nothing(tmp_path):
    base = models.llama().eval()
    ours = prompted(base, name="a")
    lowrank.save_adapter(ours, tmp_path / "a")  # the model's only adapter: no name needed
    again = copy.deepcopy(base)
    lowrank.load_adapter(again, tmp_path / "a")
    assert torch.equal(logits(again), logits(ours))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "num_virtual_tokens": N + 1}))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"shape mismatches .*prompt_embeddings.*\(5, 32\).*\(6, 32\)"):
        lowrank.load_adapter(fresh, tmp_path / "a")
    assert lowrank.adapter_names(fresh) == [] and not fresh._forward_pre_hooks


def test_lora_and_prompt_in_one_model_save_by_name(tmp_path):
    model = prompted(models.llama().eval(), name="p")
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="q_proj"), name="l")
    with pytest.raises(ValueError, match="pass name="):
        lowrank.save_adapter(model, tmp_path / "x")
    lowrank.save_adapter(model, tmp_path / "p", name="p")
    lowrank.save_adapter(model, tmp_path / "l", name="l")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    assert json.loads((tmp_path / "l" / "adapter_config.json").read_text())["peft_type"] == "LORA"
