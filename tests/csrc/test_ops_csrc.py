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


def test_cpu_isa_can_be_capped_from_the_environment():
    code = "from lowrank.ops import csrc; print(csrc._C.cpu_isa())"
    env = {**os.environ, "LOWRANK_CPU_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_without_the_extension_everything_runs_on_the_reference():
    """LOWRANK_NO_EXT=1 at run time is the package without lowrank._C: one log line says so, the
    ops run on the reference and give its results."""
    code = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from lowrank import nf4, ops
from lowrank.ops import backends, csrc
assert csrc._C is None
q = nf4.quantize(torch.randn(8, 64), 32)
assert torch.equal(ops.nf4_dequantize(q), nf4.dequantize(q))
ops.nf4_linear(torch.randn(2, 64), q)
print(backends.available("nf4_linear"))
"""
    env = {**os.environ, "LOWRANK_NO_EXT": "1", "TRITON_INTERPRET": "1"}
    env.pop("LOWRANK_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "csrc" not in out.stdout
    assert out.stderr.count("lowrank._C not loaded") == 1
    assert "nf4_linear on cpu runs the reference backend" in out.stderr
