"""An output embedding with a bias (BERT's MLM decoder) gets a row of its bias per token, so a
resized vocabulary's adapter file carries the bias beside the weight: PEFT's save takes every
tensor under the embedding module's name (lowrank/io_embeddings.py, Note: embeddings in an
adapter file). The key sets are PEFT's, and the file brings a fresh resized base, whose new bias
entries differ, back to the trained model's outputs."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank import io as lio  # noqa: E402

VOCAB = 64
BIAS = "base_model.model.cls.predictions.decoder.bias"


def resized_bert(tmp_path, seed):
    """A tiny BertForMaskedLM loaded from tmp_path/base, given 4 new tokens whose bias entries
    are drawn with `seed` (as a trained head's would differ from a fresh resize's zeros)."""
    base = tmp_path / "base"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)).save_pretrained(base)
    model = transformers.BertForMaskedLM.from_pretrained(base)
    torch.manual_seed(seed)
    model.resize_token_embeddings(VOCAB + 4, mean_resizing=False)
    with torch.no_grad():
        model.cls.predictions.decoder.bias[VOCAB:] = torch.randn(4)
    return model.eval()


def test_a_resized_output_embedding_saves_its_bias(tmp_path):
    ours, theirs = resized_bert(tmp_path, 1), resized_bert(tmp_path, 1)
    lowrank.inject(ours, lowrank.LoraConfig(r=4, targets=["query"]))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, target_modules=["query"]))
    lio.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "peft"))
    mine = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_keys = set(safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert BIAS in mine and set(mine) == peft_keys
    assert torch.equal(mine[BIAS], ours.cls.predictions.decoder.bias)

    fresh = resized_bert(tmp_path, 2)  # other new bias entries: only the file can make them right
    assert BIAS in lio.load_adapter(fresh, tmp_path / "ours").base
    ids = torch.tensor([[1, 2, 3, VOCAB + 1]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ours(ids).logits)
