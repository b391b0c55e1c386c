"""A .py config defining `config` next to module-level fields is refused only when a field would
really be ignored. The check compared the raw names with config's values, so a TrainConfig built
from helper variables was refused when TrainConfig itself normalized them: `adapter_dtype = None`
on a float16 base reads back as "float32", `lr = "1e-4"` (YAML-style string) as 1e-4. Now both
sides are compared as TrainConfig reads them."""

import pytest

from lowrank.workflow.config import ConfigError, load

BUILD = ("from lowrank.workflow.config import TrainConfig\n"
         "config = TrainConfig(model='m', data='d', output_dir='o', dtype=dtype, adapter_dtype=adapter_dtype, lr=lr)\n")


def test_helpers_passed_to_a_train_config_are_not_refused(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('dtype = "float16"\nadapter_dtype = None\nlr = "1e-4"\n' + BUILD)
    config = load(path)
    assert (config.dtype, config.adapter_dtype, config.lr) == ("float16", "float32", 1e-4)


def test_a_field_config_leaves_at_its_default_with_the_same_value_is_fine(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('epochs = 3\nconfig = {"model": "m", "data": "d", "output_dir": "o"}\n')
    assert load(path).epochs == 3


@pytest.mark.parametrize("extra, stray", [('adapter_dtype = "bfloat16"\n', "adapter_dtype"),
                                          ('dtype = "bfloat16"\n', "dtype"), ("lr = 2e-4\n", "lr")])
def test_one_that_differs_once_read_is_still_refused(tmp_path, extra, stray):
    path = tmp_path / "c.py"
    path.write_text('dtype = "float16"\nadapter_dtype = None\nlr = "1e-4"\n' + BUILD + extra)
    with pytest.raises(ConfigError, match=rf"module-level \['{stray}'\] with other values"):
        load(path)
