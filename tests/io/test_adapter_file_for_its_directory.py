"""load_adapter given the adapter's file (adapter_model.safetensors, adapter_config.json) instead
of its directory: the error names the directory to pass (it said the path was "neither a
directory nor a hub repo id"), and that directory loads. Nothing reaches the network."""

from __future__ import annotations

import re

import pytest
import torch

import lowrank
from tests.tuners import models


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_file_of_the_adapter_names_its_directory(file, tmp_path):
    tuned = models.mlp()
    lowrank.inject(tuned, lowrank.LoraConfig(r=2, targets=["0"]))
    models.randomize_adapters(tuned)
    lowrank.save_adapter(tuned, tmp_path / "adapter")
    model = models.mlp()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{file} is a file; an adapter is loaded from its directory "
                                                          f"({tmp_path / 'adapter'}, which holds")):
        lowrank.load_adapter(model, tmp_path / "adapter" / file)
    assert lowrank.adapter_names(model) == []
    lowrank.load_adapter(model, tmp_path / "adapter")
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(model(x), tuned(x))
