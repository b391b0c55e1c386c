"""What lowrank needs to know about torch.distributed: which tensors are sharded, how to
gather an adapter's, and which rank writes (see docs/distributed.md).

Under DDP every rank holds the whole model and the same adapter weights. Under FSDP2
(`torch.distributed.fsdp.fully_shard`) every parameter, the 4-bit weights included (Note:
frozen integer parameters, lowrank/quant/linear4bit.py), is a DTensor of which each rank
holds a shard along dim 0. Nothing here imports torch.distributed unless it is in use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def process_group_ready() -> bool:
    """True when torch.distributed is built in and a default process group exists."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (a parameter under FSDP2 or tensor parallelism)."""
    if not process_group_ready():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    return any(is_sharded(t) for t in tensors)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is all-gathered (a collective: every rank of its mesh must
    call this, in the same order); any other tensor is returned as it is."""
    return t.full_tensor() if is_sharded(t) else t


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules fully_shard made FSDP modules (torch.distributed.fsdp.FSDPModule)."""
    if not process_group_ready():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Give every FSDP module its sharded parameters back (See Note: unsharded after a forward).
    Local to each rank (it frees the gathered copies), not a collective."""
    for m in fsdp_modules(model):
        m.reshard()


# Note: unsharded after a forward. FSDP2 leaves a module's parameters gathered after its forward
# when reshard_after_forward=False, and the root module's always (it reshards at backward): they
# are then plain tensors, FSDP's temporary full copies (in MixedPrecisionPolicy's param_dtype).
# What writes the weights (merge, unmerge, eject of a merged adapter) would write into copies
# that are dropped, and what reads them (save_adapter) would read bf16-rounded values, so both
# reshard first: the parameters are then the DTensors of the float32 shards, which merge writes
# into and save_adapter gathers. What adds parameters (inject) is refused on any FSDP module,
# sharded at the moment or not.


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`)
    wrappers, whose names would otherwise prefix every saved key."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "OptimizedModule":
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def check_not_sharded(model: nn.Module, what: str) -> None:
    """Raise when `model` is already distributed: adapters added after fully_shard or inside a
    DistributedDataParallel wrapper would be plain tensors that FSDP neither shards nor reduces
    (DDP: whose gradients it never averages), so each rank would train its own copy."""
    if not isinstance(model, nn.Module):  # a path or a state dict: say so, not "'str' object has no attribute"
        raise TypeError(f"{what.split(' (')[0]} takes the model, an nn.Module; got {type(model).__name__} {model!r:.80}")
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        raise RuntimeError(f"{what} must run before DistributedDataParallel wraps the model (DDP registers the "
                           "parameters it averages when it is made); build the model, quantize and inject (or "
                           "load_adapter) on every rank, then wrap it")
    sharded = [n for n, p in model.named_parameters() if is_sharded(p)] or \
        [f"{type(m).__name__} (unsharded after its forward)" for m in fsdp_modules(model)]
    if sharded:
        raise RuntimeError(
            f"{what} must run before fully_shard: {len(sharded)} parameters of {type(model).__name__} are already "
            f"sharded (e.g. {sharded[:3]}); build the model, quantize and inject (or load_adapter) on every rank, "
            "then call fully_shard"
        )


# Note: saving from several ranks. Under FSDP2 the adapter weights are DTensors, so saving is
# a collective: every rank calls save_adapter, each adapter tensor is all-gathered on its
# own (never the base model's), rank 0 writes, and rank 0's outcome (done, or the error it
# raised) is broadcast, so no rank returns before the files exist and none waits forever on
# a failed write. Under DDP (or with no sharding) every rank already holds the whole
# adapter: rank 0 writes and the others return at once, so both the usual
# `if rank == 0: save_adapter(...)` and a call on every rank work, and ranks never race to
# create the same directory.
def on_main(fn: Callable[[], T], collective: bool) -> T | None:
    """Run `fn` on rank 0 only (see Note: saving from several ranks). With `collective`, every
    rank must call this; the others wait for rank 0, then return its result or raise. Without
    a process group, `fn` simply runs."""
    if not process_group_ready():
        return fn()
    import torch.distributed as dist

    main = dist.get_rank() == 0
    if not collective:
        return fn() if main else None
    result, error = None, None
    if main:
        try:
            result = fn()
        except BaseException as e:  # re-raised below, after the other ranks have heard of it (Ctrl-C on rank 0 too)
            error = e
    box = [result, None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise RuntimeError(f"rank 0 failed while writing for all ranks: {box[1]}")
    return box[0]
