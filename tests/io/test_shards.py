"""lowrank.shards: parts are made one shard at a time (so a merged copy of the whole model
never exists), the plan respects the limit, and read() names a broken index or shard."""

from __future__ import annotations

import json

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from lowrank import shards  # noqa: E402


def test_parts_are_made_when_their_shard_is_written(tmp_path, monkeypatch):
    events = []

    def part(key):
        def make():
            events.append(f"make {key}")
            return {key: torch.zeros(100)}  # 400 bytes

        return shards.Part({key: 400}, make)

    real = safetensors_torch.save_file

    def recording(tensors, filename, metadata=None):
        events.append(f"save {sorted(tensors)}")
        real(tensors, filename, metadata)

    monkeypatch.setattr(safetensors_torch, "save_file", recording)
    files = shards.write([part("a"), part("b"), part("c")], tmp_path, max_bytes=800)
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert events == ["make a", "make b", "save ['a', 'b']", "make c", "save ['c']"]
    index = json.loads((tmp_path / shards.INDEX).read_text())
    assert index == {"metadata": {"total_size": 1200}, "weight_map": {"a": files[0], "b": files[0], "c": files[1]}}
    assert sorted(shards.read(tmp_path)) == ["a", "b", "c"]


def test_plan_keeps_each_shard_under_the_limit():
    sizes = [300, 300, 900, 100, 100, 100, 500]
    plan = shards.plan([shards.Part({str(i): n}, dict) for i, n in enumerate(sizes)], 600)
    assert [[p.nbytes for p in shard] for shard in plan] == [[300, 300], [900], [100, 100, 100], [500]]
    assert shards.plan([], 600) == []


def test_shared_storage_is_written_as_copies(tmp_path):
    table = torch.arange(4.0)  # one tensor under two keys (the NF4 code table of every layer)
    shards.write([shards.Part.of("x.quant_map", table), shards.Part.of("y.quant_map", table)], tmp_path, 10**6)
    sd = shards.read(tmp_path)
    assert torch.equal(sd["x.quant_map"], table) and torch.equal(sd["y.quant_map"], table)


def test_read_names_what_is_broken(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        shards.read(tmp_path)
    (tmp_path / shards.INDEX).write_text("[1, 2]")
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index"):
        shards.read(tmp_path)
    (tmp_path / shards.INDEX).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"\x01" * 12)
    with pytest.raises(ValueError, match="model-00001-of-00001.safetensors: not a readable safetensors file"):
        shards.read(tmp_path)


def _can_exchange(where) -> bool:
    p, q = where / "p", where / "q"
    p.mkdir(), q.mkdir()
    done = shards.exchange(p, q)
    p.rmdir(), q.rmdir()
    return done


@pytest.mark.parametrize("can_exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_directory_replaces_a_whole_directory(tmp_path, monkeypatch, can_exchange):
    if can_exchange and not _can_exchange(tmp_path):
        pytest.skip("this system cannot exchange two paths in one step")
    if not can_exchange:
        monkeypatch.setattr(shards, "exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "keep.txt").write_text("kept")
    (out / "sub").mkdir()
    (out / "sub" / "big.bin").write_bytes(b"checkpoint")
    inode = (out / "sub" / "big.bin").stat().st_ino
    with shards.atomic_directory(out, overwrite=True, carry_over=True) as tmp:
        assert (tmp / "keep.txt").read_text() == "kept"  # carried over
        (tmp / "old.txt").unlink()  # a carried file is replaced, never written into (the contract)
        (tmp / "old.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # the old directory is untouched until the swap
    assert (out / "old.txt").read_text() == "new" and (out / "keep.txt").read_text() == "kept"
    # what the block left alone came over as a hard link, not a copy (a trainer's checkpoints beside an adapter)
    assert (out / "sub" / "big.bin").stat().st_ino == inode and (out / "sub" / "big.bin").read_bytes() == b"checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left
    with pytest.raises(RuntimeError), shards.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "old.txt").write_text("never seen")
        raise RuntimeError("the writer fails")
    assert (out / "old.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_symlinked_target_keeps_its_link_and_the_cwd_is_refused(tmp_path, monkeypatch):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "old.txt").write_text("old")
    link.symlink_to(real, target_is_directory=True)
    with shards.atomic_directory(link, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no temporary left beside either
    monkeypatch.chdir(real)
    for here in (".", tmp_path):
        with pytest.raises(ValueError, match="is the current directory or holds it"):
            with shards.atomic_directory(here, overwrite=True):
                pass
    assert sorted(p.name for p in real.iterdir()) == ["new.txt"]


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    if not shards.exchange(a, b):
        pytest.skip("this system cannot exchange two paths in one step")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()
