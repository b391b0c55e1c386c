"""Prompt-tuning adapters in PEFT's PROMPT_TUNING format (lowrank.io dispatches here).

A directory holds `adapter_config.json` (peft_type "PROMPT_TUNING", num_virtual_tokens,
token_dim, num_transformer_submodules 1, task_type, prompt_tuning_init, ...) and
`adapter_model.safetensors` with one tensor, `prompt_embeddings` (n, d), float32. The file
names no module: the prompt goes where PromptConfig's default targets put it (the input
embedding), as PEFT puts it before the word embeddings.
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

from . import distributed, io_embeddings
from .config import PromptConfig
from .inject import _walk, adapter_names, inject, plain_parameters
from .targets import HEADS, task_type
from .tuners.base import innermost
from .tuners.prompt import PromptLayer, default_targets

KEY = "prompt_embeddings"
PEFT_TYPE = "PROMPT_TUNING"
INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # ours -> PEFT's PromptTuningInit


# Note: task heads. PEFT's model classes for SEQ_CLS, TOKEN_CLS and QUESTION_ANS train the task's
# head beside a prompt or prefix (their modules_to_save: each module whose name ends with one of
# HEADS[task], as PEFT's _set_trainable matches) and save its tensors as `base_model.<module>.
# <param>`; from_pretrained of such a file needs them (a KeyError without). lowrank trains the
# prompt or prefix alone, so save_adapter writes the head as the model has it, and load_adapter
# loads a file's head into the model's, as a base weight (LoadResult.base; eject does not undo it:
# lowrank/io.py, Note: base weights in an adapter file). Used by io_prefix, and by io.py for LoRA
# (PEFT's LoRA files of these tasks carry the head the same way, under base_model.model.). The
# tasks and their heads' names: lowrank/targets.py (TASKS, HEADS), where all-linear leaves heads out.


# Note: modules_to_save written back. A PEFT LoRA file's modules_to_save (an lm_head and
# embed_tokens trained whole, for new tokens) and a targeted embedding's own weight (PEFT's
# `<module>.base_layer.weight`: the vocabulary may have been resized) load as base weights
# (lowrank/io.py, Note: base weights in an adapter file), which save_adapter does not otherwise
# write: a file saved from the loaded model lacked them, and loaded anywhere it silently computed
# with the base's. load_adapter records them in model.__dict__ under SAVED, with the adapter's
# config, so that save_adapter of that very adapter (the same config object: not one injected again
# under its name) writes them again, at the keys PEFT's file had, with the weights as they are then.
SAVED = "_lowrank_modules_to_save"  # adapter name -> (its LoraConfig, modules_to_save, base weight keys)


def remember_saved(model: nn.Module, name: str, config, saved, base_keys: list[str]) -> None:
    if saved or base_keys:
        model.__dict__.setdefault(SAVED, {})[name] = (config, list(saved or ()), list(base_keys))


def save_loaded_modules(model: nn.Module, name: str, config, tensors: dict, peft_config: dict, prefix: str) -> None:
    """Write back what adapter `name` was loaded with besides itself (See Note: modules_to_save written back)."""
    record = model.__dict__.get(SAVED, {}).get(name)
    if record is None or record[0] is not config:
        return
    _, saved, base_keys = record
    params = dict(plain_parameters(model))  # as load_adapter found them: `.base_layer` dropped
    weights = {k: p for k in base_keys if (p := params.get(k[len(prefix):].replace(".base_layer.", "."))) is not None}
    weights |= saved_parameters(model, saved, prefix)
    tensors.update({k: distributed.full_tensor(p.detach()).cpu().contiguous() for k, p in weights.items()})
    if saved:
        peft_config["modules_to_save"] = sorted(set(peft_config["modules_to_save"] or ()) | set(saved))


def saved_parameters(model: nn.Module, names, prefix: str = "base_model.") -> dict[str, nn.Parameter]:
    """PEFT's keys for the parameters of the modules that modules_to_save `names` picks in `model`
    (each module whose name ends with one, as PEFT's _set_trainable matches) -> the parameters."""
    names = tuple(names or ())
    heads = [w for _, _, w, _ in _walk(model) if any(w.endswith(n) for n in names)]
    heads = [w for w in heads if not any(w.startswith(o + ".") for o in heads)]  # outermost: its whole state
    return {f"{prefix}{n}": p for n, p in plain_parameters(model) if any(n.startswith(w + ".") for w in heads)}


def head_parameters(model: nn.Module, task: str | None, prefix: str = "base_model.") -> dict[str, nn.Parameter]:
    """PEFT's keys for the parameters of `task`'s head in `model` -> the parameters ({}: none)."""
    return saved_parameters(model, HEADS.get(task, ()), prefix)


def save_head(model: nn.Module, task: str | None, tensors: dict, peft_config: dict, prefix: str = "base_model.") -> None:
    """Add the task head's tensors and PEFT's modules_to_save (See Note: task heads)."""
    head = head_parameters(model, task, prefix)
    if head:
        tensors.update({k: distributed.full_tensor(p.detach()).cpu().contiguous() for k, p in head.items()})
        peft_config["modules_to_save"] = list(HEADS[task])


def load_head(model: nn.Module, peft_config: dict, weights: dict):
    """(pairs, base keys (those that fit), unexpected keys, mismatches) for the file's tensors other than KEY:
    the task head's, and the embeddings' of a resized vocabulary (PEFT's save adds them: lowrank/
    io_embeddings.py, Note: embeddings in an adapter file), load into the model's; the rest are unexpected."""
    head = head_parameters(model, peft_config.get("task_type")) | io_embeddings.embedding_parameters(model, "base_model.")
    pairs, base, unexpected, mismatched = [], [], [], []
    for k in sorted(k for k in weights if k != KEY):
        if k not in head:
            unexpected.append(k)
            continue
        pairs.append((head[k], weights[k]))
        if tuple(weights[k].shape) != tuple(head[k].shape):
            mismatched.append((k, tuple(weights[k].shape), tuple(head[k].shape)))
        else:  # LoadResult.base: the weights loaded; one that does not fit is never copied (a prefix's strict=False)
            base.append(k)
    return pairs, base, unexpected, mismatched


def _prompt_layers(model: nn.Module, name: str) -> list[tuple[str, PromptLayer]]:
    return [(where, m) for _, _, where, m in _walk(model) if isinstance(m, PromptLayer) and name in m.names]


def holds_prompt(model: nn.Module, name: str | None) -> bool:
    """Whether adapter `name` (None: the model's only adapter) is a prompt."""
    if name is None:
        names = adapter_names(model)
        prompts = [n for n in names if _prompt_layers(model, n)]
        if prompts and len(names) > 1:
            raise ValueError(f"the model has adapters {names} (prompts: {prompts}); pass name= to say which to save")
        return bool(prompts)
    return bool(_prompt_layers(model, name))


def adapter_state(model: nn.Module, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """({"prompt_embeddings": P}, PEFT adapter_config dict) for prompt adapter `name`."""
    name = adapter_names(model)[0] if name is None else name
    layers = _prompt_layers(model, name)
    if len(layers) != 1:
        raise ValueError(f"prompt adapter {name!r} sits on {[w for w, _ in layers]}; PEFT's format holds one prompt")
    where, layer = layers[0]
    prompt, config = layer.prompts[name], layer.configs[name]
    _check_default_place(model, name, where, layer, config)
    cfg = getattr(model, "config", None)
    tokenizer = config.tokenizer
    tokenizer = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
    init = INITS[config.init] if config.init != "text" or tokenizer else "RANDOM"  # PEFT's TEXT needs a tokenizer name
    peft_config = {
        "peft_type": PEFT_TYPE, "task_type": task_type(model), "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1], "num_transformer_submodules": 1,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "prompt_tuning_init": init, "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
        "tokenizer_name_or_path": tokenizer if init == "TEXT" else None, "tokenizer_kwargs": None,
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None, "revision": None,
        "inference_mode": True, "modules_to_save": None,
    }
    # See Note: saving from several ranks (lowrank/distributed.py): an FSDP2-sharded prompt is gathered first
    tensors = {KEY: distributed.full_tensor(prompt.detach()).float().cpu().contiguous()}
    save_head(model, peft_config["task_type"], tensors, peft_config)
    io_embeddings.save_embeddings(model, [], tensors, "base_model.")  # See Note: embeddings in an adapter file
    return tensors, peft_config


def _check_default_place(model: nn.Module, name: str, where: str, layer: PromptLayer, config: PromptConfig) -> None:
    """The file names no module: PEFT and load_adapter put its prompt where PromptConfig's default
    targets do (the input embedding, or the first nn.TransformerEncoder). A prompt elsewhere
    (targets=) would load there and compute something else, so it is refused at save."""
    try:
        default = default_targets(model, config)[0]
    except ValueError:  # no embedding and no encoder: load_adapter would have nowhere to put it
        default = None
    if default is None or not default(where, innermost(layer)):
        place = [w for _, _, w, m in _walk(model) if default is not None and default(w, innermost(m))][:1]
        raise ValueError(f"prompt adapter {name!r} sits on {where!r}, but PEFT's format names no module: load_adapter "
                         f"puts a prompt where PromptConfig's default targets do ({place[0] if place else 'nowhere'!r} "
                         "here), where it would compute something else; inject it with the default targets to save "
                         "it in this format, or keep its state_dict")


def load(model: nn.Module, path: pathlib.Path, peft_config: dict, name: str, strict: bool, allow_pickle: bool,
         dtype=None):
    """Inject prompt adapter `name` and load its embeddings; on any error the model is as before."""
    from .io import LoadResult, copy_checked, read_weights, undo_on_error  # io imports this module first

    n = virtual_tokens(peft_config, path / "adapter_config.json", "prompt")
    weights = read_weights(path, allow_pickle)
    with undo_on_error(model, name):  # See Note: a failed load changes nothing (lowrank/io.py)
        modules = inject(model, PromptConfig(num_virtual_tokens=n), name, dtype=dtype)
        (where, layer), = _prompt_layers(model, name)
        param = layer.prompts[name]
        missing = [] if KEY in weights else [KEY]
        pairs, base, unexpected, mismatched = load_head(model, peft_config, weights)
        mismatched += [(KEY, tuple(weights[KEY].shape), tuple(param.shape))] \
            if KEY in weights and weights[KEY].shape != param.shape else []
        result = LoadResult(modules, missing, unexpected, mismatched, base)
        pairs += [(param, weights[KEY])] if KEY in weights else []
        # a prompt adapter is its one tensor: without it there is nothing to load, strict or not
        copy_checked(model, f"{path}: the prompt adapter", pairs, result, strict or bool(missing))
    return result


def refuse_tied_saved(model: nn.Module, saved, source) -> None:
    """PEFT trains a copy of a modules_to_save module, so a weight tied to one outside it (a tied
    lm_head and embed_tokens) is untied there; loaded into the shared weight, it would change both."""
    from .quant.quantize import weight_owners

    owners = weight_owners(model)  # every module that registers a weight: two mean a tie (two saved ones too)
    tied = sorted({n for p in saved_parameters(model, saved, "").values() for n, _ in owners[id(p)]
                   if len(owners[id(p)]) > 1})
    if tied:
        raise NotImplementedError(f"{source}: modules_to_save={saved!r} names weights tied to {tied}; PEFT trains an "
                                  "untied copy of such a module, which lowrank.load_adapter does not reproduce")


def virtual_tokens(peft_config: dict, source: str, kind: str) -> int:
    """num_virtual_tokens of a PEFT prompt / prefix config (`kind`), after refusing what lowrank
    does not load: encoder-decoder adapters (several transformer submodules), modules_to_save."""
    subs = peft_config.get("num_transformer_submodules") or 1
    if subs != 1:
        raise NotImplementedError(f"{source}: num_transformer_submodules={subs} (an encoder-decoder {kind}); "
                                  f"lowrank loads {kind} adapters of decoder-only and encoder-only models")
    # a task's own head (SEQ_CLS, ...) loads as a base weight (Note: task heads)
    if not set(peft_config.get("modules_to_save") or ()) <= set(HEADS.get(peft_config.get("task_type"), ())):
        raise NotImplementedError(f"{source}: modules_to_save={peft_config['modules_to_save']!r} is not supported")
    n = peft_config.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{source}: num_virtual_tokens must be an integer >= 1 in a {kind} config; got {n!r}")
    return n
