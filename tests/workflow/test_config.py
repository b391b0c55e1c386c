"""Training configs: YAML and Python read alike, --print-config round-trips, and every bad
config or data file is one error line from `lowrank train`, before anything is trained."""

import json

import pytest
import yaml

from lowrank import cli
from lowrank.workflow import config as C

from . import tiny
from .conftest import ROOT, lowrank

BASE = {"model": "m", "data": "d.json", "output_dir": "out", "method": "dora", "method_options": {"r": 4},
        "epochs": 2, "lr": 1e-3, "schedule": "linear"}


def test_yaml_and_python_files_give_the_same_config(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "b.py").write_text(f"config = {BASE!r}\n")
    (tmp_path / "c.py").write_text("".join(f"{k} = {v!r}\n" for k, v in BASE.items()) + "import os\n_private = 1\n")
    (tmp_path / "d.py").write_text(f"from lowrank.workflow.config import TrainConfig\nconfig = TrainConfig(**{BASE!r})\n")
    configs = [C.load(tmp_path / f) for f in ("a.yaml", "b.py", "c.py", "d.py")]
    assert configs[0] == configs[1] == configs[2] == configs[3]
    assert configs[0].to_dict() == {**C.TrainConfig(**BASE).to_dict()}


def test_nf4_compute_dtype_by_name():
    import torch

    from lowrank.workflow.methods import nf4_config

    assert nf4_config({"compute_dtype": "bfloat16"}).compute_dtype is torch.bfloat16


def test_config_never_changes_the_users_mapping():
    options = {"r": 4}
    c = C.TrainConfig(**{**BASE, "method_options": options})
    with pytest.raises(TypeError):
        c.method_options["r"] = 5
    assert options == {"r": 4}


