"""lowrank::nf4_experts_linear: each row of x times its own expert of a 4-bit experts tensor,
for a mixture-of-experts layer whose experts are NF4 (lowrank/quant/experts4bit.py).

    nf4_experts_linear(x (P, in), ids (P,), packed, absmax, nested_absmax?, offset?, [E, a, b],
                       blocksize, transposed)
        -> y (P, out), y[p] = x[p] @ W[ids[p]]^T   (in = b, out = a)
                    or y[p] = x[p] @ W[ids[p]]     (transposed: in = a, out = b)

W[e] = dequantize(...)[e] in x's dtype: expert e is the e-th (a, b) slice of the whole tensor,
and every expert is whole blocks (a b divisible by blocksize), so its codes and scales are its
own slices of the whole tensor's. Its gradient in x is the same op with `transposed` flipped;
nothing else has one (the codes are frozen, ids are indices).

# Note: one op for the routed pairs. The op's shapes depend on P alone, never on which experts
# the routing chose, so torch.compile traces it as one node and no host read of the routing
# happens outside it (Note: gathered experts, experts4bit.py). Its kernels:
#   reference   gather each row's expert (its codes, and the scales of its blocks only:
#               nf4.scales_at), dequantize the P experts in one call, one batched product. Runs
#               everywhere; reads P experts, writes them dense, reads them back.
#   csrc        (where lowrank._C is built; also registered as triton where Triton imports, so
#   triton      that LOWRANK_BACKEND=triton runs it) the rows sorted by expert, one
#               lowrank::nf4_linear (or nf4_linear_grad_input) per expert that has rows, on views
#               of its codes, each on that backend's kernels: the fused GEMV for a few rows, no
#               dense experts at all. It reads the experts' row counts on the host, so on a CUDA
#               stream being captured into a graph it runs the reference instead. A grouped GPU
#               kernel (one launch for every expert) is not written.
"""

from __future__ import annotations

import torch

from ..quant import nf4
from . import backends
from .library import FLOAT_DTYPES, _check_weight, _lib

OP = "nf4_experts_linear"
_lib.define(f"{OP}(Tensor x, Tensor ids, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
            "SymInt[] shape, int blocksize, bool transposed) -> Tensor")


def _check(x, ids, packed, absmax, nested_absmax, offset, shape, blocksize, transposed) -> int:
    """The checks of the fake kernel (and of the real ones, for their message); the output's width."""
    torch._check(len(shape) == 3, lambda: f"an experts tensor has shape [E, a, b], got {list(shape)}")
    _check_weight(packed, absmax, nested_absmax, offset, shape, blocksize)
    torch._check(shape[1] * shape[2] % blocksize == 0,
                 lambda: f"each expert must be whole blocks: {shape[1]} x {shape[2]} is not a multiple of blocksize {blocksize}")
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"x must be one of {FLOAT_DTYPES}, got {x.dtype}")
    width_in, width_out = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
    torch._check(x.dim() == 2 and x.shape[1] == width_in,
                 lambda: f"x must be (rows, {width_in}) for experts {list(shape)}{' (transposed)' if transposed else ''}, "
                 f"got {list(x.shape)}")
    torch._check(ids.dim() == 1 and ids.shape[0] == x.shape[0] and not ids.is_floating_point()
                 and not ids.is_complex() and ids.dtype != torch.bool,
                 lambda: f"ids must be integer (rows,) = ({x.shape[0]},), got {ids.dtype} {list(ids.shape)}")
    torch._check(x.device == packed.device and ids.device == packed.device,
                 lambda: f"x, ids and the weight must share a device, got {x.device}, {ids.device}, {packed.device}")
    return width_out


def _check_ids(ids: torch.Tensor, experts: int, on_gpu: bool = False) -> None:
    """Every index names an expert: a check of values, so the real kernels' only, and on a GPU
    only where asked (it waits for the device; the reference's gather fails there instead)."""
    if ids.numel() and (on_gpu or not ids.is_cuda) and not (0 <= int(ids.min()) and int(ids.max()) < experts):
        raise IndexError(f"ids must lie in [0, {experts}) (the experts), got values from {int(ids.min())} to "
                         f"{int(ids.max())}")


@torch.library.register_fake(f"lowrank::{OP}")
def _(x, ids, packed, absmax, nested_absmax, offset, shape, blocksize, transposed):
    width = _check(x, ids, packed, absmax, nested_absmax, offset, shape, blocksize, transposed)
    return x.new_empty((x.shape[0], width))


def _kernel(x, ids, packed, absmax, nested_absmax, offset, shape, blocksize, transposed):
    _check(x, ids, packed, absmax, nested_absmax, offset, shape, blocksize, transposed)
    _check_ids(ids, shape[0])
    _, impl = backends.choose(OP, x.device)
    return impl(x, ids, packed, absmax, nested_absmax, offset, list(shape), blocksize, transposed)


_lib.impl(OP, _kernel, "CompositeExplicitAutograd")


