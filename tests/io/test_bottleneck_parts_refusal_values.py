"""save_adapter refuses a bottleneck adapter whose parts were injected with configs that compute
differently, naming the fields that differ and listing each part's values. Since 4440a54 the
parts are told apart by what they compute, placement (and reduction_factor beside a
bottleneck_size) set to None in that key, and the refusal printed the key: 'placement': None,
'reduction_factor': None, values no part was given. It lists the values the parts were given."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.config import AdapterConfig  # noqa: E402
from tests.tuners import models  # noqa: E402


def test_the_refusal_lists_the_values_each_part_was_given(tmp_path):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=models.VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, dropout_rate=0.0)).eval()
    lowrank.inject(model.encoder, AdapterConfig(placement="houlsby", bottleneck_size=8, reduction_factor=4))
    lowrank.inject(model.decoder, AdapterConfig(placement="pfeiffer", bottleneck_size=8, activation="gelu"))
    with pytest.raises(ValueError, match=r"configs whose \['activation'\] differ") as e:
        lowrank.save_adapter(model, tmp_path / "a")
    message = str(e.value)
    assert "'placement': 'houlsby'" in message and "'placement': 'pfeiffer'" in message
    assert "'reduction_factor': 4" in message and "'reduction_factor': 16" in message  # 16: the default
    assert "None" not in message  # no part set a field to None
    assert not (tmp_path / "a").exists()
