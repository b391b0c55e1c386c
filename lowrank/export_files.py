"""The files beside an export's weights: config.json and generation_config.json, the model's own
code (trust_remote_code), the tokenizer's files (and its own code), and files the caller adds.
merge_and_export (lowrank/export.py) and save_quantized (lowrank/checkpoint.py) write them into
the temporary directory that becomes the export, so they appear with the weights or not at all."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil

from torch import nn

from . import shards
from .quant.linear4bit import _WEIGHT_KEYS
from .quant.nf4_weight import BNB_QUANT_STATE_KEY

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")



def _quant_state(key: str, state: dict) -> bool:
    """Whether `key` is one of a 4-bit weight's quant-state tensors (absmax, quant_map, nested_*)."""
    return any(key.endswith(s) and f"{key[:-len(s)]}.{BNB_QUANT_STATE_KEY}" in state for s in _WEIGHT_KEYS[1:-1])


def write_config(model: nn.Module, directory: pathlib.Path, dtype, quant_config: dict | None, state) -> None:
    """config.json (a copy of model.config: dtype set, quantization_config as exported) and
    generation_config.json, when the model has them (a transformers model)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        return
    cfg = copy.deepcopy(cfg)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    # the model's own tensors decide, not the float32 quant-state tensors beside each 4-bit weight (a bf16
    # model's config said float32, and transformers then loaded its biases in float32 beside bf16 weights)
    floats = [t.dtype for k, t in state.items() if t.is_floating_point() and not _quant_state(k, state)]
    written = dtype or (max(set(floats), key=floats.count) if floats else None)
    if written is not None:
        cfg.dtype = written
    if quant_config:
        cfg.quantization_config = quant_config
    if hasattr(model, "get_output_embeddings"):  # a transformers model: its class, as save_pretrained writes it (a
        cfg.architectures = [type(model).__name__]  # classifier loaded from a causal LM's directory said ...ForCausalLM)
    if callable(getattr(model, "is_remote_code", None)) and model.is_remote_code():  # trust_remote_code: the modeling
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, directory, config=cfg)  # file auto_map names, as save_pretrained copies it
    cfg.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(directory)


def check_tokenizer(tokenizer) -> None:
    """Before anything is written: None (the base's files are copied) or an object that saves itself."""
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must be None (the base's files are copied) or have save_pretrained; got {tokenizer!r:.80}")


def write_tokenizer(model: nn.Module, directory: pathlib.Path, tokenizer) -> None:
    """`tokenizer.save_pretrained`, or the tokenizer files of the base model's own directory
    (model.config._name_or_path) copied, with the code files its auto_map names (a tokenizer
    loaded with trust_remote_code: InternLM's tokenization_internlm.py)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
        return
    source, names = _base_tokenizer_files(model)
    for name in names:
        if not (directory / name).exists():  # the model's code is copied already
            shutil.copyfile(source / name, directory / name)


def _base_tokenizer_files(model: nn.Module) -> tuple[pathlib.Path | None, list[str]]:
    """The base model's own directory (model.config._name_or_path) and the tokenizer files it holds,
    with the code files its auto_map names; (None, []) without one."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not source or not os.path.isdir(source):
        return None, []
    source = pathlib.Path(source)
    return source, [n for n in TOKENIZER_FILES + _tokenizer_code(source) if (source / n).is_file()]


def _tokenizer_code(source: pathlib.Path) -> tuple[str, ...]:
    """The .py files tokenizer_config.json's auto_map names: {"AutoTokenizer": ["module.Class",
    "module.FastClass" or null]} (or, in the old format, that list alone), a class of another repo written
    "owner/repo--module.Class" (its code is not here: none copied)."""
    try:
        auto = json.loads((source / "tokenizer_config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return ()
    if isinstance(auto, list):  # the old format, [slow, fast], which transformers still reads as AutoTokenizer's
        auto = {"AutoTokenizer": auto}
    if not isinstance(auto, dict):
        return ()
    refs = [r for v in auto.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str) and "." in r]
    files = {r.rsplit(".", 1)[0] + ".py" for r in refs if "--" not in r}
    files = {f for f in files if "/" not in f and "\\" not in f}  # a module of this directory, no path
    return tuple(sorted(files | _imported_code(source, files)))


def _imported_code(source: pathlib.Path, files: set[str]) -> set[str]:
    """The .py files of `source` that `files` import relatively (`from .configuration_x import ...`), and
    those they import, as transformers fetches them for trust_remote_code: without them the copied
    tokenizer code cannot be imported."""
    try:
        from transformers.dynamic_module_utils import get_relative_imports
    except ImportError:  # without transformers there is no AutoTokenizer to read the auto_map either
        return set()
    # transformers' get_relative_import_files, but a module that is not here (an optional import in a
    # try block, `from ..x`, a package) or a file it cannot read is skipped: it raised, failing the export
    found, todo = set(), [f for f in files if (source / f).is_file()]
    while todo:
        try:
            modules = get_relative_imports(source / todo.pop())
        except (OSError, UnicodeDecodeError):
            continue
        for name in (f"{m}.py" for m in modules):
            if name not in found and "/" not in name and (source / name).is_file():
                found.add(name)
                todo.append(name)
    return found


def written(model: nn.Module, tokenizer) -> set[str]:
    """The names an export of `model` writes beside its weight files, as known before writing: the index,
    the config files when the model has them (write_config), the tokenizer files it saves or copies
    (write_tokenizer: a given tokenizer may save any of them; else those in the base's directory)."""
    names = {shards.INDEX}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        names.add("config.json")
        if getattr(model, "generation_config", None) is not None:
            names.add("generation_config.json")
    return names | set(TOKENIZER_FILES if tokenizer is not None else _base_tokenizer_files(model)[1])


def check_extra_files(extra: dict | None, taken: set[str] = frozenset()) -> dict[str, pathlib.Path]:
    """{plain file name: existing file}, checked before anything is merged or written; `taken`: the names
    the export writes itself (written()), refused, as any .safetensors."""
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra_files must be a dict {{file name: source path}}; got {type(extra).__name__}")
    for name, source in extra.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
            raise ValueError(f"extra_files: a key is a plain file name for the export directory; got {name!r}")
        if not pathlib.Path(source).is_file():
            raise FileNotFoundError(f"extra_files[{name!r}]: no file at {source}")
        if name in taken or name.endswith(".safetensors"):  # known before any weight is merged
            raise ValueError(f"extra_files: {name!r} is a file the export itself writes; got {source}")
    return {name: pathlib.Path(source) for name, source in extra.items()}


def write_extra_files(directory: pathlib.Path, extra: dict[str, pathlib.Path]) -> None:
    for name, source in extra.items():
        if (directory / name).exists():
            raise ValueError(f"extra_files: {name!r} is a file the export itself writes; got {source}")
        shutil.copyfile(source, directory / name)
