"""lowrank: parameter-efficient fine-tuning layers and NF4 kernels for PyTorch.

Public API only; each name lives in the module that defines it.
"""

from .quant import NF4Weight, nf4

__version__ = "0.1.0.dev0"

__all__ = ["NF4Weight", "nf4", "__version__"]
