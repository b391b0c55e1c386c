"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): every attention layer
attends to P trainable key/value vectors placed before the sequence.

    head_i = softmax(q_i [P_k ; K]^T / sqrt(d)) [P_v ; V]          (Li & Liang, eq. 1 with prefix)

P-tuning v2 is this, at every layer, with the prefixes themselves as the parameters
(`PrefixConfig(projection_hidden=None)`). With `projection_hidden=h` the prefixes come from
the paper's reparameterisation (its section 4.3), one MLP shared by every layer:

    [P_k ; P_v]_l = W2_l tanh(W1 E + b1) + b2_l       E: (P, d_kv), W1: (h, d_kv), W2_l: (2 d_kv, h)

W2_l are layer l's rows of the MLP's last linear layer, so each layer holds its own rows and
the first layer holds the shared E, W1, b1 (Note: where the reparameterisation lives).
`fold(model)` turns it into plain prefixes (what is saved, and what inference needs).

How the prefix reaches the attention (Note: the prefix goes in through cache.update):
lowrank.tuners.prefix_attention.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from ..config import PrefixConfig
from .base import TunerLayer, innermost
from .lora_base import float_dtype_and_device
from .prefix_attention import CACHE_ARGS, cache_arg, install_position_shift, remove_position_shift, with_prefix
from .prefix_mha import check_mha, mha_forward
from .prompt_hooks import input_embeddings_of

# Note: where the reparameterisation lives. The MLP's first half (E, W1, b1) is shared by all
# layers; its last linear layer splits by rows into one (2 d_kv, h) block per layer. Each
# PrefixLayer owns its block (`up`), and the first layer of an adapter also owns the shared
# half (`shared`): every parameter sits in exactly one layer, so state_dict, summary and
# mark_trainable see each once. The other layers reach the shared half through a plain
# (unregistered) reference set by `attach`; eject removes an adapter from every layer at once.


def kv_shape(module: nn.Module) -> tuple[int, int] | None:
    """(key/value heads, head dim) of an attention module, or None when it cannot tell.
    Read from the module's attributes as transformers and torch name them; the key
    projection's width, when there is one, decides the number of key/value heads (GQA)."""
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads, module.head_dim
    dim = next((getattr(module, a) for a in ("head_dim", "attention_head_size", "head_size")
                if isinstance(getattr(module, a, None), int)), None)
    if dim is None or getattr(module, "v_head_dim", dim) != dim:  # values of another head size (MLA, MiMo-V2):
        return None  # one prefix width cannot serve keys and values
    for proj in ("k_proj", "key", "k"):
        width = getattr(getattr(module, proj, None), "out_features", None)
        if isinstance(width, int) and width % dim == 0:
            return width // dim, dim
    if getattr(module, "new_decoder_architecture", None) is False and isinstance(getattr(module, "num_kv_heads", None), int):
        return module.num_kv_heads, dim  # Falcon's first layout caches num_kv_heads (1 with multi_query); the new one, all
    config = getattr(module, "config", None)
    for source, attr in [(module, "num_key_value_heads"), (config, "num_key_value_heads"), (module, "num_heads"),
                         (module, "num_attention_heads"), (config, "num_attention_heads")]:
        heads = getattr(source, attr, None)
        if isinstance(heads, int):
            return heads, dim
    return None


