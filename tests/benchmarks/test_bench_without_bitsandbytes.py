"""The QLoRA benchmarks without bitsandbytes (a GPU machine whose wheel was not carried: gpu_check.sh
goes on without it): lowrank's rows are still measured and written, the peft+bitsandbytes row
is left out and no ratio is made up. They stopped with ModuleNotFoundError before any row."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_qlora  # noqa: E402
import bench_qlora_moe  # noqa: E402


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


def test_bench_qlora_quick_measures_lowrank_alone(tmp_path, no_bitsandbytes):
    out = tmp_path / "qlora.json"
    rows = bench_qlora.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    assert [r["provider"] for r in rows] == ["lowrank"]
    assert rows[0]["ms"] > 0 and rows[0]["ratio"] is None and rows[0]["first_loss"] > 0


def test_bench_qlora_moe_quick_measures_lowrank_alone(tmp_path, no_bitsandbytes):
    out = tmp_path / "qlora_moe.json"
    rows = bench_qlora_moe.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    lowrank = ["lowrank-4bit-experts", "lowrank-4bit-dense-path", "lowrank-dense-experts"]
    assert [r["provider"] for r in rows] == lowrank * 2
    assert all(r["ms"] > 0 and r["ratio"] is None for r in rows)
