"""One spawn of WORLD gloo ranks runs every case (tests/distributed/cases.py) for the whole
folder; each test reads the results it checks. Single-process references are computed here,
in the test process, once per (config, base)."""

import functools

import pytest
import torch

if not torch.distributed.is_available():  # a PyTorch build without torch.distributed: nothing here can run
    collect_ignore_glob = ["test_*.py"]
else:
    from . import cases, spawn


@pytest.fixture(scope="session")
def ranks(tmp_path_factory) -> list[dict]:
    """[results of rank 0, results of rank 1]: {case name: result dict}."""
    out = tmp_path_factory.mktemp("ranks")
    spawn.run_ranks(cases.worker, cases.WORLD, str(out), (str(out),))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(cases.WORLD)]


@functools.cache
def _reference(config: str, base: str):
    return cases.train_single(config, base)


@pytest.fixture(scope="session")
def reference():
    """reference(config, base) -> the model trained in one process on the global batch."""
    return _reference


def result(ranks: list[dict], rank: int, case: str) -> dict:
    r = ranks[rank][case]
    assert "error" not in r, f"rank {rank}, case {case}:\n{r['error']}"
    return r
