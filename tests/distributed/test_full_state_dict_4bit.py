"""set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True)) into a QLoRA
model: whole tensors, as one process's state_dict() or get_model_state_dict(full_state_dict=True)
gives them, loaded into a model sharded by FSDP2 or not. It refused the load: torch adds the
model's own parameters and buffers to the state dict by their names (the 4-bit layers' packed,
absmax, ...), which the layers reported as unexpected keys; and under FSDP2 the layers took
the whole tensors as new parameters, which FSDP2 cannot shard ("'Parameter' object has no
attribute '_local_tensor'"). Each rank now copies its part into its shards. (Two ranks: the
torchrun test in test_dcp_4bit.py.)"""

from __future__ import annotations

import contextlib
import datetime

import pytest
import torch

from . import dcp_4bit_worker as worker

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

FULL = StateDictOptions(full_state_dict=True)


@contextlib.contextmanager
def one_rank(tmp_path):
    """A gloo group of one process, and its 1-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_full_state_dict_loads_into_a_qlora_model():
    saved, fresh = worker.qlora(0), worker.qlora(1)
    result = set_model_state_dict(fresh, saved.state_dict(), options=FULL)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)


def test_a_full_state_dict_loads_into_a_sharded_qlora_model_in_place(tmp_path):
    from torch.distributed.fsdp import fully_shard

    saved = worker.qlora(0)
    with one_rank(tmp_path) as mesh:
        fresh = worker.qlora(1)
        for layer in fresh.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(fresh, mesh=mesh)
        layer = fresh.model.layers[0].self_attn.q_proj.base
        packed = layer.packed
        result = set_model_state_dict(fresh, saved.state_dict(), options=FULL)
        assert not result.missing_keys and not result.unexpected_keys
        assert layer.packed is packed  # written into the shards FSDP2 holds
        torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)
        full = get_model_state_dict(fresh, options=FULL)  # and gathered back: the saved model's state dict
        expect = saved.state_dict()
        assert full.keys() == expect.keys() and all(torch.equal(full[k], expect[k]) for k in full)
