"""bench_nf4_codec checks each provider's round trip before timing it (_common, Note: check before
timing): a codec whose dequantize does not give back the weight it quantized (a wrong layout, wrong
scales) is left out with the error and the bound printed, instead of a row and a speed-up."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_nf4_codec  # noqa: E402


def test_a_wrong_codec_is_not_timed(tmp_path, capsys, monkeypatch):
    real = bench_nf4_codec.providers

    def with_a_wrong_peer():  # lowrank's codec, but its dequantize hands the rows back in reverse order
        ours = real()["lowrank"]
        return {**real(), "wrong-peer": (ours[0], lambda s: ours[1](s).flip(0))}

    monkeypatch.setattr(bench_nf4_codec, "providers", with_a_wrong_peer)
    rows = bench_nf4_codec.main(["--quick", "--out", str(tmp_path / "c.json")])
    assert "wrong-peer" not in {r["provider"] for r in rows} and "lowrank" in {r["provider"] for r in rows}
    said = capsys.readouterr().out
    assert "wrong-peer 256x512 failed: WrongResult: wrong-peer dequantize(quantize(w)) 256x512 differs" in said
    assert "(allowed 0.2)" in said


def test_every_real_provider_passes():
    """The bound is loose enough for each codec run here (NF4's rounding: ~0.09)."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).to(bench_nf4_codec.DTYPE)
    q = bench_nf4_codec.nf4.quantize(w, bench_nf4_codec.BLOCKSIZE, True)
    for name, (quantize, dequantize) in bench_nf4_codec.providers().items():
        d = dequantize(quantize(w) if quantize else q).double()
        err = ((d - w.double()).norm() / w.double().norm()).item()
        assert 0.05 < err < bench_nf4_codec.RTOL / 2, (name, err)
