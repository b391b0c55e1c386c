"""How lowrank walks a model: the names of its modules as inject, save and load see them
(adapter layers and torch's checkpoint_wrapper see-through), the adapter layers in it, and the
model's own parameters under the names they had before inject."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .quant.params4bit import Weight4bit
from .tuners.base import TunerLayer, innermost
from .tuners.lora_base import LoraLayer
from .tuners.lora_param import lora_chain


_unwrap = innermost  # the name the rest of lowrank knows it by


# torch's checkpoint_wrapper (activation checkpointing under FSDP2) holds a layer under this
# attribute and takes the name out of state_dict(); names here leave it out too, so targets,
# saved keys and state-dict keys stay the model's own. The wrapper itself is not walked: it
# answers in_features and weight for the module it holds (__getattr__), and as a target of its
# own it took a second adapter under the same name.
CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"


def child_name(prefix: str, attr: str) -> str:
    """The qualified name of child `attr` of the module named `prefix` (See CHECKPOINT_WRAPPED)."""
    return prefix if attr == CHECKPOINT_WRAPPED else f"{prefix}.{attr}" if prefix else attr


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, qualified name, child) for every module below `module`."""
    for attr, child in list(module.named_children()):
        if isinstance(child, Weight4bit):  # a 4-bit parameter of `module`, not a module of the model's
            continue
        name = child_name(prefix, attr)
        if not is_checkpoint_wrapper(child):  # the module it holds is, under the same name
            yield module, attr, name, child
        yield from _walk(_unwrap(child), name)


def plain_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """model.named_modules() as state_dict() names them: checkpoint_wrapper see-through."""
    return [(".".join(p for p in n.split(".") if p != CHECKPOINT_WRAPPED), m)
            for n, m in model.named_modules() if not is_checkpoint_wrapper(m)]


def is_checkpoint_wrapper(module: nn.Module) -> bool:
    """torch's checkpoint_wrapper: never a target itself (See CHECKPOINT_WRAPPED)."""
    return CHECKPOINT_WRAPPED in module._modules


def _layers(model: nn.Module) -> list[TunerLayer]:
    return [m for m in model.modules() if isinstance(m, TunerLayer)]


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(qualified name, LoRA layer) for every LoRA layer, also inside another adapter's wrapper
    (LoRA on several parameters of one module: a layer each, under the module's name)."""
    return [(where, layer) for _, _, where, child in _walk(model) for layer in lora_chain(child)]


def _module(model, verb: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb} takes an nn.Module (the model); got {type(model).__name__}")
    return model


def plain_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's own parameters (no adapter's) under the names they had before inject, a tied
    parameter under each of its names."""
    out = list(model.named_parameters(recurse=False))
    for _, _, where, child in _walk(model):
        out += [(f"{where}.{n}", p) for n, p in _unwrap(child).named_parameters(recurse=False)]
    return out


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name in the model, in the order first seen."""
    return list(dict.fromkeys(n for layer in _layers(_module(model, "adapter_names")) for n in layer.names))


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters, in an order that keeps every layer's: a layer sums its active
    adapters in the order set_active gave them, and set_active(model, active_adapters(model))
    gives each layer back its own order (load_adapter relies on it), also where a layer holds
    only some of them. Names no layer orders come in the order first seen."""
    tuples = [layer.active for layer in _layers(_module(model, "active_adapters"))]
    first = list(dict.fromkeys(n for t in tuples for n in t))  # order first seen, to break ties
    after = {n: set() for n in first}  # n -> names some layer sums after n
    for t in tuples:
        for a, b in zip(t, t[1:]):
            after[a].add(b)
    ordered, placed = [], set()
    while len(ordered) < len(first):  # a topological order of those constraints (at most len(first) rounds)
        ready = [n for n in first if n not in placed and not any(n in after[m] for m in first if m not in placed)]
        if not ready:  # layers disagree (layer.set_active called one by one): no order satisfies all
            return first
        ordered.append(ready[0])
        placed.add(ready[0])
    return ordered


def _unmerged_layers(model: nn.Module, what: str) -> list[TunerLayer]:
    layers = _layers(_module(model, what))
    if any(layer.merged for layer in layers):
        raise RuntimeError(f"{what} needs unmerged adapters; call lowrank.unmerge(model) first")
    return layers
