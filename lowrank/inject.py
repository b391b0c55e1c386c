"""inject / eject and the verbs on an injected model. `inject` is three parts: a target
filter (lowrank.targets), a handler chosen by the config's type (`check` then `wrap`, from
lowrank.tuners), and one recursive walk over named children (gpt-fast / torchao style;
lowrank/walk.py). merge and unmerge live in lowrank/merging.py.

The walk treats adapter layers as transparent: the children of a wrapped module keep the
names they had before, so targets, returned names and error messages always use the
model's own module names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from . import inject_warnings, restore
from .config import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig
from .distributed import check_not_sharded, reshard
from .merging import merge, unmerge, warn_of_unkept  # noqa: F401  (lowrank.inject's verbs)
from .quant.linear4bit import Stored4bit
from .quant.params4bit import has_parameter, parameter_names, parameter_shape
from .targets import ALL_LINEAR, compile_filter, is_linear_like, refuse_in_attention, warn_uncalled
from .tuners import adapter, lora, lora_param, prefix, prompt, prompt_hooks
from .tuners.base import BASE, TunerLayer
from .tuners.lora_base import LoraLayer
from .walk import (  # noqa: F401
    CHECKPOINT_WRAPPED,
    _layers,
    _lora_layers,
    _module,
    _unmerged_layers,
    _unwrap,
    _walk,
    active_adapters,
    adapter_names,
    child_name,
    plain_parameters,
)


@dataclasses.dataclass(frozen=True)
class Handler:
    check: callable  # (module, config, name, where) -> None; raises before anything changes
    wrap: callable  # (module, config, name, where) -> the module that stands in its place
    can_wrap: callable  # module -> bool; for "nothing matched" suggestions
    kind: str
    default_targets: callable = lambda model, config: ()  # (model, config) -> targets when config.targets is None
    # See Note: model-level hooks.
    attach: callable = lambda model, config, name: None  # after every wrap: install model-level hooks (idempotent)
    detach: callable = lambda model: None  # after an eject that left no layer of this handler's `layer` type
    layer: type = TunerLayer  # the TunerLayer subclass `wrap` creates, so eject knows when to call detach


# Note: model-level hooks. Some methods cannot live in the wrapped modules alone: prompt
# tuning lengthens the sequence, so the model's attention mask and labels must grow too. Such
# a handler wraps its modules like any other (parameters, names, eject and save all work the
# same) and `attach` adds what the model needs around them (e.g. a forward pre-hook on the
# top-level module); `detach` removes it when the last such layer is gone.

HANDLERS = {
    LoraConfig: Handler(lora.check, lora.wrap, lambda m: lora.layer_class(m) is not None, "LoRA", layer=LoraLayer),
    AdapterConfig: Handler(
        adapter.check, adapter.wrap, adapter.can_wrap, "a bottleneck adapter",
        default_targets=adapter.default_targets, layer=adapter.AdapterLayer,
    ),
    PromptConfig: Handler(
        prompt.check, prompt.wrap, lambda m: prompt.width_of(m) is not None, "a prompt",
        default_targets=prompt.default_targets, attach=prompt_hooks.attach, detach=prompt_hooks.detach,
        layer=prompt.PromptLayer,
    ),
    PrefixConfig: Handler(
        prefix.check, prefix.wrap, prefix.is_attention, "a prefix", default_targets=prefix.default_targets,
        attach=prefix.attach, detach=prefix.detach, layer=prefix.PrefixLayer,
    ),
}


def inject(model: nn.Module, config: LoraConfig | AdapterConfig | PrefixConfig | PromptConfig, name: str = "default",
           *, dtype: torch.dtype | None = None) -> list[str]:
    """Add adapter `name` to every module of `model` that `config.targets` matches, in place.
    Makes `name` the active adapter and only its parameters trainable; what it makes takes the
    train / eval mode of what it wraps (See Note: train or eval mode). Returns the qualified
    names of the modules it wrapped (and of the parameters LoRA's `parameters` adapted); raises,
    changing nothing, when nothing matched, when the model already has an adapter `name`, when
    an adapter is merged, or when a target cannot take this adapter.

    `dtype`: the new adapter's parameters' dtype. None (the default): the dtype each module
    computes in (a prompt: float32). torch.float32 on a bf16 or fp16 model is PEFT's default
    (`autocast_adapter_dtype=True`): the adapter and its optimizer updates stay in float32, and
    it casts its input to float32 and its addition back to the model's dtype (See Note: adapter
    dtype)."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"config must be one of {[c.__name__ for c in HANDLERS]}; got {type(config).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype (e.g. torch.float32); got {dtype!r}")
    check_not_sharded(model, "inject (and load_adapter)")
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"adapter name must be a non-empty string without '.', and not {BASE!r}; got {name!r}")
    if name in set(dir(nn.ModuleDict())) | set(dir(nn.ParameterDict())):  # the layers key their parts by name
        raise ValueError(f"adapter name {name!r} is an attribute of torch's module and parameter dicts, which hold "
                         f"the adapters' parts by name; pick another (e.g. {name + '_adapter'!r})")
    if name in adapter_names(model):  # one name, one adapter: save_adapter, eject and set_active go by name
        kinds = sorted({type(layer).__name__ for layer in _layers(model) if name in layer.names})
        raise ValueError(f"the model already has an adapter named {name!r} ({', '.join(kinds)}); pick another name, "
                         f"or eject it first")
    _unmerged_layers(model, f"inject (and load_adapter) of adapter {name!r}")  # the new adapter becomes active
    targets = config.targets if config.targets is not None else handler.default_targets(model, config)
    wanted = compile_filter(targets, config.exclude, model)
    matches, seen = [], set()
    for p, a, n, c in _walk(model):  # a module registered at several places: its first (See Note: one module, one place)
        inner = _unwrap(c)
        if wanted(n, inner) and id(inner) not in seen:
            seen.add(id(inner))
            matches.append((p, a, n, c))
    params = lora_param.find(_walk(model), config, model) if getattr(config, "parameters", None) else []
    if getattr(config, "parameters", None) and not params:  # a name that matches nothing is a mistake, not a no-op
        # only 4-bit layers whose weight the names match: beside a typo elsewhere the hint misled (any 4-bit model)
        named = compile_filter(config.parameters, (), model)
        four_bit = [n for _, _, n, c in _walk(model) if isinstance(m := _unwrap(c), Stored4bit) and is_linear_like(m)
                    and named(f"{n}.weight", m)][:2]
        raise ValueError(f"no parameter of {type(model).__name__} matched parameters={config.parameters!r}; "
                         f"they are named as in model.named_parameters(), e.g. {weights_named(model)[:4]}" + (
                             f"; a 4-bit linear layer's weight (e.g. of {four_bit}) is no parameter: name the layer "
                             "in targets=" if four_bit else ""))
    if not matches and (not params or (targets and tuple(targets) != (ALL_LINEAR,))):  # each given matches something
        candidates = [n for _, _, n, c in _walk(model) if handler.can_wrap(_unwrap(c))]
        raise ValueError(
            f"no module of {type(model).__name__} matched targets={targets!r} (exclude={config.exclude!r}); "
            f"{handler.kind} can wrap e.g. {candidates[:6]} ({len(candidates)} candidates in all)" + (
                "; inject replaces modules inside the model, never the model itself: put a lone layer in a container, "
                "e.g. nn.Sequential(layer)" if not candidates and handler.can_wrap(model) else ""))
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:  # inject freezes every parameter (mark_trainable), which torch refuses on these
        raise ValueError(f"{type(model).__name__} has uninitialized (lazy) parameters {lazy[:4]}; run one forward "
                         "pass to materialize them before inject")
    refuse_in_attention(matches, handler.kind)
    for _, _, where, child in matches:
        handler.check(child, config, name, where)
    warn_uncalled(matches, handler.kind)  # See Note: modules their model never calls (lowrank/targets.py)
    for _, _, where, child, parameter in [(p, a, w, getattr(p, a), n) for p, a, w, n in params]:
        lora_param.check(child, name, where, parameter, {w for _, _, w, _ in matches})
    holder = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the record goes on the model inside
    recorded = restore.record_flags(holder)  # See Note: requires_grad on eject (lowrank/restore.py)
    known = {id(m) for m in model.modules()}
    try:  # See Note: a failed inject changes nothing.
        for parent, attr, where, _ in matches:
            child = getattr(parent, attr)
            setattr(parent, attr, handler.wrap(child, config, name, where))
            _take_mode(getattr(parent, attr), child.training, known)
        for parent, attr, where, parameter in params:  # a module's parameters in the order it holds them
            child = getattr(parent, attr)
            setattr(parent, attr, lora_param.wrap(child, config, name, where, parameter))
            _take_mode(getattr(parent, attr), child.training, known)
        for encoder_layer in (m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)):
            for layer in _layers(encoder_layer):  # See Note: fused fast paths (tuners/base.py).
                layer.keep_fused_paths_off()
        restore.nested_off(model)  # See Note: no nested tensors through adapters (lowrank/restore.py)
        handler.attach(model, config, name)
        _take_mode(model, model.training, known)  # anything `attach` made
        if dtype is not None:
            _cast_adapter(model, name, dtype)
    except BaseException:
        _remove(model, name, keep_merged=False)
        if recorded:
            restore.drop_flags(holder)
        raise
    set_active(model, name)
    mark_trainable(model)
    inject_warnings.frozen_head(model, config, targets)
    inject_warnings.unmatched_patterns(config, [(w, _unwrap(c)) for _, _, w, c in matches]
                                       + [(f"{w}.{n}", _unwrap(getattr(p, a))) for p, a, w, n in params])
    return [where for _, _, where, _ in matches] + [f"{where}.{parameter}" for _, _, where, parameter in params]


