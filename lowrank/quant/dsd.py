"""What torch.distributed.checkpoint.state_dict (get_model_state_dict, set_model_state_dict) asked
of a model, as its 4-bit layers see it from their own state-dict methods; and the broadcast of a
4-bit weight's entries from rank 0 that `broadcast_from_rank0=True` needs.

# Note: options torch matches by parameter names. Two StateDictOptions act on the model's
# parameters by their names (`base.packed`, `base.absmax`, ...), while a 4-bit layer's state-dict
# entries have bitsandbytes' names (`base.weight`, `base.weight.absmax`, ...; Note: state-dict
# keys as attribute paths, linear4bit.py):
# - ignore_frozen_params=True: get_model_state_dict pops each frozen parameter's name from
#   `model.state_dict()` (KeyError: '...base.packed'). A 4-bit layer's storage is always frozen
#   (integers), so under this option the layer writes its frozen parameters at their own names
#   instead of its entries, and torch's pops take them all: the result holds what it holds for a
#   frozen nn.Linear base, the trainable parameters (and persistent buffers).
# - broadcast_from_rank0=True: set_model_state_dict broadcasts rank 0's entries but keeps, on the
#   other ranks, only those named like the model's parameters: the 4-bit entries never reached
#   them (a missing-key error there, while rank 0 went on). Under this option every 4-bit layer
#   broadcasts its own entries from rank 0 as it loads (load_state_dict visits the layers in the
#   same order on every rank), then each rank keeps its part as with full_state_dict=True. The
#   4-bit entries cross the network twice (torch's broadcast, whose copies it drops, and this one).
#   Not for 4-bit parameters (Weight4bit): their entries `P.absmax`, `P.nested_absmax` are their own
#   integer parameters' names, into which torch copies rank 0's float32 scales as numbers before
#   the load: a load error there, naming the remedy (full_state_dict=True on every rank).
# torch hands neither option to the modules; they are read from its frame (`info`, a
# _StateDictInfo), which is torch's internal name: a torch without it turns both off, as before.
"""

from __future__ import annotations

import inspect
import sys

import torch

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


def broadcasting_from_rank0() -> bool:
    """Whether set_model_state_dict(options=StateDictOptions(broadcast_from_rank0=True)) on a
    group of several ranks is loading this state dict."""
    import torch.distributed as dist

    on = bool(getattr(_info("_load_model_state_dict"), "broadcast_from_rank0", False))
    return on and dist.is_initialized() and dist.get_world_size() > 1


def entries_from_rank0(entries: dict[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rank 0's `entries` (one 4-bit weight's, {key: tensor}) on every rank: whole tensors, on the
    device of `like` (the layer's packed codes; its mesh's device for meta shards). Every rank
    calls it for the same weight; rank 0 may hold none of them (a partial checkpoint): then none."""
    import torch.distributed as dist

    if like.is_meta:
        mesh = getattr(like, "device_mesh", None)
        device = torch.device(mesh.device_type if mesh is not None else "cpu")
    else:
        device = like.device
    rank0 = dist.get_rank() == 0
    header = [{k: (t.shape, t.dtype, t.is_meta) for k, t in entries.items()} if rank0 else None]
    dist.broadcast_object_list(header, src=0)
    out = {}
    for k, (shape, dtype, meta) in header[0].items():
        if meta:  # no values to send: the loading layer reports a meta checkpoint, as in one process
            out[k] = torch.empty(shape, dtype=dtype, device="meta")
            continue
        t = entries[k].detach().to(device).contiguous() if rank0 else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        out[k] = t
    return out
