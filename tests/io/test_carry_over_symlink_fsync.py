"""atomic_directory(carry_over=True) syncs the files written into the new directory before it
takes the old one's place. Since symbolic links are carried as links (2afd395), that loop
followed a carried link to a file and fsynced what it points to, outside the directory: a link
to a file on a file system that refuses fsync (/proc here; some FUSE and network mounts) failed
the save with OSError EINVAL. A link is carried, not written: it is left alone."""

from __future__ import annotations

import os
import pathlib

import pytest

from lowrank import shards

PROC_FILE = pathlib.Path("/proc/version")


@pytest.mark.skipif(not PROC_FILE.is_file(), reason="needs Linux's /proc, a file system that refuses fsync")
def test_a_link_to_a_file_that_refuses_fsync_is_carried(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "version").symlink_to(PROC_FILE)
    with shards.atomic_directory(out, overwrite=True, carry_over=True) as tmp:
        (tmp / "new.txt").write_text("new")  # raised OSError: [Errno 22] Invalid argument (fsync of /proc/version)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt", "old.txt", "version"]
    assert os.readlink(out / "version") == str(PROC_FILE)
    assert (out / "old.txt").read_text() == "old" and (out / "new.txt").read_text() == "new"


def test_written_files_are_still_synced_and_links_are_not(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"x")
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "link.bin").symlink_to(target)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with shards.atomic_directory(out, overwrite=True, carry_over=True) as tmp:
        (tmp / "new.txt").write_text("new")
        new_inode = (tmp / "new.txt").stat().st_ino
    assert new_inode in synced and target.stat().st_ino not in synced
