"""A key twice in a data file: refused where it would lose a trained value (a turn's field, a
record's "conversation"), naming the record, field and line in a JSON list as in JSON Lines (a
list's error named neither: the place in a file of thousands of records was left to find); let
be in a field no record is read by (metadata), which json.loads and every other reader accept and
whose lost value trains nothing (lowrank/workflow/data.py, _Object)."""

import pytest

from lowrank.workflow import data

GOOD = '{"conversation": [{"input": "hi", "output": "hello"}]}'
TWICE = '{"conversation": [{"input": "q", "output": "a"}, {"input": "q", "output": "a", "output": "b"}]}'
META = '{"meta": {"source": "x", "source": "y"}, "conversation": [{"input": "q", "output": "a"}]}'


def test_a_json_list_names_the_record_field_and_line():
    text = "[\n" + ",\n".join([GOOD, GOOD, TWICE]) + "\n]"
    with pytest.raises(data.DataError, match=r"^d.json: record 2.conversation\[1\]: the key 'output' appears twice "
                                             r"in one object \(JSON keeps only the last value\) \(line 4\)$"):
        data.parse(text, "d.json")


def test_json_lines_name_the_record_field_and_line():
    with pytest.raises(data.DataError, match=r"^d.jsonl: record 1.conversation\[1\]: the key 'output' .* \(line 3\)$"):
        data.parse("\n".join([GOOD, "", TWICE]), "d.jsonl")


@pytest.mark.parametrize("text", ["[" + GOOD + ",\n" + META + "]", GOOD + "\n" + META + "\n"])
def test_a_key_twice_in_metadata_is_let_be(text):
    records = data.parse(text, "d")
    assert [[(t.input, t.output) for t in r] for r in records] == [[("hi", "hello")], [("q", "a")]]