# Note: one module, one place. A module registered at several places (one nn.Linear under two
# parents) is one module to `model.named_modules()`, under the first name, and PEFT adapts it
# there only; so does inject (the other places keep calling the bare module), and the saved file
# is PEFT's. Targeting a later name explicitly adapts that place instead.


# Note: a failed inject changes nothing. `check` runs on every target before the first is
# wrapped, but a wrap can still fail on what only making the adapter shows (a DoRA base whose
# dequantize raises, a prompt's init text tokenized for another embedding). Then every module
# that took the new adapter gives it up again, as eject would (a layer made for it is replaced by
# the module it wrapped; one that held other adapters keeps them), and the model-level hooks go
# with the last layer of their kind: the name is free again and the model is as before. The
# active adapters and the training flags are only changed after the last step that can fail.


# Note: train or eval mode. A new module starts in training mode, so an adapter added to a model
# in eval mode (load_adapter for inference, as PEFT's from_pretrained leaves it) would apply its
# dropout at inference. Every module inject makes takes the mode of the module it wraps (a
# wrapper and its adapters: the wrapped module's; anything else: the model's).
def _take_mode(module: nn.Module, training: bool, known: set[int]) -> None:
    for m in module.modules():
        if id(m) not in known:
            m.training = training
            known.add(id(m))


