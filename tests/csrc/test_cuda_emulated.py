"""lowrank's CUDA kernels executed on the CPU: csrc/nf4_cuda_*.cu compiled by g++ against the CPU
emulator of tests/csrc/emulator (every CUDA thread a fiber, warps meeting at mma.sync and shuffles,
CTAs at barriers; csrc/nf4_cuda_device.h, Note: the CPU emulator), called through the same entry
points and launchers as on a GPU (nf4_gemv_cuda, nf4_dequantize_cuda). The kernels' own source
runs, so their indexing, lane layouts, staging, barriers and routing are tested without a GPU;
what is not: timing, concurrency between CTAs, the hardware's mma rounding (the emulated mma
rounds each exact step once, within tests/ops/bounds.py's bound like the tensor cores). The gpu
tests (test_cuda_kernels.py) run the same checks on a real GPU at larger sizes."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from lowrank.ops import csrc
from lowrank.quant import nf4
from tests.csrc.operands import lut_operand
from tests.ops.bounds import assert_matmul_close, assert_within_bound

ROOT = pathlib.Path(__file__).resolve().parents[2]
EMULATOR = ROOT / "tests" / "csrc" / "emulator"
SOURCES = ["nf4_cuda_dequantize", "nf4_cuda_gemv", "nf4_cuda_gemv_staged", "nf4_cuda_gemv_lut"]
MMA, SIMT, STAGED, STAGED2, LUT, DEEP = 1, 2, 3, 4, 5, 6  # csrc/nf4_cuda.h kGemv*
TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/nf4_cuda.h CudaType
INVALID = 3  # run_kernels' exit status when the entry point returned an error


def cuda_include() -> pathlib.Path | None:
    for root in [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(map(str, pathlib.Path("/usr/local").glob("cuda-*")))]:
        if root and (pathlib.Path(root) / "include" / "cuda_bf16.h").is_file():
            return pathlib.Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> pathlib.Path:
    gxx, include = shutil.which("g++"), cuda_include()
    if gxx is None or include is None:
        pytest.skip("needs g++ and CUDA's headers (cuda_bf16.h) to compile the kernels for the emulator")
    out = tmp_path_factory.mktemp("emulator")
    # -fno-strict-aliasing: the kernels read vector loads through T* (fine for nvcc, not for g++ -O2)
    flags = ["-std=c++17", "-O2", "-fno-strict-aliasing", "-ffp-contract=off", "-DLOWRANK_CUDA_EMULATOR",
             "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}", f"-I{include}"]
    jobs = [[gxx, *flags, "-include", str(EMULATOR / "cuda_emulator.h"), "-x", "c++", "-c",
             str(ROOT / "csrc" / f"{name}.cu"), "-o", str(out / f"{name}.o")] for name in SOURCES]
    jobs += [[gxx, *flags, "-c", str(EMULATOR / f"{name}.cpp"), "-o", str(out / f"{name}.o")]
             for name in ("cuda_emulator", "run_kernels")]
    for done in [subprocess.run(job, capture_output=True, text=True) for job in jobs]:
        assert done.returncode == 0, done.stderr[-4000:]
    exe = out / "run_kernels"
    link = subprocess.run([gxx, *map(str, sorted(out.glob("*.o"))), "-o", str(exe)], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-4000:]
    return exe


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view({torch.float32: torch.int32}.get(t.dtype, torch.int16)).numpy().tobytes()


def run(exe, q, dtype, x=None, bias=None, kernel=0, env=None):
    """(exit status, result): nf4_gemv_cuda(x, q, bias, kernel) when x is given, else nf4_dequantize_cuda;
    env: environment variables to set for the call."""
    n, k = q.shape
    nested = q.nested_absmax is not None
    header = [0 if x is None else 1, TYPES[dtype], n, k, 0 if x is None else x.shape[0], q.blocksize, int(nested),
              kernel, int(bias is not None)]
    parts = [np.array(header, dtype=np.int64).tobytes(), q.packed.numpy().tobytes(), q.absmax.numpy().tobytes()]
    if nested:
        parts += [q.nested_absmax.float().numpy().tobytes(), q.offset.float().reshape(1).numpy().tobytes()]
    parts += [raw(t) for t in (x, bias) if t is not None]
    folder = exe.parent
    (folder / "in.bin").write_bytes(b"".join(parts))
    done = subprocess.run([str(exe), str(folder / "in.bin"), str(folder / "out.bin")], capture_output=True, text=True,
                          timeout=600, env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        assert done.returncode == INVALID, done.stderr[-2000:]  # an abort (the emulator's checks) is a failure
        return done.returncode, None
    bits = np.frombuffer((folder / "out.bin").read_bytes(), dtype=np.int32 if dtype == torch.float32 else np.int16)
    return 0, torch.from_numpy(bits.copy()).view(dtype).reshape((n, k) if x is None else (x.shape[0], n))


def bits(t):
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


def gemv(exe, q, x, bias, kernel):
    status, y = run(exe, q, x.dtype, x, bias, kernel)
    assert status == 0
    return y


def exact(x, w, bias):
    """A correct result: the float64 product rounded once to x's dtype (meets the a-priori bound)."""
    y = x.double() @ w.double().T + (0 if bias is None else bias.double())
    return y.to(x.dtype)


