"""What every LoRA layer shares: named adapters (r, scale, dropout, factors), the forward
equation, and explicit, idempotent, safe merge / unmerge. The layer kinds (linear-like,
embedding, convolution) live in lora.py and fill in three methods:

    _create(name, r, dtype, device)   make the factors A and B
    _lora(name, x)                    B A x for this layer kind, unscaled
    _delta_weight(name, dtype)        s B A in the layout of `base.weight`, for merging
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import nn

from ..config import LoraConfig
from ..quant.linear4bit import Linear4bit, autocast_dtype
from . import dora
from .base import TunerLayer, cast_for


def float_dtype_and_device(base: nn.Module, inner: bool = False) -> tuple[torch.dtype, torch.device]:
    """The base's compute dtype and device. A base that states a `compute_dtype` (the 4-bit
    linear, whose float32 scales say nothing of it) is taken at its word; otherwise its first
    floating parameter or buffer decides; with `inner`, a base with none (a block of 4-bit
    layers, such as a quantized LlamaMLP) takes the compute dtype of its first submodule that
    states one; the default dtype on CPU when nothing decides."""
    tensors = list(base.parameters()) + list(base.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    compute_dtype = getattr(base, "compute_dtype", None)
    if compute_dtype is not None:
        return compute_dtype, device
    for t in tensors:
        if t.is_floating_point():
            return t.dtype, t.device
    for m in base.modules() if inner else ():
        if getattr(m, "compute_dtype", None) is not None:
            return m.compute_dtype, device
    return torch.get_default_dtype(), torch.device("cpu")


def quantized_base(base: nn.Module) -> bool:
    """A frozen 4-bit linear (lowrank's Linear4bit, any with `dequantize()`, or bitsandbytes' own, as
    transformers' BitsAndBytesConfig loads it), whose LoRA casts as PEFT's bitsandbytes layers do
    (See Note: x in the adapter's dtype)."""
    bnb = sys.modules.get("bitsandbytes")  # loaded already if the model holds its layers; never imported here
    return (isinstance(base, Linear4bit) or callable(getattr(base, "dequantize", None))
            or (bnb is not None and isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))))


def bnb_4bit(weight) -> bool:
    """Whether `weight` is bitsandbytes' quantized 4-bit Params4bit (as transformers' BitsAndBytesConfig
    loads a model). See Note: DoRA on bitsandbytes' 4-bit layers."""
    bnb = sys.modules.get("bitsandbytes")  # loaded already if the weight is one of its; never imported here
    return bnb is not None and isinstance(weight, bnb.nn.Params4bit) and getattr(weight, "quant_state", None) is not None


def bnb_dense(weight) -> torch.Tensor | None:
    """bitsandbytes' 4-bit weight as the dense (out, in) tensor it stands for, in the dtype it was
    quantized from, as PEFT's DoRA reads it (dequantize_module_weight); None for any other weight."""
    if not bnb_4bit(weight):
        return None
    return sys.modules["bitsandbytes"].functional.dequantize_4bit(weight.data, weight.quant_state)


# Note: DoRA on bitsandbytes' 4-bit layers. DoRA reads W0 for its column norm (and, with a training
# dropout, for W0 x). lowrank's Linear4bit hands it over through dequantize(); bitsandbytes'
# Linear4bit (a transformers BitsAndBytesConfig model) has no such method, and inject refused DoRA
# there ("use plain LoRA") where PEFT 0.21 trains it (QDoRA) and loads its files. LoraLinear now
# dequantizes a Params4bit as PEFT does (bnb.functional.dequantize_4bit), so outputs and gradients
# equal PEFT's bit for bit (tests/peers/test_peft_qdora_on_bitsandbytes.py); merge still refuses a
# 4-bit weight. bitsandbytes' 8-bit layers stay refused for DoRA.