# Note: adapter dtype. `inject` makes an adapter in the dtype its module computes in, so on a bf16
# model its parameters, gradients and AdamW's updates are bf16: an update smaller than half a
# bf16 step (2^-9 of the weight) is lost. `inject(..., dtype=torch.float32)` casts the new
# adapter's parameters once they exist (each layer's, and the model-level ones of a prefix or
# prompt) and leaves the rest to the forwards, which cast an adapter's input to its dtype and its
# addition back (tuners/base.py, Note: inputs in the adapter's dtype; prefix and prompt cast
# their vectors to the states'). Such adapters run the modules' path, not the one-op paths
# (lora.py: those take one dtype). Saved files keep the parameters' dtype.
def _cast_adapter(model: nn.Module, name: str, dtype: torch.dtype) -> None:
    params = {id(p): p for layer in _layers(model) if name in layer.names for p in layer.adapter_parameters(name)}
    for p in params.values():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def eject(model: nn.Module, name: str | None = None, *, keep_merged: bool = False) -> list[str]:
    """Remove adapter `name` (None: all). A module left with no adapter is replaced by the very
    object that was there before `inject`, so `model.state_dict()` is as before, key for key;
    removing the last adapter also restores every parameter's requires_grad.
    Merged adapters are unmerged first, unless `keep_merged` (then the weights keep them: a
    plain fine-tuned model). Returns the names of the modules it touched."""
    _module(model, "eject")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"eject's name must be one adapter name (a str) or None for all; got {name!r}")
    if not isinstance(keep_merged, bool):
        raise TypeError(f"keep_merged must be a bool (True or False); got {keep_merged!r}")
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"the model has no adapter named {name!r}; it has {adapter_names(model)}")
    reshard(model)  # See Note: unsharded after a forward (lowrank/distributed.py): unmerging writes the weights
    if keep_merged:  # it keeps what merge folded in; an active adapter's effect that is not would go unsaid
        warn_of_unkept(model, name)
    active = active_adapters(model)
    kept = keep_merged and any(name in layer.merged for layer in _layers(model))  # its update stays in the weights
    had_it_active = [layer for layer in _layers(model) if name is not None and name in layer.active]
    touched = _remove(model, name, keep_merged)
    restore.activate_left(had_it_active, active_adapters(model))
    if not _layers(model):  # See Note: requires_grad on eject (lowrank/restore.py)
        wholes = restore.wholes(getattr(model, "_orig_mod", model))
        if not any(_layers(whole) for whole in wholes):  # else the whole's last eject puts the flags back
            restore.restore_flags(model, *wholes)
    elif active and not active_adapters(model) and not kept and not any(layer.merged for layer in _layers(model)):
        # the active adapter went and others stay: the first of them becomes active and trainable, as in PEFT's
        # delete_adapter (which leaves every other flag as it is)
        left = adapter_names(model)[0]
        warnings.warn(f"ejected the active adapter {name!r}; {left!r} is active now (lowrank.set_active to choose)",
                      stacklevel=2)
        set_active(model, left)
        for layer in _layers(model):
            for p in layer.adapter_parameters(left) if left in layer.names else ():
                p.requires_grad_(True)
    return touched


