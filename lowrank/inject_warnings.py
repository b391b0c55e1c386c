"""What `inject` warns of once its adapter is in: a task head that all-linear left out and
froze, and LoRA's rank_pattern / alpha_pattern keys that set nothing."""

from __future__ import annotations

import warnings

from torch import nn

from .config import LoraConfig
from .targets import ALL_LINEAR, compile_filter, first_match, task_heads
from .tuners.base import TunerLayer
from .walk import _walk


def frozen_head(model: nn.Module, config, targets) -> None:
    """LoRA's all-linear leaves a task model's head out (targets.py): say it is frozen, unless LoRA
    is on it anyway (named besides all-linear) or the user excluded it."""
    heads = task_heads(model) if isinstance(config, LoraConfig) and ALL_LINEAR in (targets or ()) else []
    excluded = compile_filter(config.exclude, (), model) if heads and config.exclude else None
    adapted = [w for _, _, w, c in _walk(model) if isinstance(c, TunerLayer)]
    heads = [h for h in heads if not any(w == h or w.startswith(h + ".") for w in adapted)
             and not (excluded and excluded(h, None))]
    if heads:
        names = [h.removeprefix("_orig_mod.") for h in heads]
        warnings.warn(f"all-linear leaves {type(getattr(model, '_orig_mod', model)).__name__}'s task head {names} out, "
                      "as PEFT does, and inject freezes it; PEFT trains it beside the adapter (modules_to_save): set "
                      "its requires_grad to train it (save_adapter writes it either way)", stacklevel=3)


class UnmatchedPatternWarning(RuntimeWarning):
    """A rank_pattern / alpha_pattern key matched none of the modules (or parameters) LoRA adapted."""


# Note: pattern keys that match nothing. rank_pattern / alpha_pattern keys take targets' syntax
# (a name or dotted suffix, a glob over the full name, "re:<regex>"); PEFT reads each key as a
# regular expression, re.match(rf"(.*\.)?({key})$", name). A PEFT-style key such as "mlp.*",
# "[qv]_proj" or "q_proj|v_proj" is a glob or a name here and matched nothing, so the adapter
# silently took the default rank and alpha where PEFT gives the pattern's: another model trained.
# inject warns of each such key (PEFT 0.21 warns of its own unmatched keys), naming PEFT's form.
# load_adapter turns PEFT's keys into ours itself (io_names.from_peft_pattern: some only for
# PEFT's fallback, which may match nothing) and does not pass this warning on.
def unmatched_patterns(config, adapted: list[tuple[str, nn.Module]]) -> None:
    """Warn of `config`'s rank_pattern / alpha_pattern keys that match none of `adapted`, the
    (name, module) pairs LoRA went on, as first_match reads them (See Note: pattern keys that
    match nothing)."""
    if not isinstance(config, LoraConfig):
        return
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field)
        unused = [k for k in patterns if not any(first_match({k: True}, n, m, False) for n, m in adapted)]
        if unused:
            peft = next((k for k in unused if isinstance(k, str) and not k.startswith("re:")), None)
            as_ours = rf"re:(.*\.)?({peft})"  # PEFT's match of the key, in our syntax
            warnings.warn(
                f"{field} keys {unused} match none of the {len(adapted)} modules this LoRA adapter went on (e.g. "
                f"{[n for n, _ in adapted[:3]]}), so they set nothing there: a key is a name or dotted suffix "
                "('q_proj'), a glob over the full name ('*.mlp.*') or 're:<regex>' (a full match), as in targets"
                + (f"; PEFT's regular expression {peft!r} is {as_ours!r} here" if peft else ""),
                UnmatchedPatternWarning, stacklevel=3)
