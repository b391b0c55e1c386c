"""fold(model, name): a name that is no prefix adapter of the model raises, naming the ones it has
(it folded nothing and returned [] before, so a typo left the MLP in place silently); a plain
prefix has nothing to fold; the reparameterised one named is folded, the other left as it is."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.tuners.prefix import fold, layers

from . import models


def test_fold_by_name():
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2, projection_hidden=8), "mlp")
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2, projection_hidden=8), "mlp2")
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2), "plain")
    with pytest.raises(ValueError, match=r"no prefix adapter named 'mpl'; its prefix adapters: \['mlp', 'mlp2', 'plain'\]"):
        fold(model, "mpl")
    assert all("mlp" in layer.up for layer in layers(model, "mlp"))  # nothing changed
    assert fold(model, "plain") == []
    lowrank.set_active(model, "mlp")
    ids = models.ids()
    before = model(input_ids=ids).logits
    assert fold(model, "mlp") == ["mlp"]
    assert torch.equal(model(input_ids=ids).logits, before)  # the folded prefixes are the MLP's output
    assert all("mlp" in layer.kv and "mlp2" in layer.up for layer in layers(model, "mlp"))
