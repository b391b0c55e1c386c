"""A PEFT LoRA file with modules_to_save (lm_head and embed_tokens trained whole, the recipe for
new tokens) loaded by lowrank and saved again: save_adapter writes those modules back, so PEFT
and lowrank load the new file with the outputs of the model it was saved from, bit for bit. The
file lacked them (and its modules_to_save), so a fresh base computed with its own head and
embeddings, silently. See lowrank/io_prompt.py, Note: modules_to_save written back."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import lowrank  # noqa: E402
from lowrank import io as lio  # noqa: E402
from tests.tuners import models  # noqa: E402

SAVED = ["embed_tokens", "lm_head"]


def peft_file(base, path):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                       modules_to_save=SAVED))
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: the adapter and the saved modules' copies
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(str(path))


def test_modules_to_save_survive_a_load_and_a_save(tmp_path):
    base = models.llama().eval()
    peft_file(base, tmp_path / "peft")
    ours = copy.deepcopy(base)
    lio.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        ours.lm_head.weight.add_(0.01)  # trained further here: the file takes the weights as they are now
    lio.save_adapter(ours, tmp_path / "again")

    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["modules_to_save"] == SAVED
    want = models.run(ours, models.ids())
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again"))
    fresh = copy.deepcopy(base)
    lio.load_adapter(fresh, tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(models.run(theirs, models.ids()), want)
        assert torch.equal(models.run(fresh, models.ids()), want)


def test_another_adapter_under_the_same_name_does_not_write_them(tmp_path):
    base = models.llama().eval()
    peft_file(base, tmp_path / "peft")
    ours = copy.deepcopy(base)
    lio.load_adapter(ours, tmp_path / "peft")
    lowrank.eject(ours, "default")
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=["v_proj"]))  # a new adapter "default", nothing saved whole
    lio.save_adapter(ours, tmp_path / "new")
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["target_modules"] == ["v_proj"]
