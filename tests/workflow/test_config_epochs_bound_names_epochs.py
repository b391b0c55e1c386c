"""An `epochs` of 2**64 or more was refused as "seed must be below -1162141390219531 ...; got 0":
the wrong field, and a bound no seed can meet. The error names epochs now."""

import pytest

from lowrank.workflow.config import ConfigError, from_mapping

BASE = {"model": "m", "data": "d", "output_dir": "o"}


def test_too_many_epochs_is_an_error_about_epochs():
    with pytest.raises(ConfigError, match=r"^c\.yaml: epochs must be below 2\*\*64 .*; got 18446744073709551616$"):
        from_mapping({**BASE, "epochs": 2**64}, "c.yaml")


def test_the_seed_bound_still_names_the_seed():
    with pytest.raises(ConfigError, match=r"^c\.yaml: seed must be below \d+ "):
        from_mapping({**BASE, "seed": 2**60}, "c.yaml")
    from_mapping({**BASE, "epochs": 2**40}, "c.yaml")  # large, but the generator seed fits
