"""Bottleneck adapters on disk: lowrank's own format, in PEFT's directory layout (docs/io.md).

PEFT has no bottleneck adapters, so there is no peer format to follow; ours keeps PEFT's
shape so that tools which list, copy or upload adapter directories handle it unchanged:

    adapter_config.json        {"peft_type": "LOWRANK_BOTTLENECK", "format_version": 1,
                                "target_modules": [full module names], "placement", "parallel",
                                "reduction_factor", "bottleneck_size", "activation", "scaling",
                                "base_model_name_or_path"}
    adapter_model.safetensors  base_model.model.<module>.adapter.down.weight   (m, d_in)
                               base_model.model.<module>.adapter.down.bias     (m,)
                               base_model.model.<module>.adapter.up.weight     (d_out, m)
                               base_model.model.<module>.adapter.up.bias       (d_out,)
                               base_model.model.<head>.<param>   a classifier's, token classifier's or
                                   question answerer's head, whole (config: "task_type", "modules_to_save")
                               base_model.model.<embedding>.weight   the input and output embeddings of a
                                   vocabulary resized since the model loaded, as a LoRA file holds them
                                   (lowrank/io_embeddings.py, Note: embeddings in an adapter file)

PEFT refuses the directory (it does not know the peft_type); lowrank.load_adapter reads it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from . import distributed, io_embeddings, io_prompt
from .config import AdapterConfig
from .inject import _walk, adapter_names, inject
from .targets import HEADS, task_type
from .tuners.adapter import AdapterLayer
from .tuners.base import TunerLayer

PEFT_TYPE = "LOWRANK_BOTTLENECK"
FORMAT_VERSION = 1
FIELDS = ("placement", "parallel", "reduction_factor", "bottleneck_size", "activation", "scaling")
_TENSORS = ("down.weight", "down.bias", "up.weight", "up.bias")


def _layers(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
    """(module name, bottleneck layer) for every layer holding bottleneck adapter `name`."""
    out = []
    for _, _, where, child in _walk(model):
        m = child
        while isinstance(m, TunerLayer):
            if isinstance(m, AdapterLayer) and name in m.names:
                out.append((where, m))
                break
            m = m.base
    return out


def _names(model: nn.Module) -> list[str]:
    return [n for n in adapter_names(model) if _layers(model, n)]


def is_bottleneck(model: nn.Module, name: str | None) -> bool:
    """Does save_adapter(model, name=name) mean a bottleneck adapter? With name=None: the
    model's adapters are all bottleneck adapters (so exactly one is unambiguous)."""
    if name is not None:
        return bool(_layers(model, name))
    return bool(adapter_names(model)) and set(_names(model)) == set(adapter_names(model))


def _computes(config: AdapterConfig) -> tuple:
    """The FIELDS that decide what the saved adapter computes, given its exact modules: not `placement`
    (it picks default targets only), nor `reduction_factor` beside a `bottleneck_size` (which sets the width)."""
    ignored = {"placement"} | ({"reduction_factor"} if config.bottleneck_size is not None else set())
    return tuple(None if f in ignored else getattr(config, f) for f in FIELDS)


