"""Model directories as transformers reads them: safetensors shards, their index, atomically.

A directory holds `model.safetensors` when everything fits in one shard, otherwise
`model-00001-of-0000N.safetensors` ... and `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}), the layout
`transformers.PreTrainedModel.save_pretrained` writes and `from_pretrained` reads.

Tensors are given as `Part`s: a few keys with known sizes and a function that makes them.
A part is made only when its shard is written and dropped after, so a merged or dequantized
copy of the whole model never exists at once: peak memory is about one shard.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Decimal units as transformers and the hub count them ("2GB" = 2 * 10**9), binary ones as IEC.
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "2GB", "500MB", "1.5GiB" (case-insensitive)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be at least 1 byte; got {size}")
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if m and m.group(2).upper() in UNITS:
            n = int(float(m.group(1)) * UNITS[m.group(2).upper()])
            if n >= 1:
                return n
    raise ValueError(f"max_shard_size must be a positive int (bytes) or a string like '2GB', '500MB', '1GiB' "
                     f"(units {sorted(u for u in UNITS if u)}); got {size!r}")


@dataclasses.dataclass(frozen=True)
class Part:
    """Tensors that are made together (a merged weight; the six entries of a 4-bit weight)."""

    sizes: dict[str, int]  # key -> bytes it will take
    make: Callable[[], dict[str, torch.Tensor]]  # -> {key: tensor}, exactly the keys of `sizes`

    @classmethod
    def of(cls, key: str, tensor: torch.Tensor) -> Part:
        return cls({key: tensor.numel() * tensor.element_size()}, lambda: {key: tensor})

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


def plan(parts: list[Part], max_bytes: int) -> list[list[Part]]:
    """Parts in order, into shards of at most `max_bytes` each; a part larger than that is a
    shard on its own (as transformers does with a tensor larger than the limit)."""
    shards: list[list[Part]] = [[]]
    used = 0
    for part in parts:
        if shards[-1] and used + part.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(part)
        used += part.nbytes
    return shards if shards[0] else []


def write(parts: list[Part], directory: pathlib.Path, max_bytes: int) -> list[str]:
    """Write `parts` into `directory` as shards (+ index when more than one); the file names."""
    from safetensors.torch import save_file

    shards = plan(parts, max_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors, storages = {}, set()
        for part in shard:
            made = part.make()
            if set(made) != set(part.sizes):
                raise RuntimeError(f"a part promised keys {sorted(part.sizes)} but made {sorted(made)}")
            for k, t in made.items():
                t = t.detach().cpu().contiguous()
                ptr = t.untyped_storage().data_ptr()
                if t.numel() and ptr in storages:  # safetensors refuses shared storage (the NF4 code table)
                    t = t.clone()
                storages.add(t.untyped_storage().data_ptr())
                tensors[k] = t
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def checkpoint_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint: a directory with an index (sharded), a directory
    with model.safetensors, or one .safetensors file. Pickle checkpoints are refused."""
    path = pathlib.Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file; lowrank reads safetensors only "
                             "(pickle checkpoints can run code when loaded)")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a directory with {INDEX} or {SINGLE}, "
                                "or a .safetensors file")
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path / INDEX}: not a safetensors index (a JSON object with a weight_map): {e}") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX} names shards that are not there: {missing}")
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise FileNotFoundError(f"{path} has neither {SINGLE} nor {INDEX}: not a safetensors model directory; it holds {sorted(p.name for p in path.iterdir())[:10]}")


