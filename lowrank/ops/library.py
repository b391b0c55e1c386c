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

__all__ = ["FLOAT_DTYPES", "OPS", "lora_add", "nf4_dequantize", "nf4_linear", "nf4_lora_linear"]

FLOAT_DTYPES = nf4.DTYPES  # what W may be dequantized to
BLOCKSIZES = nf4.BLOCKSIZES

_lib = torch.library.Library("lowrank", "FRAGMENT")  # noqa: TOR901 (a fragment: csrc may add to the namespace)

_WEIGHT = "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, SymInt[] shape, int blocksize"
OPS = {
    "nf4_dequantize": f"nf4_dequantize({_WEIGHT}, ScalarType dtype) -> Tensor",
    "nf4_linear": f"nf4_linear(Tensor x, {_WEIGHT}, Tensor? bias) -> Tensor",
    "nf4_linear_grad_input": f"nf4_linear_grad_input(Tensor grad_y, {_WEIGHT}) -> Tensor",
    "lora_add": "lora_add(Tensor y, Tensor x, Tensor lora_A, Tensor lora_B, float scale) -> Tensor",
    "nf4_lora_linear": (f"nf4_lora_linear(Tensor x_lora, Tensor lora_A, Tensor lora_B, float scale, Tensor x, {_WEIGHT}, "
                        "Tensor? bias) -> Tensor"),
}
for _schema in OPS.values():
    _lib.define(_schema)


# ---------------------------------------------------------------------------------------
# Checks shared by the fake kernels and the real ones (they run on shapes only, so they
# also run while torch.compile traces with symbolic sizes)
# ---------------------------------------------------------------------------------------


def _check_weight(packed, absmax, nested_absmax, offset, shape: Sequence, blocksize: int) -> None:
    torch._check(blocksize in BLOCKSIZES, lambda: f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
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
    if blocksize not in BLOCKSIZES:
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
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == shape[0] and bias.dtype == x.dtype)))  # fmt: skip


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


def _setup_context(ctx, inputs, output):
    ctx.weight = inputs[1:7]  # (packed, absmax, nested_absmax, offset, shape, blocksize)
    ctx.has_bias = inputs[7] is not None


def _linear_backward(ctx, grad_y):
    grad_x = torch.ops.lowrank.nf4_linear_grad_input(grad_y, *ctx.weight) if ctx.needs_input_grad[0] else None
    grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[7] else None  # (N,)
    return (grad_x, *_WEIGHT_NONE, grad_b)


def _grad_input_setup_context(ctx, inputs, output):
    ctx.weight = inputs[1:7]


def _grad_input_backward(ctx, grad_grad_x):
    grad_grad_y = torch.ops.lowrank.nf4_linear(grad_grad_x, *ctx.weight, None)  # (..., K) @ W^T -> (..., N)
    return (grad_grad_y, *_WEIGHT_NONE)



# ---------------------------------------------------------------------------------------
# lora_add: a LoRA adapter's addition to its layer's output
# ---------------------------------------------------------------------------------------

# Note: lora_add. out = y + s * (x @ A^T) @ B^T, with y the base layer's output (..., out), x its
# (dropped-out) input (..., in), A (r, in), B (out, r), all of one floating dtype and device: the
# eager LoRA path of lowrank.LoraLinear and PEFT (lora_B(lora_A(x)) * s, added to y), as one op
# whose autograd is one node. lowrank._C runs it in C++ (csrc/lora.cpp, Note: LoRA in one node),
# where LoraLinear calls it; the kernel and autograd below are the same math in Python, registered
# only without lowrank._C's (by register_python_autograd). The gradients are those of eager
# autograd's nodes for the same calls, in the same layouts (_mm_grads), so the op equals the eager
# path bit for bit where matmul folds x's leading dimensions into rows (x contiguous). Under
# autocast (CPU, CUDA) lowrank._C's registration also casts x, A and B as F.linear's autocast rule
# does (y is not cast); without lowrank._C the op has no autocast rule.
def _check_lora_add(y, x, lora_A, lora_B) -> None:
    torch._check(lora_A.dim() == 2 and lora_B.dim() == 2,
                 lambda: f"lora_A must be (r, in) and lora_B (out, r), got shapes {list(lora_A.shape)} and {list(lora_B.shape)}")
    torch._check(x.dim() >= 1 and x.shape[-1] == lora_A.shape[1] and lora_B.shape[1] == lora_A.shape[0],
                 lambda: "x (..., in) must match lora_A (r, in) and lora_B (out, r); got x "
                 f"{list(x.shape)}, lora_A {list(lora_A.shape)}, lora_B {list(lora_B.shape)}")
    out_shape = [*x.shape[:-1], lora_B.shape[0]]
    torch._check(list(y.shape) == out_shape,
                 lambda: f"y must have the output's shape {out_shape} (x's leading dimensions, lora_B's out), got {list(y.shape)}")
    torch._check(x.dtype.is_floating_point and y.dtype == x.dtype == lora_A.dtype == lora_B.dtype,
                 lambda: "y, x, lora_A and lora_B must share one floating dtype, got "
                 f"{y.dtype}, {x.dtype}, {lora_A.dtype}, {lora_B.dtype}")
    torch._check(y.device == x.device == lora_A.device == lora_B.device,
                 lambda: f"y, x, lora_A and lora_B must be on one device, got {y.device}, {x.device}, {lora_A.device}, {lora_B.device}")


