"""How PEFT's adapter_config.json names modules, both ways: target_modules (a list of names or
`.`-suffixes, or one regular expression) and rank_pattern / alpha_pattern keys (regular
expressions matched as `(.*\\.)?(key)$`), from lowrank's wrapped modules when saving and into
lowrank's target specs when loading (lowrank/io.py)."""

from __future__ import annotations

import re

from torch import nn

from .inject import _walk


def to_peft_targets(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """PEFT target_modules naming exactly `wrapped`: the last name parts when they pick out
    no other module, else the full names when those do not (PEFT reads a list entry as a name
    or a `.`-suffix: "0" also picks "1.0"), else one regular expression of the full names
    (PEFT full-matches a string)."""
    names = [n for _, _, n, _ in _walk(model)]
    suffixes = sorted({w.rsplit(".", 1)[-1] for w in wrapped})
    if {n for n in names if n.rsplit(".", 1)[-1] in suffixes} == set(wrapped):
        return suffixes
    if {n for n in names if any(n == w or n.endswith("." + w) for w in wrapped)} == set(wrapped):
        return sorted(wrapped)
    return "(?:" + "|".join(re.escape(w) for w in sorted(wrapped)) + ")"


def to_peft_pattern(values: dict[str, float], wrapped: list[str]) -> dict[str, float]:
    """rank_pattern / alpha_pattern for PEFT, which matches a key as re.match(rf"(.*\\.)?({key})$",
    name): a full name is its own key unless it also matches another wrapped module (when it is
    the `.`-suffix of one), then it is escaped and anchored ("^0" matches "0", not "1.0")."""
    def clashes(w: str) -> bool:
        return any(n != w and re.match(rf"(.*\.)?({w})$", n) for n in wrapped)

    return {("^" + re.escape(w) if clashes(w) else w): v for w, v in values.items()}


def _peft_spec(item: str, as_regex: bool):
    """A PEFT target / exclude entry as our target spec."""
    if as_regex:
        return "all-linear" if item == "all-linear" else "re:" + item
    # PEFT: exact, or a '.'-suffix; no globs. A pattern, not a lambda: the config must pickle with its model
    return r"re:(?:.*\.)?" + re.escape(item)


def from_peft_targets(value):
    """PEFT's target_modules / exclude_modules as our target specs (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [_peft_spec(value, True)]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"target_modules / exclude_modules must be a string or a list of strings; got {value!r}")
    return [_peft_spec(v, False) for v in value]


def from_peft_pattern(p: dict | None, field: str = "rank_pattern") -> dict:
    """PEFT's rank_pattern / alpha_pattern keys as ours: PEFT matches re.match(rf"(.*\\.)?({key})$",
    name), first key wins."""
    if p is not None and not isinstance(p, dict):
        raise TypeError(f"{field} must be a JSON object (module name pattern -> value); got {p!r}")
    return {rf"re:(.*\.)?({k})": v for k, v in (p or {}).items()}
