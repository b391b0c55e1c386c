"""A bad record of a JSON Lines file is named by its line too: its record index skips blank
lines, so "record 1" alone sent the user to the wrong line of the file."""

import json

import pytest

from lowrank.workflow import data

GOOD = json.dumps({"conversation": [{"input": "a", "output": "b"}]})


@pytest.mark.parametrize("bad, message", [
    ({"conversation": [{"input": "a"}]}, "record 1.conversation[0]: missing field 'output'"),
    ({"conversation": []}, "record 1.conversation: is empty"),
    ([1], "record 1: must be an object"),
])
def test_a_bad_json_lines_record_names_its_line(tmp_path, bad, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([GOOD, "", "", json.dumps(bad), GOOD]) + "\n")  # record 1 is on line 4
    with pytest.raises(data.DataError) as e:
        data.load(path)
    assert str(e.value).startswith(f"{path}: {message}")
    assert str(e.value).endswith("(line 4)")

