"""The one table that picks a kernel for each op on each device.

Every `lowrank::` op has a plain-PyTorch "reference" implementation (the specification,
lowrank/quant/nf4.py) that runs on every device. Faster implementations register
themselves under a backend name when they can run here (Triton is importable, lowrank._C
was built); the op then runs the first backend in PREFERENCE for the tensor's device that
has registered an implementation.

    LOWRANK_BACKEND=triton|csrc|reference   forces one backend for every op (tests, benchmarks);
                                            an op the forced backend lacks raises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger("lowrank")

BACKENDS = ("triton", "csrc", "reference")

# device type -> backends in order of preference; the first one that implements the op wins.
# Note: csrc before triton on CUDA. On the H200 (docs/benchmarks.md, 2026-11-28, 4096 x 4096)
# the CUDA kernels beat the Triton ones on every op measured: dequantize 0.016 vs 0.049-0.055
# ms, M = 1 0.013 vs 0.129, M = 16 0.021 vs 0.141, M = 4096 0.199 vs 0.203 (both dequantize +
# cuBLAS there). Triton runs where csrc is not built with CUDA, or when forced.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("csrc", "triton", "reference"),
    "cpu": ("csrc", "reference"),
}
_DEFAULT_PREFERENCE = ("reference",)  # any other device (mps, xpu, meta, ...)

_IMPLS: dict[tuple[str, str], Callable] = {}  # (op, backend) -> implementation
_ANNOUNCED: set[tuple[str, str, str]] = set()


def contiguous_fields(packed, absmax, nested_absmax, offset) -> tuple:
    """The weight's fields as contiguous tensors (the ops accept any layout, their checks go by
    element count), for kernels that read them as flat arrays (C++, CUDA, Triton)."""
    return tuple(t if t is None else t.contiguous() for t in (packed, absmax, nested_absmax, offset))


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` implements `op` (e.g. "nf4_dequantize") for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return wrap


def implementation(op: str, backend: str) -> Callable:
    """`backend`'s implementation of `op`: for a kernel that hands the cases it does not cover
    to another backend (csrc -> reference)."""
    if (op, backend) not in _IMPLS:
        raise RuntimeError(f"{op} has no {backend} implementation in this process (available: {available(op)})")
    return _IMPLS[(op, backend)]


def available(op: str) -> list[str]:
    """Backends that have registered an implementation of `op` in this process."""
    return [b for b in BACKENDS if (op, b) in _IMPLS]


def forced() -> str | None:
    name = os.environ.get("LOWRANK_BACKEND", "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"LOWRANK_BACKEND must be one of {BACKENDS} or unset, got {name!r}")
    return name


def choose(op: str, device: torch.device) -> tuple[str, Callable]:
    """(backend name, implementation) that runs `op` for tensors on `device`."""
    name = forced()
    if name is not None:
        if (op, name) not in _IMPLS:
            raise RuntimeError(
                f"LOWRANK_BACKEND={name} but {op} has no {name} implementation in this process "
                f"(available: {available(op)}); unset LOWRANK_BACKEND or build/install that backend"
            )
        if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"LOWRANK_BACKEND=triton but {op} got CPU tensors: Triton runs on a GPU, or on the "
                               "CPU in its interpreter only (set TRITON_INTERPRET=1 before triton is imported)")
    else:
        order = PREFERENCE.get(device.type, _DEFAULT_PREFERENCE)
        name = next(b for b in order + ("reference",) if (op, b) in _IMPLS)
    key = (op, device.type, name)
    if key not in _ANNOUNCED:  # one log line per op and device, the first time it runs
        _ANNOUNCED.add(key)
        log.info("lowrank: %s on %s runs the %s backend", op, device.type, name)
    return name, _IMPLS[(op, name)]
