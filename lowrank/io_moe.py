"""LoRA files written for transformers 4's mixture-of-experts layers, read into transformers 5's.

transformers 4 held each expert as linear modules, `<moe>.experts.<e>.w1 / w3 / w2` (Mixtral,
MiniMax) or `gate_proj / up_proj / down_proj` (Qwen2-MoE and the models transformers 5 converts
as it: Qwen3-MoE, OLMoE, DeepSeek-V2/V3, ...), and a router `<moe>.gate`, an nn.Linear. transformers 5 fuses
the experts into two 3-D parameters, `experts.gate_up_proj` (E, 2I, H), expert e's rows [w1_e; w3_e],
and `experts.down_proj` (E, H, I); its router keeps `gate.weight` (PhiMoE's: `router.weight`)
but is no linear module; and Mixtral's `block_sparse_moe` is `mlp` (transformers/conversion_mapping.py, its "mixtral" and
"qwen2_moe" entries). A LoRA file of the old layout becomes LoRA on those parameters
(lowrank/tuners/lora_param.py), as PEFT 0.21 converts it:

    gate_up_proj:  A_e = [A1_e; A3_e]  (2r, H),   B_e = [[B1_e, 0], [0, B3_e]]  (2I, 2r)
    down_proj:     A_e = A2_e, B_e = B2_e

so B_e A_e = [B1_e A1_e; B3_e A3_e], each expert's update exactly as before, at rank 2r. The
scale must stay what it was: alpha doubles with r (PEFT's rule), and with rsLoRA, whose scale
alpha / sqrt(r) doubling both would raise by sqrt(2), alpha grows by sqrt(2) only (PEFT 0.21
doubles it there too). The router's pair goes on `gate.weight` unchanged.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .walk import _unwrap, _walk
from .quant.params4bit import has_parameter, parameter_names, parameter_shape

# transformers 4's per-expert projection -> (transformers 5's parameter, its place in the fusion)
FUSED = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
SLOTS = {"gate_up_proj": 2, "down_proj": 1}  # how many projections each fuses
RENAMED = {".block_sparse_moe.": ".mlp."}  # Mixtral's MoE block
_EXPERT_KEY = re.compile(r"^(?P<moe>.*)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.lora_(?P<ab>[AB])\.weight$")
_MODULE_KEY = re.compile(r"^(?P<module>.*)\.lora_(?P<ab>[AB])\.weight$")


def convert(model: nn.Module, peft_config: dict, weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(config, weights) of a PEFT LoRA file (keys without PEFT's `base_model.model.`) for `model`:
    per-expert and router LoRA of transformers 4 as LoRA on `model`'s fused parameters, when
    `model` has them; anything else unchanged."""
    modules = {n: _unwrap(c) for _, _, n, c in _walk(model)}
    rename = renamer(modules)
    origin = {rename(k): k for k in weights}  # the file's key: its patterns name transformers 4's modules
    weights = {rename(k): v for k, v in weights.items()}
    moved = {_MODULE_KEY.match(k)["module"] for k, o in origin.items() if ".router.lora_" in k and ".gate.lora_" in o}
    experts, rest = {}, {}
    for k, v in weights.items():
        m = _EXPERT_KEY.match(k)
        owner = modules.get(f"{m['moe']}.experts") if m else None
        fused = FUSED.get(m["proj"]) if m else None
        if fused is None or owner is None or not has_parameter(owner, fused[0]):  # dense or 4-bit
            rest[k] = v
            continue
        pair = experts.setdefault((m["moe"], fused[0]), {}).setdefault(m["proj"], {}).setdefault(int(m["e"]), {})
        pair[m["ab"]], pair["module"] = v, _MODULE_KEY.match(origin[k])["module"]
    covered = _as_list(peft_config.get("target_parameters"))
    routers = [m["module"] for k in rest if (m := _MODULE_KEY.match(k)) and m["ab"] == "A"
               and (_is_router(modules.get(m["module"])) or m["module"] in moved)  # a transformers 5 file names its weight:
               and not any(f"{m['module']}.weight" == t or f"{m['module']}.weight".endswith("." + t) for t in covered)]
    if not experts and not routers:
        return peft_config, weights
    rslora, kept = bool(peft_config.get("use_rslora")), {}  # parameter -> (rank, alpha) that keep the file's scale
    for (moe, param), members in experts.items():
        name = f"{moe}.experts.{param}"
        a, b, r = _fuse(name, members, parameter_shape(modules[f"{moe}.experts"], param)[0])
        alphas = {_alpha(peft_config, pair["module"]) for pairs in members.values() for pair in pairs.values()}
        if len(alphas) != 1:
            raise ValueError(f"the file's per-expert LoRA fused into {name} has alphas {sorted(alphas)} "
                             "(alpha_pattern); fusing them needs one")
        n, alpha = len(members), alphas.pop()  # See the module docstring: rank n r, the scale as it was
        kept[name] = (n * r, alpha * (math.sqrt(n) if rslora else n))
        depth = _depth(modules[f"{moe}.experts"], param, {p for (m2, p) in experts if m2 == moe})
        key = f"{moe}.experts{'.base_layer' * depth}"
        rest[f"{key}.lora_A.weight"], rest[f"{key}.lora_B.weight"] = a, b
    for router in routers:  # its own rank and alpha, as the file's patterns gave them to transformers 4's `gate`
        kept[f"{router}.weight"] = (rest[f"{router}.lora_A.weight"].shape[0],
                                    _alpha(peft_config, _MODULE_KEY.match(origin[f"{router}.lora_A.weight"])["module"]))
    config = dict(peft_config)
    config["target_modules"] = _targets_left(config.get("target_modules"), [n for n in modules if n not in routers])
    if config.get("lora_dropout"):  # LoRA on a parameter has no input of its own to drop out (nor in PEFT)
        warnings.warn(f"this transformers 4 adapter was trained with lora_dropout={config['lora_dropout']}; its experts "
                      "load as LoRA on parameters, which has no dropout, so the adapter loads without it: outputs "
                      "are the same in eval mode, and further training runs with no dropout", stacklevel=3)
        config["lora_dropout"] = 0.0
    config["target_parameters"] = sorted(set(covered) | set(kept))
    config["exclude_modules"] = _excluding(config.get("exclude_modules"), routers)  # they were module targets
    # the first matching key wins: these exact ones go before the file's own
    config["rank_pattern"] = {"^" + re.escape(k): r for k, (r, _) in kept.items()} | dict(config.get("rank_pattern") or {})
    config["alpha_pattern"] = {"^" + re.escape(k): a for k, (_, a) in kept.items()} | dict(config.get("alpha_pattern") or {})
    return config, rest


