"""load_adapter(strict=False) of a prefix-tuning file whose embeddings (a resized vocabulary) or
task head do not fit the model: the prefix loads, those tensors are reported in
LoadResult.mismatched and not copied, but LoadResult.base (the base-model weights the file
carried, LOADED) listed them too, so a caller reading it was told the embeddings or the head had
come from the file while the model kept its own. base now lists only what was loaded."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from tests.tuners import models  # noqa: E402

EMBEDDINGS = ["base_model.lm_head.weight", "base_model.model.embed_tokens.weight"]


def _saved(tmp_path, resize=0):
    base = tmp_path / "base"
    if not (base / "config.json").exists():
        models.llama().save_pretrained(base)
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    if resize:
        torch.manual_seed(1)
        model.resize_token_embeddings(models.VOCAB + resize, mean_resizing=False)
    return model.eval()


def test_embeddings_that_do_not_fit_are_mismatched_not_base(tmp_path):
    trained = _saved(tmp_path, resize=4)
    lowrank.inject(trained, lowrank.PrefixConfig(num_virtual_tokens=3))
    models.randomize_adapters(trained, std=1.0)
    lowrank.save_adapter(trained, tmp_path / "prefix")

    plain = _saved(tmp_path)  # not resized: the file's embeddings have 4 rows more
    before = {n: p.clone() for n, p in plain.named_parameters()}
    result = lowrank.load_adapter(plain, tmp_path / "prefix", strict=False)
    assert sorted(k for k, _, _ in result.mismatched) == EMBEDDINGS
    assert result.base == []  # was: both embeddings, though neither was loaded
    for n, p in plain.named_parameters():
        if "prefix" not in n and n in before:  # the model's own weights: untouched
            assert torch.equal(p, before[n]), n

    fitting = _saved(tmp_path, resize=4)  # resized: they load, and are listed
    assert lowrank.load_adapter(fitting, tmp_path / "prefix", strict=False).base == EMBEDDINGS
    assert torch.equal(fitting.get_output_embeddings().weight, trained.get_output_embeddings().weight)


def test_a_task_head_that_does_not_fit_is_mismatched_not_base(tmp_path):
    def classifier(labels):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=32, num_labels=labels, pad_token_id=0)
        return transformers.LlamaForSequenceClassification(cfg).eval()

    trained = classifier(3)
    lowrank.inject(trained, lowrank.PrefixConfig(num_virtual_tokens=3))
    lowrank.save_adapter(trained, tmp_path / "prefix")
    other = classifier(2)
    head = other.score.weight.clone()
    result = lowrank.load_adapter(other, tmp_path / "prefix", strict=False)
    assert [k for k, _, _ in result.mismatched] == ["base_model.score.weight"]
    assert result.base == []
    assert torch.equal(other.score.weight, head)
    same = classifier(3)
    assert lowrank.load_adapter(same, tmp_path / "prefix", strict=False).base == ["base_model.score.weight"]
