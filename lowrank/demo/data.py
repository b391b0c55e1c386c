"""The demo's labelled texts: a JSON-lines file of {"text": ..., "label": ...}, split by seed.

The default, data/topics.jsonl, was written for lowrank (data/README.md says how)."""

from __future__ import annotations

import json
import random
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "topics.jsonl"


def load(path: str | Path) -> list[tuple[str, str]]:
    """(text, label) pairs from a JSON-lines file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found; pass --data a JSON-lines file of "
                                '{"text": ..., "label": ...} objects')
    examples = []
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):  # JSON lines end in \n alone
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = row["text"], row["label"]
        except (json.JSONDecodeError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"{path}:{i}: expected a JSON object with 'text' and 'label'; got {line[:80]!r}") from e
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{i}: 'text' must be a non-empty string; got {text!r}")
        if not isinstance(label, (str, int)) or isinstance(label, bool) or label == "":
            raise ValueError(f"{path}:{i}: 'label' must be a non-empty string or an integer; got {label!r}")
        examples.append((text, str(label)))
    labels = {label for _, label in examples}
    if len(labels) < 2:
        raise ValueError(f"{path}: a classifier needs at least 2 labels; found {sorted(labels)}")
    return examples


def split(examples: list[tuple[str, str]], seed: int, held_out: float = 0.2):
    """Stratified train / held-out split: each label's examples shuffled by `seed`, the first
    `held_out` fraction (at least one) held out. The same file and seed give the same split."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1); got {held_out!r}")
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted({label for _, label in examples}):
        rows = [e for e in examples if e[1] == label]
        if len(rows) < 2:
            raise ValueError(f"label {label!r} has {len(rows)} example; each label needs at least 2 "
                             "(one to train on, one to hold out)")
        rng.shuffle(rows)
        k = max(1, round(held_out * len(rows)))
        test += rows[:k]
        train += rows[k:]
    rng.shuffle(train)
    return train, test
