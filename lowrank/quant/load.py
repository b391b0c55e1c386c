"""Load a dense safetensors checkpoint straight into a 4-bit model, so the full-precision
model never exists, on the GPU or anywhere:

    with lowrank.skeleton():                  # parameters on the meta device: no memory
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    lowrank.load_and_quantize(model, path, NF4Config(compute_dtype=torch.bfloat16), device="cuda")

`load_and_quantize` reads the checkpoint one tensor at a time (shard by shard, through
safetensors' memory map): a weight of a layer that `NF4Config.targets` selects is moved to
`device`, quantized there and dropped, so peak memory is the 4-bit model plus one dense
weight; every other tensor (embeddings, norms, the output head) is loaded as it is.
The result equals `quantize(from_pretrained(path), config)` bit for bit (tests/quant/test_load.py).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re

import torch
from safetensors import safe_open
from torch import nn

from ..shards import checkpoint_files
from ..targets import is_gpt2_conv1d
from . import nf4
from .linear4bit import Linear4bit
from .params4bit import names_4bit, quantize_parameter
from .quantize import (NF4Config, _can_quantize, _walk, check_forward, check_parameters, find_parameters,
                       fused_paths_off, refuse_tied, selected, weight_owners)


@contextlib.contextmanager
def skeleton():
    """Inside this block every nn.Parameter a module registers is moved to the meta device as
    soon as it is made, so building a 7B model costs one layer's memory at a time, then none.
    Buffers stay real: checkpoints do not hold the non-persistent ones (rotary tables,
    position ids), so they must be computed by the model's own constructor."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _open(file: pathlib.Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors' error types vary by version
        raise ValueError(f"{file}: not a readable safetensors file (corrupt or truncated?): {e}") from e


def _refuse_4bit(files: list[pathlib.Path]) -> None:
    """A checkpoint in 4 bits already (bitsandbytes' quant-state keys) is load_quantized's to read."""
    for file in files:
        with _open(file) as f:
            key = next((k for k in f.keys() if ".quant_state.bitsandbytes__" in k), None)
        if key is not None:
            raise ValueError(f"{file} holds 4-bit weights already ({key!r}): load_and_quantize quantizes a dense "
                             "checkpoint; read this one with lowrank.load_quantized into a model built from its config")


# Note: copy what is kept. safetensors hands out tensors that may share the file's memory map;
# one such tensor kept in the model keeps the whole shard mapped (and its pages counted in the
# process's memory) after the file is closed. Tensors the model keeps are therefore copied;
# a weight that is only read to be quantized is not.
def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None, keep: bool = True) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=keep)


