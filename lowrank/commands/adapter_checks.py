"""What load_adapter would refuse about an adapter directory, checked by lowrank merge, chat and
web before the base loads (minutes for a 7B) and named by the command's own flags: load_adapter's
errors, written for the Python API, ask for allow_pickle=True / allow_other_base=True, which a
command-line user cannot pass."""

from __future__ import annotations

import json
import pathlib


def refuse_before_loading(adapter: str | None, base: str, *, allow_pickle: bool, allow_other_base: bool) -> None:
    """FileNotFoundError for an adapter given as one of its files (naming its directory). ValueError
    for a local adapter directory of a kind load_adapter does not read (PEFT's IA3, LoHa...), and,
    naming --allow-pickle or --allow-other-base, for one whose weights are only a pickle or whose
    config names another base than `base` (as given: what the loaded model's config._name_or_path
    will be, which load_adapter compares). A hub id, or a directory load_adapter refuses for
    another reason, is left to load_adapter."""
    from .. import bottleneck_io, io_prefix, io_prompt
    from ..io import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
    from ..io_names import same_base

    path = pathlib.Path(adapter) if adapter is not None else None
    if path is not None and path.is_file():  # adapter_config.json given: refused by load_adapter only after the load
        raise FileNotFoundError(f"{adapter} is a file; an adapter is loaded from its directory ({path.parent}, which "
                                "holds adapter_config.json and adapter_model.safetensors)")
    if path is None or not path.is_dir():
        return
    if not allow_pickle and not (path / WEIGHTS_NAME).exists() and (path / PICKLE_NAME).exists():
        raise ValueError(f"{path / PICKLE_NAME} is a pickle file, which can execute code when loaded; lowrank reads "
                         "safetensors only unless you pass --allow-pickle (if you trust its source)")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):  # no config, not JSON: load_adapter names the problem
        return
    kinds = ("LORA", io_prompt.PEFT_TYPE, io_prefix.PEFT_TYPE, bottleneck_io.PEFT_TYPE)  # load_adapter's
    if isinstance(config, dict) and config.get("peft_type") not in kinds:  # PEFT's IA3, LoHa...: refused after the load
        raise ValueError(f"{path / CONFIG_NAME}: peft_type is {config.get('peft_type')!r}; lowrank reads LoRA ('LORA'), "
                         "prompt-tuning ('PROMPT_TUNING'), prefix-tuning ('PREFIX_TUNING') and lowrank's bottleneck "
                         "('LOWRANK_BOTTLENECK') adapters")
    theirs = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    # load_adapter's check_base (lowrank/io_names.py), with the base as given: the loaded model's _name_or_path
    if not allow_other_base and isinstance(theirs, str) and theirs and base and not same_base(theirs, str(base)):
        raise ValueError(f"{path / CONFIG_NAME}: the adapter was trained on base model {theirs!r}, but the base is "
                         f"{str(base)!r}; pass --allow-other-base if you know they have the same weights")
