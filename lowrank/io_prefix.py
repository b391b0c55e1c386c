"""Prefix adapters in PEFT's PREFIX_TUNING format (lowrank.io dispatches here by adapter kind).

PEFT saves one tensor, `prompt_embeddings`, of shape (P, L * 2 * d_kv): for each virtual
token, layer 0's key (d_kv = key/value heads * head_dim, head-major), layer 0's value, layer
1's key, ... With `prefix_projection` PEFT saves the MLP's output, not the MLP: the folded
prefixes. We do the same (fold at save time, the model keeps its MLP), and load any PEFT
prefix adapter as plain prefixes. adapter_config.json carries num_virtual_tokens, num_layers,
token_dim (= d_kv), num_attention_heads (= key/value heads), prefix_projection and
encoder_hidden_size.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed, io_embeddings, io_prompt
from .config import PrefixConfig
from .inject import inject
from .targets import task_type
from .tuners.base import TunerLayer
from .tuners.prefix import PrefixLayer, default_targets, layers
from .walk import _walk

KEY = "prompt_embeddings"
PEFT_TYPE = "PREFIX_TUNING"


def has_prefix(model: nn.Module, name: str | None) -> bool:
    """Whether save_adapter(model, name=name) means a prefix adapter: `name` is one, or (None)
    the model's adapters are prefixes only."""
    prefix_names = {n for m in model.modules() if isinstance(m, PrefixLayer) for n in m.names}
    if name is not None:
        return name in prefix_names
    others = {n for m in model.modules() if isinstance(m, TunerLayer) and not isinstance(m, PrefixLayer)
              for n in m.names}
    return bool(prefix_names) and not others


def adapter_state(model: nn.Module, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """({"prompt_embeddings": (P, L * 2 * d_kv)}, PEFT adapter_config dict) for prefix adapter `name`."""
    if name is None:
        from .io import only_name  # io imports this module first

        name = only_name(list(dict.fromkeys(n for m in model.modules() if isinstance(m, PrefixLayer) for n in m.names)),
                         "prefix adapters")
    found = layers(model, name)
    if not found:
        raise ValueError(f"the model has no prefix adapter named {name!r}")
    every = list(default_targets(model, found[0].configs[name]))
    placed = [w for _, _, w, m in _walk(model) if isinstance(m, PrefixLayer) and name in m.names]
    if placed != every:  # PEFT's table has a prefix for every layer, and names none: load_adapter puts it on these
        raise ValueError(f"prefix adapter {name!r} is on {placed}, but PEFT's format (and load_adapter) puts a prefix "
                         f"on every self-attention module, the default targets {every}: inject it with the default "
                         "targets to save it")
    shapes = {(layer.heads, layer.head_dim) for layer in found}
    if len(shapes) > 1:
        raise ValueError(f"prefix adapter {name!r} spans layers with different key/value shapes {sorted(shapes)}; "
                         "PEFT's format holds one (num_attention_heads, token_dim) for all layers")
    with torch.no_grad():
        # [(P, 2 d_kv) per layer] -> (P, L * 2 d_kv): layer-major, keys before values
        # See Note: saving from several ranks (lowrank/distributed.py): under FSDP2 the prefix is
        # computed from sharded parameters (DTensors, every rank here) and gathered whole
        table = torch.cat([distributed.full_tensor(layer.prefix(name)).detach().float().cpu() for layer in found], dim=1)
    first, config = found[0], found[0].configs[name]
    cfg = getattr(model, "config", None)
    peft_config = {
        "peft_type": PEFT_TYPE, "task_type": _task_type(model), "auto_mapping": None,
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None, "revision": None,
        "inference_mode": True, "num_virtual_tokens": config.num_virtual_tokens, "num_layers": len(found),
        "token_dim": first.width, "num_attention_heads": first.heads, "num_transformer_submodules": 1,
        "prefix_projection": config.projection_hidden is not None, "encoder_hidden_size": config.projection_hidden,
        "init_weights": None, "modules_to_save": None,
    }
    tensors = {KEY: table.to(first.prefix(name).dtype).contiguous()}
    io_prompt.save_head(model, peft_config["task_type"], tensors, peft_config)  # See Note: task heads (io_prompt)
    io_embeddings.save_embeddings(model, [], tensors, "base_model.")  # See Note: embeddings in an adapter file
    return tensors, peft_config


def _task_type(model: nn.Module) -> str | None:
    return task_type(model) if hasattr(model, "config") else None  # no config: not a transformers model


def config_from_peft(peft_config: dict, source: str) -> PrefixConfig:
    """Our PrefixConfig (plain prefixes: the file holds them folded) for a PEFT PREFIX_TUNING config."""
    return PrefixConfig(num_virtual_tokens=io_prompt.virtual_tokens(peft_config, source, "prefix"))


def load(model: nn.Module, peft_config: dict, weights: dict[str, torch.Tensor], name: str, source: str, result_type,
         dtype=None, strict: bool = True):
    """Inject prefix adapter `name` and fill it from PEFT's `prompt_embeddings`. Raises (and
    ejects again) when the file's layer count, heads or width do not fit the model; keys of
    the file it has no place for, and a task head that does not fit, raise when `strict`, else
    are reported in the result (as for the other adapter kinds)."""
    config = config_from_peft(peft_config, source)
    if KEY not in weights:
        raise ValueError(f"{source}: no {KEY!r} tensor in the adapter weights (keys: {sorted(weights)})")
    pairs, base, unexpected, mismatched = io_prompt.load_head(model, peft_config, weights)  # See Note: task heads
    if strict and (unexpected or mismatched):
        raise ValueError(f"{source}: unexpected keys for a prefix adapter: {unexpected}" if unexpected else
                         f"{source}: the task head or embeddings do not fit (key, file, model): {mismatched}"
                         + io_embeddings.resize_hint(model, mismatched))
    table = weights[KEY]
    from .io import undo_on_error  # io imports this module first

    with undo_on_error(model, name):  # See Note: a failed load changes nothing (lowrank/io.py)
        modules = inject(model, config, name, dtype=dtype)
        found = layers(model, name)
        want = {"num_layers": len(found), "token_dim": found[0].width, "num_attention_heads": found[0].heads}
        wrong = {k: (peft_config.get(k), v) for k, v in want.items() if peft_config.get(k) not in (None, v)}
        widths = [2 * layer.width for layer in found]
        shape = (config.num_virtual_tokens, sum(widths))
        if wrong or tuple(table.shape) != shape:
            raise ValueError(f"{source}: the prefix adapter does not fit {type(model).__name__}: (file, model) "
                             f"{wrong or ''} prompt_embeddings shape {tuple(table.shape)} vs {shape}")
        with torch.no_grad():
            for layer, chunk in zip(found, table.split(widths, dim=1)):  # (P, 2 d_kv) each
                layer.kv[name].copy_(chunk)
            for param, value in pairs:
                if param.shape == value.shape:  # (a head that does not fit is reported, not loaded, when not strict)
                    param.copy_(value)
    return result_type(modules, [], unexpected, mismatched, base)
