"""A PEFT adapter trained with VeLoRA (velora_config): VeLoRA swaps in a backward pass that keeps
compressed activations and leaves the forward LoRA's, so lowrank loads it as plain LoRA with
outputs equal to PEFT's, bit for bit. Its file holds a projection per layer for that backward
(`...lora_velora_embed`), which load_adapter refused as unexpected keys."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
velora = pytest.importorskip("peft.tuners.lora.config")
if not hasattr(velora, "VeloraConfig"):
    pytest.skip("this PEFT has no VeLoRA", allow_module_level=True)

from lowrank import io as lio  # noqa: E402
from tests.tuners import models  # noqa: E402


def test_a_velora_adapter_loads_as_lora_with_peft_outputs(tmp_path):
    base = models.llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       velora_config=velora.VeloraConfig()))
    models.randomize_adapters(theirs)
    theirs.train()
    models.run(theirs, models.ids()).sum().backward()  # a training step's forward sets VeLoRA's projection
    theirs.save_pretrained(str(tmp_path / "p"))
    assert any(k.endswith("lora_velora_embed") for k in peft.utils.load_peft_weights(str(tmp_path / "p")))

    ours = copy.deepcopy(base)
    result = lio.load_adapter(ours, tmp_path / "p")
    assert len(result.modules) == 4 and result.missing == result.unexpected == result.mismatched == []
    with torch.no_grad():
        want = models.run(theirs.eval(), models.ids())
        assert torch.equal(models.run(ours, models.ids()), want)
        assert not torch.equal(models.run(base, models.ids()), want)  # the adapter does something
