"""Quantization: the NF4 codec (the specification every kernel is tested against), the
frozen 4-bit linear layer, and `quantize`, which puts it in a model."""

from . import nf4
from .linear4bit import Linear4bit
from .load import load_and_quantize, skeleton
from .nf4_weight import NF4Weight
from .quantize import NF4Config, quantize

__all__ = ["Linear4bit", "NF4Config", "NF4Weight", "load_and_quantize", "nf4", "quantize", "skeleton"]
