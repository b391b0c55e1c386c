"""The two LoRA ops of lowrank/ops/library.py (whose table defines their schemas): lora_add, a
LoRA adapter's addition to its layer's output, and nf4_lora_linear, that addition with its 4-bit
base in one op. Their fake kernels, Python kernels and autograd (the specification of
csrc/lora.cpp, which lowrank._C registers instead) and their Python API.
"""

from __future__ import annotations

import math

import torch

from ..quant.nf4_weight import NF4Weight
from .library import _WEIGHT_NONE, _check_linear_args, _fields, _lib, _setup_context, bias_grad, linear_kernel

__all__ = ["dropout_parts", "lora_add", "nf4_lora_linear"]


# ---------------------------------------------------------------------------------------
# lora_add: a LoRA adapter's addition to its layer's output
# ---------------------------------------------------------------------------------------

# Note: lora_add. out = y + s * (x @ A^T) @ B^T, with y the base layer's output (..., out), x its
# (dropped-out) input (..., in), A (r, in), B (out, r), all of one floating dtype and device: the
# eager LoRA path of lowrank.LoraLinear and PEFT (lora_B(lora_A(x)) * s, added to y), as one op
# whose autograd is one node. lowrank._C runs it in C++ (csrc/lora.cpp, Note: LoRA in one node),
# where LoraLinear calls it; the kernel and autograd below are the same math in Python, registered
# only without lowrank._C's (by register_python_ops). The gradients are those of eager
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
                 lambda: "y, x (dropped, when given), lora_A and lora_B must share one floating dtype, got "
                 f"{y.dtype}, {x.dtype}, {lora_A.dtype}, {lora_B.dtype}")
    torch._check(y.device == x.device == lora_A.device == lora_B.device,
                 lambda: f"y, x, lora_A and lora_B must be on one device, got {y.device}, {x.device}, {lora_A.device}, {lora_B.device}")


# Note: dropout in the LoRA ops. With dropout (PEFT's lora_dropout, while training) the adapter
# reads dropout(x), a third autograd node between x and the LoRA node; with the base inside the
# op (nf4_lora_linear) that node would also hand x's gradients to the engine in another order
# than the two ops did (csrc/lora.cpp, Note: QLoRA in one node). So the ops take the dropout's
# result instead: `dropped`, x's dropped-out copy computed without autograd, which the adapter
# reads in x's place, and `keep`, which the op's backward takes x's gradient back through, as
# the dropout's own node would: keep floating (dropout's noise, 0 or 1 / (1 - p), x's dtype) ->
# grad * keep, the MulBackward0 of at::dropout's composite path (the CPU's); keep bool (the mask
# of at::native_dropout, which at::dropout runs on CUDA) -> native_dropout_backward(grad, keep,
# keep_scale), its NativeDropoutBackward0. The gradient is first cast to x's dtype (under
# autocast the adapter computes in autocast's dtype, and eager autograd casts the gradient back
# before the dropout's node). `dropout_parts` makes the three from x as F.dropout would, drawing
# the same random numbers, so the ops equal the modules' path bit for bit with dropout too. The
# ops cannot check that dropped is x times keep: that is the caller's promise.
def _adapter_input(x, dropped, keep):
    """What the adapter reads, x or its dropped-out copy, once the dropout arguments are checked
    (both or neither, x's shape, keep bool or x's floating dtype, one device)."""
    torch._check((dropped is None) == (keep is None),
                 lambda: "dropped and keep go together (x's dropped-out copy and the dropout's noise or mask), got "
                 f"dropped {'None' if dropped is None else 'a tensor'} and keep {'None' if keep is None else 'a tensor'}")
    if keep is None:
        return x
    torch._check(list(dropped.shape) == list(x.shape) and list(keep.shape) == list(x.shape),
                 lambda: f"dropped and keep must have x's shape {list(x.shape)}, got {list(dropped.shape)} and {list(keep.shape)}")
    torch._check(x.dtype.is_floating_point and keep.dtype in (torch.bool, x.dtype),
                 lambda: f"keep must be bool (a dropout mask) or x's floating dtype (dropout's noise); got x {x.dtype}, "
                 f"keep {keep.dtype}")
    torch._check(dropped.device == x.device == keep.device,
                 lambda: f"x, dropped and keep must be on one device, got {x.device}, {dropped.device}, {keep.device}")
    return dropped


