"""The model-level half of prompt tuning: whatever must grow when the sequence grows by n.

# Note: the host hook. Prepending P inside the embedding module would make its output n
# tokens longer than `input_ids`, and models size position ids, token types and masks from
# `input_ids`. So the embedding's PromptLayer passes through, and a forward pre-hook on the
# *host* (a module whose `get_input_embeddings()` returns that layer and whose forward takes
# `inputs_embeds`; for a transformers model, the model itself) rewrites the
# call: input_ids -> inputs_embeds = [P; E(x)], and attention_mask, labels, position_ids,
# token_type_ids and cache_position grow by n. Those two methods are the contract; every
# transformers model has offered both for years, so nothing here reads a model's internals.
# A tensor argument the hook cannot lengthen raises instead of passing through wrong.
#
# Note: decode steps. A call whose KV cache is not empty is a later step of generation: the
# prompt is already in the cache, so only the mask grows (by n) and positions shift by n;
# transformers' generate keeps counting tokens without the prompt, which is why each step is
# shifted again. Position ids given by the caller (generate computes them from the mask of a
# left-padded batch) keep their meaning: prompt tokens take 0..n-1, text tokens n + theirs.
# PEFT instead drops position_ids (and token_type_ids); see docs/prompt.md for why we differ.
#
# Note: a prompt and a prefix. With both on one model the sequence is [prefix (P) ; prompt (n) ;
# text (T)]: the prompt takes positions P..P+n-1. The prompt's hook lengthens the call first
# and the prefix's (prefix_attention.shift_positions) then shifts all of it by P, whichever was
# injected first: the prompt's hook is put before the other pre-hooks. (The prefix's first
# read the text alone and the prompt took positions 0..n-1, the prefix's.)
#
# Note: nested hosts. LlamaForCausalLM and the LlamaModel inside it both qualify as hosts, and
# a user may call either. Each gets the hook; a call is rewritten once, by the outermost host
# it enters: that hook always hands on `inputs_embeds` (in decode steps too) and remembers the
# tensor, and an inner host that receives a tensor it knows passes the call through. No state
# lives across calls, so an exception mid-forward leaves nothing to undo.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

from .prefix_attention import check_positions

CACHES = ("cache", "past_key_values", "state")  # the KV cache's name: transformers >= 5.x, before; RWKV's state
PADDING_MASKS = ("src_key_padding_mask", "key_padding_mask", "padding_mask")  # (B, T): True / -inf = padding
ATTENTION_MASKS = ("mask", "src_mask", "attn_mask")  # (T, T): True / -inf = may not attend
# tensors not indexed by the (decoder's) sequence position: a decoder's cross-attention reads the encoder's
PASS_THROUGH = {"head_mask", "encoder_hidden_states", "encoder_attention_mask"}

_MADE: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()  # See Note: nested hosts


# -- finding the host ---------------------------------------------------------------------
def input_embeddings_of(module: nn.Module):
    getter = getattr(type(module), "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        return module.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The input embedding of the outermost module that names one (get_input_embeddings())."""
    for module in model.modules():
        embedding = input_embeddings_of(module)
        if isinstance(embedding, nn.Module):
            return embedding
    return None


