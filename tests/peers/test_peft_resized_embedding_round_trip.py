"""A PEFT LoRA file on the embedding of a model whose vocabulary was resized carries the resized
embedding itself (`...embed_tokens.base_layer.weight`: PEFT's save_embedding_layers), whose new
rows are the ones the adapter was trained with. lowrank loads it into the base, and save_adapter
must write it back: the file it wrote lacked it, so a freshly resized base (other new rows)
computed otherwise, silently. See lowrank/io_prompt.py, Note: modules_to_save written back."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lowrank import io as lio  # noqa: E402
from tests.tuners import models  # noqa: E402

KEY = "base_model.model.model.embed_tokens.base_layer.weight"


def resized(seed):
    """The tiny Llama with 4 new tokens, their rows drawn with `seed` (as each fresh resize draws its own)."""
    model = models.llama().eval()
    torch.manual_seed(seed)
    model.resize_token_embeddings(models.VOCAB + 4, mean_resizing=False)
    return model


def test_a_resized_embedding_survives_a_load_and_a_save(tmp_path):
    theirs = peft.get_peft_model(resized(1), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert KEY in safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")

    ours = resized(2)
    assert KEY in lio.load_adapter(ours, tmp_path / "peft").base
    lio.save_adapter(ours, tmp_path / "again")
    saved = safetensors_torch.load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert torch.equal(saved[KEY], ours.model.embed_tokens.base.weight)

    fresh = resized(3)
    lio.load_adapter(fresh, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(resized(4), str(tmp_path / "again"))
    ids = torch.tensor([[1, 2, models.VOCAB, models.VOCAB + 3]])  # new tokens among them

    def hidden(model):  # the decoder's output: lm_head's new rows are each base's own, in no file
        with torch.no_grad():
            return model.model(input_ids=ids).last_hidden_state

    want = hidden(theirs.base_model.model.eval())
    assert torch.equal(hidden(ours), want)
    assert torch.equal(hidden(fresh), want)
    assert torch.equal(hidden(again.base_model.model), want)
