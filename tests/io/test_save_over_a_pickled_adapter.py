"""save_adapter into a directory that holds a pickled adapter (PEFT's save_pretrained with
safe_serialization=False): the old adapter_model.bin must not survive beside the new config,
or a reader of .bin files (older PEFT, torch.load) takes the old weights for the new adapter."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from lowrank import io as lio  # noqa: E402
from lowrank.config import LoraConfig  # noqa: E402
from lowrank.inject import inject  # noqa: E402
from tests.tuners import models  # noqa: E402


def test_an_old_pickle_is_not_carried_over_and_other_files_are(tmp_path):
    base = models.llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "a"), safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").exists() and (tmp_path / "a" / "README.md").exists()
    readme = (tmp_path / "a" / "README.md").read_text()

    ours = copy.deepcopy(base)  # another adapter, on other modules, saved over it
    inject(ours, LoraConfig(r=2, alpha=4, targets=["v_proj"]))
    models.randomize_adapters(ours)
    lio.save_adapter(ours, tmp_path / "a")

    assert not (tmp_path / "a" / "adapter_model.bin").exists()
    assert (tmp_path / "a" / "README.md").read_text() == readme  # the directory's other files are kept
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(models.run(loaded, models.ids()), models.run(ours, models.ids()))


def test_saving_again_replaces_the_adapter_files_and_links_the_rest(tmp_path):
    # every save copied whatever else the directory held (a trainer's checkpoint-*/ folders, GBs) into the new
    # directory; those are hard links now, and the adapter's own files new files, so the old ones never change
    import os

    model = models.llama()
    inject(model, LoraConfig(r=4, targets=["q_proj"]))
    lio.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "checkpoint-10").mkdir()
    (tmp_path / "a" / "checkpoint-10" / "optimizer.pt").write_bytes(b"\x01" * 4096)
    os.link(tmp_path / "a" / "adapter_model.safetensors", tmp_path / "first.safetensors")  # the first save's bytes
    first = (tmp_path / "first.safetensors").read_bytes()
    inode = (tmp_path / "a" / "checkpoint-10" / "optimizer.pt").stat().st_ino
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    lio.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "first.safetensors").read_bytes() == first  # a new file, not a write into the old one
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != first
    assert (tmp_path / "a" / "checkpoint-10" / "optimizer.pt").stat().st_ino == inode
