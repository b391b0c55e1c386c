"""merge_and_export: an adapted model as a plain Hugging Face model directory (docs/io.md).

    W' = W0 + sum over active LoRA adapters a of  s_a B_a A_a        (Hu et al. 2021, section 4.1)
    W' = m * (W0 + s B A) / ||W0 + s B A||_c                          (DoRA, Liu et al. 2024, eq. 5)

W0 is the weight the adapter was trained against: for a 4-bit base, its dequantized weight
in the compute dtype (what Linear4bit's forward multiplies by), never a full-precision copy.
s B A is formed from the factors in float32 (a bf16 adapter's product is not rounded to bf16
first) and the sum taken in float32, then rounded once to the export dtype. The user's model is not
changed: merged weights are computed beside it, one shard at a time (lowrank.shards).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import pathlib

import torch
from torch import nn

from . import distributed, export_files, shards
from .quant import nf4
from .quant.linear4bit import _WEIGHT_KEYS, Linear4bit, Stored4bit
from .quant.load import float32_plan
from .quant.params4bit import Weight4bit
from .quant.quantize import bnb_kinds
from .tuners.base import TunerLayer
from .tuners.lora_base import LoraLayer
from .tuners.lora_param import LoraParameter
from .walk import _unwrap, _walk, plain_modules

log = logging.getLogger("lowrank")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,  # and torch's names, which
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # lowrank train takes


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: pathlib.Path  # the directory written
    files: list[str]  # weight files in it (one, or the shards)
    dtype: torch.dtype | None  # the dtype of the dense floating tensors (None: kept as they were)
    merged: list[str]  # modules whose adapters were folded into the weight
    requantize_error: dict[str, float]  # requantize=True: module -> ||deq(q(W')) - W'||_F / ||W'||_F

    @property
    def max_requantize_error(self) -> float:
        return max(self.requantize_error.values(), default=0.0)


def _lora_chain(where: str, module: TunerLayer) -> list[LoraLayer]:
    """The LoRA layers of a wrapped module: one, or one per adapted parameter (LoraParameter);
    refuses other adapters (they cannot be merged)."""
    layers, m = [], module
    while isinstance(m, TunerLayer):
        if not isinstance(m, LoraLayer):
            raise ValueError(f"{where!r} holds a {type(m).__name__} adapter, which cannot be merged into weights (only LoRA and "
                             "DoRA can); eject it before exporting, or save it with lowrank.save_adapter")
        layers.append(m)
        m = m.base
    if len(layers) > 1 and not all(isinstance(la, LoraParameter) for la in layers):
        raise ValueError(f"{where!r} has nested adapter layers; export supports one LoRA layer per module")
    return layers


def weight_key(module: str, layer: LoraLayer | None) -> str:
    """The state-dict key of the weight `layer` (None: a 4-bit layer's own) merges into."""
    attr = "weight" if layer is None else layer.weight_attr
    return f"{module}.{attr}" if module else attr


def merged_weight(layer: LoraLayer) -> torch.Tensor:
    """W' in float32, in the layout of the base's dense weight; the layer is not changed."""
    base = layer.base
    if layer.merged:  # already folded in by lowrank.merge: the weight is W'
        return layer.target_weight().detach().float()
    w = base.dequantize(base.compute_dtype) if isinstance(base, Linear4bit) else layer.target_weight().detach()
    w = w.float()
    if not layer.enabled:
        return w
    doras = [n for n in layer.active if n in layer.lora_magnitude_vector]
    if doras and len(layer.active) > 1:
        raise ValueError(f"cannot merge several adapters {list(layer.active)} when one is DoRA; activate one at a time")
    with torch.no_grad():
        for name in layer.active:
            d = layer._delta_weight(name, torch.float32)  # s B A from the factors in float32, layout of the weight
            if name in doras:  # W' = (m / ||W0 + s B A||_c) * (W0 + s B A)
                w0 = layer.dense_weight().float()  # (out, in) (a kernel: (out, in, *k)): the norm DoRA's forward divides by
                norm = layer._dora_norm(w0, d.T if layer.weight_in_out else d, 1.0)  # m's shape: (out,), or (1, out, 1...)
                factor = (layer.lora_magnitude_vector[name].float() / norm).reshape(-1, *[1] * (w.dim() - 1))  # (out, 1...)
                w = (factor.T if layer.weight_in_out else factor) * (w + d)
            else:
                w = w + d
    return w


def _plain_state(model: nn.Module) -> tuple[dict, dict[str, list[LoraLayer]], dict[str, Linear4bit], dict[str, Weight4bit]]:
    """The model's state dict as it would be without adapter wrappers (tensors shared, not
    copied), its LoRA layers and its 4-bit layers by plain module name, and its 4-bit
    parameters by state-dict key. The wrappers are taken out for the call to state_dict() and
    put back before returning."""
    wrapped = [(p, a, w, c) for p, a, w, c in _walk(model) if isinstance(c, TunerLayer)]
    loras = {w: _lora_chain(w, c) for _, _, w, c in wrapped}
    try:
        for parent, attr, _, child in wrapped:
            setattr(parent, attr, _unwrap(child))
        state = model.state_dict(keep_vars=True)
        plain = list(plain_modules(model))
        quantized = {n: m for n, m in plain if isinstance(m, Linear4bit)}  # as state_dict() names them
        params4 = {n: m for n, m in plain if isinstance(m, Weight4bit)}  # a 4-bit parameter's key is its module's name
    finally:
        for parent, attr, _, child in wrapped:
            setattr(parent, attr, child)
    return state, loras, quantized, params4


def _export_dtype(dtype, quantized: dict[str, Linear4bit]) -> torch.dtype | None:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be a torch dtype or one of {sorted(DTYPES)}; got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(set(DTYPES.values()), key=str)} or None; got {dtype!r}")
    if dtype is None and quantized:  # a 4-bit model exports in its compute dtype
        found = {m.compute_dtype for m in quantized.values()}
        if len(found) > 1:
            raise ValueError(f"the 4-bit layers compute in several dtypes {sorted(map(str, found))}; pass dtype=")
        dtype = found.pop()
    return dtype


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _checked_cast(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` in `dtype`, refusing a cast that turns finite values into inf (fp16 above 65504)."""
    out = _cast(t, dtype)
    if out.dtype != t.dtype and out.is_floating_point() and not torch.isfinite(out).all() and torch.isfinite(t).all():
        raise ValueError(f"{key}: its values reach {t.abs().max().item():.4g}, which {out.dtype} cannot hold (largest "
                         f"{torch.finfo(out.dtype).max:.4g}); export in a wider dtype (dtype=torch.bfloat16 or None)")
    return out


# the float32 whose repr is longest (sign, 17 digits, "e-38"): the quant-state JSON of a weight
# re-quantized with any offset is at most as long as with this one
_LONGEST_OFFSET = -1.1754943508222875e-38


def _nf4_sizes(prefix: str, like: Linear4bit, dtype: torch.dtype, requantized: bool = False) -> dict[str, int]:
    """Bytes of each 4-bit entry of a weight shaped like `like`, without quantizing it: exact for
    its own codes, at most for codes made again (`requantized`: another offset in its JSON)."""
    q = like.weight
    offset = q.offset if q.offset is None or not requantized else torch.tensor(_LONGEST_OFFSET)
    fake = nf4.NF4Weight(q.packed, q.absmax, q.shape, dtype, q.blocksize, q.nested_absmax, offset)
    return {k: t.numel() * t.element_size() for k, t in fake.to_state_dict(prefix).items()}


def merge_and_export(model: nn.Module, out_dir: str | os.PathLike, max_shard_size: int | str = "2GB",
                     dtype: torch.dtype | str | None = None, tokenizer=None, requantize: bool = False, *,
                     overwrite: bool = False, extra_files: dict[str, str | os.PathLike] | None = None
                     ) -> ExportResult | None:
    """Write `model` with its active LoRA / DoRA adapters merged as a plain Hugging Face model
    directory that `transformers.AutoModel*.from_pretrained` loads: safetensors shards of at
    most `max_shard_size` (+ index), config.json, generation_config.json, tokenizer files (of
    `tokenizer`, else copied from the base model's directory when it has them).

    dtype: None keeps each tensor's dtype, except that a 4-bit model exports dense in its
    compute dtype; or torch.float32 / float16 / bfloat16 ("fp32" / "fp16" / "bf16").
    requantize: the layers that were 4-bit stay 4-bit (bitsandbytes format, with
    `quantization_config` in config.json): those with an adapter are merged and quantized to
    NF4 again (the error it adds is returned and logged), the others keep their own codes.
    extra_files: {file name: path} copied in beside them, inside the swap (lowrank train's
    workflow file). `model` is not changed. The directory appears whole or not at all (Note: atomic
    directories, in lowrank/shards.py); an existing non-empty one needs overwrite=True. Under
    torch.distributed rank 0 writes (the others return None), from an unsharded model (DDP); an
    FSDP2-sharded one is refused."""
    model = distributed.unwrap(model)  # DDP's `module.`, torch.compile's `_orig_mod.`: not in the keys
    distributed.check_not_sharded(model, "merge_and_export (a full model, gathered)")
    export_files.check_tokenizer(tokenizer)  # checked before writing
    _refuse_bitsandbytes(model)
    max_bytes = shards.parse_size(max_shard_size)
    extra_files = export_files.check_extra_files(extra_files, export_files.written(model, tokenizer))
    state, loras, quantized, params4 = _plain_state(model)
    for where, layers in loras.items():  # as lowrank.merge: no one weight computes what such a forward does
        if any(not la.enabled or la.route is not None for la in layers):
            raise RuntimeError(f"cannot export inside lowrank.disabled(model) or lowrank.per_sample(model, ...) (at "
                               f"{where!r}): the merged weights would not compute what that context does; export after it")
        for la, name in ((la, n) for la in layers for n in la.active if n not in la.merged):
            try:  # an update with no form in the weight (a grouped convolution's), said before anything is written
                la.check_mergeable(name)
            except ValueError as e:
                raise ValueError(f"merge_and_export refused, nothing was written: at {where!r}, {e}") from None
    dtype = _export_dtype(dtype, quantized | params4)
    if requantize and not quantized and params4:
        raise ValueError(f"requantize=True re-quantizes the linear layers that were 4-bit, and this model's 4-bit "
                         f"tensors are parameters ({list(params4)[:2]}, MoE experts), which a bitsandbytes checkpoint "
                         "holds dense (See Note: 4-bit parameters in an export): export without requantize")
    if requantize and not quantized:
        raise ValueError("requantize=True re-quantizes the layers that were 4-bit, and this model has none "
                         "(quantize it with lowrank.quantize first, or export it dense)")
    conv1d = set() if requantize else _conv1d_layout(model, quantized)
    kept_float32 = float32_plan(model)
    parts, errors, owner = {}, {}, {}  # owner: a replaced state-dict key -> the key of the part that writes it
    weights = {weight_key(n, la): (n, la) for n, layers in loras.items() for la in layers}
    weights |= {weight_key(n, None): (n, None) for n in quantized if weight_key(n, None) not in weights}
    weights |= {k: (k, None) for k in params4 if k not in weights}  # See Note: 4-bit parameters in an export
    for key, (name, layer) in sorted(weights.items()):
        q = params4.get(key, quantized.get(name))
        if q is None and key not in state:  # See Note: a computed weight (lowrank/tuners/lora_base.py)
            raise ValueError(f"cannot merge into {name!r}: its weight is not a state-dict entry {key!r} but computed "
                             "from other parameters (torch.nn.utils.parametrize, weight_norm), so the merged weight "
                             "would have nowhere to go; remove the parametrization first")
        owner |= {k: key for k in ([key + s for s in _WEIGHT_KEYS] if q is not None else [key]) if k in state}
        parts[key] = _weight_part(key, name, layer, q, dtype, requantize, errors, name in conv1d, kept_float32)
    _check_ties(state, {k for k, w in owner.items() if k == w})
    seen, ordered = set(), []
    for k, t in state.items():
        if k in owner:
            if k == owner[k]:  # the part goes where its weight was; its other 4-bit keys are dropped
                ordered.append(parts[k])
            continue
        if isinstance(t, nn.Parameter) and id(t) in seen:  # a tied weight (GPT-2's lm_head): written once
            continue
        seen.add(id(t))
        # a float32 tensor transformers keeps so (a router: Note: tensors transformers keeps in float32) stays float32
        cast = kept_float32(k, t, dtype) if t.dtype == torch.float32 else dtype
        size = t.numel() * (_cast(t.new_empty(0), cast).element_size())
        ordered.append(shards.Part({k: size}, lambda k=k, t=t, c=cast: {k: _checked_cast(k, t.detach(), c)}))  # when written
    def write() -> list[str]:
        with shards.atomic_directory(out_dir, overwrite) as tmp:
            files = shards.write(ordered, tmp, max_bytes)
            modules = [(n, _unwrap(c)) for _, _, n, c in _walk(model)]
            config = quantization_config(quantized, modules) if requantize else None
            export_files.write_config(model, tmp, dtype, config, state)
            export_files.write_tokenizer(model, tmp, tokenizer)
            export_files.write_extra_files(tmp, extra_files)
        return files

    files = distributed.on_main(write, collective=False)  # every rank may call it: one writes
    if files is None:
        return None
    if errors:
        log.info("merge_and_export: re-quantizing to NF4 added a relative error of at most %.3g (mean %.3g) over %d "
                 "layers", max(errors.values()), sum(errors.values()) / len(errors), len(errors))
    merged = sorted(n for n, layers in loras.items() if any(la.active or la.merged for la in layers))
    return ExportResult(pathlib.Path(out_dir), files, dtype, merged, dict(sorted(errors.items())))


def _refuse_bitsandbytes(model: nn.Module) -> None:
    """bitsandbytes' own 4-/8-bit layers (a model transformers loaded with BitsAndBytesConfig; LoRA trains on
    them) hold packed codes as `weight`: written as is, the export held codes where weights go."""
    kinds = bnb_kinds()
    found = [(n, m) for n, m in ((n, _unwrap(c)) for _, _, n, c in _walk(model)) if isinstance(m, kinds)]
    if found:
        name, layer = found[0]
        how = ("load the base dense (without BitsAndBytesConfig)" if not isinstance(layer, kinds[0]) else "save the "
               "model with save_pretrained and read that directory with lowrank.load_quantized into a model built "
               "from its config")
        raise ValueError(f"{name!r} is a bitsandbytes {type(layer).__name__} ({len(found)} such layers), which "
                         f"merge_and_export cannot dequantize: {how}, load the adapter there (save_adapter / "
                         "load_adapter) and export that model")


# Note: 4-bit GPT-2. lowrank.quantize turns a GPT-2 Conv1D (weight stored (in, out)) into a
# Linear4bit (out, in), as transformers + bitsandbytes do; the Linear4bit does not remember
# it. A dense export must write such a weight back as (in, out), or transformers' Conv1D
# would refuse it (or, square, silently use its transpose). For a transformers model we ask
# the model class itself: built from its config on the meta device (no memory), which
# modules are Conv1D. A 4-bit export keeps (out, in), which is what bitsandbytes loads.
def _conv1d_layout(model: nn.Module, quantized: dict[str, Linear4bit]) -> set[str]:
    """Names of 4-bit layers that the model's own class builds as a GPT-2 Conv1D."""
    from .targets import is_gpt2_conv1d

    config = getattr(model, "config", None)
    if not quantized or config is None or getattr(type(model), "config_class", None) is None:
        return set()
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(config))
    built = dict(fresh.named_modules())
    return {n for n in quantized if n in built and is_gpt2_conv1d(built[n])}


# Note: 4-bit parameters in an export. A 4-bit parameter (MoE experts, lowrank/quant/params4bit.py)
# is written dense, merged with its LoRA if it has one, in a 4-bit export (requantize=True) too:
# transformers 5 with bitsandbytes quantizes linear layers only, keeps experts dense when it
# loads, and cannot read 4-bit ones.
def _weight_part(key: str, name: str, layer: LoraLayer | None, q: Stored4bit | None, dtype: torch.dtype | None,
                 requantize: bool, errors: dict, conv1d: bool = False, kept=None) -> shards.Part:
    """The part that writes module `name`'s weight: merged (LoRA) and / or dequantized (4-bit),
    dense in the export dtype (transposed to (in, out) for a `conv1d`: Note: 4-bit GPT-2), or
    NF4 again with requantize."""
    if requantize and isinstance(q, Linear4bit) and layer is None:  # 4-bit, no adapter: its own NF4 codes, exact
        return shards.Part(_nf4_sizes(key, q, q.dtype), lambda: q.weight.to_state_dict(key))
    def make() -> torch.Tensor:  # W' in float32: merged, or the 4-bit weight as its forward sees it
        w = merged_weight(layer) if layer is not None else q.dequantize(q.compute_dtype).float()  # (out, in)
        if layer is not None and not torch.isfinite(w).all():  # as lowrank.merge refuses it
            raise ValueError(f"merging the adapters of {name!r} gives non-finite weights (inf/nan); nothing was written")
        return w.T.contiguous() if conv1d else w  # (in, out) for a Conv1D

    base_dtype = q.compute_dtype if q is not None else layer.target_weight().dtype
    target = base_dtype if dtype is None else dtype
    if q is None and base_dtype == torch.float32 and kept is not None:  # a merged router stays float32, as unmerged
        target = kept(key, torch.empty(0), target)
    if requantize and isinstance(q, Linear4bit):  # See Note: 4-bit parameters in an export
        return shards.Part(_nf4_sizes(key, q, target, requantized=True),
                           lambda: _requantized(make(), q, key, name, target, errors))
    numel = q.weight.numel if q is not None else layer.target_weight().numel()
    return shards.Part({key: numel * torch.empty(0, dtype=target).element_size()},
                       lambda: {key: _checked_cast(key, make(), target)})


def _requantized(w: torch.Tensor, like: Linear4bit, key: str, name: str, dtype: torch.dtype, errors: dict) -> dict:
    """W' (float32) rounded to `dtype`, then NF4 with `like`'s blocksize and double quantization;
    records the relative error the NF4 step adds."""
    w = w.to(dtype)
    q = nf4.quantize(w, like.blocksize, like.weight.double_quant)
    back = nf4.dequantize(q, torch.float32)
    errors[name] = float(torch.linalg.norm(back - w.float()) / torch.linalg.norm(w.float()).clamp(min=1e-30))
    return q.to_state_dict(key)


def _check_ties(state: dict[str, torch.Tensor], replaced: set[str]) -> None:
    """A merged weight that shares storage with another key (tied embeddings) would untie them."""
    ptrs = {}
    for k, t in state.items():
        if isinstance(t, nn.Parameter):
            ptrs.setdefault(id(t), []).append(k)
    for keys in ptrs.values():
        if len(keys) > 1 and any(k in replaced for k in keys):
            raise NotImplementedError(f"{keys} are one tied tensor and an adapter changes it; export cannot keep "
                                      "them tied: target only one of them and untie the weights first")


def quantization_config(quantized: dict[str, Stored4bit], modules) -> dict:
    """config.json's `quantization_config` (transformers' BitsAndBytesConfig as a dict) for a
    model whose 4-bit layers (and 4-bit parameters) are `quantized`; every other linear layer of
    `modules` ((name, module) pairs, as named_modules() gives them) is listed in
    llm_int8_skip_modules so that transformers leaves it dense."""
    from .targets import is_linear_like

    doubles = {m.weight.double_quant for m in quantized.values()}
    computes = {m.compute_dtype for m in quantized.values()}
    if len(computes) > 1:  # the format has one bnb_4bit_compute_dtype: a load would compute all layers in it
        by = {str(d).removeprefix("torch."): [n for n, m in quantized.items() if m.compute_dtype == d][:3] for d in computes}
        raise ValueError(f"the 4-bit layers compute in several dtypes ({by}); the bitsandbytes format records one "
                         "(bnb_4bit_compute_dtype), so the loaded model would compute differently: give every "
                         "4-bit layer (Linear4bit) and 4-bit parameter (Weight4bit) one compute_dtype first")
    dense = sorted(n for n, m in modules if is_linear_like(m) and n not in quantized
                   and not isinstance(m, Linear4bit) and not any(n.startswith(q + ".") for q in quantized))
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": doubles == {True},
            "bnb_4bit_compute_dtype": str(computes.pop() if computes else torch.float32).removeprefix("torch."),
            # a list, even empty: None would make transformers skip its default modules too (the model's last
            # module, a classifier's `score`), which may be in 4 bits here
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": dense,
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
