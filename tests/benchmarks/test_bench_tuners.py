"""The tuners benchmark runs end to end with --quick; its numbers are not asserted."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_tuners  # noqa: E402


def test_quick_run_writes_rows(tmp_path, capsys):
    out = tmp_path / "tuners.json"
    rows = bench_tuners.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] and saved["env"]["peft"] and saved["env"]["date"] and saved["env"]["device"]
    saved = saved["rows"]
    assert saved == rows and len(rows) == 6
    assert {(r["case"], r["provider"]) for r in saved} == {
        ("train_step", "lowrank"), ("train_step", "peft"), ("experts_step", "lowrank"), ("experts_step", "peft"),
        ("merged_inference", "lowrank-merged"), ("merged_inference", "base")}
    assert all(r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["ratio"] > 0 for r in saved)
    assert "| train_step |" in capsys.readouterr().out
