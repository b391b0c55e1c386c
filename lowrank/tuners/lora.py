"""LoRA layers, one per kind of base: linear-like (nn.Linear, GPT-2 Conv1D, a frozen 4-bit
linear), nn.Embedding (here), nn.Conv1d/2d/3d (lora_conv.py); and `wrap` / `check`, the handler
`inject` uses. The shared machinery (forward equation, merge, unmerge) is lora_base.LoraLayer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import LoraConfig
from ..ops import csrc
from ..ops.lora_ops import dropout_parts
from ..quant.linear4bit import Linear4bit
from ..targets import first_match, is_gpt2_conv1d, is_linear_like, returns_routing
from . import dora
from .base import TunerLayer, cast_for
from .lora_base import LoraLayer, bnb_4bit, bnb_dense
from .lora_conv import LoraConv, check_groups
from .lora_paths import _dtypes_fit, _drops_in_op, _global_hooks, _hooked, _passes_x, _plain, _x_fits
from .lora_param import LoraParameter, instead

SUPPORTED = ("nn.Linear, transformers' GPT-2 Conv1D, nn.Embedding, nn.Conv1d/2d/3d, or a linear-like "
             "module (in_features, out_features, and a `weight` or a `dequantize()`)")


class LoraLinear(LoraLayer):
    """LoRA around a linear-like base: y = base(x) + s B A dropout(x); A (r, in), B (out, r).

    # Note: the base protocol. A base is wrapped as linear-like when it has
    #   in_features: int, out_features: int, forward(x (..., in)) -> (..., out), and either
    #   weight: a dense Parameter (out, in)  -- nn.Linear
    #   weight: a dense Parameter (in, out)  -- transformers' GPT-2 Conv1D, recognised by its
    #           class name and nf/nx fields (no config is read or changed), or
    #   dequantize() -> dense (out, in) Tensor -- a frozen 4-bit linear (QLoRA).
    # The LoRA path never reads the base weight; DoRA reads it through dequantize() or weight;
    # merge needs a dense floating `weight` to write into and says so when there is none.
    # Adapter parameters take the base's first floating parameter's dtype and device.
    """


    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        if is_gpt2_conv1d(base):
            self.in_features, self.out_features, self.transposed = base.nx, base.nf, True
        else:
            self.in_features, self.out_features, self.transposed = base.in_features, base.out_features, False
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name, r, dtype, device):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)  # A (r, in)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)  # B (out, r)

    def _factor_stores(self):
        return (self.lora_A, self.lora_B)

    def _factors(self, name):
        mods = self._modules  # See Note: lookups on the hot path (lowrank/tuners/base.py)
        return mods["lora_A"]._modules[name]._parameters["weight"], mods["lora_B"]._modules[name]._parameters["weight"]

    def _lora(self, name, x):
        return self.lora_B[name](self.lora_A[name](x))  # (..., in) -> (..., r) -> (..., out)

    # Note: LoRA in one op. Where lowrank._C's autograd is loaded (ops.csrc.CPP_AUTOGRAD), a plain
    # LoRA adapter adds itself through lowrank::lora_add: the same calls as
    # result + lora_B(lora_A(dropout(x))) * s, one C++ autograd node instead of ten and no
    # module calls (csrc/lora.cpp, Note: LoRA in one node), equal to that path bit for bit,
    # gradients included. Where that could differ or skip something, the modules run as before:
    # DoRA, torch.compile tracing (Inductor fuses the plain ops itself), torch.func transforms
    # (C++ autograd Functions do not support them), mixed dtypes (the sum would promote), x of one
    # dimension or not contiguous (matmul would not fold it into rows as the op's backward does),
    # tensor subclasses (DTensor, fake tensors) and hooks on the factor modules. Under autocast
    # (CPU, CUDA) the op's own rule casts x, A and B as F.linear's does, through autocast's cache;
    # it needs the base's output already in autocast's dtype, as autocast makes it. A training
    # dropout stays a node of its own here: as lora_add's own (Note: dropout in the LoRA ops,
    # lowrank/ops/lora_ops.py) it measured 5 us slower a layer on the CPU of docs/benchmarks.md
    # with the random numbers drawn from Python, and about even (1.5 us less a forward and
    # backward) with the C++ draws: not worth a second path. It pays where it also takes the base
    # into the op (Note: QLoRA in one op).
    def _add_delta(self, name, result, x, base_out):
        factors = self._op_factors(name)
        if not (factors is not None and _x_fits(x, *factors) and type(result) is torch.Tensor
                and _dtypes_fit(result, x, *factors)):  # fmt: skip
            # a sum wider than the output comes back once, after the last adapter (LoraLayer.forward)
            return super()._add_delta(name, result, x, base_out)
        if x.dtype != factors[0].dtype:  # under autocast only (_dtypes_fit): See Note: x in the adapter's dtype (lora_base.py)
            dtype = self._input_dtype(x, factors[0].dtype)
            x = x if dtype is None else x.to(dtype)
        drop = self._modules["lora_dropout"]._modules[name]
        if not _passes_x(drop):
            x = drop(x)
        return torch.ops.lowrank.lora_add(result, x, *factors, self.scaling[name])

    def _op_factors(self, name):
        """The weights (A, B) of adapter `name` where the lowrank:: ops may add it (Note: LoRA in
        one op), else None."""
        mods = self._modules  # See Note: lookups on the hot path (lowrank/tuners/base.py)
        A, B = mods["lora_A"]._modules[name], mods["lora_B"]._modules[name]
        if not (csrc.CPP_AUTOGRAD and not torch.compiler.is_compiling() and _plain(A) and _plain(B)
                and not _global_hooks() and name not in mods["lora_magnitude_vector"]
                and not torch._C._are_functorch_transforms_active()):  # fmt: skip
            return None
        return A._parameters["weight"], B._parameters["weight"]

    # Note: QLoRA in one op. One adapter on lowrank's Linear4bit, where LoRA would be one op
    # (Note: LoRA in one op) and nothing about the base could differ, is one call of
    # lowrank::nf4_lora_linear: base and adapter in one op and one autograd node (csrc/lora.cpp,
    # Note: QLoRA in one node), no call of the base module. So: a training dropout only as the
    # op's own (Note: dropout in the LoRA ops, lowrank/ops/lora_ops.py: a dropout node of its own
    # would hand x's gradients to the engine in another order; one node instead of three, 18 us
    # less a layer's forward and backward on the CPU of docs/benchmarks.md), no hooks on the base
    # nor compiled base, and every operand already in the dtype the base computes in
    # (Linear4bit.dtype_for: then its casts are no-ops, and so are autocast's). Equal to base(x) +
    # the adapter bit for bit, gradients included, down to a model's sums of them (the engine gets
    # x's two gradients in the two ops' order, csrc/lora.cpp).
    def forward(self, x, *args, **kwargs):
        base = self._modules["base"]
        if (type(base) is Linear4bit and not args and not kwargs and len(self.active) == 1 and self.enabled
                and not self._merged and self.route is None):  # fmt: skip
            out = self._qlora(base, x, self.active[0])
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)

    def _qlora(self, base, x, name):
        """The layer as one nf4_lora_linear call, or None where that could differ (Note: QLoRA in one op)."""
        factors = self._op_factors(name)
        drop = self._modules["lora_dropout"]._modules[name]
        passes = _passes_x(drop)
        if (factors is None or not (passes or _drops_in_op(drop, x)) or _hooked(base)
                or base._compiled_call_impl is not None):  # fmt: skip
            return None
        a, b = factors
        bias = base._parameters.get("bias")
        dtype = base.dtype_for(x)
        if not (_x_fits(x, a, b) and x.dtype == a.dtype == b.dtype == dtype and (bias is None or bias.dtype == dtype)):
            return None
        dropout = () if passes else dropout_parts(x, drop.p)  # drawn once everything else is known
        return torch.ops.lowrank.nf4_lora_linear(x, a, b, self.scaling[name], x, *base.op_fields(), bias, *dropout)

    def _lora_matrix(self, name):
        return self.lora_B[name].weight @ self.lora_A[name].weight  # (out, r) @ (r, in) -> (out, in)

    def _delta_weight(self, name, dtype=None):
        A, B = self._factors_in(name, dtype)
        d = (B @ A) * self.scaling[name]  # (out, r) @ (r, in) -> (out, in)
        return d.T if self.transposed else d  # the layout of base.weight

    def dense_weight(self) -> torch.Tensor:
        """W0 as (out, in), whatever the base's storage."""
        if callable(getattr(self.base, "dequantize", None)):
            return self.base.dequantize()
        dense = bnb_dense(self.base.weight)  # See Note: DoRA on bitsandbytes' 4-bit layers (lora_base.py)
        return dense if dense is not None else self.base.weight.T if self.transposed else self.base.weight  # Conv1D: (in, out)


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: y = E[ids] + s (A^T[ids]) B^T; A (r, num), B (dim, r). As loralib and
    PEFT: A = 0 and B ~ N(0, 1) at init (so still the identity), and no dropout (the input is token ids).
    DoRA as PEFT's DoraEmbeddingLayer: See Note: DoRA on an embedding."""

    weight_in_out = True  # the table E (num, dim) is W0^T: DoRA's m (dim,) is per column, and merges as a row

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__(base)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name, r, dtype, device):
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.base.num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.base.embedding_dim, r, dtype=dtype, device=device))

    def _reset(self, name, init):
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def _factor_stores(self):
        return (self.lora_embedding_A, self.lora_embedding_B)

    def _factors(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    # Note: DoRA on an embedding. As PEFT 0.21 (DoraEmbeddingLayer): W0 = E^T (dim, num), so m (dim,)
    # holds the norm of each embedding dimension over the vocabulary, ||E^T + s B A||_c; the layer
    # computes y' = (m / n) * y + (m / n) * s (A^T[ids]) B^T (times embed_scale), the output so far
    # rescaled rather than an addition (a per-sample route adds (m / n - 1) y + ..., the same sum),
    # in PEFT's op order, so outputs and gradients equal PEFT's bit for bit (tests/peers/test_peft_dora_embedding.py).
    def _dora_parts(self, name, x):
        """(m / n, the DoRA addition's second term) for ids x."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        lw = (A.T @ B.T).T  # (dim, num), PEFT's get_lora_weight
        w = self.base.weight.T  # (dim, num); in the sum's dtype, as PEFT's norm (an exact cast)
        n = dora.weight_norm(w.to(torch.promote_types(w.dtype, lw.dtype)), lw.detach(), self.scaling[name]).detach()
        ratio = self.lora_magnitude_vector[name] / n  # (dim,)
        out = ratio * self._lora(name, x) * self.scaling[name]
        scale = self._embed_scale()
        return ratio, out if scale is None else out * scale.to(out.dtype)

    def _add_delta(self, name, result, x, base_out):
        if name not in self.lora_magnitude_vector:
            return super()._add_delta(name, result, x, base_out)
        ratio, out = self._dora_parts(name, x)
        return ratio * result + out  # PEFT's DoRA variant: the output so far rescaled (See Note: DoRA on an embedding)

    def dense_weight(self):
        return self.base.weight.T  # W0 (dim, num)

    def _lora_matrix(self, name):
        return self.lora_embedding_B[name] @ self.lora_embedding_A[name]  # (dim, r) @ (r, num): PEFT's update_layer

    def _delta(self, name, x, base_out, wide=False, running=None):
        if name in self.lora_magnitude_vector:  # a per-sample route (base.py: routed); forward adds it in _add_delta
            ratio, out = self._dora_parts(name, x)
            return (ratio - 1) * (base_out if running is None else running) + out
        delta = self._lora(name, x) * self.scaling[name]  # no dropout on token ids
        scale = self._embed_scale()
        if scale is not None:  # See Note: scaled embeddings.
            delta = delta * scale.to(delta.dtype)
        # ids are never cast; an addition in another dtype than the output's (float32 factors on
        # a bf16 table) is summed wide or cast first (lora_base.py, Note: x in the adapter's dtype)
        return delta if wide or cast_for(delta, base_out.dtype) is None else delta.to(base_out.dtype)

    # Note: scaled embeddings. Gemma's, BART's (scale_embedding) and a few other models' word
    # embeddings multiply the looked-up rows by `embed_scale` (sqrt(d)) in their forward. The
    # addition is scaled the same, as PEFT 0.21 does (LoraLayer._get_embed_scale: a scalar, or a
    # one-element tensor; any other shape is not applied): then the merged table (E + s (B A)^T,
    # scaled by the base's forward) computes what the unmerged layer does, and an adapter file
    # means the same here and in PEFT.
    def _embed_scale(self) -> torch.Tensor | None:
        scale = getattr(self.base, "embed_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return torch.tensor(scale, dtype=self.base.weight.dtype, device=self.base.weight.device)
        return scale if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None

    def _lora(self, name, x):
        b = self.base
        # dense gradients for A (a sparse one would reach the matmul below); max_norm is refused at inject
        after_A = F.embedding(x, self.lora_embedding_A[name].T, b.padding_idx, None, b.norm_type,
                              b.scale_grad_by_freq, False)  # ids (...) -> (..., r)
        return after_A @ self.lora_embedding_B[name].T  # (..., r) @ (r, dim) -> (..., dim)

    def _delta_weight(self, name, dtype=None):
        A, B = self._factors_in(name, dtype)
        return (B @ A).T * self.scaling[name]  # (dim, r) @ (r, num) -> (num, dim)


def layer_class(module: nn.Module) -> type[LoraLayer] | None:
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv
    if is_linear_like(module):
        return LoraLinear
    return None


def _lora_slot(module: nn.Module) -> nn.Module:
    """The module LoRA attaches to: inside any outer (bottleneck) wrappers."""
    while isinstance(module, TunerLayer) and not isinstance(module, LoraLayer):
        module = module.base
    return module


def check(module: nn.Module, config: LoraConfig, name: str, where: str) -> None:
    """Raise, before anything changes, if LoRA `name` cannot go on `module` (at `where`)."""
    slot = _lora_slot(module)
    if isinstance(slot, LoraParameter):
        raise ValueError(f"{where!r} has LoRA on its parameter {slot.parameter_name!r}; LoRA on the module too is not "
                         "supported (nor in PEFT): exclude it from targets")
    if isinstance(slot, LoraLayer):
        if name in slot.names:
            raise ValueError(f"{where!r} already has a LoRA adapter named {name!r}; inject under another name "
                             f"or remove it first with lowrank.eject(model, {name!r})")
        slot = slot.base
    cls = layer_class(slot)
    if cls is None or returns_routing(slot):  # a router (targets.py, Note: routers) has no output to add LoRA's to
        why = f"LoRA wraps {SUPPORTED}" if cls is None else "its forward returns routing, not x W^T + b (PEFT fails there)"
        raise TypeError(f"cannot put LoRA on {where!r}, a {type(slot).__name__}; {why}{instead(slot, where)}")
    if cls is LoraConv:  # B takes the base's groups (lora_conv.py, Note: LoRA on a grouped convolution)
        check_groups(slot, first_match(config.rank_pattern, where, slot, config.r), where, config.dora)
    if cls is LoraEmbedding and slot.max_norm is not None:  # its forward renormalizes the table's rows in place
        raise ValueError(f"LoRA on an nn.Embedding with max_norm is not supported: {where!r} has max_norm="
                         f"{slot.max_norm}, so its rows (and A's) change at every lookup and a merge would not "
                         "compute what the adapter did; exclude it")
    if cls is LoraEmbedding and not _looks_up_ids(slot):
        raise ValueError(f"LoRA on {where!r}, a {type(slot).__name__}, is not supported: its forward does not return the "
                         "rows of the ids it is given (a table of positions, such as BART's embed_positions, reads rows "
                         "by position), so the adapter's rows, read by id, would be added to the wrong ones; exclude it")
    weight = getattr(slot, "weight", None)  # dense, or a 4-bit one DoRA can read (Note: DoRA on bitsandbytes' 4-bit layers)
    if config.dora and cls is LoraLinear and not hasattr(slot, "dequantize") and not bnb_4bit(weight) and \
            not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        raise ValueError(f"DoRA needs the dense weight of {where!r}, a {type(slot).__name__} whose weight is "
                         f"{getattr(getattr(slot, 'weight', None), 'dtype', None)} (a bitsandbytes 8-bit layer?) and "
                         "which has no dequantize(); use plain LoRA there, or lowrank.quantize's Linear4bit")


def _looks_up_ids(embedding: nn.Embedding) -> bool:
    """Whether the embedding's forward returns its rows at the ids given (times a scalar embed_scale,
    Note: scaled embeddings): its own class's forward on a few ids, without hooks. True where it
    cannot tell (no rows to read, a forward that needs more than ids)."""
    w = embedding.weight.detach()
    if w.device.type == "meta" or w.numel() == 0 or type(embedding).forward is nn.Embedding.forward:
        return True
    ids = torch.arange(min(4, w.shape[0]), device=w.device).flip(0).view(1, -1)  # not positions 0, 1, ...
    try:
        with torch.no_grad():
            out = type(embedding).forward(embedding, ids)
    except Exception:  # noqa: BLE001 (it takes other input: left to its own call to say)
        return True
    if not isinstance(out, torch.Tensor) or out.shape != (1, ids.shape[1], w.shape[1]):
        return False
    rows = w[ids[0]].to(out.dtype)
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 or isinstance(scale, (int, float)):
        rows = rows * scale
    # within a few roundings (Gemma 3 rounds a float32 scale to bf16 in its forward); other ids' rows differ by far more
    eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
    return bool(torch.allclose(out[0].float(), rows.float(), rtol=4 * eps, atol=4 * eps * float(rows.abs().max())))


def wrap(module: nn.Module, config: LoraConfig, name: str, where: str) -> nn.Module:
    """Add LoRA adapter `name` to `module`; returns what should stand in its place."""
    if isinstance(module, TunerLayer) and not isinstance(module, LoraLayer):
        module.base = wrap(module.base, config, name, where)  # LoRA sits innermost, on the weights
        return module
    layer = module if isinstance(module, LoraLayer) else layer_class(module)(module)
    r = first_match(config.rank_pattern, where, layer.base, config.r)
    alpha = first_match(config.alpha_pattern, where, layer.base, config.alpha)
    layer.add(name, config, r, alpha, where)
    return layer
