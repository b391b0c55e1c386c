"""A prompt or prefix adapter of a model whose vocabulary was resized since it was loaded: PEFT's
save (save_embedding_layers="auto") puts the input and output embeddings in the file beside
`prompt_embeddings` (`base_model.model.embed_tokens.weight`, `base_model.lm_head.weight`), since
the new tokens' rows exist only in the trained model. load_adapter refused PEFT's file (unexpected
keys), and save_adapter's file lacked them, so a fresh resized base (other new rows) computed other
outputs, silently. Now both ways carry them (lowrank/io_embeddings.py, Note: embeddings in an
adapter file), with PEFT 0.21 as the oracle; outputs are EQUAL (Note: why equality is exact, in
tests/peers/test_peft_prompt.py)."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from tests.tuners import models  # noqa: E402

N = 4
EMBEDDINGS = {"base_model.model.embed_tokens.weight", "base_model.lm_head.weight"}
IDS = torch.tensor([[1, 2, models.VOCAB, models.VOCAB + 3]])  # two of the new tokens among them
KINDS = {"prompt": (lambda: lowrank.PromptConfig(num_virtual_tokens=N),
                    lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
         "prefix": (lambda: lowrank.PrefixConfig(num_virtual_tokens=N),
                    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))}


def resized(tmp_path, seed):
    """The tiny Llama saved to tmp_path/base (once), loaded from there and given 4 new tokens whose
    rows are drawn with `seed`, as each fresh resize draws its own."""
    base = tmp_path / "base"
    if not (base / "config.json").exists():
        models.llama().save_pretrained(base)
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    model.resize_token_embeddings(models.VOCAB + 4, mean_resizing=False)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def keys(path):
    return set(safetensors_torch.load_file(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_ours_carries_the_resized_embeddings(kind, tmp_path):
    ours_config, peft_config = KINDS[kind]
    ours = resized(tmp_path, 1)
    lowrank.inject(ours, ours_config())
    models.randomize_adapters(ours, std=1.0)
    lowrank.save_adapter(ours, tmp_path / "ours")
    peft.get_peft_model(resized(tmp_path, 1), peft_config()).save_pretrained(str(tmp_path / "peft"))
    assert EMBEDDINGS < keys(tmp_path / "ours") == keys(tmp_path / "peft")

    fresh = resized(tmp_path, 2)
    assert set(lowrank.load_adapter(fresh, tmp_path / "ours").base) == EMBEDDINGS
    assert torch.equal(logits(fresh), logits(ours))
    theirs = peft.PeftModel.from_pretrained(resized(tmp_path, 3), str(tmp_path / "ours"))
    assert torch.equal(logits(theirs), logits(ours))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_file_with_the_resized_embeddings_loads(kind, tmp_path):
    theirs = peft.get_peft_model(resized(tmp_path, 1), KINDS[kind][1]())
    models.randomize_adapters(theirs, std=1.0)
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert EMBEDDINGS < keys(tmp_path / "peft")
    ours = resized(tmp_path, 2)
    result = lowrank.load_adapter(ours, tmp_path / "peft")
    assert result.unexpected == result.missing == result.mismatched == [] and set(result.base) == EMBEDDINGS
    assert torch.equal(logits(ours), logits(theirs))


def test_a_vocabulary_as_loaded_adds_nothing(tmp_path):
    resized(tmp_path, 0)  # writes the base
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N))
    lowrank.save_adapter(model, tmp_path / "ours")
    assert keys(tmp_path / "ours") == {"prompt_embeddings"}
