"""`quantize(model, NF4Config())`: replace linear layers with frozen 4-bit ones, in place.

Three parts, as `inject`: a target filter (lowrank.targets), one module constructor
(Linear4bit.from_linear), and a walk over named children. Layers are replaced one at a
time, so each full-precision weight is freed as soon as its 4-bit copy exists.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from ..config import Targets, _check_targets
from ..targets import ALL_LINEAR, compile_filter, is_gpt2_conv1d
from . import nf4
from .linear4bit import Linear4bit, Stored4bit
from .params4bit import Weight4bit, check_owner, names_4bit, quantize_parameter


@dataclasses.dataclass(frozen=True)
class NF4Config:
    """How `quantize` stores a model's linear layers (QLoRA, Dettmers et al. 2023, section 3)."""

    blocksize: int = 64  # elements per scale; QLoRA's and bitsandbytes' default for NF4
    double_quant: bool = True  # 8-bit scales: 4.127 instead of 4.5 bits per parameter (QLoRA, section 3)
    compute_dtype: torch.dtype | None = None  # None: each layer computes in its weight's original dtype
    targets: Targets | None = "all-linear"  # every linear layer but the output head, whose error reaches the logits directly
    skip: Targets | None = None  # same syntax as targets; None skips nothing
    # parameters no linear layer holds, by "<module>.<parameter>" (same syntax): a MoE layer's 3-D
    # experts, e.g. ["experts.gate_up_proj", "experts.down_proj"] (lowrank/quant/params4bit.py)
    parameters: Targets | None = None

    def __post_init__(self) -> None:
        if type(self.blocksize) is not int or self.blocksize not in nf4.BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {nf4.BLOCKSIZES}; got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool; got {self.double_quant!r}")
        if self.compute_dtype is not None and self.compute_dtype not in nf4.DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {nf4.DTYPES}; got {self.compute_dtype!r}")
        object.__setattr__(self, "parameters", _check_targets("parameters", self.parameters, allow_none=True))
        if self.parameters and ALL_LINEAR in self.parameters:
            raise ValueError("parameters names parameters ('experts.gate_up_proj', a glob, 're:...'); 'all-linear' "
                             "names modules: put it in targets")
        if self.targets is None and not self.parameters:
            raise ValueError("targets is None and parameters names nothing: give the layers to quantize (or "
                             "'all-linear'), or the parameters (parameters=['experts.gate_up_proj'])")
        # None (stored as ()): no linear layer, the parameters alone (a MoE model's experts in 4 bits, its
        # attention dense); () is taken back too, so dataclasses.replace(config, ...) rebuilds such a config
        object.__setattr__(self, "targets", _check_targets("targets", self.targets, allow_none=bool(self.parameters)))
        object.__setattr__(self, "skip", _check_targets("skip", self.skip, allow_none=True))


