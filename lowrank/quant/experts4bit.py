"""Routed 4-bit experts: a mixture-of-experts layer whose experts are 4-bit parameters
(lowrank/quant/params4bit.py) computes each routed expert straight from its NF4 codes, and
never forms the dense experts tensor.

# Note: routed experts. The dense path (params4bit's Note: a 4-bit parameter) dequantizes
# every expert on every call and hands the class's forward the whole dense tensor: simple, and
# exact to the dense twin, but it writes E experts where a decoding step reads k of them
# (top-2 of 8: 4x the work; top-8 of 128: 16x), and under autograd it keeps the dense experts
# alive until backward. transformers 5 decorates its experts classes with
# `use_experts_implementation`, which gives every one of them the same protocol (has_gate,
# has_bias, is_transposed, has_post_expert_norm, _apply_gate, act_fn, num_experts) and one
# signature (hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)); its grouped_mm
# forward is written against that protocol alone. The routed path follows the grouped_mm
# forward step for step: sort the (token, expert) pairs by expert, and for each expert that got
# tokens compute up (+ bias) -> gate or activation -> down (+ bias) on its rows, then the
# optional post-expert norm, the routing weights, the original order, the sum over k. Each
# expert's product is `lowrank::nf4_linear` on that expert's slice of the codes (the fused
# GEMV / kernels; its backward recomputes the weight instead of storing it), or, for experts
# stored (E, in, out) (`is_transposed`, GPT-OSS), `lowrank::nf4_linear_grad_input`, which
# multiplies by the stored layout as it is (and lowrank::nf4_linear is its input's gradient).
# Both keep views of the stored codes for backward, nothing new, except an expert's decoded
# scales: where they are needed under autograd, _Redecoded decodes them again in backward.
# An expert's slice decodes to exactly the dense path's expert: its scales are its blocks of
# the whole tensor's scales (decoded here where they are not whole groups of 256 nested
# scales). The products differ from the dense path's by the order of float sums, with two
# exceptions where the routed path follows transformers' eager forward and Linear4bit rather
# than grouped_mm: under autocast the experts compute in the autocast dtype (grouped_mm casts
# the activations to the dense weight's dtype instead, so a float32 model computes its experts
# in float32 there), and a bias adds as `x @ W + b` promotes. An expert index of num_experts or
# more names no expert and adds nothing, as in transformers' forwards.
#
# LoRA on a routed 4-bit parameter (LoraParameter) adds s (x A_e^T) B_e^T to expert e's
# product (a LowRankTerm) instead of forming W' = dequant(W) + s B A for every expert: the
# update is computed in the factors' dtype and added to the product, as a LoRA layer on a
# 4-bit linear adds it, rather than rounded into W's dtype with W.
#
# The routed path is taken when the owner follows the protocol, is not expert-parallel, its
# 4-bit parameters are its gate_up_proj / up_proj / down_proj, each expert is whole blocks,
# the call binds to the three tensors in a dtype NF4 decodes to (not a float64 reference
# copy), and nothing is being compiled; otherwise the gathered path or the dense path.
#
# Note: gathered experts. The routed loop reads the experts' counts on the host: torch.compile
# cannot trace it (its shapes depend on the routing), so a compiled model used to take the dense
# path and decode every expert on every call. The gathered path keeps the loop inside one op:
# the T k (token, slot) pairs, pair t k + j with token t's row and expert index[t, j], go
# through lowrank::nf4_experts_linear (lowrank/ops/experts_ops.py, Note: one op for the routed
# pairs) once a parameter, up -> gate or activation -> down on all the pairs, then the
# post-expert norm, the routing weights, the sum over k. Its shapes depend on T and k alone, so
# it traces as a few graph nodes. Its csrc (and triton) kernel computes each expert with rows
# from its codes, as the routed path does; its reference kernel (other devices, a CUDA graph
# being captured) dequantizes one copy of the expert a pair (T k experts), which the dense
# path's E bounds only where T k < E; so, while compiling, the gathered path is taken where
# T k < E (decoding: one token, k of E experts) and the dense path elsewhere. LoRA's factors
# are gathered a pair (T k copies of r (in + out) values) and added in the factors' dtype, as on
# the routed path. A pair whose index names no expert (>= num_experts) is computed from a zero
# row with the last expert and weighted zero (so no overflow of it reaches a gradient). Under
# autograd the op keeps the stored codes only (its backward is the op again).
# The choice (`choose`), by LOWRANK_EXPERTS:
#   unset / auto   eager: routed; compiling: gathered where T k < E, else dense
#   routed         eager: routed; compiling: dense (the choice before the gathered path)
#   gathered       gathered wherever the call can be routed, at any T k (tests, benchmarks)
#   dense          dense (the oracle in tests; benchmarks time each)
# The variable is read while a call is traced; torch.compile guards on it only where it was set
# then: set it before the first compile (or torch._dynamo.reset() after changing it).
# torch.export with a dynamic token count takes the gathered path only where T k < E holds for
# its whole range; a size torch.compile leaves unbacked traces the dense path.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from .. import ops  # lowrank.ops imports lowrank.quant: its names are read at call time
from . import nf4
from .linear4bit import autocast_dtype

WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
_PROTOCOL = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_apply_gate", "num_experts")
_MODES = ("auto", "routed", "gathered", "dense")
_SIGNATURES: dict[type, inspect.Signature | None] = {}


def mode() -> str:
    """LOWRANK_EXPERTS: "auto" (unset), "routed", "gathered" or "dense" (See Note: gathered experts)."""
    value = os.environ.get("LOWRANK_EXPERTS", "").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"LOWRANK_EXPERTS must be one of {_MODES} or unset, got {value!r}")
    return value


def choose(owner: nn.Module, names: tuple[str, ...], args: tuple, kwargs: dict) -> tuple:
    """(path, call): "routed" or "gathered" with the call's (hidden_states, top_k_index,
    top_k_weights), or ("dense", None) (See Note: gathered experts)."""
    how = mode()
    if how == "dense" or not routable(owner, names):
        return "dense", None
    call = routed_call(owner, args, kwargs)
    if call is None:
        return "dense", None
    if how == "gathered":
        return how, call
    if not torch.compiler.is_compiling():
        return "routed", call
    if how != "auto":  # routed: the dense path while compiling, with no guard on the token count
        return "dense", None
    # guard_or_false here and in routed_call: a size condition is guarded on while tracing, and is False where
    # it cannot be decided (a size torch.compile leaves unbacked); on plain ints, plain comparisons. torch.export
    # keeps a dynamic token count whole, which a guard would narrow: there T k < E must hold for every size.
    pairs = call[1].numel()
    fewer = statically_known_true(pairs < owner.num_experts) if torch.compiler.is_exporting() else \
        guard_or_false(pairs < owner.num_experts)
    return ("gathered", call) if fewer else ("dense", None)


def routable(owner: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether `owner`, with 4-bit parameters `names`, can take the routed path at all."""
    if not all(hasattr(owner, a) for a in _PROTOCOL) or getattr(owner, "_is_expert_parallel", False):
        return False
    for name in names:
        q = owner._modules[name]
        if name not in WEIGHTS or len(q.shape) != 3 or (q.shape[1] * q.shape[2]) % q.blocksize:
            return False
    return True


