"""The model's embedding weights in a LoRA adapter file, where PEFT's format carries them.

# Note: embeddings in an adapter file. PEFT's save (save_embedding_layers="auto", its default,
# peft/utils/save_and_load.py) adds the base model's own embedding weights to an adapter file in
# two cases, and save_adapter does as it does:
#   - the adapter adapts the input or output embedding (LoRA on embed_tokens or lm_head): that
#     module's base weight (and bias, if any), as "<module>.base_layer.weight". Its rows for
#     tokens added to the vocabulary exist only in the model being trained, so a file without
#     them loads onto a base that lacks them. (PEFT goes by the names "embed_tokens" and "lm_head" in target_modules;
#     lowrank by what get_input_embeddings / get_output_embeddings return, so GPT-2's adapted
#     `wte` is saved too, where PEFT's file would lack it. PEFT loads the key into the base.)
#   - when no adapted embedding is named "embed_tokens" or "lm_head" (PEFT's test), and the
#     vocabulary was resized: model.config.vocab_size differs from the vocab_size of the
#     config.json in the directory the model came from (config._name_or_path). Then the input and
#     output embeddings' weights (and biases: BERT's MLM decoder's), as "<module>.weight", but for
#     an embedding adapted under another name (GPT-NeoX's embed_in), saved as above: its untied
#     output head's new rows were otherwise lost, where PEFT's file has them.
#     PEFT also asks the Hub when that name is not a local directory; lowrank reads only a local
#     directory (no network on save).
# load_adapter loads such keys into the base model (lowrank/io.py, Note: base weights in an
# adapter file). A weight that is not a plain floating tensor (a 4-bit output head) is left out,
# as PEFT leaves out a base layer that is not nn.Linear / nn.Embedding.
"""

from __future__ import annotations

import json
import logging
import pathlib

import torch
from torch import nn

from . import distributed
from .walk import _unwrap, _walk

log = logging.getLogger("lowrank")
PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES


def _embeddings(model: nn.Module) -> list[nn.Module]:
    """The model's input and output embedding modules, each inside its adapter layers (if any)."""
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        method = getattr(type(model), getter, None)
        try:
            module = getattr(model, getter)() if callable(method) else None
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module):
            out.append(_unwrap(module))
    return out


def base_vocab_size(model: nn.Module) -> int | None:
    """vocab_size of the config.json in the local directory the model was loaded from, else None
    (where: what from_pretrained set, as PEFT reads it, else the config's name)."""
    where = model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not where or not isinstance(where, str):
        return None
    try:
        text = (pathlib.Path(where) / "config.json").read_text()
        cfg = json.loads(text)
    except (OSError, ValueError):  # not a local directory (a Hub name), or no readable config in it
        return None
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size")) if isinstance(cfg, dict) else None
    return size if isinstance(size, int) else None


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters by name (an output head's bias too: PEFT saves every tensor under
    the module's name, and a resize gives the bias a row per token), {} when its weight is not a
    plain floating matrix."""
    w = getattr(module, "weight", None)
    if not (isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2):
        return {}
    return {n: p for n, p in module.named_parameters(recurse=False) if p.is_floating_point()}


def _names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its name as save and load see it: adapter layers see-through."""
    names = {}
    for _, _, where, child in _walk(model):
        names.setdefault(id(_unwrap(child)), where)
    return names


def embedding_parameters(model: nn.Module, prefix: str, skip=frozenset()) -> dict[str, torch.Tensor]:
    """`prefix` + name -> parameter, for the model's input and output embeddings' own parameters
    (but those of modules whose id is in `skip`): the keys a resized vocabulary adds to PEFT's file
    (a prompt / prefix file's, prefix "base_model.")."""
    names = _names(model)
    return {f"{prefix}{names[id(e)]}.{n}": p for e in _embeddings(model) if id(e) in names and id(e) not in skip
            for n, p in _own_tensors(e).items()}


def save_embeddings(model: nn.Module, layers, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Add to `tensors` the embedding weights PEFT's file would hold (See Note: embeddings in an
    adapter file); `layers` are the adapter's (target, PEFT key, LoRA layer) triples (none for a
    prompt or prefix adapter, whose file PEFT gives the embeddings of a resized vocabulary too)."""
    embeddings = _embeddings(model)
    if not embeddings:
        return
    found, adapted, by_name = {}, set(), False
    for _, key, layer in layers:  # adapted embeddings: their base tensors under PEFT's base_layer name
        base = _unwrap(layer)
        if any(base is e for e in embeddings):
            found |= {f"{prefix}{key}.base_layer.{n}": w for n, w in _own_tensors(base).items()}
            adapted.add(id(base))
            by_name |= key.rsplit(".", 1)[-1] in PEFT_EMBEDDING_NAMES
    # PEFT takes an adapted embedding as targeted by its name only: one named otherwise (GPT-NeoX's
    # embed_in, GPT-2's wte) leaves PEFT's resized-vocabulary rule on, which saves the other
    # embedding too (an untied output head's new rows, else lost)
    if not by_name:
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        before = base_vocab_size(model)
        if isinstance(size, int) and before is not None and size != before:
            found |= embedding_parameters(model, prefix, skip=adapted)
            log.info("lowrank: save_adapter adds the embedding weights %s: the vocabulary was resized from %d to %d",
                     sorted(found), before, size)
    # a tied output head shares its tensor with the input embedding: safetensors takes no aliases
    tensors.update({k: distributed.full_tensor(w.detach()).cpu().clone() for k, w in found.items()})


def trained_rows(model: nn.Module, shapes) -> int | None:
    """The number of rows a file's embedding tensors have where it differs from the model's (an
    adapter trained after resize_token_embeddings: PEFT's and save_adapter's files then hold the
    embeddings), from `shapes` {file key: shape}; None where none differs or they disagree."""
    own = embedding_parameters(model, "")
    rows = set()
    for key, shape in shapes.items():
        plain = key.replace(".base_layer.", ".")
        p = next((p for n, p in own.items() if plain == n or plain.endswith("." + n)), None)
        if p is not None and len(shape) == p.dim() and tuple(shape[1:]) == tuple(p.shape[1:]) and shape[0] != p.shape[0]:
            rows.add(shape[0])
    return rows.pop() if len(rows) == 1 else None


def rows_not_held(model: nn.Module, shapes, rows: int) -> list[str]:
    """The names of the model's embedding parameters (a tied one under its first name) for which
    `shapes` {file key: shape} holds no tensor of `rows` rows: PEFT's file of an adapter that adapts
    one embedding by name holds that one's base weight only (Note: embeddings in an adapter file),
    so an untied other's new rows are in no file, trained_rows' resize leaves them untrained."""
    own, held = embedding_parameters(model, ""), set()
    for key, shape in shapes.items():
        plain = key.replace(".base_layer.", ".")
        held |= {id(p) for n, p in own.items() if (plain == n or plain.endswith("." + n)) and shape[0] == rows}
    first = {id(p): n for n, p in reversed(own.items())}  # a tied weight's first name
    return sorted(n for i, n in first.items() if i not in held)


def resize_hint(model: nn.Module, mismatched) -> str:
    """For a load's shape mismatches (key, file shape, model shape): where an embedding's rows differ
    (trained_rows), what to call first; else ""."""
    rows = trained_rows(model, {k: f for k, f, _ in mismatched})
    if rows is None:
        return ""
    return (f" (the file's embeddings have {rows} rows: the adapter was trained with a resized vocabulary; "
            f"call model.resize_token_embeddings({rows}) before loading it)")
