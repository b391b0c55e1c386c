"""How a prefix reaches the attention: a stand-in cache for transformers' attention modules,
the widened mask, and the model-level position shift (nn.MultiheadAttention's forward: prefix_mha.py).

# Note: the prefix goes in through cache.update. Every transformers attention module computes
# its keys and values (after RoPE), hands them to `cache.update(key, value, layer_idx, ...)`
# when it has a cache, and attends over what that returns: this is the contract that makes
# KV caching work, and it has held across transformers 4.3x-5.x while the attention-function
# registry, the cache classes and the mask helpers all changed. So the PrefixLayer passes the
# module a small stand-in whose `update` forwards to the real cache (if any: generation) and
# returns [P_k ; K], [P_v ; V]. The real cache keeps only real tokens, so nothing about
# generation, cache classes or gradient checkpointing (which drops the cache) has to know
# about prefixes; PEFT instead puts the prefix into the cache itself (peft #2821 and the
# follow-ups; it refuses gradient checkpointing for that reason).

# Note: positions with a prefix. PEFT's prefix sits in the KV cache, so transformers counts
# it as P past tokens: a model building position ids itself starts at P (arange(T) + P), and
# PEFT adds P to position ids the caller passes (generate's, from the attention mask). This
# shifts RoPE phases (Llama, Qwen2) and absolute position embeddings (GPT-2, BERT) alike. We
# match it with a forward pre-hook on the injected model: position ids given -> + P; not
# given -> arange(T) + past + P, which is what the model would build, shifted. Prefix keys
# themselves carry no position (no RoPE), as in PEFT. Models whose forward takes no
# `position_ids` (nn.TransformerEncoder research code) are left alone.
"""

from __future__ import annotations

import inspect
import sys
import threading

import torch
from torch import nn

CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # transformers 5.x, 4.4x+, older; GPT-NeoX, Bloom, Falcon, GPT-BigCode


def cache_arg(module: nn.Module) -> str | None:
    """The name under which `module.forward` takes its KV cache, or None."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((a for a in CACHE_ARGS if a in params), None)


class PrefixCache:
    """Stands in for the model's cache during one attention call; see Note: the prefix goes in
    through cache.update. Anything else asked of it is the real cache's answer."""

    def __init__(self, cache, key: torch.Tensor, value: torch.Tensor) -> None:
        self.cache, self.key, self.value = cache, key, value  # key, value: (B, heads, P, head_dim)
        self.used = False  # set by update: a module that never calls it never sees the prefix

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.used = True
        if self.cache is not None:
            key_states, value_states = self.cache.update(key_states, value_states, *args, **kwargs)
        self._check(key_states, "keys", self.key)
        self._check(value_states, "values", self.value)
        # (B, heads, P, hd) ; (B, heads, K, hd) -> (B, heads, P + K, hd)
        return (torch.cat([self.key.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.value.to(value_states.dtype), value_states], dim=2))

    def _check(self, states: torch.Tensor, what: str, prefix: torch.Tensor) -> None:
        shape = tuple(states.shape)
        if len(shape) != 4 or (shape[0], shape[1], shape[3]) != (prefix.shape[0], prefix.shape[1], prefix.shape[3]):
            raise RuntimeError(f"prefix {what} are (batch, heads, P, head_dim) = {tuple(prefix.shape)} but the "
                               f"attention module's {what} are {shape}; it does not lay out {what} as (batch, key/value "
                               "heads, tokens, head_dim), so it cannot take a prefix")

    def __getattr__(self, name: str):
        cache = self.__dict__.get("cache")
        if cache is None:
            raise AttributeError(f"prefix tuning's stand-in cache (no real cache in this call) has no {name!r}")
        return getattr(cache, name)


