"""Save and load LoRA adapters in PEFT's on-disk format (see docs/io.md).

A directory holds `adapter_config.json` (PEFT's LoraConfig fields, peft_type "LORA") and
`adapter_model.safetensors` whose keys are PEFT's: `base_model.model.<module>.lora_A.weight`,
`...lora_B.weight`, DoRA's `...lora_magnitude_vector`, an embedding's `...lora_embedding_A`
/ `...lora_embedding_B`; no adapter name. Module names are the model's own (our wrapper's
`base` is invisible in them, as PEFT's `base_layer` is). PEFT 0.21's
`PeftModel.from_pretrained(base, path)` loads what `save_adapter` writes, and `load_adapter`
loads what PEFT's `save_pretrained` writes. Prefix adapters (PEFT's PREFIX_TUNING) are
written and read by lowrank/io_prefix.py; save_adapter and load_adapter dispatch to it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import warnings

import torch
from torch import nn

from . import distributed, io_embeddings, io_moe, io_prefix, io_prompt, shards
from .config import LoraConfig
from .inject import active_adapters, adapter_names, eject, inject, plain_parameters, set_active
from .inject_warnings import UnmatchedPatternWarning
from .io_names import (_lora_layers, _tensors, check_base, from_peft_parameters, from_peft_pattern, from_peft_targets,
                       renamed, to_peft_parameters, to_peft_pattern, to_peft_targets, warn_padding)
from .targets import first_match, task_type
from .tuners.lora_param import LoraParameter
from .walk import _module, _unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# PEFT LoraConfig fields we cannot honour: loading refuses a config that sets any of them.
_UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None, "bias": "none",
                "lora_bias": False, "use_qalora": False, "trainable_token_indices": None,
                "layer_replication": None, "alora_invocation_tokens": None, "use_bdlora": None,
                "arrow_config": None, "kasa_config": None, "monteclora_config": None, "ensure_weight_tying": False}

_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")  # inits that leave the base weights alone


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What load_adapter matched: full saved key names (with PEFT's prefix)."""

    modules: list[str]  # the modules that got the adapter
    missing: list[str]  # keys the injected modules need but the file lacks
    unexpected: list[str]  # keys in the file that no injected module takes
    mismatched: list[tuple[str, tuple, tuple]]  # (key, shape in file, shape in model)
    base: list[str] = dataclasses.field(default_factory=list)  # base-model weights the file carried, loaded


