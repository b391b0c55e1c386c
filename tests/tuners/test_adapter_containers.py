"""Bottleneck adapters on containers: an nn.ModuleList or nn.ModuleDict is indexed or iterated
by its owner, never called, so an adapter layer in its place broke the model's forward
("'AdapterLayer' object is not subscriptable"); inject refuses it, changing nothing, and does
not suggest containers (or whole transformers models) when nothing matched."""

import ast

import pytest
import torch
from torch import nn

from lowrank.config import AdapterConfig
from lowrank.inject import adapter_names, inject

from . import models


def test_a_module_list_target_is_refused_at_inject():
    model = models.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="cannot put a bottleneck adapter on 'model.layers': a ModuleList is a "
                                        "container its owner indexes or iterates, never calls"):
        inject(model, AdapterConfig(targets="layers"))
    assert adapter_names(model) == [] and type(model.model.layers) is nn.ModuleList
    assert model.state_dict().keys() == before.keys()
    model(models.ids())  # the forward still runs


def test_a_module_dict_target_is_refused_at_inject():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 4)})

        def forward(self, x):
            return self.heads["a"](x)

    holder = Holder()
    with pytest.raises(TypeError, match="'heads': a ModuleDict is a container"):
        inject(holder, AdapterConfig(targets="heads"))
    assert type(holder.heads) is nn.ModuleDict
    # the module inside it is taken, and runs
    assert inject(holder, AdapterConfig(targets="heads.a")) == ["heads.a"]
    x = torch.randn(2, 4)
    assert holder(x).shape == (2, 4)


def test_nothing_matched_suggests_only_what_inject_takes():
    model = models.llama()
    with pytest.raises(ValueError, match="no module of") as info:
        inject(model, AdapterConfig(targets="no_such_module"))
    suggested = ast.literal_eval(str(info.value).split("can wrap e.g. ")[1].split(" (")[0])  # the listed names
    assert suggested and "model.layers" not in suggested and "model" not in suggested
    assert all(n.startswith("model.layers.") or n == "lm_head" for n in suggested)


def test_a_container_given_a_forward_of_its_own_is_taken():
    """A module list whose instance has a forward (assigned, as some libraries patch modules) is called."""
    blocks = nn.ModuleList([nn.Linear(4, 4)])
    blocks.forward = lambda x: blocks[0](x) * 2  # reads the list it was given, not the model's attribute
    holder = nn.ModuleDict({"blocks": blocks})
    x = torch.randn(2, 4)
    want = holder["blocks"](x)
    assert inject(holder, AdapterConfig(targets="blocks")) == ["blocks"]
    assert torch.equal(holder["blocks"](x), want)  # up = 0: the adapter adds nothing yet