def test_print_config_round_trips(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(BASE))
    assert cli.main(["train", str(tmp_path / "a.yaml"), "--print-config", "--set", "epochs=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert C.from_mapping(printed) == C.TrainConfig(**{**BASE, "epochs": 7})
    assert cli.main(["train", "--print-config"]) == 0  # no CONFIG: every field with its default
    defaults = yaml.safe_load(capsys.readouterr().out)
    assert set(defaults) == set(C.FIELDS) and all(defaults[k] is None for k in C.REQUIRED)
    assert C.from_mapping({**defaults, **{k: BASE[k] for k in C.REQUIRED}}) == C.TrainConfig(**{k: BASE[k] for k in C.REQUIRED})


def test_exponent_numbers_that_yaml_reads_as_strings_are_numbers(tmp_path, capsys):
    """YAML 1.1 (PyYAML) reads 1e-4, without a dot, as a string: `--set lr=1e-4` (the docs'
    example) and `lr: 2e-4` in a file were refused as "not a number"."""
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({k: v for k, v in BASE.items() if k != "lr"})  # lr once
                                     + "lr: 2e-4\nweight_decay: 1E-2\n")
    assert cli.main(["train", str(tmp_path / "a.yaml"), "--print-config", "--set", "warmup_ratio=5e-2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["lr"], printed["weight_decay"], printed["warmup_ratio"]) == (2e-4, 1e-2, 5e-2)
    assert cli.main(["train", str(tmp_path / "a.yaml"), "--set", "lr=1e-4x"]) == 2
    assert "lr must be a number > 0; got '1e-4x'" in capsys.readouterr().err


def test_python_m_lowrank_runs():
    out = lowrank("train", "--print-config").stdout
    assert yaml.safe_load(out)["method"] == "lora"


BAD = [
    ({"methd": "lora"}, "unknown field(s) ['methd']"),
    ({"method": "lorra"}, "method must be one of ['adapter', 'dora', 'lora', 'prefix', 'prompt', 'qlora']; got 'lorra'"),
    ({"template": {"<|im_start|>": None}}, "template must be a name (a string); got dict {'<|im_start|>': None} (YAML"),
    ({"method": "prefix"}, "method_options: unknown option(s) ['r'] for method 'prefix'; allowed: ['num_virtual_tokens',"),
    ({"method_options": {"rank": 4}}, "method_options: unknown option(s) ['rank'] for method 'dora'"),
    ({"method_options": {"r": 0}}, "method_options for 'dora': r (the LoRA rank) must be an integer >= 1; got 0"),
    ({"epochs": 0}, "epochs must be an integer >= 1; got 0"),
    ({"lr": "fast"}, "lr must be a number > 0; got 'fast'"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"template": "vicuna"}, "template must be null"),
    ({"paged_optimizer": "yes"}, "paged_optimizer must be true or false; got 'yes'"),
    ({"compile": 1}, "compile must be true or false; got 1"),
    ({"optimizer_bits": 4}, "optimizer_bits must be 32 (AdamW's float32 moments) or 8 (blockwise 8-bit); got 4"),
    ({"optimizer_bits": 8.0}, "optimizer_bits must be 32 (AdamW's float32 moments) or 8 (blockwise 8-bit); got 8.0"),
    ({"optimizer_bits": 8, "distributed": "fsdp"}, "optimizer_bits: 8 does not work with distributed: fsdp"),
    ({"method": "prefix", "method_options": {"num_virtual_tokens": 4, "projection_hidden": 8}, "distributed": "fsdp"},
     "method_options.projection_hidden (the prefix's MLP, shared by every layer) does not work with distributed: fsdp"),
    ({"nf4": {"blocksize": 64}}, "nf4 options apply to method 'qlora' only"),
    ({"method": "qlora", "nf4": {"blocksize": 48}}, "nf4: blocksize must be one of"),
    ({"method": "qlora", "nf4": {"compute_dtype": "int8"}}, "nf4: compute_dtype must be None or one of"),
    ({"device": ""}, "device must be 'auto' or a torch device string"),
    ({"device": "tpu"}, "device must be 'auto' or a torch device string such as 'cpu', 'cuda', 'cuda:1'; got 'tpu'"),
    ({"method_options": {"dora": False}}, "method_options: method 'dora' means dora: True, and method_options sets "
                                          "dora: False; leave it out, or choose another method (e.g. 'lora')"),
    ({"adapter_dtype": "fp32"}, "adapter_dtype must be null (the base's dtype) or one of ('float32', 'bfloat16', "
                                "'float16'); got 'fp32'"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_config_is_one_error_line(tmp_path, capsys, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out"), **change}))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lowrank train: error: {path}: ") and message in err
    assert not (tmp_path / "out").exists()


def test_bad_data_is_one_error_line_before_the_model_is_loaded(tmp_path, capsys):
    records = json.loads(json.dumps(tiny.CONVERSATIONS))
    del records[2]["conversation"][0]["output"]
    (tmp_path / "d.json").write_text(json.dumps(records))
    path = tmp_path / "c.yaml"  # the model directory does not even exist: data is checked first
    path.write_text(yaml.safe_dump({**BASE, "data": str(tmp_path / "d.json"), "output_dir": str(tmp_path / "out")}))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"lowrank train: error: {tmp_path / 'd.json'}: record 2.conversation[0]: missing field 'output' (line 1)\n"
    assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_is_one_error_line_before_the_model_is_loaded(tmp_path, capsys):
    records = json.loads(json.dumps(tiny.CONVERSATIONS))
    records[2]["conversation"][0]["output"] = "\ud800"  # valid JSON, but no text: the tokenizer cannot encode it
    (tmp_path / "d.json").write_text(json.dumps(records))
    path = tmp_path / "c.yaml"  # the model directory does not even exist
    path.write_text(yaml.safe_dump({**BASE, "data": str(tmp_path / "d.json"), "output_dir": str(tmp_path / "out")}))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowrank train: error: {tmp_path / 'd.json'}: record 2.conversation[0].output: holds "
                          "'\\ud800' at character 0, half of a UTF-16 surrogate pair") and err.count("\n") == 1


def test_set_with_a_value_that_is_not_yaml_is_one_error_line(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(BASE))
    assert cli.main(["train", str(tmp_path / "a.yaml"), "--print-config", "--set", "epochs=["]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("lowrank train: error: --set 'epochs=[': the value is not valid YAML: while parsing")


@pytest.mark.parametrize("name, text, message", [
    ("c.yaml", "model: [unclosed", "not valid YAML"),
    ("c.yaml", "- a list", "must hold a mapping"),
    ("c.toml", "", "must end in .yaml, .yml or .py"),
    ("c.yaml", "model: m\ndata: d\n", "missing required field(s) ['output_dir']"),
])
def test_unreadable_config_files(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    assert cli.main(["train", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_are_valid(path):
    config = C.load(path)
    assert config.method in ("lora", "qlora", "adapter", "dora", "prefix", "prompt")
    from lowrank.workflow.methods import tuner_config

    tuner_config(config.method, dict(config.method_options))  # the method's options build its config


def test_example_data_is_valid():
    from lowrank.workflow import data

    assert data.load(ROOT / "examples" / "data" / "ship.json") == data.parse(json.dumps(tiny.CONVERSATIONS))


def test_yaml_floats_without_a_dot_read_as_numbers_in_method_and_nf4_options(tmp_path):
    """YAML 1.1 leaves 5e-2 a string; the tuner's float fields read it as TrainConfig's do."""
    from lowrank.workflow.methods import nf4_config, tuner_config

    (tmp_path / "c.yaml").write_text("model: m\ndata: d\noutput_dir: o\n"
                                     "method_options: {dropout: 5e-2, alpha: 1e1, alpha_pattern: {q_proj: 2e1}}\n")
    config = C.load(tmp_path / "c.yaml")
    lora = tuner_config(config.method, dict(config.method_options))
    assert (lora.dropout, lora.alpha, dict(lora.alpha_pattern)) == (0.05, 10.0, {"q_proj": 20.0})
    with pytest.raises(ValueError, match="r .*must be an integer"):  # an int field does not take a float's spelling
        tuner_config("lora", {"r": "8"})
    assert nf4_config({"blocksize": 64}).blocksize == 64


def test_seed_beyond_what_the_data_order_takes_is_refused():
    with pytest.raises(C.ConfigError, match="seed must be below 18446688733644 "):
        C.TrainConfig(model="m", data="d", output_dir="o", seed=2**64 - 1)
    assert C.TrainConfig(model="m", data="d", output_dir="o", seed=2**40).seed == 2**40  # builds the data order fine


def test_a_python_configs_near_miss_of_a_field_is_an_error(tmp_path):
    """`epoch = 1` was ignored silently (the run took the default 3 epochs); a YAML typo is an error."""
    f = tmp_path / "c.py"
    f.write_text("model = 'm'\ndata = 'd.json'\noutput_dir = 'o'\nepoch = 1\n_helper = 2\nimport os\n")
    with pytest.raises(C.ConfigError, match=r"'epoch' is not a TrainConfig field; did you mean 'epochs'\?"):
        C.load(f)
    f.write_text("model = 'm'\ndata = 'd.json'\noutput_dir = 'o'\nepochs = 1\n_epoch = 2\nbase_dir = '/x'\n"
                 "max_len = 8\nseeds = [1, 2]\ndtypes = ['bfloat16']\nr = 16\n")  # helpers' names
    assert C.load(f).epochs == 1
    for typo, field in (("warmup_ration", "warmup_ratio"), ("lrr", "lr"), ("sed", "seed"), ("dtyp", "dtype")):
        f.write_text(f"model = 'm'\ndata = 'd.json'\noutput_dir = 'o'\n{typo} = 1\n")
        with pytest.raises(C.ConfigError, match=rf"'{typo}' is not a TrainConfig field; did you mean '{field}'"):
            C.load(f)


def test_version_names_lowrank_python_and_torch(capsys):
    import platform

    import torch

    import lowrank as package

    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == (f"lowrank {package.__version__} (Python {platform.python_version()}, "
                                       f"torch {torch.__version__})\n")


def test_errors_are_one_line_unless_a_traceback_is_asked_for(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nowhere.yaml")
    assert cli.main(["train", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank train: error: ") and err.count("\n") == 1 and missing in err
    monkeypatch.setenv("LOWRANK_TRACEBACK", "1")
    with pytest.raises(C.ConfigError, match="nowhere.yaml.* does not exist"):
        cli.main(["train", missing])