# Note: modules kept in float32. A transformers model may name modules whose weights must stay
# full precision (`_keep_in_fp32_modules`: T5's `wo`, for numerical stability); transformers'
# bitsandbytes loading never quantizes them, so a checkpoint holding them in 4 bits would not load
# there. The default targets ("all-linear") leave them dense too, matched as transformers matches
# them (quantizers_utils.should_convert_module: a prefix up to a module boundary, or a suffix); a
# target naming such a module still quantizes it.
def selected(model: nn.Module, config: NF4Config):
    """The (name, module) filter of the layers `config` quantizes in `model` (Note: modules kept in float32)."""
    wanted = compile_filter(config.targets, config.skip, model)
    keep = [k for a in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict") for k in getattr(model, a, None) or ()]
    if tuple(config.targets) != (ALL_LINEAR,) or not keep:
        return wanted
    kept = re.compile(rf"(?:{'|'.join(keep)})(?:(?<=\.)|(?=\.|$))")
    return lambda name, module: wanted(name, module) and not (kept.match(name) or name.endswith(tuple(keep)))


def bnb_kinds() -> tuple[type, ...]:
    """bitsandbytes' own 4- and 8-bit linear layers (what transformers' BitsAndBytesConfig loads), when it is loaded."""
    bnb = sys.modules.get("bitsandbytes")  # loaded already if the model holds its layers; never imported here
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


def _can_quantize(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


def _walk(module: nn.Module, prefix: str = "", every: bool = False):
    """(parent, attribute, qualified name, child) for every module below `module`, adapter
    layers see-through as lowrank.inject names them: below one, its base's children, never the
    adapters' own layers (quantizing a LoRA factor froze it). A module registered twice in one
    parent is named once (named_children), or at every place when `every`."""
    from ..tuners.base import TunerLayer  # here: lowrank.tuners imports lowrank.quant

    from ..walk import child_name, is_checkpoint_wrapper  # here: lowrank.walk imports lowrank.tuners -> lowrank.quant

    children = [(a, c) for a, c in module._modules.items() if c is not None] if every else module.named_children()
    for attr, child in list(children):
        if isinstance(child, Weight4bit):  # a 4-bit parameter of `module`, not a layer
            continue
        name = child_name(prefix, attr)
        if not is_checkpoint_wrapper(child):
            yield module, attr, name, child
        while isinstance(child, TunerLayer):
            child = child.base
        yield from _walk(child, name, every)


def weight_owners(model: nn.Module) -> dict[int, list[tuple[str, int]]]:
    """id(parameter) -> (name, id(module)) of every module that registers it: two modules mean a
    tied weight. Ids, not modules: see Note: no references to the layers."""
    owners: dict[int, list[tuple[str, int]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((name, id(module)))
    return owners


def tied_to(owners: dict, p: nn.Parameter, module: nn.Module) -> list[str]:
    """The other modules that register `module`'s parameter `p` (owners: weight_owners(model))."""
    return sorted({n for n, m in owners.get(id(p), ()) if m != id(module)})


def refuse_tied(name: str, layer: nn.Module, owners: dict) -> None:
    """Raise when `layer`'s weight is tied to another module's (GPT-2's head and its embedding)."""
    others = tied_to(owners, layer.weight, layer)
    if others:
        # Note: tied weights stay dense. A 4-bit copy would untie the two: the embedding keeps its
        # full-precision weight (no memory saved) and a checkpoint of the two no longer loads where
        # tie_weights() expects one tensor. transformers leaves tied weights out of bitsandbytes
        # quantization too (get_keys_to_not_convert, transformers/quantizers/base.py).
        raise ValueError(f"cannot quantize {name!r}: its weight is tied to {others} (one tensor, shared); a tied "
                         f"weight stays full precision: leave {name!r} out of targets or add it to skip")


def check_forward(name: str, layer: nn.Module) -> None:
    """Refuse a subclass of nn.Linear whose own forward is not x W^T + b (See Note: a forward of its own)."""
    if type(layer).forward is nn.Linear.forward or not isinstance(layer, nn.Linear):
        return
    what = f"{name!r} is a {type(layer).__name__}, an nn.Linear with a forward of its own"
    if layer.weight.is_meta:  # a skeleton's layer (load_and_quantize): a copy whose meta tensors get made-up values
        layer, g = copy.deepcopy(layer), torch.Generator().manual_seed(0)
        for m in layer.modules():
            for store in (m._parameters, m._buffers):
                for key, t in store.items():
                    if t is not None and t.is_meta:  # a real buffer (rotary tables, a scale) keeps its value
                        made = torch.empty(t.shape, dtype=t.dtype).uniform_(-1, 1, generator=g)
                        store[key] = nn.Parameter(made, requires_grad=False) if store is m._parameters else made
    w, b = layer.weight, layer.bias
    k = layer.in_features
    if k == 0:
        return
    x = torch.zeros(3, k, dtype=w.dtype, device=w.device)  # e_0, e_(k-1), e_(k/2) + e_(k/3): exact products
    x[0, 0] = x[1, k - 1] = 1
    x[2, k // 2] += 1
    x[2, k // 3] += 1
    with torch.no_grad():
        try:
            out, ref = type(layer).forward(layer, x), F.linear(x, w, b)  # the class's forward, no hooks
        except Exception as e:  # noqa: BLE001: a forward that takes no (rows, in_features) input is not x W^T + b
            raise TypeError(f"{what}, which does not take a (rows, {k}) input as a linear layer does ({e}); add it "
                            "to skip") from e
        terms = x.abs() @ w.abs().T + (b.abs() if b is not None else 0)  # a few roundings of these at most
        bound = 4 * torch.finfo(w.dtype).eps * terms.float() + torch.finfo(w.dtype).tiny
        same = (isinstance(out, torch.Tensor) and out.shape == ref.shape and out.is_floating_point()
                and bool((((out.float() - ref.float()).abs() <= bound) | (out == ref)).all()))  # == : the same inf
    if not same:
        raise TypeError(f"{what}, which does not compute x W^T + b (tried on a few one-hot rows); a Linear4bit in "
                        "its place would compute something else: add it to skip")


# Note: a forward of its own. quantize puts a Linear4bit (x W^T + b) where an nn.Linear was. A
# subclass may compute otherwise (Llama 4's router returns a tuple; a custom layer scales its
# output) or the same in other words (Falcon's FalconLinear: x W^T, then + b). Its class's
# forward is called once on three rows (e_0, e_(k-1), e_i + e_j: their products with W are
# exact in any dtype, so an affine forward differs from F.linear by a few roundings of the sums)
# and compared with F.linear: the same, it is quantized; otherwise refused (skip it). On the meta
# device (load_and_quantize's skeleton) it runs on a copy whose meta tensors get made-up values
# (real buffers keep theirs), for every layer: a class's instances may differ (a scale each).


def _check_weight(name: str, w: torch.Tensor, double_quant: bool = False, blocksize: int = 64) -> None:
    """Before any layer is replaced: what nf4.quantize would refuse half way through."""
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ValueError(f"{name!r} is a lazy layer not yet materialized; run one forward pass before quantize")
    if w.is_meta:
        raise ValueError(f"{name!r} has its weight on the meta device, with no values to quantize; to fill a model "
                         "built under lowrank.skeleton(), read a dense checkpoint into 4 bits with "
                         "lowrank.load_and_quantize(model, path, config), or a 4-bit one with lowrank.load_quantized(model, path)")
    if w.dtype not in nf4.DTYPES:
        raise TypeError(f"{name!r} has a {w.dtype} weight; NF4 quantizes {', '.join(map(str, nf4.DTYPES))} weights: "
                        "cast the model first, e.g. model.float()")
    largest = torch.aminmax(w.detach()) if w.numel() else (w.new_zeros(()),) * 2  # no copy of w; NaN propagates
    largest = torch.maximum(-largest[0], largest[1])
    if not torch.isfinite(largest):  # NaN propagates through amax
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name!r} has {bad} non-finite weight value(s) (NaN or Inf) of {w.numel()}; NF4 scales are "
                         "block maxima and cannot hold them: fix the weights or add the layer to skip")
    blocks = -(-w.numel() // blocksize)
    if double_quant and float(largest) * blocks >= torch.finfo(torch.float32).max:  # nf4.quantize_scales' mean
        raise ValueError(f"{name!r} has weights up to {float(largest):.4g}: the mean of its {blocks} block maxima, "
                         "which double quantization takes in float32, could overflow; use double_quant=False or "
                         "add the layer to skip")


def quantize(model: nn.Module, config: NF4Config | None = None) -> list[str]:
    """Replace every linear layer of `model` that `config.targets` matches (and `config.skip`
    does not) with a frozen Linear4bit on the same device, in place. Returns the qualified
    names replaced; raises, changing nothing, when nothing matched or a match cannot be
    quantized (not a linear layer, a weight tied to another module's, a float64, meta or
    non-finite weight). Layers already in 4 bits are left as they are. `config.parameters`
    quantizes parameters in place too (lowrank/quant/params4bit.py); their names
    ("<module>.<parameter>") follow the layers' in the list returned."""
    config = NF4Config() if config is None else config
    if not isinstance(config, NF4Config):
        raise TypeError(f"config must be an NF4Config; got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize takes an nn.Module (the model); got {type(model).__name__}")
    from ..distributed import check_not_sharded  # here: lowrank.distributed is light, but keep quant free of it on import

    check_not_sharded(model, "quantize")
    wanted = selected(model, config)
    # Note: no references to the layers. `matches` keeps parents and attribute names only, so
    # once a layer is replaced nothing here holds its full-precision weight, and peak memory
    # stays about one layer above the quantized model (tests/quant/test_quantize.py checks it).
    # Note: a module registered at two places (one nn.Linear reused) becomes one Linear4bit at both.
    # Its id, taken while every match is alive, says which places share it.
    walked = [(p, a, n, id(c), wanted(n, c) and not isinstance(c, Linear4bit)) for p, a, n, c in _walk(model, every=True)]
    matches = [(p, a, n, key) for p, a, n, key, take in walked if take]
    places = {}  # id -> (name, id of parent, attribute) of each place: See Note: a module registered at two places
    for p, a, n, key, _ in walked:
        places.setdefault(key, []).append((n, id(p), a))
    del walked
    params = find_parameters(model, config)  # raises when config.parameters matches nothing, 4-bit or not
    if not matches and not config.targets:
        pass  # no linear layer asked for: the parameters alone (none left when all are 4-bit already)
    elif params and not matches and tuple(config.targets) == (ALL_LINEAR,):
        pass  # the default targets matching no layer: a model of experts alone
    elif not matches and isinstance(model, Linear4bit):
        raise ValueError("the model is itself a Linear4bit: it is in 4 bits already, and quantize replaces the layers "
                         "inside a model")
    elif not matches and _can_quantize(model):  # nothing holds the model to put a Linear4bit in its place
        raise ValueError(f"the model is itself a {type(model).__name__}, which quantize cannot replace in place (it "
                         "replaces the layers inside a model): use Linear4bit.from_linear(layer) and keep what it returns")
    elif not matches:
        candidates = [n for _, _, n, c in _walk(model) if _can_quantize(c)]
        done = [n for _, _, n, c in _walk(model) if isinstance(c, Linear4bit) and wanted(n, c)]  # quantized twice
        raise ValueError(
            f"no module of {type(model).__name__} matched targets={config.targets!r} (skip={config.skip!r}); "
            + (f"the {len(done)} layers they match are in 4 bits already (e.g. {done[:3]}): this model was quantized "
               "before; " if done else "")
            + f"quantize can replace e.g. {candidates[:6]} ({len(candidates)} nn.Linear / Conv1D layers not yet in 4 bits)"
        )
    owners, hooked = weight_owners(model), []
    taken = {(id(p), a) for p, a, *_ in matches}  # a block at two places: replacing fc in it replaces both
    for parent, attr, name, _ in matches:
        child = getattr(parent, attr)
        hooked += [name] if any(getattr(child, h) for h in _HOOKS) else []
        if not _can_quantize(child):
            from ..tuners.base import TunerLayer  # here: lowrank.tuners imports lowrank.quant

            hint = (" (an adapter layer: for QLoRA, quantize first and inject after, or lowrank.eject the adapters "
                    "first)" if isinstance(child, TunerLayer) else "")
            weights = [f"{name}.{p}" for p, w in child._parameters.items() if w is not None and w.dim() >= 2]
            hint += f"; its weights go in 4 bits by name: NF4Config(parameters={weights!r})" if weights and not hint else ""
            raise TypeError(f"{name!r} is a {type(child).__name__}; quantize replaces nn.Linear and GPT-2 Conv1D "
                            f"layers only: narrow targets or add it to skip{hint}")
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"cannot quantize {name!r}: nn.MultiheadAttention reads its projection weights directly, "
                             "never calling the submodule; add it to skip")
        if isinstance(child, bnb_kinds()):  # an nn.Linear with a uint8 weight: not "cast the model first"
            raise TypeError(f"{name!r} is bitsandbytes' {type(child).__name__}, quantized already (a model loaded with "
                            "BitsAndBytesConfig): load the model without it to quantize here, or read its "
                            "save_pretrained directory with lowrank.load_quantized")
        refuse_tied(name, child, owners)
        dense = sorted(n for n, parent_id, a in places[id(child)] if (parent_id, a) not in taken)
        if dense:  # one module at two places, targets or skip leaving one of them dense: as a tied weight
            raise ValueError(f"cannot quantize {name!r} alone: the same module is also at {dense}, which targets or "
                             "skip leave dense; a 4-bit layer here would untie the two and keep the full-precision "
                             "weight: target or skip every place it is at")
        _check_weight(name, child.weight, config.double_quant, config.blocksize)
        check_forward(name, child)
    if matches:
        del child  # See Note: no references to the layers.
    if hooked:
        warnings.warn(f"quantize: {hooked[:4]}{' ...' if len(hooked) > 4 else ''} ({len(hooked)} layers) have forward or "
                      "backward hooks of their own, which the Linear4bit taking each one's place does not carry: register "
                      "them again on model.get_submodule(name)", stacklevel=2)
    check_parameters(model, params, config, {n for _, _, n, _ in matches})
    done: dict[int, Linear4bit] = {}  # id of a replaced layer -> its 4-bit layer: See Note: a module registered at two places
    for parent, attr, _, key in matches:  # See Note: no references to the layers.
        if key not in done:
            done[key] = Linear4bit.from_linear(getattr(parent, attr), config.blocksize, config.double_quant,
                                               config.compute_dtype)
        setattr(parent, attr, done[key])  # the full-precision layer's last reference goes here
    for owner, _, p in params:
        quantize_parameter(owner, p, config.blocksize, config.double_quant, config.compute_dtype)
    fused_paths_off(model)
    return [name for _, _, name, _ in matches] + [f"{where}.{p}" if where else p for _, where, p in params]


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")  # a module's own


def fused_paths_off(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer's eval fast path reads linear1.weight etc. as tensors and never calls the
    layers (a Linear4bit's weight is an NF4Weight: a TypeError), and nn.TransformerEncoder hands its layers
    NestedTensors: as inject does for adapters (lowrank/tuners/base.py, Note: fused fast paths; restore.py,
    Note: no nested tensors through adapters), each 4-bit layer there gets the empty pre-hook that sends torch
    down the module-by-module path, and the encoder keeps its padded batches padded. So does a 4-bit parameter
    there (self_attn.in_proj_weight, a Weight4bit: its owner dequantizes it only when called)."""
    from ..tuners.base import _keep_fused_paths_off  # here: lowrank.tuners imports lowrank.quant

    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoderLayer):
            for m in enc.modules():
                if isinstance(m, Stored4bit) and _keep_fused_paths_off not in m._forward_pre_hooks.values():
                    m.register_forward_pre_hook(_keep_fused_paths_off)
        elif isinstance(enc, nn.TransformerEncoder) and any(isinstance(m, Stored4bit) for m in enc.modules()):
            enc.use_nested_tensor = False


def find_parameters(model: nn.Module, config: NF4Config) -> list[tuple[nn.Module, str, str]]:
    """(owner, its name, parameter name) for every parameter `config.parameters` matches by its
    qualified name, and `config.skip` matches neither by that nor by its module's name; each
    module once, its parameters in the order it registered them. Raises when parameters is
    given and matches nothing."""
    from ..tuners.base import TunerLayer, innermost  # here: lowrank.tuners imports lowrank.quant

    if not config.parameters:
        return []
    wanted = compile_filter(config.parameters, (), model)
    skipped = compile_filter(config.skip, (), model)
    out, seen, candidates, already = [], set(), [], False
    for where, owner in [("", model)] + [(n, c) for _, _, n, c in _walk(model)]:
        inner = innermost(owner)
        if id(owner) in seen or isinstance(inner, Stored4bit):
            continue
        seen.add(id(owner))
        already = already or any(wanted(f"{where}.{p}" if where else p, inner) for p in names_4bit(inner))
        for p, w in inner._parameters.items():
            key = f"{where}.{p}" if where else p
            if w is None:
                continue
            candidates += [key] if w.dim() >= 2 and not _can_quantize(inner) else []
            if not wanted(key, inner) or skipped(key, inner) or (where and skipped(where, inner)):
                continue
            if isinstance(owner, TunerLayer):
                raise ValueError(f"cannot quantize {key!r}: {where!r} holds adapters ({type(owner).__name__}); for "
                                 "QLoRA, quantize first and inject after, or lowrank.eject the adapters first")
            out.append((owner, where, p))
    if not out and not already:  # already 4-bit: left as they are, as layers are
        raise ValueError(f"parameters={config.parameters!r} (skip={config.skip!r}) matched no parameter of "
                         f"{type(model).__name__}; e.g. {candidates[:6]} ({len(candidates)} of 2 or more "
                         "dimensions outside linear layers)")
    return out


def check_parameters(model: nn.Module, params: list, config: NF4Config, layers: set[str], values: bool = True) -> None:
    """Raise, before anything changes, where a parameter `find_parameters` found cannot be quantized;
    its values too (finite, a dtype NF4 takes) unless not `values` (a skeleton's, on the meta device)."""
    owners = weight_owners(model) if params else {}
    for owner, where, p in params:
        key, w = f"{where}.{p}" if where else p, owner._parameters[p]
        if _can_quantize(owner) or where in layers:
            try:  # a router that subclasses nn.Linear (PhiMoE's) cannot become a Linear4bit either: not that advice
                if where not in layers:
                    check_forward(where, owner)
            except TypeError as e:
                raise ValueError(f"cannot quantize parameter {key!r} of the linear layer {where!r} on its own, nor "
                                 f"the layer: {e}") from e
            raise ValueError(f"cannot quantize parameter {key!r} of the linear layer {where!r} on its own; name the "
                             "layer in targets (it becomes a Linear4bit)")
        if w.dim() < 2:
            raise ValueError(f"cannot quantize {key!r}, a {w.dim()}-D parameter (a bias or a scale): a 4-bit parameter "
                             "is a weight of 2 or more dimensions, such as a MoE layer's 3-D experts")
        tied = tied_to(owners, w, owner)
        if tied:
            raise ValueError(f"cannot quantize {key!r}: it is tied to a parameter of {tied} (one tensor, shared); a "
                             "tied weight stays full precision: leave it out of parameters or add it to skip")
        if values:
            _check_weight(key, w, config.double_quant, config.blocksize)
        check_owner(key, owner)
