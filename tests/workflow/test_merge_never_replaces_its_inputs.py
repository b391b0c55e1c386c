"""`lowrank merge BASE ADAPTER OUT --overwrite` replaces OUT whole: with OUT the directory that
holds BASE (`models` for `models/llama`), or BASE or ADAPTER itself, the merge read them and
then deleted them with the old OUT. Such an OUT is refused before anything loads."""

import pytest

from lowrank import cli, inject, save_adapter
from lowrank.commands import merge
from lowrank.config import LoraConfig

from . import tiny


@pytest.fixture
def models(tmp_path):
    import transformers

    base = tiny.build(tmp_path / "models" / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    inject(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "models" / "adapter")
    return tmp_path / "models"


@pytest.mark.parametrize("out, what", [(".", "a directory holding BASE"), ("base", "BASE"), ("adapter", "ADAPTER")])
def test_an_out_that_is_or_holds_an_input_is_refused(models, capsys, monkeypatch, out, what):
    before = {p: p.read_bytes() for p in models.rglob("*") if p.is_file()}
    monkeypatch.setattr(merge, "_load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    capsys.readouterr()
    out = models / out
    assert cli.main(["merge", str(models / "base"), str(models / "adapter"), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowrank merge: error: OUT {str(out)!r} is {what} ") and "would delete it" in err
    assert {p: p.read_bytes() for p in models.rglob("*") if p.is_file()} == before


def test_an_out_beside_the_inputs_is_written(models):
    assert cli.main(["merge", str(models / "base"), str(models / "adapter"), str(models / "merged")]) == 0
    assert (models / "merged" / "config.json").is_file() and (models / "base" / "config.json").is_file()
