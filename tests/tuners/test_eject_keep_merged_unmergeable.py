"""eject(keep_merged=True) keeps what merge folded into the weights. An active bottleneck adapter
(non-linear: merge leaves it in the forward) was dropped with it silently, changing the model's
outputs, where an active LoRA adapter not merged is dropped with a warning; it now warns too."""

import warnings

import pytest
import torch
from torch import nn

from lowrank.config import AdapterConfig, LoraConfig
from lowrank.inject import eject, inject, mark_trainable, merge, set_active


def model_with_both():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    inject(model, AdapterConfig(targets=["2"], bottleneck_size=2), name="b")
    inject(model, LoraConfig(r=2, targets=["0"]), name="l")
    set_active(model, ["b", "l"])
    mark_trainable(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    return model


def test_an_active_bottleneck_adapter_dropped_by_keep_merged_is_said():
    model = model_with_both()
    x = torch.randn(2, 4)
    merge(model)
    with_both = model(x)
    with pytest.warns(UserWarning, match=r"eject\(keep_merged=True\) drops the active adapters \['b'\], which merge "
                                         r"cannot fold into the weights"):
        eject(model, keep_merged=True)
    assert not torch.allclose(model(x), with_both)  # what the warning is about: b's addition is gone


def test_nothing_said_where_it_is_kept_or_not_dropped():
    model = model_with_both()
    x = torch.randn(2, 4)
    merge(model)
    with_both = model(x)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        eject(model, "l", keep_merged=True)  # the merged LoRA alone: b stays
        kept = model(x)
        eject(model)  # no keep_merged: nothing is promised
    assert [str(w.message) for w in said] == []
    torch.testing.assert_close(kept, with_both)  # l's update stayed in the weight, b in the forward
