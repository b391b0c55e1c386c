"""An adapter file trained after resize_token_embeddings holds the resized embeddings (PEFT's save
adds them; so does save_adapter). Loaded onto a base that was not resized, the load is refused
with the shapes, and now says what they mean and what to call first; a prefix file's refusal named
"the task head" for the embeddings (lowrank/io_embeddings.py, resize_hint)."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from tests.tuners import models  # noqa: E402

HINT = r"the file's embeddings have 68 rows: the adapter was trained with a resized vocabulary; " \
       r"call model\.resize_token_embeddings\(68\) before loading it"
CONFIGS = {"lora": lambda: peft.LoraConfig(r=4, target_modules=["q_proj"]),
           "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
           "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)}


def base(tmp_path, resize):
    if not (tmp_path / "base" / "config.json").exists():
        models.llama().save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    if resize:
        model.resize_token_embeddings(models.VOCAB + 4, mean_resizing=False)
    return model


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_resized_file_on_a_base_not_resized_says_to_resize(tmp_path, kind):
    peft.get_peft_model(base(tmp_path, True), CONFIGS[kind]()).save_pretrained(str(tmp_path / "a"))
    model = base(tmp_path, False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\(key, file, model\): .*embed_tokens.weight', \(68, 32\), \(64, 32\)\)\] "
                                         r"\(" + HINT + r"\)$") as e:
        lowrank.load_adapter(model, tmp_path / "a")
    assert "task head does not" not in str(e.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and not lowrank.adapter_names(model)


def test_other_mismatches_get_no_hint(tmp_path):
    peft.get_peft_model(base(tmp_path, False), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "a"))
    model = base(tmp_path, False)
    cfg = tmp_path / "a" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 4', '"r": 8'))
    with pytest.raises(ValueError, match=r"shape mismatches") as e:
        lowrank.load_adapter(model, tmp_path / "a")
    assert "resize_token_embeddings" not in str(e.value)
