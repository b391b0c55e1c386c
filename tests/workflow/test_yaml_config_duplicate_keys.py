"""A YAML config giving a key twice (`lr:` copied further down, `{r: 8, r: 16}`): yaml.safe_load
keeps the last without a word, so the run trained with a value the file also contradicts. It is
now one error line naming the key and its line; a merge key's defaults (`<<:`) may still be
overridden."""

import pytest
import yaml

from lowrank import cli
from lowrank.workflow.config import _unique_keys_loader, load

HEAD = "model: m\ndata: d\noutput_dir: o\n"


@pytest.mark.parametrize("body, key, line", [("lr: 2e-4\nepochs: 3\nlr: 1e-3\n", "lr", 6),
                                             ("method_options: {r: 8, alpha: 16, r: 16}\n", "r", 4),
                                             ("method_options:\n  r: 8\n  r: 16\n", "r", 6)])
def test_a_key_given_twice_is_one_error_line(tmp_path, capsys, body, key, line):
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + body)
    assert cli.main(["train", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowrank train: error: {path}: not valid YAML: key {key!r} given twice") and \
        f"line {line}," in err and err.count("\n") == 1


def test_a_merge_keys_defaults_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + "method_options:\n  <<: {r: 8, alpha: 16}\n  r: 4\n")
    assert dict(load(path).method_options) == {"r": 4, "alpha": 16}


NESTED = """presets:
  base: &base {r: 8, alpha: 16}
  fast: &fast
    <<: *base
    r: 4
method_options:
  <<: *fast
"""


def test_an_anchor_that_overrides_a_merged_key_is_not_a_key_given_twice(tmp_path):
    # constructing method_options flattens `fast` in place (its inherited r beside its own); `fast`,
    # nested deeper, was checked after that and refused: "key 'r' given twice"
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + NESTED)
    text = path.read_text()
    assert yaml.load(text, Loader=_unique_keys_loader(yaml)) == yaml.safe_load(text)  # the values safe_load reads


def test_a_key_given_twice_in_an_anchored_mapping_is_still_refused(tmp_path, capsys):
    # at its own line: the check no longer sees the flattened node, whose first repeat was line 8
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + NESTED.replace("    r: 4\n", "    r: 4\n    r: 2\n"))
    assert cli.main(["train", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML: key 'r' given twice" in err and "line 9," in err, err
