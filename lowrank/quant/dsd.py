"""What torch.distributed.checkpoint.state_dict (get_model_state_dict, set_model_state_dict) asked
of a model, as its 4-bit layers see it from their own state-dict methods.

# Note: options torch matches by parameter names. StateDictOptions act on the model's
# parameters by their names (`base.packed`, `base.absmax`, ...), while a 4-bit layer's state-dict
# entries have bitsandbytes' names (`base.weight`, `base.weight.absmax`, ...; Note: state-dict
# keys as attribute paths, linear4bit.py):
# - ignore_frozen_params=True: get_model_state_dict pops each frozen parameter's name from
#   `model.state_dict()` (KeyError: '...base.packed'). A 4-bit layer's storage is always frozen
#   (integers), so under this option the layer writes its frozen parameters at their own names
#   instead of its entries, and torch's pops take them all: the result holds what it holds for a
#   frozen nn.Linear base, the trainable parameters (and persistent buffers).
# torch hands no option to the modules; they are read from its frame (`info`, a _StateDictInfo),
# which is torch's internal name: a torch without it turns this off, as before.
"""

from __future__ import annotations

import inspect
import sys

_DSD = "torch.distributed.checkpoint.state_dict"


def _info(function: str):
    """The _StateDictInfo of a call of torch's `function` (in torch.distributed.checkpoint.state_dict)
    under way in this thread, or None."""
    module = sys.modules.get(_DSD)
    if module is None:  # never imported: no such call under way
        return None
    code = getattr(inspect.unwrap(getattr(module, function, None) or (lambda: None)), "__code__", None)
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            return frame.f_locals.get("info")
        frame = frame.f_back
    return None


def ignoring_frozen_params() -> bool:
    """Whether get_model_state_dict(options=StateDictOptions(ignore_frozen_params=True)) is asking
    for this state dict (See Note: options torch matches by parameter names)."""
    return bool(getattr(_info("_get_model_state_dict"), "ignore_frozen_params", False))
