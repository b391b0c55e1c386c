"""bench_nf4_linear checks each provider's result before timing it (_common, Note: check before
timing): a peer whose call computes another product (bitsandbytes 0.50's CPU gemv_4bit on a weight
not converted for it) is left out with what differed and by how much, instead of getting a row."""

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_nf4_linear  # noqa: E402

CFG = dict(ms=[1, 3], grad_m=2)


@pytest.fixture
def cpu_only(monkeypatch):  # lowrank's CPU backends only: the interpreted Triton ones are slow, and checked alike
    backends = bench_nf4_linear.lowrank_backends
    monkeypatch.setattr(bench_nf4_linear, "lowrank_backends", lambda device: [p for p in backends(device) if "triton" not in p[0]])


def run(monkeypatch, found: dict, caplog) -> list[dict]:
    monkeypatch.setattr(bench_nf4_linear, "peers", lambda w: found)
    with caplog.at_level(logging.WARNING, logger="benchmarks"):
        return bench_nf4_linear.run_shape(128, 128, CFG, torch.device("cpu"), quick=True)


def test_a_wrong_product_is_not_timed(monkeypatch, caplog, cpu_only):
    """Right dequantize, wrong product (W's rows permuted): the linear rows go, the dequantize row stays."""
    found = {}

    def peers(w):
        wrong = w.roll(1, 0)
        found["wrong"] = (lambda x: x @ wrong.t(), lambda: w.clone())
        return found

    monkeypatch.setattr(bench_nf4_linear, "peers", peers)
    with caplog.at_level(logging.WARNING, logger="benchmarks"):
        rows = bench_nf4_linear.run_shape(128, 128, CFG, torch.device("cpu"), quick=True)
    assert [r["op"] for r in rows if r["provider"] == "wrong"] == ["dequantize"]
    said = [m for m in caplog.messages if "linear wrong" in m]
    assert len(said) == len(CFG["ms"]) and all("WrongResult" in m and "relative error" in m and "allowed" in m for m in said)
    # lowrank's own backends pass their checks: a row for each op and M
    ours = {(r["op"], r["M"]) for r in rows if r["provider"] == "lowrank-csrc"}
    assert ours == {("linear", 1), ("linear", 3), ("dequantize", None), ("grad_x", 2)}


def test_a_wrong_dequantize_is_not_timed(monkeypatch, caplog, cpu_only):
    rows = run(monkeypatch, {"garbage": (None, lambda: torch.randn(128, 128))}, caplog)
    assert not [r for r in rows if r["provider"] == "garbage"]
    assert any("dequantize garbage" in m and "relative error" in m for m in caplog.messages)


def test_bitsandbytes_cpu_gemv_on_an_unconverted_weight_is_caught(monkeypatch, caplog, cpu_only):
    """The call bench_nf4_cpu timed: gemv_4bit(x, W.t(), state) on the CPU (bitsandbytes 0.50 expects
    the weight converted by _convert_weight_packed_for_cpu there). Where it happens to compute the
    right product (another bitsandbytes, a CPU without AVX512-BF16), the check lets it through."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    found = {}

    def peers(w):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        found["gemv"] = (lambda x: bnbf.gemv_4bit(x, packed.t(), state=state), lambda: bnbf.dequantize_4bit(packed, state))
        return found

    monkeypatch.setattr(bench_nf4_linear, "peers", peers)
    with caplog.at_level(logging.WARNING, logger="benchmarks"):
        rows = bench_nf4_linear.run_shape(128, 128, dict(ms=[1], grad_m=1), torch.device("cpu"), quick=True)
    w = torch.randn(128, 128).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    err = _common.relative_error(bnbf.gemv_4bit(x, packed.t(), state=state), x.float() @ bnbf.dequantize_4bit(packed, state).float().t())
    timed = [r for r in rows if r["provider"] == "gemv" and r["op"] == "linear"]
    assert (not timed) == (err > bench_nf4_linear.RTOL["linear"])


def test_check_close_says_what_and_how_much():
    ref = torch.ones(4, 4)
    _common.check_close("same", ref + 1e-3, ref, 1e-2)
    with pytest.raises(_common.WrongResult, match=r"linear p differs from its reference: relative error 0\.5 \(allowed 0\.01\)"):
        _common.check_close("linear p", 1.5 * ref, ref, 1e-2)
    with pytest.raises(_common.WrongResult, match=r"shape \(4,\).*\(4, 4\)"):
        _common.check_close("linear p", torch.ones(4), ref, 1e-2)
    with pytest.raises(_common.WrongResult, match="relative error nan"):
        _common.check_close("linear p", torch.full((4, 4), float("nan")), ref, 1e-2)
