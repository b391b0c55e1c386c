"""A .py config that does not run (a syntax error, a name it never defined) is one error line
naming the file and the line, exit status 2, as a bad YAML file is; it was a Python traceback.
LOWRANK_TRACEBACK=1 still raises, with the config's own error chained."""

import pytest

from lowrank import cli
from lowrank.workflow.config import ConfigError, load

HEAD = 'model = "m"\ndata = "d"\noutput_dir = "o"\n'


@pytest.mark.parametrize("body, message", [
    ("epochs = 3 +\n", "line 4: not valid Python: invalid syntax"),
    ("epochs = undefined_name\n", "line 4: running it raised NameError: name 'undefined_name' is not defined"),
    ("\n\ndef _f():\n    return 1 / 0\n\n\nlr = _f()\n", "line 7: running it raised ZeroDivisionError: division by zero"),
])
def test_a_python_config_that_does_not_run_is_one_error_line(tmp_path, capsys, monkeypatch, body, message):
    path = tmp_path / "c.py"
    path.write_text(HEAD + body)
    monkeypatch.delenv("LOWRANK_TRACEBACK", raising=False)
    assert cli.main(["train", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err == f"lowrank train: error: {path}: {message}\n"


def test_a_relative_path_names_the_line_too_and_the_cause_is_chained(tmp_path, monkeypatch):
    (tmp_path / "c.py").write_text(HEAD + "epochs = nope\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^c\.py: line 4: running it raised NameError") as e:
        load("c.py")
    assert isinstance(e.value.__cause__, NameError)
