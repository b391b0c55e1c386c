"""The codec benchmark (make demo) runs end to end; its numbers are not asserted."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_nf4_codec  # noqa: E402


def test_quick_run_writes_rows(tmp_path, capsys):
    out = tmp_path / "codec.json"
    rows = bench_nf4_codec.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["env"]["torch"]
    assert {r["op"] for r in rows} == {"quantize", "dequantize"}
    assert {"lowrank", "bitsandbytes"} <= {r["provider"] for r in rows}
    assert all(r["ms"] > 0 and r["p20"] <= r["ms"] <= r["p80"] for r in rows)
    assert all(r["speedup"] for r in rows)
    assert "| quantize |" in capsys.readouterr().out and out.with_suffix(".md").exists()
