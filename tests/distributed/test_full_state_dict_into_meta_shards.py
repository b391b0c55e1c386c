"""set_model_state_dict(..., options=StateDictOptions(full_state_dict=True)) into a QLoRA model
sharded by FSDP2 whose 4-bit layers are on the meta device (a model the load is to fill): torch
loads with assign=True then, and the 4-bit layers took the whole tensors as plain parameters in
place of FSDP2's sharded ones, which FSDP2 could not take back ("'Parameter' object has no
attribute '_local_tensor'"). Each rank now keeps its part, sharded as the meta parameter was, as
torch distributes a parameter it assigns; the model computes the saved one's logits exactly."""

from __future__ import annotations

import pytest
import torch

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

from . import dcp_4bit_worker as worker  # noqa: E402
from .spawn import run_ranks  # noqa: E402


def _fill_meta_shards(rank: int, world: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lowrank.quant.linear4bit import Stored4bit

    mesh = init_device_mesh("cpu", (world,))
    saved, fresh = worker.qlora(0), worker.qlora(1)
    want = worker.logits(saved)
    layers = [m for m in fresh.modules() if isinstance(m, Stored4bit)]
    for m in layers:
        m.to("meta")
    for layer in fresh.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    result = set_model_state_dict(fresh, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    assert not result.missing_keys and not result.unexpected_keys
    for m in layers:  # FSDP2's again: each rank its shard of the whole tensor
        for f in ("packed", "absmax", "nested_absmax"):
            p = getattr(m, f)
            assert isinstance(p, DTensor) and not p.is_meta, f
            whole = saved.get_submodule(next(n for n, x in fresh.named_modules() if x is m)).__getattr__(f)
            assert torch.equal(p.full_tensor(), whole), f
    got = worker.logits(fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # what this rank checked, for the test to see that every rank got this far
    torch.save({"layers": len(layers), "max_diff": (got - want).abs().max().item()}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("world", [1, 2])
def test_a_full_state_dict_fills_meta_4bit_shards(tmp_path, world):
    run_ranks(_fill_meta_shards, world, str(tmp_path), (str(tmp_path),))  # a rank's failed check fails the test
    checked = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(c["layers"] > 0 and c["max_diff"] == 0.0 for c in checked), checked