def adapter_state(model: nn.Module, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(keyed tensors, adapter_config dict) for bottleneck adapter `name` of `model`."""
    from .io import PREFIX, only_name

    if name is None:
        name = only_name(_names(model), "bottleneck adapters")
    layers = _layers(model, name)
    # the file holds one set of FIELDS and the exact modules: parts injected with their own targets (an encoder's
    # and a decoder's, under one name) save as one; other fields that differ cannot
    configs = {_computes(layer.configs[name]): layer.configs[name] for _, layer in layers}
    if len(configs) > 1:
        differ = [f for i, f in enumerate(FIELDS) if len({k[i] for k in configs}) > 1]
        raise ValueError(f"bottleneck adapter {name!r} was injected with configs whose {differ} differ "
                         # the values as given (the keys hold None for a field _computes ignores: 'placement': None)
                         f"({[{f: getattr(c, f) for f in FIELDS} for c in configs.values()]}); our format holds one "
                         "value of each")
    config = next(iter(configs.values()))
    tensors = {}
    for where, layer in layers:
        params = dict(layer.adapters[name].named_parameters())
        for t in _TENSORS:
            # See Note: saving from several ranks (lowrank/distributed.py)
            tensors[f"{PREFIX}{where}.adapter.{t}"] = distributed.full_tensor(params[t].detach()).cpu().contiguous()
    # See Note: task heads (lowrank/io_prompt.py): a task model's head is new at fine-tuning (random in
    # every fresh copy of the base), so the file carries it whole, as LoRA's, prompt's and prefix's files do
    task = task_type(model)
    head = io_prompt.head_parameters(model, task, PREFIX)
    tensors.update({k: distributed.full_tensor(p.detach()).cpu().contiguous() for k, p in head.items()})
    # a resized vocabulary's new rows exist only in this model: the file carries the embeddings, as LoRA's does (a
    # fresh base resized the same way draws other rows). No bottleneck layer is an adapted embedding: layers=[]
    io_embeddings.save_embeddings(model, [], tensors, PREFIX)
    cfg = getattr(model, "config", None)
    saved = {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, "library": "lowrank",
             "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
             "target_modules": [w for w, _ in layers], **{f: getattr(config, f) for f in FIELDS}}
    if head:
        saved |= {"task_type": task, "modules_to_save": list(HEADS[task])}
    return tensors, saved


def config_from_saved(saved: dict, source: str) -> AdapterConfig:
    """The AdapterConfig a saved adapter_config.json describes (targets: exactly its modules)."""
    version = saved.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{source}: format_version is {version!r}; this lowrank reads version {FORMAT_VERSION}")
    targets = saved.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{source}: target_modules must be a non-empty list of module names; got {targets!r}")
    unknown = sorted(set(saved) - set(FIELDS) - {"peft_type", "format_version", "library", "base_model_name_or_path",
                                                  "target_modules", "task_type", "modules_to_save"})
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown} for a {PEFT_TYPE} adapter")
    heads = saved.get("modules_to_save")
    if heads is not None and (not isinstance(heads, list) or not all(isinstance(n, str) and n for n in heads)):
        raise ValueError(f"{source}: modules_to_save must be a list of module names or null; got {heads!r}")
    fields = {f: saved[f] for f in FIELDS if f in saved}
    # exact names (no suffix or glob surprises), as a pattern: a config with a lambda would not pickle with its model
    exact = "re:(?:" + "|".join(re.escape(t) for t in sorted(set(targets))) + ")"
    try:
        return AdapterConfig(targets=exact, **fields)
    except (ValueError, TypeError) as e:  # a field's value out of range: name the file it came from
        raise type(e)(f"{source}: {e}") from e


def load(model: nn.Module, path, saved: dict, name: str = "default", *, strict: bool = True,
         allow_pickle: bool = False, dtype=None):
    """Inject bottleneck adapter `name` as `saved` (the parsed adapter_config.json) says and
    load its weights from `path`. As io.load_adapter: shape mismatches raise; missing /
    unexpected keys raise when `strict`; on any error the model is left as it was."""
    from .io import CONFIG_NAME, PREFIX, LoadResult, copy_checked, read_weights, undo_on_error

    config = config_from_saved(saved, str(path / CONFIG_NAME))
    weights = read_weights(path, allow_pickle)
    with undo_on_error(model, name):  # See Note: a failed load changes nothing (lowrank/io.py)
        try:
            modules = inject(model, config, name, dtype=dtype)
        except (ValueError, TypeError) as e:  # what the file asks that this model cannot take, named (as io.py's LoRA)
            raise type(e)(f"{path / CONFIG_NAME}: cannot load this adapter: {e}") from e
        seen, missing, mismatched, pairs = set(), [], [], []
        for where, layer in _layers(model, name):
            params = dict(layer.adapters[name].named_parameters())
            for t in _TENSORS:
                key = f"{PREFIX}{where}.adapter.{t}"
                if key not in weights:
                    missing.append(key)
                    continue
                seen.add(key)
                if tuple(weights[key].shape) != tuple(params[t].shape):
                    mismatched.append((key, tuple(weights[key].shape), tuple(params[t].shape)))
                pairs.append((params[t], weights[key]))
        # the task head, whole (modules_to_save): loaded into the model's head, as a base weight (io.py, Note:
        # base weights in an adapter file)
        head = io_prompt.saved_parameters(model, saved.get("modules_to_save"), PREFIX)
        # and the embeddings of a resized vocabulary, where the file has them (save_embeddings' keys, above)
        embeddings = {k: p for k, p in io_embeddings.embedding_parameters(model, PREFIX).items() if k in weights}
        for key, param in (head | embeddings).items():
            if key not in weights:
                missing.append(key)
                continue
            seen.add(key)
            if tuple(weights[key].shape) != tuple(param.shape):
                mismatched.append((key, tuple(weights[key].shape), tuple(param.shape)))
            pairs.append((param, weights[key]))
        result = LoadResult(modules, sorted(missing), sorted(k for k in weights if k not in seen), mismatched,
                            sorted(k for k in head | embeddings if k in weights))
        copy_checked(model, f"{path}: the bottleneck adapter", pairs, result, strict)
    return result
