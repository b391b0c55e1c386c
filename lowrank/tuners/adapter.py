"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; parallel: He et al. 2022),
around any nn.Module: the adapter reads the module's output (sequential) or its input
(parallel) and adds to the output. Non-linear, so never merged into weights.

Default targets per placement (used when AdapterConfig.targets is None):

    architecture                  attention output          feed-forward
    transformers Llama            self_attn.o_proj          mlp
    transformers GPT-2            attn.c_proj               mlp
    transformers BERT / MiniLM    attention.output.dense    layer.N.output.dense
    transformers GPT-NeoX         attention.dense           mlp
    transformers Falcon           self_attention.dense      mlp
    transformers Bloom            self_attention.dense      mlp.dense_4h_to_h (parallel: mlp)
    transformers Phi              self_attn.dense           mlp
    transformers GPT-J, CodeGen   attn.out_proj             mlp
    transformers T5, mT5, UMT5    SelfAttention.o           DenseReluDense
    transformers LongT5           its encoder's LocalSelfAttention.o / TransientGlobalSelfAttention.o
    nn.TransformerEncoderLayer    self_attn (the MHA)       linear2
    nn.TransformerDecoderLayer    self_attn (not the cross- linear2
                                  attention multihead_attn)

Houlsby adapts both columns, Pfeiffer the feed-forward only; a model where Houlsby's attention
names match nothing is refused (it would get Pfeiffer's adapters). Each adapter sits on the
sublayer's output, before the block's residual sum and layer norm (Houlsby et al.'s place).
For any other model, name targets.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..config import AdapterConfig
from ..targets import compile_filter, is_gpt2_conv1d, is_linear_like, returns_routing
from .base import TunerLayer, cast_for, innermost
from .lora_base import float_dtype_and_device

def attn_out_proj(name: str, module: nn.Module) -> bool:
    """GPT-J's and CodeGen's attention output `attn.out_proj`; not the out_proj of an
    nn.MultiheadAttention named attn (open_clip's blocks), which that attention reads by weight."""
    return (name == "attn.out_proj" or name.endswith(".attn.out_proj")) and \
        type(module).__name__ != "NonDynamicallyQuantizableLinear"


def self_attention_mha(name: str, module: nn.Module) -> bool:
    """An nn.MultiheadAttention (default_targets leaves out nn.TransformerDecoderLayer's cross-attention
    `multihead_attn`, as T5's EncDecAttention is, below)."""
    return isinstance(module, nn.MultiheadAttention)


def _attention_targets(model: nn.Module, modules: list) -> tuple:
    """ATTENTION_TARGETS without the cross-attention `multihead_attn` of each nn.TransformerDecoderLayer
    in `model`; an MHA of the model's own named so (torch's docs name a self-attention `multihead_attn`)
    stays a target."""
    cross = {f"{n}.multihead_attn" if n else "multihead_attn" for n, m in [("", model), *modules]
             if isinstance(m, nn.TransformerDecoderLayer)}

    def self_attention_mha(name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention) and name not in cross

    return (*ATTENTION_TARGETS[:-1], self_attention_mha)


ATTENTION_TARGETS = ("self_attn.o_proj", "attn.c_proj", "attention.output.dense", "attention.dense",
                     "self_attention.dense", "self_attn.dense", attn_out_proj, "SelfAttention.o",
                     "LocalSelfAttention.o", "TransientGlobalSelfAttention.o",  # LongT5's encoder self-attention
                     self_attention_mha)
# T5's feed-forward block and self-attention output, before their residual sums (T5LayerFF, T5LayerSelfAttention);
# a decoder's cross-attention (EncDecAttention) is left out, as AdapterHub's Houlsby config leaves it
FFN_TARGETS = ("mlp", r"re:(.*\.)?layer\.\d+\.output\.dense", "linear2", "DenseReluDense")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _sums_residual(module: nn.Module) -> bool:
    """A feed-forward block that adds the residual itself, given it as an argument (Bloom's
    mlp(hidden_states, residual))."""
    try:
        return "residual" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def mlp(name: str, module: nn.Module) -> bool:
    """A sequential adapter's `mlp`: one whose output is the feed-forward's alone, not Bloom's (its
    output is the residual stream: the adapter goes on its last linear layer instead)."""
    return (name == "mlp" or name.endswith(".mlp")) and not _sums_residual(module)


def _ffn_targets(modules: list, config: AdapterConfig) -> tuple:
    """The feed-forward column. A parallel adapter reads an mlp's input and adds to its output, so
    Bloom's mlp is its place too; a sequential one goes before the residual sum: on the last linear
    layer of an mlp that adds the residual itself (Bloom's dense_4h_to_h)."""
    last = []
    for n, m in modules if not config.parallel else ():
        if (n == "mlp" or n.endswith(".mlp")) and _sums_residual(m):
            linears = [c for c, sub in m.named_children() if is_linear_like(innermost(sub))]
            last += [f"{n}.{linears[-1]}"] if linears else []
    return (mlp, *FFN_TARGETS[1:], *last) if last else FFN_TARGETS


def default_targets(model: nn.Module, config: AdapterConfig) -> tuple:
    """The placement's default targets; for Houlsby, a model where the names of one of its two
    columns match nothing is refused (it would get half of Houlsby's adapters)."""
    from ..walk import _unwrap, _walk  # walk imports the tuners

    modules = [(n, _unwrap(c)) for _, _, n, c in _walk(model)]
    ffn = _ffn_targets(modules, config)
    if config.placement != "houlsby":
        return ffn
    attention = _attention_targets(model, modules)
    for column, names in (("attention output", attention), ("feed-forward", ffn)):
        wanted = compile_filter(names, config.exclude, model)
        if not any(wanted(n, m) for n, m in modules):
            excluded = f" (after exclude={list(config.exclude)})" if config.exclude else ""
            raise ValueError(f"placement='houlsby' adapts each block's attention output and feed-forward, and none of "
                             f"its default names for the {column} {[getattr(t, '__name__', t) for t in names]} is in "
                             f"{type(model).__name__}{excluded}; name the modules with AdapterConfig(targets=[...])")
    return ffn + attention


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    return (m.nx, m.nf) if is_gpt2_conv1d(m) else (m.in_features, m.out_features)


def _base_modules(module: nn.Module):
    """module's submodules, below an adapter layer only what it wraps (not LoRA's factors, which
    are linear layers of another size)."""
    for child in module._modules.values():
        while isinstance(child, TunerLayer):
            yield child
            child = child._modules["base"]
        if child is not None:
            yield child
            yield from _base_modules(child)


def _experts_hidden(module: nn.Module) -> int | None:
    """The hidden size of a transformers 5 experts module's 3-D parameters (dense or 4-bit):
    down_proj is (E, hidden, I), or (E, I, hidden) where it `is_transposed`; else None."""
    from ..quant.params4bit import has_parameter, parameter_shape

    if not hasattr(module, "is_transposed") or not has_parameter(module, "down_proj"):
        return None
    shape = parameter_shape(module, "down_proj")
    return None if len(shape) != 3 else shape[2] if module.is_transposed else shape[1]


def module_dims(module: nn.Module) -> tuple[int, int] | None:
    """(input size, output size) along the last dim: a linear-like module's own; a
    MultiheadAttention's embed_dim; otherwise its first linear-like submodule's input size and,
    as output size, that same size if a later linear-like submodule maps back to it (a block on
    the residual stream: LlamaMLP's down_proj; Qwen2-MoE's shared expert, not its 1-wide gate
    that comes last), else the last one's (BERT's output.dense 3072 -> 768); a mixture-of-experts
    block without linear layers (Mixtral's: a router and 3-D experts; a router that subclasses
    nn.Linear, PhiMoE's, is no linear layer: targets.py, Note: routers) maps its experts' hidden
    size to itself. LoRA's factors inside count for nothing. None when it cannot tell."""
    if is_linear_like(module):
        return _linear_dims(module)
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    inside = list(_base_modules(module))
    dims = [_linear_dims(m) for m in inside if is_linear_like(m) and not returns_routing(m)]  # PhiMoE's router
    if not dims:
        hidden = next((h for h in map(_experts_hidden, [module, *inside]) if h is not None), None)
        return None if hidden is None else (hidden, hidden)
    d_in = dims[0][0]
    return d_in, d_in if any(out == d_in for _, out in dims[1:]) else dims[-1][1]


class Bottleneck(nn.Module):
    """up(act(down(x))): d_in -> m -> d_out, up zero-initialised so it starts at 0."""

    def __init__(self, d_in: int, m: int, d_out: int, activation: str, dtype, device) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, m, dtype=dtype, device=device)  # nn.Linear's init (kaiming-uniform)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(m, d_out, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)  # up = 0: a fresh adapter adds nothing (Houlsby's near-identity init)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))  # (..., d_in) -> (..., m) -> (..., d_out)


class AdapterLayer(TunerLayer):
    """Named bottleneck adapters around `base` (any module; a tuple output adapts its first item)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, AdapterConfig] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def add(self, name: str, config: AdapterConfig, dims: tuple[int, int]) -> None:
        d_in, d_out = dims
        dtype, device = float_dtype_and_device(self.base, inner=True)  # See Note: inputs in the adapter's dtype (base.py)
        source = d_in if config.parallel else d_out
        self.adapters[name] = Bottleneck(source, config.width(d_out), d_out, config.activation, dtype, device)
        self.configs[name] = config

    def delete(self, name: str) -> None:
        del self.adapters[name]
        del self.configs[name]
        self.active = tuple(n for n in self.active if n != name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapters[name].parameters())

    # sequential (Houlsby, Pfeiffer):  h = f(x) + s * up(act(down(f(x))))
    # parallel   (He et al. 2022):     h = f(x) + s * up(act(down(x)))
    # several active adapters: their additions are summed, each fed f(x) or x.
    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if not self.enabled or (not self.active and self.route is None):  # a route picks adapters, active or not
            return out
        y = out[0] if isinstance(out, tuple) else out  # (..., d_out)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"a bottleneck adapter adds to its module's output tensor (or a tuple's first item); "
                            f"{type(self.base).__name__} returned a {type(y).__name__}: target a module inside it")
        # what a parallel adapter reads, the module's input; y stands in where none is parallel (routes need a batch)
        x = self._input(args, kwargs) if any(c.parallel for c in self.configs.values()) else y  # (..., d_in)
        if self.route is not None:
            y = self.routed(y, x, self._delta)
        else:
            base_y = y
            for name in self.active:
                y = y + self._delta(name, x, base_y)
        if not isinstance(out, tuple):
            return y
        if hasattr(out, "_fields"):  # a namedtuple stays one
            return type(out)(y, *out[1:])
        if hasattr(type(out), "n_fields"):  # a structseq (torch.return_types.max...) too: built from one sequence
            return type(out)((y, *out[1:]))
        return (y, *out[1:])

    def _input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The module's first argument, given by position or by name (MultiheadAttention's query)."""
        if args:
            x = args[0]
        else:
            # a prefix layer's (*args, **kwargs) names nothing: its module's do
            first = next(iter(inspect.signature(innermost(self.base).forward).parameters), None)
            x = kwargs.get(first)
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            seen = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"a parallel bottleneck adapter reads its module's first argument, a floating tensor; "
                            f"{type(self.base).__name__} got {seen}: target a module that takes hidden states")
        return x

    def _delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        config, adapter = self.configs[name], self.adapters[name]
        source = x if config.parallel else y
        if source.shape[-1] != adapter.down.in_features or y.shape[-1] != adapter.up.out_features:
            raise ValueError(f"bottleneck adapter {name!r} maps {adapter.down.in_features} -> {adapter.up.out_features} "
                             f"features (sized from {type(self.base).__name__}'s linear layers), but reads "
                             f"{source.shape[-1]} and adds to {y.shape[-1]}: target a module whose sizes it can tell")
        dtype = cast_for(source, adapter.down.weight.dtype)  # See Note: inputs in the adapter's dtype (base.py)
        if dtype is None:
            return config.scaling * adapter(source)
        return (config.scaling * adapter(source.to(dtype))).to(y.dtype)


