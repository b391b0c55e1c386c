"""Target specs -> one filter `(name, module) -> bool`.

A spec is one of (see docs/inject.md):
    "q_proj"                  exact name, or a dotted suffix: matches "model.layers.0.self_attn.q_proj"
    "*.mlp.*_proj"            a glob (fnmatch, case-sensitive) over the full dotted name
    "re:.*\\.(q|v)_proj"       a regular expression, full match over the full name
    re.compile(...)           the same
    nn.Linear                 a module type (isinstance)
    fn(name, module) -> bool  a callable
    "all-linear"              every linear-like layer except the model's output head (and the layers
                              a Mamba mixer reads by weight: Note: layers read by weight; and
                              routers: Note: routers)
A sequence of specs matches when any does. Names are the module's qualified names as in
`model.named_modules()` before any adapter was injected (wrappers are transparent).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

Filter = Callable[[str, nn.Module], bool]
ALL_LINEAR = "all-linear"
_GLOB_CHARS = set("*?[")


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out).
    Detected by class name and its `nf`/`nx` fields so transformers is never imported."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2 Conv1D, or any module with in_features/out_features and a weight
    or a `dequantize()` (a frozen 4-bit linear). See Note: the base protocol, in tuners/lora.py."""
    if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
        return True
    has_dims = isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
    return has_dims and (callable(getattr(module, "dequantize", None)) or isinstance(getattr(module, "weight", None), nn.Parameter))


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head that "all-linear" leaves alone: the module that
    `model.get_output_embeddings()` returns (transformers models), any `lm_head`, and a
    classifier's, token classifier's or question answerer's head with the modules inside it."""
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (AttributeError, NotImplementedError):
            head = None
    from .walk import _unwrap  # walk imports the tuners, which import this module

    head = None if head is None else _unwrap(head)  # a head that holds an adapter already is still the head
    named = _named(model)
    heads = {n for n, m in named if (head is not None and m is head) or n.split(".")[-1] == "lm_head"}
    tops = task_heads(model, named)  # a task model's head, new at fine-tuning: PEFT trains and saves it whole
    return heads | {n for n, _ in named if any(n == t or n.startswith(t + ".") for t in tops)}


def task_heads(model: nn.Module, named=None) -> list[str]:
    """The names of a classifier's, token classifier's or question answerer's head modules (the
    outermost whose names end as TASK_HEADS says; a torch.compile wrapper is seen through)."""
    ends = HEADS.get(task_type(getattr(model, "_orig_mod", model)), ())
    if not ends:
        return []
    found = [n for n, _ in (named if named is not None else _named(model)) if n and n.endswith(ends)]
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]


# transformers class-name endings -> PEFT task_type (PeftModel.from_pretrained picks its class by it)
TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))
# a task -> the names of its head's modules (PEFT's modules_to_save for the task, matched as PEFT does: a
# module whose name ends with one; lowrank/io_prompt.py, Note: task heads)
HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def task_type(model: nn.Module) -> str:
    """PEFT's task_type for a transformers model, by its class name's ending."""
    cls = type(model).__name__
    return next((task for suffix, task in TASKS if cls.endswith(suffix)), "FEATURE_EXTRACTION")


def _named(model: nn.Module):
    """(name, module) for `model` ("") and every module below it, named as the filter sees them: adapter layers
    and torch's checkpoint_wrapper see-through (lowrank/walk.py)."""
    from .walk import _unwrap, _walk  # walk imports the tuners, which import this module

    return [("", model)] + [(n, _unwrap(c)) for _, _, n, c in _walk(model)]


# Note: layers read by weight. transformers' Mamba mixers (Mamba, Mamba2, FalconMamba) multiply by
# `dt_proj.weight` themselves, never calling the module, and their fused CUDA training path
# (mamba_inner_fn) takes `x_proj.weight` and `out_proj.weight` the same way: an adapter there would
# never run and never learn (and a 4-bit layer there would break the model). "all-linear" leaves
# them out; `in_proj`, called as a module on every path, stays in.
_MIXER_READS = ("x_proj", "dt_proj", "out_proj")


