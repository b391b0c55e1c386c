"""What inject changes outside the adapter layers, and eject puts back: the parameters'
requires_grad, and nn.TransformerEncoder's nested-tensor path. Each is kept on the module it
belongs to (a plain attribute, in no state_dict), so it goes along with copy.deepcopy, pickling
and torch.compile's wrapper, and a model injected in parts gives back every part's."""

from __future__ import annotations

import itertools
import time
import weakref

from torch import nn

from .tuners.base import TunerLayer
from .walk import plain_parameters

FLAGS = "_lowrank_requires_grad"
NESTED = "_lowrank_nested_tensor"


# Note: requires_grad on eject. inject freezes every parameter that is not an adapter's
# (mark_trainable). The first inject into a module records each of its parameters' requires_grad
# by name (the names before inject), stamped with the time it was made, and the eject that leaves it no
# adapter puts them back, the newest record first, so the oldest says last: a parameter gets the
# flag it had before any inject reached it, whichever of a part and the whole was injected first.
# An eject through a part (a module inside a model that holds a record too) puts nothing back while
# the whole still has adapters: the whole's inject froze the part's parameters as well, and its
# last eject puts back every record inside it, the part's too. When the part's eject leaves the
# whole without adapters, it puts back the whole's records. Such wholes are found among the
# modules whose records this process made (_HOLDERS: a module cannot see its parents). Not found:
# the whole of a deepcopy or of a torch.load'ed model (its record was copied, not made here): an
# eject through a part of it puts the part's flags back while the whole still has adapters
# (eject the whole's adapters first there). A record keeps no reference to its module: shallow
# copies share records, and a reference would drag the original into a deepcopy or a pickle.
_made = itertools.count()  # with the wall clock: a record made in another process (torch.save) sorts by time
_HOLDERS: weakref.WeakSet = weakref.WeakSet()


def record_flags(model: nn.Module) -> bool:
    """Record `model`'s flags unless it holds a record already; whether it recorded."""
    if FLAGS in model.__dict__:
        return False
    model.__dict__[FLAGS] = ((time.time_ns(), next(_made)), {n: p.requires_grad for n, p in plain_parameters(model)})
    _HOLDERS.add(model)
    return True


def wholes(part: nn.Module) -> list[nn.Module]:
    """The modules holding a record that hold `part` inside them (not `part` itself)."""
    return [h for h in list(_HOLDERS) if h is not part and FLAGS in h.__dict__ and any(m is part for m in h.modules())]


def _stamped(record) -> tuple[tuple[int, int], dict]:
    """A record as (stamp, flags), earlier forms too: a plain dict, or (count, flags)."""
    if isinstance(record, dict):
        return (0, 0), record
    stamp, flags = record
    return (stamp if isinstance(stamp, tuple) else (0, stamp)), flags


def drop_flags(model: nn.Module) -> None:
    model.__dict__.pop(FLAGS, None)


def restore_flags(*models: nn.Module) -> None:
    """Every record in `models` (their own, their parts') put back, the newest first, and removed."""
    holders = {id(m): m for model in models for m in model.modules() if FLAGS in m.__dict__}
    records = [(_stamped(m.__dict__[FLAGS]), m) for m in holders.values()]
    for (_, flags), m in sorted(records, key=lambda r: r[0][0], reverse=True):
        del m.__dict__[FLAGS]
        params = dict(plain_parameters(m))
        for n, flag in flags.items():
            if n in params:
                params[n].requires_grad_(flag)


def activate_left(layers: list[TunerLayer], left: list[str]) -> None:
    """A layer that had the ejected adapter active, and holds an adapter the model still has active
    (a part's own set_active made them differ), takes those, trainable, as PEFT's delete_adapter sets
    each layer to an adapter that is left."""
    for layer in layers:
        keep = [n for n in left if n in layer.names]
        if keep and not layer.active and not layer.merged:
            layer.set_active(keep)
            for p in (p for n in keep for p in layer.adapter_parameters(n)):
                p.requires_grad_(True)


def chain(module: nn.Module) -> list[TunerLayer]:
    """The adapter layers wrapped one in another at one place, outermost first."""
    layers = []
    while isinstance(module, TunerLayer):
        layers.append(module)
        module = module.base
    return layers


# Note: no nested tensors through adapters. In eval mode under no_grad, nn.TransformerEncoder
# turns a padded batch (src_key_padding_mask) into a NestedTensor before its layers, and
# takes the layers' module-by-module path when one has a forward pre-hook (tuners/base.py,
# Note: fused fast paths), so the adapter layers would get a NestedTensor, which their ops and
# shape checks do not take. While an encoder holds adapters its `use_nested_tensor` is off,
# and on again when the last goes: its output is then the padded computation, which at padding
# positions holds computed values where the nested path gave zeros (positions the mask says to
# ignore; the others are the same computation).
def nested_off(model: nn.Module) -> None:
    for enc in model.modules():
        if (isinstance(enc, nn.TransformerEncoder) and enc.__dict__.get("use_nested_tensor")
                and any(isinstance(m, TunerLayer) for m in enc.modules())):  # fmt: skip
            enc.__dict__[NESTED] = True
            enc.use_nested_tensor = False


def nested_back(model: nn.Module) -> None:
    from .quant.linear4bit import Stored4bit  # a 4-bit layer quantized since keeps it off (quantize.fused_paths_off)

    for enc in model.modules():
        if enc.__dict__.get(NESTED) and not any(isinstance(m, TunerLayer) for m in enc.modules()):
            del enc.__dict__[NESTED]
            enc.use_nested_tensor = not any(isinstance(m, Stored4bit) for m in enc.modules())
