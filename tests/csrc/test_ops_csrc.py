"""The csrc backend through the lowrank:: ops: opcheck, the backend table, the fallbacks for
what the GEMV does not cover, and the package without lowrank._C (LOWRANK_NO_EXT=1)."""

import os
import subprocess
import sys

import pytest
import torch

from lowrank import nf4, ops
from lowrank.ops import backends, csrc
from tests.ops.bounds import assert_matmul_close

pytestmark = pytest.mark.skipif(os.environ.get("LOWRANK_NO_EXT") == "1", reason="LOWRANK_NO_EXT=1: no lowrank._C")


@pytest.fixture
def forced_csrc(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "csrc")


def weight(n_out, k_in, blocksize=64, double_quant=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(n_out * k_in)
    return nf4.quantize(torch.randn(n_out, k_in, generator=g).to(dtype), blocksize, double_quant)


def fields(q):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)


def test_csrc_is_built_and_preferred_on_cpu(monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    assert csrc._C is not None, "lowrank._C did not load; build it: pip install --no-build-isolation -e ."
    for op in ("nf4_dequantize", "nf4_linear", "nf4_linear_grad_input"):
        assert backends.choose(op, torch.device("cpu"))[0] == "csrc"


@pytest.mark.parametrize("double_quant", [True, False])
def test_opcheck_dequantize(forced_csrc, double_quant):
    q = weight(9, 13, 32, double_quant)  # 117 elements: a short block and an odd byte
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.lowrank.nf4_dequantize.default, (*fields(q), dtype))
        assert torch.equal(ops.nf4_dequantize(q, dtype), nf4.dequantize(q, dtype))


@pytest.mark.parametrize("m", [1, 4, 16, 17])  # 17: past the GEMV, dequantize + F.linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_linear_and_its_gradients(forced_csrc, m, dtype):
    q = weight(24, 128, 64)
    x = torch.randn(m, 128, dtype=dtype, requires_grad=True)
    bias = torch.randn(24, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank.nf4_linear.default, (x, *fields(q), bias))
    torch.library.opcheck(torch.ops.lowrank.nf4_linear_grad_input.default, (torch.randn(m, 24, dtype=dtype), *fields(q)))
    w = nf4.dequantize(q, dtype)  # (N, K) in x.dtype, the reference's operand
    y = ops.nf4_linear(x, q, bias)
    assert_matmul_close(y.detach(), torch.nn.functional.linear(x, w, bias).detach(), x.detach(), w.T, bias.detach())
    g = torch.randn_like(y)
    y.backward(g)
    assert_matmul_close(x.grad, g @ w, g, w)  # grad_x = grad_y @ W


def test_shapes_the_gemv_does_not_take_fall_back_exactly(forced_csrc):
    """K = 96 is not a multiple of blocksize 64 and x is not contiguous: csrc dequantizes (bit-exact)
    and calls F.linear, which is the reference's own computation, so the results are equal."""
    q = weight(10, 96, 64)
    x = torch.randn(96, 3).T  # (3, 96), a transposed view
    ref = backends.implementation("nf4_linear", "reference")(x, *fields(q), None)
    assert torch.equal(ops.nf4_linear(x, q), ref)


def test_an_empty_k_is_the_empty_product(forced_csrc):
    # K = 0 divided M = x.numel() / K in the C++ GEMV's dispatch: SIGFPE, the process killed
    q = nf4.quantize(torch.empty(8, 0), 64)
    bias = torch.randn(8)
    x = torch.randn(2, 3, 0, requires_grad=True)
    y = ops.nf4_linear(x, q, bias)
    assert torch.equal(y, bias.expand(2, 3, 8))
    y.sum().backward()
    assert x.grad.shape == (2, 3, 0)
    with pytest.raises(RuntimeError, match="K must be a positive multiple of 32"):
        csrc._C.nf4_linear_cpu(x.detach(), *fields(q), None)


@pytest.mark.parametrize("backend", ["csrc", "reference"])
def test_packed_as_bitsandbytes_stores_it_is_taken(monkeypatch, backend):
    # (bytes, 1), the layout of bitsandbytes' state dicts: the ops check numel, the reference indexed with it
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    q = weight(8, 64, 32)
    args = (q.packed.view(-1, 1), q.absmax, q.nested_absmax, q.offset, [8, 64], 32)
    assert torch.equal(torch.ops.lowrank.nf4_dequantize(*args, torch.float32), nf4.dequantize(q))
    x = torch.randn(3, 64)
    assert torch.equal(torch.ops.lowrank.nf4_linear(x, *args, None), ops.nf4_linear(x, q))


@pytest.fixture
def python_calls():
    """Counts the calls lowrank._C's C++ kernels hand back to the ops' Python kernels
    (csrc/dispatch.h, Note: the ops in C++): {op: calls}."""
    from lowrank.ops import library

    calls = {"dequantize": 0, "linear": 0, "grad_input": 0}

    def counting(name, kernel):
        def call(*args):
            calls[name] += 1
            return kernel(*args)
        return call

    kernels = (library.dequantize_kernel, library.linear_kernel, library.grad_input_kernel)
    csrc._C.set_python_kernels(*(counting(n, k) for n, k in zip(calls, kernels)))
    yield calls
    csrc._C.set_python_kernels(*kernels)


