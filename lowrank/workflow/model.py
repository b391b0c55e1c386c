"""Load a base model and its tokenizer from a local directory, and put a method or a saved
adapter on it. transformers is needed here (pip install 'lowrank[workflow]'); nothing here
reaches the network."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import torch
from torch import nn

from ..inject import inject
from ..io import CONFIG_NAME, load_adapter
from ..quant import quantize
from .config import DTYPES, ConfigError, adapters_dtype, require
from .methods import METHODS, nf4_config, tuner_config

WORKFLOW_FILE = "lowrank_workflow.json"  # beside a checkpoint's adapter: method, template, training config


def pick_device(device: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1'; got {device!r}") from None
    if picked.type == "meta":  # shapes without values: the model would load into nothing and fail at its first step
        raise ConfigError(f"device {device!r} holds no values (shapes only) and cannot run a model; use 'cpu', 'cuda' "
                          "or 'auto'")
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this PyTorch sees no CUDA GPU (torch {torch.__version__}); "
                          "use 'cpu' or 'auto'")
    if picked.type == "cuda" and picked.index is not None and picked.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"device {device!r}: this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                          f"(cuda:0 to cuda:{n - 1}); use one of those, 'cuda' or 'auto'")
    return picked


def load_base(model_dir: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
              tokenizer_dir: str | os.PathLike | None = None):
    """(model, tokenizer) from a transformers directory, model in eval mode on `device`, the tokenizer
    from `tokenizer_dir` where given (an adapter's own: adapter_tokenizer_dir); `trust_remote_code`
    runs the directory's own model code (transformers' flag)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers", "transformers")
    if not pathlib.Path(model_dir, "config.json").is_file():
        raise ConfigError(f"model: {model_dir!r} has no config.json; expected a transformers model directory")
    if tokenizer_dir is not None:  # the adapter's own: a file broken there is no fault of the base's
        tokenizer = adapter_tokenizer(tokenizer_dir, trust_remote_code)
    try:
        if tokenizer_dir is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                                   trust_remote_code=trust_remote_code)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:  # missing files, unknown architecture
        raise ConfigError(f"model: could not load {model_dir!r} as a causal LM: {' '.join(str(e).split())}") from None
    return model.to(pick_device(device)).eval(), tokenizer


# Note: an adapter trained with added tokens. Training after tokenizer.add_tokens and
# model.resize_token_embeddings leaves the adapter's file holding the resized embeddings
# (lowrank/io_embeddings.py, Note: embeddings in an adapter file), and, by PEFT's convention, the
# tokenizer that knows the new tokens saved beside it. The base on disk has neither: the command
# line (merge, chat, web) has no way to resize it, and the base's tokenizer never produces the
# new tokens. So the commands resize the base to the file's rows before loading the adapter
# (load_adapter then copies the file's rows over the new ones), and take the adapter
# directory's tokenizer where it holds one (its tokenizer_config.json: PEFT's
# AutoPeftModelForCausalLM's test), as PEFT's AutoPeftModel does. Where that tokenizer has more
# ids than the base has rows and the file holds no embeddings to size it by (PEFT's
# save_embedding_layers=False), the base is resized to the tokenizer, as PEFT's AutoPeftModel does.
def adapter_tokenizer_dir(adapter_dir: str | os.PathLike) -> pathlib.Path | None:
    """The adapter directory where it holds a tokenizer (See Note: an adapter trained with added tokens), else None."""
    path = pathlib.Path(adapter_dir)
    return path if (path / "tokenizer_config.json").is_file() else None


