"""One bottleneck adapter injected part by part (an encoder's and a decoder's modules, with their
own targets, under one name) saves as one file and loads back whole: the file holds the exact
modules and one value of each other field. Its save was refused ("injected with several
configs") for configs that differed only in targets; configs whose other fields differ are still
refused, naming those fields."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.config import AdapterConfig  # noqa: E402
from tests.tuners import models  # noqa: E402


def t5():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=models.VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, dropout_rate=0.0)).eval()


def logits(model):
    ids = models.ids()
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids).logits


def test_parts_with_their_own_targets_save_and_load_as_one(tmp_path):
    model = t5()
    lowrank.inject(model.encoder, AdapterConfig(targets="DenseReluDense", scaling=2.0))
    lowrank.inject(model.decoder, AdapterConfig(targets="EncDecAttention", scaling=2.0))
    models.randomize_adapters(model)
    want = logits(model)
    lowrank.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["scaling"] == 2.0 and cfg["target_modules"] == [
        "encoder.block.0.layer.1.DenseReluDense", "encoder.block.1.layer.1.DenseReluDense",
        "decoder.block.0.layer.1.EncDecAttention", "decoder.block.1.layer.1.EncDecAttention"]
    other = t5()
    lowrank.load_adapter(other, tmp_path / "a")
    assert torch.equal(logits(other), want)


def test_parts_whose_other_fields_differ_are_refused_naming_them(tmp_path):
    model = t5()
    lowrank.inject(model.encoder, AdapterConfig(targets="DenseReluDense", scaling=2.0))
    lowrank.inject(model.decoder, AdapterConfig(targets="DenseReluDense", scaling=3.0, activation="gelu"))
    with pytest.raises(ValueError, match=r"bottleneck adapter 'default' was injected with configs whose "
                                         r"\['activation', 'scaling'\] differ .*'scaling': 2.0.*'scaling': 3.0"):
        lowrank.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_parts_that_differ_only_in_what_picks_default_targets_save_as_one(tmp_path):
    # placement chooses default targets only, and reduction_factor is unused beside a bottleneck_size: parts differing
    # in them compute what one config with the exact modules computes, and were refused
    model = t5()
    lowrank.inject(model.encoder, AdapterConfig(placement="houlsby", bottleneck_size=8, reduction_factor=4))
    lowrank.inject(model.decoder, AdapterConfig(placement="pfeiffer", bottleneck_size=8, reduction_factor=2))
    models.randomize_adapters(model)
    want = logits(model)
    lowrank.save_adapter(model, tmp_path / "a")
    other = t5()
    lowrank.load_adapter(other, tmp_path / "a")
    assert torch.equal(logits(other), want)