# Note: tensors transformers keeps in float32. A transformers model may name tensors that must not
# be read in half precision: `_keep_in_fp32_modules_strict` (DeepSeek-V3's and GLM-4-MoE's router
# weight and score bias) stay float32 when the model is read in float16 or bfloat16,
# `_keep_in_fp32_modules` (T5's `wo`) when in float16 (transformers' _get_dtype_plan, its keys
# searched with the names as globs, as core_model_loading does). load_and_quantize keeps them so,
# whether `dtype` asks for half precision or the checkpoint holds it, as from_pretrained does.
def float32_plan(model: nn.Module):
    """f(name, tensor, dtype) -> the dtype to read the tensor in: `dtype`, or float32 (See Note:
    tensors transformers keeps in float32)."""
    plans = {}
    for half, attr in ((torch.bfloat16, "_keep_in_fp32_modules_strict"), (torch.float16, "_keep_in_fp32_modules_strict"),
                       (torch.float16, "_keep_in_fp32_modules")):
        plans.setdefault(half, []).extend(str(n).replace("*", ".*") for n in getattr(model, attr, None) or ())
    patterns = {half: re.compile("|".join(names)) for half, names in plans.items() if names}

    def dtype_of(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        pattern = patterns.get(target)
        return torch.float32 if pattern is not None and pattern.search(name) else dtype

    return dtype_of


def _cannot_quantize(file, name: str, e: Exception) -> Exception:
    """The codec's refusal (a float64 or non-finite weight), naming the file and the tensor."""
    hint = "; load_and_quantize(..., dtype=torch.bfloat16) casts as it reads" if isinstance(e, TypeError) else ""
    return type(e)(f"{file}: cannot quantize {name!r}: {str(e).rstrip('.')}{hint}")


def load_and_quantize(model: nn.Module, path: str | os.PathLike, config: NF4Config | None = None, *,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> list[str]:
    """Fill `model` (typically built under `skeleton()`) from the safetensors checkpoint at
    `path`, quantizing the layers `config` selects as their weights are read, in place.
    `dtype` casts floating tensors as they are read (None: the checkpoint's dtype) but those
    transformers keeps in float32 (Note: tensors transformers keeps in float32); 4-bit layers
    remember it as the dtype they dequantize to. Returns the names of the quantized layers, then
    of the 4-bit parameters (`config.parameters`). Raises, naming the keys, when the checkpoint
    holds a tensor the model does not have or one of the wrong shape, or lacks one the model
    needs: a 4-bit layer's or parameter's, or any that a skeleton left on the meta device (a
    model not built under skeleton() keeps what it had for the others)."""
    config = NF4Config() if config is None else config
    if not isinstance(config, NF4Config):
        raise TypeError(f"config must be an NF4Config; got {type(config).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype (e.g. torch.bfloat16); got {dtype!r}")
    device = torch.device(device)
    files = checkpoint_files(path)
    _refuse_4bit(files)
    layers, first_name = _places(model, config)
    params = find_parameters(model, config)  # See Note: 4-bit parameters as they are read
    if not layers and not params:
        raise ValueError(f"no linear layer of {type(model).__name__} matched targets={config.targets!r} (skip={config.skip!r})")
    check_parameters(model, params, config, set(layers), values=False)
    owners = weight_owners(model)
    for name, [(parent, attr), *_] in layers.items():
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"cannot quantize {name!r}: nn.MultiheadAttention reads its projection weights directly; "
                             "add it to skip")
        refuse_tied(name, getattr(parent, attr), owners)  # See Note: tied weights stay dense (quantize.py).
        check_forward(name, getattr(parent, attr))  # See Note: a forward of its own (quantize.py)
    has_bias = {n for n, [(p, a), *_] in layers.items() if getattr(getattr(p, a), "bias", None) is not None}
    shapes = {n: _weight_shape(getattr(p, a)) for n, [(p, a), *_] in layers.items()}
    modules = dict(model.named_modules(remove_duplicate=False))  # a module registered twice: both names
    biases: dict[str, torch.Tensor] = {}  # a 4-bit layer's bias read before its weight
    unexpected, bad_shapes, conflicts, done = [], [], [], set()
    kept_float32 = float32_plan(model)
    to_4bit = {(id(owner), p): f"{where}.{p}" if where else p for owner, where, p in params}

    def quantize_read(owner: nn.Module, p: str, file) -> None:  # See Note: 4-bit parameters as they are read
        try:
            quantize_parameter(owner, p, config.blocksize, config.double_quant, config.compute_dtype)
        except (TypeError, ValueError) as e:  # a float64 or non-finite weight: say which
            raise _cannot_quantize(file, to_4bit[id(owner), p], e) from e

    experts = _Experts(modules, device, dtype, lambda owner, p: (id(owner), p) in to_4bit and quantize_read(owner, p, path))
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if experts.take(key, f, bad_shapes):
                    done.add(key)
                    continue
                owner, _, leaf = experts.renamed(key).rpartition(".")
                module, name = modules.get(owner), owner
                owner = first_name.get(owner, owner)
                if owner in layers and leaf in ("weight", "bias"):
                    parent, attr = layers[owner][0]
                    layer = getattr(parent, attr)
                    if leaf == "bias" and f.get_slice(key).get_shape() != [shapes[owner][1][0]]:
                        bad_shapes.append(f"{key}: checkpoint {tuple(f.get_slice(key).get_shape())}, model "
                                          f"{(shapes[owner][1][0],)}")
                        continue
                    if leaf == "bias" and isinstance(layer, Linear4bit):  # the weight came first
                        layer.bias = nn.Parameter(_cast(f.get_tensor(key), device, dtype), requires_grad=False)
                    elif leaf == "bias":
                        biases[owner] = _cast(f.get_tensor(key), device, dtype)
                    else:
                        conv1d, shape = shapes[owner]
                        w = _cast(f.get_tensor(key), device, dtype, keep=False)  # (out, in); Conv1D: (in, out)
                        w = w.T.contiguous() if conv1d else w
                        if tuple(w.shape) != shape:
                            bad_shapes.append(f"{key}: checkpoint {tuple(w.shape)}, model {shape}")
                            continue
                        try:
                            q = nf4.quantize(w, config.blocksize, config.double_quant)
                        except (TypeError, ValueError) as e:  # a float64 or non-finite weight: say which
                            raise _cannot_quantize(file, key, e) from e
                        del w  # See Note: no references to the layers (quantize.py): one dense weight at a time
                        if isinstance(layer, Linear4bit):  # a module registered twice, its weight under both names
                            if not _same(q, layer.weight):
                                conflicts.append(f"{key} differs from {owner}.weight")
                        else:
                            quantized = Linear4bit(q, biases.pop(owner, None), config.compute_dtype).train(layer.training)
                            for parent, attr in layers[owner]:  # one 4-bit layer wherever the module was
                                setattr(parent, attr, quantized)
                            del quantized
                elif module is not None and experts.per_expert_too(name, leaf, key):
                    continue
                elif module is not None and leaf in names_4bit(module):  # See Note: 4-bit parameters as they are read
                    bad_shapes.append(f"{key}: its tensor is 4-bit already (read twice, or the model was quantized before)")
                    continue
                elif module is not None and leaf in module._parameters:
                    old = module._parameters[leaf]
                    t = f.get_tensor(key)
                    if old is not None and tuple(t.shape) != tuple(old.shape):
                        bad_shapes.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(old.shape)}")
                        continue
                    requires_grad = old.requires_grad if old is not None else True
                    selected = (id(module), leaf) in to_4bit
                    cast = kept_float32(experts.renamed(key), t, dtype)  # See Note: tensors transformers keeps in float32
                    module._parameters[leaf] = nn.Parameter(_cast(t, device, cast, keep=not selected), requires_grad=requires_grad)
                    if selected:
                        quantize_read(module, leaf, file)
                elif module is not None and leaf in module._buffers and leaf not in module._non_persistent_buffers_set:
                    t = f.get_tensor(key)
                    module._buffers[leaf] = _cast(t, device, kept_float32(experts.renamed(key), t, dtype))
                else:
                    unexpected.append(key)
                    continue
                done.add(key)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # transformers: an output head tied to the embedding is not in the checkpoint
    for m in model.modules():  # buffers the constructor computed (rotary tables) follow the model to `device`
        for k, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[k] = b.to(device)
    # a model not built under skeleton() has its parameters' values: one the checkpoint never held is not meta
    unread = [to_4bit[id(o), p] for o, _, p in params if p not in names_4bit(o) and not o._parameters[p].is_meta]
    _raise_if_incomplete(model, layers, has_bias, biases, unexpected, bad_shapes, files, conflicts, experts.unfilled(),
                         unread, experts.doubled)
    fused_paths_off(model)  # nn.TransformerEncoderLayer's fast path cannot take a 4-bit layer
    return list(first_name) + list(to_4bit.values())


