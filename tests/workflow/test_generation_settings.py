"""The generation settings `lowrank chat` and `lowrank web` build from their options: refused when out of range,
before a model loads."""

import pytest
import torch

from lowrank.workflow.generate import Settings


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 1.5, True, "7"])
def test_a_seed_the_generator_cannot_take_is_refused(seed):
    # 2**64 passed, and then every chat message came back "(not answered: Overflow when unpacking long long)"
    with pytest.raises(ValueError, match=r"seed must be an integer from -2\*\*63 to 2\*\*64 - 1; got"):
        Settings(temperature=0.7, seed=seed)


@pytest.mark.parametrize("seed", [2**64 - 1, -2**63, 0])
def test_the_range_of_seeds_is_the_generators(seed):
    assert Settings(temperature=0.7, seed=seed).seed == seed
    assert torch.Generator().manual_seed(seed).initial_seed() == seed % 2**64  # what generate does with it
