"""The seed bound is the one its message states: the last epoch's data-order generator takes
seed * 1000003 + (epochs - 1) (workflow/batches.py), which must be at most 2**64 - 1. The check
counted one epoch too many, so the largest seed the message allowed was refused."""

import pytest

from lowrank.workflow.config import ConfigError, TrainConfig


# 2**64 % 1000003 epochs: the largest seed then meets 2**64 exactly, where the old check was off by one
@pytest.mark.parametrize("epochs", [1, 3, 2**64 % 1_000_003, 2**64 % 1_000_003 + 1_000_003])
def test_the_largest_allowed_seed_is_taken_and_the_next_is_not(epochs):
    largest = (2**64 - epochs) // 1_000_003  # seed * 1000003 + epochs - 1 <= 2**64 - 1
    config = TrainConfig(model="m", data="d", output_dir="o", epochs=epochs, seed=largest)
    assert config.seed * 1_000_003 + config.epochs - 1 <= 2**64 - 1
    with pytest.raises(ConfigError, match=rf"seed must be below {largest + 1} "):
        TrainConfig(model="m", data="d", output_dir="o", epochs=epochs, seed=largest + 1)
