"""An adapted input embedding named otherwise than PEFT's "embed_tokens" (GPT-NeoX's embed_in,
GPT-2's wte) in a model whose vocabulary was resized since it was loaded: PEFT does not count it
as targeted (it goes by name), so its resized-vocabulary rule saves the output head too. save_adapter
saved the adapted embedding's base weight only, so a fresh resized base kept its own new rows of an
untied head and computed other logits for the new tokens, silently. Now the key sets are PEFT's
and the file brings a fresh base back to the trained outputs (lowrank/io_embeddings.py, Note:
embeddings in an adapter file)."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank import io as lio  # noqa: E402
from tests.tuners import models  # noqa: E402

VOCAB = 64
IDS = torch.tensor([[1, 2, VOCAB, VOCAB + 3]])  # two of the new tokens among them
CASES = {
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, tie_word_embeddings=False)), ["embed_in", "query_key_value"], {}),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)), ["wte", "c_attn"],
        {"fan_in_fan_out": True}),
}


def resized(tmp_path, case, seed):
    """The model saved to tmp_path/base (once), loaded from there, given 4 new tokens drawn with `seed`."""
    base = tmp_path / "base"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        CASES[case][0]().save_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    model.resize_token_embeddings(VOCAB + 4, mean_resizing=False)
    return model.eval()


def keys(path):
    return set(safetensors_torch.load_file(path / "adapter_model.safetensors"))


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("case", CASES)
def test_the_output_head_is_saved_as_peft_saves_it(tmp_path, case):
    _, targets, extra = CASES[case]
    ours = resized(tmp_path, case, 1)
    lowrank.inject(ours, lowrank.LoraConfig(r=4, targets=targets))
    models.randomize_adapters(ours)
    lio.save_adapter(ours, tmp_path / "ours")
    theirs = peft.get_peft_model(resized(tmp_path, case, 1), peft.LoraConfig(r=4, target_modules=targets, **extra))
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert "base_model.model.lm_head.weight" in keys(tmp_path / "ours") == keys(tmp_path / "peft")

    fresh = resized(tmp_path, case, 2)  # other new rows: only the file can make them right
    lio.load_adapter(fresh, tmp_path / "ours")
    assert torch.equal(logits(fresh), logits(ours))
    again = peft.PeftModel.from_pretrained(resized(tmp_path, case, 3), str(tmp_path / "ours"))
    assert torch.equal(logits(again), logits(ours))
