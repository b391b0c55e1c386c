"""Run a function on N local ranks (gloo, CPU) from a test, with a deadline.

Ranks meet through a FileStore in a temporary directory, not a TCP port, so concurrent
test runs cannot collide on a port. A rank that raises fails the test with its traceback;
ranks still running at the deadline are killed and the test fails, rather than blocking CI.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60  # a collective that waits longer raises in the rank (e.g. a peer died)


# Note: a rank ends with os._exit. DistributedDataParallel keeps its gloo process group alive past
# destroy_process_group (seen with torch 2.13: still so with the DDP model and its reducer deleted
# and gc.collect run; a broadcast or an all_reduce alone does not): the group's worker threads
# (pt_gloo_runloop) and gloo's socket loop (gloo_tcp_loop) still run when the rank's function has
# returned, through the interpreter's shutdown and the C++ static destructors, while the peer's
# exit closes the sockets under them. A rank that aborted there ("terminate called without an
# active exception": a joinable std::thread destroyed) would fail a test whose results were all
# written (one SIGABRT of test_wrapped.py, not reproduced since, may have been that). So a rank that
# finished cleanly leaves at once: the parent reads only its exit code and the files it wrote.


def _entry(rank: int, world: int, store_file: str, fn, args: tuple) -> None:
    # an abort (SIGABRT) or crash in a rank prints every thread's Python stack to its stderr, which
    # the failing test shows: where it happened (init, a collective, teardown), not just the signal
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)  # See Note: one thread (tests/distributed/cases.py)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world, *args)
        dist.barrier()  # every rank done before the group goes: an early teardown can abort a peer (gloo)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # See Note: a rank ends with os._exit (an error above propagates to the parent as before)


def run_ranks(fn, world: int, workdir: str, args: tuple = (), deadline_s: float = 240) -> None:
    """Call fn(rank, world, *args) in `world` spawned processes with a gloo process group;
    raise if any rank fails or the deadline passes."""
    store_file = os.path.join(workdir, "store")
    ctx = mp.start_processes(_entry, args=(world, store_file, fn, args), nprocs=world, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(end - time.monotonic(), 0.1)):  # raises when a rank failed
        if time.monotonic() >= end:
            for p in ctx.processes:  # only the ranks this call started
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} ranks of {fn.__name__} still running after {deadline_s} s: killed")


def torchrun(args: list[str], cwd, deadline_s: float, nproc: int = 2, env: dict | None = None) -> str:
    """`torchrun --standalone --nproc_per_node nproc ARGS` in `cwd` with the repository on the
    path; its output. Fails the test on a non-zero exit, or at the deadline, killing every rank."""
    import pathlib
    import signal
    import subprocess

    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the ranks die with it on a timeout
    try:
        log, _ = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"torchrun ran past {deadline_s} s:\n{log[-4000:]}") from None
    assert proc.returncode == 0, log[-4000:]
    return log
