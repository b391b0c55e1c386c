"""LoRA on a Mixtral's experts (3-D parameters, lowrank/tuners/lora_param.py) on 2 CPU ranks:
DDP and FSDP2 train it as one process does, bit for bit, and save what one process saves."""

import pytest

from . import cases
from .checks import frozen_problems, not_as_one_process, same_adapter_directory
from .conftest import result


@pytest.mark.parametrize("base", ["moe", "moe-nf4", "gpt_oss-nf4"])
@pytest.mark.parametrize("mode", cases.MODES)
def test_experts_train_as_one_process_and_save_the_same(ranks, reference, mode, base, tmp_path):
    """moe-nf4: the experts themselves in 4 bits (lowrank/quant/params4bit.py), their codes sharded
    by FSDP2 as a Linear4bit's are; gpt_oss-nf4: experts stored (E, in, out), routed through
    lowrank::nf4_linear_grad_input (lowrank/quant/experts4bit.py)."""
    model = reference("experts", base)
    rs = [result(ranks, rank, cases.case_name(mode, "experts", base)) for rank in range(cases.WORLD)]
    for r in rs:
        assert not_as_one_process(r, model) == []
        assert frozen_problems(r, model) == []
    assert any(".experts." in n for n in rs[0]["trained"])
    same_adapter_directory(rs[0]["saved"], model, tmp_path)
    if mode == "fsdp":  # loaded before fully_shard, sharded: the same outputs
        assert all(r["loaded_logits_equal"] for r in rs)
    if mode == "fsdp" and base.endswith("-nf4"):  # each rank holds half of the experts' codes
        packed = {n: s for n, s in rs[0]["shards"].items() if n.endswith("experts.base.base.gate_up_proj.packed")}
        assert packed and all(kind == "DTensor" and local * cases.WORLD == numel for kind, numel, local in packed.values())
