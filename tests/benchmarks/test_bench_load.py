"""The checkpoint-loading benchmark runs end to end with --quick; its numbers are not asserted."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_load  # noqa: E402


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_quick_run_writes_rows(tmp_path):
    out = tmp_path / "load.json"
    rows = bench_load.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["env"]["transformers"] and saved["env"]["date"]
    assert [r["provider"] for r in rows] == ["from_pretrained+quantize", "skeleton+load_and_quantize"]
    assert rows[0]["model_mb"] == rows[1]["model_mb"] > 0  # both paths end with the same 4-bit model
    assert all(r["seconds"] > 0 and r["ratio"] > 0 for r in rows)