def _setup_context(ctx, inputs, output):
    # ids and the weight's fields (the stored codes themselves, nothing new), saved so that autograd
    # sees them: an ids changed in place before backward raises, saved-tensor hooks see them
    ctx.save_for_backward(*inputs[1:6])
    ctx.shape, ctx.blocksize, ctx.transposed = inputs[6], inputs[7], inputs[8]


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    grad_x = torch.ops.lowrank.nf4_experts_linear(grad, *ctx.saved_tensors, ctx.shape, ctx.blocksize, not ctx.transposed)
    return (grad_x,) + (None,) * 8


torch.library.register_autograd(f"lowrank::{OP}", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# The kernels (See Note: one op for the routed pairs)
# ---------------------------------------------------------------------------------------


def expert_fields(packed, absmax, nested_absmax, offset, shape, blocksize, e: int) -> tuple:
    """Expert e of an experts tensor's fields as the lowrank:: ops take a 2-D weight: (packed,
    absmax, nested_absmax, offset, [a, b], blocksize). Its scales are its blocks of the whole
    tensor's; where they are not whole nested groups of 256, they are decoded here to float32,
    the values the whole tensor's dequantize uses."""
    n = shape[1] * shape[2]
    per = n // blocksize
    packed, scales = packed.reshape(-1)[e * n // 2 : (e + 1) * n // 2], absmax.reshape(-1)[e * per : (e + 1) * per]
    two_d = [shape[1], shape[2]]
    if nested_absmax is None:
        return packed, scales, None, None, two_d, blocksize
    group, nested = nf4.NESTED_BLOCKSIZE, nested_absmax.reshape(-1)
    if per % group == 0:
        return packed, scales, nested[e * per // group : (e + 1) * per // group], offset, two_d, blocksize
    lo = e * per // group * group  # the first block of the nested group expert e starts in
    decoded = nf4.dequantize_scales(absmax.reshape(-1)[lo : (e + 1) * per], nested[lo // group :], offset.reshape(()))
    return packed, decoded[e * per - lo :], None, None, two_d, blocksize


def times(x: torch.Tensor, fields: tuple, transposed: bool) -> torch.Tensor:
    """x @ W^T (lowrank::nf4_linear) for a 2-D weight's fields, or x @ W where `transposed`
    (nf4_linear_grad_input): each is the other's input gradient."""
    if transposed:
        return torch.ops.lowrank.nf4_linear_grad_input(x, *fields)
    return torch.ops.lowrank.nf4_linear(x, *fields, None)


def gathered(ids, packed, absmax, nested_absmax, offset, shape, blocksize, dtype) -> torch.Tensor:
    """Experts ids (P,) of the experts tensor, dequantized to (P, a, b) in `dtype`: their codes
    and the scales of their blocks gathered (only those decoded), one dequantize; bit for bit
    the whole tensor's dequantize at those experts."""
    experts, a, b = shape
    per = a * b // blocksize
    ids = ids.long()
    codes = packed.reshape(experts, -1)[ids].reshape(-1)
    blocks = (ids.unsqueeze(-1) * per + torch.arange(per, device=ids.device)).reshape(-1)
    absmax = absmax.reshape(-1)
    if nested_absmax is None:
        scales = absmax[blocks]
    else:
        scales = nf4.scales_at(absmax, nested_absmax.reshape(-1), offset.reshape(()), blocks)
    dequantize = backends.implementation("nf4_dequantize", "reference")
    return dequantize(codes, scales, None, None, [ids.numel() * a, b], blocksize, dtype).view(-1, a, b)


@backends.register(OP, "reference")
def reference(x, ids, packed, absmax, nested_absmax, offset, shape, blocksize, transposed):
    w = gathered(ids, packed, absmax, nested_absmax, offset, shape, blocksize, x.dtype)
    if transposed:
        return torch.bmm(x.unsqueeze(1), w).squeeze(1)  # (P, 1, a) @ (P, a, b)
    return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)  # (P, a, b) @ (P, b, 1)


def per_expert(x, ids, packed, absmax, nested_absmax, offset, shape, blocksize, transposed):
    """The csrc and triton kernel (See Note: one op for the routed pairs): the NF4 ops it calls run
    on that backend's kernels."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return reference(x, ids, packed, absmax, nested_absmax, offset, shape, blocksize, transposed)
    rows, order = torch.sort(ids, stable=True)
    if x.is_cuda:  # (the op's kernel checked them on the CPU already) sorted: the least and the most
        _check_ids(rows[[0, -1]] if rows.numel() else rows, shape[0], on_gpu=True)
    counts = torch.bincount(rows, minlength=shape[0]).tolist()  # the host reads the routing once
    out = x.new_empty((x.shape[0], shape[2] if transposed else shape[1]))
    xs, start = x[order], 0
    for e, c in enumerate(counts):
        if c:
            fields = expert_fields(packed, absmax, nested_absmax, offset, shape, blocksize, e)
            out[order[start : start + c]] = times(xs[start : start + c], fields, transposed)
            start += c
    return out


def experts_linear(x: torch.Tensor, ids: torch.Tensor, fields: tuple, transposed: bool = False) -> torch.Tensor:
    """nf4_experts_linear on an experts tensor's (packed, absmax, nested_absmax, offset, shape,
    blocksize); x (P, in), ids (P,)."""
    return torch.ops.lowrank.nf4_experts_linear(x, ids, *fields, transposed)

