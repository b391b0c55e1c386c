"""save_adapter writes the model's embedding weights where PEFT's save (save_embedding_layers="auto")
does: the base weight of an adapted embed_tokens / lm_head, and both embeddings of a model whose
vocabulary was resized from the config it was loaded from (lowrank/io_embeddings.py, Note:
embeddings in an adapter file). The key sets are PEFT's, and the file alone brings a fresh base
back to the trained model's outputs, new tokens included."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank import io as lio  # noqa: E402
from tests.tuners import models  # noqa: E402


def keys(path):
    return set(safetensors_torch.load_file(path / "adapter_model.safetensors"))


def both(tmp_path, build, targets):
    """(our model, our file's keys, PEFT's file's keys) for LoRA on `targets` of two builds of one model."""
    ours, theirs = build(), build()
    lowrank.inject(ours, lowrank.LoraConfig(r=4, targets=targets))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, target_modules=list(targets)))
    lio.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "peft"))
    return ours, keys(tmp_path / "ours"), keys(tmp_path / "peft")


@pytest.mark.parametrize("embedding, key", [("embed_tokens", "base_model.model.model.embed_tokens.base_layer.weight"),
                                            ("lm_head", "base_model.model.lm_head.base_layer.weight")])
def test_an_adapted_embedding_saves_its_base_weight(tmp_path, embedding, key):
    ours, mine, peft_keys = both(tmp_path, models.llama, [embedding, "q_proj"])
    assert key in mine and mine == peft_keys
    saved = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")[key]
    assert torch.equal(saved, lowrank.walk._unwrap(ours.get_input_embeddings() if embedding == "embed_tokens"
                                                   else ours.get_output_embeddings()).weight)


def saved_base(base_dir, tie=False):
    """The tiny Llama written to base_dir (config and weights: 64 tokens), once."""
    if not (base_dir / "config.json").exists():
        model = models.llama()
        model.config.tie_word_embeddings = tie
        model.save_pretrained(base_dir)
    return base_dir


def resized_from(base_dir, seed, tie=False):
    """Builds of the model loaded from base_dir, then given 4 new tokens drawn with seed."""
    def build():
        model = transformers.LlamaForCausalLM.from_pretrained(saved_base(base_dir, tie))
        torch.manual_seed(seed)
        model.resize_token_embeddings(models.VOCAB + 4, mean_resizing=False)
        return model
    return build


@pytest.mark.parametrize("tie", [False, True])
def test_a_resized_vocabulary_saves_both_embeddings_and_reloads(tmp_path, tie):
    ours, mine, peft_keys = both(tmp_path, resized_from(tmp_path / "base", 1, tie), ["q_proj"])
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= mine
    assert mine == peft_keys
    models.randomize_adapters(ours)
    lio.save_adapter(ours, tmp_path / "trained")
    fresh = resized_from(tmp_path / "base", 2, tie)()  # other new rows: only the file can make them right
    lio.load_adapter(fresh, tmp_path / "trained")
    ids = torch.tensor([[1, 2, models.VOCAB, models.VOCAB + 3]])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, ours.eval()(ids).logits)


def test_a_vocabulary_as_loaded_saves_no_embedding(tmp_path):
    build = lambda: transformers.LlamaForCausalLM.from_pretrained(saved_base(tmp_path / "base"))  # noqa: E731
    _, mine, peft_keys = both(tmp_path, build, ["q_proj"])
    assert mine == peft_keys and not any("embed_tokens" in k or "lm_head" in k for k in mine)
