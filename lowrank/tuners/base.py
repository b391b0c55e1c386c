"""What every adapter layer shares: it holds `base` (any nn.Module), several named adapters,
which of them are active, an on/off switch, and per-sample routing for mixed batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..quant.linear4bit import autocast_dtype

BASE = "__base__"  # in a per-sample route: this sample uses no adapter (PEFT's spelling)


# Note: inputs in the adapter's dtype. An adapter is made in the dtype its module computes in
# (a 4-bit layer's compute dtype, or for a block of them theirs: lora_base.float_dtype_and_device),
# but what it reads can have another: a float32 model whose 4-bit layers compute in bfloat16
# passes float32 activations around them (Linear4bit takes any floating x and returns x's dtype).
# Outside autocast the adapter's input is then cast to the adapter's dtype and its addition back
# to the output's, as PEFT 0.21's LoRA on a bitsandbytes 4-bit layer does (peft/tuners/lora/bnb.py;
# tests/peers/test_peft_qlora.py); DoRA's addition is instead summed in the wider dtype and the
# sum cast back once (lowrank/tuners/lora.py). Under autocast, autocast casts (so do PEFT's
# bitsandbytes layers); LoRA on a dense layer casts as PEFT's Linear does instead (lora_base.py,
# Note: x in the adapter's dtype).
def cast_for(x: torch.Tensor, dtype: torch.dtype, under_autocast: bool = False) -> torch.dtype | None:
    """`dtype` where an adapter made in it must cast its input x to it (See Note: inputs in the
    adapter's dtype), else None. Under autocast only if `under_autocast` (LoRA on a dense base)."""
    if x.dtype == dtype or not x.is_floating_point() or (not under_autocast and autocast_dtype(x) is not None):
        return None
    return dtype


def innermost(module: nn.Module) -> nn.Module:
    """The module inside every adapter layer around it (`module` itself when it is none)."""
    while isinstance(module, TunerLayer):
        module = module._modules["base"]
    return module


def _keep_fused_paths_off(module: nn.Module, args: tuple) -> None:
    """See Note: fused fast paths."""


class TunerLayer(nn.Module):
    """Wraps `base`; subclasses add named adapters to its output.

    # Note: fused fast paths. torch.nn.TransformerEncoderLayer (and MultiheadAttention) run a
    # fused kernel in eval mode that reads `linear1.weight` etc. directly and never calls the
    # submodules, so an adapter would be silently skipped. torch takes the slow, module-by-module
    # path whenever any submodule carries a forward pre-hook, so `inject` gives every adapter
    # layer inside a TransformerEncoderLayer an empty one (keep_fused_paths_off). Only those: a
    # hook sends every call of its module through nn.Module's slow call path, 1.4 us a call on
    # the CPU of docs/benchmarks.md, on every layer of every forward. Attribute reads that miss
    # on the wrapper fall through to `base` (so model code reading e.g. `self.c_attn.nf` or
    # `embed.weight` keeps working, as in PEFT).
    #
    # Note: lookups on the hot path. A submodule, parameter or buffer read as an attribute
    # (self.lora_A, base.packed) is not in the instance's __dict__: Python falls back to
    # nn.Module.__getattr__ (here through TunerLayer's), 0.4-0.7 us a read on the 2-core EPYC of
    # docs/benchmarks.md, against 0.05 us for a dict lookup. A 4-bit LoRA layer's forward read
    # about a dozen of them, ~6 us of its ~34, on every forward of every layer (twice a step under
    # activation checkpointing). The forwards (LoraLayer, LoraLinear._add_delta, Linear4bit) read
    # self._modules / _parameters / _buffers instead; everything else keeps the attributes.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.active: tuple[str, ...] = ()  # adapters applied in forward, in this order
        self.enabled = True  # False inside `lowrank.disabled(model)`
        self.route: tuple[str, ...] | None = None  # per-sample adapter names, see `lowrank.per_sample`

    def keep_fused_paths_off(self) -> None:
        """Registers the empty forward pre-hook of Note: fused fast paths, once."""
        if _keep_fused_paths_off not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_keep_fused_paths_off)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    # -- what a subclass provides ---------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Every adapter this layer holds, in the order they were added."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    @property
    def merged(self) -> tuple[str, ...]:
        """Adapters currently folded into the base weight (none for bottleneck adapters)."""
        return ()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def set_active(self, names: Sequence[str]) -> None:
        if self.merged:
            raise RuntimeError(
                f"cannot change the active adapters while {list(self.merged)} are merged; call lowrank.unmerge(model) first"
            )
        self.active = tuple(n for n in names if n in self.names)

    def routed(self, result: torch.Tensor, x: torch.Tensor, delta: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]):
        """Mixed batch: sample i gets adapter route[i] ('__base__': none). `delta(name, x_i, result_i)`
        is that adapter's addition for a sub-batch. Batch is dim 0 of both x and result."""
        if len(self.route) != x.shape[0]:
            raise ValueError(f"per-sample adapter names: got {len(self.route)} names for a batch of {x.shape[0]} samples")
        out = result.clone()
        for name in dict.fromkeys(self.route):  # unique, in order of first appearance
            if name == BASE or name not in self.names:
                continue
            rows = torch.tensor([i for i, n in enumerate(self.route) if n == name], device=x.device)
            # the sum in result's dtype, which indexed assignment requires (a DoRA addition may be wider)
            out[rows] = (result[rows] + delta(name, x[rows], result[rows])).to(out.dtype)  # (b_name, ..., out)
        return out
