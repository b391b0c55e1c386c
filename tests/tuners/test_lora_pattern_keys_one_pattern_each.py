"""A rank_pattern / alpha_pattern key is one target pattern: first_match reads it as one spec. A
tuple key such as ("q_proj", "v_proj") (hashable, so a dict takes it) passed LoraConfig's checks,
which take a sequence of targets, and inject then failed with "a target must be str, ..." naming
neither the field nor the key's place; LoraConfig now refuses it, naming both."""

import pytest
from torch import nn

from lowrank import LoraConfig, inject


@pytest.mark.parametrize("field, value", [("rank_pattern", 2), ("alpha_pattern", 16.0)])
@pytest.mark.parametrize("key", [("0", "1"), frozenset({"0"})])
def test_a_key_of_several_patterns_is_refused_when_the_config_is_made(field, value, key):
    with pytest.raises(TypeError, match=rf"{field} key .* is a {type(key).__name__}; each key is one target pattern"):
        LoraConfig(targets=["0", "1"], **{field: {key: value}})


def test_one_entry_per_pattern_sets_each():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inject(model, LoraConfig(r=4, targets=["0", "1"], rank_pattern={"0": 2, "1": 2}))
    assert model[0].r["default"] == model[1].r["default"] == 2