@torch.library.register_fake("lowrank::lora_add")
def _(y, x, lora_A, lora_B, scale, dropped=None, keep=None, keep_scale=1.0):
    _check_lora_add(y, _adapter_input(x, dropped, keep), lora_A, lora_B)
    return x.new_empty((*x.shape[:-1], lora_B.shape[0]))  # a fresh contiguous tensor, as the kernels return


def lora_add_kernel(y, x, lora_A, lora_B, scale, dropped=None, keep=None, keep_scale=1.0):
    x = _adapter_input(x, dropped, keep)
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
    y, x, lora_A, lora_B, scale, dropped, keep, keep_scale = inputs
    ctx.save_for_backward(x if dropped is None else dropped, lora_A, lora_B, keep)
    ctx.scale, ctx.keep_scale, ctx.x_dtype = scale, keep_scale, x.dtype


def _dropout_backward(grad, keep, keep_scale: float, dtype: torch.dtype):
    """x's gradient from its dropped-out copy's (See Note: dropout in the LoRA ops)."""
    if grad is None or keep is None:
        return grad
    grad = grad.to(dtype)
    if keep.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, keep, keep_scale)
    return grad * keep


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
    need_x, need_A, need_B = ctx.needs_input_grad[1:4]
    x, lora_A, lora_B, keep = ctx.saved_tensors
    grad_x, grad_A, grad_B = _lora_grads(grad, x, lora_A, lora_B, ctx.scale, need_x, need_A, need_B)
    grad_x = _dropout_backward(grad_x, keep, ctx.keep_scale, ctx.x_dtype)
    return (grad if ctx.needs_input_grad[0] else None), grad_x, grad_A, grad_B, None, None, None, None


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
def _(x_lora, lora_A, lora_B, scale, x, packed, absmax, nested_absmax, offset, shape, blocksize, bias, dropped=None,
      keep=None, keep_scale=1.0):
    n_out, _ = _check_linear_args(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias)
    y = x.new_empty((*x.shape[:-1], n_out))  # the base's output (fake too, while tracing)
    _check_lora_add(y, _adapter_input(x_lora, dropped, keep), lora_A, lora_B)
    return y


def nf4_lora_linear_kernel(x_lora, lora_A, lora_B, scale, x, packed, absmax, nested_absmax, offset, shape, blocksize,
                           bias, dropped=None, keep=None, keep_scale=1.0):
    y = linear_kernel(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias)
    return lora_add_kernel(y, x_lora, lora_A, lora_B, scale, dropped, keep, keep_scale)


def _nf4_lora_setup_context(ctx, inputs, output):
    x_lora, lora_A, lora_B, scale = inputs[:4]
    _setup_context(ctx, inputs[4:12], output)  # the base's: x, the weight's six fields, bias
    dropped, keep, keep_scale = inputs[12:]
    ctx.save_for_backward(x_lora if dropped is None else dropped, lora_A, lora_B, keep)
    ctx.scale, ctx.keep_scale, ctx.x_dtype = scale, keep_scale, x_lora.dtype


def _nf4_lora_backward(ctx, grad):
    need = ctx.needs_input_grad  # x_lora, A, B, scale, x, the weight's six fields, bias, dropped, keep, keep_scale
    x_lora, lora_A, lora_B, keep = ctx.saved_tensors
    grad_x_lora, grad_A, grad_B = _lora_grads(grad, x_lora, lora_A, lora_B, ctx.scale, *need[:3])
    grad_x_lora = _dropout_backward(grad_x_lora, keep, ctx.keep_scale, ctx.x_dtype)
    grad_x = torch.ops.lowrank.nf4_linear_grad_input(grad, *ctx.weight) if need[4] else None
    grad_b = bias_grad(grad) if ctx.has_bias and need[11] else None  # (N,)
    return (grad_x_lora, grad_A, grad_B, None, grad_x, *_WEIGHT_NONE, grad_b, None, None, None)