def _container(module: nn.Module) -> bool:
    """A module with no forward (nn.ModuleList, nn.ModuleDict): its owner indexes or iterates it."""
    return type(module).forward is nn.Module.forward and "forward" not in vars(module)


def check(module: nn.Module, config: AdapterConfig, name: str, where: str) -> None:
    """Raise, before anything changes, if adapter `name` cannot go on `module` (at `where`)."""
    if isinstance(module, AdapterLayer) and name in module.names:
        raise ValueError(f"{where!r} already has a bottleneck adapter named {name!r}; inject under another name "
                         f"or remove it first with lowrank.eject(model, {name!r})")
    if any(c.__name__ == "PreTrainedModel" for c in type(innermost(module)).__mro__):  # transformers, not imported here
        raise TypeError(f"cannot put a bottleneck adapter on {where!r}: a {type(innermost(module)).__name__} returns a "
                        "ModelOutput, not hidden states; target its layers or blocks")
    if _container(innermost(module)):
        raise TypeError(f"cannot put a bottleneck adapter on {where!r}: a {type(innermost(module)).__name__} is a "
                        "container its owner indexes or iterates, never calls; target the modules inside it")
    if module_dims(innermost(module)) is None:
        raise TypeError(f"cannot size a bottleneck adapter for {where!r}, a {type(innermost(module)).__name__} with no "
                        "linear layers (or transformers experts) inside; target a linear layer or a block that "
                        "contains them")


def can_wrap(module: nn.Module) -> bool:
    """Whether `check` takes `module` (inject's suggestions when nothing matched)."""
    return (not _container(module) and module_dims(module) is not None
            and not any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__))


def wrap(module: nn.Module, config: AdapterConfig, name: str, where: str) -> nn.Module:
    """Add bottleneck adapter `name` around `module`; returns what should stand in its place."""
    layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
    layer.add(name, config, module_dims(innermost(module)))
    return layer
