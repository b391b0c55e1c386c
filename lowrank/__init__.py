"""lowrank: parameter-efficient fine-tuning layers and NF4 kernels for PyTorch.

Public API only; each name lives in the module that defines it.
"""

from . import ops  # defines the lowrank:: ops and registers the backends that can run here
from .ops import nf4_dequantize, nf4_linear
from .quant import NF4Weight, nf4

__version__ = "0.1.0.dev0"

__all__ = ["NF4Weight", "nf4", "nf4_dequantize", "nf4_linear", "ops", "__version__"]
