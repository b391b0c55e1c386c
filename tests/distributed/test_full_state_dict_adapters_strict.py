"""set_model_state_dict(model, adapters, options=StateDictOptions(full_state_dict=True)) with the
adapters alone (get_model_state_dict(ignore_frozen_params=True, full_state_dict=True)) and torch's
default strict=True. torch fills what a full state dict lacks from the model itself, each tensor
at its parameter's name, so on a dense base it loads; a 4-bit layer, finding its own storage at
those names (`base.packed`, ...) and not its bitsandbytes entries, reported `base.weight` missing
and the load raised. It now keeps its values, as the dense layer does: in one process and in a
model sharded by FSDP2."""

from __future__ import annotations

import pytest
import torch

from . import dcp_4bit_worker as worker
from .test_full_state_dict_4bit import FULL, one_rank
from .test_ignore_frozen_params_4bit import dense_lora, other_adapters

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

ADAPTERS_FULL = StateDictOptions(ignore_frozen_params=True, full_state_dict=True)


@pytest.mark.parametrize("build", [dense_lora, worker.qlora], ids=["dense", "4-bit"])
def test_the_adapters_alone_load_strictly_as_on_a_dense_base(build):
    saved = build(0)
    adapters = get_model_state_dict(saved, options=ADAPTERS_FULL)
    fresh = other_adapters(build(0), 1)
    result = set_model_state_dict(fresh, adapters, options=FULL)  # strict=True
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)


def test_the_adapters_alone_load_strictly_into_a_sharded_model(tmp_path):
    from torch.distributed.fsdp import fully_shard

    saved = worker.qlora(0)
    adapters = get_model_state_dict(saved, options=ADAPTERS_FULL)
    with one_rank(tmp_path) as mesh:
        fresh = other_adapters(worker.qlora(0), 1)
        for layer in fresh.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(fresh, mesh=mesh)
        base = fresh.model.layers[0].self_attn.q_proj.base
        before = base.packed.full_tensor().clone()
        result = set_model_state_dict(fresh, adapters, options=FULL)
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(base.packed.full_tensor(), before)  # the base kept as it was
        torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)