def _remove(model: nn.Module, name: str | None, keep_merged: bool) -> list[str]:
    """Take adapter `name` (None: all) out of every layer, and the model-level hooks whose last layer went."""
    touched = []
    for parent, attr, where, child in list(_walk(model)):
        if isinstance(child, TunerLayer):
            held = name is None or any(name in layer.names for layer in restore.chain(child))
            setattr(parent, attr, _strip(child, name, keep_merged))
            if held:  # a layer holding only other adapters is left as it was
                touched.append(where)
    for handler in HANDLERS.values():  # See Note: model-level hooks.
        if not any(isinstance(m, handler.layer) for m in _layers(model)):
            handler.detach(model)
    restore.nested_back(model)
    return touched


def _strip(module: nn.Module, name: str | None, keep_merged: bool) -> nn.Module:
    if not isinstance(module, TunerLayer):
        return module
    module.base = _strip(module.base, name, keep_merged)
    for n in [n for n in module.names if name is None or n == name]:
        if keep_merged and n in module.merged:
            module.forget_merged(n)
        module.delete(n)
    return module if module.names else module.base


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly `names` active (their additions are summed); others stay but do nothing.
    Refuses, changing nothing, unknown or repeated names and a model with merged adapters."""
    names = _known_names(_module(model, "set_active"), names, "set_active's names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"set_active's names repeat {repeated}; an adapter is active once (got {names})")
    for layer in _unmerged_layers(model, "changing the active adapters"):
        layer.set_active(names)


def _known_names(model: nn.Module, names, what: str, base_ok: bool = False) -> list[str]:
    """An adapter name or a sequence of them, as a list: a TypeError naming `what` for anything
    else, a ValueError for a name the model has not (BASE allowed when `base_ok`)."""
    listed = [names] if isinstance(names, str) else list(names) if isinstance(names, Iterable) else None
    if listed is None or not all(isinstance(n, str) for n in listed):  # (a generator is read once, above)
        raise TypeError(f"{what} must be an adapter name or a sequence (list, tuple) of names; got {names!r}")
    have = adapter_names(model)
    unknown = [n for n in dict.fromkeys(listed) if n not in have and not (base_ok and n == BASE)]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; the model has {have}" + (f" (or use {BASE!r})" if base_ok else ""))
    return listed


def mark_trainable(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Only the parameters of adapters `names` (None: the active ones) require grad."""
    model = _module(model, "mark_trainable")
    names = None if names is None else _known_names(model, names, "mark_trainable's names")
    model.requires_grad_(False)
    for layer in _layers(model):
        for n in layer.active if names is None else [n for n in names if n in layer.names]:
            for p in layer.adapter_parameters(n):
                p.requires_grad_(True)


