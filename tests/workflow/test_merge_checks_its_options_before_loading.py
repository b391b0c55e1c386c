"""`lowrank merge` with a bad --max-shard-size, or an OUT that is a file or is not empty (without
--overwrite: the commonest slip), loaded the base and merged it (minutes for a 7B) before
merge_and_export refused to write. Each is now refused before anything loads."""

import pytest

from lowrank import cli
from lowrank.commands import merge


@pytest.mark.parametrize("setup, extra, said", [
    (lambda out: None, ["--max-shard-size", "2 gigs"], "max_shard_size must be a positive int (bytes) or a string"),
    (lambda out: out.write_text("x"), [], "out exists and is not a directory"),
    (lambda out: (out.mkdir(), (out / "model.safetensors").write_text("x")), [],
     "out exists and is not empty; pass --overwrite to replace it"),
])
def test_what_the_export_would_refuse_is_refused_before_the_base_loads(tmp_path, capsys, monkeypatch, setup, extra,
                                                                       said):
    monkeypatch.setattr(merge, "_load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    setup(tmp_path / "out")
    (tmp_path / "adapter").mkdir()  # found before anything else (a missing one: test_cli_merge_checks_first.py)
    assert cli.main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank merge: error: ") and said in err and err.count("\n") == 1


def test_an_empty_out_or_overwrite_goes_on_to_load(tmp_path, monkeypatch):
    loaded = []

    def load(*args, **kwargs):
        loaded.append(args)
        raise ValueError("stop here")

    monkeypatch.setattr(merge, "_load_base", load)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for out, extra in (("empty", []), ("full", ["--overwrite"]), ("new", [])):
        assert cli.main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / out), *extra]) == 2
    assert len(loaded) == 3
