"""bench_nf4_cuda.fits: the straight line through a provider's M = 1 times (fixed part + bytes at a
marginal rate), which says what a GEMV can still gain (docs/csrc.md, Why mma-lut is not yet 3x bf16)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_nf4_cuda  # noqa: E402


def row(provider, nbytes, ms, m=1, op="linear"):
    return dict(op=op, N=1, K=1, M=m, provider=provider, ms=ms, gbps=nbytes / ms / 1e6)


def test_a_line_is_recovered_exactly():
    sizes = [8e6, 30e6, 117e6]
    rows = [row("k", b, 0.009 + b / 3.5e9) for b in sizes]  # 9 us fixed, 3.5 TB/s (3.5e9 bytes a ms)
    rows += [row("k", 1e6, 1.0, m=16), row("k", 1e6, 1.0, op="dequantize")]  # neither M = 1 nor linear: left out
    (fit,) = bench_nf4_cuda.fits(rows)
    assert fit["provider"] == "k" and fit["M"] == 1
    assert fit["ms"] == pytest.approx(0.009, rel=1e-9) and fit["gbps"] == pytest.approx(3.5e3, rel=1e-9)


def test_fewer_than_three_shapes_give_no_line():
    assert bench_nf4_cuda.fits([row("k", 8e6, 0.01), row("k", 30e6, 0.02), row("k", 30e6, 0.021)]) == []