def register_python_ops() -> None:
    """Registers lora_add's and nf4_lora_linear's Python kernels and autograd. lowrank/ops/__init__.py
    calls this, once, with library.register_python_autograd: without lowrank._C, or with
    LOWRANK_PYTHON_OPS=1 (else csrc/lora.cpp's are registered)."""
    _lib.impl("lora_add", lora_add_kernel, "CompositeExplicitAutograd")
    torch.library.register_autograd("lowrank::lora_add", _lora_add_backward, setup_context=_lora_add_setup_context)
    _lib.impl("nf4_lora_linear", nf4_lora_linear_kernel, "CompositeExplicitAutograd")
    torch.library.register_autograd("lowrank::nf4_lora_linear", _nf4_lora_backward, setup_context=_nf4_lora_setup_context)


# ---------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------


_C_DROPOUT_PARTS = None  # lowrank._C.dropout_parts: set by csrc.py with the C++ autograd (the same draws, one call)


def dropout_parts(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(dropped, keep, keep_scale) for the LoRA ops' dropout arguments (Note: dropout in the LoRA
    ops): what F.dropout(x, p, training=True) computes, from the same random numbers, without
    autograd. Like at::dropout: on CUDA at::native_dropout (its output, its bool mask, 1 / (1 - p)),
    elsewhere the noise bernoulli(1 - p) / (1 - p) in x's dtype and x * noise. For 0 < p < 1 and a
    non-empty x on the CPU or CUDA (F.dropout returns x itself at p = 0 and for no elements).
    Where lowrank._C's autograd is registered its C++ copy (csrc/lora.cpp) makes the calls below:
    3.8 us against 6.2 us from Python for one bf16 row on the CPU of docs/benchmarks.md."""
    if not (0.0 < p < 1.0 and x.numel() > 0 and x.device.type in ("cpu", "cuda")):
        raise ValueError(f"dropout_parts needs 0 < p < 1 and a non-empty x on the CPU or CUDA; got p={p!r}, "
                         f"x of shape {list(x.shape)} on {x.device}")
    if _C_DROPOUT_PARTS is not None:
        return _C_DROPOUT_PARTS(x, p)
    return _dropout_parts(x, p)


def _dropout_parts(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """dropout_parts' calls, the specification of csrc/lora.cpp's."""
    x = x.detach()  # (cheaper than torch.no_grad here)
    if x.device.type == "cuda":
        dropped, mask = torch.native_dropout(x, p, True)
        return dropped, mask, 1.0 / (1.0 - p)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * noise, noise, 1.0


def _dropout_args(x: torch.Tensor, dropout: float) -> tuple:
    return dropout_parts(x, dropout) if dropout else (None, None, 1.0)


def lora_add(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
             dropout: float = 0.0) -> torch.Tensor:
    """y + scale * (dropout(x) @ lora_A^T) @ lora_B^T as a new tensor (LoRA's addition to a layer's
    output y): x (..., in), lora_A (r, in), lora_B (out, r), y (..., out), one floating dtype and
    device; dropout as F.dropout(x, dropout, training=True) (dropout_parts). Differentiable in all
    four; bit-exact with y + F.linear(F.linear(F.dropout(x, ...), lora_A), lora_B) * scale and its
    gradients where x is contiguous (Note: lora_add)."""
    return torch.ops.lowrank.lora_add(y, x, lora_A, lora_B, float(scale), *_dropout_args(x, dropout))


def nf4_lora_linear(x: torch.Tensor, q: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None, x_lora: torch.Tensor | None = None,
                    dropout: float = 0.0) -> torch.Tensor:
    """A LoRA adapter on a 4-bit linear as one op: x @ W^T + bias + scale * (dropout(x_lora) @ lora_A^T) @ lora_B^T,
    W = dequantize(q) in x.dtype, x_lora the adapter's input (default x), dropout as
    F.dropout(x_lora, dropout, training=True) (dropout_parts), to the bit what lora_add(nf4_linear(x, q, bias),
    x_lora, lora_A, lora_B, scale, dropout) computes (Note: nf4_lora_linear). Differentiable in x,
    x_lora, bias, lora_A and lora_B."""
    x_lora = x if x_lora is None else x_lora
    return torch.ops.lowrank.nf4_lora_linear(x_lora, lora_A, lora_B, float(scale), x, *_fields(q), bias,
                                             *_dropout_args(x_lora, dropout))
