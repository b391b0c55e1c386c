"""A bottleneck adapter of a model whose vocabulary was resized since it was loaded (new tokens):
the new tokens' embedding rows exist only in the trained model, and LoRA, prompt and prefix files
carry the embeddings then (lowrank/io_embeddings.py, Note: embeddings in an adapter file), but a
bottleneck file left them out, so a fresh base resized the same way (its own random new rows)
computed other logits for every new token, silently. The bottleneck file now carries them by the
same code path, and load_adapter restores them: the reload's logits are EQUAL (the same weights
and the same ops in the same order)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from tests.tuners import models  # noqa: E402

IDS = torch.tensor([[1, 2, models.VOCAB, models.VOCAB + 3]])  # two of the new tokens among them
EMBEDDINGS = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}


def resized(tmp_path, seed, tied=False):
    """The tiny Llama saved to tmp_path/base (once), loaded from there and given 4 new tokens whose
    rows are drawn with `seed`, as each fresh resize draws its own."""
    base = tmp_path / "base"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                       tie_word_embeddings=tied)
        transformers.LlamaForCausalLM(cfg).save_pretrained(base)
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    model.resize_token_embeddings(models.VOCAB + 4, mean_resizing=False)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("tied", [False, True])
def test_a_fresh_resized_base_computes_what_the_trained_model_did(tmp_path, tied):
    trained = resized(tmp_path, 1, tied)
    lowrank.inject(trained, lowrank.AdapterConfig(bottleneck_size=4))
    models.randomize_adapters(trained, std=1.0)
    lowrank.save_adapter(trained, tmp_path / "adapter")
    saved = set(safetensors_torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert EMBEDDINGS <= saved  # both names of a tied weight, as the LoRA file holds them

    fresh = resized(tmp_path, 2, tied)  # other new rows: they must come from the file
    assert not torch.equal(logits(fresh)[0, 2:], logits(trained)[0, 2:])
    result = lowrank.load_adapter(fresh, tmp_path / "adapter")
    assert EMBEDDINGS <= set(result.base) and not result.unexpected and not result.missing
    assert torch.equal(logits(fresh), logits(trained))


def test_without_a_resize_the_file_holds_no_embeddings(tmp_path):
    base = tmp_path / "base"
    models.llama().save_pretrained(base)
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    lowrank.inject(model, lowrank.AdapterConfig(bottleneck_size=4))
    lowrank.save_adapter(model, tmp_path / "adapter")
    saved = set(safetensors_torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all(".adapter." in k for k in saved)


def test_an_unresized_base_is_told_to_resize(tmp_path):
    trained = resized(tmp_path, 1)
    lowrank.inject(trained, lowrank.AdapterConfig(bottleneck_size=4))
    lowrank.save_adapter(trained, tmp_path / "adapter")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=rf"call model.resize_token_embeddings\({models.VOCAB + 4}\)"):
        lowrank.load_adapter(plain, tmp_path / "adapter")
    assert lowrank.adapter_names(plain) == []  # a failed load changes nothing
