"""_common.kernel_ms: a call's kernels alone, from the profiler (benchmarks/_common.py, Note: kernel
time), and bench_nf4_linear --kernel-time, which adds it to every row."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_nf4_linear  # noqa: E402


def test_no_kernel_time_off_cuda():
    assert _common.kernel_ms(lambda: torch.ones(4) * 2, torch.device("cpu")) is None


def test_bench_nf4_linear_kernel_time_column(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_nf4_linear, "KERNEL_TIME", False)  # main sets both; restored after the test
    monkeypatch.setattr(bench_nf4_linear, "COLUMNS", bench_nf4_linear.COLUMNS)
    backends = bench_nf4_linear.lowrank_backends  # the interpreter's Triton runs are slow and time nothing here
    monkeypatch.setattr(bench_nf4_linear, "lowrank_backends", lambda device: [p for p in backends(device) if "triton" not in p[0]])
    monkeypatch.setattr(bench_nf4_linear, "peers", lambda w: {})
    out = tmp_path / "l.json"
    assert bench_nf4_linear.main(["--quick", "--kernel-time", "--shapes", "48x128", "--ms", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["provider"] for r in rows} >= {"bf16", "lowrank-reference"}
    assert all("kernel_ms" in r and r["kernel_ms"] is None for r in rows)  # on the CPU: no kernels to add up
    assert "kernel_ms" in out.with_suffix(".md").read_text()


@pytest.mark.gpu
def test_kernel_time_leaves_the_host_out():
    """A call that sleeps 2 ms on the host before its kernel: CUDA events see the sleep, the
    profiler's kernel durations do not (they match the same call without it)."""
    device = torch.device("cuda")
    a, x = torch.randn(4096, 4096, device=device), torch.randn(4096, 1, device=device)
    fast = lambda: a @ x  # noqa: E731
    slow = lambda: (time.sleep(0.002), a @ x)  # noqa: E731
    events_ms = _common.bench(slow, device)[0]
    fast_ms, slow_ms = _common.kernel_ms(fast, device), _common.kernel_ms(slow, device)
    assert events_ms >= 2.0
    assert 0 < fast_ms < 1.0 and 0 < slow_ms < 1.0  # a 64 MiB matrix-vector product: tens of microseconds
    assert abs(slow_ms - fast_ms) <= 0.5 * max(fast_ms, slow_ms)