def _targets_left(targets, others: list[str]):
    """The file's target_modules for the converted adapter: the names fused away match no module
    now, and the routers (LoRA on their weights now, and excluded) are no module targets either, so
    a name (or PEFT's regular expression, a full match) that matched only those is dropped: left
    matching nothing, it would be a target that matches no module, which inject refuses (PEFT
    loads such a file). `others`: the model's modules but the routers."""
    if isinstance(targets, list):
        return [t for t in targets if t not in FUSED and t != "gate"
                or any(n == t or n.endswith("." + t) for n in others)] or None
    if isinstance(targets, str):
        try:
            return targets if any(re.fullmatch(targets, n) for n in others) else None
        except re.error:  # not a regular expression: config_from_peft names the problem
            return targets
    return targets


def _alpha(config: dict, module: str) -> float:
    """The alpha PEFT gives `module`: the first alpha_pattern key k with (.*\\.)?(k)$ matching, else lora_alpha."""
    pattern = config.get("alpha_pattern") or {}
    for k, v in pattern.items():
        try:
            if re.match(rf"(.*\.)?({k})$", module):
                return v
        except re.error:  # not a regular expression: only PEFT's fallback below reads it
            continue
    return pattern.get(module, config.get("lora_alpha", 8))  # PEFT's fallback: the module's own name as a key