def widen_mask(mask, P: int, T: int, past: int, causal: bool, device: torch.device, keys: int | None = None):
    """The attention mask for [prefix ; keys]: P always-visible columns in front. `mask` is None
    (no masking, or causal when `causal` and T > 1: sdpa's rule), or a 4-D boolean (True =
    attend) or additive float mask (..., T, K). None with causal queries becomes an explicit
    boolean mask (only sdpa gets None for a causal model; eager always gets a mask), since
    `is_causal` would align the diagonal top-left once P keys are in front; it has `keys`
    columns (None: past + T), the keys the cache will return (a StaticCache: all its slots)."""
    if mask is None:
        if not causal or T == 1:
            return None
        query = torch.arange(T, device=device).unsqueeze(1) + past  # (T, 1): absolute positions
        K = past + T if keys is None else keys
        mask = (torch.arange(K, device=device).unsqueeze(0) <= query)[None, None]  # (1, 1, T, K), True = attend
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        seen = type(mask).__name__ + (f" of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else "")
        raise TypeError(f"prefix tuning needs the attention mask as None or a 4-D tensor (eager / sdpa attention); "
                        f"got {seen}; switch with model.set_attn_implementation('sdpa')")
    visible = True if mask.dtype == torch.bool else 0.0
    front = torch.full((*mask.shape[:-1], P), visible, dtype=mask.dtype, device=mask.device)  # (..., T, P)
    return torch.cat([front, mask], dim=-1)  # (..., T, P + K)


def _check_implementation(module: nn.Module) -> None:
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or ""
    if impl.startswith("flash") or "flex" in impl:
        raise TypeError(f"prefix tuning cannot widen the masks of {impl!r} attention (2-D masks / BlockMask), so it "
                        "would attend wrongly; use eager or sdpa: model.set_attn_implementation('sdpa')")


def with_prefix(layer, *args, **kwargs):
    """Call a transformers attention module `layer.base` with the prefix through its cache argument."""
    bound = layer._signature.bind(*args, **kwargs)
    arguments = bound.arguments
    hidden = next(iter(arguments.values()))  # hidden_states: (B, T, d)
    B, T = hidden.shape[0], hidden.shape[1]
    real = arguments.get(layer._arg)
    self_cache = getattr(real, "self_attention_cache", real)  # EncoderDecoderCache: its self-attention half
    if self_cache is not None and not hasattr(self_cache, "get_seq_length"):  # a PagedAttentionCache (generate_batch)
        raise TypeError(f"prefix tuning needs a KV cache that counts its tokens; {type(self_cache).__name__} does not "
                        "(continuous batching, generate_batch, packs requests into one sequence): use model.generate")
    # Gemma 3n / 4's KV-shared layers never call cache.update: they attend over the keys and values an earlier
    # layer stored after its update, prefix included, and their cache layer is a DummyLayer that counts nothing
    # (the cache's first attention layer, earlier in the model, has taken this call's T tokens already)
    shared = getattr(layer.base, "is_kv_shared_layer", False) is True
    past = 0 if self_cache is None else self_cache.get_seq_length() - T if shared else self_cache.get_seq_length(
        layer.base.layer_idx)
    _check_implementation(layer.base)
    key, value = layer.prefixes(B, hidden.dtype)
    arguments[layer._arg] = stand_in = PrefixCache(self_cache, key, value)
    if "attention_mask" in layer._signature.parameters:
        causal = bool(getattr(layer.base, "is_causal", False))
        arguments["attention_mask"] = widen_mask(arguments.get("attention_mask"), key.shape[2], T, past, causal,
                                                 hidden.device, None if shared else _cache_keys(self_cache, layer.base.layer_idx, past, T))
    out = layer.base(*bound.args, **bound.kwargs)
    if not stand_in.used and not shared:  # e.g. linear attention (MiniMax's lightning attention) keeps its own state in the cache
        raise RuntimeError(f"{type(layer.base).__name__} ran without calling cache.update, so the prefix never reached "
                           "its attention; it cannot take a prefix: leave it out (PrefixConfig(exclude=...)) or use "
                           "prompt tuning")
    return out


def _cache_keys(cache, layer_idx: int, past: int, T: int) -> int | None:
    """How many keys `cache.update` will return for T new tokens (None: past + T). A StaticCache returns all its slots, the unfilled ones in the future of
    every query, which the causal mask hides. transformers 5 asks get_mask_sizes(query_length,
    layer_idx), 4.5x get_mask_sizes(cache_position, layer_idx); both return (kv_length, offset)."""
    sizes = getattr(cache, "get_mask_sizes", None)
    if sizes is None:
        return None
    # the first argument's name from the code object, which torch.compile traces (inspect.signature broke
    # the graph); a wrapped method (*args) by its signature, outside compilation
    code = getattr(getattr(sizes, "__func__", sizes), "__code__", None)
    if code is not None and code.co_argcount > 1:
        first = code.co_varnames[1]  # [0] is self
    else:
        first = None if torch.compiler.is_compiling() else next(iter(inspect.signature(sizes).parameters), None)
    length, offset = sizes(torch.arange(past, past + T) if first == "cache_position" else T, layer_idx)
    return length if offset == 0 else None


# -- the position shift (Note: positions with a prefix) ----------------------------------
# The hook is found by identity among the model's pre-hooks, not kept in a side table, so a
# deepcopy of an injected model (which copies its hooks) is handled the same as the original.
def _prefix_length(model: nn.Module) -> int:
    from .prefix import PrefixLayer

    return next((m.length for m in model.modules() if isinstance(m, PrefixLayer)), 0)


# Note: one shift per call. A model holding prefixes may itself sit in another injected model
# (inject(outer) and inject(outer.model, ...)): both carry the hook, and only the outermost
# call may shift. Each hooked forward pushes on a per-thread stack before and pops after
# (a forward hook with always_call, so a failing call pops too). torch calls such hooks after an
# Exception only: a KeyboardInterrupt (Ctrl-C in a notebook's generate) skips them and would leave
# its calls on the stack, and every later call would look nested and go unshifted. So an entry
# keeps the frame of the module call that pushed it, and a push onto a non-empty stack first drops
# the entries whose frame is no caller of this one (calls that ended). While compiling no frame is
# kept (dynamo replays the pushes and pops): there, a model found on the stack already is a call of
# it that ended (a model does not run inside itself), and it and what came after it are dropped;
# and a call is nested only inside a running model that holds it, so another model's stale entries
# do not switch its shift off.
_LOCAL = threading.local()  # per thread: .running, (model, frame) of the hooked calls under way


def _running() -> list[tuple]:
    if not hasattr(_LOCAL, "running"):
        _LOCAL.running = []
    return _LOCAL.running


def _leave(model: nn.Module, args: tuple, kwargs: dict, output) -> None:
    running = _running()
    if running and running[-1][0] is model:
        running.pop()


def _callers() -> set[int]:
    frame, ids = sys._getframe(2), set()  # from the module call that runs the hook
    while frame is not None:
        ids.add(id(frame))
        frame = frame.f_back
    return ids


def shift_positions(model: nn.Module, args: tuple, kwargs: dict):
    running = _running()
    compiling = torch.compiler.is_compiling()
    if running and not compiling:  # See Note: one shift per call: calls ended by a KeyboardInterrupt go
        callers = _callers()
        running[:] = [(m, f) for m, f in running if f is None or id(f) in callers]
    for i, (m, _) in enumerate(running):
        if m is model:
            del running[i:]
            break
    # nested: inside a model that is running (a stale entry of another model is none of its parents)
    outermost = not any(any(inner is model for inner in m.modules()) for m, _ in running)  # (model itself: gone above)
    running.append((model, None if compiling else sys._getframe(1)))
    P = _prefix_length(model) if outermost else 0
    if P == 0:
        return None
    bound = _signature(model).bind_partial(*args, **kwargs)  # a fresh mapping: the caller's dict is not touched
    arguments = bound.arguments
    nested = arguments.get(next((n for n, p in bound.signature.parameters.items() if p.kind is p.VAR_KEYWORD), ""), {})
    cache = next((c for c in (arguments.get(a, nested.get(a)) for a in CACHE_ARGS) if c is not None), None)
    past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    given = arguments.get("position_ids")
    if given is not None:
        arguments["position_ids"] = given = given + P
        # shifted past a table of positions (GPT-2's; generate passes positions): named, not an IndexError
        # in the embedding; the largest is read (a device sync) only when past + P + T could pass its end
        limit = position_limit(model)
        if limit is not None and given.numel() and past + P + given.shape[-1] > limit:
            check_positions(model, int(given.max()) + 1, f"prefix tuning ({P} virtual tokens, {past} past, "
                            f"{given.shape[-1]} new, positions given)", None)
        return bound.args, bound.kwargs
    source = arguments.get("input_ids")
    if source is None:
        source = arguments.get("inputs_embeds")
    if source is None:
        return None
    if source.dim() != (2 if source is arguments.get("input_ids") else 3):  # (B, choices, T): multiple choice
        if not any(m is not model and _hook_ids(m) for m in model.modules()):
            raise NotImplementedError(f"prefix tuning: {type(model).__name__} got input of shape "
                                      f"{tuple(source.shape)}; it numbers (B, T) token ids or (B, T, d) embeddings")
        running.pop()  # the inner model it calls with them flattened numbers them (Note: one shift per call)
        return None
    T = source.shape[1]
    config = getattr(model, "config", None)  # a rotary model numbers by arange: no walk over its modules per call
    maker = None if any(getattr(config, a, None) is not None for a in ROPE) else _position_maker(model)
    what = f"prefix tuning ({P} virtual tokens, {past} past, {T} new)"
    mask = arguments.get("attention_mask", nested.get("attention_mask"))
    if maker is None and isinstance(mask, torch.Tensor) and mask.dim() == 2 and _numbers_from_mask(model):
        # See Note: positions from the mask. The mask covers past + T tokens: the last T positions;
        # padding takes none, so the count to check is the largest position + 1
        positions = ((torch.cumsum(mask, dim=1) + P) * mask - 1)[:, -T:].long()  # (B, T)
        if past + P + T > _limit(model):  # only then read the largest (a device sync): padding takes no position
            check_positions(model, int(positions.max()) + 1 if positions.numel() else 0, what, maker)
        arguments["position_ids"] = positions
        return bound.args, bound.kwargs
    check_positions(model, past + P + T, what, maker)
    if maker is None:
        arguments["position_ids"] = (torch.arange(T, device=source.device) + past + P).unsqueeze(0)  # (1, T)
    elif arguments.get("input_ids") is not None:  # See Note: positions from the padding.
        arguments["position_ids"] = maker.create_position_ids_from_input_ids(source, maker.padding_idx, past + P)
    else:
        return None  # the model's own numbering, which ignores past tokens (See Note: positions from the padding.)
    return bound.args, bound.kwargs


# Note: positions from the padding. RoBERTa and its kin (XLM-RoBERTa, CamemBERT, Data2VecText:
# transformers' `create_position_ids_from_input_ids`) number a token padding_idx + its count of
# non-padding tokens so far + the past length, and padding padding_idx; with the prefix as P past
# tokens (transformers' cache path, PEFT's) that is the same count + P. From inputs_embeds such
# models number padding_idx + 1 + arange(T) whatever the past (create_position_ids_from_inputs_embeds
# takes no past length), so neither path shifts them and the hook leaves them alone.
def check_positions(model: nn.Module, count: int, what: str, maker: nn.Module | None = ...) -> None:
    """Raise naming the limit when `count` positions do not fit a table of absolute position
    embeddings (position_limit), instead of an IndexError in the embedding."""
    positions = position_limit(model, maker)
    if positions is not None and count > positions:
        limit = model.config.max_position_embeddings
        raise ValueError(f"{what} needs {count} positions, but {type(model).__name__}'s position embeddings hold "
                         f"{positions} (max_position_embeddings={limit}); use fewer virtual tokens or shorter inputs")


def position_limit(model: nn.Module, maker: nn.Module | None = ...) -> int | None:
    """How many positions a table of absolute position embeddings holds (GPT-2, BERT, RoBERTa: a
    config with max_position_embeddings and no RoPE, and an nn.Embedding of positions, `wpe` or a
    name with "pos" in it, or such a buffer of max_position_embeddings rows, CTRL's sinusoids;
    RoBERTa's kin number from padding_idx + 1), or None where positions have no table (rotary,
    ALiBi, XGLM's sinusoids, which grow)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if (not isinstance(limit, int) or any(getattr(config, a, None) is not None for a in ROPE)
            or getattr(config, "position_biased_input", True) is False  # DeBERTa-v2: relative positions only
            or getattr(config, "position_embedding_type", "absolute") != "absolute"):
        return None
    def positional(name: str) -> bool:
        last = name.rsplit(".", 1)[-1]
        return last == "wpe" or "pos" in last

    tables = [m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and positional(n)]
    fixed = [b for n, b in model.named_buffers() if positional(n) and b.dim() >= 1 and b.shape[0] == limit]  # CTRL's
    if not tables and not fixed:
        return None
    maker = _position_maker(model) if maker is ... else maker
    return limit - (maker.padding_idx + 1 if maker is not None else 0)


def _limit(model: nn.Module) -> float:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) else float("inf")


ROPE = ("rope_theta", "rope_parameters", "rope_scaling")  # config fields of rotary models: positions have no table


def _position_maker(model: nn.Module) -> nn.Module | None:
    """The embeddings module numbering positions from the padding (See Note), or None."""
    return next((m for m in model.modules() if callable(getattr(m, "create_position_ids_from_input_ids", None))
                 and isinstance(getattr(m, "padding_idx", None), int)), None)


# Note: positions from the mask. OPT numbers a token by its count of attended tokens so far,
# prefix and past included (cumsum(mask) * mask - 1, padding -1) when no position ids are given;
# with PEFT's prefix as P past tokens under an attention mask of P more ones, a real token's
# position is P + its count of real tokens - 1. The hook computes that from the caller's mask
# (before, it passed arange positions, so a left-padded row was numbered from its padding). Known
# by the config's model_type: BioGPT has the same kind of position embedding but numbers by arange.
MASK_NUMBERED = ("opt",)


def _numbers_from_mask(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in MASK_NUMBERED


def _signature(model: nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)


def _hook_ids(model: nn.Module) -> list[int]:
    return [k for k, hook in model._forward_pre_hooks.items() if hook is shift_positions]


def install_position_shift(model: nn.Module) -> None:
    """Add the shift to `model` once (idempotent), if its forward takes `position_ids`."""
    if _hook_ids(model):
        return
    try:
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_positions = False
    if takes_positions:
        model.register_forward_pre_hook(shift_positions, with_kwargs=True)
        model.register_forward_hook(_leave, with_kwargs=True, always_call=True)


def remove_position_shift(model: nn.Module) -> None:
    for k in _hook_ids(model):
        del model._forward_pre_hooks[k]
        model._forward_pre_hooks_with_kwargs.pop(k, None)
    for k in [k for k, hook in model._forward_hooks.items() if hook is _leave]:
        del model._forward_hooks[k]
        model._forward_hooks_with_kwargs.pop(k, None)
        model._forward_hooks_always_called.pop(k, None)
