"""benchmarks/bench_nf4_cpu.py checks what it times (Note: checked baselines there). Until
2026-11-30 it timed bitsandbytes' `gemv_4bit` on the layout bitsandbytes saves, which on the CPU
returns another product (relative error ~1.5), and reported lowrank 1.54x faster than that. Now
every provider's output is compared with the float64 product first: a run times both of
bitsandbytes' CPU paths and writes their errors, and a provider that computes something else
stops the run instead of being timed."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lowrank._C")
bnb = pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_nf4_cpu  # noqa: E402


def test_every_linear_row_is_checked_and_both_bitsandbytes_paths_are_timed(tmp_path):
    out = tmp_path / "nf4_cpu.json"
    assert bench_nf4_cpu.main(["--quick", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["op"] == "linear"]
    for x in ("bfloat16", "float32"):
        ones = {r["provider"]: r for r in rows if r["x"] == x and r["M"] == 1}
        assert {"bitsandbytes Linear4bit, eval", "bitsandbytes matmul_4bit", f"{x} F.linear"} <= set(ones), sorted(ones)
        ours = [r for p, r in ones.items() if p.startswith("lowrank csrc (")]
        assert ours and ours[0]["vs_bnb"] == pytest.approx(ones["bitsandbytes Linear4bit, eval"]["ms"] / ours[0]["ms"])
    checked = [r for r in rows if r["err"] is not None]
    assert checked and all(0 <= r["err"] < 2**-5 for r in checked), [(r["provider"], r["err"]) for r in checked]
    # float32 x: lowrank computes in float32 (W as the reference dequantizes it): within K float32
    # roundings (K = 512 at --quick); bitsandbytes' eval path computes in bf16 (x and W rounded
    # to 8 bits, 2^-9 each) whatever x's dtype. The column shows the difference.
    f32 = {r["provider"]: r["err"] for r in rows if r["x"] == "float32" and r["M"] == 1}
    ours = next(e for p, e in f32.items() if p.startswith("lowrank csrc ("))
    assert ours < 512 * 2**-24 < 2**-12 < f32["bitsandbytes Linear4bit, eval"], f32


def test_a_peer_that_computes_another_product_is_not_timed(tmp_path, monkeypatch):
    def wrong(self, x):  # the shape and dtype of the real output, other values
        return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", wrong)
    out = tmp_path / "nf4_cpu.json"
    with pytest.raises(SystemExit, match=r"bitsandbytes Linear4bit computed another product \(relative error 1 "):
        bench_nf4_cpu.main(["--quick", "--out", str(out)])
    assert not out.exists()