def read(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (one file, or the shards its index names); a corrupt
    or truncated file raises ValueError naming it."""
    from safetensors.torch import load_file

    out = {}
    for f in checkpoint_files(path):
        try:
            out |= load_file(f)
        except Exception as e:  # safetensors' own error types vary by version
            raise ValueError(f"{f}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    return out


# Note: atomic directories. Everything is written into a temporary directory beside the
# target (same file system), each file fsynced. A new target is then one rename. An existing
# one is swapped with the temporary directory in one step (Linux renameat2 with
# RENAME_EXCHANGE, see `exchange`), and the old contents, now under the temporary name, are
# deleted: a reader or a kill at any instant finds the whole old directory or the whole new
# one under the target's name. Where the system cannot exchange, the old target is renamed
# aside first and the new one renamed in: a kill between the two leaves no target, and the
# previous one whole in a hidden `.<name>.*.old` beside it. A failure before the swap removes
# the temporary directory and leaves the target as it was.
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100  # fcntl.h: paths relative to the working directory


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the paths `a` and `b` (two existing directories) in one step; True when done,
    False (nothing changed) where the system or its file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system without it, an old kernel
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _fsync_dir(path: pathlib.Path) -> None:
    """open + fsync: a file's data, or a directory's entries (a rename in it), on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_directory(parent: pathlib.Path, prefix: str, suffix: str) -> pathlib.Path:
    """A new empty directory `parent/<prefix><8 random hex digits><suffix>`, as tempfile.mkdtemp
    makes one but with the mode a plain mkdir gives (0o777 less the umask), not mkdtemp's 0o700:
    it is renamed into place as the directory others read (a server running as another user)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name {prefix}<random>{suffix} in {parent} after 100 tries")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False,
                     carry_over: bool = False) -> Iterator[pathlib.Path]:
    """`with atomic_directory(out) as tmp:` write into tmp; on success it becomes `out` (See
    Note: atomic directories). `carry_over`: tmp starts with what `out` holds, so the files the
    block does not rewrite survive the swap; they are hard links to the old files where the file
    system allows (no copy of a trainer's checkpoints beside an adapter on every save), so the
    block must replace a carried file it rewrites (unlink, then write), never write into it."""
    # a symbolic link: the directory it points to is replaced and the link kept (swapping the link
    # itself turned it into a directory); "." and its parents cannot be swapped out from under us
    target = pathlib.Path(os.path.realpath(target))
    if target == pathlib.Path.cwd() or target in pathlib.Path.cwd().parents:
        raise ValueError(f"{target} is the current directory or holds it; write into a new directory below it")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    if os.path.ismount(target):  # a volume (Docker's /output): neither renamed nor swapped, EBUSY after all the writing
        raise ValueError(f"{target} is a mount point, which cannot be replaced in one step; write into a new "
                         f"directory inside it (e.g. {target / 'model'})")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_directory(target.parent, f".{target.name}.", ".tmp")
    try:
        if target.is_dir():  # replacing a directory keeps its permissions, as writing into it would
            shutil.copymode(target, tmp)
        if carry_over and target.is_dir():
            # a symbolic link comes over as the link (checkpoint-last -> checkpoint-500, data -> /datasets):
            # followed, it was a copy of what it points to on every save, and `up -> ..` never ended
            for f in target.iterdir():
                if f.is_dir() and not f.is_symlink():
                    shutil.copytree(f, tmp / f.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(f, tmp / f.name)
        yield tmp
        for f in tmp.iterdir():
            # not a carried symbolic link: what it points to was not written here, and may sit on a file system
            # that refuses fsync (/proc, some FUSE mounts: EINVAL failed the save); the link itself is an entry of tmp
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists() and exchange(tmp, target):
            _fsync_dir(target.parent)
            _discard(tmp)  # the old contents, swapped out
            return
        old = None
        if target.exists():
            old = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / "x")
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            _discard(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """dst as a hard link to src, or a copy where the file system has no hard links (FAT, some
    network and FUSE file systems) or refuses this one. A symbolic link stays one (macOS's link()
    would follow it)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except (OSError, NotImplementedError):  # the latter: a system without linkat (os.supports_follow_symlinks)
        shutil.copy2(src, dst, follow_symlinks=False)


LOCK_FILE = ".lowrank.lock"


@contextlib.contextmanager
def held_directory(directory: str | os.PathLike) -> Iterator[None]:
    """Hold `directory` (made if missing) for one writer during the block: an exclusive flock on
    its `.lowrank.lock` file, which stays behind empty of meaning (the kernel drops the lock when
    the block ends or the process dies; no stale lock to clean). Another holder: BlockingIOError
    naming its process id. Without fcntl (Windows), or on a file system that has no locks, the
    block runs unheld. A directory it made that the block leaves empty but for the lock goes again,
    with the parents it made, the lock still held (a run refused by a later check leaves no output_dir behind)."""
    path = pathlib.Path(directory)
    made = [p for p in (path, *path.parents) if not p.exists()]  # what mkdir makes, the deepest first
    for _ in range(10):  # See Note: a lock file removed under us
        path.mkdir(parents=True, exist_ok=True)
        f = _flock(path)
        if f is not None:
            break
    else:
        raise BlockingIOError(errno.EWOULDBLOCK, f"another process keeps removing {path}")
    try:
        with f:
            try:
                yield
            finally:  # still holding the lock: a run refused by it never removes what its holder has
                _remove_made(path, made)
    finally:
        if sys.platform == "win32":  # no lock there, and an open file cannot be deleted
            _remove_made(path, made)


def _remove_made(path: pathlib.Path, made: list[pathlib.Path]) -> None:
    with contextlib.suppress(OSError):
        if made and [p.name for p in path.iterdir()] == [LOCK_FILE]:
            (path / LOCK_FILE).unlink()
            for p in made:  # and the parents it made (an OSError, one not empty, ends it)
                p.rmdir()


# Note: a lock file removed under us. A run that made output_dir removes it (and the lock file) at
# its end, still holding the lock. A second run that opened the lock file before then holds, once
# the first closes it, a lock on a file no longer at that path, which any third run would not see:
# having the lock, it checks the path still names the file it locked, and else starts again.
def _flock(path: pathlib.Path):
    """The lock file, open and locked (unlocked where locks are not to be had); None when it was removed
    before the lock was taken; BlockingIOError when another process holds it."""
    lock = path / LOCK_FILE
    try:
        f = open(lock, "a+")
    except PermissionError:  # another user's lock file (a shared output_dir): flock needs no write access
        if not lock.is_file():
            raise
        f = open(lock)
    except FileNotFoundError:  # output_dir removed since mkdir
        return None
    try:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise BlockingIOError(errno.EWOULDBLOCK, f"another process (pid {holder}) is writing to {path}") from None
        except OSError as e:  # a file system without locks (some NFS mounts: ENOLCK): run unheld, as on Windows
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
                raise  # EBADF: NFS locks need a file open for writing, which another user's is not here
        except ImportError:  # no fcntl: Windows
            pass
        else:
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:
                f.close()
                return None
            if f.writable():  # the holder's pid, for the refusal of a second run
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()}\n")
                f.flush()
    except BaseException:
        f.close()
        raise
    return f


def _discard(old: pathlib.Path) -> None:
    """Delete a replaced directory's contents. The new one is in place by then: what cannot be deleted (a
    file still open or mapped on NFS, renamed .nfsXXXX) is left with a warning, not an error for a save that
    succeeded."""
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        logging.getLogger("lowrank").warning("could not delete all of %s (the directory it replaced); delete it later", old)
