"""Regression tests from review h6 of the day's changes (web's signals, ...)."""

from __future__ import annotations

import signal
import sys

import pytest

from lowrank.commands import web


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP (Windows)")
def test_web_under_nohup_does_not_pass_a_sighup_on_to_the_server():
    # nohup: SIGHUP ignored. The server inherits that and must keep running when the session closes;
    # passing the SIGHUP on killed it (exit 129)
    hangs_up = "import os, signal, time; os.kill(os.getppid(), signal.SIGHUP); time.sleep(0.5)"
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert web._serve([sys.executable, "-c", hangs_up]) == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # left as it was
    finally:
        signal.signal(signal.SIGHUP, before)


def test_merge_copies_the_tokenizer_code_of_an_old_format_auto_map(tmp_path):
    # tokenizer_config.json's auto_map as a bare [slow, fast] list, the old format transformers still reads as
    # {"AutoTokenizer": [...]}: it was an AttributeError ('list' object has no attribute 'values') inside the swap
    import json
    import types

    from lowrank import export_files

    src, out = tmp_path / "base", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": ["tokenization_x.XTokenizer", None]}))
    (src / "tokenization_x.py").write_text("class XTokenizer: ...\n")
    (src / "evil.py").write_text("")
    model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=str(src)))
    export_files.write_tokenizer(model, out, None)
    assert sorted(p.name for p in out.iterdir()) == ["tokenization_x.py", "tokenizer_config.json"]
    # a module path that leaves the directory is not a file of it
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["../base/evil.T", None]}}))
    assert export_files._tokenizer_code(src) == ()


def test_a_lock_file_this_user_cannot_write_is_held_all_the_same(tmp_path, monkeypatch):
    # a shared output_dir (group-writable) whose .lowrank.lock another user's run made (0644 under umask 022):
    # open(..., "a+") is refused, and the run failed with PermissionError where it had trained before the lock
    import builtins
    import errno

    from lowrank import shards

    out = tmp_path / "out"
    out.mkdir()
    (out / shards.LOCK_FILE).write_text("123\n")

    def others(file, mode="r", *args, **kwargs):
        if mode != "r" and str(file).endswith(shards.LOCK_FILE):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(shards, "open", others, raising=False)
    with shards.held_directory(out):  # held through a read-only descriptor: flock needs no write access
        monkeypatch.undo()
        with pytest.raises(BlockingIOError, match="another process"):
            with shards.held_directory(out):
                pass


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="managed memory needs CUDA")
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_paged_optimizer_on_cuda_steps_as_the_original(how):
    # a deepcopy's / an unpickled copy's states are made by the default CUDA allocator, not in managed
    # memory, and managed_prefetch (cudaMemPrefetchAsync) takes managed memory only: its first step failed
    import copy
    import pickle

    import torch

    from lowrank.optim import PagedAdamW

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    opt = PagedAdamW([p], lr=1e-2, paged=True)
    p.grad = torch.randn_like(p)
    opt.step()
    other = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = other.param_groups[0]["params"][0]
    p.grad = q.grad = torch.ones_like(p)
    opt.step()
    other.step()
    assert torch.equal(p, q)


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
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    with shards.held_directory(out):  # the first run
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "lowrank", "train", str(tmp_path / "c.yaml")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=170)
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert log.count(f"lowrank train: error: output_dir {str(out)!r}: another process") == 2, log[-3000:]
    assert "rank 0 failed while writing" not in log, log[-3000:]


def test_ejecting_one_of_two_merged_adapters_writes_no_inf_into_a_float16_weight():
    # W0 + a + b is finite in float16, W0 + a is not: taking b alone out wrote inf into the weight without a
    # word (the check merge has since bbaf30d was missing on this path); now both come out, a stays active
    import torch
    from torch import nn

    from lowrank import LoraConfig, eject, inject, merge, set_active

    model = nn.Sequential(nn.Linear(4, 3)).half()
    with torch.no_grad():
        model[0].weight.fill_(65000.0)
    w0 = model[0].weight.clone()
    for name, b in (("a", 1000.0), ("b", -1000.0)):
        inject(model, LoraConfig(r=1, alpha=1, targets=["0"]), name=name)
        with torch.no_grad():
            model[0].lora_A[name].weight.fill_(1.0)
            model[0].lora_B[name].weight.fill_(b)
    set_active(model, ["a", "b"])
    merge(model)
    assert model[0].merged == ("a", "b")
    with pytest.warns(UserWarning, match=r"\['a'\] merged beyond torch.float16's range"):
        eject(model, "b")
    assert model[0].names == ("a",) and model[0].merged == () and model[0].active == ("a",)
    assert torch.equal(model[0].base.weight, w0)