# Note: 4-bit parameters as they are read. NF4Config.parameters (MoE experts, params4bit.py) are
# found on the skeleton and checked as quantize checks them, their values aside (a skeleton has
# none); each is quantized on `device` as soon as it is whole: a 3-D tensor of the checkpoint as
# it is read, a fused transformers-4 experts tensor when its last expert's rows arrive (Note:
# transformers 4 expert keys). With the keys in the order save_pretrained writes them (sorted),
# one layer's experts at most are dense at a time.


# Note: transformers 4 expert keys. Checkpoints of mixture-of-experts models (Mixtral, Qwen-MoE,
# ... on the hub, and what transformers 5's own save_pretrained writes) hold each expert's
# projections under transformers 4's names, `<moe>.experts.<e>.w1.weight`, which transformers 5
# fuses into the 3-D `experts.gate_up_proj` (rows [w1_e; w3_e]) and `experts.down_proj` as it
# loads, and Mixtral's `block_sparse_moe` is its `mlp` (lowrank/io_moe.py holds the table).
# load_and_quantize does the same: the fused parameter is made on `device` when its first expert
# arrives and each expert's weight is copied into its rows; the experts stay dense (quantize
# takes linear layers). A fused parameter some expert never reached is named in the error.
class _Experts:
    def __init__(self, modules: dict, device: torch.device, dtype: torch.dtype | None, whole=None) -> None:
        from ..io_moe import (  # here: lowrank.io_moe imports the tuners, which import quant
            FUSED,
            renamer,
        )

        self.modules, self.device, self.dtype, self.fused = modules, device, dtype, FUSED
        self.renamed = renamer(modules)  # a transformers 4 key under the model's names
        self.filled: dict[tuple[str, str], set] = {}  # (experts module, parameter) -> {(expert, place)}, made once
        self.shapes: dict[tuple[str, str], torch.Size] = {}
        self.whole = whole  # called (owner, parameter) when a fused parameter's last rows arrive
        self.read_whole: set[tuple[str, str]] = set()  # fused parameters read as one tensor (not from experts' rows)
        self.doubled: dict[str, str] = {}  # "owner.param" read both ways -> what is said, once (what it leaves
        # missing or unfilled follows from it)

    def take(self, key: str, f, bad_shapes: list) -> bool:
        """Copy `key` into its rows of a fused experts parameter, if it is an expert's weight."""
        m = re.fullmatch(r"(?P<moe>.*)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight", self.renamed(key))
        if m is None:
            return False
        owner = self.modules.get(f"{m['moe']}.experts")
        param, place = self.fused.get(m["proj"], (None, 0))
        slot, e = (f"{m['moe']}.experts", param), int(m["e"])
        if owner is not None and slot in self.filled and param not in owner._parameters:  # its tensor went 4-bit
            count = self.shapes[slot][0]
            bad_shapes.append(f"{key}: rows of expert {e} read twice" if e < count else
                              f"{key}: expert index {e}, and {m['moe']}.experts has {count} experts (0-{count - 1})")
            return True
        if slot in self.read_whole:  # said once, at the first expert's key
            name = f"{m['moe']}.experts.{param}"
            self.doubled.setdefault(name, _BOTH.format(key=key, name=name))
            return True
        if owner is None or not isinstance(owner._parameters.get(param), torch.Tensor):
            return False
        p = owner._parameters[param]
        t = f.get_tensor(key)
        rows = p.shape[1] // (2 if param == "gate_up_proj" else 1)
        if e >= p.shape[0]:
            bad_shapes.append(f"{key}: expert index {e}, and {m['moe']}.experts has {p.shape[0]} experts (0-{p.shape[0] - 1})")
            return True
        if tuple(t.shape) != (rows, p.shape[2]):
            bad_shapes.append(f"{key}: checkpoint {tuple(t.shape)}, model's {m['moe']}.experts.{param} {tuple(p.shape)}")
            return True
        if slot not in self.filled:  # made when its first expert comes, on `device`, in `dtype` (as _cast casts)
            p = nn.Parameter(torch.empty(p.shape, dtype=self.dtype or t.dtype, device=self.device), p.requires_grad)
            owner._parameters[param] = p
            self.shapes[slot] = p.shape
        elif (e, place) in self.filled[slot]:  # a second copy of rows already read: its rows, not the whole
            bad_shapes.append(f"{key}: rows of expert {e} read twice")
            return True
        with torch.no_grad():
            p[e, place * rows:(place + 1) * rows].copy_(t)
        self.filled.setdefault(slot, set()).add((e, place))
        if self.whole is not None and not self._missing(slot):
            self.whole(owner, param)
        return True

    def per_expert_too(self, owner: str, param: str, key: str) -> bool:
        """`key`, the whole of `owner`'s fused parameter `param`: whether experts' rows of it were
        read too (then said in self.doubled); else it is remembered as read whole."""
        if param not in {fused for fused, _ in self.fused.values()}:
            return False
        if (owner, param) in self.filled:
            self.doubled[f"{owner}.{param}"] = _BOTH.format(key=key, name=f"{owner}.{param}")
            return True
        self.read_whole.add((owner, param))
        return False

    def _missing(self, key: tuple[str, str]) -> int:
        e = self.shapes[key][0]
        return e * (2 if key[1] == "gate_up_proj" else 1) - len(self.filled[key])

    def unfilled(self) -> list[str]:
        return [f"{name}.{param}: the checkpoint holds experts' rows {sorted(seen)}, not all of "
                f"{len(seen) + self._missing((name, param))}" for (name, param), seen in self.filled.items()
                if self._missing((name, param))]


