"""A transformers 4 MoE LoRA file that adapts the experts and the router and no other module
(lowrank/io_moe.py): every module it targeted is gone (the experts fused into 3-D parameters)
or is LoRA on a parameter now (the router's weight), so its target_modules, a list of names or
PEFT's regular expression, are left matching no module. They were kept as module targets, and
inject refused the file ("no module matched targets"), which PEFT 0.21 loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

import lowrank  # noqa: E402
from tests.io.test_moe_v4_adapters import NAMES, model, write_v4  # noqa: E402


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("as_regex", [False, True], ids=["list", "regex"])
def test_loads_and_computes_as_peft(kind, as_regex, tmp_path):
    base = model(kind).eval()
    write_v4(tmp_path, kind)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".q_proj." not in k}, tmp_path / "adapter_model.safetensors")
    _, gate, up, down = NAMES[kind]
    targets = f".*\\.({gate}|{up}|{down}|gate)" if as_regex else [gate, up, down, "gate"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))

    ours = copy.deepcopy(base)
    result = lowrank.load_adapter(ours, tmp_path)
    assert sorted(result.modules) == sorted(f"model.layers.{i}.mlp.{p}" for i in (0, 1)
                                            for p in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = pm(ids).logits, ours(ids).logits
    assert not torch.equal(got, base(ids).logits)  # the adapter does something
    assert torch.equal(got, ref)
