"""lowrank: parameter-efficient fine-tuning layers and NF4 kernels for PyTorch.

Public API only; each name lives in the module that defines it.
"""

from . import ops  # defines the lowrank:: ops and registers the backends that can run here
from .config import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig
from .inject import (
    Summary,
    active_adapters,
    adapter_names,
    disabled,
    eject,
    inject,
    mark_trainable,
    merge,
    per_sample,
    set_active,
    summary,
    unmerge,
)
from .io import LoadResult, load_adapter, save_adapter
from .export import ExportResult, merge_and_export
from .checkpoint import load_quantized, save_quantized
from .hub import push_adapter
from .ops import nf4_dequantize, nf4_linear
from .optim import AdamW8bit, PagedAdamW
from .quant import Linear4bit, NF4Config, NF4Weight, load_and_quantize, nf4, quantize, skeleton

__version__ = "0.1.0.dev0"

__all__ = [
    "AdamW8bit",
    "AdapterConfig",
    "Linear4bit",
    "LoadResult",
    "LoraConfig",
    "NF4Config",
    "NF4Weight",
    "PagedAdamW",
    "PrefixConfig",
    "PromptConfig",
    "Summary",
    "__version__",
    "active_adapters",
    "adapter_names",
    "disabled",
    "eject",
    "inject",
    "load_adapter",
    "load_and_quantize",
    "mark_trainable",
    "merge",
    "nf4",
    "nf4_dequantize",
    "nf4_linear",
    "ops",
    "per_sample",
    "quantize",
    "save_adapter",
    "set_active",
    "skeleton",
    "summary",
    "unmerge",
    "ExportResult",
    "merge_and_export",
    "load_quantized",
    "save_quantized",
    "push_adapter",
]
