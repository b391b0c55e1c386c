"""A bottleneck adapter that does not fit the model, or whose config holds a bad value, is
refused naming the adapter_config.json it came from, as a LoRA file's refusals are (the message
said only that no module matched, or that scaling must be a number, not which file said so)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.config import AdapterConfig  # noqa: E402
from tests.tuners import models  # noqa: E402


@pytest.fixture
def saved(tmp_path):
    model = models.llama()
    lowrank.inject(model, AdapterConfig())
    return lowrank.save_adapter(model, tmp_path / "a")


def test_another_models_modules_are_refused_naming_the_file(saved):
    gpt2 = models.gpt2()
    cfg_file = str(saved / "adapter_config.json")
    with pytest.raises(ValueError) as info:
        lowrank.load_adapter(gpt2, saved)
    assert str(info.value).startswith(f"{cfg_file}: cannot load this adapter: no module of GPT2LMHeadModel matched")
    assert lowrank.adapter_names(gpt2) == []


@pytest.mark.parametrize("field, value, message", [
    ("scaling", "big", "scaling must be a finite number; got 'big'"),
    ("placement", "middle", "placement must be one of"),
    ("bottleneck_size", 0, "bottleneck_size must be None or an integer >= 1; got 0"),
])
def test_a_bad_config_value_is_refused_naming_the_file(saved, field, value, message):
    cfg_file = saved / "adapter_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {field: value}))
    model = models.llama()
    with pytest.raises(ValueError) as info:
        lowrank.load_adapter(model, saved)
    assert str(info.value).startswith(f"{cfg_file}: {message}")
    assert lowrank.adapter_names(model) == []
