"""torch.distributed.checkpoint (DCP) of a QLoRA model quantized from bf16, loaded into one quantized
from float32 (the same codes and scales; the dtype is what they decode to, which the layers take
from the checkpoint). The quant-state JSON names the dtype, "bfloat16" being longer than "float32",
so DCP refused the entry ("Size mismatch between saved ... and current ...") even with
lowrank.quant.dcp_planner.LoadPlanner4bit, which took only shorter ones; it now reads a longer one
into a new tensor in the state dict's place, and the model loads as load_state_dict loads the same
checkpoint in one process: unsharded, and sharded by FSDP2."""

from __future__ import annotations

import warnings

import pytest
import torch

from . import dcp_4bit_worker as worker
from .test_full_state_dict_4bit import one_rank
from .test_full_state_dict_other_layout import checkpoint

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402

from lowrank.quant.dcp_planner import LoadPlanner4bit  # noqa: E402
from lowrank.quant.nf4_weight import BNB_QUANT_STATE_KEY  # noqa: E402


def test_a_bf16_checkpoint_loads_into_a_float32_model(tmp_path):
    sd = checkpoint(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: no group
        dcp.save(sd, checkpoint_id=tmp_path / "ckpt")
    one = worker.qlora(1)  # the same checkpoint, loaded in one process: the reference
    assert not one.load_state_dict(sd).missing_keys
    want = worker.logits(one)

    fresh = worker.qlora(1)
    into = fresh.state_dict()
    key = next(k for k in into if k.endswith(BNB_QUANT_STATE_KEY))
    assert sd[key].numel() > into[key].numel()  # "bfloat16": longer than the model's
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(into, checkpoint_id=tmp_path / "ckpt", planner=LoadPlanner4bit())
    assert torch.equal(into[key], sd[key])
    result = fresh.load_state_dict(into)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.model.layers[0].self_attn.q_proj.base.dtype == torch.bfloat16
    torch.testing.assert_close(worker.logits(fresh), want, rtol=0, atol=0)

    with one_rank(tmp_path) as mesh:
        fresh = worker.load_sharded(tmp_path / "ckpt", mesh, LoadPlanner4bit())
        torch.testing.assert_close(worker.logits(fresh), want, rtol=0, atol=0)
