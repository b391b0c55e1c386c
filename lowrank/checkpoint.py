"""4-bit checkpoints in the bitsandbytes / transformers format (docs/io.md).

A model quantized by `lowrank.quantize` already has the bitsandbytes 4-bit state-dict keys
(Linear4bit, lowrank/quant/nf4_weight.py). `save_quantized` writes that state dict as a
transformers model directory with `quantization_config` in config.json, which
`transformers.AutoModel*.from_pretrained` loads as a bitsandbytes 4-bit model;
`load_quantized` reads such a directory (ours, or one transformers + bitsandbytes wrote)
into a model built from its config: every linear layer with 4-bit entries in the
checkpoint becomes a Linear4bit holding exactly those codes and scales. 4-bit parameters (MoE
experts) are written and read too, in lowrank only (See Note: 4-bit parameters on disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import warnings

import torch
from torch import nn

from . import distributed, shards
from .export import quantization_config
from .export_files import write_config
from .quant import nf4
from .quant.linear4bit import Linear4bit
from .quant.nf4_weight import BNB_QUANT_STATE_KEY, NF4Weight
from .quant.params4bit import OWNER_KEYS, Weight4bit, check_owner, install, stored
from .quant.quantize import _can_quantize, bnb_kinds, fused_paths_off, tied_to, weight_owners
from .targets import is_gpt2_conv1d
from .tuners.base import TunerLayer
from .walk import _walk, plain_modules

_MARK = "." + BNB_QUANT_STATE_KEY  # the entry that says "the tensor at this key is 4-bit"


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, max_shard_size: int | str = "2GB", *,
                   overwrite: bool = False) -> list[str] | None:
    """Write a model quantized by lowrank.quantize (no adapters in it) as a bitsandbytes 4-bit
    transformers directory: safetensors shards, config.json with `quantization_config`,
    generation_config.json. 4-bit parameters (MoE experts) are written in 4 bits as well, which
    load_quantized reads and transformers refuses (See Note: 4-bit parameters on disk). Atomic
    (Note: atomic directories, lowrank/shards.py). Returns the weight files written. Under
    torch.distributed rank 0 writes (the others return None), from an unsharded model (DDP); an
    FSDP2-sharded one is refused."""
    model = distributed.unwrap(model)
    distributed.check_not_sharded(model, "save_quantized (a full model, gathered)")
    quantized = {n: m for n, m in plain_modules(model) if isinstance(m, Linear4bit)}  # names as state_dict()'s
    params4 = {n: m for n, m in plain_modules(model) if isinstance(m, Weight4bit)}  # See Note: 4-bit parameters on disk
    if any(isinstance(m, TunerLayer) for m in model.modules()):  # (requantize writes 4-bit layers, experts dense)
        merge = ", or fold them in with lowrank.merge_and_export(..., requantize=True)" if quantized else ""
        raise ValueError(f"the model has adapters; save them with lowrank.save_adapter (and eject them first){merge}")
    if not quantized and not params4:
        bnb = [n for n, m in plain_modules(model) if isinstance(m, bnb_kinds())][:1]
        raise ValueError(f"{bnb[0]!r} is bitsandbytes' own layer (a model loaded with BitsAndBytesConfig): save it "
                         "with its own save_pretrained, which writes this format" if bnb else f"{type(model).__name__} "
                         "has no 4-bit layers; quantize it with lowrank.quantize first (or save a dense model with "
                         "its own save_pretrained)")
    max_bytes = shards.parse_size(max_shard_size)
    state = model.state_dict(keep_vars=True)
    meta = next((k for k, t in state.items() if t.is_meta), None)  # a 4-bit layer of meta weights has a state dict
    if meta is not None:  # too; writing it raised torch's "Cannot copy out of meta tensor"
        raise ValueError(f"{meta!r} is on the meta device, with no values to write (built on meta weights or under "
                         "lowrank.skeleton(), and not loaded); fill it first with lowrank.load_quantized(model, "
                         "path) or lowrank.load_and_quantize(model, path, config)")
    seen, parts = set(), []
    for k, t in state.items():
        if isinstance(t, nn.Parameter) and id(t) in seen:  # a tied weight: written once, as save_pretrained does
            continue
        seen.add(id(t))
        parts.append(shards.Part.of(k, t.detach()))

    def write() -> list[str]:
        with shards.atomic_directory(out_dir, overwrite) as tmp:
            files = shards.write(parts, tmp, max_bytes)
            write_config(model, tmp, None, quantization_config(quantized | params4, plain_modules(model)), state)
        return files

    return distributed.on_main(write, collective=False)  # every rank may call it: one writes


def _fill(model: nn.Module, path: pathlib.Path, state: dict, compute_dtype, strict: bool) -> list[str]:
    """load_quantized's work: 4-bit layers in, then every tensor; the names now in 4 bits."""
    places = {name: (parent, attr) for parent, attr, name, _ in _walk(model)}  # names as state_dict()'s
    names, owners = [], weight_owners(model)  # (owners: a tied parameter stays dense)
    for key in sorted(k[: -len(_MARK)] for k in state if k.endswith(_MARK)):  # "M.weight", or "M.p" (a parameter)
        parent, _, attr = key.rpartition(".")
        module = model if not parent else getattr(*places[parent]) if parent in places else None
        if module is None:
            raise ValueError(f"{path}: the checkpoint has a 4-bit tensor {key!r}, but {type(model).__name__} has no "
                             f"module {parent!r}; was it built from the same config?")
        try:
            q = NF4Weight.from_state_dict(state, key)
        except (KeyError, ValueError, TypeError, AttributeError) as e:  # its quant state's JSON may say anything
            raise ValueError(f"{path}: while reading the 4-bit weight {key!r}: {e}") from e
        linear = attr == "weight" and (isinstance(module, (nn.Linear, Linear4bit)) or is_gpt2_conv1d(module))
        names.append(parent if linear else key)
        if linear and not parent:  # the model is itself the layer: nothing holds it to be replaced
            if not isinstance(module, Linear4bit):
                raise ValueError(f"{path}: the checkpoint's weight is 4-bit and the model is a {type(module).__name__}; "
                                 "a module cannot replace itself: quantize it first (lowrank.quantize), then load")
        elif linear:
            _linear_in(module, places[parent], parent, q, state, compute_dtype, path, owners)
        else:
            _parameter_in(module, attr, q, compute_dtype, path, key, owners)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a dense tensor where the model's is 4-bit (or the other way), a size mismatch
        dense = "4-bit state dict has no" in str(e) or "in the checkpoint; this module holds it in 4 bits" in str(e)
        hint = ("; a tensor the model holds in 4 bits is dense in the checkpoint: load it into a model built without "
                "quantize (it then keeps it dense), or quantize the model after") if dense else ""
        raise RuntimeError(f"{path}: {e}{hint}") from e
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # transformers: lm_head <- embeddings when the config ties them
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if not (k in params and id(params[k]) in loaded)]
    expected = set(model.state_dict(keep_vars=True))
    unexpected = sorted(k for k in state if k not in expected)  # (load_state_dict lists none when not strict)
    meta = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    problems = [f"missing keys: {missing}"] if strict and missing else []
    problems += [f"unexpected keys: {unexpected}"] if strict and unexpected else []
    if meta:
        problems.append(f"still on the meta device after loading: {meta[:8]} (the checkpoint lacks them; a buffer "
                        "computed at init, such as rotary inv_freq, needs the model built under "
                        "lowrank.skeleton(), which leaves buffers real)")
    if problems:
        raise ValueError(f"{path}: the checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    fused_paths_off(model)  # nn.TransformerEncoderLayer's fast path cannot take a 4-bit layer
    return names


def _linear_in(module: nn.Module, place: tuple, name: str, q: NF4Weight, state: dict, compute_dtype, path,
               owners: dict) -> None:
    """The linear layer `module` named `name` at `place` (parent, attribute) as a Linear4bit of q."""
    if isinstance(module, Linear4bit):  # already 4-bit: load_state_dict loads the codes
        if compute_dtype is not None:
            module.compute_dtype = compute_dtype
        return
    tied = tied_to(owners, module.weight, module)
    if tied:  # See Note: tied weights stay dense (lowrank/quant/quantize.py)
        raise ValueError(f"{path}: the checkpoint holds {name + '.weight'!r} in 4 bits, which lowrank cannot take: it "
                         f"is tied to {tied} (one tensor, shared), which stays dense")
    out_in = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else (module.nf, module.nx)
    if tuple(q.shape) != out_in:
        raise ValueError(f"{path}: size mismatch for {name}.weight: the checkpoint's 4-bit weight has shape "
                         f"{tuple(q.shape)}, the model's layer is (out, in) = {out_in}")
    bias = state.get(f"{name}.bias") if getattr(module, "bias", None) is not None else None
    try:
        layer = Linear4bit(q, bias, compute_dtype).train(module.training)  # the mode of the layer it replaces
    except (TypeError, ValueError) as e:
        raise type(e)(f"{path}: {name!r}: {e}") from e
    setattr(*place, layer)


# Note: 4-bit parameters on disk. A 4-bit parameter (MoE experts: quant/params4bit.py) writes the
# same six bitsandbytes entries as a 4-bit linear layer, at the parameter's own key
# (`experts.gate_up_proj`, `experts.gate_up_proj.absmax`, ..., its 3-D shape in the quant state)
# instead of `M.weight`. save_quantized writes them beside the 4-bit layers; load_quantized puts
# a Weight4bit with exactly those codes in place of the parameter of that name. transformers +
# bitsandbytes cannot read them (they keep experts dense): transformers refuses such a directory
# (size mismatch at the experts' keys) unless told to ignore mismatched sizes, which would leave
# the experts newly initialized.
def _parameter_in(module: nn.Module, attr: str, q: NF4Weight, compute_dtype, path, key: str, owners: dict) -> None:
    """`module`'s parameter `attr` as a 4-bit parameter of q (See Note: 4-bit parameters on disk)."""
    already = stored(module, attr)
    if already is not None:  # already 4-bit: load_state_dict loads the codes
        if compute_dtype is not None:
            already.compute_dtype = compute_dtype
        return
    p = module._parameters.get(attr)
    if not isinstance(p, torch.Tensor):
        what = "a 4-bit weight" if attr == "weight" else "a 4-bit parameter"
        raise TypeError(f"{path}: {key!r} is {what} in the checkpoint, but {type(module).__name__} has no "
                        f"{'linear weight' if attr == 'weight' else 'parameter'} {attr!r} to hold it")
    if tuple(q.shape) != tuple(p.shape):
        raise ValueError(f"{path}: size mismatch for {key}: the checkpoint's 4-bit parameter has shape {tuple(q.shape)}, "
                         f"the model's is {tuple(p.shape)}")
    tied = tied_to(owners, p, module)
    why = (f"it belongs to the linear layer {type(module).__name__}, whose weight goes 4-bit as a whole layer and "
           "whose other parameters stay dense" if _can_quantize(module) else
           f"it is a {p.dim()}-D parameter, which stays dense (a 4-bit parameter has 2 or more dimensions)"
           if p.dim() < 2 else f"it is tied to a parameter of {tied} (one tensor, shared), which stays dense" if tied
           else None)
    if why is not None:  # what quantize would not have made 4-bit: a checkpoint of another model, or not lowrank's
        raise ValueError(f"{path}: the checkpoint holds {key!r} in 4 bits, which lowrank cannot take: {why}")
    try:
        check_owner(key, module)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    install(module, attr, Weight4bit(q, compute_dtype))


def _quantization_config(path: pathlib.Path) -> dict:
    cfg = path / "config.json"
    q = json.loads(cfg.read_text()).get("quantization_config") if cfg.exists() else None
    q = q or {}
    if q.get("load_in_8bit") or q.get("quant_method", "bitsandbytes") != "bitsandbytes" or \
            q.get("bnb_4bit_quant_type", "nf4") != "nf4":
        kind = "8-bit" if q.get("load_in_8bit") else f"{q.get('quant_method')} / {q.get('bnb_4bit_quant_type')}"
        raise NotImplementedError(f"{cfg}: the checkpoint is quantized as {kind}; load_quantized reads "
                                  "bitsandbytes NF4 4-bit checkpoints only")
    return q


def _compute_dtype(q: dict) -> torch.dtype | None:
    name = q.get("bnb_4bit_compute_dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) else None


@contextlib.contextmanager
def _restored_on_error(model: nn.Module):
    """On any error inside, every module of `model` gets back the submodules, parameters and
    buffers it had (references, not copies: a load assigns new tensors, it does not write into
    the old ones)."""
    # also the load pre-hook and instance attributes a 4-bit parameter puts on its owner (params4bit.install),
    # and each 4-bit weight's own attributes (Stored4bit._set_weight; the compute dtype a load may set)
    saved = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), dict(m._load_state_dict_pre_hooks),
              {k: m.__dict__[k] for k in _ATTRIBUTES if k in m.__dict__}) for m in model.modules()]
    try:
        yield
    except BaseException:
        for m, modules, params, buffers, hooks, attrs in saved:
            for d, old in ((m._modules, modules), (m._parameters, params), (m._buffers, buffers),
                           (m._load_state_dict_pre_hooks, hooks)):
                d.clear()
                d.update(old)
            for k in _ATTRIBUTES:
                m.__dict__.pop(k, None)
            m.__dict__.update(attrs)
        raise


