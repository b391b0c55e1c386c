"""set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True) into a model with 4-bit
parameters (Weight4bit: transformers 5 experts), sharded by FSDP2 on 2 gloo ranks. A 4-bit
parameter's entries `P.absmax` and `P.nested_absmax` have the names of its own integer parameters,
so torch treats them as those parameters and copies rank 0's float32 scales into them as numbers:
the values are lost before lowrank's code runs. It failed inside a DTensor broadcast
("Operator c10d.broadcast_.default does not have a sharding strategy registered"); it is now a load
error on every rank that names the parameter, the cause and what to do (full_state_dict=True with
the state dict on every rank, which loads it: tested here too)."""

from __future__ import annotations

import pytest
import torch

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

from . import dcp_4bit_worker as worker  # noqa: E402
from .spawn import run_ranks  # noqa: E402


def _load(rank: int, world: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    saved = worker.experts4bit(0)

    def sharded():
        model = worker.experts4bit(1)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    fresh = sharded()
    try:
        set_model_state_dict(fresh, saved.state_dict() if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        message = ""
    except RuntimeError as e:
        message = str(e)
    fresh = sharded()  # the remedy the message names
    result = set_model_state_dict(fresh, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    assert not result.missing_keys and not result.unexpected_keys
    diff = (worker.logits(fresh) - worker.logits(saved)).abs().max().item()
    torch.save({"message": message, "max_diff": diff}, f"{out}/rank{rank}.pt")


def test_4bit_parameters_refuse_a_broadcast_with_what_to_do(tmp_path):
    run_ranks(_load, 2, str(tmp_path), (str(tmp_path),))  # a rank's failed check fails the test
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        msg = found["message"]
        assert "while loading the 4-bit parameter 'model.layers.0.mlp.experts.gate_up_proj'" in msg, (rank, msg)
        assert "'model.layers.0.mlp.experts.gate_up_proj.absmax' (and .nested_absmax) have the names of its own" in msg
        assert "load with full_state_dict=True and the state dict on every rank" in msg
        assert "sharding strategy" not in msg
        assert found["max_diff"] == 0.0, rank
