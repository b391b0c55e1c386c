"""How PEFT's adapter_config.json names modules, both ways: target_modules (a list of names or
`.`-suffixes, or one regular expression) and rank_pattern / alpha_pattern keys (regular
expressions matched as `(.*\\.)?(key)$`), from lowrank's wrapped modules when saving and into
lowrank's target specs when loading (lowrank/io.py); and the keys of each LoRA layer's tensors
in PEFT's file."""

from __future__ import annotations

import os
import re
import warnings

import torch
from torch import nn

from .inject import _unwrap, _walk
from .quant.params4bit import parameter_names
from .tuners.lora import LoraEmbedding
from .tuners.lora_base import LoraLayer
from .tuners.lora_param import LoraParameter, lora_chain


def to_peft_targets(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """PEFT target_modules naming exactly `wrapped`: the last name parts when they pick out
    no other module, else the full names when those do not (PEFT reads a list entry as a name
    or a `.`-suffix: "0" also picks "1.0"), else one regular expression of the full names
    (PEFT full-matches a string)."""
    names = [n for _, _, n, _ in _walk(model)]
    suffixes = sorted({w.rsplit(".", 1)[-1] for w in wrapped})
    if {n for n in names if n.rsplit(".", 1)[-1] in suffixes} == set(wrapped):
        return suffixes
    if {n for n in names if any(n == w or n.endswith("." + w) for w in wrapped)} == set(wrapped):
        return sorted(wrapped)
    return "(?:" + "|".join(re.escape(w) for w in sorted(wrapped)) + ")"


def to_peft_pattern(values: dict[str, float], wrapped: list[str]) -> dict[str, float]:
    """rank_pattern / alpha_pattern for PEFT, which matches a key as re.match(rf"(.*\\.)?({key})$",
    name): a full name is its own key unless it also matches another wrapped module (when it is
    the `.`-suffix of one), then it is escaped and anchored ("^0" matches "0", not "1.0"); a
    name with other characters than letters, digits, '_', '-' and '.' is escaped (a ModuleDict
    key "a+b" is no regular expression of itself)."""
    def clashes(w: str, k: str) -> bool:  # key k of w also matches another wrapped module
        return any(n != w and re.match(rf"(.*\.)?({k})$", n) for n in wrapped)

    def key(w: str) -> str:
        if re.fullmatch(r"[\w.\-]+", w) and not clashes(w, w):
            return w
        escaped = re.escape(w)
        return "^" + escaped if clashes(w, escaped) else escaped

    return {key(w): v for w, v in values.items()}


def _peft_spec(item: str, as_regex: bool):
    """A PEFT target / exclude entry as our target spec."""
    if as_regex:
        return "all-linear" if item == "all-linear" else "re:" + item
    # PEFT: exact, or a '.'-suffix; no globs. A pattern, not a lambda: the config must pickle with its model
    return r"re:(?:.*\.)?" + re.escape(item)


def from_peft_targets(value):
    """PEFT's target_modules / exclude_modules as our target specs (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [_peft_spec(value, True)]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"target_modules / exclude_modules must be a string or a list of strings; got {value!r}")
    return [_peft_spec(v, False) for v in value]


def from_peft_pattern(p: dict | None, field: str = "rank_pattern") -> dict:
    """PEFT's rank_pattern / alpha_pattern keys as ours: PEFT matches re.match(rf"(.*\\.)?({key})$",
    name), first key wins; where none matches, a key equal to the module's name (PEFT's fallback:
    get_pattern_key returns the name, which the dict is then read at). A key that is no regular
    expression is read by that fallback alone."""
    if p is not None and not isinstance(p, dict):
        raise TypeError(f"{field} must be a JSON object (module name pattern -> value); got {p!r}")
    specs = {}
    for k, v in (p or {}).items():
        try:
            re.compile(rf"(.*\.)?({k})")
        except re.error:
            continue
        specs[rf"re:(.*\.)?({k})"] = v
    return specs | {"re:" + re.escape(k): v for k, v in (p or {}).items() if "re:" + re.escape(k) not in specs}


def to_peft_parameters(model: nn.Module, adapted: list[str]) -> list[str]:
    """PEFT target_parameters naming exactly the parameters `adapted`: "<module>.<parameter>"
    by its last two name parts when those pick out no other parameter (PEFT takes an entry as
    the full name or a `.`-suffix of it), else the full names."""
    names = [f"{where}.{p}" for _, _, where, child in _walk(model) for p in parameter_names(_unwrap(child))]
    short = sorted({".".join(k.split(".")[-2:]) for k in adapted})
    if {n for n in names if any(n == s or n.endswith("." + s) for s in short)} == set(adapted):
        return short
    return sorted(adapted)


def from_peft_parameters(value):
    """PEFT's target_parameters (names or `.`-suffixes of parameter names) as our specs; None stays None."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"target_parameters must be a list of strings; got {value!r}")
    return [_peft_spec(v, False) for v in value] or None


