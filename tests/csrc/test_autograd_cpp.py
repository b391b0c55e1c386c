"""The C++ autograd of nf4_linear and nf4_linear_grad_input (csrc/autograd.cpp, Note: autograd in
C++) against library.py's Python autograd, its specification: the same gradients bit for bit, in
the same cases, and only the gradients asked for."""

import os
import subprocess
import sys

import pytest
import torch

from lowrank import nf4
from lowrank import ops
from lowrank.ops import csrc

pytestmark = pytest.mark.skipif(csrc._C is None, reason="lowrank._C is not built")

# Runs in a child process (default: C++ autograd; LOWRANK_PYTHON_OPS=1: the Python one) and saves
# every output and gradient of a grid of cases to argv[1].
_CASES = r"""
import sys, torch
from lowrank import nf4, ops
from lowrank.ops import csrc
out = {"cpp_autograd": csrc.CPP_AUTOGRAD}
for dq in (True, False):
    q = nf4.quantize(torch.randn(24, 128, generator=torch.Generator().manual_seed(1)), 64, dq)
    for m, dtype in ((1, torch.bfloat16), (3, torch.float32), (17, torch.bfloat16)):  # GEMV and dequantize + matmul
        g = torch.Generator().manual_seed(m)
        x0 = torch.randn(2, m, 128, generator=g).to(dtype)
        b0 = torch.randn(24, generator=g).to(dtype)
        gy = torch.randn(2, m, 24, generator=g).to(dtype)
        for bias in ("none", "grad", "frozen"):
            for x_grad in (True, False):
                if bias != "grad" and not x_grad:
                    continue  # nothing requires grad
                x = x0.clone().requires_grad_(x_grad)
                b = None if bias == "none" else b0.clone().requires_grad_(bias == "grad")
                y = ops.nf4_linear(x, q, b)
                y.backward(gy)
                key = f"{dq}-{m}-{bias}-{x_grad}"
                out[key] = (y.detach(), x.grad, None if b is None else b.grad)
        x = x0.float().requires_grad_()  # double backward: d/dx of sum(grad_x(y^2))
        (gx,) = torch.autograd.grad(ops.nf4_linear(x, q).square().sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sum(), x)
        out[f"{dq}-{m}-double"] = (gx.detach(), ggx)
q0 = nf4.quantize(torch.zeros(0, 128), 64, False)  # N = 0 with a bias: its gradient reshaped by -1 over N
fields = (q0.packed, q0.absmax, None, None, [0, 128], 64)
for m in (1, 17):
    for fused in (False, True):
        x, b = torch.randn(2, m, 128).requires_grad_(), torch.zeros(0, requires_grad=True)
        y = (torch.ops.lowrank.nf4_lora_linear(x, torch.zeros(4, 128), torch.zeros(0, 4), 1.0, x, *fields, b) if fused
             else ops.nf4_linear(x, q0, b))
        y.backward(torch.zeros(2, m, 0))
        out[f"empty-{m}-{fused}"] = (y.detach(), x.grad, b.grad)
torch.save(out, sys.argv[1])
"""