@pytest.mark.parametrize("shape, blocksize, double_quant", [((333, 777), 64, True), ((64, 256), 32, False),
                                                            ((7, 9), 64, True), ((16, 4096), 4096, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_dequantize_is_bit_exact(emulator, shape, blocksize, double_quant, dtype):
    q = nf4.quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), blocksize, double_quant)
    status, out = run(emulator, q, dtype)
    assert status == 0 and torch.equal(bits(out), bits(nf4.dequantize(q, dtype)))


# N not a multiple of 16, K not a multiple of the 128-column tile, blocks straddling rows, blocksizes 32 to
# 4096, every n8-tile count of the tensor-core kernels
@pytest.mark.parametrize("shape, blocksize", [((333, 800), 64), ((40, 96), 32), ((50, 800), 256), ((17, 4128), 4096)])
@pytest.mark.parametrize("m", [1, 9, 17, 33])
@pytest.mark.parametrize("kernel", [MMA, SIMT, STAGED, STAGED2])
def test_emulated_gemv_within_the_derived_bound(emulator, shape, blocksize, m, kernel):
    if kernel in (SIMT, STAGED2) and m > 16:
        pytest.skip("up to 16 rows")
    g = torch.Generator().manual_seed(m)
    q = nf4.quantize(torch.randn(shape, generator=g), blocksize, True)
    x, bias = torch.randn(m, shape[1], generator=g).bfloat16(), torch.randn(shape[0], generator=g).bfloat16()
    w = nf4.dequantize(q, torch.bfloat16)
    assert_matmul_close(gemv(emulator, q, x, bias, kernel), exact(x, w, bias), x, w.T, bias)


@pytest.mark.parametrize("kernel", [MMA, SIMT, STAGED, STAGED2])
def test_emulated_gemv_in_float16_and_float32(emulator, kernel):
    q = nf4.quantize(torch.randn(100, 512, generator=torch.Generator().manual_seed(5)), 64, True)
    for dtype in (torch.float16, torch.float32) if kernel == SIMT else (torch.float16,):
        x = torch.randn(6, 512, generator=torch.Generator().manual_seed(6)).to(dtype)
        w = nf4.dequantize(q, dtype)
        assert_matmul_close(gemv(emulator, q, x, None, kernel), exact(x, w, None), x, w.T)


@pytest.mark.parametrize("shape, blocksize, m", [((333, 800), 64, 9), ((17, 2144), 32, 3), ((50, 800), 256, 33)])
def test_emulated_staged_gemv_equals_the_mma_kernel_bit_for_bit(emulator, shape, blocksize, m):
    q = nf4.quantize(torch.randn(shape, generator=torch.Generator().manual_seed(1)), blocksize, True)
    x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(2)).bfloat16()
    assert torch.equal(bits(gemv(emulator, q, x, None, STAGED)), bits(gemv(emulator, q, x, None, MMA)))


