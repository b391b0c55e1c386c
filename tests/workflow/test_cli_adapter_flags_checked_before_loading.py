"""`lowrank merge` / `chat` / `web` with an adapter whose weights are only a pickled
adapter_model.bin, or whose config names another base: load_adapter refused it only after the
base had loaded (minutes for a 7B), in words for the Python API ("pass allow_pickle=True",
"allow_other_base=True"), which a command-line user cannot pass. Each command now refuses it
before anything loads, naming its own flag (--allow-pickle, --allow-other-base); with the flag,
or for an adapter of this base, it goes on to load."""

import json

import pytest
import torch

from lowrank import cli
from lowrank.commands import merge, web
from lowrank.workflow import model as workflow_model


def _adapter(path, base, pickled):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base,
                                                          "r": 4, "target_modules": ["q_proj"]}))
    if pickled:
        torch.save({}, path / "adapter_model.bin")
    else:
        (path / "adapter_model.safetensors").write_bytes(b"")  # never read: the commands stop before


def _stop(*args, **kwargs):
    raise ValueError("STOP: loaded")


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(merge, "_load_base", _stop)
    monkeypatch.setattr(workflow_model, "load_with_adapter", _stop)
    monkeypatch.setattr(web, "_serve", lambda cmd: 0)
    monkeypatch.setattr(web, "require", lambda *a: None, raising=False)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")


def _commands(tmp_path, extra):
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    return {"merge": ["merge", base, adapter, str(tmp_path / "out"), *extra],
            "chat": ["chat", base, "--adapter", adapter, *extra],
            "web": ["web", base, "--adapter", adapter, *extra]}


@pytest.mark.parametrize("command", ["merge", "chat", "web"])
@pytest.mark.parametrize("base_named, pickled, flag", [("base", True, "--allow-pickle"),
                                                       ("/models/llama-7b", False, "--allow-other-base")])
def test_refused_before_loading_naming_the_flag(tmp_path, capsys, no_loading, command, base_named, pickled, flag):
    pytest.importorskip("streamlit") if command == "web" else None
    _adapter(tmp_path / "adapter", base_named, pickled)
    assert cli.main(_commands(tmp_path, [])[command]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowrank {command}: error: ") and f"pass {flag} " in err and err.count("\n") == 1
    assert "STOP: loaded" not in err and "allow_pickle" not in err and "allow_other_base" not in err
    if pickled:
        assert "adapter_model.bin is a pickle file" in err
    else:
        assert "trained on base model '/models/llama-7b', but the base is" in err


@pytest.mark.parametrize("command", ["merge", "chat", "web"])
@pytest.mark.parametrize("base_named, pickled, extra", [("base", True, ["--allow-pickle"]),
                                                        ("/models/llama-7b", False, ["--allow-other-base"]),
                                                        ("/hub/cache/BASE", False, [])])
def test_with_the_flag_or_this_base_it_goes_on_to_load(tmp_path, capsys, no_loading, command, base_named, pickled,
                                                       extra):
    pytest.importorskip("streamlit") if command == "web" else None
    _adapter(tmp_path / "adapter", base_named, pickled)
    code = cli.main(_commands(tmp_path, extra)[command])
    if command == "web":
        assert code == 0  # served (the page loads the model)
    else:
        assert code == 2 and capsys.readouterr().err.endswith("error: STOP: loaded\n")


def test_merge_given_a_file_of_the_adapter_names_its_directory_before_loading(tmp_path, capsys, no_loading):
    _adapter(tmp_path / "adapter", "base", False)
    config = tmp_path / "adapter" / "adapter_config.json"
    assert cli.main(["merge", str(tmp_path / "base"), str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowrank merge: error: {config} is a file; an adapter is loaded from its directory "
                          f"({tmp_path / 'adapter'}, which holds adapter_config.json and adapter_model.safetensors)")
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["merge", "chat", "web"])
@pytest.mark.parametrize("kind", ["IA3", "LOHA", None])
def test_an_adapter_kind_lowrank_does_not_read_is_refused_before_loading(tmp_path, capsys, no_loading, command, kind):
    pytest.importorskip("streamlit") if command == "web" else None
    _adapter(tmp_path / "adapter", "base", False)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": kind}))
    assert cli.main(_commands(tmp_path, [])[command]) == 2
    err = capsys.readouterr().err
    assert err == f"lowrank {command}: error: {config}: peft_type is {kind!r}; lowrank reads LoRA ('LORA'), " \
                  "prompt-tuning ('PROMPT_TUNING'), prefix-tuning ('PREFIX_TUNING') and lowrank's bottleneck " \
                  "('LOWRANK_BOTTLENECK') adapters\n"
