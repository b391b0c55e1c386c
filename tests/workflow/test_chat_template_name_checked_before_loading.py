"""`lowrank chat MODEL --template vicuna` loaded the whole model (minutes for a 7B) before it
said the template does not exist; the name is now checked first, by the argument parser."""

import pytest

from lowrank import cli
from lowrank.workflow import model


def test_an_unknown_template_name_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model, "load_with_adapter", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["chat", str(tmp_path), "--template", "vicuna"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --template: invalid choice: 'vicuna' (choose from" in err and "chatml" in err


def test_a_known_template_name_is_passed_on(tmp_path, monkeypatch):
    seen = []

    def load(*args, **kwargs):
        seen.append(args)
        raise ValueError("stop here")

    monkeypatch.setattr(model, "load_with_adapter", load)
    assert cli.main(["chat", str(tmp_path), "--template", "chatml"]) == 2
    assert len(seen) == 1
