"""set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True)) into a QLoRA
model whose 4-bit layers are on the meta device (a model built to be filled by the load): torch
then loads with assign=True and adds the model's own parameters and buffers (packed, absmax, ...)
to the state dict by their names. The 4-bit layers recognised those as their own by identity, but
only after assign had put the checkpoint's tensors in their place, so every one was refused as
an unexpected key. They are now recognised before the load, and the model computes the saved
one's logits exactly (the same codes, scales and adapters)."""

from __future__ import annotations

import pytest
import torch

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # noqa: E402

from lowrank.quant.linear4bit import Stored4bit  # noqa: E402
from tests.distributed import dcp_4bit_worker as worker  # noqa: E402


def test_a_full_state_dict_fills_meta_4bit_layers():
    saved, fresh = worker.qlora(0), worker.qlora(1)
    layers = [m for m in fresh.modules() if isinstance(m, Stored4bit)]
    for m in layers:
        m.to("meta")
    result = set_model_state_dict(fresh, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(t.is_meta for m in layers for t in m.codec_tensors())
    torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)


def test_and_meta_4bit_experts():
    from tests.tuners import models

    import lowrank

    def qlora_moe():
        model = models.mixtral()
        lowrank.quantize(model, lowrank.NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"]))
        return model.eval()

    saved, fresh = qlora_moe(), qlora_moe()
    with torch.no_grad():  # models.mixtral() seeds itself: other dense weights, which the load must replace
        for p in fresh.parameters():
            if p.is_floating_point():
                p.add_(0.1)
    layers = [m for m in fresh.modules() if isinstance(m, Stored4bit)]
    assert any(type(m).__name__ == "Weight4bit" for m in layers)
    for m in layers:
        m.to("meta")
    result = set_model_state_dict(fresh, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    assert not result.missing_keys and not result.unexpected_keys
    ids = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(models.run(fresh, ids), models.run(saved, ids), rtol=0, atol=0)