# one row tile a CTA (up to 4 rows of x, N < 4096), two (N >= 4096) and four (N >= 8192) with short last
# CTAs; Llama's K with batches and tiles after them; 13 tiles (no batch); blocks straddling rows
@pytest.mark.parametrize("shape, blocksize, m", [((256, 4096), 64, 1), ((256, 4096), 64, 16), ((333, 832), 64, 5),
                                                 ((17, 4160), 4096, 3), ((4100, 128), 64, 5), ((8200, 192), 128, 9),
                                                 ((8192, 64), 64, 33), ((40, 1216), 256, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_lut_gemv_within_the_bound_of_its_operand(emulator, shape, blocksize, m, dtype):
    g = torch.Generator().manual_seed(m)
    q = nf4.quantize(torch.randn(shape, generator=g), blocksize, True)
    x, bias = torch.randn(m, shape[1], generator=g).to(dtype), torch.randn(shape[0], generator=g).to(dtype)
    assert_within_bound(gemv(emulator, q, x, bias, LUT), x, lut_operand(q, dtype).T, bias,
                        extra_roundings=shape[1] // 64)


@pytest.mark.parametrize("m, dtype", [(1, torch.bfloat16), (16, torch.bfloat16), (9, torch.float16), (64, torch.bfloat16)])
def test_emulated_lut_gemv_within_the_bound_the_op_tests_use(emulator, m, dtype):
    """Against the reference's operand too (tests/ops/bounds.py's slack |ref - y64| + 2 E + 2 u (|y64| + E)):
    the operands differ by at most 2 u |W| elementwise (one rounding each way from NF4[c] * scale), which
    that slack covers, so mma-lut could become the ops' GEMV without loosening the op tests."""
    g = torch.Generator().manual_seed(20 + m)
    q = nf4.quantize(torch.randn(512, 2048, generator=g), 64, True)
    x, bias = torch.randn(m, 2048, generator=g).to(dtype), torch.randn(512, generator=g).to(dtype)
    w = nf4.dequantize(q, dtype)
    assert_matmul_close(gemv(emulator, q, x, bias, LUT), exact(x, w, bias), x, w.T, bias)


@pytest.mark.parametrize("m", [1, 16])
def test_emulated_gemv_at_a_llama_shape(emulator, m):
    """4096 x 4096 (Llama's attention projections): mma-lut (2 row tiles a CTA at 16 rows, one trip of
    two batches a warp) and mma-staged2, as the decode path would call them."""
    g = torch.Generator().manual_seed(10 + m)
    q = nf4.quantize(torch.randn(4096, 4096, generator=g), 64, True)
    x, bias = torch.randn(m, 4096, generator=g).bfloat16(), torch.randn(4096, generator=g).bfloat16()
    assert_within_bound(gemv(emulator, q, x, bias, LUT), x, lut_operand(q, torch.bfloat16).T, bias,
                        extra_roundings=4096 // 64)
    w = nf4.dequantize(q, torch.bfloat16)
    assert_matmul_close(gemv(emulator, q, x, bias, STAGED2), exact(x, w, bias), x, w.T, bias)


@pytest.mark.parametrize("n, ks", [(600, [3, 200, 511, 64, 65]), (4112, list(range(0, 512, 37))[:14])])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_lut_gemv_of_one_hot_rows_is_a_column_of_its_operand(emulator, n, ks, dtype):
    """Bit for bit: scale * T(NF4[code]) rounded once (the pair table, the scale of each row and tile)."""
    q = nf4.quantize(torch.randn(n, 512, generator=torch.Generator().manual_seed(4)), 64, True)
    expected = lut_operand(q, dtype).float().to(dtype)  # the float64 product is exact in float32 here
    x = torch.eye(512, dtype=dtype)[ks]
    assert torch.equal(bits(gemv(emulator, q, x, None, LUT)), bits(expected[:, ks].T.contiguous()))


@pytest.mark.parametrize("shape, blocksize", [((333, 800), 64), ((40, 96), 32)])
def test_emulated_lut_gemv_hands_what_it_cannot_do_to_the_staged_kernel(emulator, shape, blocksize):
    """K % 64 != 0 or blocksize 32: the launcher runs mma-staged, bit for bit."""
    q = nf4.quantize(torch.randn(shape, generator=torch.Generator().manual_seed(7)), blocksize, True)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(8)).bfloat16()
    assert torch.equal(bits(gemv(emulator, q, x, None, LUT)), bits(gemv(emulator, q, x, None, STAGED)))


@pytest.mark.parametrize("name", csrc.CUDA_GEMV_KERNELS)  # every name lowrank accepts on import
def test_emulated_auto_gemv_runs_the_kernel_lowrank_cuda_gemv_names(emulator, name):
    """csrc/nf4_cuda_gemv.cu, Note: LOWRANK_CUDA_GEMV: kernel 0 (auto, what the ops call) runs the named
    kernel, bit for bit; mma-staged2 hands more than 16 rows to mma-staged."""
    kernel = {"mma": MMA, "mma-staged": STAGED, "mma-staged2": STAGED2, "mma-lut": LUT, "mma-lut-deep": DEEP}[name]
    q = nf4.quantize(torch.randn(300, 640, generator=torch.Generator().manual_seed(11)), 64, True)
    for m in (3, 20):
        x = torch.randn(m, 640, generator=torch.Generator().manual_seed(m)).bfloat16()
        status, auto = run(emulator, q, torch.bfloat16, x, None, 0, env={"LOWRANK_CUDA_GEMV": name})
        named = STAGED if kernel == STAGED2 and m > 16 else kernel
        assert status == 0 and torch.equal(bits(auto), bits(gemv(emulator, q, x, None, named))), (name, m)
    status, _ = run(emulator, q, torch.bfloat16, x, None, 0, env={"LOWRANK_CUDA_GEMV": "lut"})
    assert status == INVALID  # a name it does not know: every auto call fails


@pytest.mark.parametrize("k", [832, 4608, 8192])  # tiles a warp: 2 (no whole batch of 8), 9 (one and a tile), 16 (two)
def test_emulated_deep_lut_gemv_equals_mma_lut_bit_for_bit(emulator, k):
    """csrc/nf4_cuda_gemv_lut.cu, Note: deep batches: batches of 8 tiles instead of 4 change when codes
    are loaded, not the order of the sums: the same bits at every row count (deep only up to 8)."""
    q = nf4.quantize(torch.randn(40, k, generator=torch.Generator().manual_seed(k)), 64, True)
    for m in (1, 5, 8, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        deep = gemv(emulator, q, x, None, DEEP)
        assert torch.equal(bits(deep), bits(gemv(emulator, q, x, None, LUT))), (k, m)
        assert_within_bound(deep, x, lut_operand(q, torch.bfloat16).T, None, extra_roundings=k // 64)


def test_emulated_auto_gemv_defaults_to_mma_lut(emulator):
    """LOWRANK_CUDA_GEMV unset or empty: auto runs mma-lut (the fastest on the H200, 2026-11-30), and
    hands K % 64 != 0 to mma-staged as mma-lut does."""
    for shape in ((300, 640), (40, 96)):
        q = nf4.quantize(torch.randn(shape, generator=torch.Generator().manual_seed(12)), 64, True)
        x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(13)).bfloat16()
        status, auto = run(emulator, q, torch.bfloat16, x, None, 0, env={"LOWRANK_CUDA_GEMV": ""})
        assert status == 0 and torch.equal(bits(auto), bits(gemv(emulator, q, x, None, LUT))), shape
        assert not torch.equal(bits(auto), bits(gemv(emulator, q, x, None, MMA))) or shape[1] % 64, shape


def test_emulated_gemv_refuses_what_it_cannot_do(emulator):
    q = nf4.quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(9)), 64, True)
    for m, kernel in ((65, LUT), (65, DEEP), (65, MMA), (17, STAGED2), (17, SIMT), (1, 7)):
        status, _ = run(emulator, q, torch.bfloat16, torch.zeros(m, 256, dtype=torch.bfloat16), None, kernel)
        assert status == INVALID, (m, kernel)
