"""A data file holding one record as an indented JSON object (not in a list) is valid JSON, but
neither a list of records nor JSON Lines; the error said its line 1 was "not valid JSON:
Expecting property name enclosed in double quotes", which the file is not."""

import json

import pytest

from lowrank.workflow import data

RECORD = {"conversation": [{"input": "a", "output": "b"}]}


def test_one_pretty_printed_object_is_named_for_what_it_is(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORD, indent=2))
    with pytest.raises(data.DataError) as e:
        data.load(path)
    assert str(e.value).startswith(f"{path}: is one JSON object over several lines; expected a JSON list of records")
    path.write_text(json.dumps([RECORD], indent=2))  # the same record in a list reads
    assert data.load(path) == [(data.Turn(input="a", output="b"),)]


def test_broken_json_lines_still_name_their_first_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORD) + "\n{oops\n")
    with pytest.raises(data.DataError, match=r"line 2 \(record 1\) is not valid JSON"):
        data.load(path)
    path.write_text('{\n"conversation": [{"input": "a", "output": "b"}]\n')  # not whole: no JSON at all
    with pytest.raises(data.DataError, match=r"line 1 \(record 0\) is not valid JSON"):
        data.load(path)
