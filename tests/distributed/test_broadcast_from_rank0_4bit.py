"""set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
into a QLoRA model sharded by FSDP2 on 2 gloo ranks, rank 0 holding the whole state dict and the
other ranks an empty one (the way to load a big checkpoint read once). torch broadcasts rank 0's
entries but keeps on the other ranks only those named like the model's parameters, so rank 1
never got the 4-bit weights and raised a missing-key error (Note: options torch matches by
parameter names, lowrank/quant/dsd.py). Each 4-bit layer now broadcasts its own entries, and
every rank keeps its part: the model computes the saved one's logits exactly, into live shards
and into meta ones (torch's assign=True); a weight rank 0 lacks is missing on every rank."""

from __future__ import annotations

import pytest
import torch

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

from . import dcp_4bit_worker as worker  # noqa: E402
from .spawn import run_ranks  # noqa: E402


def _broadcast(rank: int, world: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lowrank.quant.linear4bit import Stored4bit

    mesh = init_device_mesh("cpu", (world,))
    saved = worker.qlora(0)
    want = worker.logits(saved)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    found = {}
    for how in ("shards", "meta shards"):
        fresh = worker.qlora(1)
        layers = [m for m in fresh.modules() if isinstance(m, Stored4bit)]
        if how == "meta shards":
            for m in layers:
                m.to("meta")
        for layer in fresh.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(fresh, mesh=mesh)
        sd = saved.state_dict() if rank == 0 else {}
        result = set_model_state_dict(fresh, sd, options=options)
        assert not result.missing_keys and not result.unexpected_keys, (how, result)
        assert all(isinstance(m.packed, DTensor) and not m.packed.is_meta for m in layers), how  # FSDP2's shards
        got = worker.logits(fresh)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=how)
        found[how] = (len(layers), (got - want).abs().max().item())
    # a checkpoint without one 4-bit weight: every rank reports it missing (none waits for it), strict=True,
    # where torch leaves the weights rank 0 lacks out of what it loads (strict=False: kept, as a dense one)
    fresh = worker.qlora(1)
    fully_shard(fresh, mesh=mesh)
    key = "model.layers.0.self_attn.q_proj.base.weight"
    sd = {k: v for k, v in saved.state_dict().items() if not k.startswith(key)} if rank == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    try:
        set_model_state_dict(fresh, sd, options=options)
        raise AssertionError("a missing 4-bit weight loaded")
    except RuntimeError as e:
        assert f'Missing key(s) in state_dict: "{key}"' in str(e), e
    torch.save(found, f"{out}/rank{rank}.pt")  # what this rank checked, for the test to see every rank got here


def test_rank0s_full_state_dict_reaches_every_rank(tmp_path):
    run_ranks(_broadcast, 2, str(tmp_path), (str(tmp_path),))  # a rank's failed check fails the test
    checked = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(layers > 0 and diff == 0.0 for c in checked for layers, diff in c.values()), checked
