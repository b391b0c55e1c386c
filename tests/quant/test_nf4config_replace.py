"""NF4Config round trips through dataclasses.replace."""

import dataclasses

import pytest

import lowrank


def test_an_experts_only_config_rebuilds_through_dataclasses_replace():
    """NF4Config(targets=None, parameters=...) stores targets=(); dataclasses.replace runs
    __post_init__ again on it, which used to refuse the empty targets."""
    config = lowrank.NF4Config(targets=None, parameters=["experts.gate_up_proj"])
    again = dataclasses.replace(config, blocksize=128)
    assert again.targets == () and again.parameters == ("experts.gate_up_proj",) and again.blocksize == 128
    with pytest.raises(ValueError, match="targets is empty"):  # without parameters an empty list still names nothing
        lowrank.NF4Config(targets=[])