def _lora_layers(model: nn.Module, name: str) -> list[tuple[str, str, LoraLayer]]:
    """(target, PEFT's key of its tensors, LoRA layer) for every layer holding LoRA adapter
    `name`. The target is the module's qualified name, or for LoRA on a parameter the
    parameter's; see Note: PEFT's nested names."""
    out = []
    for _, _, where, child in _walk(model):
        layers = [layer for layer in lora_chain(child) if name in layer.names]
        order = parameter_names(_unwrap(child))  # a 4-bit parameter keeps its place
        nested = sorted((la for la in layers if isinstance(la, LoraParameter)), key=lambda la: order.index(la.parameter_name))
        for layer in layers:
            if isinstance(layer, LoraParameter):
                depth = len(nested) - 1 - nested.index(layer)
                out.append((f"{where}.{layer.parameter_name}", where + ".base_layer" * depth, layer))
            else:
                out.append((where, where, layer))
    return out


# Note: PEFT's nested names. PEFT adapts several parameters of one module (a MoE layer's
# gate_up_proj and down_proj) with one wrapper each, nested in the order the module registered
# them (the first innermost), and names each one's tensors by its depth: the outermost
# "<module>.lora_A.weight", the next "<module>.base_layer.lora_A.weight", and so on. lowrank's
# layers may nest in another order (adapters added one at a time), so the depth is counted from
# the module's order over the parameters this adapter adapts there, as PEFT would nest them.


def _tensors(layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
    """PEFT's key suffix -> our parameter, for adapter `name` of one layer."""
    if isinstance(layer, LoraEmbedding):
        t = {"lora_embedding_A": layer.lora_embedding_A[name], "lora_embedding_B": layer.lora_embedding_B[name]}
    else:
        t = {"lora_A.weight": layer.lora_A[name].weight, "lora_B.weight": layer.lora_B[name].weight}
    if name in layer.lora_magnitude_vector:
        t["lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
    return t


def same_base(a: str, b: str) -> bool:
    """Two base-model names name the same model: equal once owners / directories are
    stripped, ignoring case ("meta-llama/Llama-2-7b-hf" ~ "/models/llama-2-7b-hf"). A
    huggingface_hub cache snapshot (".../models--owner--name/snapshots/<commit>") is its repo's
    name, and a relative directory (".", "../m") the name of the directory it is from here."""
    def short(x: str) -> str:
        x = x.replace("\\", "/").rstrip("/")
        snapshot = re.search(r"(?:^|/)models--(?:[^/]*--)?([^/]+)/snapshots/[^/]+$", x)
        if snapshot:
            return snapshot[1].lower()
        if x in (".", "..", "") or x.startswith(("./", "../")):
            x = os.path.abspath(x or ".").replace("\\", "/").rstrip("/")
        return x.rsplit("/", 1)[-1].lower()

    return short(a) == short(b)


def check_base(peft_config: dict, model: nn.Module, source: str, allow_other_base: bool) -> None:
    """Refuse an adapter made for another base model, when both names are known."""
    theirs = peft_config.get("base_model_name_or_path")
    ours = getattr(getattr(model, "config", None), "_name_or_path", None)
    if allow_other_base or not isinstance(theirs, str) or not theirs or not isinstance(ours, str) or not ours:
        return
    if not same_base(theirs, ours):
        raise ValueError(f"{source}: the adapter was trained on base model {theirs!r}, but this model is {ours!r}; "
                         "pass allow_other_base=True if you know they have the same weights")


def renamed(missing: list[str], unexpected: list[str], prefix: str) -> str:
    """A hint for a file whose keys are the model's but for a leading module path: saved from a
    model's inner model (LlamaModel, which LlamaForCausalLM holds as `model`) and loaded into the
    whole one, or the other way ("" when the keys differ otherwise)."""
    m, u = (sorted(k.removeprefix(prefix) for k in keys) for keys in (missing, unexpected))
    if not m or len(m) != len(u):
        return ""
    for short, long, file_is_inner in ((u, m, True), (m, u, False)):
        path = long[0][:len(long[0]) - len(short[0])]  # adding a path in front keeps the sorted order
        if path.endswith(".") and [path + k for k in short] == long:
            where = path[:-1]
            if file_is_inner:
                return (f" (they are the missing keys without {path!r}: the file was saved from the module at "
                        f"{where!r} alone; load it into that module, model.get_submodule({where!r}))")
            return (f" (they are the missing keys under {path!r}: the file was saved from a model that holds "
                    f"this one as {where!r}; load it into such a model)")
    return ""


def warn_padding(model: nn.Module, name: str, source: str) -> None:
    """Warn where adapter `name` is on a convolution that pads otherwise than with zeros (reflect,
    replicate, circular): lowrank's A pads as its convolution does (docs/lora.md), PEFT 0.21's A with
    zeros, so there the outputs differ from PEFT's near the borders, both ways, silently otherwise."""
    modes = {where: layer.base.padding_mode for where, _, layer in _lora_layers(model, name)
             if getattr(layer.base, "padding_mode", "zeros") != "zeros"}
    if modes:
        warnings.warn(f"{source}: LoRA on convolutions padded otherwise than with zeros ({modes}): lowrank pads the "
                      "adapter's A as the convolution pads, PEFT 0.21 with zeros, so outputs differ from PEFT's near "
                      "the borders (the file goes between them, but the adapter computes otherwise there)", stacklevel=3)
