"""benchmarks/sass_triton.py compiles the Triton kernels for sm_90 on this GPU-less machine and
reads their SASS back. In a process of its own: the test session runs Triton's interpreter
(tests/conftest.py), whose kernels carry their interpreter configs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]

if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
    pytest.skip("this Triton ships no cuobjdump", allow_module_level=True)


def sass_triton(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU's code paths
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_triton.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def test_every_kernel_branch_compiles_for_the_gpu():
    """The interpreter tests never compile a kernel; this compiles one variant of each branch
    of each Triton kernel for sm_90 (dtypes, M = 1 and tl.dot, both decode paths and lookups,
    plain scales, whole and partial dequantize programs, the fused matmuls)."""
    done = sass_triton("--check")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("compiled ") >= 20 and "0 variant(s) failed" in done.stdout


def test_quick_run_reads_the_kernels(tmp_path):
    out = tmp_path / "sass.json"
    done = sass_triton("--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows.keys() == {"gemv M=1", "gemv M=16", "dequantize"}
    for r in rows.values():
        assert 0 < r["regs"] <= 255 and r["instructions"] > r["weights_per_thread"] > 0
        assert r["per_weight"] == pytest.approx(r["instructions"] / r["weights_per_thread"])
    # See Note: the GEMV's inner loop (lowrank/ops/triton_gemv.py): nothing crosses threads in
    # the M = 1 loop. The version that summed every step across threads had 192 shuffles here.
    assert rows["gemv M=1"]["shuffles"] == 0