def _signature(owner: nn.Module) -> inspect.Signature | None:
    cls = type(owner)
    if cls not in _SIGNATURES:
        try:
            sig = inspect.signature(cls.forward)  # follows functools.wraps to the class's own forward
        except (TypeError, ValueError):
            sig = None
        _SIGNATURES[cls] = sig if sig is not None and len(sig.parameters) == 4 else None  # self + three
    return _SIGNATURES[cls]


def routed_call(owner: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """(hidden_states, top_k_index, top_k_weights) where this call can be routed, else None."""
    if len(args) == 3 and not kwargs:
        call = args
    else:
        sig = _signature(owner)
        if sig is None:
            return None
        try:
            call = tuple(sig.bind(owner, *args, **kwargs).arguments.values())[1:]
        except TypeError:
            return None
        if len(call) != 3:
            return None
    x, index, weights = call
    ok = (isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point() and isinstance(index, torch.Tensor)
          and index.dim() == 2 and not index.is_floating_point() and guard_or_false(index.numel() > 0)
          and isinstance(weights, torch.Tensor) and weights.dim() == 2 and guard_or_false(weights.shape[0] == index.shape[0])
          and guard_or_false(weights.shape[1] == index.shape[1]) and guard_or_false(index.shape[0] == x.shape[0]))
    # the codec decodes to float32 / float16 / bfloat16: a float64 reference copy takes the dense path
    return call if ok and (autocast_dtype(x) or x.dtype) in nf4.DTYPES else None


def decodes_scales(q: nn.Module) -> bool:
    """Whether expert_fields decodes the experts' scales of the 4-bit parameter q: double
    quantization, and an expert's blocks not a whole number of nested groups of 256 (then every
    expert after the first starts inside a group, and each is decoded alike)."""
    per = q.shape[1] * q.shape[2] // q.blocksize
    return q._parameters["nested_absmax"] is not None and per % nf4.NESTED_BLOCKSIZE != 0


def expert_fields(q: nn.Module, e: int) -> tuple:
    """Expert e of the 4-bit parameter `q` (a Weight4bit of shape (E, a, b)) as the lowrank::
    ops take a weight: its slices of the codes and scales, the scales decoded where they are not
    whole nested groups of 256 (decodes_scales; lowrank/ops/experts_ops.py expert_fields)."""
    return ops.experts_ops.expert_fields(*q.op_fields(), e)


class LowRankTerm:
    """s (x A_e^T) B_e^T for expert e's rows x, each adapter's in its factors' dtype and cast to
    the product's, summed, as a LoRA layer on a 4-bit linear adds its adapters (lora_base.py,
    Note: x in the adapter's dtype); `updated(w)` is the same update formed into the dense tensor,
    for the dense path (See Note: routed experts)."""

    def __init__(self, per_expert, updated) -> None:
        self.per_expert = per_expert  # () -> [(B (E, out, r), A (E, r, in), s), ...] in the factors' dtype
        self.updated = updated
        self._factors: list | None = None

    def add_to(self, y: torch.Tensor, e: int, x: torch.Tensor) -> torch.Tensor:
        """y + the update of expert e's rows x."""
        if self._factors is None:
            self._factors = self.per_expert()
        for B, A, s in self._factors:
            y = y + (F.linear(F.linear(x.to(A.dtype), A[e]), B[e]) * s).to(y.dtype)
        return y

    def add_gathered(self, y: torch.Tensor, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + the update of each row x[p] by expert ids[p] (See Note: gathered experts)."""
        for B, A, s in self.per_expert():
            xa = torch.bmm(A[ids], x.to(A.dtype).unsqueeze(-1))
            y = y + (torch.bmm(B[ids], xa).squeeze(-1) * s).to(y.dtype)
        return y


def _product(q: nn.Module, e: int, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x times expert e of the 4-bit parameter q: x @ W_e^T, or x @ W_e where experts are stored
    (in, out), which is the product lowrank::nf4_linear_grad_input computes (gy @ W). Where the
    expert's scales had to be decoded and autograd would keep them for backward, they are
    decoded again in backward instead (See Note: routed experts)."""
    if torch.is_grad_enabled() and x.requires_grad and decodes_scales(q):
        return _Redecoded.apply(x, q, e, transposed)
    return ops.experts_ops.times(x, expert_fields(q, e), transposed)


class _Redecoded(torch.autograd.Function):
    """_product for an expert whose scales are decoded: the ops' own autograd would keep the
    decoded float32 scales (1/32 of the expert's bf16 size at blocksize 64) from forward to
    backward, also under activation checkpointing, for every routed expert of every layer; this
    keeps the module and the expert's index, and decodes them again."""

    @staticmethod
    def forward(ctx, x, q, e, transposed):
        ctx.q, ctx.e, ctx.transposed = q, e, transposed
        return ops.experts_ops.times(x, expert_fields(q, e), transposed)

    @staticmethod
    def backward(ctx, grad):
        return ops.experts_ops.times(grad, expert_fields(ctx.q, ctx.e), not ctx.transposed), None, None, None


def _expert_linear(owner: nn.Module, name: str, which, x: torch.Tensor, dtype: torch.dtype, names: tuple,
                   terms: dict) -> torch.Tensor:
    """The product for parameter `name` (+ bias, + LoRA's term), computed in `dtype`: of expert
    `which` (an int) on its rows x, or of each row x[p] with expert which[p] (a tensor of indices:
    the gathered path). `names`: the owner's 4-bit parameters."""
    gathered = isinstance(which, torch.Tensor)
    if name not in names:  # a dense parameter of a module whose other one is 4-bit
        w = getattr(owner, name)[which]
        xw = x.to(w.dtype)
        if gathered:
            y = torch.bmm(xw.unsqueeze(1), w).squeeze(1) if owner.is_transposed else torch.bmm(w, xw.unsqueeze(-1)).squeeze(-1)
        else:
            y = xw @ w if owner.is_transposed else F.linear(xw, w)
    elif gathered:
        y = ops.experts_ops.experts_linear(x.to(dtype), which, owner._modules[name].op_fields(), owner.is_transposed)
    else:
        y = _product(owner._modules[name], which, x.to(dtype), owner.is_transposed)
    if owner.has_bias:  # promoted as `x @ W + b` promotes (a float32 bias under bf16 autocast: float32)
        y = y + getattr(owner, name + "_bias")[which]
    term = terms.get(name)
    if term is None:
        return y
    return term.add_gathered(y, which, x) if gathered else term.add_to(y, which, x)


def forward(owner: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
            names: tuple, terms: dict) -> torch.Tensor:
    """The experts' output (T, H) for routed tokens, each routed expert from its codes (See
    Note: routed experts; the steps are transformers' grouped_mm experts forward's)."""
    k, tokens = index.shape[-1], hidden.shape[0]
    ids, order = torch.sort(index.reshape(-1), stable=True)
    dtype = autocast_dtype(hidden) or hidden.dtype
    x = hidden[order // k]
    experts = owner.num_experts
    try:
        counts = torch.bincount(ids, minlength=experts).tolist()  # the host reads the routing once
    except RuntimeError as e:  # a negative index (sorted first), which transformers' forwards refuse too
        raise IndexError(f"top_k_index must hold expert indices >= 0 (0-{experts - 1}, or {experts} and up for no "
                         f"expert), got {int(ids[0])}") from e
    dropped = sum(counts[experts:])  # an index of num_experts or more names no expert: it adds nothing, as in
    up = "gate_up_proj" if owner.has_gate else "up_proj"  # transformers' eager and grouped_mm forwards
    outs, start = [], 0
    for e, c in enumerate(counts[:experts]):
        if c == 0:
            continue
        h = _expert_linear(owner, up, e, x[start : start + c], dtype, names, terms)
        h = owner._apply_gate(h) if owner.has_gate else owner.act_fn(h)
        outs.append(_expert_linear(owner, "down_proj", e, h, dtype, names, terms))
        start += c
    if not outs:
        return hidden.new_zeros(hidden.shape)
    y = torch.cat(outs)
    if owner.has_post_expert_norm:
        y = owner.post_expert_norm(y)
    if dropped:  # sorted last
        y = torch.cat([y, y.new_zeros(dropped, y.shape[-1])])
    y = y * weights.reshape(-1)[order].unsqueeze(-1)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return y[back].view(tokens, k, -1).sum(dim=1).to(hidden.dtype)


def gathered_forward(owner: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                     names: tuple, terms: dict) -> torch.Tensor:
    """The experts' output (T, H), each (token, slot) pair with its own gathered expert and no
    read on the host (See Note: gathered experts)."""
    k, tokens, experts = index.shape[-1], hidden.shape[0], owner.num_experts
    ids = index.reshape(-1).long()  # (any integer dtype indexes the biases and LoRA's factors alike)
    real = (ids < experts).unsqueeze(-1)
    ids = ids.clamp(max=experts - 1)
    # pair t k + j reads token t; a dropped pair reads zeros, so nothing it computes (an overflow of
    # the stand-in expert) reaches a gradient through the mask below
    x = torch.where(real, hidden.repeat_interleave(k, dim=0), 0)
    dtype = autocast_dtype(hidden) or hidden.dtype
    h = _expert_linear(owner, "gate_up_proj" if owner.has_gate else "up_proj", ids, x, dtype, names, terms)
    h = owner._apply_gate(h) if owner.has_gate else owner.act_fn(h)
    y = _expert_linear(owner, "down_proj", ids, h, dtype, names, terms)
    if owner.has_post_expert_norm:
        y = owner.post_expert_norm(y)
    y = torch.where(real, y * weights.reshape(-1, 1), 0)
    return y.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)
