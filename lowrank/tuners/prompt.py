"""Prompt tuning (Lester et al. 2021): n trainable virtual-token embeddings P (n, d) stand
before the input embeddings E(x) (B, T, d), and the frozen model reads [P; E(x)] (B, n+T, d).

A `PromptLayer` wraps the module whose output (an input embedding) or input (any other
module) the prompt joins, and holds one parameter P per adapter name, so names, eject,
state_dict, summary, mark_trainable and set_active work as for every adapter layer.

    what it wraps                     who prepends P                      see
    an input embedding (nn.Embedding) the host model's forward pre-hook   prompt_hooks.py
    any other module (e.g. an         the layer itself, to its input:     PromptLayer.forward
    nn.TransformerEncoder)            its output is n tokens longer

Default target (PromptConfig.targets None): the embedding that `get_input_embeddings()`
returns (transformers models, or any model offering that method), else the outermost
nn.TransformerEncoder below the root (a bare nn.TransformerEncoder: its first layer).
"""

from __future__ import annotations

import inspect
import math
import os

import torch
from torch import nn

from ..config import PromptConfig
from ..targets import is_linear_like
from .base import TunerLayer, innermost
from .prompt_hooks import extend_masks, input_embedding, sequence_dim


class PromptLayer(TunerLayer):
    """Named prompts P (n, d) for `base`; the active ones are joined, in activation order."""

    def __init__(self, base: nn.Module, width: int, embedding: bool) -> None:
        super().__init__(base)
        self.prompts = nn.ParameterDict()
        self.configs: dict[str, PromptConfig] = {}
        self.width = width  # d
        self.embedding = embedding  # True: base is an input embedding; the host's pre-hook prepends P

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.prompts)

    def add(self, name: str, config: PromptConfig) -> None:
        self.prompts[name] = nn.Parameter(initial_prompt(self.base, config, self.width, self.embedding))
        self.configs[name] = config

    def delete(self, name: str) -> None:
        del self.prompts[name]
        del self.configs[name]
        self.active = tuple(n for n in self.active if n != name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.prompts[name]]

    @property
    def length(self) -> int:
        """n: virtual tokens the model sees now (0 when disabled or none active)."""
        return sum(self.prompts[n].shape[0] for n in self.active) if self.enabled else 0

    def prompt(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """[P_a; P_b; ...] for the active adapters, cast to the embeddings' dtype: (B, n, d)."""
        if self.route is not None:
            raise NotImplementedError("lowrank.per_sample does not support prompt tuning: the prompts of different "
                                      "adapters may differ in length; run one batch per adapter instead")
        p = torch.cat([self.prompts[n] for n in self.active], dim=0)  # (n, d)
        # expanded, then cast: the batch's gradients are summed in the prompt's own dtype (float32
        # on a bf16 model), as PEFT's repeat does; cast first, they were summed in bf16
        return p.unsqueeze(0).expand(batch, -1, -1).to(dtype)  # (B, n, d)

    # embedding: forward is the base's (See Note: the host hook in prompt_hooks.py).
    # other modules:  f([P; x]) with x (B, T, d) (or (T, B, d) when not batch_first); masks
    #                 passed to f grow by n (extend_masks), so f's output is n tokens longer.
    def forward(self, *args, **kwargs):
        n = self.length
        if self.embedding or n == 0:
            return self.base(*args, **kwargs)
        names = [p.name for p in inspect.signature(self.base.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not args or len(args) > len(names):
            raise TypeError(f"prompt tuning on {type(self.base).__name__}: expected its input as the first positional "
                            f"argument of forward{tuple(names)}; got {len(args)} positional arguments")
        kw = {**dict(zip(names[1:], args[1:])), **kwargs}
        x = args[0]
        dim = sequence_dim(self.base)
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"prompt tuning on {type(self.base).__name__}: expected an input of shape "
                             f"(B, T, {self.width}) (or (T, B, {self.width}) when not batch_first); got {tuple(x.shape)}")
        extend_masks(kw, n, x.shape[dim], type(self.base).__name__)
        p = self.prompt(x.shape[1 - dim], x.dtype)  # (B, n, d)
        x = torch.cat([p if dim == 1 else p.transpose(0, 1), x], dim=dim)  # (B, n+T, d) or (n+T, B, d)
        return self.base(x, **kw)


# Note: prompt dtype. P is float32 whatever the model's dtype (as PEFT keeps it), so a bf16
# or fp16 model trains its prompt in full precision; it is cast to the embeddings' dtype where
# it joins them (PromptLayer.prompt), as PEFT does, so outputs match PEFT's exactly.


def initial_prompt(base: nn.Module, config: PromptConfig, width: int, embedding: bool) -> torch.Tensor:
    """P0 (n, d), float32 (See Note: prompt dtype), on the base's device."""
    n = config.num_virtual_tokens
    param = next(base.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if config.init == "random":
        # Tokens of the embedding's own scale, N(0, std(E)^2): PEFT's N(0, 1) is far larger than
        # typical LM embeddings (std ~0.02 to 0.15). Without an embedding, unit scale, as normalised states.
        std = base.weight.detach().float().std().item() if embedding else 1.0
        return torch.randn(n, width, device=device) * std
    vocab = base.weight.shape[0]
    if config.init == "vocab":  # Lester et al.'s "sampled vocab": n tokens drawn uniformly
        ids = torch.randint(0, vocab, (n,))
    else:
        ids = text_ids(config, vocab)
    with torch.no_grad():  # call the module, so an embedding that scales its output keeps its scale
        return base(ids.to(device)).detach().float().clone()  # (n, d)


def text_ids(config: PromptConfig, vocab: int) -> torch.Tensor:
    """init_text's token ids, cut or repeated to n (PEFT's rule)."""
    tokenizer = config.tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError("PromptConfig(tokenizer=<path>) loads it with transformers; install transformers "
                              "or pass a tokenizer object") from e
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    ids = tokenizer(config.init_text)["input_ids"]
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # a tensor or array (return_tensors=) too
    if len(ids) == 1 and isinstance(ids[0], (list, tuple)):  # a batch of one text: [[...]]
        ids = list(ids[0])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"tokenizer({config.init_text!r})['input_ids'] should be the token ids of the text, integers; "
                         f"got {ids[:4]!r}{'...' if len(ids) > 4 else ''}")
    if not ids:
        raise ValueError(f"init_text {config.init_text!r} tokenized to no tokens")
    if max(ids) >= vocab or min(ids) < 0:
        raise ValueError(f"init_text's token ids range over [{min(ids)}, {max(ids)}], outside the embedding's "
                         f"vocabulary of {vocab}: is the tokenizer the model's?")
    n = config.num_virtual_tokens
    return torch.tensor((ids * math.ceil(n / len(ids)))[:n])


def width_of(module: nn.Module) -> int | None:
    """d, the width of the prompt tokens `module` takes (in its input, or for an embedding, its output)."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.TransformerEncoder):
        module = module.layers[0]
    attention = next((m for m in module.modules() if isinstance(m, nn.MultiheadAttention)), None)
    if attention is not None:
        return attention.embed_dim
    linear = next((m for m in module.modules() if is_linear_like(m)), None)
    return None if linear is None else getattr(linear, "in_features", getattr(linear, "nx", None))


def check(module: nn.Module, config: PromptConfig, name: str, where: str) -> None:
    """Raise, before anything changes, if prompt `name` cannot go on `module` (at `where`)."""
    inner = innermost(module)
    if isinstance(module, PromptLayer) and name in module.names:
        raise ValueError(f"{where!r} already has a prompt named {name!r}; inject under another name "
                         f"or remove it first with lowrank.eject(model, {name!r})")
    if isinstance(module, TunerLayer) and not isinstance(module, PromptLayer):
        raise ValueError(f"{where!r} already holds a {type(module).__name__}; a prompt goes on the plain module")
    if width_of(inner) is None:
        raise TypeError(f"cannot tell the token width of {where!r}, a {type(inner).__name__}: target an input "
                        "embedding (nn.Embedding) or a module with attention or linear layers inside")
    if config.init != "random" and not isinstance(inner, nn.Embedding):
        raise ValueError(f"init={config.init!r} reads token embeddings, but {where!r} is a {type(inner).__name__}, "
                         "not an nn.Embedding; use init='random' or target the input embedding")


def wrap(module: nn.Module, config: PromptConfig, name: str, where: str) -> nn.Module:
    """Add prompt `name` at `module`; returns what should stand in its place."""
    inner = innermost(module)
    if not isinstance(module, PromptLayer):
        module = PromptLayer(module, width_of(inner), embedding=isinstance(inner, nn.Embedding))
    module.add(name, config)
    return module


def default_targets(model: nn.Module, config: PromptConfig) -> tuple:
    """The module the prompt goes on when PromptConfig.targets is None (see the module docstring)."""
    embedding = input_embedding(model)
    if embedding is not None:
        embedding = innermost(embedding)
        return (lambda name, m: m is embedding,)
    if isinstance(model, nn.TransformerEncoder):
        first = innermost(model.layers[0])
        return (lambda name, m: m is first,)
    encoders = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder)]
    if encoders:
        return (lambda name, m: m is encoders[0],)
    raise ValueError(f"{type(model).__name__} offers no get_input_embeddings() and holds no nn.TransformerEncoder, so "
                     "PromptConfig cannot choose where the prompt goes: pass targets= (the input embedding, or the "
                     "module whose input should get the prompt); docs/prompt.md says what a model must offer")
