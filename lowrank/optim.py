"""PagedAdamW: torch.optim.AdamW with its moment estimates in CUDA unified memory.

QLoRA (Dettmers et al. 2023, section 3) pages optimizer states between GPU and CPU so that a
spike in activation memory (one long sequence in a batch) evicts them for a while instead of
ending the run. Here the states of every CUDA parameter are allocated from a
torch.cuda.MemPool whose allocator is cudaMallocManaged (csrc/paged.cu), preferred on the
GPU: while there is room they stay there, under pressure the driver moves pages to host
memory, and `step` prefetches them back before it runs. The update is AdamW's own code on
the same tensors, so it equals torch.optim.AdamW's bit for bit.

Costs: a page that was evicted is copied back over PCIe/NVLink before the step that needs
it (the prefetch overlaps nothing else on the stream); when nothing is evicted, the step
costs what AdamW's does. It helps when the states are a large share of memory and the
peaks are rare; for LoRA the states are small, so it matters mostly with large ranks or
long sequences. On CPU parameters it is plain AdamW (there is nothing to page).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

_POOLS: dict[int, object] = {}  # device index -> torch.cuda.MemPool of managed memory
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _extension():
    from . import _C  # noqa: PLC0415 (an optional, compiled module)

    if not hasattr(_C, "managed_prefetch"):
        raise ImportError("lowrank._C was built without CUDA")
    return _C


def managed_pool(device: torch.device):
    """The MemPool (one per device) whose allocations are managed memory."""
    if device.index not in _POOLS:
        try:
            ext = _extension()
        except ImportError as e:
            raise RuntimeError(
                f"PagedAdamW needs lowrank._C built with CUDA ({e}); rebuild it with a CUDA torch and nvcc "
                "(docs/install.md), or use paged=False") from None
        allocator = torch.cuda.memory.CUDAPluggableAllocator(ext.__file__, "lowrank_managed_alloc", "lowrank_managed_free")
        _POOLS[device.index] = torch.cuda.MemPool(allocator.allocator())
    return _POOLS[device.index]


class PagedAdamW(torch.optim.AdamW):
    """AdamW (Loshchilov & Hutter 2019) with paged states; the arguments are AdamW's. `paged=False`
    gives torch.optim.AdamW exactly (the switch `lowrank train`'s paged_optimizer sets)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, paged: bool = True) -> None:
        if not isinstance(paged, bool):
            raise TypeError(f"paged must be a bool; got {paged!r}")
        # capturable / fused keep `step` on the device and run other code: not offered here
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self.paged = paged

    @torch.no_grad()
    def step(self, closure=None):
        if self.paged:
            self._page_in()
        return super().step(closure)

    def _page_in(self) -> None:
        """Create the states of CUDA parameters in managed memory (as AdamW would, with the
        same dtypes and layout), and prefetch every managed state to its device."""
        ext = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not p.is_cuda:
                    continue
                ext = ext or _extension()
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())  # on the CPU, as AdamW keeps it
                    names = _MOMENTS if group["amsgrad"] else _MOMENTS[:2]
                    with torch.cuda.use_mem_pool(managed_pool(p.device), device=p.device):
                        for name in names:
                            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for name in _MOMENTS:
                    if name in state:  # a DTensor (FSDP2) prefetches its own shard
                        t = state[name]
                        ext.managed_prefetch(t.to_local() if hasattr(t, "to_local") else t)

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's, then the loaded moments of CUDA parameters are moved into managed memory."""
        super().load_state_dict(state_dict)
        if not self.paged:
            return
        for p, state in self.state.items():
            if not (isinstance(p, torch.Tensor) and p.is_cuda):
                continue
            for name in _MOMENTS:
                if name in state:
                    with torch.cuda.use_mem_pool(managed_pool(p.device), device=p.device):
                        managed = torch.empty_like(state[name], memory_format=torch.preserve_format)
                    state[name] = managed.copy_(state[name])