def is_attention(module: nn.Module) -> bool:
    """Can carry a prefix: nn.MultiheadAttention, or a self-attention module whose forward takes
    a KV cache argument and that knows its layer index (transformers' attention modules)."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    if getattr(module, "is_cross_attention", False) or not hasattr(module, "layer_idx"):
        return False
    if "CrossAttention" in type(module).__name__:  # BERT's kin: the flag is on the parent (BertAttention), not here
        return False
    if isinstance(getattr(module, "A_log", None), torch.Tensor):
        # a state-space mixer (Mamba2, and the Mamba layers of Bamba, Falcon-H1, NemotronH, Granite 4 hybrids):
        # it has a layer_idx, a cache, heads and a head size, but keeps a recurrent state, never cache.update
        return False
    return cache_arg(module) is not None and kv_shape(module) is not None


def default_targets(model: nn.Module, config: PrefixConfig) -> tuple:
    """Every attention module of the model that holds no other: the self-attention of each
    layer (Llama/Qwen2 `self_attn`, GPT-2 `attn`, BERT `attention.self`, nn.MultiheadAttention)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(_ENCODER_DECODER.format(where=type(model).__name__))
    # innermost: a cross-attention that holds a prefix already (targets=) is the PrefixLayer's base, as _named yields it
    cross = {id(innermost(layer.multihead_attn)) for layer in model.modules()
             if isinstance(layer, nn.TransformerDecoderLayer)}
    found = {n: m for n, m in _named(model) if is_attention(m) and id(m) not in cross and _named_attention(m)}
    inner = [n for n in found if not any(o != n and o.startswith(n + ".") for o in found)]
    if not inner:
        kinds = sorted({type(m).__name__ for _, m in _named(model) if "attention" in type(m).__name__.lower()})
        seen = f" (its attention modules: {kinds[:4]})" if kinds else ""
        raise TypeError(f"{type(model).__name__} has no attention module a prefix can go on{seen}: {_NEEDS}")
    return tuple(inner)


def _named_attention(module: nn.Module) -> bool:
    """By default, attention modules named so (every transformers one is): a helper inside one that takes the
    cache too (DeepSeek-V3.2's Indexer, which keeps its own keys there) would otherwise be the innermost target,
    and never calls cache.update. Named in `targets`, any module that offers the contract below is taken."""
    name = type(module).__name__.lower()
    return isinstance(module, nn.MultiheadAttention) or "attention" in name or "attn" in name


_NEEDS = (f"a prefix needs nn.MultiheadAttention or an attention module with a `layer_idx`, a forward taking one of "
          f"{CACHE_ARGS} and readable key/value heads and one head size for keys and values, not a state-space (Mamba) "
          "mixer; by default, its class named ...Attention or ...Attn (name others in targets=; see docs/prefix.md, "
          "'What an attention module must offer')")
_ENCODER_DECODER = ("cannot put a prefix on {where!r}: encoder-decoder models need separate encoder and decoder "
                    "prefixes and no prefix on cross-attention, which lowrank does not do yet")


