"""Training on several ranks (2 gloo ranks on CPU) when something fails: every rank raises rank
0's error instead of waiting in a collective, and a missing GPU is a config error."""

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

import lowrank
import lowrank.io
from lowrank.workflow import config as C
from lowrank.workflow import parallel
from lowrank.workflow import train as T

from .spawn import COLLECTIVE_TIMEOUT_S, run_ranks  # a collective waiting longer raises in its rank: a hang fails


def _run(fn, tmp_path, *args) -> None:
    run_ranks(fn, 2, str(tmp_path), args, deadline_s=4 * COLLECTIVE_TIMEOUT_S)


def _save_fails_on_rank0(rank: int, world: int, out: str) -> None:
    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    lowrank.io._write_adapter = broken  # rank 0 is the one that writes
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="all-linear"))
    config = C.TrainConfig(model="m", data="d", output_dir=out)
    ranks = parallel.Ranks("ddp", rank, world, "cpu")
    with pytest.raises((OSError, RuntimeError), match="No space left on device"):
        T._save(model, config, None, 1, {"step": 1}, ranks)  # every rank hears of rank 0's failure
    assert not os.path.exists(os.path.join(out, "epoch_1"))


def test_a_failed_save_under_ddp_raises_on_every_rank_instead_of_hanging(tmp_path):
    _run(_save_fails_on_rank0, tmp_path, str(tmp_path / "out"))


def _interrupted_on_rank0(rank: int, world: int, out: str) -> None:
    def write():
        if rank == 0:
            raise KeyboardInterrupt  # Ctrl-C reached rank 0 alone while it wrote
        return "written"

    ranks = parallel.Ranks("ddp", rank, world, "cpu")
    start = time.monotonic()
    if rank == 0:
        with pytest.raises(KeyboardInterrupt):
            ranks.first(write)
    else:  # it waited in the broadcast until the collective timed out: on_main caught Exception only
        with pytest.raises(RuntimeError, match="rank 0 failed while writing for all ranks: KeyboardInterrupt"):
            ranks.first(write)
    with open(os.path.join(out, f"rank{rank}"), "w") as f:  # what each rank saw, for the test to read
        f.write(f"{time.monotonic() - start}")


def test_an_interrupt_on_rank0_while_it_writes_reaches_every_rank(tmp_path):
    _run(_interrupted_on_rank0, tmp_path, str(tmp_path))
    waited = [float((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert max(waited) < COLLECTIVE_TIMEOUT_S  # each rank raised what it should, and rank 1 not after the collective's timeout


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_cuda_without_a_gpu_under_torchrun_is_a_config_error(mode, monkeypatch):
    """device: cuda on a rank that has no GPU of its LOCAL_RANK: a ConfigError that says so, as
    `distributed: none` gives (workflow.model.pick_device), not torch.cuda's AttributeError."""
    from lowrank.workflow.config import ConfigError

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    with pytest.raises(ConfigError, match="sees 0 CUDA GPU"):
        parallel.start(mode, "cuda")


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="no torch.distributed")
def test_a_busy_output_dir_is_one_config_error_line_on_every_rank(tmp_path):
    # under torchrun rank 0's refusal reached rank 1 as on_main's RuntimeError ("rank 0 failed while writing
    # for all ranks: ConfigError: ..."), a traceback where rank 0 printed one line
    import json
    import os
    import pathlib
    import subprocess

    from lowrank import shards

    out = tmp_path / "out"
    config = {"model": str(tmp_path / "model"), "data": str(tmp_path / "data.json"), "output_dir": str(out),
              "distributed": "ddp", "device": "cpu", "batch_size": 2}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    with shards.held_directory(out):  # the first run
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "lowrank", "train", str(tmp_path / "c.yaml")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=170)
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert log.count(f"lowrank train: error: output_dir {str(out)!r}: another process") == 2, log[-3000:]
    assert "rank 0 failed while writing" not in log, log[-3000:]
