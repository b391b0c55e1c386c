"""save_adapter, load_adapter and push_adapter given something else than a model (arguments
swapped, a state dict) or than a path: a TypeError naming the function and what it got, before
anything is read, written or sent (they failed with "'str' object has no attribute 'modules'",
as merge_and_export did before it said so: tests/io/test_export_cases.py)."""

from __future__ import annotations

import pytest

import lowrank
from lowrank import io as lio
from tests.tuners import models


@pytest.fixture
def saved(tmp_path):
    model = models.mlp()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["0"]))
    lio.save_adapter(model, tmp_path / "a")
    return model, tmp_path / "a"


def test_a_model_that_is_no_module_is_named(saved, tmp_path):
    model, path = saved
    with pytest.raises(TypeError, match=r"^save_adapter takes an nn.Module \(the model\); got str$"):
        lio.save_adapter(str(tmp_path / "b"), model)  # swapped
    with pytest.raises(TypeError, match=r"^load_adapter takes an nn.Module \(the model\); got str$"):
        lio.load_adapter(str(path), models.mlp())  # swapped
    with pytest.raises(TypeError, match=r"^load_adapter takes an nn.Module \(the model\); got OrderedDict$"):
        lio.load_adapter(models.mlp().state_dict(), path)
    with pytest.raises(TypeError, match=r"^push_adapter takes an nn.Module \(the model\); got str$"):
        lowrank.push_adapter("me/adapter", model)  # swapped: refused before huggingface_hub is asked anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("path", [None, 3])
def test_a_path_that_is_no_path_is_named(saved, path):
    model, _ = saved
    with pytest.raises(TypeError, match=rf"^path must be a directory, a str or os.PathLike; got \w+ {path}$"):
        lio.save_adapter(model, path)
    fresh = models.mlp()
    with pytest.raises(TypeError, match=rf"^path must be a directory or a hub repo id \('owner/name'\), a str or "
                                        rf"os.PathLike; got \w+ {path}$"):
        lio.load_adapter(fresh, path)
    assert lowrank.adapter_names(fresh) == []
