"""Conversation files: both encodings read the same, every bad record is an error naming its
index and field (never skipped)."""

import json

import pytest

from lowrank.workflow import data

from . import tiny


def test_json_list_and_json_lines_read_the_same(tmp_path):
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps(tiny.CONVERSATIONS))
    as_lines = tmp_path / "a.jsonl"
    as_lines.write_text("\n".join(json.dumps(r) for r in tiny.CONVERSATIONS) + "\n\n")
    records = data.load(as_list)
    assert records == data.load(as_lines)
    assert len(records) == len(tiny.CONVERSATIONS)
    first = records[0]
    assert [t.output for t in first] == [t["output"] for t in tiny.CONVERSATIONS[0]["conversation"]]
    assert first[0].system == tiny.SYSTEM and first[1].system is None  # system optional after the first turn


def test_reading_leaves_the_records_alone(tmp_path):
    raw = json.loads(json.dumps(tiny.CONVERSATIONS))
    data.parse(json.dumps(raw))
    assert raw == tiny.CONVERSATIONS


def _record(**turn):
    return {"conversation": [{"input": "hi", "output": "hello"}, turn]}


BAD = [
    (_record(input="x"), "record 1.conversation[1]: missing field 'output'"),
    (_record(output="x"), "record 1.conversation[1]: missing field 'input'"),
    (_record(input="x", output=3), "record 1.conversation[1].output: must be a string; got int"),
    (_record(input=["x"], output="y"), "record 1.conversation[1].input: must be a string; got list"),
    (_record(input="x", output="y", system=7), "record 1.conversation[1].system: must be a string; got int"),
    (_record(input="x", output="  "), "record 1.conversation[1].output: is empty"),
    (_record(input="x", output="y", answer="z"), "record 1.conversation[1]: unknown field(s) ['answer']"),
    ({"conversation": []}, "record 1.conversation: is empty"),
    ({"conversation": {"input": "x"}}, "record 1.conversation: must be a list of turns; got dict"),
    ({"messages": []}, "record 1: missing field 'conversation'"),
    (["x"], "record 1: must be an object"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[m.split(": ", 1)[1][:40] for _, m in BAD])
@pytest.mark.parametrize("encoding", ["json", "jsonl"])
def test_a_bad_record_is_an_error_naming_index_and_field(tmp_path, bad, message, encoding):
    good = tiny.CONVERSATIONS[1]
    path = tmp_path / f"d.{encoding}"
    path.write_text(json.dumps([good, bad, good]) if encoding == "json" else "\n".join(json.dumps(r) for r in [good, bad, good]))
    with pytest.raises(data.DataError) as e:
        data.load(path)
    assert str(e.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("[]", "holds no records"),
    ("[{", "not valid JSON"),
    ('{"conversation": [{"input": "a", "output": "b"}]}\n{oops', "line 2 (record 1) is not valid JSON"),
])
def test_unreadable_files(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(data.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load(path)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(tmp_path / "nope.json")


def test_a_byte_order_mark_is_not_data(tmp_path):
    """A JSON list saved with a UTF-8 byte-order mark was read as JSON Lines and refused."""
    records = [{"conversation": [{"input": "Hi", "output": "Hello."}]}]
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert data.load(path) == data.parse(json.dumps(records))


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw in a line; str.splitlines broke there."""
    records = [{"conversation": [{"input": "a\u2028b", "output": "c\u2029d\u0085e"}]}, {"conversation": [{"input": "x",
                                                                                                        "output": "y"}]}]
    f = tmp_path / "d.jsonl"
    f.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    got = data.load(f)
    assert [(t.input, t.output) for (t,) in got] == [("a\u2028b", "c\u2029d\u0085e"), ("x", "y")]


def test_half_a_surrogate_pair_is_an_error_naming_the_record(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[{"conversation": [{"input": "ok", "output": "fine"}]}, '
                 '{"conversation": [{"input": "q", "output": "broken \\ud800 text"}]}]')
    with pytest.raises(data.DataError, match=r"record 1\.conversation\[0\]\.output: holds '\\ud800' at character 7"):
        data.load(f)
