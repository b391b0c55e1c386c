"""LoRA on a parameter: PEFT's `target_parameters` (its ParamWrapper), for weights that no
linear module holds, above all the experts of a transformers 5 mixture-of-experts layer, one
3-D tensor (experts, out, in) that the experts module indexes itself.

    W'_e = W_e + s B_e A_e        for each expert e (a 2-D parameter: one "expert")

The layer wraps the module that owns the parameter and, in its forward, calls that module
with W' in the parameter's place (torch.func.functional_call): the module computes as it
always does and never knows. A 4-bit parameter is handed LoRA's update instead
(params4bit.with_term), which its routed experts add expert by expert
(lowrank/quant/experts4bit.py). Several parameters of one module: one layer each, nested, the
first registered innermost, as PEFT nests its wrappers (its file names depend on it: io.py).

# Note: PEFT's factor layout. A is an nn.Linear(in, r * E) and B an nn.Linear(r * E, out), and
# they are cut into experts differently: A's rows expert-major, A.view(E, r, in)[e]; B's columns
# expert-minor, B.view(out, r, E)[:, :, e]. lowrank keeps PEFT's tensors as they are, so a file
# of either reads into the other without a reshuffle. A 3-D parameter is (E, out, in), or
# (E, in, out) when its module says `is_transposed` (GPT-OSS), as PEFT reads it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.experts4bit import LowRankTerm
from ..quant.params4bit import has_parameter, parameter_names, parameter_shape, stored, with_term
from .base import TunerLayer
from .lora_base import LoraLayer


def owner_of(module: nn.Module) -> tuple[nn.Module, str]:
    """(the module that owns the parameters, the attribute path to it from `module`): inside any
    adapter layers around it ("base.base." for two of them)."""
    path = ""
    while isinstance(module, TunerLayer):
        module, path = module._modules["base"], path + "base."
    return module, path


class LoraParameter(LoraLayer):
    """LoRA on parameter `parameter` (2-D (out, in), or 3-D experts) of the wrapped module."""

    def __init__(self, base: nn.Module, parameter: str) -> None:
        super().__init__(base)
        self.parameter_name = parameter
        owner, _ = owner_of(base)
        shape = parameter_shape(owner, parameter)  # dense, or 4-bit (lowrank.quantize's NF4Config(parameters=...))
        self._three_d = len(shape) == 3  # experts, even one (PEFT takes E = 1 for a 2-D weight, and fails there)
        if len(shape) == 2:
            self._experts, (out_f, in_f), self._transposed_experts = 1, shape, False
        else:
            self._transposed_experts = bool(getattr(owner, "is_transposed", False))
            self._experts = shape[0]
            in_f, out_f = (shape[1], shape[2]) if self._transposed_experts else (shape[2], shape[1])
        self._dims = (in_f, out_f)  # not in_features / out_features: those would hide the owner's (TunerLayer.__getattr__)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _owner(self) -> tuple[nn.Module, object]:
        """(the module holding the parameter, its Weight4bit where the parameter is 4-bit, else None)."""
        owner = owner_of(self._modules["base"])[0]
        return owner, stored(owner, self.parameter_name)

    def weight_param(self) -> torch.Tensor:
        """The parameter; a 4-bit one dequantized in its compute dtype (a new tensor each call)."""
        owner, q = self._owner()
        return owner._parameters[self.parameter_name] if q is None else q.dense()

    def _dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """The parameter's dtype (a 4-bit one's compute dtype) and device, without dequantizing it."""
        owner, q = self._owner()
        if q is not None:
            return q.compute_dtype, q.packed.device
        w = owner._parameters[self.parameter_name]
        return w.dtype, w.device

    # -- per kind (LoraLayer) -------------------------------------------------------------
    def _create(self, name, r, dtype, device):
        dtype, device = self._dtype_and_device()  # the adapter takes the parameter's, as PEFT's
        (in_f, out_f), e = self._dims, self._experts
        self.lora_A[name] = nn.Linear(in_f, r * e, bias=False, dtype=dtype, device=device)  # See Note: PEFT's factor layout
        self.lora_B[name] = nn.Linear(r * e, out_f, bias=False, dtype=dtype, device=device)

    def _factor_stores(self):
        return (self.lora_A, self.lora_B)

    def _factors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _per_expert(self, name: str, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_e as (E, out, r), A_e as (E, r, in)) in `dtype` (None: the factors')."""
        A, B = self._factors_in(name, dtype)
        e = self._experts
        return B.view(B.shape[0], -1, e).permute(2, 0, 1), A.view(e, -1, A.shape[-1])

    def _expert_factors(self) -> list:
        """[(B_e (E, out, r), A_e (E, r, in), s)] for each active adapter, in its dtype: LoRA's
        update of a routed 4-bit expert (experts4bit.LowRankTerm)."""
        return [(*self._per_expert(name, None), self.scaling[name]) for name in self.active]

    def _product(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B_e A_e for every expert, in the parameter's layout: (out, in), (E, out, in) or (E, in,
        out), by PEFT's einsum (See Note: PEFT's factor layout)."""
        if not self._three_d:
            return B @ A
        e = self._experts
        einsum = "o r e, e r i -> e i o" if self._transposed_experts else "o r e, e r i -> e o i"
        return torch.einsum(einsum, B.reshape(B.shape[0], -1, e), A.reshape(e, -1, A.shape[-1]))

    def _delta_weight(self, name, dtype=None):
        """s B_e A_e for every expert, in the parameter's layout, computed in `dtype` (None: the factors')."""
        return self._product(*self._factors_in(name, dtype)) * self.scaling[name]

    @property
    def weight_attr(self) -> str:
        return self.parameter_name

    def target_weight(self):
        return self.weight_param()

    def _writable_weight(self):
        owner, q = self._owner()
        if q is not None:
            raise TypeError(f"cannot merge into {self.parameter_name!r} of {type(owner).__name__}: it is a 4-bit "
                            "parameter, which cannot take a merged update; keep the adapter unmerged, or write a "
                            "merged model with lowrank.merge_and_export")
        return self.weight_param()  # never a computed weight: PEFT and we read it from _parameters

    def dense_weight(self):
        return self.weight_param()

    # -- forward --------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        base = self._modules["base"]
        if not self.enabled or self._merged or not self.active:
            return base(*args, **kwargs)
        if self.route is not None:
            raise ValueError(f"per-sample adapters (lowrank.per_sample) are not supported for LoRA on a parameter "
                             f"({self.parameter_name!r}): its update changes the weight every sample reads, as in PEFT")
        owner, path = owner_of(base)
        q = stored(owner, self.parameter_name)
        if q is not None:  # See Note: routed experts (lowrank/quant/experts4bit.py)
            with with_term(owner, self.parameter_name, LowRankTerm(self._expert_factors, self._updated)):
                return base(*args, **kwargs)
        weight = self._updated(self.weight_param())
        return torch.func.functional_call(base, {path + self.parameter_name: weight}, args, kwargs, tie_weights=False)

    # Note: W' as PEFT forms it. One adapter on experts: W + s * B_e @ A_e in one baddbmm in W's
    # dtype, autocast off (PEFT's _LoraFactorsProxy). Otherwise (a 2-D parameter, several
    # adapters) each s B A is formed as PEFT's get_delta_weight forms it, under the caller's
    # autocast: experts by PEFT's einsum in the factors' dtype, a 2-D product in float32 where the
    # factors are bf16 / fp16 on the CPU (then rounded back to their dtype), in their dtype
    # elsewhere; each cast to W's dtype, the updates summed and added to W there
    # (_LoraParameterProxy). Equal to PEFT 0.21 bit for bit, outputs and gradients
    # (tests/peers/test_peft_experts.py). A merge forms s B A in float32 instead (lora_base.py,
    # Note: merging rounds once).
    def _updated(self, w: torch.Tensor) -> torch.Tensor:
        if len(self.active) == 1 and self._three_d:
            with torch.autocast(w.device.type, enabled=False):
                name = self.active[0]
                B, A = self._per_expert(name, w.dtype)
                lhs, rhs = (A.transpose(1, 2), B.transpose(1, 2)) if self._transposed_experts else (B, A)
                return torch.baddbmm(w, lhs, rhs, alpha=self.scaling[name])
        delta = None
        for name in self.active:
            d = self._peft_delta(name).to(w.dtype)
            delta = d if delta is None else delta + d
        return w + delta

    def _peft_delta(self, name: str) -> torch.Tensor:
        """s B A as PEFT's get_delta_weight forms it (See Note: W' as PEFT forms it)."""
        A, B = self._factors(name)
        half = not self._three_d and A.device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
        d = self._delta_weight(name, torch.float32 if half else None)
        return d.to(B.dtype) if half else d


def instead(module: nn.Module, where: str) -> str:
    """For the refusal of LoRA on `module` as a module: where it holds floating 2-D or 3-D
    parameters (a MoE layer's experts, a router's weight), LoRA on those, by name; else ""."""
    names = [f"{where}.{p}" for p in parameter_names(module) if has_parameter(module, p)
             and len(parameter_shape(module, p)) in (2, 3)
             and (stored(module, p) is not None or module._parameters[p].is_floating_point())]
    return f"; to adapt its weights, name them in parameters: LoraConfig(parameters={names!r})" if names else ""


def lora_chain(module: nn.Module) -> list[LoraLayer]:
    """Every LoRA layer in the stack of adapter layers at one place, outermost first: one for a
    module target, one per adapted parameter for parameter targets (nested)."""
    out = []
    while isinstance(module, TunerLayer):
        if isinstance(module, LoraLayer):
            out.append(module)
        module = module._modules["base"]
    return out


def find(walked, config, model: nn.Module) -> list[tuple[nn.Module, str, str, str]]:
    """(parent, attribute, module name, parameter name) for every parameter `config.parameters`
    matches, by its qualified name "<module name>.<parameter>" (the names they had before
    inject): modules in walk order, each module's parameters in the order it registered them
    (the order PEFT nests its wrappers in). A module at several places: its first."""
    from ..targets import compile_filter
    from ..walk import _unwrap

    wanted = compile_filter(config.parameters, (), model)
    top = [p for p in parameter_names(model) if wanted(p, model)]
    if top:
        raise ValueError(f"parameters matches {top}, parameters of {type(model).__name__} itself: LoRA on a parameter "
                         "wraps the module that holds it, and nothing holds the top level (nor in PEFT)")
    out, seen = [], set()
    for parent, attr, where, child in walked:
        owner = _unwrap(child)
        names = [p for p in parameter_names(owner) if wanted(f"{where}.{p}", owner)]
        if names and id(owner) not in seen:  # See Note: one module, one place (lowrank/inject.py)
            seen.add(id(owner))
            out += [(parent, attr, where, p) for p in names]
    return out


def check(child: nn.Module, name: str, where: str, parameter: str, module_targets: set[str]) -> None:
    """Raise, before anything changes, if LoRA `name` cannot go on parameter `parameter` of the
    module at `where`."""
    from ..walk import _unwrap

    key, owner = f"{where}.{parameter}", _unwrap(child)
    q = stored(owner, parameter)
    w = owner._parameters[parameter] if q is None else q.packed.new_empty(q.shape, dtype=q.compute_dtype, device="meta")
    if where in module_targets:
        raise ValueError(f"targets matches the module {where!r} and parameters matches its parameter {key!r}; "
                         "LoRA goes on one or the other (PEFT refuses both): exclude one")
    if w is None or not w.is_floating_point() or w.dim() not in (2, 3):
        what = "None" if w is None else f"a {w.dim()}-D {w.dtype} tensor"
        raise TypeError(f"cannot put LoRA on parameter {key!r}, {what}; LoRA on a parameter takes a floating "
                        "2-D weight (out, in) or 3-D experts (experts, out, in)")
    for layer in lora_chain(child):
        if not isinstance(layer, LoraParameter):
            raise ValueError(f"{where!r} already has LoRA as a module ({type(layer).__name__}); LoRA on its parameter "
                             f"{parameter!r} too is not supported (nor in PEFT): eject that adapter first")
        if layer.parameter_name == parameter and name in layer.names:
            raise ValueError(f"parameter {key!r} already has a LoRA adapter named {name!r}")


def wrap(child: nn.Module, config, name: str, where: str, parameter: str) -> nn.Module:
    """Add LoRA adapter `name` on parameter `parameter` of the module `child` stands for; returns
    what should stand in its place: the layer that already adapts that parameter takes the new
    adapter (as PEFT reuses its wrapper), else a new layer goes around the LoRA layers there,
    inside any other adapter's."""
    from ..targets import first_match
    from ..walk import _unwrap

    key, owner = f"{where}.{parameter}", _unwrap(child)
    r = first_match(config.rank_pattern, key, owner, config.r)
    alpha = first_match(config.alpha_pattern, key, owner, config.alpha)
    layer = next((m for m in lora_chain(child) if isinstance(m, LoraParameter) and m.parameter_name == parameter), None)
    if layer is not None:
        layer.add(name, config, r, alpha)
        return child
    if isinstance(child, TunerLayer) and not isinstance(child, LoraLayer):
        child.base = wrap(child.base, config, name, where, parameter)
        return child
    layer = LoraParameter(child, parameter)
    layer.add(name, config, r, alpha)
    return layer
