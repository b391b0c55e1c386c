"""A torch.distributed.checkpoint (DCP) checkpoint of a QLoRA model saved before the quant-state
JSON was padded (or from bitsandbytes' own state dict): the bare JSON, whose length varies with
the double-quantization offset. DCP's default planner refuses it ("Size mismatch between saved
... and current ..."), before lowrank's code runs; lowrank.quant.dcp_planner.LoadPlanner4bit reads
it into the model's own tensors, padded, and the model loads the saved weights bit for bit (Note:
loading an unpadded quant state)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lowrank.quant.nf4_weight import BNB_QUANT_STATE_KEY
from tests.distributed import dcp_4bit_worker as worker

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

from lowrank.quant.dcp_planner import LoadPlanner4bit  # noqa: E402


def old_checkpoint(model, path) -> dict[str, int]:
    """dcp.save of `model`'s state dict with each quant state as bitsandbytes writes it, unpadded
    (json.dumps of the same content); its lengths, by key."""
    sd = model.state_dict()
    lengths = {}
    for key in [k for k in sd if k.endswith(BNB_QUANT_STATE_KEY)]:
        text = json.dumps(json.loads(bytes(sd[key].tolist()).decode()))
        sd[key] = torch.tensor(list(text.encode()), dtype=torch.uint8)
        lengths[key] = len(text)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: no group
        dcp.save(sd, checkpoint_id=path)
    return lengths


def load(sd, path, planner=None) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=path, planner=planner)


@pytest.mark.parametrize("flatten", [True, False])
def test_an_unpadded_checkpoint_loads_in_place_with_the_planner(tmp_path, flatten):
    saved, fresh = worker.qlora(0), worker.qlora(1)
    lengths = old_checkpoint(saved, tmp_path)
    sd = fresh.state_dict()
    assert any(lengths[k] < sd[k].numel() for k in lengths)  # the old checkpoint is what the default refuses
    with pytest.raises(CheckpointException, match="Size mismatch between saved"):  # DCP's ValueError, as it reports it
        load(fresh.state_dict(), tmp_path)

    own = {k: sd[k] for k in lengths}
    load(sd, tmp_path, LoadPlanner4bit(flatten_state_dict=flatten, flatten_sharded_tensors=flatten))
    assert all(sd[k] is own[k] for k in own)  # read into the state dict's own tensors, their length kept
    expect = saved.state_dict()  # the padded form, which the model writes: the same bytes
    assert sd.keys() == expect.keys() and all(torch.equal(sd[k], expect[k]) for k in sd)
    result = fresh.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)


def test_a_padded_checkpoint_loads_with_the_planner_as_without(tmp_path):
    saved, fresh = worker.qlora(0), worker.qlora(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(saved.state_dict(), checkpoint_id=tmp_path)
    sd = fresh.state_dict()
    load(sd, tmp_path, LoadPlanner4bit())
    result = fresh.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)


def test_an_unpadded_checkpoint_loads_into_a_sharded_model(tmp_path):
    from tests.distributed.test_full_state_dict_4bit import one_rank

    saved = worker.qlora(0)
    old_checkpoint(saved, tmp_path / "ckpt")
    with one_rank(tmp_path) as mesh:
        fresh = worker.load_sharded(tmp_path / "ckpt", mesh, LoadPlanner4bit())
        torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)