_BOTH = ("{key}: the checkpoint holds {name} both as one tensor and as its experts' rows (transformers 4's "
         "experts.N.* keys); it should hold one of them")


def _places(model: nn.Module, config: NF4Config) -> tuple[dict[str, list[tuple[nn.Module, str]]], dict[str, str]]:
    """The layers `config` selects: first name -> every (parent, attribute) holding that module
    (one nn.Linear registered twice is one Linear4bit at both places, as `quantize` makes it), and
    each selected name -> the first name of its module. Parents and names only: Note: no
    references to the layers (quantize.py)."""
    wanted = selected(model, config)
    names = [(p, a, n, id(c)) for p, a, n, c in _walk(model, every=True) if wanted(n, c) and _can_quantize(c)]
    first_of_id = {}
    for *_, n, key in names:
        first_of_id.setdefault(key, n)
    first_name = {n: first_of_id[key] for *_, n, key in names}
    layers: dict[str, list[tuple[nn.Module, str]]] = {}
    for p, a, n, _ in names:
        layers.setdefault(first_name[n], []).append((p, a))
    return layers, first_name


def _weight_shape(layer: nn.Module) -> tuple[bool, tuple[int, int]]:
    """Whether the checkpoint holds the layer's weight transposed (GPT-2's Conv1D), and its (out, in)."""
    if is_gpt2_conv1d(layer):
        return True, (layer.nf, layer.nx)
    return False, (layer.out_features, layer.in_features)


