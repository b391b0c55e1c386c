"""The Hugging Face Hub, thinly: adapters by repo id (through huggingface_hub's cache) and
`push_adapter`. Nothing here talks to the network itself; huggingface_hub does, and obeys
HF_HUB_OFFLINE=1 / local_files_only."""

from __future__ import annotations

import os
import pathlib
import re
import tempfile

from torch import nn

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # the only files fetched for an adapter
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "owner/name"
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def resolve(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None,
            cache_dir: str | os.PathLike | None = None, token: str | None = None,
            files: tuple[str, ...] = ADAPTER_FILES) -> pathlib.Path:
    """A local directory as it is; otherwise a hub repo id, downloaded (only `files`) into the
    huggingface_hub cache, or found there when offline. Returns the directory."""
    path = pathlib.Path(path_or_repo_id)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} was given, but {path} is a local directory, which has no revisions")
        return path
    text = str(path_or_repo_id)
    if path.is_file():  # adapter_model.safetensors or adapter_config.json given: the directory is wanted
        raise FileNotFoundError(f"{text} is a file; an adapter is loaded from its directory ({path.parent}, which "
                                "holds adapter_config.json and adapter_model.safetensors) or a hub repo id")
    if not _REPO_ID.match(text) or text.count("/") > 1:
        raise FileNotFoundError(f"{text} is neither a directory nor a hub repo id ('owner/name')")
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    # "run/epoch_9" where run/ is here: a mistyped local path, unless the hub cache holds such a repo
    typo = path.parent.is_dir() and path.parent != pathlib.Path(".")
    local_only = bool(local_files_only) or offline() or typo
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(
            text, revision=revision, allow_patterns=list(files), cache_dir=cache_dir, token=token,
            local_files_only=local_only))
    except LocalEntryNotFoundError as e:
        if typo:
            raise FileNotFoundError(f"{text} is not a directory, though {path.parent} is one here; a mistyped local "
                                    f"path? (it has {sorted(p.name for p in path.parent.iterdir())[:8]}; a hub repo "
                                    "id whose owner is also a local folder: run from another directory)") from None
        where = "offline (HF_HUB_OFFLINE=1 or local_files_only)" if local_only else "and it could not be downloaded"
        raise FileNotFoundError(f"{text} (revision {revision or 'main'}) is not a local directory nor in the hub cache "
                                f"{cache_dir or constants.HF_HUB_CACHE}, {where}: {e}") from e


def push_adapter(model: nn.Module, repo_id: str, *, name: str | None = None, private: bool | None = None,
                 token: str | None = None, revision: str | None = None,
                 commit_message: str = "Upload adapter with lowrank"):
    """Save adapter `name` (lowrank.save_adapter) into a temporary directory and upload it to
    the hub repo `repo_id` (created if missing; `revision`: a branch, created if missing).
    Returns huggingface_hub's CommitInfo."""
    import huggingface_hub

    from .io import save_adapter
    from .walk import _module

    _module(model, "push_adapter")  # before any hub call: not "'str' object has no attribute 'modules'"
    api = huggingface_hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="lowrank-push-") as tmp:
        folder = save_adapter(model, pathlib.Path(tmp) / "adapter", name=name)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message, repo_type="model")
