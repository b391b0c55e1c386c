"""`lowrank merge BASE ADAPTER OUT`: fold an adapter into its base model and write a plain
Hugging Face model directory (lowrank.merge_and_export)."""

from __future__ import annotations

import argparse
import json
import pathlib

from ..export import DTYPES
from .adapter_checks import refuse_before_loading


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base model and save a plain model directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base model: a Hugging Face model directory (dense, or a bitsandbytes 4-bit one)")
    p.add_argument("adapter", help="the adapter: a PEFT-format directory or a hub repo id")
    p.add_argument("out", help="the directory to write (must not exist, or be empty, unless --overwrite)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written weights (default: the base's; a 4-bit base, or --as-trained: its compute "
                   "dtype)")
    p.add_argument("--requantize", action="store_true", help="a 4-bit base: write the merged layers in NF4 again")
    p.add_argument("--as-trained", action="store_true",
                   help="a qlora adapter of lowrank train: quantize the dense base as training did (its lowrank_workflow.json: "
                   "dtype, nf4 options) and merge at those NF4 weights, not the full-precision ones")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the base directory's own Python code (transformers' trust_remote_code; InternLM needs it)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="load the adapter even if its config names another base model")
    p.add_argument("--allow-pickle", action="store_true",  # an older PEFT's adapter: no other way to merge it here
                   help="read a pickled adapter_model.bin (older PEFT; load_adapter's allow_pickle): only from a "
                   "source you trust, a pickle can run code")


# a class name transformers does not export, by its ending -> the Auto class that builds that head
_HEADS = (("ForCausalLM", "AutoModelForCausalLM"), ("ForSequenceClassification", "AutoModelForSequenceClassification"),
          ("ForTokenClassification", "AutoModelForTokenClassification"), ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
          ("ForMaskedLM", "AutoModelForMaskedLM"), ("ForImageClassification", "AutoModelForImageClassification"))


