"""`lowrank merge BASE owner/name OUT` of a hub adapter trained with added tokens, whose repo holds
the tokenizer that knows them (PEFT's convention; AutoPeftModelForCausalLM looks for the repo's
tokenizer_config.json on the hub too): only adapter_config.json and the weights were fetched, so
OUT got the base's tokenizer, which splits the added tokens though the merged model has their
rows (what a local adapter directory no longer gets: test_merge_takes_the_adapters_tokenizer.py).
The adapter's tokenizer files are fetched with it now. huggingface_hub's download is replaced by
a copy of the files its allow_patterns pick from a local "remote"; nothing reaches the network."""

import fnmatch
import shutil
import socket

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from lowrank import cli, inject, save_adapter  # noqa: E402
from lowrank.config import LoraConfig  # noqa: E402
from tests.tuners.models import randomize_adapters  # noqa: E402

from . import tiny  # noqa: E402

NEW = ["<|ship|>", "<|deck|>"]


def test_the_merged_directory_holds_the_hub_adapters_tokenizer(tmp_path, monkeypatch):
    import transformers

    base = tiny.build(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    theirs = transformers.AutoTokenizer.from_pretrained(base)
    theirs.add_tokens(NEW)
    model.resize_token_embeddings(len(theirs), mean_resizing=False)
    inject(model, LoraConfig(r=2, targets=["q_proj"]))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "remote")
    theirs.save_pretrained(tmp_path / "remote")

    def snapshot_download(repo_id, *, allow_patterns, local_files_only, **kwargs):  # online, as huggingface_hub
        assert repo_id == "someone/ship-adapter" and not local_files_only
        snap = tmp_path / "snapshot"
        snap.mkdir()
        for f in (tmp_path / "remote").iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snap / f.name)
        return str(snap)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("a test tried to reach the network"))
    assert cli.main(["merge", str(base), "someone/ship-adapter", str(tmp_path / "merged")]) == 0

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = "<|user|>Go to <|deck|> with the <|ship|>"
    assert tokenizer(text)["input_ids"] == theirs(text)["input_ids"]  # each added token one id, as trained
    assert len(tokenizer) == len(theirs)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == len(theirs)
