"""Every `lowrank::` op: schema, fake (meta) kernel, dispatch through the backend table, autograd.

This is the one file to read to learn what the kernels compute. The packed NF4 weight
travels as its plain fields (see lowrank/quant/nf4_weight.py), so the ops need no tensor
subclass and other libraries can call them with tensors from a bitsandbytes checkpoint:

    packed         uint8 (ceil(n/2),)   two 4-bit codes a byte, the first element in the HIGH nibble
    absmax         (B,)                 uint8 codes when double-quantized, else float32 scales
    nested_absmax  float32 (ceil(B/256),) or None
    offset         float32 0-d or None
    shape          [N, K] for a linear weight; n = N*K, B = ceil(n / blocksize)

    nf4_dequantize(...)          -> W in `dtype`                       (shape)
    nf4_linear(x, ..., bias)     -> y = x @ W^T + bias, W in x.dtype   (..., N)
    nf4_linear_grad_input(gy, ...) -> gx = gy @ W                      (..., K)
    lora_add(y, x, A, B, s)      -> y + s (x @ A^T) @ B^T              (..., out)   (LoRA's addition)
    nf4_lora_linear(x_lora, A, B, s, x, ..., bias)
                                 -> lora_add(nf4_linear(x, ..., bias), x_lora, A, B, s)  (QLoRA's layer)
    (both also take the adapter's dropout as dropped, keep, keep_scale: x's dropped-out copy is
    the adapter's input, and x's gradient goes back through the dropout)

The two LoRA ops are defined here with the others; their fake kernels, Python kernels, autograd
and Python API are in lowrank/ops/lora_ops.py.

Each op's kernel asks backends.choose(op, device) which implementation runs; the
reference (lowrank/ops/reference.py) is registered for every device. Where lowrank._C is
built, its C++ kernels take the CPU and CUDA calls the csrc backend would run, without Python
(See Note: the Python kernels), and its C++ autograd replaces the one below (csrc/autograd.cpp).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..quant import nf4
from ..quant.nf4_weight import NF4Weight
from . import backends

__all__ = ["FLOAT_DTYPES", "OPS", "nf4_dequantize", "nf4_linear"]

FLOAT_DTYPES = nf4.DTYPES  # what W may be dequantized to
BLOCKSIZES = nf4.BLOCKSIZES

_lib = torch.library.Library("lowrank", "FRAGMENT")  # noqa: TOR901 (a fragment: csrc may add to the namespace)

_WEIGHT = "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, SymInt[] shape, int blocksize"
_DROPOUT = "Tensor? dropped=None, Tensor? keep=None, float keep_scale=1."  # the adapter's dropout (lora_ops.py)
OPS = {
    "nf4_dequantize": f"nf4_dequantize({_WEIGHT}, ScalarType dtype) -> Tensor",
    "nf4_linear": f"nf4_linear(Tensor x, {_WEIGHT}, Tensor? bias) -> Tensor",
    "nf4_linear_grad_input": f"nf4_linear_grad_input(Tensor grad_y, {_WEIGHT}) -> Tensor",
    "lora_add": f"lora_add(Tensor y, Tensor x, Tensor lora_A, Tensor lora_B, float scale, {_DROPOUT}) -> Tensor",
    "nf4_lora_linear": (f"nf4_lora_linear(Tensor x_lora, Tensor lora_A, Tensor lora_B, float scale, Tensor x, {_WEIGHT}, "
                        f"Tensor? bias, {_DROPOUT}) -> Tensor"),
}
for _schema in OPS.values():
    _lib.define(_schema)


# ---------------------------------------------------------------------------------------
# Checks shared by the fake kernels and the real ones (they run on shapes only, so they
# also run while torch.compile traces with symbolic sizes)
# ---------------------------------------------------------------------------------------


def _check_weight(packed, absmax, nested_absmax, offset, shape: Sequence, blocksize: int) -> None:
    torch._check(blocksize in BLOCKSIZES, lambda: f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    for d in shape:  # two negative sizes multiply to a positive n that the byte count would accept
        torch._check(d >= 0, lambda: f"shape must be sizes >= 0, got {list(shape)}")
    n = math.prod(shape)
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(
        packed.numel() == (n + 1) // 2,
        lambda: f"packed must hold ceil(n/2) = {(n + 1) // 2} bytes for a weight of shape {list(shape)}, got {packed.numel()}",
    )
    blocks = (n + blocksize - 1) // blocksize
    torch._check(
        absmax.numel() == blocks,
        lambda: f"absmax must hold ceil(n/blocksize) = {blocks} scales for shape {list(shape)} and blocksize {blocksize}, got {absmax.numel()}",
    )
    double_quant = nested_absmax is not None
    torch._check(
        double_quant == (offset is not None),
        lambda: "nested_absmax and offset come together (double quantization) or not at all; "
        f"got nested_absmax={'a tensor' if double_quant else None}, offset={'a tensor' if offset is not None else None}",
    )
    want = torch.uint8 if double_quant else torch.float32
    torch._check(
        absmax.dtype == want,
        lambda: f"absmax must be {want} {'(codes, with nested_absmax)' if double_quant else '(scales, no nested_absmax)'}, got {absmax.dtype}",
    )
    if double_quant:
        nested = (blocks + 255) // 256
        torch._check(
            nested_absmax.dtype == torch.float32 and nested_absmax.numel() == nested,
            lambda: f"nested_absmax must be {nested} float32 values, got {nested_absmax.numel()} {nested_absmax.dtype}",
        )
        torch._check(
            offset.dtype == torch.float32 and offset.numel() == 1,
            lambda: f"offset must be one float32 value, got {offset.numel()} {offset.dtype}",
        )
    for name, t in (("absmax", absmax), ("nested_absmax", nested_absmax), ("offset", offset)):
        torch._check(
            t is None or t.device == packed.device,
            lambda: f"{name} is on {t.device} but packed is on {packed.device}; move the whole NF4Weight with .to(device)",
        )


# Note: checks at run time. The fake kernels need torch._check (symbolic sizes while tracing);
# the real kernels run on every forward of every 4-bit layer, where a chain of ~15 torch._check
# calls cost more than the GEMV they guard (tens of microseconds a call: decoding is bound by
# that). So the real kernels first ask _weight_ok / _linear_ok / _grad_input_ok, plain expressions with the
# same conditions, and run the torch._check chain only when it says no: for its message.
def _weight_ok(packed, absmax, nested_absmax, offset, shape: Sequence, blocksize: int) -> bool:
    if blocksize not in BLOCKSIZES or min(shape, default=0) < 0:
        return False
    n = math.prod(shape)
    blocks = (n + blocksize - 1) // blocksize
    device = packed.device
    common = (packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2 and absmax.numel() == blocks
              and absmax.device == device)  # fmt: skip
    if nested_absmax is None:
        return common and offset is None and absmax.dtype == torch.float32
    return (common and offset is not None and absmax.dtype == torch.uint8
            and nested_absmax.dtype == torch.float32 and nested_absmax.numel() == (blocks + 255) // 256
            and offset.dtype == torch.float32 and offset.numel() == 1
            and nested_absmax.device == device and offset.device == device)  # fmt: skip


def _linear_ok(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias) -> bool:
    return (len(shape) == 2 and x.dtype in FLOAT_DTYPES and x.dim() >= 1 and x.shape[-1] == shape[1]
            and x.device == packed.device and _weight_ok(packed, absmax, nested_absmax, offset, shape, blocksize)
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == shape[0] and bias.dtype == x.dtype
                                  and bias.device == x.device)))  # fmt: skip


def _grad_input_ok(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize) -> bool:
    return (len(shape) == 2 and grad_y.dtype in FLOAT_DTYPES and grad_y.dim() >= 1 and grad_y.shape[-1] == shape[0]
            and _weight_ok(packed, absmax, nested_absmax, offset, shape, blocksize))  # fmt: skip


def _check_linear(x: torch.Tensor, shape: Sequence, what: str = "x") -> tuple:
    torch._check(len(shape) == 2, lambda: f"a linear weight has shape [N, K], got {list(shape)}")
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{what} must be one of {FLOAT_DTYPES}, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"{what} must have at least one dimension, got a 0-d tensor")
    return shape[0], shape[1]


# ---------------------------------------------------------------------------------------
# nf4_dequantize
# ---------------------------------------------------------------------------------------


@torch.library.register_fake("lowrank::nf4_dequantize")
def _(packed, absmax, nested_absmax, offset, shape, blocksize, dtype):
    _check_weight(packed, absmax, nested_absmax, offset, shape, blocksize)
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    return packed.new_empty(shape, dtype=dtype)


# Note: the Python kernels. Each op's kernel below is registered for every device
# (CompositeExplicitAutograd). Where lowrank._C is loaded, its C++ kernels take the CPU and CUDA
# calls instead and hand back to these the ones they do not take (csrc/dispatch.h, Note: the ops
# in C++): another backend forced, or arguments that fail the plain checks.
def dequantize_kernel(packed, absmax, nested_absmax, offset, shape, blocksize, dtype):
    if not (dtype in FLOAT_DTYPES and _weight_ok(packed, absmax, nested_absmax, offset, shape, blocksize)):
        _check_weight(packed, absmax, nested_absmax, offset, shape, blocksize)  # See Note: checks at run time.
        torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    _, impl = backends.choose("nf4_dequantize", packed.device)
    return impl(packed, absmax, nested_absmax, offset, list(shape), blocksize, dtype)


_lib.impl("nf4_dequantize", dequantize_kernel, "CompositeExplicitAutograd")


# ---------------------------------------------------------------------------------------
# nf4_linear and its input gradient
# ---------------------------------------------------------------------------------------


def _check_linear_args(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias, what="x"):
    _check_weight(packed, absmax, nested_absmax, offset, shape, blocksize)
    n_out, k_in = _check_linear(x, shape, what)
    torch._check(
        x.shape[-1] == k_in, lambda: f"{what} has {x.shape[-1]} features in its last dimension; the weight {list(shape)} takes {k_in}"
    )
    torch._check(x.device == packed.device, lambda: f"{what} is on {x.device} but the weight is on {packed.device}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == n_out, lambda: f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        torch._check(bias.dtype == x.dtype, lambda: f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        torch._check(bias.device == x.device, lambda: f"bias is on {bias.device} but {what} is on {x.device}")
    return n_out, k_in


@torch.library.register_fake("lowrank::nf4_linear")
def _(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias):
    n_out, _ = _check_linear_args(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias)
    return x.new_empty((*x.shape[:-1], n_out))


def linear_kernel(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias):  # See Note: the Python kernels.
    if not _linear_ok(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias):  # See Note: checks at run time.
        _check_linear_args(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias)
    _, impl = backends.choose("nf4_linear", x.device)
    return impl(x, packed, absmax, nested_absmax, offset, list(shape), blocksize, bias)


_lib.impl("nf4_linear", linear_kernel, "CompositeExplicitAutograd")


def _grad_input_args(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize):
    _check_weight(packed, absmax, nested_absmax, offset, shape, blocksize)
    n_out, k_in = _check_linear(grad_y, shape, "grad_y")
    torch._check(
        grad_y.shape[-1] == n_out,
        lambda: f"grad_y has {grad_y.shape[-1]} features in its last dimension; the weight {list(shape)} gives {n_out}",
    )
    return n_out, k_in


@torch.library.register_fake("lowrank::nf4_linear_grad_input")
def _(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize):
    _, k_in = _grad_input_args(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize)
    return grad_y.new_empty((*grad_y.shape[:-1], k_in))


def grad_input_kernel(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize):  # See Note: the Python kernels.
    if not _grad_input_ok(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize):  # See Note: checks at run time.
        _grad_input_args(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize)
    _, impl = backends.choose("nf4_linear_grad_input", grad_y.device)
    return impl(grad_y, packed, absmax, nested_absmax, offset, list(shape), blocksize)


_lib.impl("nf4_linear_grad_input", grad_input_kernel, "CompositeExplicitAutograd")


# Note: autograd of nf4_linear. y = x @ W^T + b with W frozen, so
#     grad_x = grad_y @ W        (..., K) = (..., N) @ (N, K)    -- recomputed from the packed W
#     grad_b = sum of grad_y over every leading dimension   (N,)
# and nothing for packed/absmax/nested_absmax/offset (integer or frozen buffers). Backward keeps
# references to the packed weight's tensors and nothing else: not x (no gradient of W needs it),
# not the dense W, which never outlives the kernel that decodes it.
# grad_input is itself linear in grad_y, with grad_x' = gg @ W^T = nf4_linear(gg), so double
# backward (e.g. gradient penalties) works too. Where lowrank._C is loaded the same math runs in
# C++ (csrc/autograd.cpp, Note: autograd in C++), and these functions are not registered.
_WEIGHT_NONE = (None,) * 6  # no gradient for packed, absmax, nested_absmax, offset, shape, blocksize


def bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """grad (..., N) summed over every leading dimension: reshaped by the product of the leading
    sizes, not by -1, which has nothing to divide when N = 0."""
    return grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1]).sum(0)


def _setup_context(ctx, inputs, output):
    ctx.weight = inputs[1:7]  # (packed, absmax, nested_absmax, offset, shape, blocksize)
    ctx.has_bias = inputs[7] is not None


def _linear_backward(ctx, grad_y):
    grad_x = torch.ops.lowrank.nf4_linear_grad_input(grad_y, *ctx.weight) if ctx.needs_input_grad[0] else None
    grad_b = bias_grad(grad_y) if ctx.has_bias and ctx.needs_input_grad[7] else None  # (N,)
    return (grad_x, *_WEIGHT_NONE, grad_b)


def _grad_input_setup_context(ctx, inputs, output):
    ctx.weight = inputs[1:7]


def _grad_input_backward(ctx, grad_grad_x):
    grad_grad_y = torch.ops.lowrank.nf4_linear(grad_grad_x, *ctx.weight, None)  # (..., K) @ W^T -> (..., N)
    return (grad_grad_y, *_WEIGHT_NONE)



def register_python_autograd() -> None:
    """Registers the autograd above for nf4_linear and nf4_linear_grad_input. lowrank/ops/__init__.py
    calls this (and lora_ops.register_python_ops), once, when lowrank._C's (the same math:
    csrc/autograd.cpp, Note: autograd in C++; csrc/lora.cpp) are not registered instead: without
    lowrank._C, or with LOWRANK_PYTHON_OPS=1."""
    torch.library.register_autograd("lowrank::nf4_linear", _linear_backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "lowrank::nf4_linear_grad_input", _grad_input_backward, setup_context=_grad_input_setup_context
    )


# ---------------------------------------------------------------------------------------
# The Python API: the same ops, taking an NF4Weight
# ---------------------------------------------------------------------------------------


def _fields(q: NF4Weight) -> tuple:
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q must be an NF4Weight (lowrank.nf4.quantize(w)), got {type(q).__name__}")
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of `q` in `dtype` (default: the dtype it was quantized from);
    bit-exact with lowrank.nf4.dequantize on every backend."""
    return torch.ops.lowrank.nf4_dequantize(*_fields(q), q.dtype if dtype is None else dtype)


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W = dequantize(q) in x.dtype, never stored.
    x (..., K), q of shape [N, K], bias (N,) or None -> y (..., N). Differentiable in x and bias."""
    return torch.ops.lowrank.nf4_linear(x, *_fields(q), bias)
