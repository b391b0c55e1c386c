"""When a LoRA layer may add itself through the lowrank:: ops instead of its modules (lora.py,
Note: LoRA in one op, Note: QLoRA in one op): the predicates on its dropout, hooks, x and dtypes."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..quant.linear4bit import autocast_dtype
from .base import _keep_fused_paths_off


def _passes_x(drop: nn.Module) -> bool:
    """Whether the adapter's dropout returns x itself: none, or nn.Dropout in eval mode or with p = 0
    (as F.dropout does then: the same tensor, no autograd node), and no hook of its own."""
    return type(drop) is nn.Identity or (type(drop) is nn.Dropout and (not drop.training or drop.p == 0)
                                         and not _hooked(drop))  # fmt: skip


def _drops_in_op(drop: nn.Module, x: torch.Tensor) -> bool:
    """Whether the adapter's dropout can be the LoRA ops' own (ops.lora_ops.dropout_parts): a training,
    not in-place nn.Dropout without hooks, 0 < p < 1, x non-empty on the CPU or CUDA."""
    return (type(drop) is nn.Dropout and drop.training and not drop.inplace and 0.0 < drop.p < 1.0
            and not _hooked(drop) and x.device.type in ("cpu", "cuda") and x.numel() > 0)  # fmt: skip


def _hooked(m: nn.Module) -> bool:
    """Whether a hook of the module's own watches its forward or backward (Note: fused fast paths' empty one does not)."""
    return bool(m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
                or any(h is not _keep_fused_paths_off for h in m._forward_pre_hooks.values()))


def _x_fits(x, a, b) -> bool:
    """Plain tensors, and an x that matmul folds into rows as the ops' backward does (2+ dimensions, contiguous)."""
    return type(x) is torch.Tensor and type(a) is type(b) is nn.Parameter and x.dim() >= 2 and x.is_contiguous()


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (not float64)


def _dtypes_fit(result, x, a, b) -> bool:
    """Whether lora_add computes in the dtypes the modules would: one dtype for all four, or under
    autocast (CPU, CUDA) castable x, A, B (the op's rule casts them as F.linear's does) and the
    base's output already in autocast's dtype."""
    autocast = autocast_dtype(x)
    if autocast is None:
        return x.dtype == result.dtype == a.dtype == b.dtype
    return (x.device.type in ("cpu", "cuda") and result.dtype == autocast
            and all(t.dtype in _AUTOCAST_CASTS for t in (x, a, b)))  # fmt: skip


def _plain(m: nn.Module) -> bool:
    """An nn.Linear without bias whose forward and backward no hook of its own watches (the op bypasses its call)."""
    return type(m) is nn.Linear and m._parameters["bias"] is None and not _hooked(m)


def _global_hooks() -> bool:
    """Whether a hook registered for every module (register_module_forward_hook, ...) would see the factors."""
    return bool(_module._global_forward_pre_hooks or _module._global_forward_hooks
                or _module._global_backward_pre_hooks or _module._global_backward_hooks)  # fmt: skip
