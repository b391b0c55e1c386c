"""DistributedDataParallel, 2 CPU ranks (gloo): training equals one process on the global batch."""

import pathlib

import pytest
import torch

from . import cases
from .checks import frozen_problems, not_as_one_process, same_adapter_directory
from .conftest import result


@pytest.mark.parametrize("base", cases.BASES)
@pytest.mark.parametrize("config", cases.CONFIGS)
def test_ddp_trains_as_one_process(ranks, reference, config, base):
    model = reference(config, base)
    for rank in range(cases.WORLD):
        r = result(ranks, rank, cases.case_name("ddp", config, base))
        assert not_as_one_process(r, model) == []
        assert frozen_problems(r, model) == []


@pytest.mark.parametrize("base", cases.BASES)
@pytest.mark.parametrize("config", [c for c in cases.CONFIGS if cases.savable(cases.CONFIGS[c])])
def test_ddp_rank0_saves_what_one_process_saves(ranks, reference, config, base, tmp_path):
    # See Note: saving from several ranks (lowrank/distributed.py): rank 0 alone writes, with
    # no collective, so the usual `if rank == 0: save_adapter(...)` cannot hang
    r0, r1 = (result(ranks, rank, cases.case_name("ddp", config, base)) for rank in range(cases.WORLD))
    assert not r1["rank_wrote"] and not pathlib.Path(r1["saved"] + "-rank1").exists()
    same_adapter_directory(r0["saved"], reference(config, base), tmp_path)


def test_ddp_with_8bit_optimizer_states_trains_as_one_process(ranks):
    """lowrank.AdamW8bit (every adapter tensor in 8 bits) under DDP: both ranks' adapters equal,
    bit for bit, the one-process run with the same optimizer (Note: the same arithmetic as one
    process; the 8-bit update is deterministic given the gradients)."""
    model = cases.train_single("lora", "nf4", cases.adamw_8bit)
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for rank in range(cases.WORLD):
        r = result(ranks, rank, "ddp-lora-nf4-adamw8bit")
        assert r["state_dtypes"] == ["torch.uint8"]
        assert r["trained"].keys() == want.keys()
        for name, t in r["trained"].items():
            assert torch.equal(t, want[name]), name
