"""Shared fixtures: the tiny model directory and one trained LoRA run, built once per session."""

import os
import pathlib
import subprocess
import sys

import pytest

from . import tiny

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = pathlib.Path(os.environ.get("LOWRANK_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
# enough for the tiny model to reproduce every answer, the long manifest included (measured on the
# 2-core CI machine: 20 epochs at lr 0.01 do; 12 epochs at lr 0.02 leave the manifest garbled)
REPEAT = 4  # each conversation appears this many times in the training file
TRAIN_YAML = """\
model: {model}
data: {data}
output_dir: {out}
method: lora
method_options: {{r: 16, alpha: 32}}
epochs: 20
lr: 0.01
warmup_ratio: 0.0
batch_size: 4
grad_accum: 1
max_length: 128
seed: 0
"""


def lowrank(*args, cwd=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    """Run `python -m lowrank ARGS` with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lowrank", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"lowrank {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return tiny.build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> pathlib.Path:
    return tiny.write_data(tmp_path_factory.mktemp("data") / "conversations.json", repeat=REPEAT)


@pytest.fixture(scope="session")
def trained(model_dir, data_file, tmp_path_factory):
    """(output_dir, completed `lowrank train` process) of the LoRA run in TRAIN_YAML."""
    where = tmp_path_factory.mktemp("run")
    config = where / "train.yaml"
    config.write_text(TRAIN_YAML.format(model=model_dir, data=data_file, out=where / "out"))
    return where / "out", lowrank("train", config)


@pytest.fixture(scope="session")
def artifacts() -> pathlib.Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
