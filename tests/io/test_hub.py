"""Adapters by hub repo id, offline: a Hugging Face cache laid out by hand in tmp_path
(models--owner--name/refs, snapshots/<commit>), HF_HUB_OFFLINE=1 and every socket refused,
so nothing can reach the network. push_adapter against a fake HfApi that records its calls."""

from __future__ import annotations

import socket

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")

import lowrank  # noqa: E402
from lowrank.config import LoraConfig  # noqa: E402
from tests.tuners import models  # noqa: E402

REPO = "someone/tiny-adapter"
COMMITS = {"main": "a" * 40, "v2": "b" * 40}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A hub cache holding REPO at two revisions, whose adapters differ; the network is off."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    tuned = {}
    for i, (ref, commit) in enumerate(COMMITS.items()):
        model = models.mlp()
        lowrank.inject(model, LoraConfig(r=2, targets=["0", "2"]))
        models.randomize_adapters(model, seed=10 + i)
        lowrank.save_adapter(model, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        tuned[ref] = model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))  # read at import time
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tuned


def outputs(model):
    with torch.no_grad():
        return model(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("revision", [None, "v2", COMMITS["v2"]])
def test_load_by_repo_id_from_the_cache(offline_cache, revision):
    model = models.mlp()
    result = lowrank.load_adapter(model, REPO, revision=revision)
    assert result.modules == ["0", "2"]
    assert torch.equal(outputs(model), outputs(offline_cache["main" if revision is None else "v2"]))


def test_not_in_the_cache_is_a_clear_error(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"someone/elsewhere .*not a local directory nor in the hub cache.*offline"):
        lowrank.load_adapter(models.mlp(), "someone/elsewhere")
    with pytest.raises(FileNotFoundError, match="neither a directory nor a hub repo id"):
        lowrank.load_adapter(models.mlp(), "no/such/dir")


def test_a_mistyped_local_path_does_not_go_to_the_hub(tmp_path, monkeypatch):
    """"run/epoch_9" where run/ is here and has no epoch_9: a typo, said so, not a hub download."""
    (tmp_path / "run" / "epoch_1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"run/epoch_9 is not a directory, though run is one here; a mistyped "
                                                r"local path\? \(it has \['epoch_1'\]"):
        lowrank.load_adapter(models.mlp(), "run/epoch_9")


def test_a_cached_repo_loads_although_a_folder_here_has_its_owners_name(offline_cache, tmp_path, monkeypatch):
    (tmp_path / "work" / REPO.split("/")[0]).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    model = models.mlp()
    lowrank.load_adapter(model, REPO)
    assert torch.equal(outputs(model), outputs(offline_cache["main"]))


def test_a_local_directory_takes_no_revision(tmp_path):
    model = models.mlp()
    lowrank.inject(model, LoraConfig(r=2, targets=["0"]))
    lowrank.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="local directory, which has no revisions"):
        lowrank.load_adapter(models.mlp(), tmp_path / "a", revision="v2")


class FakeApi:
    """Records HfApi calls; upload_folder notes the files it was given (the folder is temporary)."""

    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def create_branch(self, repo_id, **kw):
        FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        import pathlib

        files = sorted(p.name for p in pathlib.Path(kw["folder_path"]).iterdir())
        FakeApi.calls.append(("upload_folder", {**kw, "files": files}))
        return "commit-info"


def test_push_adapter(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = models.mlp()
    lowrank.inject(model, LoraConfig(r=2, targets=["0"]))
    info = lowrank.push_adapter(model, REPO, private=True, token="t0k", revision="exp", commit_message="first")
    assert info == "commit-info"
    (_, init), (_, repo), (_, branch), (_, upload) = FakeApi.calls
    assert init == {"token": "t0k"}
    assert repo == {"repo_id": REPO, "private": True, "exist_ok": True, "repo_type": "model"}
    assert branch == {"repo_id": REPO, "branch": "exp", "exist_ok": True, "repo_type": "model"}
    assert upload["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert upload["repo_id"] == REPO and upload["revision"] == "exp" and upload["commit_message"] == "first"
    FakeApi.calls = []
    lowrank.push_adapter(model, REPO)  # no revision: no branch, the default message
    assert [c for c, _ in FakeApi.calls] == ["init", "create_repo", "upload_folder"]
    assert FakeApi.calls[-1][1]["commit_message"] == "Upload adapter with lowrank"