@pytest.mark.parametrize("forced", [None, "csrc", " CSRC "])
def test_cpu_calls_run_in_cpp_without_python(monkeypatch, python_calls, forced):
    """Every op, on and off the GEMV, forward and backward: no Python kernel runs, and the
    results are the csrc backend's (the same functions, called from Python)."""
    if forced is None:
        monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LOWRANK_BACKEND", forced)
    q = weight(24, 128, 64)
    for m in (1, 17):  # the GEMV, then dequantize + at::linear
        x = torch.randn(m, 128, dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(24, dtype=torch.bfloat16)
        y = ops.nf4_linear(x, q, bias)
        assert torch.equal(y, csrc.nf4_linear(x.detach(), *fields(q), bias))
        g = torch.randn_like(y)
        y.backward(g)
        assert torch.equal(x.grad, csrc.nf4_linear_grad_input(g, *fields(q)))
    assert torch.equal(ops.nf4_dequantize(q, torch.float16), csrc.nf4_dequantize(*fields(q), torch.float16))
    assert python_calls == {"dequantize": 0, "linear": 0, "grad_input": 0}


def test_cpu_calls_the_cpp_kernels_do_not_take_go_to_python(monkeypatch, python_calls):
    """Another backend forced, a non-contiguous weight, arguments the ops refuse: each goes to
    the Python kernel, which answers as it always did."""
    q = weight(10, 64, 32)
    x = torch.randn(2, 64)
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    assert torch.equal(ops.nf4_linear(x, q), backends.implementation("nf4_linear", "reference")(x, *fields(q), None))
    assert torch.equal(ops.nf4_dequantize(q), nf4.dequantize(q))
    assert python_calls == {"dequantize": 1, "linear": 1, "grad_input": 0}
    monkeypatch.delenv("LOWRANK_BACKEND")
    absmax = torch.stack([q.absmax, q.absmax], 1)[:, 0]  # the same values, every other byte
    assert not absmax.is_contiguous()
    y = torch.ops.lowrank.nf4_linear(x, q.packed, absmax, q.nested_absmax, q.offset, [10, 64], 32, None)
    assert torch.equal(y, csrc.nf4_linear(x, *fields(q), None)) and python_calls["linear"] == 2
    with pytest.raises(RuntimeError, match="blocksize must be one of"):
        torch.ops.lowrank.nf4_linear(x, q.packed, q.absmax, q.nested_absmax, q.offset, [10, 64], 48, None)
    with pytest.raises(RuntimeError, match="x has 63 features in its last dimension"):
        torch.ops.lowrank.nf4_linear(x[:, :63], *fields(q), None)
    assert python_calls["linear"] == 4
    monkeypatch.setenv("LOWRANK_PYTHON_OPS", "1")  # every call to Python: the same csrc results
    assert torch.equal(ops.nf4_linear(x, q), csrc.nf4_linear(x, *fields(q), None))
    assert python_calls == {"dequantize": 1, "linear": 5, "grad_input": 0}


def test_cpu_isa_can_be_capped_from_the_environment():
    code = "from lowrank.ops import csrc; print(csrc._C.cpu_isa())"
    env = {**os.environ, "LOWRANK_CPU_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_without_the_extension_everything_runs_on_the_reference():
    """LOWRANK_NO_EXT=1 at run time is the package without lowrank._C: one log line says so, the
    ops run on the reference and give its results, with library.py's autograd."""
    code = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from lowrank import nf4, ops
from lowrank.ops import backends, csrc
assert csrc._C is None
q = nf4.quantize(torch.randn(8, 64), 32)
assert torch.equal(ops.nf4_dequantize(q), nf4.dequantize(q))
x = torch.randn(2, 64, requires_grad=True)
ops.nf4_linear(x, q).sum().backward()  # library.py's Python autograd (no C++ one without _C)
assert not csrc.CPP_AUTOGRAD and x.grad.shape == (2, 64)
print(backends.available("nf4_linear"))
"""
    env = {**os.environ, "LOWRANK_NO_EXT": "1", "TRITON_INTERPRET": "1"}
    env.pop("LOWRANK_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "csrc" not in out.stdout
    assert out.stderr.count("lowrank._C not loaded") == 1
    assert "nf4_linear on cpu runs the reference backend" in out.stderr



def test_the_cuda_gemv_name_is_checked_on_import():
    """LOWRANK_CUDA_GEMV (csrc/nf4_cuda_gemv.cu, Note: LOWRANK_CUDA_GEMV) names one of the tensor-core
    GEMVs; any other name fails when lowrank is imported, with the name and the choices."""
    assert csrc.cuda_gemv_kernel({}) == "mma-lut" and csrc.cuda_gemv_kernel({"LOWRANK_CUDA_GEMV": "mma"}) == "mma"
    with pytest.raises(ValueError, match=r"LOWRANK_CUDA_GEMV must be one of \('mma', .*'mma-lut', 'mma-lut-deep'\) or unset, got 'lut'"):
        csrc.cuda_gemv_kernel({"LOWRANK_CUDA_GEMV": "lut"})
    env = {**os.environ, "LOWRANK_CUDA_GEMV": "lut"}
    out = subprocess.run([sys.executable, "-c", "import lowrank"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "LOWRANK_CUDA_GEMV must be one of" in out.stderr
