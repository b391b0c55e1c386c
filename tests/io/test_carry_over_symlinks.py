"""atomic_directory(carry_over=True) (save_adapter over a directory that holds more than the
adapter) carries a symbolic link as the link. It followed directory links: a trainer's
`checkpoint-last -> checkpoint-500` became a second real directory, `data -> /datasets/...` a
copy of the data set on every save, and a link to an ancestor (`up -> ..`) recursed until
RecursionError, so the save failed."""

from __future__ import annotations

import os

from lowrank import shards


def _carry(out):
    with shards.atomic_directory(out, overwrite=True, carry_over=True) as tmp:
        (tmp / "new.txt").write_text("new")


def test_directory_and_file_links_stay_links(tmp_path):
    external = tmp_path / "datasets"
    external.mkdir()
    (external / "big.bin").write_bytes(b"x" * 64)
    out = tmp_path / "adapter"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "w.bin").write_text("w")
    (out / "checkpoint-5" / "latest").symlink_to("w.bin")  # a link inside a carried folder
    (out / "checkpoint-last").symlink_to("checkpoint-5", target_is_directory=True)
    (out / "data").symlink_to(external, target_is_directory=True)
    (out / "big.bin").symlink_to(external / "big.bin")
    _carry(out)
    assert sorted(p.name for p in out.iterdir()) == ["big.bin", "checkpoint-5", "checkpoint-last", "data", "new.txt"]
    assert os.readlink(out / "checkpoint-last") == "checkpoint-5"
    assert os.readlink(out / "data") == str(external)
    assert os.readlink(out / "big.bin") == str(external / "big.bin")
    assert os.readlink(out / "checkpoint-5" / "latest") == "w.bin"
    assert not (out / "checkpoint-5").is_symlink() and (out / "checkpoint-5" / "w.bin").read_text() == "w"
    assert sorted(p.name for p in external.iterdir()) == ["big.bin"]  # what they point to is untouched


def test_a_link_to_an_ancestor_does_not_recurse(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "up").symlink_to("..", target_is_directory=True)
    _carry(out)  # raised RecursionError, copying the parent (which holds `out`) into `out`
    assert os.readlink(out / "up") == ".."
    assert (out / "old.txt").read_text() == "old" and (out / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directory left behind


def test_without_linkat_the_files_are_copied(tmp_path, monkeypatch):
    # os.link(follow_symlinks=False) raises NotImplementedError where the system has no linkat
    def no_linkat(*args, **kwargs):
        raise NotImplementedError("link: follow_symlinks unavailable on this platform")

    out = tmp_path / "adapter"
    (out / "sub").mkdir(parents=True)
    (out / "old.txt").write_text("old")
    (out / "sub" / "state.json").write_text("{}")
    (out / "link").symlink_to("old.txt")
    monkeypatch.setattr(os, "link", no_linkat)
    _carry(out)
    assert (out / "old.txt").read_text() == "old" and (out / "sub" / "state.json").read_text() == "{}"
    assert os.readlink(out / "link") == "old.txt" and (out / "new.txt").read_text() == "new"
