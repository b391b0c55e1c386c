"""run_ranks (tests/distributed/spawn.py) as CI needs it on a loaded machine: a rank that finished
its work and tore its group down cleanly passes, whatever its interpreter's shutdown would do (See
Note: a rank ends with os._exit); and a rank that aborts says where, every thread's Python stack on
its stderr, not only "terminated with signal SIGABRT"."""

import atexit
import os

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

from . import spawn


def _ddp_then_abort_at_exit(rank: int, world: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel(torch.nn.Linear(4, 4))  # leaves gloo's threads running past destroy_process_group
    torch.save({"rank": rank}, os.path.join(out, f"done{rank}.pt"))
    atexit.register(os.abort)  # stands for an abort in the shutdown: after the work, after the teardown


def _abort_in_the_work(rank: int, world: int, out: str) -> None:
    if rank == 1:
        os.abort()
    torch.distributed.barrier()  # rank 0 waits for rank 1 here until run_ranks ends it


def test_a_rank_that_finished_cleanly_passes_whatever_its_shutdown_does(tmp_path):
    spawn.run_ranks(_ddp_then_abort_at_exit, 2, str(tmp_path), (str(tmp_path),), deadline_s=120)
    assert [torch.load(tmp_path / f"done{r}.pt")["rank"] for r in range(2)] == [0, 1]


def test_a_rank_that_aborts_prints_where(tmp_path, capfd):
    with pytest.raises(ProcessExitedException, match="SIGABRT"):
        spawn.run_ranks(_abort_in_the_work, 2, str(tmp_path), (str(tmp_path),), deadline_s=120)
    err = capfd.readouterr().err
    assert "Fatal Python error: Aborted" in err and "_abort_in_the_work" in err  # faulthandler's report
