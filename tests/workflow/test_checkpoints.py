"""What a run leaves in output_dir: --resume never replaces an adapter, a killed save is cleaned
up whole, and checkpoint directories carry the umask's permissions like any directory."""

import io
import json
import os
import subprocess
import sys

import pytest

from lowrank import cli, shards
from lowrank.workflow import config as C
from lowrank.workflow.train import STATE_FILE, train

from .conftest import ROOT


def _config(tmp_path, model_dir, data_file, **change):
    values = dict(model=str(model_dir), data=str(data_file), output_dir=str(tmp_path / "out"), epochs=1, lr=1e-2,
                  batch_size=4, max_length=128, method_options={"r": 4})
    return C.TrainConfig(**{**values, **change})


def test_resume_refuses_to_replace_later_adapters_without_trainer_state(tmp_path, model_dir, data_file, capsys):
    config = _config(tmp_path, model_dir, data_file, epochs=3)
    train(config, stream=io.StringIO())
    out = tmp_path / "out"
    for epoch in (2, 3):  # adapters kept, their trainer state deleted to save space
        (out / f"epoch_{epoch}" / STATE_FILE).unlink()
    kept = {e: (out / f"epoch_{e}" / "adapter_model.safetensors").read_bytes() for e in (2, 3)}
    (tmp_path / "c.yaml").write_text(json.dumps({**config.to_dict(), "epochs": 4}))
    capsys.readouterr()  # the first run's
    assert cli.main(["train", str(tmp_path / "c.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds ['epoch_2', 'epoch_3'] after epoch_1" in err and "new output_dir" in err
    assert sorted(p.name for p in out.iterdir()) == [shards.LOCK_FILE, "epoch_1", "epoch_2", "epoch_3"]
    assert {e: (out / f"epoch_{e}" / "adapter_model.safetensors").read_bytes() for e in (2, 3)} == kept


# SIGKILL right after the adapter file is written: _save's temporary directory and the one
# save_adapter's atomic_directory made beside it are both left behind
KILLED_IN_SAVE = r"""
import os, signal, sys
import safetensors.torch as st
real = st.save_file
def dying(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
st.save_file = dying
from lowrank.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_next_run_removes_everything_a_killed_save_left_and_nothing_else(tmp_path, model_dir, data_file):
    config = _config(tmp_path, model_dir, data_file)
    (tmp_path / "c.yaml").write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, "train", str(tmp_path / "c.yaml")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / "out"
    left = sorted(p.name for p in out.iterdir() if p.name != shards.LOCK_FILE)  # the lock died with it
    assert len(left) == 2 and all(name.startswith(".") for name in left), left
    assert any((out / name / "adapter_model.safetensors").is_file() for name in left), left
    others = [".epoch_1.notes", "..epoch_1.x1y2.tmp.keep", "epoch_1.tmp", ".epochs.tmp"]  # not lowrank's
    for name in others:
        (out / name).mkdir()
    log = io.StringIO()
    train(config, stream=log)
    assert f"unfinished checkpoints a stopped run left: {left}" in log.getvalue()
    assert sorted(p.name for p in out.iterdir()) == sorted([shards.LOCK_FILE, "epoch_1", *others])


def test_checkpoint_directories_get_the_umasks_permissions(tmp_path, model_dir, data_file):
    old = os.umask(0o027)
    try:
        train(_config(tmp_path, model_dir, data_file), stream=io.StringIO())
        new = tmp_path / "new"
        with shards.atomic_directory(new) as tmp:  # what merge writes with
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    for path in (tmp_path / "out" / "epoch_1", new):
        assert oct(path.stat().st_mode & 0o777) == oct(0o750), path  # a plain mkdir's; tempfile.mkdtemp gave 0o700


@pytest.mark.parametrize("mode", [0o700, 0o755])
def test_replacing_a_directory_keeps_its_permissions(tmp_path, mode):
    target = tmp_path / "d"
    target.mkdir()
    target.chmod(mode)
    (target / "f").write_text("old")
    with shards.atomic_directory(target, overwrite=True) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "new" and target.stat().st_mode & 0o777 == mode


def test_a_second_run_into_a_busy_output_dir_is_refused_and_touches_nothing(tmp_path, model_dir, data_file):
    config = _config(tmp_path, model_dir, data_file)
    out = tmp_path / "out"
    writing = out / ".epoch_2.0123abcd.tmp"  # the first run's checkpoint, half written
    writing.mkdir(parents=True)
    (out / "epoch_1").mkdir()  # and its first: the refusal is that the run goes on, not "pass --resume"
    with shards.held_directory(out):  # the first run, still going (a lock per open file: in-process works)
        with pytest.raises(C.ConfigError, match=rf"output_dir '{out}': another process \(pid {os.getpid()}\) is "
                                                "writing to .*; wait for that run to end"):
            train(config, stream=io.StringIO())
        assert writing.is_dir() and sorted(p.name for p in out.iterdir()) == [writing.name, shards.LOCK_FILE, "epoch_1"]
    (out / "epoch_1").rmdir()
    train(config, stream=io.StringIO())  # released with the block
    assert (out / "epoch_1" / STATE_FILE).is_file() and not writing.exists()


def test_a_file_system_without_locks_runs_unheld(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with shards.held_directory(tmp_path / "out"):
        with shards.held_directory(tmp_path / "out"):  # nothing held: nothing refused
            pass
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):  # any other failure is the user's to see
        with shards.held_directory(tmp_path / "out"):
            pass


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
