"""merge_and_export inside lowrank.disabled(model) or lowrank.per_sample(model, ...): no merged
weight computes what those forwards do, so it is refused with nothing written, as lowrank.merge
refuses it. It wrote the base weights inside disabled() and reported them in ExportResult.merged,
and inside per_sample() the sum of the active adapters, which no sample of the batch computes."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.export import merged_weight  # noqa: E402
from tests.tuners import models  # noqa: E402


def adapted():
    model = models.llama().eval()
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj"]), "a")
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj"]), "b")
    models.randomize_adapters(model)
    return model


@pytest.mark.parametrize("context", [lambda m: lowrank.disabled(m), lambda m: lowrank.per_sample(m, ["a", "b"])],
                         ids=["disabled", "per_sample"])
def test_export_inside_a_context_is_refused_with_nothing_written(context, tmp_path):
    model = adapted()
    before = copy.deepcopy(model.state_dict())
    with context(model):
        with pytest.raises(RuntimeError, match=r"cannot export inside lowrank\.disabled\(model\) or "
                                               r"lowrank\.per_sample\(model, \.\.\.\) \(at 'model\.layers\.0\.self_attn"
                                               r"\.q_proj'\).*export after it"):
            lowrank.merge_and_export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_after_the_context_the_active_adapter_is_merged(tmp_path):
    model = adapted()  # "b" is active
    with lowrank.disabled(model):
        pass
    result = lowrank.merge_and_export(model, tmp_path / "out")
    assert result.merged == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    written = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(written["model.layers.0.self_attn.q_proj.weight"], merged_weight(layer))  # what export merges
    assert not torch.equal(merged_weight(layer), layer.base.weight)
