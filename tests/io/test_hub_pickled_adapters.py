"""A hub repo that holds its adapter only as adapter_model.bin (older PEFT's default): load_adapter
fetches the pickle only with allow_pickle=True, so without it the directory it gets has no weights,
and the error must say that allow_pickle=True fetches it (it said only that there was no
adapter_model.bin, which the repo has). huggingface_hub's download is replaced by a copy of the
files its allow_patterns pick from a local "remote"; nothing reaches the network."""

from __future__ import annotations

import copy
import fnmatch
import shutil
import socket

import pytest
import torch

peft = pytest.importorskip("peft")
huggingface_hub = pytest.importorskip("huggingface_hub")

import lowrank  # noqa: E402
from tests.tuners import models  # noqa: E402


@pytest.fixture
def pickled_repo(tmp_path, monkeypatch):
    base = models.llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "remote"), safe_serialization=False)
    assert not (tmp_path / "remote" / "adapter_model.safetensors").exists()
    fetched = []

    def snapshot_download(repo_id, *, allow_patterns, local_files_only, **kwargs):  # online, as huggingface_hub
        assert repo_id == "someone/old-adapter" and not local_files_only
        snap = tmp_path / "cache" / str(len(fetched))
        snap.mkdir(parents=True)
        for f in (tmp_path / "remote").iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snap / f.name)
                fetched.append(f.name)
        return str(snap)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("a test tried to reach the network"))
    return base, theirs, fetched


def test_the_error_says_allow_pickle_fetches_the_pickle(pickled_repo):
    base, theirs, fetched = pickled_repo
    model = copy.deepcopy(base)
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin \(a pickle\) is fetched only with "
                                                r"allow_pickle=True"):
        lowrank.load_adapter(model, "someone/old-adapter")
    assert fetched == ["adapter_config.json"] and lowrank.adapter_names(model) == []

    lowrank.load_adapter(model, "someone/old-adapter", allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(models.run(model, models.ids()), models.run(theirs.eval(), models.ids()))
