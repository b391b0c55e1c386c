"""A bottleneck adapter of a classifier, token classifier or question answerer is saved with the
task's head, whole, and loaded into the model's head (io_prompt.py, Note: task heads), as LoRA,
prompt and prefix files are. The head is new at fine-tuning, drawn at random in each fresh copy
of the base, and the file carried none: a model loaded from it gave other logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.config import AdapterConfig  # noqa: E402
from tests.tuners import models  # noqa: E402

CFG = dict(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TASKS = {  # class -> (its head's parameters, what the forward returns, PEFT's task_type)
    "BertForSequenceClassification": (["classifier.bias", "classifier.weight"], "logits", "SEQ_CLS"),
    "BertForTokenClassification": (["classifier.bias", "classifier.weight"], "logits", "TOKEN_CLS"),
    "BertForQuestionAnswering": (["qa_outputs.bias", "qa_outputs.weight"], "start_logits", "QUESTION_ANS"),
}


def fresh(cls: str, seed: int):
    """The task model as from_pretrained gives it: the pretrained encoder, a head drawn with `seed`."""
    torch.manual_seed(0)
    encoder = transformers.BertModel(transformers.BertConfig(**CFG)).state_dict()
    torch.manual_seed(seed)
    labels = 2 if cls.endswith("QuestionAnswering") else 3  # a start and an end logit
    model = getattr(transformers, cls)(transformers.BertConfig(**CFG | {"num_labels": labels}))
    model.bert.load_state_dict(encoder, strict=False)  # the task models' BERT may have no pooler
    return model.eval()


@pytest.mark.parametrize("cls", TASKS)
@pytest.mark.parametrize("targets", [None, ["output.dense", "classifier", "qa_outputs"]])
def test_the_head_goes_with_the_adapter(cls, targets, tmp_path):
    head, field, task = TASKS[cls]
    model = fresh(cls, seed=1)
    lowrank.inject(model, AdapterConfig(targets=targets))
    models.randomize_adapters(model)
    ids = models.ids()
    with torch.no_grad():
        want = getattr(model(input_ids=ids), field)
    lowrank.save_adapter(model, tmp_path / "a")
    keys = set(safetensors_torch.load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert {f"base_model.model.{k}" for k in head} <= keys
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == task
    assert cfg["modules_to_save"] == (["qa_outputs"] if task == "QUESTION_ANS" else ["classifier", "score"])

    other = fresh(cls, seed=2)  # another draw of the head
    result = lowrank.load_adapter(other, tmp_path / "a")
    assert result.base == sorted(f"base_model.model.{k}" for k in head)
    assert result.missing == result.unexpected == result.mismatched == []
    with torch.no_grad():
        assert torch.equal(getattr(other(input_ids=ids), field), want)  # the same modules, the same float ops


def test_a_model_without_a_task_head_saves_none(tmp_path):
    model = models.llama()
    lowrank.inject(model, AdapterConfig())
    lowrank.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "modules_to_save" not in cfg and "task_type" not in cfg
    keys = safetensors_torch.load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(".adapter." in k for k in keys)


def test_a_head_the_model_lacks_is_unexpected(tmp_path):
    model = fresh("BertForSequenceClassification", seed=1)
    lowrank.inject(model, AdapterConfig())
    lowrank.save_adapter(model, tmp_path / "a")
    bare = torch.nn.Module()  # the encoder alone, under its name: no head to load into
    bare.bert = fresh("BertForSequenceClassification", seed=2).bert
    with pytest.raises(ValueError, match=r"unexpected keys: \['base_model.model.classifier.bias'"):
        lowrank.load_adapter(bare, tmp_path / "a")
    assert lowrank.adapter_names(bare) == []


def test_bad_modules_to_save_is_refused(tmp_path):
    model = fresh("BertForSequenceClassification", seed=1)
    lowrank.inject(model, AdapterConfig())
    lowrank.save_adapter(model, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"modules_to_save": "classifier"}))
    with pytest.raises(ValueError, match="modules_to_save must be a list of module names or null; got 'classifier'"):
        lowrank.load_adapter(fresh("BertForSequenceClassification", seed=2), tmp_path / "a")
