"""Conversation data in the seed notes' (XTuner's) format, checked record by record.

    [{"conversation": [{"system": "...", "input": "...", "output": "..."}, ...]}, ...]

A JSON list of records, or JSON Lines (one record a line). Each record holds one or more
turns; every turn needs a non-empty string `output` and a string `input`; `system` is a
string and optional (the first turn usually carries it, later turns may restate it). A bad
record is an error naming its index, field and line, never a silent skip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

TURN_FIELDS = ("system", "input", "output")


class DataError(ValueError):
    """A data file that is not valid conversation data; the message names the place."""


def _objects():
    """(object_pairs_hook, twice): the hook builds each JSON object as json.loads does and records in
    `twice`, by the dict's id, the keys it had more than once. json.loads keeps the last value
    silently, so {"output": "a", "output": "b"} would train on "b" and lose "a": the fields a record
    is read by are checked where the record is (_refuse_twice), so the error names the record, field
    and line; a key twice in a field no record is read by (its metadata) loses nothing trained and is
    let be, as json.loads lets it. An id is a dict's while the dict lives: `twice` is emptied before
    each JSON line."""
    twice: dict[int, list[str]] = {}

    def hook(pairs: list[tuple[str, object]]) -> dict:
        out = dict(pairs)
        if len(out) < len(pairs):
            keys = [k for k, _ in pairs]
            twice[id(out)] = sorted({k for k in keys if keys.count(k) > 1})
        return out
    return hook, twice


def _refuse_twice(raw, twice: dict[int, list[str]], where: str) -> None:
    """A DataError for a record whose "conversation", or a turn's field, was given twice."""
    if not twice:
        return
    objects = [(raw, ("conversation",), where)]
    turns = raw.get("conversation") if isinstance(raw, dict) else None
    if isinstance(turns, list):
        objects += [(t, TURN_FIELDS, f"{where}.conversation[{i}]") for i, t in enumerate(turns)]
    for obj, fields, at in objects:
        keys = [k for k in twice.get(id(obj), ()) if k in fields]
        if keys:
            raise DataError(f"{at}: the key {keys[0]!r} appears twice in one object (JSON keeps only the last value)")


@dataclasses.dataclass(frozen=True)
class Turn:
    input: str
    output: str | None  # None only when chatting: the answer still to be generated
    system: str | None = None  # None: this turn does not (re)state a system prompt


Conversation = tuple  # tuple[Turn, ...]: one record


def _turn(raw, where: str) -> Turn:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a turn must be an object with 'input' and 'output'; got {type(raw).__name__}")
    extra = sorted(set(raw) - set(TURN_FIELDS))
    if extra:
        raise DataError(f"{where}: unknown field(s) {extra}; a turn has only {list(TURN_FIELDS)}")
    for field in ("input", "output"):
        if field not in raw:
            raise DataError(f"{where}: missing field {field!r}")
    for field in TURN_FIELDS:
        value = raw.get(field)
        if field in raw and not isinstance(value, str) and not (field == "system" and value is None):
            raise DataError(f"{where}.{field}: must be a string; got {type(value).__name__} {value!r:.40}")
        if isinstance(value, str):
            try:  # JSON's \ud800 escapes give Python strings no tokenizer can encode
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}.{field}: holds {value[e.start]!r} at character {e.start}, half of a UTF-16 "
                                "surrogate pair (a \\ud800-\\udfff escape without its other half), not text") from None
    if not raw["output"].strip():
        raise DataError(f"{where}.output: is empty; every turn needs an answer to learn from")
    return Turn(input=raw["input"], output=raw["output"], system=raw.get("system"))


def check_record(raw, index: int, source: str = "data") -> Conversation:
    """One record as a tuple of Turns, or a DataError naming `source`, `index` and the field."""
    where = f"{source}: record {index}"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: must be an object {{\"conversation\": [...]}}; got {type(raw).__name__}")
    if "conversation" not in raw:
        raise DataError(f"{where}: missing field 'conversation' (fields seen: {sorted(raw)})")
    turns = raw["conversation"]
    if not isinstance(turns, list):
        raise DataError(f"{where}.conversation: must be a list of turns; got {type(turns).__name__}")
    if not turns:
        raise DataError(f"{where}.conversation: is empty; a record needs at least one turn")
    return tuple(_turn(t, f"{where}.conversation[{i}]") for i, t in enumerate(turns))


def parse(text: str, source: str = "data") -> list[Conversation]:
    """Records from the text of a JSON list or of JSON Lines (told apart by the first character)."""
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{source}: is empty; expected a JSON list of records or JSON Lines")
    hook, twice = _objects()
    if stripped.startswith("["):
        try:
            raws = json.loads(text, object_pairs_hook=hook)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not valid JSON: {e}") from None
        records = []
        for i, r in enumerate(raws):
            try:
                _refuse_twice(r, twice, f"{source}: record {i}")
                records.append(check_record(r, i, source))
            except DataError as e:  # a list's records are found by line in an editor, as JSON Lines' are
                raise DataError(f"{e} (line {_element_line(text, i)})") from None
    else:
        records = []
        # lines end at "\n" alone (JSON takes a trailing "\r" as whitespace): str.splitlines also breaks at U+2028,
        # U+2029 and U+0085, which json.dumps(ensure_ascii=False) leaves inside strings
        for line_no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                twice.clear()
                raw = json.loads(line, object_pairs_hook=hook)
            except json.JSONDecodeError as e:
                if not records and _one_object(text):  # valid JSON, only not a line a record: say what it is
                    raise DataError(f"{source}: is one JSON object over several lines; expected a JSON list "
                                    "of records ([{\"conversation\": [...]}, ...]) or JSON Lines (one record a "
                                    "line)") from None
                raise DataError(f"{source}: line {line_no} (record {len(records)}) is not valid JSON: {e}") from None
            try:
                _refuse_twice(raw, twice, f"{source}: record {len(records)}")
                records.append(check_record(raw, len(records), source))
            except DataError as e:  # the record's index skips blank lines: its line is where an editor finds it
                raise DataError(f"{e} (line {line_no})") from None
    if not records:
        raise DataError(f"{source}: holds no records")
    return records


def _element_line(text: str, index: int) -> int:
    """The line where element `index` of the (valid) JSON list `text` starts."""
    decoder, at = json.JSONDecoder(), text.index("[") + 1
    for _ in range(index + 1):
        while text[at] in " \t\r\n,":  # JSON's whitespace and the separator before an element
            at += 1
        start = at
        _, at = decoder.raw_decode(text, at)
    return text.count("\n", 0, start) + 1


def _one_object(text: str) -> bool:
    """Whether `text` is a single JSON object (a record pretty-printed, not in a list)."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def load(path: str | os.PathLike) -> list[Conversation]:
    """Records of the file at `path` (.json list or .jsonl), every one checked."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not data
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    return parse(text, str(path))