@torch.library.register_fake("lowrank::lora_add")
def _(y, x, lora_A, lora_B, scale):
    _check_lora_add(y, x, lora_A, lora_B)
    return x.new_empty((*x.shape[:-1], lora_B.shape[0]))  # a fresh contiguous tensor, as the kernels return


def lora_add_kernel(y, x, lora_A, lora_B, scale):
    _check_lora_add(y, x, lora_A, lora_B)
    if x.dim() >= 3 and lora_A.requires_grad:  # eager matmul folds x into rows then (copying it if it must);
        u = _rows(x).mm(lora_A.t()).view(*x.shape[:-1], lora_A.shape[0])  # below autograd A.t() does not require grad
    else:
        u = torch.nn.functional.linear(x, lora_A)  # (..., in) -> (..., r)
    v = torch.nn.functional.linear(u, lora_B)
    if y.is_contiguous() and _scale_folds(scale, v.dtype):  # See Note: a scale of a power of two (csrc/lora.cpp)
        return torch.add(y, v, alpha=scale)
    return (v * scale).add_(y)  # y + s u B^T: IEEE addition commutes


def _scale_folds(scale: float, dtype: torch.dtype) -> bool:
    """|scale| = 2^k with k >= 0, and not float16 above 1: y + s v is then one add (csrc/lora.cpp)."""
    mantissa, exponent = math.frexp(abs(scale))
    return mantissa == 0.5 and exponent >= 1 and (exponent == 1 or dtype != torch.float16)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) as the (M, K) matrix matmul folds it into for mm."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _column_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) == t.shape[0]


def _mm_grads(grad, mat1, mat2, need1: bool, need2: bool) -> tuple:
    """The gradients of mm(mat1, mat2) as autograd's MmBackward0 computes them (torch's
    mm_mat1_backward / mm_mat2_backward): an operand that was column-major gets its gradient
    column-major, through the transposed product."""
    g1 = (mat2.mm(grad.t()).t() if _column_major(mat1) else grad.mm(mat2.t())) if need1 else None
    g2 = (grad.t().mm(mat1).t() if _column_major(mat2) else mat1.t().mm(grad)) if need2 else None
    return g1, g2


def _lora_add_setup_context(ctx, inputs, output):
    y, x, lora_A, lora_B, scale = inputs
    ctx.save_for_backward(x, lora_A, lora_B)
    ctx.scale = scale


# Eager autograd's nodes from the output back: Add (y's gradient is the output's), Mul (times s),
# then lora_B's linear (UnsafeView to M rows, Mm, T) and lora_A's (Mm, T, View to x's shape); u is
# recomputed here (setup_context sees no intermediate), the C++ autograd keeps it.
def _lora_grads(grad, x, lora_A, lora_B, scale, need_x: bool, need_A: bool, need_B: bool) -> tuple:
    grad_x = grad_A = grad_B = None
    if need_x or need_A or need_B:
        x2 = _rows(x)  # (M, in)
        # (M, r): the forward's u recomputed for B's gradient, else a stand-in with its layout
        u2 = x2.mm(lora_A.t()) if need_B else x2.new_empty(len(x2), lora_A.shape[0])
        grad_v = _rows(grad if scale == 1 and grad.is_contiguous() else grad * scale)  # (M, out)
        grad_u, grad_Bt = _mm_grads(grad_v, u2, lora_B.t(), need_x or need_A, need_B)
        grad_B = None if grad_Bt is None else grad_Bt.t()
        if need_x or need_A:
            grad_x2, grad_At = _mm_grads(grad_u, x2, lora_A.t(), need_x, need_A)
            grad_x = None if grad_x2 is None else grad_x2.reshape(x.shape)
            grad_A = None if grad_At is None else grad_At.t()
    return grad_x, grad_A, grad_B


def _lora_add_backward(ctx, grad):
    _, need_x, need_A, need_B, _ = ctx.needs_input_grad
    grad_x, grad_A, grad_B = _lora_grads(grad, *ctx.saved_tensors, ctx.scale, need_x, need_A, need_B)
    return (grad if ctx.needs_input_grad[0] else None), grad_x, grad_A, grad_B, None


