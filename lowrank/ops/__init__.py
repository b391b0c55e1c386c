"""Kernels as torch.library ops (lowrank::*), with one table choosing a backend per device.

Importing this package defines the ops (library.py), registers the reference kernels
(reference.py) and, when Triton imports, the Triton kernels (triton_*.py)."""

from . import backends, experts_ops, library, lora_ops, reference  # noqa: F401  (defining and registering)
from .library import nf4_dequantize, nf4_linear
from .lora_ops import lora_add, nf4_lora_linear
from . import csrc  # registers the "csrc" backend and its C++ autograd when lowrank._C is built; never raises

if not csrc.CPP_AUTOGRAD:  # one autograd for nf4_linear: lowrank._C's (csrc/autograd.cpp) or library.py's
    library.register_python_autograd()
    lora_ops.register_python_ops()

try:  # Triton is optional: without it the reference (and csrc, if built) still run
    import triton  # noqa: F401
except ImportError:
    pass
else:
    from . import triton_dequantize, triton_gemv, triton_matmul  # noqa: F401  (register the "triton" backend)

    # its experts through the NF4 ops, each then on its Triton kernel (experts_ops.py, Note: one op for the routed pairs)
    backends.register(experts_ops.OP, "triton")(experts_ops.per_expert)

__all__ = ["backends", "lora_add", "nf4_dequantize", "nf4_linear", "nf4_lora_linear"]