@dataclasses.dataclass(frozen=True)
class Summary:
    trainable: int
    total: int
    per_adapter: dict[str, int]  # parameters that each adapter added

    def __str__(self) -> str:
        per = ", ".join(f"{n}: {c:,}" for n, c in self.per_adapter.items())
        return f"trainable {self.trainable:,} / {self.total:,} ({100 * self.trainable / max(self.total, 1):.3f}%); {per}"


def weights_named(model: nn.Module) -> list[str]:
    """The qualified names of the model's parameters of 2 or more dimensions (4-bit ones by their
    own names), as LoraConfig.parameters names them: those no linear layer holds first."""
    found = [(is_linear_like(_unwrap(c)), f"{w}.{p}") for _, _, w, c in _walk(model) for p in parameter_names(_unwrap(c))
             if has_parameter(_unwrap(c), p) and len(parameter_shape(_unwrap(c), p)) >= 2]
    return [n for _, n in sorted(found, key=lambda f: f[0])]  # stable: walk order within each


def summary(model: nn.Module) -> Summary:
    """Trainable and total parameters (each counted once), and the parameters of each adapter.
    A 4-bit layer's weight counts as its number of elements, not as the packed bytes and
    scales (frozen integer parameters) that store it."""
    model = _module(model, "summary")
    codec = {id(t) for m in model.modules() if isinstance(m, Stored4bit) for t in m.codec_tensors()}
    params = [p for p in model.parameters() if id(p) not in codec]
    per: dict[str, int] = {}
    for layer in _layers(model):
        for n in layer.names:
            per[n] = per.get(n, 0) + sum(p.numel() for p in layer.adapter_parameters(n))
    quantized = sum(m.weight.numel for m in model.modules() if isinstance(m, Stored4bit))  # 4-bit layers, parameters
    return Summary(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized, per)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """`with disabled(model):` the model computes as its base (adapters kept, not applied)."""
    layers = _unmerged_layers(model, "disabled(model)")
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.enabled = was


@contextlib.contextmanager
def per_sample(model: nn.Module, names: Sequence[str]):
    """`with per_sample(model, ["a", "b", "__base__"]):` sample i of the batch (dim 0) uses
    adapter names[i] ("__base__": none) — PEFT's `adapter_names`, for inference on mixed batches."""
    _module(model, "per_sample(model, names)")
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"per_sample's names must be a sequence (list, tuple) of adapter names, one a sample; got {names!r}")
    names = _known_names(model, names, "per_sample's names (one a sample)", base_ok=True)
    layers = _unmerged_layers(model, "per_sample(model, names)")
    for layer in layers:
        layer.route = tuple(names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.route = None