def renamer(modules: dict[str, nn.Module]) -> Callable[[str], str]:
    """key -> the key under the names of the model whose modules are `modules`, for a key of
    transformers 4 (a LoRA file's, a checkpoint's): Mixtral's `block_sparse_moe` is `mlp`, and
    PhiMoE's `<moe>.gate` is `<moe>.router` (transformers 5's conversion_mapping), each where the
    model has the new name and not the old. (PhiMoE's router subclasses nn.Linear but returns
    routing, not x W^T: its LoRA goes on its weight too.)"""
    parts = {p for n in modules for p in n.split(".")}
    renames = {old: new for old, new in RENAMED.items() if old.strip(".") not in parts}

    def rename(key: str) -> str:
        for old, new in renames.items():
            key = key.replace(old, new)
        head, gate, tail = key.partition(".gate.")
        router = modules.get(head + ".router") if gate and head + ".gate" not in modules else None
        w = None if router is None else router._parameters.get("weight")
        return f"{head}.router.{tail}" if isinstance(w, torch.Tensor) and w.dim() == 2 else key

    return rename


def _is_router(module: nn.Module | None) -> bool:
    """A transformers 5 router: a module with a 2-D `weight` that is no linear layer (Mixtral's
    MixtralTopKRouter), where transformers 4 had an nn.Linear `gate`."""
    from .targets import is_linear_like

    # its weight dense or 4-bit (NF4Config(parameters=[..., "gate.weight"]) puts it in the module's submodules)
    return (module is not None and has_parameter(module, "weight") and len(parameter_shape(module, "weight")) == 2
            and not is_linear_like(module))


def _fuse(name: str, members: dict, experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PEFT's (A, B) for parameter `name` from its per-expert pairs `members[proj][e]["A" / "B"]`
    (See Note: PEFT's factor layout, lowrank/tuners/lora_param.py), and the rank r of each pair."""
    param = name.rsplit(".", 1)[-1]
    order = sorted(members, key=lambda proj: FUSED[proj][1])
    if len(order) != SLOTS[param]:
        raise ValueError(f"the file adapts only {order} of the projections transformers 5 fuses into {name}, which "
                         "lowrank (as PEFT) adapts whole: this adapter cannot be converted")
    for proj in order:
        have = sorted(members[proj])
        if have != list(range(experts)) or any(not {"A", "B"} <= set(members[proj][e]) for e in have):
            raise ValueError(f"the file's per-expert LoRA for {name} ({proj}) covers experts {have}, not all {experts} "
                             "with both lora_A and lora_B: it cannot be fused into the model's 3-D parameter")
    ranks = {members[p][e]["A"].shape[0] for p in order for e in range(experts)}
    if len(ranks) != 1:
        raise ValueError(f"the file's per-expert LoRA for {name} has ranks {sorted(ranks)}; fusing them needs one")
    a = torch.stack([torch.cat([members[p][e]["A"] for p in order]) for e in range(experts)])  # (E, n r, in)
    b = torch.stack([torch.block_diag(*[members[p][e]["B"] for p in order]) for e in range(experts)])  # (E, n out, n r)
    return a.flatten(0, 1), b.permute(2, 0, 1).flatten(0, 1).T.contiguous(), ranks.pop()


def _depth(owner: nn.Module, param: str, adapted: set[str]) -> int:
    """How many of this adapter's layers on `owner` sit outside `param`'s (Note: PEFT's nested names, lowrank/io_names.py)."""
    order = [p for p in parameter_names(owner) if p in adapted]
    return len(order) - 1 - order.index(param)


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _excluding(exclude, names: list[str]):
    """PEFT's exclude_modules with the full module names `names` added: a list gains them; a
    string, which PEFT reads as one regular expression, gains them as alternatives."""
    if not names:
        return exclude
    if isinstance(exclude, str):
        return f"(?:{exclude})|" + "|".join(re.escape(n) for n in names)
    return _as_list(exclude) + names
