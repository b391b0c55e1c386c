"""Prompt and prefix adapters of classification models in PEFT's format, both ways, with PEFT 0.21
as the oracle (lowrank/io_prompt.py, Note: task heads): PEFT's SEQ_CLS / TOKEN_CLS classes train
the head beside the prompt and save it as `base_model.<head>.*`, and its from_pretrained needs it
(a KeyError on lowrank's files before). Outputs must be EQUAL (the same float32 ops: see
tests/peers/test_peft_prompt.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from tests.tuners import models  # noqa: E402

N = 3
IDS = torch.randint(1, models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))  # no pad id (0)


def build(cls_name: str):
    torch.manual_seed(0)
    if cls_name.startswith("Bert"):
        cfg = transformers.BertConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, num_labels=3,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        cfg = transformers.LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=32, num_labels=3, pad_token_id=0)
    return getattr(transformers, cls_name)(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


# PEFT 0.21 prompt-tunes these; it cannot prefix-tune a classification model under transformers 5
# (its forward has no `past_key_values`; docs/prefix.md), so prefixes are checked within lowrank.
CASES = [("BertForSequenceClassification", "SEQ_CLS", "classifier"),
         ("BertForTokenClassification", "TOKEN_CLS", "classifier"),
         ("LlamaForSequenceClassification", "SEQ_CLS", "score")]


def saved_heads(path, base, task, head):
    """The head tensors of a saved adapter, checked to be PEFT's keys for the head of `base`."""
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["task_type"] == task and config["modules_to_save"] == list(lowrank.io_prompt.HEADS[task])
    saved = safetensors_torch.load_file(path / "adapter_model.safetensors")
    heads = {k: v for k, v in saved.items() if k.startswith("base_model.")}
    assert heads.keys() == {f"base_model.{head}.{n}" for n, _ in base.get_submodule(head).named_parameters()}
    return heads


@pytest.mark.parametrize("cls_name, task, head", CASES, ids=[c for c, _, _ in CASES])
def test_ours_to_peft_carries_the_head(tmp_path, cls_name, task, head):
    base = build(cls_name)
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PromptConfig(num_virtual_tokens=N))
    models.randomize_adapters(ours)
    lowrank.save_adapter(ours, tmp_path / "a")
    heads = saved_heads(tmp_path / "a", base, task, head)
    assert all(torch.equal(v, base.get_parameter(k.removeprefix("base_model."))) for k, v in heads.items())
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()  # a KeyError before
    assert torch.equal(logits(ours), logits(theirs))


@pytest.mark.parametrize("cls_name, task", [("LlamaForSequenceClassification", "SEQ_CLS"),
                                            ("LlamaForTokenClassification", "TOKEN_CLS")])
def test_a_prefix_and_its_head_round_trip(tmp_path, cls_name, task):
    """The same format for a prefix: the head as the model has it (here changed, as by training
    it beside the prefix) is saved and loaded back into a fresh model; outputs equal."""
    base = build(cls_name)
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=N))
    models.randomize_adapters(ours)
    with torch.no_grad():
        ours.score.weight.mul_(2.0)
    lowrank.save_adapter(ours, tmp_path / "a")
    heads = saved_heads(tmp_path / "a", base, task, "score")
    again = copy.deepcopy(base)
    result = lowrank.load_adapter(again, tmp_path / "a")
    assert result.base == sorted(heads) and "base_model.score.weight" in heads
    assert torch.equal(again.score.weight, ours.score.weight) and torch.equal(logits(again), logits(ours))


@pytest.mark.parametrize("cls_name, task, head", CASES, ids=[c for c, _, _ in CASES])
def test_peft_to_ours_loads_the_trained_head(tmp_path, cls_name, task, head):
    """PEFT trains the head with the prompt: its file's head goes into the model's head (listed
    in LoadResult.base), and the outputs equal PEFT's."""
    base = build(cls_name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:  # the prompt and PEFT's trained copy of the head
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    result = lowrank.load_adapter(ours, tmp_path / "p")
    assert result.base and all(k.startswith(f"base_model.{head}.") for k in result.base)
    assert result.unexpected == result.missing == []
    assert not torch.equal(ours.get_parameter(f"{head}.weight"), base.get_parameter(f"{head}.weight"))
    assert torch.equal(logits(ours), logits(theirs.eval()))


def test_other_modules_to_save_are_still_refused(tmp_path):
    base = build("BertForSequenceClassification")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=N, modules_to_save=["pooler"]))
    theirs.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(NotImplementedError, match="modules_to_save=.*'pooler'.* is not supported"):
        lowrank.load_adapter(copy.deepcopy(base), tmp_path / "p")
