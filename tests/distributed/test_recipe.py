"""The FSDP2 recipe in docs/distributed.md runs, as written, under torchrun on 2 CPU ranks."""

import pathlib
import re

import torch

from lowrank import load_adapter

from .spawn import torchrun

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEADLINE_S = 180  # a hung rank fails the test instead of blocking CI


def recipe() -> str:
    page = (ROOT / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"^```python fragment\n(# fsdp_qlora\.py.*?)^```", page, re.S | re.M)
    assert len(blocks) == 1, "docs/distributed.md should hold one block starting '# fsdp_qlora.py'"
    return blocks[0]


def test_the_recipe_trains_under_torchrun_and_its_adapter_loads(tmp_path):
    script, out = tmp_path / "fsdp_qlora.py", tmp_path / "adapter"
    script.write_text(recipe())
    log = torchrun([str(script), "--out", str(out), "--steps", "3"], cwd=tmp_path, deadline_s=DEADLINE_S)
    assert "step 2: loss" in log and f"adapter written to {out}" in log

    # the adapter rank 0 wrote loads into the recipe's model in one process and is not the identity
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    result = load_adapter(model, out)
    assert len(result.modules) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