def find_hosts(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """Every module whose get_input_embeddings() is `layer` and whose forward takes inputs_embeds, outermost first."""
    return [m for m in model.modules()
            if input_embeddings_of(m) is layer and "inputs_embeds" in inspect.signature(m.forward).parameters]


def sequence_dim(module: nn.Module) -> int:
    """1 for (B, T, d) inputs, 0 for torch's (T, B, d) layout (batch_first=False)."""
    if isinstance(module, nn.TransformerEncoder):
        module = module.layers[0]
        while hasattr(module, "base") and not isinstance(module, nn.TransformerEncoderLayer):
            module = module.base
    attention = module if isinstance(module, nn.MultiheadAttention) else getattr(module, "self_attn", None)
    return 1 if getattr(attention, "batch_first", True) else 0


# -- masks of torch-style modules -----------------------------------------------------------
def _keep(like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Entries meaning 'not masked' in `like`'s convention: False, or 0.0 for additive masks."""
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _is_causal(mask: torch.Tensor) -> bool:
    t = mask.shape[-1]
    above = torch.ones(t, t, dtype=torch.bool, device=mask.device).triu(1)
    blocked = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    open_ok = True if mask.dtype == torch.bool else bool((mask[~above] == 0).all())
    return bool((blocked == above).all()) and open_ok


def _causal(like: torch.Tensor, size: int) -> torch.Tensor:
    above = torch.ones(size, size, dtype=torch.bool, device=like.device).triu(1)
    if like.dtype == torch.bool:
        return above
    return torch.zeros(size, size, dtype=like.dtype, device=like.device).masked_fill(above, float("-inf"))


def extend_masks(kw: dict, n: int, t: int, what: str) -> None:
    """Grow, in the dict `kw` (a new dict, never the caller's), every mask for a sequence of t
    tokens to one of n + t tokens whose first n are the prompt: padding masks mark them kept; a
    causal (t, t) mask becomes the causal (n+t, n+t) one (the prompt is ordinary leading
    tokens). Masks already n + t long (an outer hook grew them) stay. Anything else raises."""
    for key, value in list(kw.items()):
        if not isinstance(value, torch.Tensor):
            continue
        if key in PADDING_MASKS and value.dim() == 2 and value.shape[1] in (t, n + t):
            if value.shape[1] == t:
                kw[key] = torch.cat([_keep(value, (value.shape[0], n)), value], dim=1)  # (B, n+T)
        elif key in ATTENTION_MASKS and value.dim() == 2 and value.shape[0] == value.shape[1] in (t, n + t):
            if value.shape[0] == t:
                if not _is_causal(value):
                    raise NotImplementedError(
                        f"prompt tuning on {what}: {key} is a ({t}, {t}) mask that is not causal; only padding masks "
                        "and causal masks can be extended over the prompt (for other patterns, build the "
                        f"({n + t}, {n + t}) mask yourself)")
                kw[key] = _causal(value, n + t)  # (n+T, n+T)
        else:
            raise NotImplementedError(
                f"prompt tuning on {what}: cannot lengthen argument {key!r} of shape {tuple(value.shape)} by the "
                f"{n} prompt tokens (the input has {t}); supported: {PADDING_MASKS} (B, T) and {ATTENTION_MASKS} (T, T)")


def _encoder_hook(encoder: nn.TransformerEncoder, args: tuple, kwargs: dict):
    """A bare nn.TransformerEncoder with the prompt on layers[0]: every layer gets masks for n + T."""
    layer, n = encoder.layers[0], getattr(encoder.layers[0], "length", 0)
    if n == 0:
        return None
    kw = {**dict(zip(("mask", "src_key_padding_mask", "is_causal"), args[1:])), **kwargs}
    src = args[0] if args else kw.pop("src")
    extend_masks(kw, n, src.shape[sequence_dim(layer)], "nn.TransformerEncoder")
    return (src,), kw


# -- the host hook (See Note: the host hook; Note: decode steps) ---------------------------
def _cache_length(cache) -> int | None:
    """Tokens the cache holds (0: none, a first call), or None for a recurrent state, which counts
    no tokens: a Mamba cache (linear-attention layers only) that holds a state, RWKV's `state`."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        try:
            return int(cache.get_seq_length())
        except ValueError:  # transformers: no attention layer to count in (Mamba); has it seen tokens?
            if not callable(getattr(cache, "has_previous_state", None)):
                raise
            return None if cache.has_previous_state() else 0
    if len(cache) and isinstance(cache[0], torch.Tensor):  # RWKV's state: a tensor per kind of state, no tokens
        return None
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


def _shift(positions: torch.Tensor, n: int, prepend: bool) -> torch.Tensor:
    """Positions of the text grow by n; when the prompt is in this call, it takes 0..n-1 first."""
    if positions.dim() not in (1, 2):
        raise NotImplementedError(f"prompt tuning: positions of shape {tuple(positions.shape)} (e.g. multi-axis "
                                  "rotary positions) cannot be shifted; pass 1-D or (B, T) positions, or none")
    if not prepend:
        return positions + n
    head = torch.arange(n, dtype=positions.dtype, device=positions.device)  # (n,)
    head = head.expand(*positions.shape[:-1], n)  # (n,) or (B, n)
    return torch.cat([head, positions + n], dim=-1)  # (..., n+T)


KNOWN = {"input_ids", "inputs_embeds", "attention_mask", "labels", "position_ids", "token_type_ids", "cache_position",
         "start_positions", "end_positions"}  # the last two: a QA model's answer span, token indices (B,)


def _host_hook(host: nn.Module, args: tuple, kwargs: dict):
    from .prompt import PromptLayer

    layer = host.get_input_embeddings()
    n = layer.length if isinstance(layer, PromptLayer) else 0
    made = kwargs.get("inputs_embeds")
    if n == 0 or (made is not None and _MADE.get(id(made)) is made):  # See Note: nested hosts.
        return None
    names = [p.name for p in inspect.signature(host.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kw = {**dict(zip(names, args)), **kwargs}  # a new dict: the caller's stays as it was
    what = f"prompt tuning on {type(host).__name__}"
    unknown = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and k not in KNOWN | PASS_THROUGH]
    if unknown:
        raise NotImplementedError(f"{what}: does not know how to lengthen argument(s) {unknown} by the {n} prompt tokens")
    ids, embeds = kw.pop("input_ids", None), kw.get("inputs_embeds")
    given = ids if embeds is None else embeds
    if given is not None and given.dim() != (2 if embeds is None else 3):  # (B, choices, T): multiple choice
        if len(find_hosts(host, layer)) > 1:
            return None  # the inner model it calls with them flattened prepends the prompt (See Note: nested hosts.)
        raise NotImplementedError(f"{what}: input of shape {tuple(given.shape)}; the prompt goes before (B, T) token "
                                  "ids or (B, T, d) embeddings")
    if embeds is None:
        if ids is None:
            raise ValueError(f"{what}: the call has neither input_ids nor inputs_embeds")
        embeds = layer.base(ids)  # (B, T, d): the model's own embedding
    b, t = embeds.shape[:2]
    past = _cache_length(next((kw[c] for c in CACHES if kw.get(c) is not None), None))
    decoding = past is None or past > 0  # See Note: decode steps: the cache already holds the prompt
    mask = kw.get("attention_mask")
    if past is None:  # a recurrent state (Mamba, RWKV) counts no tokens: the mask's, or at least the prompt
        past = mask.shape[1] - t + n if isinstance(mask, torch.Tensor) and mask.dim() == 2 else n
    check_positions(host, past + t + (0 if decoding else n), f"prompt tuning ({n} virtual tokens, {past} past, {t} new)")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != t + max(past - n, 0):
            raise NotImplementedError(
                f"{what}: attention_mask must be (B, past + T) = ({b}, {t + max(past - n, 0)}) without the prompt; got "
                f"{getattr(mask, 'shape', type(mask).__name__)} (static or compiled caches build 4-D masks in "
                "generate: use the default dynamic cache)")
        kw["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], dim=1)  # (B, n + past + T)
    for key in ("position_ids", "cache_position"):
        if kw.get(key) is not None:
            kw[key] = _shift(kw[key], n, prepend=not decoding)
    if not decoding:
        embeds = torch.cat([layer.prompt(b, embeds.dtype), embeds], dim=1)  # (B, n+T, d)
        labels = kw.get("labels")
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.shape == (b, t):
            kw["labels"] = torch.cat([labels.new_full((b, n), -100), labels], dim=1)  # (B, n+T): no loss on P
        if kw.get("token_type_ids") is not None:
            types = kw["token_type_ids"]
            kw["token_type_ids"] = torch.cat([types.new_zeros(b, n), types], dim=1)  # (B, n+T): segment 0
        for key in ("start_positions", "end_positions"):  # a text token's index is n more in [P; x] (PEFT keeps it)
            if isinstance(kw.get(key), torch.Tensor):
                kw[key] = kw[key] + n
    else:  # a new tensor object even here: marking the caller's own as made would skip its prompt in a later call
        embeds = embeds.view_as(embeds)
    kw["inputs_embeds"] = embeds
    _MADE[id(embeds)] = embeds
    return (), kw


def attach(model: nn.Module, config, name: str) -> None:
    """Install the pre-hooks the model's prompt layers need (idempotent); raise, undoing the
    inject of `name`, when an embedding's prompt has no host to prepend it."""
    from .prompt import PromptLayer

    for layer in [m for m in model.modules() if isinstance(m, PromptLayer)]:
        if layer.embedding:
            hosts = find_hosts(model, layer)
            host, problem = (hosts or [None])[0], None
            if host is None:
                problem = ("no module of the model returns it from get_input_embeddings() with a forward that takes "
                           "inputs_embeds, so nothing can prepend the prompt")
            elif getattr(getattr(host, "config", None), "is_encoder_decoder", False):
                problem = "encoder-decoder models are not supported by lowrank's prompt tuning"
            if problem is not None:
                from ..inject import eject

                eject(model, name)
                raise ValueError(f"cannot prompt-tune through the embedding {type(layer.base).__name__}: {problem}; "
                                 "target the module whose input should get the prompt instead (docs/prompt.md)")
            for host in hosts:  # See Note: nested hosts.
                if not _hook_ids(host, _host_hook):  # first of the pre-hooks: See Note: a prompt and a prefix.
                    host.register_forward_pre_hook(_host_hook, with_kwargs=True, prepend=True)
        else:
            for encoder in model.modules():
                if (isinstance(encoder, nn.TransformerEncoder) and encoder.layers[0] is layer
                        and not _hook_ids(encoder, _encoder_hook)):
                    encoder.register_forward_pre_hook(_encoder_hook, with_kwargs=True)


# The hooks are found by identity among a module's pre-hooks, not kept in a side table, so a
# deepcopy of an injected model (which copies its hooks) ejects and re-injects as the original
# does (as the prefix's position shift, prefix_attention.py).
def _hook_ids(module: nn.Module, fn) -> list[int]:
    return [k for k, hook in module._forward_pre_hooks.items() if hook is fn]


def detach(model: nn.Module) -> None:
    """Remove the pre-hooks `attach` installed in `model` (its last prompt layer is gone)."""
    for module in model.modules():
        for k in _hook_ids(module, _host_hook) + _hook_ids(module, _encoder_hook):
            del module._forward_pre_hooks[k]
            module._forward_pre_hooks_with_kwargs.pop(k, None)
