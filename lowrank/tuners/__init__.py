"""Adapter layers: each wraps a `base` module and adds named adapters to it."""

from .adapter import AdapterLayer
from .base import BASE, TunerLayer
from .lora import LoraConv, LoraEmbedding, LoraLinear
from .lora_base import LoraLayer
from .prefix import PrefixLayer
from .prompt import PromptLayer

__all__ = ["AdapterLayer", "BASE", "LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear", "PrefixLayer", "PromptLayer",
           "TunerLayer"]