def read_by_weight(model: nn.Module) -> set[str]:
    """Names of the linear layers "all-linear" leaves out because their model reads their weight
    itself (See Note: layers read by weight)."""
    return {f"{n}.{c}" if n else c for n, m in _named(model)
            if "Mamba" in type(m).__name__ and type(m).__name__.endswith("Mixer")
            for c in _MIXER_READS if isinstance(getattr(m, c, None), nn.Module)}


# Note: routers. PhiMoE's and Llama 4's routers subclass nn.Linear but return routing (scores
# and the chosen experts), not x W^T + b: LoRA's sum around one, or a Linear4bit in its place,
# would break the model (PEFT 0.21 takes them for all-linear and fails in the forward). So
# "all-linear" leaves out an nn.Linear subclass with a forward of its own and a floating weight
# whose forward, tried once on a row of zeros, returns no tensor (a tuple, as routers do). A
# 4-bit linear of another library keeps its packed, integer weight and is taken, untried; a
# forward that fails on such a row or returns a tensor of its own sort (DeepSeek V4's grouped
# linear) is taken too, and quantize refuses it by name (quantize.py, Note: a forward of its
# own). To adapt a router, put LoRA on its weight: LoraConfig(parameters=["router.weight"]).
def returns_routing(module: nn.Module) -> bool:
    """Whether `module` is an nn.Linear whose own forward returns no tensor, a router (See Note:
    routers)."""
    cls = type(module)
    if not isinstance(module, nn.Linear) or cls.forward is nn.Linear.forward or not module.weight.is_floating_point():
        return False
    w = module.weight
    x = w.new_zeros(1, module.in_features)
    try:  # under fork_rng: a router in training mode may draw noise (PhiMoE's jitter), the caller's stream stays
        with torch.no_grad(), torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            out = cls.forward(module, x)  # the class's forward, no hooks
    except Exception:  # noqa: BLE001 (it takes other input: left to what refuses it by name, quantize's check)
        return False
    return not isinstance(out, torch.Tensor)


def _one(spec, heads: set[str]) -> Filter:
    if isinstance(spec, re.Pattern):
        return lambda name, module: spec.fullmatch(name) is not None
    if isinstance(spec, type):
        return lambda name, module: isinstance(module, spec)
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            # MultiheadAttention's out_proj is never called as a module (see inject), so not adapted
            return lambda name, module: (is_linear_like(module) and name not in heads
                                         and type(module).__name__ != "NonDynamicallyQuantizableLinear"
                                         and not returns_routing(module))
        if spec.startswith("re:"):
            pattern = re.compile(spec[3:])
            return lambda name, module: pattern.fullmatch(name) is not None
        if _GLOB_CHARS & set(spec):
            return lambda name, module: fnmatch.fnmatchcase(name, spec)
        return lambda name, module: name == spec or name.endswith("." + spec)
    if callable(spec):
        return lambda name, module: bool(spec(name, module))
    raise TypeError(f"a target must be str, re.Pattern, type or callable; got {spec!r}")


def compile_filter(targets: Iterable, exclude: Iterable, model: nn.Module) -> Filter:
    """One filter: matches any of `targets` and none of `exclude`."""
    targets, exclude = tuple(targets), tuple(exclude)
    needs_heads = any(isinstance(s, str) and s == ALL_LINEAR for s in targets + exclude)
    heads = output_head_names(model) | read_by_weight(model) if needs_heads else set()
    wanted = [_one(s, heads) for s in targets]
    unwanted = [_one(s, heads) for s in exclude]
    return lambda name, module: any(f(name, module) for f in wanted) and not any(f(name, module) for f in unwanted)


