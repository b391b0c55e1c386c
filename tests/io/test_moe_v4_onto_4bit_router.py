"""A transformers 4 MoE LoRA file loaded onto a model whose router weight is 4-bit too
(NF4Config(parameters=[..., "gate.weight"])): the router's LoRA goes on its weight, as on a
dense router (lowrank/io_moe.py). It was taken for a module target instead (a 4-bit weight is no
entry of the module's _parameters), and the load failed: "cannot put LoRA on 'model.layers.0.
mlp.gate', a MixtralTopKRouter"."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import lowrank  # noqa: E402
from lowrank.quant.params4bit import Weight4bit  # noqa: E402
from tests.io.test_moe_v4_adapters import load_into_both, model, write_v4  # noqa: E402

PARAMETERS = ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_computes_as_on_the_dense_twin(kind, tmp_path, monkeypatch):
    """The twin holds each 4-bit tensor dequantized; on the dense path the two compute the same
    tensors with the same calls, so bit for bit."""
    monkeypatch.setenv("LOWRANK_EXPERTS", "dense")
    write_v4(tmp_path, kind)
    quantized, twin = model(kind).eval(), model(kind).eval()
    lowrank.quantize(quantized, lowrank.NF4Config(targets=None, parameters=PARAMETERS))
    assert isinstance(quantized.model.layers[0].mlp.gate._modules["weight"], Weight4bit)
    assert "model.layers.1.mlp.gate.weight" in load_into_both(quantized, twin, tmp_path).modules
