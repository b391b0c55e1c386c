"""The fine-tuning methods `lowrank train` offers: one table, one line a method.

A method is a tuner config type, the defaults it adds to the user's `method_options`, and
whether the frozen base is quantized to NF4 first (QLoRA). Every checkpoint is an adapter
directory written by lowrank.save_adapter: PEFT's format for LoRA, DoRA, prefix and prompt
tuning, lowrank's LOWRANK_BOTTLENECK format (same layout) for bottleneck adapters
(docs/io.md).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..config import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig


@dataclasses.dataclass(frozen=True)
class Method:
    config: type  # the tuner config class the options build
    defaults: dict  # options the method sets; the user's may repeat them, not contradict them
    quantize: bool = False  # NF4 base first: QLoRA (Dettmers et al. 2023)


METHODS = {
    "lora": Method(LoraConfig, {}),
    "dora": Method(LoraConfig, {"dora": True}),
    "qlora": Method(LoraConfig, {}, quantize=True),
    "adapter": Method(AdapterConfig, {}),
    "prefix": Method(PrefixConfig, {}),  # P-tuning v2 unless method_options sets projection_hidden
    "prompt": Method(PromptConfig, {}),
}


def tuner_config(method: str, options: dict):
    """The tuner config for `method` with `options`; ValueError naming the bad option."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}")
    m = METHODS[method]
    allowed = [f.name for f in dataclasses.fields(m.config)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method_options: unknown option(s) {unknown} for method {method!r}; allowed: {allowed}")
    for k, v in m.defaults.items():  # what makes the method what its name says
        if k in options and options[k] != v:
            plain = [n for n, other in METHODS.items() if other.config is m.config and not other.defaults]
            raise ValueError(f"method_options: method {method!r} means {k}: {v}, and method_options sets {k}: "
                             f"{options[k]!r}; leave it out, or choose another method (e.g. {plain[0]!r})")
    try:
        return m.config(**{**m.defaults, **floats(m.config, options)})
    except (TypeError, ValueError) as e:
        raise ValueError(f"method_options for {method!r}: {e}") from None


FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a number as YAML 1.1 may leave it, a string


def floats(config: type, options: dict) -> dict:
    """`options` with the strings YAML 1.1 leaves a number such as 5e-2 (no dot) read as the
    float they spell, for the config's float fields (TrainConfig reads its own so too)."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(config)}

    def number(v, kind: str):
        return float(v) if isinstance(v, str) and "float" in kind and FLOAT.fullmatch(v.strip()) else v

    return {k: {p: number(x, fields[k]) for p, x in v.items()} if isinstance(v, dict) and k in fields  # alpha_pattern
            else number(v, fields.get(k, "")) for k, v in options.items()}


def nf4_config(options: dict):
    """NF4Config from config-file options; compute_dtype may be a name ("bfloat16")."""
    from ..quant import NF4Config

    options = dict(options)
    if isinstance(options.get("compute_dtype"), str):
        name = options["compute_dtype"]
        options["compute_dtype"] = getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else name
    allowed = [f.name for f in dataclasses.fields(NF4Config)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"nf4: unknown option(s) {unknown}; allowed: {allowed}")
    try:
        return NF4Config(**floats(NF4Config, options))
    except (TypeError, ValueError) as e:
        raise ValueError(f"nf4: {e}") from None


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy `tensors` into the trainable parameters of the same name; (missing, unexpected)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n in params.keys() & tensors.keys():
            if params[n].shape != tensors[n].shape:
                raise ValueError(f"{n}: saved shape {tuple(tensors[n].shape)}, model has {tuple(params[n].shape)}")
            params[n].copy_(tensors[n])
    return sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
