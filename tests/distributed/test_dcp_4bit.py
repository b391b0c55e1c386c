"""torch.distributed.checkpoint.state_dict's get_model_state_dict / set_model_state_dict on a
QLoRA model, in one process and sharded by FSDP2 on 2 gloo ranks under torchrun. They raised
AttributeError ("'NF4Weight' object has no attribute 'quant_map'"): torch walks each state-dict
key as attributes from the model, and bitsandbytes' 4-bit keys are no attributes (Note:
state-dict keys as attribute paths, lowrank/quant/linear4bit.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from . import dcp_4bit_worker as worker
from .spawn import torchrun

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict  # noqa: E402

DEADLINE_S = 180  # a hung rank fails the test instead of blocking CI


def round_trip(saved, fresh, path) -> None:
    """dcp.save(get_model_state_dict(saved)), then load it into `fresh` through set_model_state_dict."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: no group
        dcp.save(get_model_state_dict(saved), checkpoint_id=path)
        sd = get_model_state_dict(fresh)
        dcp.load(sd, checkpoint_id=path)
    result = set_model_state_dict(fresh, sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert sd.keys() == saved.state_dict().keys()  # bitsandbytes' keys, as state_dict() writes them


def test_get_and_set_model_state_dict_round_trip_in_one_process(tmp_path):
    saved, fresh = worker.qlora(0), worker.qlora(1)
    round_trip(saved, fresh, tmp_path)
    torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)


def test_4bit_parameters_of_experts_round_trip_too(tmp_path):
    saved, fresh = worker.experts4bit(0), worker.experts4bit(1)
    assert any(k.endswith("experts.gate_up_proj.quant_map") for k in saved.state_dict())  # a Weight4bit's keys
    round_trip(saved, fresh, tmp_path)
    torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)


def test_a_sharded_qlora_model_round_trips_under_torchrun(tmp_path):
    torchrun(["-m", "tests.distributed.dcp_4bit_worker", str(tmp_path)], cwd=tmp_path, deadline_s=DEADLINE_S,
             env={"OMP_NUM_THREADS": "1"})  # See Note: one thread (tests/distributed/cases.py)
    want = worker.logits(worker.qlora(0))  # the saved model, in one process
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        assert found["dsd_keys"] == [] and found["plain_keys"] == [] and found["full_keys"] == []
        for how in ("saved", "dsd", "plain", "full"):  # FSDP2 gathers the same bits: the same kernels, the same logits
            torch.testing.assert_close(found[how], want, rtol=0, atol=0, msg=f"rank {rank}, {how}")

    # what the 2 ranks saved, each its shards, loads into one process (DCP reshards)
    for how in ("dsd", "plain"):
        one = worker.qlora(5)
        sd = one.state_dict()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=tmp_path / how)
        result = one.load_state_dict(sd)
        assert not result.missing_keys and not result.unexpected_keys
        torch.testing.assert_close(worker.logits(one), want, rtol=0, atol=0, msg=how)