# Note: base weights in an adapter file. PEFT saves a targeted embedding's (or output head's)
# own weight beside its adapter (`save_embedding_layers="auto"`: the vocabulary may have been
# resized), as `<module>.base_layer.weight`, and loads it into the base model. load_adapter
# does the same for any key that names a parameter of the model (by the names it had before
# inject, `.base_layer` dropped: the module may be wrapped by this adapter, by another or not at
# all, and a tied weight answers to each of its names), lists it in LoadResult.base, and does
# not undo it on eject. A file's modules_to_save (PEFT trains and saves such modules whole: a
# classifier's head) load the same way; each parameter of a module they name that the file lacks
# is a missing key. save_adapter writes adapter weights, and the head of a classifier, token
# classifier or question answerer (io_prompt.py, Note: task heads) unless LoRA adapts it.


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def adapter_state(model: nn.Module, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT-keyed tensors, PEFT adapter_config dict) for LoRA adapter `name` of `model`
    (a prompt adapter: lowrank.io_prompt)."""
    if io_prompt.holds_prompt(model, name):
        return io_prompt.adapter_state(model, name)
    if name is None:
        name = only_name([n for n in adapter_names(model) if _lora_layers(model, n)], "LoRA adapters")
    layers = _lora_layers(model, name)
    if not layers:
        raise ValueError(f"the model has no LoRA adapter named {name!r}; it has {adapter_names(model)}")
    configs = {id(layer.configs[name]): layer.configs[name] for _, _, layer in layers}.values()
    params = [w for w, _, layer in layers if isinstance(layer, LoraParameter)]
    modules = [w for w, _, layer in layers if not isinstance(layer, LoraParameter)]
    for field in ("rslora", "dora", "dropout"):
        if len({getattr(c, field) for c in configs}) > 1:
            raise ValueError(f"adapter {name!r} was injected with differing {field} values; PEFT's format holds one")
    config = next(iter(configs))
    tensors, ranks, alphas = {}, {}, {}
    for where, key, layer in layers:
        for suffix, t in _tensors(layer, name).items():
            # See Note: saving from several ranks (lowrank/distributed.py)
            tensors[f"{PREFIX}{key}.{suffix}"] = distributed.full_tensor(t.detach()).cpu().contiguous()
        c = layer.configs[name]
        ranks[where] = layer.r[name]
        alphas[where] = first_match(c.alpha_pattern, where, _unwrap(layer), c.alpha)
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    cfg = getattr(model, "config", None)
    peft_config = {
        # a causal LM's file names its task, so PEFT's AutoPeftModelForCausalLM loads it; a classifier's or
        # question answerer's names its task once its head is in (below); other models': no task
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if task_type(model) == "CAUSAL_LM" else None,
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "r": r, "lora_alpha": _number(alpha),
        "target_modules": to_peft_targets(model, modules) if modules else [],  # PEFT reads None as its defaults
        "target_parameters": to_peft_parameters(model, params) if params else None,
        "exclude_modules": None, "lora_dropout": float(config.dropout), "use_rslora": config.rslora,
        "use_dora": config.dora, "fan_in_fan_out": any(layer.transposed for _, _, layer in layers),
        "rank_pattern": to_peft_pattern({w: v for w, v in ranks.items() if v != r}, list(ranks)),
        "alpha_pattern": to_peft_pattern({w: _number(v) for w, v in alphas.items() if v != alpha}, list(alphas)),
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    task = task_type(model)  # See Note: task heads (lowrank/io_prompt.py): PEFT's file of the task has it
    head = io_prompt.head_parameters(model, task, PREFIX)
    adapted = sorted({w for k in head for w in ranks if k[len(PREFIX):].startswith(w + ".")})
    if head and not adapted:
        peft_config["task_type"] = task
        io_prompt.save_head(model, task, tensors, peft_config, PREFIX)
    elif adapted:  # PEFT's format saves a task head whole (modules_to_save) or adapts it, not both
        warnings.warn(f"LoRA adapts {adapted} of {type(model).__name__}'s task head, so the head's own weights are "
                      "not saved: a model loaded from this file has its base model's head there (target other "
                      "modules to have the head saved whole)", stacklevel=3)
    io_prompt.save_loaded_modules(model, name, config, tensors, peft_config, PREFIX)  # those a PEFT file had
    io_embeddings.save_embeddings(model, layers, tensors, PREFIX)  # See Note: embeddings in an adapter file
    warn_padding(model, name, f"save_adapter of {name!r}")
    return tensors, peft_config


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> pathlib.Path:
    """Write LoRA adapter `name` (None: the model's only LoRA adapter) of `model` to directory
    `path` in PEFT's format: adapter weights, and the model's embedding weights where PEFT's save
    adds them (Note: embeddings in an adapter file, lowrank/io_embeddings.py). Atomic: the directory is built and fsynced
    under a temporary name beside `path`, then swapped in whole (Note: atomic directories, in
    lowrank/shards.py), so a failure or a kill leaves the previous adapter at `path` as it was;
    other files in an existing directory are kept.
    Under torch.distributed only rank 0 writes; under FSDP2 every rank must call it (see
    Note: saving from several ranks, in lowrank/distributed.py). A prompt adapter is written
    in PEFT's PROMPT_TUNING format (lowrank/io_prompt.py), a prefix adapter in its PREFIX_TUNING
    format (lowrank/io_prefix.py), a bottleneck adapter in our own
    (lowrank/bottleneck_io.py)."""
    from . import bottleneck_io

    model = distributed.unwrap(_module(model, "save_adapter"))  # DDP's `module.`, torch.compile's `_orig_mod.`
    path = _path(path)
    distributed.reshard(model)  # See Note: unsharded after a forward (lowrank/distributed.py)
    if not adapter_names(model):
        raise ValueError(f"{type(model).__name__} has no adapters to save; add one with lowrank.inject or load_adapter")
    if name is None and len(adapter_names(model)) > 1:
        raise ValueError(f"the model has adapters {adapter_names(model)}; pass name= to say which to save")
    if bottleneck_io.is_bottleneck(model, name):
        tensors, config = bottleneck_io.adapter_state(model, name)
    elif io_prefix.has_prefix(model, name):  # PEFT's PREFIX_TUNING format (lowrank/io_prefix.py)
        tensors, config = io_prefix.adapter_state(model, name)
    else:
        tensors, config = adapter_state(model, name)
    sharded = distributed.any_sharded(model.parameters())  # FSDP2: every rank is here, waiting for rank 0
    distributed.on_main(lambda: _write_adapter(path, tensors, config), collective=sharded)
    return path


def _path(path, what: str = "a directory") -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be {what}, a str or os.PathLike; got {type(path).__name__} {path!r:.80}")
    return pathlib.Path(path)


def _write_adapter(path: pathlib.Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    # See Note: atomic directories (lowrank/shards.py); other files in the directory are kept
    with shards.atomic_directory(path, overwrite=True, carry_over=True) as tmp:
        # an older pickle of the weights (PEFT's safe_serialization=False) would be carried over beside the new
        # config: stale weights that a .bin reader (older PEFT, torch.load) takes for this adapter's
        (tmp / PICKLE_NAME).unlink(missing_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # carried over as hard links to the old files: new files, not
            (tmp / name).unlink(missing_ok=True)  # writes into those (they would change the old directory too)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(text)


# -- loading ------------------------------------------------------------------------------
def config_from_peft(peft_config: dict, source: str = "adapter_config.json") -> LoraConfig:
    """Our LoraConfig for a PEFT LoRA adapter_config dict; refuses what we cannot reproduce."""
    kind = peft_config.get("peft_type")
    if kind != "LORA":
        raise ValueError(f"{source}: peft_type is {kind!r}; lowrank.load_adapter reads LoRA ('LORA'), prompt-tuning "
                         "('PROMPT_TUNING'), prefix-tuning ('PREFIX_TUNING') and lowrank's bottleneck "
                         "('LOWRANK_BOTTLENECK') adapters")
    for field, default in _UNSUPPORTED.items():
        value = peft_config.get(field, default)
        if value not in (default, None, False, [], {}) and value != default:
            raise NotImplementedError(f"{source}: {field}={value!r} is not supported by lowrank.load_adapter")
    init = peft_config.get("init_lora_weights", True)
    if init not in _SAFE_INITS:  # PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA rewrite the base weights too
        raise NotImplementedError(f"{source}: init_lora_weights={init!r} changes the base model's weights, which "
                                  "lowrank.load_adapter does not reproduce; convert the adapter to plain LoRA first")
    if not peft_config.get("target_modules") and not peft_config.get("target_parameters"):
        raise ValueError(f"{source}: target_modules and target_parameters are empty; nothing to inject")
    saved = peft_config.get("modules_to_save")  # loaded as base weights: Note: base weights in an adapter file
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(n, str) and n for n in saved)):
        raise ValueError(f"{source}: modules_to_save must be a list of module names or null; got {saved!r}")

    try:  # LoraConfig checks each field's type and range; the file is named here (no int() or bool() on the way)
        return LoraConfig(r=peft_config.get("r", 8), alpha=peft_config.get("lora_alpha", 8),
                          dropout=peft_config.get("lora_dropout") or 0.0,
                          targets=from_peft_targets(peft_config.get("target_modules") or None),
                          parameters=from_peft_parameters(peft_config.get("target_parameters")),
                          # PEFT puts no LoRA in a module it saves whole (modules_to_save), nor inside one
                          exclude=(from_peft_targets(peft_config.get("exclude_modules")) or [])
                          + [rf"re:.*{re.escape(n)}(\..*)?" for n in saved or ()],
                          rslora=peft_config.get("use_rslora") or False, dora=peft_config.get("use_dora") or False,
                          rank_pattern=from_peft_pattern(peft_config.get("rank_pattern")),
                          alpha_pattern=from_peft_pattern(peft_config.get("alpha_pattern"), "alpha_pattern"))
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{source}: not a LoRA config lowrank can read: {e}") from e


def read_weights(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory: adapter_model.safetensors; adapter_model.bin only
    with allow_pickle=True (a pickle can run code; even then torch.load(weights_only=True))."""
    path = pathlib.Path(path)
    st, pkl = path / WEIGHTS_NAME, path / PICKLE_NAME
    if st.exists():
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except Exception as e:  # safetensors' own error types vary by version
            raise ValueError(f"{st}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    if pkl.exists():
        if not allow_pickle:
            raise ValueError(f"{pkl} is a pickle file, which can execute code when loaded; lowrank reads "
                             f"safetensors only unless you pass allow_pickle=True (if you trust its source)")
        try:
            return torch.load(pkl, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{pkl}: could not be read as a weights-only torch file: {e}") from e
    # a hub repo of an older PEFT holds only the pickle, which load_adapter fetches only with allow_pickle
    hint = "" if allow_pickle else f"; a hub repo's {PICKLE_NAME} (a pickle) is fetched only with allow_pickle=True"
    raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (nor {PICKLE_NAME}{hint})")


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *, revision: str | None = None,
                 strict: bool = True, allow_pickle: bool = False, allow_other_base: bool = False,
                 local_files_only: bool | None = None, token: str | None = None,
                 dtype: torch.dtype | None = None) -> LoadResult:
    """Inject LoRA adapter `name` into `model` as the PEFT (or lowrank) directory `path` says
    (targets, r, alpha, rsLoRA, DoRA, patterns) and load its weights (and any base-model
    weights the file carries, as PEFT does: see Note: base weights in an adapter file). Shape mismatches always
    raise; missing / unexpected keys raise when `strict` (else they are returned). On any error
    the adapter is ejected again and the model is as before.

    `path` may be a hub repo id ("owner/name", at `revision`): only the adapter files are
    fetched, through huggingface_hub's cache (HF_HUB_OFFLINE=1 or local_files_only: the cache
    only). An adapter whose config names another base model than `model.config._name_or_path`
    is refused unless allow_other_base. lowrank's own bottleneck format loads too
    (lowrank/bottleneck_io.py). `dtype` is inject's: the adapter's parameters' dtype (None: its
    modules'), so float32 weights load into float32 adapters on a bf16 model unrounded."""
    from . import hub

    _module(model, "load_adapter")  # arguments swapped, or a state dict: said so, not "'str' object has no attribute"
    _path(path, "a directory or a hub repo id ('owner/name')")
    for flag, value in (("strict", strict), ("allow_pickle", allow_pickle), ("allow_other_base", allow_other_base)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool (True or False); got {value!r}")
    if type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper: the file names the model inside, as
        model = model._orig_mod  # save_adapter writes them (it calls the model inside, which now holds the adapter)
    extra = ("adapter_model.bin",) if allow_pickle else ()
    path = hub.resolve(path, revision=revision, local_files_only=local_files_only, token=token,
                       files=hub.ADAPTER_FILES + extra)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        # PEFT's save_pretrained writes an adapter not named "default" into <dir>/<its name>: point there
        inside = sorted(str(c.parent) for c in path.glob(f"*/{CONFIG_NAME}"))
        hint = (f"; {inside[:4]} hold adapters (PEFT saves an adapter not named 'default' in a subdirectory of its "
                "name): pass one of those" if inside else "")
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not an adapter directory{hint}")
    try:
        peft_config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON: {e}") from e
    if not isinstance(peft_config, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(peft_config).__name__}")
    check_base(peft_config, model, str(cfg_file), allow_other_base)
    from . import bottleneck_io

    if peft_config.get("peft_type") == bottleneck_io.PEFT_TYPE:
        return bottleneck_io.load(model, path, peft_config, name, strict=strict, allow_pickle=allow_pickle, dtype=dtype)
    if peft_config.get("peft_type") == io_prompt.PEFT_TYPE:
        return io_prompt.load(model, path, peft_config, name, strict, allow_pickle, dtype)
    if peft_config.get("peft_type") == io_prefix.PEFT_TYPE:
        return io_prefix.load(model, peft_config, read_weights(path, allow_pickle), name, str(cfg_file), LoadResult,
                              dtype, strict)
    weights = read_weights(path, allow_pickle)
    velora = peft_config.get("velora_config")  # VeLoRA computes as LoRA; its projection only compresses the backward's x
    weights = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in weights.items()
               if not (velora and k.endswith(".lora_velora_embed"))}
    peft_config, weights = io_moe.convert(model, peft_config, weights)  # a transformers 4 MoE adapter on a 5 model
    config = config_from_peft(peft_config, str(cfg_file))
    io_prompt.refuse_tied_saved(model, peft_config.get("modules_to_save"), cfg_file)
    for k in [k for k in weights if k.endswith(".lora_magnitude_vector.weight")]:  # older PEFT spelling
        weights[k.removesuffix(".weight")] = weights.pop(k)
    with undo_on_error(model, name):  # See Note: a failed load changes nothing
        try:
            with warnings.catch_warnings():  # PEFT's keys as ours: See Note: pattern keys that match nothing
                warnings.simplefilter("ignore", UnmatchedPatternWarning)
                modules = inject(model, config, name, dtype=dtype)
        except (ValueError, TypeError) as e:  # what the file asks that this model or lowrank cannot take, named
            raise type(e)(f"{cfg_file}: cannot load this adapter: {e}") from e
        seen, missing, mismatched, pairs = set(), [], [], []
        for _, where, layer in _lora_layers(model, name):
            for suffix, param in _tensors(layer, name).items():
                key = f"{where}.{suffix}"
                if key not in weights:
                    missing.append(PREFIX + key)
                    continue
                seen.add(key)
                if tuple(weights[key].shape) != tuple(param.shape):
                    mismatched.append((PREFIX + key, tuple(weights[key].shape), tuple(param.shape)))
                pairs.append((param, weights[key]))
        # See Note: base weights in an adapter file.
        params = dict(plain_parameters(model))  # a tied weight under each name (GPT-2's lm_head)
        base_keys = []
        for k in [k for k in weights if k not in seen]:
            param = params.get(k.replace(".base_layer.", "."))  # wrapped here or not
            if param is None:
                continue
            seen.add(k)
            base_keys.append(PREFIX + k)
            if tuple(weights[k].shape) != tuple(param.shape):
                mismatched.append((PREFIX + k, tuple(weights[k].shape), tuple(param.shape)))
            pairs.append((param, weights[k]))
        unexpected = sorted(PREFIX + k for k in weights if k not in seen)
        # modules_to_save (a task's head): the file holds each such module's whole state, as PEFT saves it
        missing += [k for k in io_prompt.saved_parameters(model, peft_config.get("modules_to_save"), PREFIX)
                    if k[len(PREFIX):] not in weights]
        result = LoadResult(modules, sorted(missing), unexpected, mismatched, sorted(base_keys))
        copy_checked(model, f"{path}: the adapter", pairs, result, strict)
    io_prompt.remember_saved(model, name, config, peft_config.get("modules_to_save"), result.base)  # to write back
    warn_padding(model, name, str(cfg_file))
    return result


def only_name(names: list[str], what: str) -> str:
    """The one name in `names` (a save without name=); a ValueError naming them otherwise."""
    if len(names) != 1:
        raise ValueError(f"the model has {what} {names}; pass name= to say which to save")
    return names[0]


def copy_checked(model: nn.Module, what: str, pairs, result: LoadResult, strict: bool) -> None:
    """Copy each (parameter, saved tensor) of `pairs`, or raise naming every shape mismatch and,
    when `strict`, every missing and unexpected key of `result` (nothing copied then)."""
    problems = [f"shape mismatches (key, file, model): {result.mismatched}"
                + io_embeddings.resize_hint(model, result.mismatched)] if result.mismatched else []
    problems += [f"missing keys: {result.missing}"] if strict and result.missing else []
    problems += [f"unexpected keys: {result.unexpected}" + renamed(result.missing, result.unexpected, PREFIX)
                 ] if strict and result.unexpected else []  # a hint where they differ by a leading module path
    if problems:
        raise ValueError(f"{what} does not fit {type(model).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)


# Note: a failed load changes nothing. A load injects its adapter, then checks and copies the
# file's tensors; on any error between (a shape that does not fit, a missing key, an interrupt)
# the adapter goes out again, the adapters active before are active again, and every parameter
# requires grad as before (inject's mark_trainable froze the other adapters and any head the
# user had unfrozen). copy_checked checks every tensor, base weights included, before it copies any.
@contextlib.contextmanager
def undo_on_error(model: nn.Module, name: str):
    """`with undo_on_error(model, name): <inject adapter name and load it>` (See Note: a failed load changes nothing)."""
    before, existed = active_adapters(model), name in adapter_names(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        if existed:  # inject refused the name: the adapter there is the user's, and nothing changed
            raise
        if name in adapter_names(model):
            with warnings.catch_warnings():  # which adapter eject makes active is put right just below
                warnings.simplefilter("ignore")
                eject(model, name)
        if active_adapters(model) != before:
            set_active(model, before)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
