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

state_bits=8 keeps the two moments of every parameter of at least min_8bit_size elements in
8 bits (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"), paged or not:
see Note: 8-bit states.
"""

from __future__ import annotations

import math

import torch
from torch.optim.optimizer import _get_scalar_dtype

from .quant import nf4

_POOLS: dict[int, object] = {}  # device index -> torch.cuda.MemPool of managed memory
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# Note: 8-bit states. With state_bits=8 a parameter of at least min_8bit_size elements keeps
#   state1   uint8 (p's shape)   exp_avg, blockwise 8-bit with the signed dynamic map
#   state2   uint8 (p's shape)   exp_avg_sq, with the unsigned map (it is never negative)
#   absmax1, absmax2             their scales, one a block of 256, float32 stored as int32 bit patterns
# (2 bytes a parameter and 1/32 of one for the scales, against 8 for AdamW's float32 moments). Each
# step decodes both to float32, runs the update, and codes them again: the update is
# bitsandbytes' AdamW8bit's (its CPU reference, bitsandbytes/backends/cpu/ops.py, 0.50: the same
# operations in the same order, and lowrank.nf4's 8-bit codec, which is bit-exact with its
# quantize_blockwise), so parameters and codes equal AdamW8bit's bit for bit (tests/test_optim.py);
# smaller parameters (biases, norms) keep AdamW's float32 moments and update, as in AdamW8bit.
# The scales are int32 for the reason Linear4bit's are (Note: the scales stay float32):
# Optimizer.load_state_dict casts every floating state to its parameter's dtype, which would round
# them to bfloat16 for bfloat16 adapters; integers it leaves alone. Not for FSDP2's sharded
# (DTensor) parameters: blocks would follow the shards. amsgrad has no 8-bit form (nor in AdamW8bit).
# With foreach (default on CUDA) the tensors of a group that are whole blocks of 256 are updated as
# flat batches (_batches): blocks never straddle two tensors and every operation is elementwise
# or blockwise, so the results are each tensor's own, in ~30 kernel launches a batch, not a tensor.
_STATE_8BIT = ("state1", "state2", "absmax1", "absmax2")
_CODED = (("exp_avg", True), ("exp_avg_sq", False))  # AdamW's name of state{i} / absmax{i}, i = 1, 2; signed map
_PAGED = _MOMENTS + _STATE_8BIT  # every state tensor that lives in managed memory
BLOCKSIZE_8BIT = 256
BATCH_ELEMENTS = 2**20  # foreach: at most this many elements of parameters updated as one flat tensor


def _extension():
    from . import _C  # noqa: PLC0415 (an optional, compiled module)

    if not hasattr(_C, "managed_prefetch"):
        raise ImportError("lowrank._C was built without CUDA")
    return _C


def _prefetch(ext, t: torch.Tensor) -> None:
    """managed_prefetch of a state tensor, which takes contiguous ones: a DTensor (FSDP2) its own
    shard; a dense non-contiguous one (zeros_like keeps the strides of a channels_last or transposed
    parameter) as the flat view of the same bytes (every stride >= 0, so they start at data_ptr)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    if t.numel() == 0:
        return  # no bytes (and no allocation) to move
    if not t.is_contiguous():
        t = t.as_strided((t.numel(),), (1,), t.storage_offset())
    ext.managed_prefetch(t)


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


# Note: the step hooks run once. Optimizer wraps the step of every class it makes an instance of
# in the caller's step hooks (torch.optim.Optimizer.profile_hook_step): PagedAdamW.step, and
# AdamW.step too once any AdamW exists in the process. PagedAdamW's step calls AdamW's without that
# wrapper, else every pre/post hook would run twice, the inner ones after the 8-bit update and
# seeing the 8-bit parameters' grads hidden.
def _adamw_step(optimizer: torch.optim.AdamW):
    step = torch.optim.AdamW.step
    return (step.__wrapped__ if getattr(step, "hooked", False) else step)(optimizer)


class PagedAdamW(torch.optim.AdamW):
    """AdamW (Loshchilov & Hutter 2019) with paged states; the arguments are AdamW's. `paged=False`
    gives torch.optim.AdamW exactly (the switch `lowrank train`'s paged_optimizer sets).
    `state_bits=8`: the moments of parameters of at least `min_8bit_size` elements in 8 bits,
    bitsandbytes' AdamW8bit's update (See Note: 8-bit states). `foreach` (default: on CUDA): AdamW's
    multi-tensor update, and the 8-bit update of a group's parameters as one flat tensor (the same
    results, fewer kernel launches)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, paged: bool = True, state_bits: int = 32, min_8bit_size: int = 4096,
                 foreach: bool | None = None, maximize: bool = False) -> None:
        if not isinstance(paged, bool):
            raise TypeError(f"paged must be a bool; got {paged!r}")
        if type(state_bits) is not int or state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 32 (AdamW's float32 moments) or 8 (blockwise 8-bit); got {state_bits!r}")
        if state_bits == 8 and amsgrad:
            raise ValueError("amsgrad=True needs float32 states: use state_bits=32 (8-bit AdamW has no amsgrad)")
        if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0 (elements); got {min_8bit_size!r}")
        # capturable / fused keep `step` on the device and run other code: not offered here
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None (on CUDA), True or False; got {foreach!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach,
                         maximize=maximize)
        self.paged, self.state_bits, self.min_8bit_size = paged, state_bits, min_8bit_size

    def __getstate__(self) -> dict:
        # Optimizer's keeps defaults, state and param_groups only: a deepcopy or an unpickled copy
        # would have no paged / state_bits / min_8bit_size and fail in its first step
        return {**super().__getstate__(), "paged": self.paged, "state_bits": self.state_bits,
                "min_8bit_size": self.min_8bit_size}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if getattr(self, "paged", False):  # (a pickle of an older lowrank has no paged)
            self._to_managed()  # a deepcopy's / an unpickled copy's states are plain CUDA memory

    def _in_8bit(self, p: torch.Tensor) -> bool:
        return self.state_bits == 8 and p.numel() >= self.min_8bit_size

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.paged:
            self._page_in()
        # See Note: 8-bit states. Their parameters are updated here, then hidden from AdamW's step
        # (a parameter without grad is one it skips) and given their grads back after it.
        self._check_step()
        hidden = []
        try:
            for group in self.param_groups:
                for batch in self._batches(group, [p for p in group["params"] if p.grad is not None and self._in_8bit(p)]):
                    self._step_8bit(group, batch)
                    for p in batch:
                        hidden.append((p, p.grad))
                        p.grad = None
            _adamw_step(self)  # not super().step(): See Note: the step hooks run once
        finally:
            for p, grad in hidden:
                p.grad = grad
        return loss

    def _check_step(self) -> None:
        """Before any parameter moves: what the 8-bit update cannot do, and sparse gradients
        (AdamW refuses them too, but only after the 8-bit parameters would have moved)."""
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients, please consider SparseAdam instead")
                if not self._in_8bit(p):
                    continue
                if group["amsgrad"]:
                    raise ValueError(f"param group {i} has amsgrad=True, which needs float32 states: 8-bit AdamW has "
                                     "no amsgrad; use state_bits=32, or amsgrad=False")
                if hasattr(p, "to_local"):
                    raise ValueError(f"state_bits=8 does not take FSDP2-sharded (DTensor) parameters (its blocks would "
                                     f"follow the shards); param group {i} has one of shape {tuple(p.shape)}: use "
                                     "state_bits=32")
                if not p.is_floating_point():
                    raise TypeError(f"state_bits=8 takes real floating parameters; param group {i} has a {p.dtype} one "
                                    f"of shape {tuple(p.shape)}: use state_bits=32 (AdamW's update views it as real)")

    def _zeros(self, p: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        """A state tensor for p: in managed memory for a paged CUDA parameter."""
        if not (self.paged and p.is_cuda):
            return torch.zeros(shape, dtype=dtype, device=p.device)
        with torch.cuda.use_mem_pool(managed_pool(p.device), device=p.device):
            return torch.zeros(shape, dtype=dtype, device=p.device)

    def _batches(self, group: dict, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The 8-bit parameters of a group in the batches _step_8bit updates together: with the
        group's foreach (default: on CUDA), those of one device, dtype and step count that are
        whole blocks of 256, up to BATCH_ELEMENTS elements a batch (its float32 temporaries, ~12 of
        them, stay ~50 MiB); every other one alone."""
        batches: list[list[torch.Tensor]] = []
        filling: dict[tuple, tuple[int, int]] = {}  # key -> (index of its open batch, elements in it)
        for p in params:
            foreach = group["foreach"] if group["foreach"] is not None else p.is_cuda
            if not (foreach and p.numel() % BLOCKSIZE_8BIT == 0):
                batches.append([p])
                continue
            key = (p.device, p.dtype, int(self.state[p]["step"]) if self.state[p] else 0)
            i, n = filling.get(key, (-1, 0))
            if i < 0 or n + p.numel() > BATCH_ELEMENTS:
                i, n = len(batches), 0
                batches.append([])
            batches[i].append(p)
            filling[key] = (i, n + p.numel())
        return batches

    def _state_8bit(self, p: torch.Tensor) -> dict:
        """p's 8-bit state, made on its first step (See Note: 8-bit states)."""
        state = self.state[p]
        if not state:
            blocks = -(-p.numel() // BLOCKSIZE_8BIT)
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())  # on the CPU, as AdamW keeps it
            for name, shape, dtype in (("state1", p.shape, torch.uint8), ("state2", p.shape, torch.uint8),
                                       ("absmax1", (blocks,), torch.int32), ("absmax2", (blocks,), torch.int32)):
                state[name] = self._zeros(p, shape, dtype)
        return state

    def _convert_state(self, p: torch.Tensor) -> None:
        """A loaded state in the other form than this optimizer keeps for p (a state_bits=32 state
        dict loaded with state_bits=8, or the reverse, or another min_8bit_size): its moments coded
        to 8 bits, or decoded to AdamW's (in p's dtype, as AdamW makes them)."""
        state = self.state.get(p, {})  # not self.state[p]: it would add an empty state AdamW's load never has
        if self._in_8bit(p) and "exp_avg" in state:
            if "max_exp_avg_sq" in state:
                raise ValueError("a state dict of an amsgrad=True optimizer cannot be loaded with state_bits=8")
            for name, _ in _CODED:
                if tuple(state[name].shape) != tuple(p.shape):
                    raise ValueError(f"the state dict's {name} is of shape {tuple(state[name].shape)}; its parameter "
                                     f"is of shape {tuple(p.shape)} (a state dict of another model?)")
            for i, (name, signed) in enumerate(_CODED, start=1):
                codes, absmax = nf4.quantize_8bit(state.pop(name).float().reshape(-1), BLOCKSIZE_8BIT, signed=signed)
                state[f"state{i}"], state[f"absmax{i}"] = codes.view(p.shape), absmax.view(torch.int32)
        elif not self._in_8bit(p) and "state1" in state:
            for i, (name, signed) in enumerate(_CODED, start=1):
                moment = nf4.dequantize_8bit(state.pop(f"state{i}").reshape(-1),
                                             state.pop(f"absmax{i}").view(torch.float32), BLOCKSIZE_8BIT, signed=signed)
                state[name] = moment.view(p.shape).to(p.dtype)

    def _step_8bit(self, group: dict, params: list[torch.Tensor]) -> None:
        """One AdamW8bit update of `params` (one of _batches), run on them as one flat tensor: each is
        whole blocks of 256 (or alone) and the update is elementwise, so every code, scale and
        value is what a step of each alone gives, in ~30 torch calls for the batch instead of each."""
        states = [self._state_8bit(p) for p in params]
        for state in states:
            state["step"] += 1
        step = int(states[0]["step"])
        (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        lr = group["lr"].item() if torch.is_tensor(group["lr"]) else group["lr"]

        def flat(tensors):
            return tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])

        m = nf4.dequantize_8bit(flat([s["state1"] for s in states]), flat([s["absmax1"] for s in states]).view(
            torch.float32), BLOCKSIZE_8BIT)
        v = nf4.dequantize_8bit(flat([s["state2"] for s in states]), flat([s["absmax2"] for s in states]).view(
            torch.float32), BLOCKSIZE_8BIT, signed=False)
        grad = flat([p.grad for p in params]).float()  # may be p.grad itself: never changed in place
        if group["maximize"]:
            grad = -grad  # AdamW's maximize: ascend
        p32 = flat([p.detach() for p in params]).float()  # p itself (a view) for one contiguous float32 p
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1, correction2 = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
        denom = (v.sqrt() / correction2).add_(eps)
        if wd > 0.0:
            p32.mul_(1.0 - lr * wd)
        p32.addcdiv_(m, denom, value=-lr / correction1)
        sizes = [p.numel() for p in params]
        if p32.data_ptr() != params[0].data_ptr():
            for p, new in zip(params, p32.split(sizes)):
                p.copy_(new.view(p.shape))  # one rounding to p's dtype
        blocks = [s["absmax1"].numel() for s in states]
        for i, (moment, (_, signed)) in enumerate(zip((m, v), _CODED), start=1):
            codes, absmax = nf4.quantize_8bit(moment, BLOCKSIZE_8BIT, signed=signed)
            for state, c, a in zip(states, codes.split(sizes), absmax.split(blocks)):
                state[f"state{i}"].view(-1).copy_(c)
                state[f"absmax{i}"].copy_(a.view(torch.int32))

    def _page_in(self) -> None:
        """Create AdamW's states of CUDA parameters in managed memory (as AdamW would, with the
        same dtypes and layout; 8-bit states are made there by their first step), and prefetch
        every managed state to its device."""
        ext = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not p.is_cuda:
                    continue
                if ext is None:
                    managed_pool(p.device)  # first: its error says what to do when _C has no CUDA
                    ext = _extension()
                state = self.state[p]
                if not state and not self._in_8bit(p):
                    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())  # on the CPU, as AdamW keeps it
                    names = _MOMENTS if group["amsgrad"] else _MOMENTS[:2]
                    with torch.cuda.use_mem_pool(managed_pool(p.device), device=p.device):
                        for name in names:
                            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for name in _PAGED:
                    if name in state:
                        _prefetch(ext, state[name])

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's, then the loaded moments of CUDA parameters are moved into managed memory.
        8-bit states are loaded as they are (torch's Optimizer.load_state_dict would cast them to
        the parameter's dtype). Every state is a copy: torch's keeps a loaded tensor that needs no
        cast (a step count, same-dtype moments) and would then update the caller's in place;
        `state_dict` is not changed."""
        before = self.state, self.param_groups  # torch's load replaces both: a refused load puts them back
        try:
            self._load(state_dict)
        except BaseException:
            self.state, self.param_groups = before
            raise

    def _load(self, state_dict: dict) -> None:
        state, kept = {}, {}  # param id -> AdamW's entries / the 8-bit ones
        for pid, entries in state_dict["state"].items():
            state[pid] = {k: v.clone() if torch.is_tensor(v) else v for k, v in entries.items() if k not in _STATE_8BIT}
            kept[pid] = {k: v for k, v in entries.items() if k in _STATE_8BIT}
        super().load_state_dict({**state_dict, "state": state})
        saved_groups = state_dict["param_groups"]
        params = {pid: p for saved, group in zip(saved_groups, self.param_groups)
                  for pid, p in zip(saved["params"], group["params"])}  # fmt: skip
        for pid, entries in kept.items():
            for name, t in entries.items():
                p = params[pid]
                blocks = -(-p.numel() // BLOCKSIZE_8BIT)
                shape, dtype = (tuple(p.shape), torch.uint8) if name.startswith("state") else ((blocks,), torch.int32)
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise ValueError(f"the state dict's {name} of parameter {pid} is {t.dtype} {tuple(t.shape)}; a "
                                     f"parameter of shape {tuple(p.shape)} keeps {dtype} {shape}")
                self.state[p][name] = t.to(p.device, copy=True)
        for p in params.values():
            self._convert_state(p)
        self._to_managed()

    def _to_managed(self) -> None:
        """The moments of CUDA parameters copied into managed memory (paged), where managed_prefetch
        takes them: after a load, a deepcopy or unpickling (those made them plain device memory)."""
        if not self.paged:
            return
        for p, state in self.state.items():
            if not (isinstance(p, torch.Tensor) and p.is_cuda):
                continue
            for name in _PAGED:
                if name in state:
                    with torch.cuda.use_mem_pool(managed_pool(p.device), device=p.device):
                        managed = torch.empty_like(state[name], memory_format=torch.preserve_format)
                    state[name] = managed.copy_(state[name])


class AdamW8bit(PagedAdamW):
    """bitsandbytes' AdamW8bit under its own name: PagedAdamW with state_bits=8 and, by default,
    paged=False (bitsandbytes' default too). Same arguments as AdamW8bit's that apply here."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, paged: bool = False, min_8bit_size: int = 4096, foreach: bool | None = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, paged=paged, state_bits=8,
                         min_8bit_size=min_8bit_size, foreach=foreach)
