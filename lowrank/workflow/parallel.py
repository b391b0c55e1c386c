"""`lowrank train` on several processes: `distributed: ddp | fsdp` under torchrun.

    torchrun env -> process group (nccl on GPUs, gloo on CPUs) -> the same model on every rank
    -> DDP or fully_shard -> each rank its share of every global micro-batch -> gradients averaged

`Ranks` is everything the training loop asks about the other processes; with `distributed:
none` it is one rank, and every method here is what one process does. Saving follows
docs/distributed.md: under FSDP2 gathering a tensor is a collective, and rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import gc
import os

import torch
from torch import nn

from ..distributed import full_tensor, is_sharded, on_main
from .config import ConfigError
from .model import decoder_blocks

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets per rank


@dataclasses.dataclass(frozen=True)
class Ranks:
    mode: str  # "none", "ddp" or "fsdp" (TrainConfig.distributed)
    rank: int = 0
    world: int = 1
    device: str = "auto"  # what load_base gets; under torchrun resolved: "cpu" or this rank's GPU "cuda:<LOCAL_RANK>"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """`value` summed over the ranks (a collective); itself in one process."""
        if self.mode == "none":
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(t)
        return t.item()

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (a collective)."""
        if self.mode == "none":
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def first(self, fn):
        """fn() run on rank 0 alone, its result (or its error) given to every rank."""
        return fn() if self.mode == "none" else on_main(fn, collective=True)


def start(mode: str, device: str) -> Ranks:
    """Join torchrun's process group for `ddp` / `fsdp`; for `none`, make sure no torchrun
    started this process several times (every copy would train alone and write the same files)."""
    world = os.environ.get("WORLD_SIZE")
    if mode == "none":
        if world is not None and int(world) > 1:
            raise ConfigError(f"distributed is 'none' but this is one of WORLD_SIZE={world} processes (torchrun?): "
                              "every process would train alone and write the same checkpoints; set distributed: "
                              "ddp or fsdp, or run without torchrun")
        return Ranks("none", device=device)
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"distributed: {mode} runs under torchrun, which sets {list(TORCHRUN_ENV)}; {missing} are "
                          f"not set. Run: torchrun --nproc_per_node N -m lowrank train CONFIG")
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto', 'cuda' or 'cpu' under distributed: {mode}; got {device!r}") from None
    if kind.type == "cuda":
        if kind.index is not None:
            raise ConfigError(f"device: under distributed: {mode} each rank uses the GPU of its LOCAL_RANK; "
                              f"give 'auto', 'cuda' or 'cpu', not {device!r}")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local >= gpus:
            raise ConfigError(f"device: {device!r} under distributed: {mode}: this is LOCAL_RANK {local}, and this PyTorch "
                              f"sees {gpus} CUDA GPU(s) (torch {torch.__version__}); start at most {gpus} processes a "
                              "node (torchrun --nproc_per_node), or use device: cpu")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if kind.type == "cuda" else "gloo")
    return Ranks(mode, rank, world, device)


def stop(ranks: Ranks, finished: bool) -> None:
    """Leave the process group; after a `finished` run, once every rank is done with it (a
    rank closing its connections while a peer still reads from them fails that peer)."""
    if ranks.mode != "none":
        import torch.distributed as dist

        if dist.is_initialized():
            gc.collect()  # the DDP / FSDP2 state of the run, before the group it holds goes
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def wrap(model: nn.Module, ranks: Ranks) -> nn.Module:
    """The module the loop calls: DDP around `model`, or `model` itself sharded in place by
    FSDP2 (one group per decoder layer, then the root). Adapters must be on it already
    (docs/distributed.md, rule 1); every rank must have built the same model."""
    if ranks.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = torch.device(ranks.device)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if ranks.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(ranks.device).type, (ranks.world,))
        # Note: decoder layers are the classes transformers itself never splits across
        # devices (`_no_split_modules`, e.g. LlamaDecoderLayer): each is one FSDP group, gathered
        # for its own forward and resharded after, so a rank holds one layer whole at a time.
        for block in decoder_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def sync(wrapped: nn.Module, ranks: Ranks, last: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only on the
    step's last one (DDP no_sync / FSDP2 set_requires_gradient_sync); accumulate before."""
    import contextlib

    if ranks.mode == "ddp" and not last:
        return wrapped.no_sync()
    if ranks.mode == "fsdp":
        wrapped.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def shares(group: list, ranks: Ranks) -> list[tuple[list, float]]:
    """This rank's (batch, weight) of one optimizer step's per-rank batches `group`: batch j
    goes to rank j % world. Every rank gets the same number, so each runs as many forwards
    (FSDP2 gathers in each) and backwards (DDP reduces in the last); a rank short of one
    recomputes a batch of the step with weight 0, which adds exact zeros to its gradient."""
    mine = group[ranks.rank::ranks.world]
    rounds = -(-len(group) // ranks.world)  # ceil
    return [(b, 1.0) for b in mine] + [((mine or group)[0], 0.0)] * (rounds - len(mine))


def clip_grad_norm_(params: list, max_norm: float, ranks: Ranks) -> float:
    """torch.nn.utils.clip_grad_norm_; under FSDP2 with the norm of the whole gradients. Returns
    the norm before clipping."""
    if ranks.mode != "fsdp":
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    # Note: clipping sharded gradients. The norm of DTensor gradients sums each shard's squares
    # on its own rank, then the ranks' sums: other additions than one process's, so the clip
    # factor can differ in its last bit. Gathering the adapter gradients (small: never the base
    # model's) gives every rank one process's norm, to the bit.
    grads = [full_tensor(p.grad) for p in params if p.grad is not None]  # a collective
    norm = torch.nn.utils.get_total_norm(grads)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def full_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor whole, by name (gathering shards is a collective: every rank calls it)."""
    return {n: full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole (a collective under
    FSDP2), so a checkpoint holds the same optimizer state in one process and on any ranks."""
    sd = optimizer.state_dict()
    state = {i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {**sd, "state": state}


def shard_optimizer_state(sd: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of full_optimizer_state for this rank: each whole state tensor of a sharded
    parameter (same shape as the parameter) becomes a DTensor placed as that parameter is."""
    from torch.distributed.tensor import distribute_tensor

    ids = [i for g in sd["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip(ids, params))
    state = {}
    for i, s in sd["state"].items():
        p = by_id[i]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                    if is_sharded(p) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                    for k, v in s.items()}
    return {**sd, "state": state}
