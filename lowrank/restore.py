"""What inject changes outside the adapter layers, and eject puts back: the parameters'
requires_grad, and nn.TransformerEncoder's nested-tensor path. Each is kept on the module it
belongs to (a plain attribute, in no state_dict), so it goes along with copy.deepcopy, pickling
and torch.compile's wrapper, and a model injected in parts gives back every part's."""

from __future__ import annotations

from torch import nn

from .tuners.base import TunerLayer
from .walk import plain_parameters

FLAGS = "_lowrank_requires_grad"
NESTED = "_lowrank_nested_tensor"


# Note: requires_grad on eject. inject freezes every parameter that is not an adapter's
# (mark_trainable). The first inject into a module records each of its parameters' requires_grad
# by name (the names before inject), and the eject that leaves it no adapter puts them back,
# outermost record first, so a part injected on its own earlier (inject(model.encoder), then
# inject(model)) gets its own flags back: inject then eject leaves the model as it was.
def record_flags(model: nn.Module) -> bool:
    """Record `model`'s flags unless it holds a record already; whether it recorded."""
    if FLAGS in model.__dict__:
        return False
    model.__dict__[FLAGS] = {n: p.requires_grad for n, p in plain_parameters(model)}
    return True


def drop_flags(model: nn.Module) -> None:
    model.__dict__.pop(FLAGS, None)


def restore_flags(model: nn.Module) -> None:
    """Every record in `model` (its own, its parts') put back and removed."""
    for m in list(model.modules()):
        record = m.__dict__.pop(FLAGS, None)
        if record:
            params = dict(plain_parameters(m))
            for n, flag in record.items():
                if n in params:
                    params[n].requires_grad_(flag)


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
    for enc in model.modules():
        if enc.__dict__.get(NESTED) and not any(isinstance(m, TunerLayer) for m in enc.modules()):
            del enc.__dict__[NESTED]
            enc.use_nested_tensor = True