# ---------------------------------------------------------------------------------------
# nf4_lora_linear: a LoRA adapter on a 4-bit base, the layer of QLoRA
# ---------------------------------------------------------------------------------------

# Note: nf4_lora_linear. lora_add(nf4_linear(x, W, bias), x_lora, A, B, s), the adapter's input
# x_lora being x or dropout(x), as one op: the same math, one dispatcher call and one autograd
# node instead of two (csrc/lora.cpp, Note: QLoRA in one node); LoraLinear calls it for an adapter
# on lowrank's Linear4bit (lowrank/tuners/lora.py, Note: QLoRA in one op). Its checks are the two
# ops' (nf4_linear's, then lora_add's on the base output y), its gradients theirs. The adapter's
# operands come first so that x's two gradients (x_lora's and x's, when they are one tensor) reach
# the engine in the two ops' order and sum to the same bits.
@torch.library.register_fake("lowrank::nf4_lora_linear")
def _(x_lora, lora_A, lora_B, scale, x, packed, absmax, nested_absmax, offset, shape, blocksize, bias):
    n_out, _ = _check_linear_args(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias)
    y = x.new_empty((*x.shape[:-1], n_out))  # the base's output (fake too, while tracing)
    _check_lora_add(y, x_lora, lora_A, lora_B)
    return y


def nf4_lora_linear_kernel(x_lora, lora_A, lora_B, scale, x, packed, absmax, nested_absmax, offset, shape, blocksize,
                           bias):
    y = linear_kernel(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias)
    return lora_add_kernel(y, x_lora, lora_A, lora_B, scale)


def _nf4_lora_setup_context(ctx, inputs, output):
    x_lora, lora_A, lora_B, scale = inputs[:4]
    _setup_context(ctx, inputs[4:], output)  # the base's: x, the weight's six fields, bias
    ctx.save_for_backward(x_lora, lora_A, lora_B)
    ctx.scale = scale


def _nf4_lora_backward(ctx, grad):
    need = ctx.needs_input_grad  # x_lora, A, B, scale, x, the weight's six fields, bias
    grad_x_lora, grad_A, grad_B = _lora_grads(grad, *ctx.saved_tensors, ctx.scale, *need[:3])
    grad_x = torch.ops.lowrank.nf4_linear_grad_input(grad, *ctx.weight) if need[4] else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and need[11] else None  # (N,)
    return (grad_x_lora, grad_A, grad_B, None, grad_x, *_WEIGHT_NONE, grad_b)


def register_python_autograd() -> None:
    """Registers the autograd above for nf4_linear and nf4_linear_grad_input, and lora_add's and
    nf4_lora_linear's kernels and autograd. lowrank/ops/__init__.py calls this, once, when
    lowrank._C's (the same math: csrc/autograd.cpp, Note: autograd in C++; csrc/lora.cpp) are not
    registered instead: without lowrank._C, or with LOWRANK_PYTHON_OPS=1."""
    torch.library.register_autograd("lowrank::nf4_linear", _linear_backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "lowrank::nf4_linear_grad_input", _grad_input_backward, setup_context=_grad_input_setup_context
    )
    _lib.impl("lora_add", lora_add_kernel, "CompositeExplicitAutograd")
    torch.library.register_autograd("lowrank::lora_add", _lora_add_backward, setup_context=_lora_add_setup_context)
    _lib.impl("nf4_lora_linear", nf4_lora_linear_kernel, "CompositeExplicitAutograd")
    torch.library.register_autograd("lowrank::nf4_lora_linear", _nf4_lora_backward, setup_context=_nf4_lora_setup_context)


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


def lora_add(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """y + scale * (x @ lora_A^T) @ lora_B^T as a new tensor (LoRA's addition to a layer's output y):
    x (..., in), lora_A (r, in), lora_B (out, r), y (..., out), one floating dtype and device.
    Differentiable in all four; bit-exact with y + F.linear(F.linear(x, lora_A), lora_B) * scale
    and its gradients where x is contiguous (Note: lora_add)."""
    return torch.ops.lowrank.lora_add(y, x, lora_A, lora_B, float(scale))


def nf4_lora_linear(x: torch.Tensor, q: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None, x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """A LoRA adapter on a 4-bit linear as one op: x @ W^T + bias + scale * (x_lora @ lora_A^T) @ lora_B^T,
    W = dequantize(q) in x.dtype, x_lora the adapter's input (default x; dropout(x) with dropout),
    to the bit what lora_add(nf4_linear(x, q, bias), x_lora, lora_A, lora_B, scale) computes
    (Note: nf4_lora_linear). Differentiable in x, x_lora, bias, lora_A and lora_B."""
    return torch.ops.lowrank.nf4_lora_linear(x if x_lora is None else x_lora, lora_A, lora_B, float(scale), x,
                                             *_fields(q), bias)
