"""The routed- and gathered-experts benchmark runs end to end with --quick; its timings are not asserted."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_experts4bit  # noqa: E402


def test_quick_run_writes_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWRANK_EXPERTS", raising=False)
    out = tmp_path / "experts4bit.json"
    rows = bench_experts4bit.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    # T k < E at the first quick shape (one token, top-2 of 4): the gathered path is timed there too
    assert [(r["case"], r["path"]) for r in rows[:6]] == [
        ("forward", "routed"), ("forward", "gathered"), ("forward", "dense"),
        ("lora_fwd_bwd", "routed"), ("lora_fwd_bwd", "gathered"), ("lora_fwd_bwd", "dense")]
    assert [r["path"] for r in rows[6:]] == ["routed", "dense"] * 2
    assert len(rows) == 10 and all(r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"] for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["path"] == "dense")
    assert "LOWRANK_EXPERTS" not in __import__("os").environ  # each path's setting is taken away again


def test_compiled_case(tmp_path, monkeypatch):
    """--compile adds the compiled forward where T k < E (the first quick shape only), both paths."""
    monkeypatch.delenv("LOWRANK_EXPERTS", raising=False)
    rows = bench_experts4bit.main(["--quick", "--compile", "--out", str(tmp_path / "e.json")])
    compiled = [(r["shape"].split()[4], r["path"]) for r in rows if r["case"] == "compiled_forward"]
    assert compiled == [("T1", "gathered"), ("T1", "dense")]
