"""Frozen configs for the tuners. Each checks itself in __post_init__; none is ever mutated
after construction (PEFT rewrites `fan_in_fan_out` on the user's config; we detect layouts
per module instead). Per-target values are resolved by `lowrank.targets`, not stored here.

`targets` / `exclude` syntax (see docs/inject.md and lowrank/targets.py): an exact module
name, a dotted suffix ("q_proj" matches "model.layers.0.self_attn.q_proj"), a glob with
* ? [ ], a regular expression as "re:<pattern>" or a compiled re.Pattern (full match), a
module type, a callable (name, module) -> bool, "all-linear", or a sequence of these.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from torch import nn

Target = Union[str, re.Pattern, type, Callable[[str, nn.Module], bool]]
Targets = Union[Target, Sequence[Target]]

LORA_INITS = ("kaiming", "gaussian")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
PLACEMENTS = ("houlsby", "pfeiffer")


def _check_targets(field: str, value: Any, allow_none: bool) -> tuple:
    """Targets as a tuple (a lone string/type/callable becomes a 1-tuple)."""
    if value is None and allow_none:
        return ()
    items = (value,) if isinstance(value, (str, re.Pattern, type)) or callable(value) else value
    if isinstance(items, Mapping):  # its keys would be taken silently
        raise TypeError(f"{field} must be a name, glob, 're:<regex>', re.Pattern, module type, callable or a "
                        f"sequence of these, not a mapping; got {value!r}")
    if isinstance(items, (set, frozenset)):  # PEFT's target_modules may be a set: one order, whatever the hash seed
        items = sorted(items, key=lambda t: (not isinstance(t, str), str(t)))
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(
            f"{field} must be a name, glob, 're:<regex>', re.Pattern, module type, callable or a "
            f"sequence of these; got {value!r}"
        ) from None
    for t in items:
        if not isinstance(t, (str, re.Pattern, type)) and not callable(t):
            raise TypeError(f"{field} entries must be str, re.Pattern, type or callable; got {t!r} ({type(t).__name__})")
        if isinstance(t, str) and not t:
            raise ValueError(f"{field} has an empty string; give a name, suffix, glob or 're:<regex>'")
        if isinstance(t, str) and t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise ValueError(f"{field} entry {t!r} is not a valid regular expression: {e}") from None
    if not items and not allow_none:
        raise ValueError(f"{field} is empty; name at least one target (or use 'all-linear')")
    return items


class FrozenMapping(Mapping):
    """A read-only mapping that, unlike types.MappingProxyType, pickles and deep-copies, so a
    model holding configs survives copy.deepcopy and torch.save."""

    def __init__(self, items: Mapping) -> None:
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))


def _frozen_mapping(field: str, value: Mapping, kind: type, positive: bool) -> Mapping:
    """A read-only copy (the user's dict stays theirs), with every value checked."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{field} must be a mapping from target pattern to {kind.__name__}; got {value!r}")
    for k, v in value.items():
        if isinstance(k, (tuple, frozenset)):  # _check_targets takes a sequence; first_match reads a key as one pattern
            raise TypeError(f"{field} key {k!r} is a {type(k).__name__}; each key is one target pattern (a name, glob, "
                            "'re:<regex>', re.Pattern, module type or callable): give each pattern its own entry")
        _check_targets(f"{field} key", k, allow_none=False)
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            raise TypeError(f"{field}[{k!r}] must be a {kind.__name__}; got {v!r}")
        if positive and not 0 < v < math.inf:
            raise ValueError(f"{field}[{k!r}] must be finite and > 0; got {v}")
    return FrozenMapping(value)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA (Hu et al. 2021): h = W0 x + (alpha / r) B A dropout(x), with rsLoRA and DoRA options."""

    r: int = 8  # rank of B A; 8 is the LoRA paper's and PEFT's common default
    alpha: float = 8.0  # scale numerator; alpha == r gives scale 1, so changing r keeps the update size
    dropout: float = 0.0  # on the adapter's input only; 0 keeps training deterministic (PEFT's default)
    targets: Targets = "all-linear"  # any model works out of the box; QLoRA: adapting every linear layer matters most
    exclude: Targets | None = None  # same syntax as targets; None excludes nothing
    rslora: bool = False  # scale alpha / sqrt(r) (Kalajdzievski 2023): stable updates as r grows
    dora: bool = False  # DoRA (Liu et al. 2024): magnitude vector and normalised direction
    init: str = "kaiming"  # A ~ kaiming-uniform as nn.Linear (loralib, PEFT); "gaussian": A ~ N(0, 1/r^2); B = 0 always
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)  # target pattern -> r; first match wins
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)  # target pattern -> alpha
    # parameters that no linear module holds (PEFT's target_parameters): a MoE layer's 3-D experts,
    # "experts.gate_up_proj"; same syntax as targets, over parameter names (tuners/lora_param.py)
    parameters: Targets | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the LoRA rank) must be an integer >= 1; got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 0; got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        for field in ("rslora", "dora"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be a bool (True or False); got {getattr(self, field)!r}")
        if self.init not in LORA_INITS:
            raise ValueError(f"init must be one of {LORA_INITS}; got {self.init!r}")
        object.__setattr__(self, "parameters", _check_targets("parameters", self.parameters, allow_none=True))
        if self.parameters:
            self._check_parameters()
        if self.targets is None and not self.parameters:
            raise ValueError("targets is None and parameters names nothing: give the modules LoRA adapts (or "
                             "'all-linear'), or the parameters (parameters=['experts.gate_up_proj'])")
        object.__setattr__(self, "targets", _check_targets("targets", self.targets, allow_none=bool(self.parameters)))
        object.__setattr__(self, "exclude", _check_targets("exclude", self.exclude, allow_none=True))
        object.__setattr__(self, "rank_pattern", _frozen_mapping("rank_pattern", self.rank_pattern, int, True))
        object.__setattr__(self, "alpha_pattern", _frozen_mapping("alpha_pattern", self.alpha_pattern, float, True))

    def _check_parameters(self) -> None:
        """What LoRA on a parameter cannot do, refused as PEFT's ParamWrapper refuses it: the update
        is folded into the weight, so there is no input of its own to drop out, nor a DoRA norm."""
        if "all-linear" in self.parameters:
            raise ValueError("parameters names parameters ('experts.gate_up_proj', a glob, 're:...'); 'all-linear' "
                             "names modules and belongs in targets")
        if self.dropout:
            raise ValueError(f"dropout must be 0 with parameters={list(self.parameters)!r}: LoRA on a parameter "
                             f"changes the weight, and has no input of its own to drop out; got dropout={self.dropout}")
        if self.dora:
            raise ValueError(f"DoRA is not supported with parameters={list(self.parameters)!r} (nor in PEFT); "
                             "use plain LoRA (dora=False)")

    def scale(self, r: int, alpha: float) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.rslora else alpha / r


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapter (Houlsby et al. 2019): h + s * up(act(down(h))); parallel (He et al.
    2022): f(x) + s * up(act(down(x))). Default targets per placement: lowrank.tuners.adapter."""

    placement: str = "pfeiffer"  # FFN only: Pfeiffer et al. 2021 match Houlsby's two adapters at half the parameters
    parallel: bool = False  # True: beside the module, fed its input (He et al. 2022), not after its output
    reduction_factor: float = 16.0  # bottleneck = hidden // 16: Pfeiffer et al.'s default
    bottleneck_size: int | None = None  # an explicit bottleneck width; overrides reduction_factor when set
    activation: str = "relu"  # Houlsby / Pfeiffer / AdapterHub default non-linearity
    scaling: float = 1.0  # s; He et al. use 4.0 for the parallel adapter
    targets: Targets | None = None  # None: the placement's defaults for Llama, GPT-2, BERT, nn.TransformerEncoderLayer
    exclude: Targets | None = None  # same syntax as targets

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}; got {self.placement!r}")
        if not isinstance(self.parallel, bool):
            raise TypeError(f"parallel must be a bool; got {self.parallel!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, (int, float)) \
                or not 1 <= self.reduction_factor < math.inf:
            raise ValueError(f"reduction_factor must be a finite number >= 1; got {self.reduction_factor!r}")
        if self.bottleneck_size is not None and (
            isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1
        ):
            raise ValueError(f"bottleneck_size must be None or an integer >= 1; got {self.bottleneck_size!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {self.activation!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number; got {self.scaling!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", _check_targets("targets", self.targets, allow_none=False))
        object.__setattr__(self, "exclude", _check_targets("exclude", self.exclude, allow_none=True))

    def width(self, hidden: int) -> int:
        """The bottleneck width m for a module of output size `hidden`."""
        return self.bottleneck_size or max(1, int(hidden // self.reduction_factor))


PROMPT_INITS = ("random", "vocab", "text")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """Prompt tuning (Lester et al. 2021): n trainable virtual-token embeddings P (n, d) are
    prepended to the input embeddings, [P; E(x)], and only P trains. Mechanism and what a
    custom model must offer: lowrank.tuners.prompt and docs/prompt.md."""

    num_virtual_tokens: int = 20  # n; Lester et al. (sec. 3.2): beyond 20 tokens the gains are marginal
    init: str = "random"  # needs nothing else; "vocab": rows of random vocabulary tokens; "text": init_text's tokens
    init_text: str | None = None  # for init="text": tokenized, then cut or repeated to n tokens (as PEFT does)
    tokenizer: Any = None  # for init="text": a tokenizer object (called as tokenizer(text)["input_ids"]) or a local path
    targets: Targets | None = None  # None: the model's input embedding (get_input_embeddings()), see tuners/prompt.py
    exclude: Targets | None = None  # same syntax as targets

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_virtual_tokens must be an integer >= 1; got {n!r}")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"init must be one of {PROMPT_INITS}; got {self.init!r}")
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text:
                raise ValueError(f"init='text' needs init_text, a non-empty string; got {self.init_text!r}")
            if self.tokenizer is None:
                raise ValueError("init='text' needs tokenizer=, a tokenizer object or a local tokenizer directory")
        elif self.init_text is not None or self.tokenizer is not None:
            raise ValueError(f"init_text / tokenizer are used by init='text' only; got init={self.init!r} with "
                             f"init_text={self.init_text!r}, tokenizer={self.tokenizer!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", _check_targets("targets", self.targets, allow_none=False))
        object.__setattr__(self, "exclude", _check_targets("exclude", self.exclude, allow_none=True))


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning (Li & Liang 2021): P trainable key/value vectors before the sequence in
    every attention layer. `projection_hidden=None` is P-tuning v2 (Liu et al. 2022): the
    prefixes are the parameters; an int h: they come from a shared MLP with hidden width h
    (the paper's reparameterisation), foldable into plain prefixes (lowrank.tuners.prefix.fold)."""

    num_virtual_tokens: int = 20  # P; PEFT's usual choice; Li & Liang found 10-200 best, task-dependent
    projection_hidden: int | None = None  # None: P-tuning v2 (no MLP); Li & Liang used an MLP of width 512/800
    targets: Targets | None = None  # None: every attention module (lowrank.tuners.prefix.default_targets)
    exclude: Targets | None = None  # same syntax as targets

    def __post_init__(self) -> None:
        P = self.num_virtual_tokens
        if isinstance(P, bool) or not isinstance(P, int) or P < 1:
            raise ValueError(f"num_virtual_tokens must be an integer >= 1; got {P!r}")
        h = self.projection_hidden
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"projection_hidden must be None (P-tuning v2: no MLP) or an integer >= 1; got {h!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", _check_targets("targets", self.targets, allow_none=False))
        object.__setattr__(self, "exclude", _check_targets("exclude", self.exclude, allow_none=True))

    @classmethod
    def p_tuning_v2(cls, num_virtual_tokens: int = 20, **kwargs) -> "PrefixConfig":
        """P-tuning v2 (Liu et al. 2022): prefixes at every layer, no reparameterisation MLP."""
        return cls(num_virtual_tokens=num_virtual_tokens, projection_hidden=None, **kwargs)