def first_match(patterns, name: str, module: nn.Module, default):
    """The value of the first pattern (same syntax as targets) that matches; else `default`.
    Used for LoraConfig.rank_pattern / alpha_pattern."""
    for spec, value in patterns.items():
        if _one(spec, set())(name, module):
            return value
    return default


# Note: modules their model never calls. transformers' state-space and hybrid mixers (Mamba,
# Mamba2, FalconMamba, Jamba, Bamba, Zamba, Qwen3-Next, Qwen3.5, LFM2, ... 20-odd in 5.24) pass
# their depthwise `conv1d.weight` to a causal-conv function and never call the module; MambaMixer
# multiplies by `dt_proj.weight` itself; nn.MultiheadAttention reads its projections' weights. An
# adapter wrapped around such a module never runs: no output changes and its parameters get no
# gradient (PEFT 0.21 refuses conv1d and out_proj on five Mamba model types by name, and adapts
# them silently elsewhere). nn.MultiheadAttention's are refused; for the others, told by
# their class's source (it reads `self.<name>.weight` and never calls nor passes `self.<name>`),
# inject warns, naming them: a guess from source text, and a PEFT file with such a module
# (trained there, where it did nothing either) still loads.
def refuse_in_attention(matches: list[tuple], kind: str) -> None:
    """Refuse targets inside nn.MultiheadAttention (See Note: modules their model never calls).
    matches: (parent, attr, name, module)."""
    for parent, _, where, _ in matches:
        if isinstance(parent, nn.MultiheadAttention):  # LoRA, and a bottleneck adapter that would never run
            raise ValueError(f"cannot put {kind} on {where!r}: nn.MultiheadAttention reads its projection "
                             "weights directly, never calling the submodule; exclude it (or put an adapter on the attention)")


def warn_uncalled(matches: list[tuple], kind: str) -> None:
    """Warn of targets whose parent never calls them (See Note: modules their model never calls)."""
    unused = {where: f"{type(parent).__name__}.{attr}" for parent, attr, where, _ in matches
              if _reads_weight_only(type(parent), attr)}
    if unused:
        warnings.warn(f"{kind} on {sorted(unused)[:4]} ({len(unused)} modules) would never run: their model reads their "
                      f"weight itself and never calls them ({sorted(set(unused.values()))[:4]}; PEFT's adapter does "
                      "not run there either), so they change no output and get no gradient; exclude them from targets",
                      stacklevel=3)


@functools.lru_cache(maxsize=None)
def _source(cls: type) -> str | None:
    """The source text of `cls`, or None (defined in a notebook cell, compiled, made by type()): one
    parse of its file per class, where each (class, attribute) asked for would parse it again."""
    try:
        return inspect.getsource(cls)
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=None)
def _reads_weight_only(cls: type, attr: str) -> bool:
    """Whether the source of `cls` and its bases reads self.<attr>.weight and never calls self.<attr>
    nor uses it whole; False where it cannot tell. The read is looked for outside torch and
    transformers' shared code (long files, read only when needed); the uses everywhere but nn.Module:
    a subclass of nn.TransformerEncoderLayer that reads linear2.weight has its call in torch's forward."""
    if not attr.isidentifier():
        return False
    own, shared = [], []
    for c in cls.__mro__:
        module = c.__module__ or ""
        if c in (nn.Module, object):
            continue
        library = module.split(".")[0] == "torch" or (module.startswith("transformers.")
                                                      and not module.startswith("transformers.models."))
        (shared if library else own).append(c)
    sources = [_source(c) for c in own]
    if None in sources or not re.search(rf"self\.{attr}\.weight\b", text := "\n".join(sources)):
        return False
    sources = [_source(c) for c in shared]
    if None in sources:
        return False
    text = "\n".join([text, *sources])
    uses = re.findall(rf"self\.{attr}\b(?!\s*=[^=])(\.\w+|\(|\[)?", text)  # an assignment is no use
    return all(u not in ("", "(", "[", ".forward", ".__call__") for u in uses)