class LoraLayer(TunerLayer):
    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoraConfig] = {}  # shared, never mutated
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, for the adapters that use it
        self._merged: tuple[str, ...] = ()
        self._merge_norms: dict[str, torch.Tensor] = {}  # DoRA: ||W0 + s B A||_c at merge time, for unmerge

    # -- adapters -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.r)

    @property
    def merged(self) -> tuple[str, ...]:
        return self._merged

    def add(self, name: str, config: LoraConfig, r: int, alpha: float, where: str | None = None) -> None:
        if name in self.r:
            raise ValueError(f"this layer already has a LoRA adapter named {name!r}; pick another name or eject it first")
        dtype, device = float_dtype_and_device(self.base)
        self._create(name, r, dtype, device)
        self.r[name] = r
        self.scaling[name] = config.scale(r, alpha)
        self.configs[name] = config
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._reset(name, config.init)
        if config.dora:
            with torch.no_grad():
                m = self._dora_norm(self.dense_weight(), self._lora_matrix(name), self.scaling[name])  # (out,)
            if m.device.type != "meta" and not bool(m.all()):  # See Note: DoRA on a zero row (inject undoes what add made so far)
                rows = m.flatten().eq(0).nonzero().flatten().tolist()
                raise ValueError(f"DoRA cannot go on {where or type(self.base).__name__!r}: {len(rows)} of its {m.numel()} "
                                 f"output rows of W0 are all zeros (rows {rows[:8]}), where DoRA's m / ||W0||_c is 0 / 0: "
                                 "NaN outputs and gradients (in PEFT 0.21 too); exclude it, or use plain LoRA there")
            self.lora_magnitude_vector[name] = nn.Parameter(m)

    # Note: DoRA on a zero row. m starts at ||W0||_c, so a row of W0 that is all zeros (a zero-initialized
    # layer, such as DiT's adaLN-Zero, or a pruned row) has m = n = 0 and DoRA's m / n is NaN from the first
    # forward, gradients too: the row's direction W0 + s B A is 0 / 0 (B = 0), which DoRA does not define.
    # PEFT 0.21 returns the NaNs and the first step spreads them; inject refuses, naming the rows.

    def delete(self, name: str) -> None:
        if name in self._merged:
            self._unmerge_one(name)
        for store in (self.r, self.scaling, self.configs):
            del store[name]
        for store in self._factor_stores() + (self.lora_dropout, self.lora_magnitude_vector):
            if name in store:
                del store[name]
        self.active = tuple(n for n in self.active if n != name)

    def forget_merged(self, name: str) -> None:
        """Keep `name`'s update in the weight but stop tracking it (eject with keep_merged)."""
        self._merged = tuple(n for n in self._merged if n != name)
        self._merge_norms.pop(name, None)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = [store[name] for store in self._factor_stores()]
        params = [p for m in params for p in (m.parameters() if isinstance(m, nn.Module) else [m])]
        return params + ([self.lora_magnitude_vector[name]] if name in self.lora_magnitude_vector else [])

    def _reset(self, name: str, init: str) -> None:
        A, B = self._factors(name)
        with torch.no_grad():
            if init == "kaiming":  # nn.Linear's own init, as loralib and PEFT
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            else:  # "gaussian"
                nn.init.normal_(A, std=1 / self.r[name])
            nn.init.zeros_(B)  # B = 0: a fresh adapter is the identity

    # -- forward --------------------------------------------------------------------------
    # h = W0 x + sum over active adapters a of  s_a * B_a A_a dropout_a(x)      (Hu et al. 2021, eq. 3)
    #     s_a = alpha_a / r_a, or alpha_a / sqrt(r_a) with rsLoRA; DoRA adapters add dora.delta instead.
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._modules["base"](x, *args, **kwargs)  # W0 x (+ b); see Note: lookups on the hot path
        if self.route is not None:  # the route picks the adapters, active or not (PEFT's adapter_names)
            return result if not self.enabled or self._merged else self.routed(result, x, self._delta)
        if not self.enabled or self._merged or not self.active:
            return result
        base_out = result
        for name in self.active:
            dtype = self._input_dtype(x, self._factors(name)[0].dtype)
            x = x if dtype is None else x.to(dtype)  # later adapters read the cast x, as in PEFT's loop
            result = self._add_delta(name, result, x, base_out)
        # the sum back in the base output's dtype once (See Note: x in the adapter's dtype); under
        # autocast a 4-bit base's sum is left to autocast, as PEFT's bitsandbytes layer leaves it
        if result.dtype == base_out.dtype or (autocast_dtype(x) is not None and quantized_base(self._modules["base"])):
            return result
        return result.to(base_out.dtype)

    def _add_delta(self, name: str, result: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """result + this adapter's addition (LoraLinear adds it in one op where it can)."""
        quantized = quantized_base(self._modules["base"])
        outside = autocast_dtype(x) is None
        out = result + self._delta(name, x, base_out, wide=not (quantized and outside), running=result)
        if quantized and out.dtype != base_out.dtype and outside:
            out = out.to(base_out.dtype)  # a 4-bit base: each adapter's sum (DoRA's) back at once, as PEFT's bnb layer
        return out

    # Note: x in the adapter's dtype. The rule of tuners/base.py (Note: inputs in the adapter's
    # dtype) for LoRA: x cast to the factors' dtype before the dropout, s B A x in that dtype. On a
    # dense base (Linear, Conv1D, convolution, embedding) the additions are summed with the base
    # output in the wider dtype and the sum is cast back once, after the last adapter, as PEFT's
    # dense layers do (a float32 adapter on a bf16 layer: one rounding, not two); on a 4-bit base
    # (lowrank's or bitsandbytes') each LoRA addition is cast to the output's dtype first, as PEFT's
    # bitsandbytes layers do, and a DoRA addition is summed wide and that sum cast back before the
    # next adapter; also where only DoRA's magnitude (kept in the weight's original dtype) is wider:
    # a float32 model's layer computing in bfloat16 on bfloat16 x returns bfloat16. A per-sample
    # route (tuners/base.py: routed) casts each LoRA addition first, as PEFT's mixed-batch forward does. The op paths never see mixed dtypes (lora.py:
    # _dtypes_fit, _qlora), so they are unchanged. The adapters of `inject(..., dtype=torch.float32)`
    # on a bf16 model take this path on every kind of base.
    # Under autocast PEFT's dense layers still cast x (its bitsandbytes layers leave it to
    # autocast), which changes what a dropout (on x in the factors' dtype) and DoRA (its weight
    # norm in x's dtype) compute: so do lowrank's on a dense base, and a DoRA sum comes back to
    # the output's dtype there (lora.py).
    def _input_dtype(self, x: torch.Tensor, factor_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype x is cast to before the adapter reads it, or None (See Note: x in the adapter's dtype)."""
        if x.dtype == factor_dtype:  # the usual case, asked per adapter per forward: nothing more to look up
            return None
        # under autocast as PEFT's Linear does, not as its bitsandbytes layers
        return cast_for(x, factor_dtype, under_autocast=not quantized_base(self._modules["base"]))

    def _delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor, wide: bool = False,
               running: torch.Tensor | None = None) -> torch.Tensor:
        """This adapter's addition to the base output, in the base output's dtype unless `wide` or
        DoRA's (See Note: x in the adapter's dtype). `running`: the output so far, earlier active
        adapters' additions included, which DoRA scales (See Note: DoRA after other adapters)."""
        seen = base_out if running is None else running
        dtype = self._input_dtype(x, self._factors(name)[0].dtype)
        delta = self._addition(name, x if dtype is None else x.to(dtype), seen)
        if wide or name in self.lora_magnitude_vector or delta.dtype == base_out.dtype:
            return delta
        return delta.to(base_out.dtype)

    # Note: DoRA after other adapters. With several active adapters, DoRA's (m/n - 1) W0 x term
    # takes the output so far, the earlier adapters' additions included, as PEFT 0.21's DoRA
    # variant does (its base_result is the running result): the adapter then rescales the layer as
    # the earlier adapters left it, which is what merging them in turn would compute. A per-sample
    # route gives each sample one adapter, on the base output; a training dropout recomputes W0 x
    # from the dropped-out x, as PEFT.

    def _addition(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """This adapter's addition, computed in x's dtype (the factors')."""
        drop = self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            if self.training and not isinstance(drop, nn.Identity):
                x, base_out = drop(x), None  # W0 x is recomputed from the dropped-out x
            return self._dora_delta(name, x, base_out)
        return self._lora(name, drop(x)) * self.scaling[name]

    def _dora_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        """DoRA's addition (a linear-like layer's; LoraConv has its own); base_out None: recompute W0 x."""
        A, B = self.lora_A[name], self.lora_B[name]
        return dora.delta(x, base_out, weight=self.dense_weight(), bias=getattr(self.base, "bias", None), lora_A=A,
                          lora_B=B, scaling=self.scaling[name], magnitude=self.lora_magnitude_vector[name])

    def _dora_norm(self, weight: torch.Tensor, delta: torch.Tensor, scaling: float) -> torch.Tensor:
        """||W0 + scaling * delta||_c, in m's shape; weight, delta (out, in) here (LoraConv: kernels)."""
        return dora.weight_norm(weight, delta, scaling)

    # -- merge ----------------------------------------------------------------------------
    def merge(self, check_only: bool = False) -> list[str]:
        """Fold the active adapters into base.weight; a no-op for those already merged.
        Safe: each new weight is checked finite before it is written. `check_only`: compute and
        check every new weight, write nothing (lowrank/merging.py, Note: merge checks first).
        Returns what it merged (would merge)."""
        todo = [n for n in self.active if n not in self._merged]
        if not todo:
            return []
        if len(self.active) > 1 and any(n in self.lora_magnitude_vector for n in self.active):
            raise ValueError(f"cannot merge several adapters {list(self.active)} when one is DoRA; "
                             "activate one DoRA adapter at a time to merge it")
        weight = current = self._writable_weight()
        with torch.no_grad():
            for name in todo:  # the sum in float32 (or wider), rounded into the weight once: See Note: merging rounds once
                current = self._merged_weight(name, current)
                rounded = current.to(weight.dtype) if name == todo[-1] else current  # a float16 sum can overflow there
                if not bool(torch.isfinite(rounded).all()):
                    for n in todo:
                        self._merge_norms.pop(n, None)
                    raise ValueError(f"merging adapter {name!r} into {type(self.base).__name__} gives non-finite "
                                     f"weights (inf/nan in {weight.dtype}); the weight was left unchanged")
            if check_only:
                for n in todo:
                    self._merge_norms.pop(n, None)
                return todo
            weight.copy_(rounded)
        self._merged += tuple(todo)
        return todo

    def unmerge(self) -> list[str]:
        """Take merged adapters back out of base.weight, last merged first; a no-op when none are."""
        weight, done = self._writable_weight(), list(reversed(self._merged))
        wide = _wide(weight)  # See Note: merging rounds once.
        with torch.no_grad():
            current = weight.to(wide)
            for name in done:
                d = self._delta_weight(name, wide)
                if name in self._merge_norms:  # DoRA: W' = f * (W0 + d)  =>  W0 = W' / f - d
                    current = current / self._dora_factor(name, self._merge_norms.pop(name)) - d
                else:
                    current = current - d
            if done:
                weight.copy_(current)
        self._merged = ()
        return done

    def _unmerge_one(self, name: str) -> None:
        """Take `name`'s update out of base.weight and leave the other merged adapters in."""
        others = tuple(n for n in self._merged if n != name)
        if not others:
            self.unmerge()
            return
        # several merged: none is DoRA (merge refuses that), so the updates add, and one comes out alone
        weight = self._writable_weight()
        with torch.no_grad():
            wide = _wide(weight)
            rest = (weight.to(wide) - self._delta_weight(name, wide)).to(weight.dtype)
            if not bool(torch.isfinite(rest).all()):  # the others' sum alone overflows the dtype (float16): as merge
                warnings.warn(f"taking {name!r} alone out of {type(self.base).__name__}'s weight leaves {list(others)} "
                              f"merged beyond {weight.dtype}'s range (inf); they are unmerged too, and stay active",
                              stacklevel=4)
                self.unmerge()  # refuses that sum, unmerge writes W0 back and the others stay active, unmerged
                return
            weight.copy_(rest)
        self._merged = others

    # Note: merging rounds once. merge forms s B A from the factors in float32 (or the weight's
    # dtype, when wider) and adds it to the weight there, every active adapter's in turn;
    # copying the sum into a bf16/fp16 weight is its one rounding, as in merge_and_export
    # (lowrank/export.py merged_weight), so merging in place and exporting write the same
    # weights (with several adapters too: it had rounded after each). Forming s B A in bf16 first
    # rounded the update before the sum. PEFT 0.21 forms it in float32 on the CPU only
    # (get_delta_weight's cast_to_fp32), then rounds it to the weight's dtype and adds.
    def _merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        wide = _wide(weight)
        d = self._delta_weight(name, wide)  # layout of weight
        if name not in self.lora_magnitude_vector:
            return weight.to(wide) + d
        norm = self._dora_norm(self.dense_weight().to(wide), d.T if self.weight_in_out else d, 1.0)  # ||W0 + s B A||_c
        self._merge_norms[name] = norm
        return self._dora_factor(name, norm) * (weight.to(wide) + d)

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """m / n as a column (out, 1) (a kernel's: (out, 1...)), or a row (1, out) for a transposed (in, out) weight."""
        m = self.lora_magnitude_vector[name]  # norm from merge time: on m's device since (model.to(...) after merge)
        f = (m / norm.to(m.device)).reshape(-1, *[1] * (self.target_weight().dim() - 1))  # (out, 1...)
        return f.T if self.weight_in_out else f

    weight_attr = "weight"  # the base's attribute a merge writes into (LoraParameter: its parameter)

    def check_mergeable(self, name: str) -> None:
        """Raise ValueError where adapter `name`'s update has no form in the base's weight (a grouped
        convolution's: lora_conv.py); merge_and_export asks before it writes anything."""

    def target_weight(self) -> torch.Tensor | None:
        """The base's weight a merge writes into, as it is (None where it has none)."""
        return getattr(self.base, "weight", None)

    def _writable_weight(self) -> torch.Tensor:
        w = self.target_weight()
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(
                f"cannot merge into {type(self.base).__name__}: it has no dense floating `weight` "
                "(a 4-bit base cannot take a merged update; dequantize it first or keep the adapter unmerged)"
            )
        if self.base._parameters.get("weight") is not w:  # See Note: a computed weight.
            raise TypeError(
                f"cannot merge into {type(self.base).__name__}: its `weight` is computed from other parameters "
                "at every read (torch.nn.utils.parametrize, weight_norm, spectral_norm), so writing it would not "
                "change the model; keep the adapter unmerged, or remove the parametrization first"
            )
        return w

    # Note: a computed weight. Under torch.nn.utils.parametrize (weight_norm, spectral_norm,
    # orthogonal) `base.weight` is recomputed from `parametrizations.weight.original` at each read,
    # and the old hook-based weight_norm sets it before each forward: a merge that wrote into it
    # wrote into a throwaway tensor, reported success and left the model computing the base alone
    # (PEFT 0.21's merge_and_unload does the same). A mergeable weight is the base's own Parameter.

    # -- per kind -------------------------------------------------------------------------
    transposed = False  # True when base.weight is stored (in, out), as in GPT-2's Conv1D
    weight_in_out = property(lambda self: self.transposed)  # (in, out) for DoRA's m: also an embedding's (num, dim)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no dense (out, in) weight")

    def _lora_matrix(self, name: str) -> torch.Tensor:
        """B A as (out, in), unscaled (DoRA's norms)."""
        raise NotImplementedError

    def _factor_stores(self) -> tuple:
        raise NotImplementedError

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s B A in the layout of base.weight, computed in `dtype` (None: the factors')."""
        raise NotImplementedError

    def _factors_in(self, name: str, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self._factors(name)
        return (A, B) if dtype is None else (A.to(dtype), B.to(dtype))


def _wide(weight: torch.Tensor) -> torch.dtype:
    """The dtype a merge computes in: float32, or the weight's when wider (See Note: merging rounds once)."""
    return torch.promote_types(weight.dtype, torch.float32)