_ATTRIBUTES = (*OWNER_KEYS, "shape", "dtype", "blocksize", "compute_dtype")  # See _restored_on_error


def load_quantized(model: nn.Module, path: str | os.PathLike, *, compute_dtype: torch.dtype | None = None,
                   strict: bool = True) -> list[str]:
    """Load a 4-bit checkpoint directory (lowrank's save_quantized, or transformers +
    bitsandbytes' save_pretrained) into `model`, built from the same config, in place: each
    nn.Linear (or GPT-2 Conv1D) whose weight the checkpoint holds in 4 bits is replaced by a
    Linear4bit with exactly the checkpoint's codes and scales, any other 4-bit tensor becomes a
    4-bit parameter of its module (See Note: 4-bit parameters on disk); every other tensor is
    loaded as it is. `model` may be built with its parameters on the meta device (under
    `lowrank.skeleton()`): they are assigned from the checkpoint, never allocated twice; a model
    already in 4 bits takes the checkpoint's codes, blocksize and compute dtype. compute_dtype:
    default config.json's bnb_4bit_compute_dtype; without one (a model with no transformers config
    writes none) each weight keeps its own: an already 4-bit one its compute dtype, a new one the
    dtype it was quantized from. Returns the names now in 4 bits: the layers' module names, the
    parameters' keys. Missing or unexpected keys raise when `strict`; weights tied by the model
    (`tie_weights()`) may be absent from the file. A load that raises leaves the model as it was
    (its modules, tensors, 4-bit settings and forwards)."""
    distributed.check_not_sharded(model, "load_quantized")  # DDP / FSDP2 would keep the layers it replaces
    if any(isinstance(m, TunerLayer) for m in model.modules()):
        raise ValueError("the model has adapters: load_quantized replaces the layers they wrap; load into the model "
                         "first, then inject (or eject them, load, and inject again)")
    path = pathlib.Path(path)
    quant = _quantization_config(path)
    state = shards.read(path)
    if any(k.endswith(".SCB") for k in state):  # bitsandbytes' 8-bit row scales
        raise NotImplementedError(f"{path}: the checkpoint holds 8-bit (LLM.int8) weights; load_quantized reads NF4 only")
    if not any(k.endswith(BNB_QUANT_STATE_KEY) for k in state):
        warnings.warn(f"{path} holds no 4-bit weight: its tensors are loaded as they are and nothing is quantized "
                      "(lowrank.load_and_quantize quantizes a dense checkpoint as it reads it)", stacklevel=2)
    given = compute_dtype is not None
    compute_dtype = compute_dtype if given else _compute_dtype(quant)
    if compute_dtype is not None and compute_dtype not in nf4.DTYPES:  # a 4-bit layer already here took any value
        where = "" if given else f" ({path / 'config.json'}'s bnb_4bit_compute_dtype)"
        raise ValueError(f"compute_dtype{where} must be None or one of {nf4.DTYPES}; got {compute_dtype!r}")
    with _restored_on_error(model):  # See Note: a failed load changes nothing (lowrank/io.py)
        return _fill(model, path, state, compute_dtype, strict)
