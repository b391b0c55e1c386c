"""The op-call benchmark runs end to end with --quick; its numbers are not asserted."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_op_calls  # noqa: E402


def test_quick_run_writes_rows(tmp_path):
    out = tmp_path / "op_calls.json"
    rows = bench_op_calls.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["env"]["torch"] and saved["env"]["date"]
    cases = {r["case"] for r in rows}
    assert len(cases) == 7 and {"forward + backward", "forward + backward (LoRA)", bench_op_calls.INFERENCE} <= cases
    for case in cases:  # the baseline first in each case, ratio = its time / the provider's
        ours = [r for r in rows if r["case"] == case]
        assert ours[0]["provider"] in ("bf16 nn.Linear", "lowrank LoRA on bf16 nn.Linear") and ours[0]["ratio"] == 1
        assert all(r["us"] > 0 and r["ratio"] == ours[0]["us"] / r["us"] for r in ours)
        assert any(r["provider"].startswith("lowrank") and "Linear4bit" in r["provider"] for r in ours)


def test_dropout_trains_the_lora_layers(tmp_path, monkeypatch):
    """--dropout: the LoRA providers are built with it and in training mode (else it would drop nothing)."""
    built = []
    providers = bench_op_calls.providers
    monkeypatch.setattr(bench_op_calls, "providers", lambda *a: built.append(providers(*a)) or built[-1])
    monkeypatch.setattr(bench_op_calls, "measure", lambda fns, *a: {name: (1.0, 1.0, 1.0) for name in fns})
    rows = bench_op_calls.main(["--quick", "--dropout", "0.1", "--out", str(tmp_path / "d.json")])
    assert {r["case"] for r in rows} >= {"forward + backward (LoRA, dropout 0.1)"}
    drops = [m for model in built[1].values() for m in model.modules() if type(m).__name__ == "Dropout"]
    assert len(drops) == len(built[1]) and all(d.p == 0.1 and d.training for d in drops)
