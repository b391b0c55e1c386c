"""The optimizer benchmark runs end to end with --quick; its numbers are not asserted, its state sizes are."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_optim  # noqa: E402


def test_quick_run_writes_rows(tmp_path):
    out = tmp_path / "optim.json"
    rows = bench_optim.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["env"]["torch"] and saved["env"]["date"]
    by = {r["provider"]: r for r in rows}
    assert rows[0]["provider"] == "torch AdamW" and rows[0]["ratio"] == 1
    assert by["torch AdamW"]["state_bytes_per_param"] == 8  # two float32 moments
    # two uint8 codes, and two float32 scales a block of 256 (every adapter tensor is a multiple of 256)
    assert by["lowrank PagedAdamW state_bits=8"]["state_bytes_per_param"] == 2 + 8 / 256
