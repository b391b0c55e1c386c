"""load_state_dict of a sharded state dict (a model's own, as torch.distributed.checkpoint.load
fills it, or another sharded model's) into a QLoRA model sharded by FSDP2 writes into the shards
the layers hold, as it does unsharded (tests/quant/test_load_state_dict_in_place.py). It made new
parameters for every 4-bit field, which FSDP2 then padded into new storage: the 4-bit model's
memory twice over for the load, on every rank."""

from __future__ import annotations

import pytest
import torch

from . import dcp_4bit_worker as worker
from .test_full_state_dict_4bit import one_rank

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)


def test_a_sharded_state_dict_loads_into_the_shards(tmp_path):
    from torch.distributed.fsdp import fully_shard

    with one_rank(tmp_path) as mesh:
        models = [worker.qlora(0), worker.qlora(1)]
        want = worker.logits(models[0])
        for model in models:
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        saved, fresh = models
        layers = [m.base for n, m in fresh.named_modules() if n.endswith("proj") and hasattr(m, "base")]
        before = [(layer.packed, layer.absmax, layer.nested_absmax) for layer in layers]
        storage = [t.to_local().untyped_storage().data_ptr() for ts in before for t in ts]
        result = fresh.load_state_dict(saved.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
        after = [(layer.packed, layer.absmax, layer.nested_absmax) for layer in layers]
        assert all(a is b for x, y in zip(before, after) for a, b in zip(x, y))  # the same parameters
        assert [t.to_local().untyped_storage().data_ptr() for ts in after for t in ts] == storage  # the same memory
        torch.testing.assert_close(worker.logits(fresh), want, rtol=0, atol=0)
