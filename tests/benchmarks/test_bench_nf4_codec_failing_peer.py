"""bench_nf4_codec with a provider that fails (a peer library without a kernel for this device):
that provider is left out with its error printed, every other row is still measured and written
(one exception ended the run with no rows before), and the speed-ups of the rest stay against
bitsandbytes measured in the same run."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_nf4_codec  # noqa: E402


def test_a_failing_provider_is_left_out(tmp_path, capsys, monkeypatch):
    real = bench_nf4_codec.providers

    def with_a_broken_peer():
        def broken(w):
            raise RuntimeError("no kernel for this device")
        return {**real(), "broken-peer": (broken, lambda s: s)}

    monkeypatch.setattr(bench_nf4_codec, "providers", with_a_broken_peer)
    out = tmp_path / "nf4_codec.json"
    rows = bench_nf4_codec.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    assert "broken-peer" not in {r["provider"] for r in rows} and "lowrank" in {r["provider"] for r in rows}
    assert "broken-peer 256x512 failed: RuntimeError: no kernel for this device" in capsys.readouterr().out
    for r in rows:  # the baseline row of its own op and shape, from this run
        base = [b["ms"] for b in rows if b["provider"] == "bitsandbytes" and (b["op"], b["shape"]) == (r["op"], r["shape"])]
        assert r["speedup"] == (base[0] / r["ms"] if base else None)
