"""Under get_model_state_dict(ignore_frozen_params=True) a 4-bit layer writes its frozen storage at
its own parameter names for torch to pop (lowrank/quant/dsd.py, Note: options torch matches by
parameter names). It wrote the Parameters themselves whatever keep_vars said; torch's
state_dict() (keep_vars=False) writes detached tensors. Seen where torch's pop leaves an entry:
a module held under two names (named_parameters names it once), whose dense twin comes out as a
detached tensor. Now the 4-bit entries are detached too, and keep_vars=True still gives the
Parameters."""

import pytest
import torch
from torch import nn

import lowrank

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402


class Shared(nn.Module):
    """`a` under a second name `b` (as a tied module is)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = self.a
        self.c = nn.Linear(64, 64)


def adapted(quantized: bool) -> nn.Module:
    torch.manual_seed(0)
    model = Shared()
    if quantized:
        lowrank.quantize(model, lowrank.NF4Config())
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["c"]))
    return model


def test_entries_torch_leaves_are_detached_as_a_dense_base_s():
    opts = StateDictOptions(ignore_frozen_params=True)
    dense = get_model_state_dict(adapted(False), options=opts)
    assert not isinstance(dense["b.weight"], nn.Parameter)  # torch's own: what a 4-bit base matches
    model = adapted(True)
    sd = get_model_state_dict(model, options=opts)
    left = {k: v for k, v in sd.items() if k.startswith("b.") and k != "b.bias"}
    assert sorted(left) == ["b.absmax", "b.nested_absmax", "b.packed"]
    for k, v in left.items():
        assert type(v) is torch.Tensor, k
        assert v.data_ptr() == getattr(model.a, k[2:]).data_ptr()  # the storage itself, no copy
    assert sorted(k for k in sd if k.startswith("c.")) == ["c.lora_A.default.weight", "c.lora_B.default.weight"]


def test_keep_vars_true_still_writes_the_parameters(monkeypatch):
    from lowrank.quant import dsd

    model = adapted(True)
    monkeypatch.setattr(dsd, "ignoring_frozen_params", lambda: True)  # as inside that call
    sd = model.state_dict(keep_vars=True)
    assert all(sd[f"a.{f}"] is getattr(model.a, f) for f in ("packed", "absmax", "nested_absmax"))
