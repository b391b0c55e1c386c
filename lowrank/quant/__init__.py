"""Quantization: the NF4 codec (the specification every kernel is tested against)."""

from . import nf4
from .nf4_weight import NF4Weight

__all__ = ["NF4Weight", "nf4"]
