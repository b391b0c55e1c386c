"""`lowrank merge BASE ADAPTER OUT` finds the adapter before the base loads (minutes for a 7B): a
mistyped adapter path was only noticed by load_adapter, after the whole base had loaded."""

from __future__ import annotations

import pytest

from lowrank.cli import main
from lowrank.commands import merge


@pytest.mark.parametrize("adapter", ["runs/epoch_3", "no_such_dir", "./a/b/c"])
def test_a_missing_adapter_is_an_error_before_the_base_loads(tmp_path, monkeypatch, capsys, adapter):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "epoch_1").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a repo-id-like name is looked up in the cache only

    def load_base(*args, **kwargs):
        raise AssertionError("the base was loaded before the adapter was found")

    monkeypatch.setattr(merge, "_load_base", load_base)
    (tmp_path / "base").mkdir()
    assert main(["merge", "base", adapter, "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lowrank merge: error:") and adapter in err
    assert "not a directory" in err or "neither a directory nor a hub repo id" in err or "hub cache" in err
    assert not (tmp_path / "out").exists()
