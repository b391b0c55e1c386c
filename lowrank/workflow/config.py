"""`lowrank train`'s configuration: one frozen dataclass, read from YAML or a Python file.

A YAML file is a mapping of TrainConfig fields. A Python file either defines `config` (a
dict or a TrainConfig) or defines the fields as module-level names, XTuner style. Relative
paths are taken from the current directory, as every command-line tool does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import runpy
import traceback
import types
from collections.abc import Mapping

import torch

from .methods import FLOAT, nf4_config, tuner_config
from .template import TEMPLATES

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
DISTRIBUTED = ("none", "ddp", "fsdp")


class ConfigError(ValueError):
    """A training configuration that cannot run; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str  # directory of a transformers causal LM (config.json, weights, tokenizer)
    data: str  # conversations: JSON list or JSON Lines (lowrank.workflow.data)
    output_dir: str  # epoch_<n>/ checkpoints go here
    method: str = "lora"  # a key of lowrank.workflow.methods.METHODS
    method_options: Mapping = dataclasses.field(default_factory=dict)  # LoraConfig / AdapterConfig fields
    nf4: Mapping = dataclasses.field(default_factory=dict)  # NF4Config fields, for qlora; empty: QLoRA's defaults
    template: str | None = None  # None: the tokenizer's own chat template; else a name in TEMPLATES
    epochs: int = 3  # the seed notes' run (XTuner's oasst1 config) trains 3 epochs
    lr: float = 2e-4  # XTuner's and QLoRA's LoRA learning rate
    schedule: str = "cosine"  # decay after warmup; cosine is XTuner's / QLoRA-style default
    warmup_ratio: float = 0.03  # fraction of the optimizer steps spent warming up linearly (XTuner: 0.03)
    weight_decay: float = 0.0  # AdamW decay; adapters are small, XTuner uses 0
    max_grad_norm: float = 1.0  # clip the adapter gradients' norm; 0 turns clipping off
    batch_size: int = 1  # sequences per micro-batch (XTuner: 1, with gradient accumulation)
    grad_accum: int = 16  # micro-batches per optimizer step (XTuner's accumulative_counts)
    max_length: int = 2048  # tokens per sequence; longer records are cut here and counted
    seed: int = 0  # adapter init, data order and dropout all follow it
    dtype: str = "float32"  # of the base weights; bfloat16 halves memory on GPUs that have it
    adapter_dtype: str | None = None  # None: the base's (float32 on a float16 base); "float32": PEFT's default
    trust_remote_code: bool = False  # run the model directory's own Python code (InternLM ships its model so)
    device: str = "auto"  # "auto": the GPU when there is one, else the CPU; or e.g. "cpu", "cuda:1"
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    paged_optimizer: bool = False  # lowrank.optim.PagedAdamW: states in CUDA unified memory (same updates)
    optimizer_bits: int = 32  # 8: AdamW8bit's blockwise 8-bit moments (PagedAdamW state_bits=8), 1/4 of the memory
    compile: bool = False  # torch.compile each decoder layer: less Python a step; the first steps compile
    log_every: int = 1  # optimizer steps between progress updates
    distributed: str = "none"  # "ddp" / "fsdp": one process per GPU under torchrun (workflow/parallel.py)

    def __post_init__(self) -> None:
        for f in ("model", "data", "output_dir"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise ConfigError(f"{f} must be a non-empty path string; got {getattr(self, f)!r}")
        for f in ("method", "template"):  # names looked up in a dict: a YAML mapping there ("a: b") is no name
            if getattr(self, f) is not None and not isinstance(getattr(self, f), str):
                raise ConfigError(f"{f} must be a name (a string); got {type(getattr(self, f)).__name__} "
                                  f"{getattr(self, f)!r} (YAML reads an unquoted 'a: b' as a mapping: quote it)")
        for f, low in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("max_length", 2), ("log_every", 1),
                       ("seed", 0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{f} must be an integer >= {low}; got {v!r}")
        if self.epochs >= 2**64:  # alone past the data order's generator seed (below): the seed is not to blame
            raise ConfigError(f"epochs must be below 2**64 (the data order seeds a generator with seed * 1000003 + "
                              f"epoch); got {self.epochs}")
        if self.seed * 1_000_003 + self.epochs - 1 >= 2**64:  # the last epoch's generator seed (workflow/batches.py)
            raise ConfigError(f"seed must be below {(2**64 - self.epochs) // 1_000_003 + 1} (the data order seeds a "
                              f"generator with seed * 1000003 + epoch, at most 2**64 - 1); got {self.seed}")
        for f, ok, allowed in (("lr", lambda v: v > 0, "> 0"), ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
                               ("weight_decay", lambda v: v >= 0, ">= 0"), ("max_grad_norm", lambda v: v >= 0, ">= 0")):
            v = getattr(self, f)
            if isinstance(v, str) and FLOAT.fullmatch(v.strip()):  # YAML 1.1 reads 1e-4 (no dot) as a string
                v = float(v)
                object.__setattr__(self, f, v)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ConfigError(f"{f} must be a number {allowed}; got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"device must be 'auto' or a torch device string; got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ConfigError(f"device must be 'auto' or a torch device string such as 'cpu', 'cuda', 'cuda:1'; "
                                  f"got {self.device!r} ({e})") from None
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}; got {self.dtype!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in DTYPES:
            raise ConfigError(f"adapter_dtype must be null (the base's dtype) or one of {DTYPES}; "
                              f"got {self.adapter_dtype!r}")
        # AdamW's eps (1e-8) is 0 in float16: a zero gradient's update is 0 / 0 (LoRA's A, while B is 0, gets one on
        # the first step), so float16 adapters train NaN; on a float16 base they are float32, as PEFT's are
        if self.adapter_dtype == "float16":
            raise ConfigError("adapter_dtype: float16 trains NaN (AdamW's eps of 1e-8 is 0 in float16, and an update "
                              "of a zero gradient is 0 / 0); use float32 (the default on a float16 base) or bfloat16")
        object.__setattr__(self, "adapter_dtype", adapters_dtype(self.dtype, self.adapter_dtype))
        if self.distributed not in DISTRIBUTED:
            raise ConfigError(f"distributed must be one of {DISTRIBUTED}; got {self.distributed!r}")
        if type(self.optimizer_bits) is not int or self.optimizer_bits not in (8, 32):  # not 8.0, not True
            raise ConfigError(f"optimizer_bits must be 32 (AdamW's float32 moments) or 8 (blockwise 8-bit); "
                              f"got {self.optimizer_bits!r}")
        if self.optimizer_bits == 8 and self.distributed == "fsdp":
            raise ConfigError("optimizer_bits: 8 does not work with distributed: fsdp (8-bit blocks would follow the "
                              "shards); use 32, or ddp")
        if self.template is not None and self.template not in TEMPLATES:
            raise ConfigError(f"template must be null (the tokenizer's own) or one of {sorted(TEMPLATES)}; "
                              f"got {self.template!r}")
        for f in ("activation_checkpointing", "paged_optimizer", "compile", "trust_remote_code"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"{f} must be true or false; got {getattr(self, f)!r}")
        for f in ("method_options", "nf4"):
            if not isinstance(getattr(self, f), Mapping):
                raise ConfigError(f"{f} must be a mapping of option: value; got {getattr(self, f)!r}")
            object.__setattr__(self, f, types.MappingProxyType(dict(getattr(self, f))))
        try:
            tuner = tuner_config(self.method, dict(self.method_options))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.distributed == "fsdp" and getattr(tuner, "projection_hidden", None) is not None:
            raise ConfigError("method_options.projection_hidden (the prefix's MLP, shared by every layer) does not work "
                              "with distributed: fsdp (FSDP2 shards it outside the layer that owns it); use ddp, or "
                              "projection_hidden: null (P-tuning v2)")
        if self.nf4 and self.method != "qlora":
            raise ConfigError(f"nf4 options apply to method 'qlora' only; method is {self.method!r}")
        try:
            nf4_config(self.nf4)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
                for f in dataclasses.fields(self)}


FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
REQUIRED = [f.name for f in dataclasses.fields(TrainConfig) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def from_mapping(values: Mapping, source: str = "config") -> TrainConfig:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: must be a mapping of TrainConfig fields; got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; allowed: {FIELDS}")
    missing = [f for f in REQUIRED if f not in values]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")
    try:
        return TrainConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def adapters_dtype(dtype: str, adapter_dtype: str | None) -> str | None:
    """The adapters' dtype a run with these fields trains: float32 on a float16 base when none is
    named (See TrainConfig: float16 adapters train NaN), else as named (None: the base's)."""
    return "float32" if adapter_dtype is None and dtype == "float16" else adapter_dtype


def _refuse_near_misses(names: Mapping, path) -> None:
    """A .py config's module-level names are its fields, and may be helpers too; a plain value
    under a name one typo from a field (`epoch = 1`, `warmup_ration`) is an error, as an unknown
    YAML key is (`lrr`, `sed`, `dtyp` too). A field's plural (`seeds`, `dtypes`) and a name of one
    or two letters (LoRA's `r`) read as helpers' names and are left alone."""
    for k, v in names.items():
        if k in FIELDS or k.startswith("_") or not isinstance(v, (bool, int, float, str, list, dict, type(None))):
            continue
        near = [f for f in FIELDS if len(k) >= 3 and _one_typo(k, f) and k != f + "s"]
        if near:
            raise ConfigError(f"{path}: {k!r} is not a TrainConfig field; did you mean {near[0]!r}? (start a helper "
                              "variable's name with _)")


def _refuse_ignored_fields(names: Mapping, config, path) -> None:
    """A .py config that defines `config` is read from it alone: a module-level field name beside it
    whose value is not config's (`epochs = 1` added below the dict) would be ignored without a word.
    One that only helps build config (`model = ...` used as config's model) is fine, compared as
    TrainConfig reads both: `adapter_dtype = None` passed to a TrainConfig on a float16 base reads
    back as "float32", `lr = "1e-4"` as 1e-4, and a field config leaves at its default is no other value."""
    if not isinstance(config, Mapping):
        return  # refused by the caller, naming its type

    def read(values, k):
        try:
            return from_mapping(values).to_dict()[k]
        except ConfigError:
            return values.get(k, ConfigError)  # refused: compared as written (the caller reports config's error)

    stray = [k for k in FIELDS if k in names and isinstance(names[k], (bool, int, float, str, list, dict, type(None)))
             and (k not in config or config[k] != names[k]) and read({**config, k: names[k]}, k) != read(config, k)]
    if stray:
        raise ConfigError(f"{path}: defines `config`, which alone is read, and module-level {stray} with other values, "
                          "which would be ignored; put them in config (or name helper variables with a leading _)")


def _one_typo(a: str, b: str) -> bool:
    """One character changed, added, dropped, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def load(path: str | os.PathLike, overrides: Mapping | None = None) -> TrainConfig:
    """The TrainConfig of a .yaml/.yml or .py file, with `overrides` (field: value) on top."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.suffix in (".yaml", ".yml"):
        yaml = require("yaml", "pyyaml")
        try:
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_keys_loader(yaml))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    elif path.suffix == ".py":
        names = _run(path)
        if "config" in names:
            values = names["config"]
            values = values.to_dict() if isinstance(values, TrainConfig) else values
            _refuse_ignored_fields(names, values, path)
        else:
            values = {k: v for k, v in names.items() if k in FIELDS}
            _refuse_near_misses(names, path)
    else:
        raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml or .py")
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: must hold a mapping of TrainConfig fields; got {type(values).__name__}")
    return from_mapping({**values, **(overrides or {})}, str(path))


def _run(path: pathlib.Path) -> dict:
    """The module-level names of a .py config; what stops it from running (a typo in the code, a
    name it never defined) is a ConfigError naming the file and line, as a bad YAML file's is, not
    a traceback (LOWRANK_TRACEBACK=1 shows the config's own, chained)."""
    try:
        return runpy.run_path(str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}: line {e.lineno}: not valid Python: {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - any error of the user's code, which runs here
        mine = path.resolve()
        frames = [f for f in traceback.extract_tb(e.__traceback__) if pathlib.Path(f.filename).resolve() == mine]
        where = f"line {frames[-1].lineno}: " if frames else ""
        raise ConfigError(f"{path}: {where}running it raised {type(e).__name__}: {e}") from e


def _unique_keys_loader(yaml):
    """yaml.SafeLoader refusing a key given twice in one mapping (`lr:` copied further down): safe_load
    keeps the last one without a word, so the run trained with a value the file also contradicts.
    Each mapping's own keys are checked on the composed document, before anything is constructed:
    constructing a mapping that merges another (`<<: *fast`) rewrites the merged node in place,
    its inherited keys beside its own, and a mapping constructed after that (an anchor nested
    deeper than its alias) would show its override of an inherited key as a key given twice."""

    class UniqueKeys(yaml.SafeLoader):
        def construct_document(self, node):
            stack, checked = [node], set()
            while stack:
                n = stack.pop()
                if id(n) in checked:  # an anchored node, met again through an alias
                    continue
                checked.add(id(n))
                if isinstance(n, yaml.SequenceNode):
                    stack.extend(reversed(n.value))
                elif isinstance(n, yaml.MappingNode):
                    self._check_keys(n)
                    stack.extend(reversed([v for _, v in n.value]))
            return super().construct_document(node)

        def _check_keys(self, node):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # `<<: *defaults`, which the keys after it override
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                            key_node.start_mark)
                seen.add(key)

    return UniqueKeys


def to_yaml(config: TrainConfig | None = None) -> str:
    """YAML text of `config` (None: every field at its default, required ones blank).
    Each value is written as JSON, which YAML reads as the same value."""
    values = config.to_dict() if config else {f.name: (None if f.name in REQUIRED else
                                                        (f.default_factory() if f.default is dataclasses.MISSING
                                                         else f.default)) for f in dataclasses.fields(TrainConfig)}
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items())


def require(module: str, package: str):
    """Import an optional dependency of the workflow, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this needs the {package!r} package: pip install 'lowrank[workflow]'") from None
