"""benchmarks/sass_csrc.py compiles csrc/nf4_cuda_gemv*.cu for sm_90a with nvcc on this GPU-less
machine and counts what the tensor-core GEMVs' K loops execute."""

import json
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
    pytest.skip("this Triton ships no cuobjdump", allow_module_level=True)
try:
    import sass_csrc

    sass_csrc.nvcc()
except SystemExit:
    pytest.skip("no nvcc: the CUDA sources cannot be compiled here", allow_module_level=True)


def test_counts_the_tensor_core_kernels(tmp_path):
    out = tmp_path / "sass.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_csrc.py"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {(r["kernel"], r["MT"]): r for r in json.loads(out.read_text())["rows"]}
    lut = ("mma-lut", "mma-lut-rt2", "mma-lut-rt4")
    deep = ("mma-lut-deep", "mma-lut-deep-rt2", "mma-lut-deep-rt4")  # up to 8 rows: MT = 1 only
    assert rows.keys() == {(k, mt) for k in ("mma", "mma-staged", *lut) for mt in (1, 2, 4, 8)} | {
        ("mma-staged2", 1), ("mma-staged2", 2)} | {(k, 1) for k in deep}
    for (kernel, mt), r in rows.items():
        assert 0 < r["regs"] <= 255 and r["instructions"] > r["weights_per_lane"] > 0
        assert r["per_weight"] == pytest.approx(r["decode"] + r["other"])
        # See Note: staged scales (csrc/nf4_cuda_gemv_staged.cu): a trip of the loop loads the codes of its
        # tiles (16 bytes a row) and x (8 words a tile and n8 tile), and no scale (shared memory):
        # mma-staged 2 tiles x 1 row tile, mma-staged2 1 tile x 2 row tiles sharing the x it loads.
        if kernel == "mma-staged":
            assert r["LDG"] == 2 * (2 + 8 * mt), r
        if kernel == "mma-staged2":
            assert r["LDG"] == 4 + 8 * mt and r["regs"] <= 128, r  # 512 threads a CTA: 128 registers at most
        # mma-lut (csrc/nf4_cuda_gemv_lut.cu): a trip is two batches of U tiles (U = 4 up to 16 rows, else 2),
        # a tile 8 bytes of codes a row (2 loads) and 16 columns of x an n8 tile (2 loads), no scale.
        if kernel in lut:  # any number of row tiles a CTA: a warp holds one
            assert r["LDG"] == 2 * (4 if mt <= 2 else 2) * (2 + 2 * mt), r
        if kernel in deep:  # two batches of 8 tiles a trip
            assert r["LDG"] == 2 * 8 * (2 + 2 * mt) and r["regs"] <= 255, r