def _run_cases(path, python_ops: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOWRANK_BACKEND", "LOWRANK_PYTHON_OPS")}
    if python_ops:
        env["LOWRANK_PYTHON_OPS"] = "1"
    subprocess.run([sys.executable, "-c", _CASES, str(path)], env=env, check=True, capture_output=True, text=True)
    return torch.load(path)


def test_cpp_and_python_autograd_agree_bit_for_bit(tmp_path):
    """Outputs, grad_x, grad_b and the double backward of every case equal the Python autograd's
    (the kernels under both are the same csrc functions, so exact equality is the claim)."""
    cpp = _run_cases(tmp_path / "cpp.pt", python_ops=False)
    python = _run_cases(tmp_path / "python.pt", python_ops=True)
    assert cpp.pop("cpp_autograd") is True and python.pop("cpp_autograd") is False
    assert cpp.keys() == python.keys() and len(cpp) == 2 * 3 * (4 + 1) + 4
    for key in [k for k in cpp if k.startswith("empty")]:  # as eager F.linear: zeros, and an empty bias gradient
        y, gx, gb = cpp[key]
        assert y.shape[-1] == 0 and torch.equal(gx, torch.zeros_like(gx)) and gb.shape == (0,), key
    for key, ours in cpp.items():
        for a, b in zip(ours, python[key], strict=True):
            assert (a is None) == (b is None), key
            assert a is None or torch.equal(a, b), key


def test_the_cpp_autograd_owns_the_ops():
    q = nf4.quantize(torch.randn(8, 64), 32)
    x = torch.randn(2, 64, requires_grad=True)
    y = ops.nf4_linear(x, q)
    assert csrc.CPP_AUTOGRAD and y.grad_fn.name() == "torch::autograd::CppNode<lowrank::NF4Linear>"
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # grad_y = 2y needs grad
    assert gx.grad_fn.name() == "torch::autograd::CppNode<lowrank::NF4LinearGradInput>"


@pytest.fixture
def grad_input_calls(monkeypatch):
    """Counts nf4_linear_grad_input calls: the reference backend, which the C++ kernels hand to the
    Python kernel (csrc/dispatch.h, Note: the ops in C++), counted there."""
    from lowrank.ops import library

    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    calls = []
    kernel = library.grad_input_kernel

    def counting(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    csrc._C.set_python_kernels(library.dequantize_kernel, library.linear_kernel, counting)
    yield calls
    csrc._C.set_python_kernels(library.dequantize_kernel, library.linear_kernel, kernel)


@pytest.mark.parametrize("double_quant", [True, False])
def test_backward_computes_only_the_gradients_asked_for(grad_input_calls, double_quant):
    """The bias's gradient edge moves with the optional weight tensors (nested_absmax, offset):
    with x frozen and the bias trained, backward gives grad_b alone and never computes grad_x."""
    q = nf4.quantize(torch.randn(12, 64), 32, double_quant)
    x = torch.randn(5, 64)
    b = torch.zeros(12, requires_grad=True)
    g = torch.randn(5, 12)
    ops.nf4_linear(x, q, b).backward(g)
    assert grad_input_calls == [] and torch.equal(b.grad, g.sum(0))
    x.requires_grad_()
    b.grad = None
    ops.nf4_linear(x, q, b.detach()).backward(g)  # x trained, bias frozen
    assert grad_input_calls == [(5, 12)] and x.grad is not None and b.grad is None


def test_compiled_autograd_runs_the_cpp_nodes():
    """torch's compiled autograd traces backward graphs holding the C++ nodes: with the eager
    backend on both sides the same kernels run, so the gradients are eager's bit for bit."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    q = nf4.quantize(torch.randn(64, 128), 64, True)
    x = torch.randn(3, 128, requires_grad=True)
    b = torch.randn(64, requires_grad=True)

    def loss(x, b):
        return ops.nf4_linear(x, q, b).square().sum()

    loss(x, b).backward()
    expected = (x.grad, b.grad)
    x.grad = b.grad = None
    torch._dynamo.reset()
    counters.clear()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        torch.compile(loss, backend="eager", fullgraph=True)(x, b).backward()
    assert counters["compiled_autograd"]["captures"] == 1
    assert torch.equal(x.grad, expected[0]) and torch.equal(b.grad, expected[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_backward_is_the_grad_input_op_and_a_sum(device):
    """The C++ backward on each device: grad_x is exactly the nf4_linear_grad_input op on grad_y
    (what library.py's backward calls), grad_b exactly grad_y summed over the leading dimensions,
    and the double backward exactly nf4_linear on the incoming gradient."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(5)
    q = nf4.quantize(torch.randn(48, 256, generator=g), 64, True).to(device)
    fields = (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)
    for m in (1, 40):  # the GEMV, and dequantize + matmul
        x = torch.randn(2, m, 256, generator=g).to(device, torch.bfloat16).requires_grad_()
        b = torch.randn(48, generator=g).to(device, torch.bfloat16).requires_grad_()
        gy = torch.randn(2, m, 48, generator=g).to(device, torch.bfloat16).requires_grad_()
        gx, gb = torch.autograd.grad(ops.nf4_linear(x, q, b), (x, b), gy, create_graph=True)
        assert torch.equal(gx, torch.ops.lowrank.nf4_linear_grad_input(gy.detach(), *fields))
        assert torch.equal(gb, gy.detach().reshape(-1, 48).sum(0))
        gg = torch.randn(2, m, 256, generator=g).to(device, torch.bfloat16)
        (ggy,) = torch.autograd.grad(gx, gy, gg)
        assert torch.equal(ggy, torch.ops.lowrank.nf4_linear(gg, *fields, None))