def _load_base(base: str, dtype="auto", trust_remote_code: bool = False):
    """The base model from a transformers directory (`dtype`: a torch dtype for its weights, "auto": the
    checkpoint's); a bitsandbytes 4-bit one is loaded with lowrank.load_quantized (no GPU needed).
    `trust_remote_code`: a class the directory's own code defines (its config's auto_map)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("lowrank merge reads transformers model directories: pip install transformers") from None
    cfg_file = pathlib.Path(base) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{base} has no config.json: not a Hugging Face model directory")
    config = transformers.AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    # the class the directory was saved from (its head included: a classifier's adapter targets it);
    # a name transformers does not export (MPT's "MPTForCausalLM", old "LLaMAForCausalLM"): by its ending
    names = config.architectures or []
    cls = next((getattr(transformers, a) for a in names if hasattr(transformers, a)), None)
    remote = trust_remote_code and cls is None and getattr(config, "auto_map", None)
    if remote:  # the directory's own class, through the auto class its auto_map names (a causal LM's first)
        auto = sorted(config.auto_map, key=lambda k: k != "AutoModelForCausalLM")
        cls = next((getattr(transformers, a) for a in auto if a.startswith("AutoModel") and hasattr(transformers, a)),
                   None)
    if cls is None and names:
        cls = next((getattr(transformers, auto) for a in names for end, auto in _HEADS if a.endswith(end)), None)
        if cls is None:  # the bare model would silently lose the head the adapter may target
            raise ValueError(f"{base}/config.json names architectures {names}, which this transformers "
                             f"{transformers.__version__} does not have; set one it has there")
    extra = {"trust_remote_code": True} if remote else {}
    if json.loads(cfg_file.read_text()).get("quantization_config"):
        from ..checkpoint import load_quantized
        from ..quant.load import skeleton

        del config.quantization_config
        with skeleton():  # parameters on the meta device: filled from the checkpoint
            model = (cls.from_config(config, **extra) if hasattr(cls, "from_config") else cls(config)) \
                if cls is not None else transformers.AutoModel.from_config(config)
        load_quantized(model, base)
    else:
        model = (cls or transformers.AutoModel).from_pretrained(base, dtype=dtype, **extra)
    return model.eval()


def _as_trained(base: str, adapter: str, trust_remote_code: bool = False, resize=None):
    """--as-trained: the base loaded and quantized as `lowrank train` did for this adapter (its
    workflow file's method, dtype and nf4 options), so the adapter merges at the NF4 weights it
    was trained against: the merged model computes what the adapted 4-bit one did, up to the
    rounding of W' into the export dtype. `resize(model)`, where given, runs between the load and
    quantize: the vocabulary the adapter was trained with (resize_as_trained) is given to the
    dense base, as chat does (load_with_adapter), so an output head or embedding that the nf4
    options quantize is quantized at its resized shape; a 4-bit head cannot be resized at all."""
    from ..quant import quantize
    from ..workflow.methods import METHODS, nf4_config
    from ..workflow.model import WORKFLOW_FILE, read_workflow, training_dtype

    if not pathlib.Path(adapter, WORKFLOW_FILE).is_file():
        raise ValueError(f"--as-trained quantizes the base as lowrank train did for the adapter, which its "
                         f"{WORKFLOW_FILE} says (training dtype, nf4 options), and {adapter} has none (a hub id, or "
                         "an adapter lowrank train did not write): merge without --as-trained")
    train = read_workflow(adapter).get("config", {})
    method = train.get("method")
    if method not in METHODS or not METHODS[method].quantize:
        raise ValueError(f"--as-trained merges a qlora adapter at the 4-bit weights it was trained against; "
                         f"{adapter} was trained with method {method!r} (its {WORKFLOW_FILE}), on an unquantized "
                         "base: merge without --as-trained")
    config = pathlib.Path(base, "config.json")
    if config.is_file() and json.loads(config.read_text()).get("quantization_config"):
        raise ValueError(f"--as-trained quantizes a dense base as training did, and {base} is 4-bit already: merge "
                         "without --as-trained")
    model = _load_base(base, training_dtype(train, adapter), trust_remote_code)
    if resize is not None:
        resize(model)
    quantize(model, nf4_config(train.get("nf4", {})))
    return model


def _refuse_unmergeable(adapter) -> None:
    """Before the base loads (minutes for a 7B): an adapter directory of a kind that cannot be folded
    into weights is an error saying how to use it instead (export's own error advises the Python API)."""
    from .. import bottleneck_io, io_prefix, io_prompt

    # adapters that add no weight update (a prompt, a prefix, a bottleneck module with its nonlinearity)
    unmergeable = {io_prompt.PEFT_TYPE: "prompt-tuning", io_prefix.PEFT_TYPE: "prefix-tuning",
                   bottleneck_io.PEFT_TYPE: "bottleneck"}
    config = pathlib.Path(adapter, "adapter_config.json")
    try:
        kind = json.loads(config.read_text()).get("peft_type") if config.is_file() else None
    except (ValueError, OSError, AttributeError):  # not JSON, or not an object: load_adapter names the problem
        return
    if kind in unmergeable:
        raise ValueError(f"{adapter} is a {unmergeable[kind]} adapter (peft_type {kind!r}), which changes no weight "
                         "and so cannot be merged (lowrank merge folds LoRA and DoRA into the weights); use it beside "
                         f"its base: lowrank chat BASE --adapter {adapter}")


def _refuse_replacing_inputs(args) -> None:
    """--overwrite replaces OUT whole: an OUT that is, or holds, BASE or ADAPTER (a typo such as OUT
    `models` for BASE `models/llama`) would delete them with it, after the merge had read them."""
    out = pathlib.Path(args.out).resolve()
    for what, given in (("BASE", args.base), ("ADAPTER", args.adapter)):
        path = pathlib.Path(given).resolve()
        if pathlib.Path(given).exists() and (path == out or out in path.parents):
            raise ValueError(f"OUT {args.out!r} is {'' if path == out else 'a directory holding '}{what} {given!r}: "
                             "writing the merged model there would delete it; choose another OUT")


def _check_out(args) -> None:
    """What merge_and_export refuses only once the base has loaded and merged (minutes for a 7B): a
    bad --max-shard-size, and an OUT it may not write (a file; not empty, without --overwrite)."""
    from ..shards import parse_size

    parse_size(args.max_shard_size)
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another OUT")


def run(args) -> int:
    import torch

    from ..export import merge_and_export
    from ..export_files import TOKENIZER_FILES
    from ..io import load_adapter
    from ..workflow.model import WORKFLOW_FILE, adapter_tokenizer, adapter_tokenizer_dir, resize_as_trained

    from .. import hub

    # the adapter first (a local directory, or a hub repo fetched now: small): a mistyped path, or an adapter the
    # command's flags do not let it read, is an error before the base loads (minutes for a 7B), not after. A hub
    # adapter's tokenizer comes with it, as PEFT's AutoPeftModel looks for it on the hub: OUT takes it (below)
    adapter = hub.resolve(args.adapter, files=hub.ADAPTER_FILES + TOKENIZER_FILES
                          + (("adapter_model.bin",) if args.allow_pickle else ()))
    _refuse_unmergeable(adapter)
    refuse_before_loading(str(adapter), args.base, allow_pickle=args.allow_pickle,
                          allow_other_base=args.allow_other_base)
    _refuse_replacing_inputs(args)
    _check_out(args)
    # the adapter directory's tokenizer, where it holds one, goes into OUT: the base's lacks any tokens added
    # for training (lowrank/workflow/model.py, Note: an adapter trained with added tokens)
    own = adapter_tokenizer_dir(adapter)
    tokenizer = adapter_tokenizer(own, args.trust_remote_code) if own is not None else None

    def resize(model) -> None:  # on the dense base: before --as-trained's quantize, as chat resizes
        resize_as_trained(model, adapter, tokens=len(tokenizer) if tokenizer is not None else None,
                          allow_pickle=args.allow_pickle)

    if args.as_trained:
        model = _as_trained(args.base, adapter, args.trust_remote_code, resize)
    else:
        model = _load_base(args.base, trust_remote_code=args.trust_remote_code)
        resize(model)
    # float32 adapters: s B A formed from the saved numbers in float32 (a bf16 file's exactly), so
    # each merged weight is rounded once, into the export dtype (lowrank/export.py)
    loaded = load_adapter(model, adapter, allow_other_base=args.allow_other_base, dtype=torch.float32,
                          allow_pickle=args.allow_pickle)
    workflow = adapter / WORKFLOW_FILE  # lowrank train's: chat on OUT finds the template
    result = merge_and_export(model, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                              requantize=args.requantize, overwrite=args.overwrite, tokenizer=tokenizer,
                              extra_files={WORKFLOW_FILE: workflow} if workflow.is_file() else None)
    print(f"merged {len(loaded.modules)} modules of {args.adapter} into {args.base}; wrote {args.out} "
          f"({len(result.files)} weight file{'s' if len(result.files) > 1 else ''}, "
          f"{'dtype ' + str(result.dtype).removeprefix('torch.') if result.dtype else 'dtypes as the base'})")
    if result.requantize_error:
        print(f"re-quantizing to NF4 added a relative weight error of at most {result.max_requantize_error:.3g}")
    return 0