def adapter_tokenizer(tokenizer_dir: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved in an adapter directory (adapter_tokenizer_dir), used instead of the base's;
    one that cannot be read is a ConfigError naming that directory, not the base."""
    transformers = require("transformers", "transformers")
    try:
        return transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True,
                                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"adapter: {str(tokenizer_dir)!r} holds a tokenizer (tokenizer_config.json), used instead "
                          f"of the base's, but it could not be read: {' '.join(str(e).split())}") from None


def resize_as_trained(model: nn.Module, adapter_dir: str | os.PathLike, file=None, tokens: int | None = None,
                      allow_pickle: bool = False) -> None:
    """Give the base the vocabulary the adapter was trained with, where its file holds embeddings of
    another number of rows (See Note: an adapter trained with added tokens), and say so on `file`
    (None: stdout). Reads the safetensors header only. `tokens`: the size of the adapter's own
    tokenizer, where it is used; a file without embeddings (PEFT's save_embedding_layers=False)
    leaves the base fewer rows than that tokenizer has ids, and the new tokens' ids would index
    past the table (an IndexError mid-chat): then the base is resized to it, as PEFT's
    AutoPeftModelForCausalLM does, its new rows drawn around the others' mean (transformers'
    mean_resizing, PEFT's call): not trained ones, which is said. `allow_pickle`: an adapter saved
    only as adapter_model.bin (older PEFT) is read for its shapes (load_adapter's allow_pickle)."""
    from safetensors import safe_open

    from ..io import PICKLE_NAME, WEIGHTS_NAME, read_weights
    from ..io_embeddings import rows_not_held, trained_rows

    weights = pathlib.Path(adapter_dir) / WEIGHTS_NAME
    resize = getattr(model, "resize_token_embeddings", None)
    if not callable(resize):
        return
    shapes = {}
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    elif allow_pickle and (weights.parent / PICKLE_NAME).is_file():  # no header to read: the (small) file, whole
        shapes = {k: t.shape for k, t in read_weights(adapter_dir, allow_pickle=True).items()}
    n = trained_rows(model, shapes)
    try:
        before = model.get_input_embeddings().weight.shape[0]
    except (NotImplementedError, AttributeError):  # a model that names no input embedding (remote code, an embedding
        return  # under another name): resize_token_embeddings could not resize it either, and every adapter loads
    if n is not None and tokens is not None and tokens > n:  # PEFT's load refuses it too (a size mismatch)
        raise ConfigError(f"adapter: the tokenizer in {str(adapter_dir)!r} has {tokens} tokens, but the embeddings in "
                          f"its adapter file have {n} rows, so ids {n} to {tokens - 1} would index past them (tokens "
                          "added after training?); save beside it the tokenizer the adapter was trained with")
    rows = n if n is not None else tokens if tokens is not None and tokens > before else None
    if rows is not None and rows != before:
        _refuse_4bit_embeddings(model, adapter_dir, rows, before)
    if n is not None:
        # the new rows come from the file (load_adapter); but PEFT's file of an adapter on one embedding holds
        # that one only, and an untied other's new rows are drawn around its rows' mean, as PEFT's AutoPeftModel does
        lacking = rows_not_held(model, shapes, n) if n > before else []
        resize(n, mean_resizing=bool(lacking))
        print(f"resized the base's vocabulary from {before} to {n} tokens, as the adapter was trained with"
              + (f"; the adapter file holds no rows for {', '.join(lacking)}, so its new tokens' rows are untrained "
                 "(drawn around the mean of the others, as PEFT's AutoPeftModelForCausalLM does)" if lacking else ""),
              file=file)
    elif tokens is not None and tokens > before:
        resize(tokens)
        print(f"resized the base's vocabulary from {before} to {tokens} tokens, as the adapter's tokenizer has; the "
              "adapter file holds no embeddings, so the new tokens' rows are untrained (drawn around the mean of the "
              "others, as PEFT's AutoPeftModelForCausalLM does)", file=file)


def _refuse_4bit_embeddings(model: nn.Module, adapter_dir, rows: int, before: int) -> None:
    """A ConfigError where the input or output embedding the resize would give `rows` rows holds its
    weight in 4 bits (a base saved with its output head quantized): transformers' resize_token_embeddings
    reads a dense weight, and raised AttributeError ("'NF4Weight' object has no attribute 'size'")."""
    names = {id(m): name for name, m in model.named_modules()}
    packed = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(module, nn.Module) and not isinstance(getattr(module, "weight", None), torch.Tensor):
            packed.append(names.get(id(module), type(module).__name__))
    if packed:
        raise ConfigError(f"adapter: {str(adapter_dir)!r} was trained with a vocabulary of {rows} tokens and the base "
                          f"has {before}, but the base holds {' and '.join(packed)} in 4 bits, which cannot be resized; "
                          "use the dense base (a qlora adapter of lowrank train: lowrank merge --as-trained resizes it, "
                          "then quantizes it as training did)")


def apply_method(model, method: str, options: dict, nf4: dict, adapter_dtype: str | None = None):
    """Quantize the base when the method says so (on the model's device), then inject the
    method's adapter, its parameters in `adapter_dtype` (None: the base's); returns the tuner config."""
    config = tuner_config(method, options)
    if METHODS[method].quantize:
        quantize(model, nf4_config(nf4))
    inject(model, config, dtype=None if adapter_dtype is None else getattr(torch, adapter_dtype))
    return config


def virtual_tokens(model: nn.Module) -> int:
    """The positions an active prompt or prefix takes before the text (0: none)."""
    from ..tuners.prefix_attention import _prefix_length
    from ..tuners.prompt import PromptLayer

    return _prefix_length(model) + next((m.length for m in model.modules() if isinstance(m, PromptLayer)), 0)


def check_context(model: nn.Module, longest: int, max_length: int) -> None:
    """A ConfigError unless the longest example and the virtual tokens fit the model's table of
    absolute position embeddings (GPT-2's 1024), where they would fail mid-training."""
    from ..tuners.prefix_attention import position_limit

    limit, virtual = position_limit(model), virtual_tokens(model)
    if limit is not None and longest + virtual > limit:
        raise ConfigError(f"max_length: the longest example is {longest} tokens (max_length={max_length})"
                          + (f" after {virtual} virtual tokens" if virtual else "")
                          + f", and {type(model).__name__}'s position embeddings hold {limit}; set max_length to at "
                          f"most {limit - virtual}")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model, in order: the modules whose class is one
    transformers never splits across devices (`_no_split_modules`, e.g. LlamaDecoderLayer),
    leaving out any inside another. [] when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inner: set[int] = set()  # ids of the modules inside a block already taken
    for m in model.modules():  # parents come before their children
        if id(m) in inner or type(m).__name__ not in names:
            continue
        blocks.append(m)
        inner.update(id(c) for c in m.modules())
    return blocks


# Note: compile the blocks, not the model. Eager PyTorch spends most of a small-batch step's
# time in Python (module calls, op dispatch, autograd bookkeeping): on a GPU the 7B QLoRA step
# waited on the CPU for half its wall time (docs/benchmarks.md). torch.compile of each decoder
# layer traces it once (the layers share their code; their tensors are the compiled graph's
# inputs), keeps state-dict names, and leaves activation checkpointing, which wraps each
# layer's call, outside the compiled region, where it works as in eager. The 4-bit layers go
# through the lowrank::nf4_linear op, which compiles without a graph break.
def compile_blocks(model: nn.Module, **options) -> int:
    """torch.compile each decoder block of `model` in place (nn.Module.compile, `options` passed
    on); returns how many. The first forward and backward of each new input shape compile."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(f"compile: {type(model).__name__} names no decoder block class (_no_split_modules); "
                          "nothing to compile")
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def read_workflow(adapter_dir: str | os.PathLike) -> dict:
    """What `lowrank train` wrote beside an adapter ({} for an adapter from elsewhere)."""
    f = pathlib.Path(adapter_dir, WORKFLOW_FILE)
    return json.loads(f.read_text()) if f.is_file() else {}


def training_dtype(train: dict, adapter_dir) -> torch.dtype:
    """The dtype `lowrank train` loaded the base in, from a workflow file's config (TrainConfig's
    default where it says none)."""
    name = train.get("dtype", "float32")
    if name not in DTYPES:
        raise ConfigError(f"{pathlib.Path(adapter_dir, WORKFLOW_FILE)}: dtype {name!r} is not one of {DTYPES}")
    return getattr(torch, name)


# Note: quantized again as trained. A qlora adapter was trained against NF4 codes of the base's
# weights in the training dtype. Chat loads the base in its own dtype and casts the weights
# `quantize` reads to the training dtype first: from_pretrained in that dtype rounds a
# checkpoint's weights the same way, so the codes, and the 4-bit layers' own dtype, are the
# trained ones, while the rest (rotary tables, tensors transformers keeps in float32) is what
# from_pretrained gives. Where chat's dtype cannot hold the training dtype's values (bf16 chat of
# a float32 run), the base is loaded in float32 instead and the rest cast to chat's dtype after
# (cast_rest): the same rounding from_pretrained makes, at the cost of a float32 load.
def as_trained(model: nn.Module, config, dtype: torch.dtype) -> None:
    """Cast the weights `config` quantizes to `dtype`, in place (See Note: quantized again as trained)."""
    from ..quant.quantize import _can_quantize, _walk, find_parameters, selected

    wanted = selected(model, config)
    for _, _, name, child in _walk(model):
        if wanted(name, child) and _can_quantize(child) and child.weight.dtype != dtype:
            child.weight.data = child.weight.data.to(dtype)
    for owner, _, p in find_parameters(model, config):
        owner._parameters[p].data = owner._parameters[p].data.to(dtype)


def cast_rest(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and persistent buffers to `dtype` but those transformers keeps in float32
    (lowrank/quant/load.py, Note: tensors transformers keeps in float32); non-persistent buffers
    (rotary tables, computed in float32 by the model) stay as they are, as from_pretrained keeps them."""
    from ..quant.load import float32_plan

    kept = float32_plan(model)
    for prefix, m in model.named_modules():
        for store in (m._parameters, m._buffers):
            for n, t in store.items():
                if t is None or not t.is_floating_point() or n in m._non_persistent_buffers_set:
                    continue
                to = kept(f"{prefix}.{n}" if prefix else n, t, dtype)
                if t.dtype != to:
                    store[n] = nn.Parameter(t.data.to(to), t.requires_grad) if store is m._parameters else t.to(to)


def load_with_adapter(model_dir: str, adapter_dir: str | None, dtype: str = "float32", device: str = "cpu", *,
                      allow_other_base: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer, template) for chatting: the base in `dtype`, quantized again when the
    adapter was trained on a 4-bit base (See Note: quantized again as trained), with the adapter
    loaded (`allow_other_base`, `allow_pickle`: load_adapter's); template as in training. An adapter
    trained with added tokens: See Note: an adapter trained with added tokens."""
    if adapter_dir is None:  # a merged model keeps its adapter's workflow file (lowrank merge): its template
        model, tokenizer = load_base(model_dir, dtype, device, trust_remote_code)
        return model, tokenizer, read_workflow(pathlib.Path(model_dir)).get("config", {}).get("template")
    path = pathlib.Path(adapter_dir)
    if not path.is_dir():
        raise ConfigError(f"--adapter {adapter_dir!r} is not a directory")
    if not (path / CONFIG_NAME).is_file():
        raise ConfigError(f"--adapter {adapter_dir!r} has no {CONFIG_NAME}: not an adapter directory")
    train = read_workflow(path).get("config", {})
    quantized = train.get("method") in METHODS and METHODS[train["method"]].quantize
    trained = training_dtype(train, path) if quantized else None
    wide = quantized and getattr(torch, dtype) not in (trained, torch.float32)  # See Note: quantized again as trained
    own = adapter_tokenizer_dir(path)
    model, tokenizer = load_base(model_dir, "float32" if wide else dtype, device, trust_remote_code, own)
    # stdout is the chat's; before quantize, which may take the head
    resize_as_trained(model, path, file=sys.stderr, tokens=len(tokenizer) if own else None, allow_pickle=allow_pickle)
    if quantized:
        config = nf4_config(train.get("nf4", {}))
        as_trained(model, config, trained)
        quantize(model, config)
    if wide:
        cast_rest(model, getattr(torch, dtype))
    # as trained: float32 adapters load unrounded (a float16 run's, too, where an older file says null)
    adapter_dtype = adapters_dtype(train.get("dtype", "float32"), train.get("adapter_dtype"))
    load_adapter(model, path, dtype=getattr(torch, adapter_dtype) if adapter_dtype in DTYPES else None,
                 allow_other_base=allow_other_base, allow_pickle=allow_pickle)
    return model.eval(), tokenizer, train.get("template")
