"""A key twice in one object of a data file is refused with its place: json.loads keeps the last
value silently, so a turn with "output" twice trained on the second answer and lost the first."""

import pytest

from lowrank.workflow import data


def test_a_duplicate_key_in_a_json_lines_record_names_its_line():
    text = ('{"conversation": [{"input": "hi", "output": "hello"}]}\n'
            '{"conversation": [{"input": "q", "output": "a", "output": "b"}]}\n')
    with pytest.raises(data.DataError,
                       match=r"d.jsonl: record 1.conversation\[0\]: the key 'output' appears twice.*\(line 2\)"):
        data.parse(text, "d.jsonl")


def test_a_duplicate_key_in_a_json_list_is_refused():
    text = '[{"conversation": [{"input": "q", "output": "a"}], "conversation": []}]'
    with pytest.raises(data.DataError, match=r"d.json: record 0: the key 'conversation' appears twice"):
        data.parse(text, "d.json")


def test_the_same_key_in_different_objects_is_fine():
    text = '{"conversation": [{"input": "q1", "output": "a1"}, {"input": "q2", "output": "a2"}]}\n'
    (record,) = data.parse(text, "d.jsonl")
    assert [(t.input, t.output) for t in record] == [("q1", "a1"), ("q2", "a2")]
