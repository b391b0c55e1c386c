"""`lowrank chat --top-p 0.9` (or --top-k) without --temperature answered greedily, the option
silently doing nothing, while the docs said these options change greedy generation. It is now
one error line naming the option, before the model loads."""

import pytest

from lowrank import cli
from lowrank.workflow import model


@pytest.mark.parametrize("options, named", [(["--top-p", "0.9"], "--top-p"), (["--top-k", "40"], "--top-k"),
                                            (["--top-k", "40", "--top-p", "0.9"], "--top-p and --top-k")])
def test_sampling_options_without_a_temperature_are_an_error(tmp_path, capsys, monkeypatch, options, named):
    monkeypatch.setattr(model, "load_with_adapter", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["chat", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowrank chat: error: {named}: options of sampling, and --temperature is 0") and \
        err.count("\n") == 1


def test_with_a_temperature_they_reach_the_settings(tmp_path, monkeypatch):
    seen = {}

    def load(*args, **kwargs):
        raise ValueError("stop here")

    monkeypatch.setattr(model, "load_with_adapter", load)
    from lowrank.workflow import generate

    real = generate.Settings

    def spy(*args):
        seen["settings"] = real(*args)
        return seen["settings"]

    monkeypatch.setattr(generate, "Settings", spy)
    assert cli.main(["chat", str(tmp_path), "--temperature", "0.7", "--top-k", "40", "--top-p", "0.9"]) == 2
    assert seen["settings"] == real(256, 0.7, 0.9, 40, 0)