class PrefixLayer(TunerLayer):
    """Named prefixes for one attention module `base`."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.kv = nn.ParameterDict()  # plain prefixes: name -> (P, 2 * heads * head_dim), keys then values
        self.up = nn.ModuleDict()  # reparameterised: name -> this layer's rows of the MLP's last linear
        self.shared = nn.ModuleDict()  # reparameterised, first layer only: name -> Sequential(E, W1, tanh)
        self.configs: dict[str, PrefixConfig] = {}
        self.heads, self.head_dim = kv_shape(base)
        self._arg = None if isinstance(base, nn.MultiheadAttention) else cache_arg(base)
        self._signature = None if self._arg is None else inspect.signature(base.forward)
        if (self._signature is not None and "alibi" in self._signature.parameters
                and getattr(getattr(base, "config", None), "alibi", True) is not False):  # fmt: skip
            # Bloom, Falcon with alibi: the bias comes in built for the real tokens' keys only, not P more
            raise NotImplementedError(f"cannot put a prefix on a {type(base).__name__}: its ALiBi position bias "
                                      "(the `alibi` argument) is built for the real tokens only; use prompt tuning "
                                      "or LoRA on this model")
        object.__setattr__(self, "_owners", {})  # name -> the layer holding `shared`; see Note above

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.configs)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim  # d_kv: one prefix vector's key (or value) size

    def add(self, name: str, config: PrefixConfig) -> None:
        dtype, device = float_dtype_and_device(self.base, inner=True)  # a 4-bit attention: its layers' compute dtype
        P, d = config.num_virtual_tokens, self.width
        if config.projection_hidden is None:
            # PEFT's nn.Embedding init: N(0, 1) per entry
            self.kv[name] = nn.Parameter(torch.randn(P, 2 * d, dtype=dtype, device=device))
        else:
            self.up[name] = nn.Linear(config.projection_hidden, 2 * d, dtype=dtype, device=device)
        self.configs[name] = config

    def own_shared(self, name: str) -> None:
        """Hold the shared half of adapter `name`'s MLP (called on the adapter's first layer)."""
        config, d = self.configs[name], self.width
        dtype, device = float_dtype_and_device(self.base, inner=True)
        self.shared[name] = nn.Sequential(
            nn.Embedding(config.num_virtual_tokens, d, dtype=dtype, device=device),  # E: (P, d_kv)
            nn.Linear(d, config.projection_hidden, dtype=dtype, device=device),  # W1, b1
            nn.Tanh(),
        )

    def delete(self, name: str) -> None:
        for store in (self.kv, self.up, self.shared):
            if name in store:
                del store[name]
        del self.configs[name]
        self._owners.pop(name, None)
        self.active = tuple(n for n in self.active if n != name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = [self.kv[name]] if name in self.kv else list(self.up[name].parameters())
        return params + (list(self.shared[name].parameters()) if name in self.shared else [])

    def prefix(self, name: str) -> torch.Tensor:
        """Adapter `name`'s [P_k ; P_v] for this layer: (P, 2 * d_kv)."""
        if name in self.kv:
            return self.kv[name]
        shared = self._owners[name].shared[name]
        owner = self._owners[name]
        if owner is not self and type(shared[0].weight).__name__ == "DTensor":  # See Note in tests/distributed/cases.py
            raise RuntimeError(f"prefix adapter {name!r} has a reparameterisation MLP shared by every attention layer, "
                               "and it is sharded (FSDP2) outside its own layer's forward; fold it before "
                               "fully_shard (lowrank.tuners.prefix.fold: the vectors, no MLP), use P-tuning v2 "
                               "(projection_hidden=None), or train it under DDP")
        hidden = shared[2](shared[1](shared[0].weight))  # tanh(E W1^T + b1): (P, h)
        return self.up[name](hidden)  # (P, 2 * d_kv)

    def prefixes(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the active adapters, concatenated in order: each (B, heads, P, head_dim)."""
        kv = torch.cat([self.prefix(n) for n in self.active], dim=0)  # (P, 2 * d_kv)
        P = kv.shape[0]
        kv = kv.view(P, 2, self.heads, self.head_dim).permute(1, 2, 0, 3)  # (2, heads, P, head_dim)
        kv = kv.unsqueeze(1).expand(2, batch, self.heads, P, self.head_dim)  # (2, B, heads, P, head_dim)
        kv = kv.to(dtype)  # after the expand: the batch's gradients are summed in the prefix's own dtype
        return kv[0], kv[1]

    @property
    def length(self) -> int:
        """How many positions the active prefixes take (0 when off)."""
        if not self.enabled or self._routed_past():
            return 0
        return sum(self.configs[n].num_virtual_tokens for n in self.active)

    def _routed_past(self) -> bool:
        """A per-sample route (lowrank.per_sample) names none of this layer's prefixes: the layer
        is the base alone, and the positions must not shift either."""
        return self.route is not None and not any(n in self.names for n in self.route)

    # h = Attention(q, [P_k ; K], [P_v ; V]) with the mask widened by P always-visible columns.
    def forward(self, *args, **kwargs):
        if self._routed_past():
            return self.base(*args, **kwargs)  # a route of other adapters: none of this layer's applies
        if not self.enabled or (not self.active and self.route is None):
            return self.base(*args, **kwargs)
        if self.route is not None:
            raise NotImplementedError("prefix tuning does not route adapters per sample (lowrank.per_sample); "
                                      "run one batch per adapter with lowrank.set_active")
        if isinstance(self.base, nn.MultiheadAttention):
            return mha_forward(self, *args, **kwargs)
        return with_prefix(self, *args, **kwargs)


def _named(module: nn.Module):
    """(name, module) below `module` as lowrank.inject names them: adapter wrappers and torch's
    checkpoint_wrapper see-through (lowrank/walk.py)."""
    from ..walk import _walk  # walk imports the tuners

    for _, _, name, child in _walk(module):
        yield name, innermost(child)


def check(module: nn.Module, config: PrefixConfig, name: str, where: str) -> None:
    """Raise, before anything changes, if prefix `name` cannot go on `module` (at `where`)."""
    if isinstance(module, TunerLayer) and not isinstance(module, PrefixLayer):
        raise ValueError(f"{where!r} already carries a {type(module).__name__}; a prefix wraps the attention module "
                         "itself, so put it on before other adapters or target another module")
    if isinstance(module, PrefixLayer) and name in module.names:
        raise ValueError(f"{where!r} already has a prefix named {name!r}; inject under another name "
                         f"or remove it first with lowrank.eject(model, {name!r})")
    inner = innermost(module)
    if getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(_ENCODER_DECODER.format(where=where))
    if not is_attention(inner):
        raise TypeError(f"cannot put a prefix on {where!r}, a {type(inner).__name__}: {_NEEDS}")
    if isinstance(inner, nn.MultiheadAttention):
        check_mha(inner, repr(where))


def wrap(module: nn.Module, config: PrefixConfig, name: str, where: str) -> nn.Module:
    layer = module if isinstance(module, PrefixLayer) else PrefixLayer(module)
    layer.add(name, config)
    return layer


def layers(model: nn.Module, name: str) -> list[PrefixLayer]:
    """The prefix layers holding adapter `name`, in model order."""
    return [m for m in model.modules() if isinstance(m, PrefixLayer) and name in m.names]


def attach(model: nn.Module, config: PrefixConfig, name: str) -> None:
    """Give adapter `name`'s first layer the shared MLP half, and install the
    model-level position shift (lowrank.tuners.prefix_attention.shift_positions)."""
    found = layers(model, name)
    if config.projection_hidden is not None:
        found[0].own_shared(name)
        for layer in found:
            layer._owners[name] = found[0]
    # the model, and every transformers model inside it (LlamaModel in LlamaForCausalLM), which a
    # user may call alone: each shifts, the outermost call only (Note: one shift per call)
    for host in [model] + [m for m in model.modules() if m is not model and input_embeddings_of(m) is not None]:
        install_position_shift(host)


def detach(model: nn.Module) -> None:
    for module in model.modules():
        remove_position_shift(module)


@torch.no_grad()
def fold(model: nn.Module, name: str | None = None) -> list[str]:
    """Replace reparameterised adapters (`name`, None: all) by the plain prefixes their MLP
    computes now: same outputs, fewer parameters, no MLP to run. Returns the adapters folded
    (a plain one has nothing to fold); a `name` that is no prefix adapter raises."""
    known = list(dict.fromkeys(n for m in model.modules() if isinstance(m, PrefixLayer) for n in m.names))
    if name is not None and name not in known:  # a typo would otherwise fold nothing, silently
        raise ValueError(f"the model has no prefix adapter named {name!r}; its prefix adapters: {known}")
    folded = []
    for adapter in dict.fromkeys(n for m in model.modules() if isinstance(m, PrefixLayer) for n in m.up):
        if name is not None and adapter != name:
            continue
        found = layers(model, adapter)
        values = [layer.prefix(adapter).detach().clone() for layer in found]
        trainable = found[0].up[adapter].weight.requires_grad
        for layer, value in zip(found, values):
            del layer.up[adapter]
            if adapter in layer.shared:
                del layer.shared[adapter]
            layer._owners.pop(adapter, None)
            layer.kv[adapter] = nn.Parameter(value, requires_grad=trainable)
            layer.configs[adapter] = dataclasses.replace(layer.configs[adapter], projection_hidden=None)
        folded.append(adapter)
    return folded


def parameter_count(config: PrefixConfig, layers_: int, d_kv: int) -> int:
    """Li & Liang's count: plain L * P * 2 d_kv; reparameterised P d_kv + (d_kv h + h) + L (2 d_kv h + 2 d_kv)."""
    P, h, L = config.num_virtual_tokens, config.projection_hidden, layers_
    if h is None:
        return L * P * 2 * d_kv
    return P * d_kv + (d_kv * h + h) + L * (2 * d_kv * h + 2 * d_kv)
