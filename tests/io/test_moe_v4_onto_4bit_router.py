"""A transformers 4 MoE LoRA file loaded onto a model whose router weight is 4-bit too
(NF4Config(parameters=[..., "gate.weight"])): the router's LoRA goes on its weight, as on a
dense router (lowrank/io_moe.py). It was taken for a module target instead (a 4-bit weight is no
entry of the module's _parameters), and the load failed: "cannot put LoRA on 'model.layers.0.
mlp.gate', a MixtralTopKRouter"."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import lowrank  # noqa: E402
from lowrank.quant.params4bit import Weight4bit  # noqa: E402
from tests.io.test_moe_v4_adapters import model, write_v4  # noqa: E402

PARAMETERS = ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_computes_as_on_the_dense_twin(kind, tmp_path, monkeypatch):
    """The twin holds each 4-bit tensor dequantized; on the dense path the two compute the same
    tensors with the same calls, so bit for bit."""
    monkeypatch.setenv("LOWRANK_EXPERTS", "dense")
    write_v4(tmp_path, kind)
    quantized, twin = model(kind).eval(), model(kind).eval()
    lowrank.quantize(quantized, lowrank.NF4Config(targets=None, parameters=PARAMETERS))
    for name, m in quantized.named_modules():
        if isinstance(m, Weight4bit):
            owner, p = name.rsplit(".", 1)
            setattr(twin.get_submodule(owner), p, torch.nn.Parameter(m.dense(), requires_grad=False))
    assert isinstance(quantized.model.layers[0].mlp.gate._modules["weight"], Weight4bit)
    a, b = lowrank.load_adapter(quantized, tmp_path), lowrank.load_adapter(twin, tmp_path)
    assert a.modules == b.modules and "model.layers.1.mlp.gate.weight" in a.modules
    ours = {k: p for k, p in quantized.named_parameters() if "lora_" in k}
    theirs = {k: p for k, p in twin.named_parameters() if "lora_" in k}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, twin(ids).logits)
