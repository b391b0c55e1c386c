"""The fine-tuning methods `lowrank train` offers: one table, one line a method.

A method is a tuner config type, the defaults it adds to the user's `method_options`, and
whether the frozen base is quantized to NF4 first (QLoRA). Checkpoints of LoRA-family
methods are PEFT adapter directories (lowrank.save_adapter); other methods are saved as
their trainable tensors plus the tuner config (see Note: checkpoints of non-LoRA methods).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import torch
from torch import nn

from ..config import AdapterConfig, LoraConfig
from ..inject import inject

WEIGHTS = "adapter_model.safetensors"
OWN_CONFIG = "lowrank_adapter.json"  # tuner config of a non-LoRA checkpoint


@dataclasses.dataclass(frozen=True)
class Method:
    config: type  # the tuner config class the options build
    defaults: dict  # options the method sets before the user's (the user's win)
    quantize: bool = False  # NF4 base first: QLoRA (Dettmers et al. 2023)


METHODS = {
    "lora": Method(LoraConfig, {}),
    "dora": Method(LoraConfig, {"dora": True}),
    "qlora": Method(LoraConfig, {}, quantize=True),
    "adapter": Method(AdapterConfig, {}),
    # "prefix": Method(PrefixConfig, {}),  # the lead wires prefix / prompt tuning here after merging
    # "prompt": Method(PromptConfig, {}),
}
PLANNED = ("prefix", "prompt")  # named by the issue, not built in this branch yet


def tuner_config(method: str, options: dict):
    """The tuner config for `method` with `options`; ValueError naming the bad option."""
    if method not in METHODS:
        soon = f" ('{method}' is not built in this version yet)" if method in PLANNED else ""
        raise ValueError(f"method must be one of {sorted(METHODS)}{soon}; got {method!r}")
    m = METHODS[method]
    allowed = [f.name for f in dataclasses.fields(m.config)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method_options: unknown option(s) {unknown} for method {method!r}; allowed: {allowed}")
    try:
        return m.config(**{**m.defaults, **options})
    except (TypeError, ValueError) as e:
        raise ValueError(f"method_options for {method!r}: {e}") from None


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
        return NF4Config(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"nf4: {e}") from None


# Note: checkpoints of non-LoRA methods. PEFT has no bottleneck-adapter format and
# lowrank.save_adapter writes LoRA only, so for other methods a checkpoint holds the
# trainable tensors by their module path (adapter_model.safetensors) and the tuner config's
# fields (lowrank_adapter.json); load_own injects that config and loads the tensors strictly.

def save_own(model: nn.Module, config, path: pathlib.Path, tensors: dict | None = None) -> None:
    """Trainable tensors + tuner config of `model` into the (new, private) directory `path`;
    `tensors`: those tensors by name when the caller holds them whole (gathered from shards)."""
    from safetensors.torch import save_file

    if tensors is None:
        tensors = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    bad = [k for k, v in fields.items() if not isinstance(v, (str, int, float, bool, type(None), tuple))]
    if bad:
        raise ValueError(f"cannot save the {type(config).__name__} fields {bad} as JSON; use string targets")
    save_file(tensors, os.fspath(path / WEIGHTS), metadata={"format": "pt"})
    (path / OWN_CONFIG).write_text(json.dumps({"type": type(config).__name__, "fields": fields}, indent=2) + "\n")


def load_own(model: nn.Module, path: pathlib.Path) -> list[str]:
    """Inject the tuner config saved by save_own and load its tensors (strict)."""
    from safetensors.torch import load_file

    saved = json.loads((path / OWN_CONFIG).read_text())
    types = {m.config.__name__: m.config for m in METHODS.values()}
    if saved.get("type") not in types:
        raise ValueError(f"{path / OWN_CONFIG}: unknown tuner config type {saved.get('type')!r}; known: {sorted(types)}")
    modules = inject(model, types[saved["type"]](**saved["fields"]))
    missing, unexpected = load_trainable(model, load_file(os.fspath(path / WEIGHTS)))
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return modules


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy `tensors` into the trainable parameters of the same name; (missing, unexpected)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n in params.keys() & tensors.keys():
            if params[n].shape != tensors[n].shape:
                raise ValueError(f"{n}: saved shape {tuple(tensors[n].shape)}, model has {tuple(params[n].shape)}")
            params[n].copy_(tensors[n])
    return sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
