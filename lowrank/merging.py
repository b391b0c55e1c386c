"""merge and unmerge: fold LoRA adapters into the base weights and take them out again."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .distributed import reshard
from .tuners.lora_base import LoraLayer
from .walk import _layers, _lora_layers, _module, plain_parameters


def merge(model: nn.Module) -> list[str]:
    """Fold every LoRA layer's active adapters into its base weight (explicit; idempotent).
    Bottleneck adapters are non-linear and stay in the forward. Checks every layer before it
    writes any (See Note: merge checks first): a weight tied to another module's (GPT-2's wte
    and lm_head: merging into it would change the other module too), a base without a dense
    weight, a sum that is not finite; a refused merge changes nothing. Returns the names of the
    layers that changed."""
    model = _module(model, "merge")
    reshard(model)  # See Note: unsharded after a forward (lowrank/distributed.py)
    names = {}  # alias key -> every name of the parameter, tied ones included
    for n, p in plain_parameters(model):
        names.setdefault(_alias(p), []).append(n)
    layers = _lora_layers(model)
    for where, m in layers:  # the forward there promises the base output, or one adapter a sample
        if not m.enabled or m.route is not None:
            raise RuntimeError(f"cannot merge inside lowrank.disabled(model) or lowrank.per_sample(model, ...) (at "
                               f"{where!r}): the merged weights would change what that context computes; merge after it")
    for where, m in layers:
        w = m.target_weight()
        if isinstance(w, torch.Tensor) and len(names.get(_alias(w), ())) > 1 and any(n not in m.merged for n in m.active):
            raise ValueError(f"cannot merge into {where!r}: its weight is one tensor with {names[_alias(w)]} (tied), so "
                             "merging would change the other module too; keep the adapter unmerged, or untie the "
                             "weights first")
    for where, m in layers:
        try:
            m.merge(check_only=True)
        except (ValueError, TypeError) as e:
            raise type(e)(f"lowrank.merge refused, nothing was merged: at {where!r}, {e}") from None
    return [where for where, m in layers if m.merge()]


# Note: merge checks first. Each layer computes its merged weight twice: once to check it (the
# structure, and that the sum is finite) for every layer, then again to write it. A merge that
# wrote layer by layer and failed at the tenth would leave nine merged and the model in neither
# state; keeping the nine old weights to put back would hold a second copy of them. The cost is
# one more pass of additions over the adapted weights, once.


def _alias(t: torch.Tensor) -> tuple:
    """Equal for tensors that are the same memory: one Parameter under two names, or two Parameters
    made on one tensor (`head.weight = nn.Parameter(emb.weight)`), which `is` does not see."""
    if t.device.type == "meta" or hasattr(t, "to_local"):  # no storage; a DTensor's is not real (FSDP2)
        return (id(t),)
    ptr = t.untyped_storage().data_ptr()
    return (ptr + t.storage_offset() * t.element_size(),) if ptr else (id(t),)  # the first byte's address


def unmerge(model: nn.Module) -> list[str]:
    """Take merged adapters back out of the base weights; idempotent."""
    reshard(_module(model, "unmerge"))  # See Note: unsharded after a forward (lowrank/distributed.py)
    return [where for where, m in _lora_layers(model) if m.unmerge()]


def warn_of_unkept(model: nn.Module, name: str | None) -> None:
    """eject(keep_merged=True) keeps in the weights what merge folded in: say which active adapters
    (`name`, None: all) it drops instead, LoRA not merged (merge first) and those merge cannot fold
    in, bottleneck adapters, prefixes and prompts (they stay in the forward)."""
    lora = sorted({n for _, m in _lora_layers(model) for n in m.active if n not in m.merged and name in (None, n)})
    if lora:
        warnings.warn(f"eject(keep_merged=True) drops the active LoRA adapters {lora}, which are not merged: their "
                      "updates are not kept in the weights; call lowrank.merge(model) before eject to keep them",
                      stacklevel=3)
    other = sorted({n for m in _layers(model) if not isinstance(m, LoraLayer) for n in m.active if name in (None, n)})
    if other:
        warnings.warn(f"eject(keep_merged=True) drops the active adapters {other}, which merge cannot fold into the "
                      "weights (bottleneck adapters, prefixes and prompts stay in the forward): the model computes "
                      "without them; eject the merged LoRA adapters by name to keep these", stacklevel=3)
