"""inject on a lone layer (the model is itself the one module to adapt) said only that no module
matched, listing no candidates; inject replaces modules in their parent, so it says that, and how
to get one. A container that merely holds nothing adaptable is not told so."""

import pytest
import torch
from torch import nn

from lowrank.config import AdapterConfig, LoraConfig
from lowrank.inject import adapter_names, inject

HINT = "inject replaces modules inside the model, never the model itself: put a lone layer in a container"


@pytest.mark.parametrize("config", [LoraConfig(r=2, targets=nn.Linear), AdapterConfig(targets="all-linear")])
def test_a_lone_layer_is_told_to_go_in_a_container(config):
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"no module of Linear matched .* \(0 candidates in all\); " + HINT):
        inject(layer, config)
    assert adapter_names(layer) == []
    model = nn.Sequential(layer)  # as the message says: now it is a module inside the model
    assert inject(model, config) == ["0"]
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_no_hint_where_the_model_has_modules_or_cannot_be_wrapped():
    with pytest.raises(ValueError, match=r"\(1 candidates in all\)$"):
        inject(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, targets="nothing"))
    with pytest.raises(ValueError, match=r"\(0 candidates in all\)$"):
        inject(nn.ReLU(), LoraConfig(r=2, targets="nothing"))
