"""Prompt-tuning adapters in PEFT's PROMPT_TUNING format (lowrank.io dispatches here).

A directory holds `adapter_config.json` (peft_type "PROMPT_TUNING", num_virtual_tokens,
token_dim, num_transformer_submodules 1, task_type, prompt_tuning_init, ...) and
`adapter_model.safetensors` with one tensor, `prompt_embeddings` (n, d), float32. The file
names no module: the prompt goes where PromptConfig's default targets put it (the input
embedding), as PEFT puts it before the word embeddings.
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

from . import distributed
from .config import PromptConfig
from .inject import _walk, active_adapters, adapter_names, inject
from .tuners.prompt import PromptLayer

KEY = "prompt_embeddings"
PEFT_TYPE = "PROMPT_TUNING"
INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # ours -> PEFT's PromptTuningInit
# transformers class-name endings -> PEFT task_type (PeftModel.from_pretrained picks its class by it)
TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def _prompt_layers(model: nn.Module, name: str) -> list[tuple[str, PromptLayer]]:
    return [(where, m) for _, _, where, m in _walk(model) if isinstance(m, PromptLayer) and name in m.names]


def holds_prompt(model: nn.Module, name: str | None) -> bool:
    """Whether adapter `name` (None: the model's only adapter) is a prompt."""
    if name is None:
        names = adapter_names(model)
        prompts = [n for n in names if _prompt_layers(model, n)]
        if prompts and len(names) > 1:
            raise ValueError(f"the model has adapters {names} (prompts: {prompts}); pass name= to say which to save")
        return bool(prompts)
    return bool(_prompt_layers(model, name))


def task_type(model: nn.Module) -> str:
    cls = type(model).__name__
    return next((task for suffix, task in TASKS if cls.endswith(suffix)), "FEATURE_EXTRACTION")


def adapter_state(model: nn.Module, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """({"prompt_embeddings": P}, PEFT adapter_config dict) for prompt adapter `name`."""
    name = adapter_names(model)[0] if name is None else name
    layers = _prompt_layers(model, name)
    if len(layers) != 1:
        raise ValueError(f"prompt adapter {name!r} sits on {[w for w, _ in layers]}; PEFT's format holds one prompt")
    where, layer = layers[0]
    prompt, config = layer.prompts[name], layer.configs[name]
    cfg = getattr(model, "config", None)
    tokenizer = config.tokenizer
    tokenizer = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
    init = INITS[config.init] if config.init != "text" or tokenizer else "RANDOM"  # PEFT's TEXT needs a tokenizer name
    peft_config = {
        "peft_type": PEFT_TYPE, "task_type": task_type(model), "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1], "num_transformer_submodules": 1,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "prompt_tuning_init": init, "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
        "tokenizer_name_or_path": tokenizer if init == "TEXT" else None, "tokenizer_kwargs": None,
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None, "revision": None,
        "inference_mode": True, "modules_to_save": None,
    }
    # See Note: saving from several ranks (lowrank/distributed.py): an FSDP2-sharded prompt is gathered first
    return {KEY: distributed.full_tensor(prompt.detach()).float().cpu().contiguous()}, peft_config


def load(model: nn.Module, path: pathlib.Path, peft_config: dict, name: str, strict: bool, allow_pickle: bool,
         dtype=None):
    """Inject prompt adapter `name` and load its embeddings; on any error the model is as before."""
    from .io import LoadResult, copy_checked, read_weights, undo_inject, virtual_tokens  # io imports this module first

    n = virtual_tokens(peft_config, path / "adapter_config.json", "prompt")
    weights = read_weights(path, allow_pickle)
    before = active_adapters(model)
    modules = inject(model, PromptConfig(num_virtual_tokens=n), name, dtype=dtype)
    try:
        (where, layer), = _prompt_layers(model, name)
        param = layer.prompts[name]
        missing = [] if KEY in weights else [KEY]
        unexpected = sorted(k for k in weights if k != KEY)
        mismatched = [(KEY, tuple(weights[KEY].shape), tuple(param.shape))] \
            if KEY in weights and weights[KEY].shape != param.shape else []
        result = LoadResult(modules, missing, unexpected, mismatched)
        pairs = [(param, weights[KEY])] if KEY in weights else []
        # a prompt adapter is its one tensor: without it there is nothing to load, strict or not
        copy_checked(model, f"{path}: the prompt adapter", pairs, result, strict or bool(missing))
    except BaseException:
        undo_inject(model, name, before)
        raise
    return result
