"""PEFT's save_pretrained writes an adapter that is not named "default" into a subdirectory of
its name (<dir>/<name>/adapter_config.json). load_adapter on <dir> must say where the adapter
is, and load from the subdirectory equal to PEFT."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from lowrank import io as lio  # noqa: E402
from lowrank.inject import adapter_names  # noqa: E402
from tests.tuners import models  # noqa: E402


def test_the_parent_directory_names_the_adapter_inside_it(tmp_path):
    base = models.llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                 adapter_name="sql")
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    assert (tmp_path / "p" / "sql" / "adapter_config.json").exists()  # PEFT's layout

    ours = copy.deepcopy(base)
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config\.json.*/p/sql'\] hold adapters"):
        lio.load_adapter(ours, tmp_path / "p", name="sql")
    assert adapter_names(ours) == []

    lio.load_adapter(ours, tmp_path / "p" / "sql", name="sql")
    with torch.no_grad():
        assert torch.equal(models.run(ours, models.ids()), models.run(theirs.eval(), models.ids()))


def test_a_directory_without_adapters_says_only_that(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        lio.load_adapter(models.mlp(), tmp_path / "empty")
    assert str(e.value) == f"{tmp_path / 'empty'} has no adapter_config.json: not an adapter directory"
