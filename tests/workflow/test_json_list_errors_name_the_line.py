"""A bad record of a JSON list file is named by the line where it starts too, as a JSON Lines
record is: "record 212" alone sent the user counting records through an indented file."""

import json

import pytest

from lowrank.workflow import data

GOOD = {"conversation": [{"input": "a", "output": "b"}]}


@pytest.mark.parametrize("indent", [None, 1, 4])
def test_a_bad_record_of_a_json_list_names_its_line(tmp_path, indent):
    records = [GOOD] * 3 + [{"conversation": [{"input": "a"}]}, GOOD]
    text = json.dumps(records, indent=indent)
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(data.DataError) as e:
        data.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: record 3.conversation[0]: missing field 'output' (line ")
    line = int(message.rsplit("(line ", 1)[1].rstrip(")"))
    # the line where record 3 starts: json.dumps opens each record on a line of its own, at one indent
    starts = [n for n, t in enumerate(text.split("\n"), 1) if t == " " * indent + "{"] if indent else [1] * 5
    assert line == starts[3]


def test_elements_after_odd_whitespace_and_nested_lists_are_counted_right(tmp_path):
    text = '[\r\n\t{"conversation": [{"input": "[a, b]", "output": "x"}]} ,\n\n  [1]\n]'
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(data.DataError, match=r"record 1: must be an object .* \(line 4\)$"):
        data.load(path)
