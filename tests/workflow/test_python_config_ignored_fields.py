"""A .py config that defines `config` is read from `config` alone, so a module-level field beside
it (`epochs = 1` added below the dict, a habit of XTuner-style files) was ignored without a word
and the run trained with config's value. Such a field is now an error; a module-level name that
only helps build `config` (the same value) is fine."""

import pytest

from lowrank.workflow.config import ConfigError, load

DICT = 'config = {"model": "m", "data": "d", "output_dir": "o", "epochs": 3}\n'


@pytest.mark.parametrize("text, stray", [
    (DICT + "epochs = 1\n", "['epochs']"),
    (DICT + "lr = 1e-4\nseed = 7\n", "['lr', 'seed']"),
    ("from lowrank.workflow.config import TrainConfig\nconfig = TrainConfig(model='m', data='d', output_dir='o')\n"
     "max_length = 512\n", "['max_length']"),
])
def test_a_field_beside_config_that_would_be_ignored_is_an_error(tmp_path, text, stray):
    path = tmp_path / "c.py"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: defines `config`, which alone is read, and module-level "
                                          rf"{stray.replace('[', '.').replace(']', '.')} with other values"):
        load(path)


def test_names_that_build_config_are_fine(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('model = "m"\nepochs = 2\n_lr = 1e-3\n'
                    'config = {"model": model, "data": "d", "output_dir": "o", "epochs": epochs, "lr": _lr}\n')
    config = load(path)
    assert (config.model, config.epochs, config.lr) == ("m", 2, 1e-3)