def _same(q: nf4.NF4Weight, other: nf4.NF4Weight) -> bool:
    a, b = q.to_state_dict(), other.to_state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _raise_if_incomplete(model, layers, has_bias, biases, unexpected, bad_shapes, files, conflicts, unfilled,
                         unread, doubled) -> None:
    missing = [f"{n}.weight" for n, [(p, a), *_] in layers.items() if not isinstance(getattr(p, a), Linear4bit)]
    missing += unread
    missing += [f"{n}.bias" for n, [(p, a), *_] in layers.items()
                if n in has_bias and isinstance(getattr(p, a), Linear4bit) and getattr(p, a).bias is None]
    missing += [f"{n}.{k}" for n, m in model.named_modules() for k, t in m._parameters.items()
                if t is not None and t.is_meta]
    missing += [f"{n}.bias (read, but its layer's weight never came)" for n in biases]
    # a fused experts tensor held twice: what it leaves missing or unfilled follows from it (and a layer's weight
    missing = [k for k in dict.fromkeys(missing) if k not in doubled]  # is also a meta parameter: listed once)
    unfilled = [u for u in unfilled if u.split(":")[0] not in doubled]
    problems = [f"experts held twice: {list(doubled.values())[:8]}"] if doubled else []
    if missing:
        problems.append(f"{len(missing)} tensors the model needs are not in the checkpoint: {missing[:8]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the checkpoint have no place in the model: {unexpected[:8]}")
    if bad_shapes:
        problems.append(f"shape mismatch: {bad_shapes[:8]}")
    if conflicts:
        problems.append(f"a module registered at several places has different weights under its names: {conflicts[:8]}")
    if unfilled:
        problems.append(f"fused experts the checkpoint does not fill: {unfilled[:8]}")
    if problems:
        raise ValueError(f"cannot load {[str(f) for f in files][:3]} into {type(model).__name__}: " + "; ".join(problems))
