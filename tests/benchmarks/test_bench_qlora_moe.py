"""The MoE QLoRA benchmark runs end to end with --quick; its timings are not asserted."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_qlora_moe  # noqa: E402


def test_quick_run_writes_rows(tmp_path):
    out = tmp_path / "qlora_moe.json"
    rows = bench_qlora_moe.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    assert [r["case"] for r in rows] == ["qlora_moe_train_step"] * 4 + ["qlora_moe_decode_token"] * 4
    by = {r["provider"]: r for r in rows if r["case"] == "qlora_moe_train_step"}
    assert list(by) == ["lowrank-4bit-experts", "lowrank-4bit-dense-path", "lowrank-dense-experts", "peft+bitsandbytes"]
    assert all(r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"] for r in rows)
    # one model two ways: the routed experts and the dense path differ by the order of float sums
    assert by["lowrank-4bit-experts"]["first_loss"] == pytest.approx(by["lowrank-4bit-dense-path"]["first_loss"],
                                                                     rel=1e-5)
    # the same model on two stacks: equal codes for the attention, the same dense experts and adapters;
    # only the 4-bit products' summation order differs (bench_qlora's test bounds that far below 1e-4)
    assert by["lowrank-dense-experts"]["first_loss"] == pytest.approx(by["peft+bitsandbytes"]["first_loss"], rel=1e-4)
    assert by["lowrank-dense-experts"]["model_mib"] == pytest.approx(by["peft+bitsandbytes"]["model_mib"], rel=0.02)
    assert by["lowrank-4bit-experts"]["model_mib"] < 0.7 * by["lowrank-dense-experts"]["model_mib"]


def test_compiled_decoding(tmp_path, monkeypatch):
    """--compile-decode adds the 4-bit experts model's decoding compiled, gathered and dense path
    (each traced: the gathered forward and the dense path's dequantize both run while compiling)."""
    import torch

    from lowrank.quant import experts4bit
    from lowrank.quant.params4bit import Weight4bit

    traced = {"gathered": 0, "dense": 0}
    real_gathered, real_dense = experts4bit.gathered_forward, Weight4bit.dense

    def gathered(*args):
        traced["gathered"] += 1
        return real_gathered(*args)

    def dense(self, *args):  # counted while compiling only (the eager dense path calls it too)
        traced["dense"] += torch.compiler.is_compiling()
        return real_dense(self, *args)

    monkeypatch.setattr(experts4bit, "gathered_forward", gathered)
    monkeypatch.setattr(Weight4bit, "dense", dense)
    monkeypatch.delenv("LOWRANK_EXPERTS", raising=False)
    rows = bench_qlora_moe.main(["--quick", "--compile-decode", "--out", str(tmp_path / "moe.json")])
    assert traced["gathered"] > 0 and traced["dense"] > 0
    decode = [r["provider"] for r in rows if r["case"] == "qlora_moe_decode_token"]
    assert decode[-2:] == ["lowrank-4bit-experts compiled", "lowrank-4bit-dense-path compiled"]
    assert "LOWRANK_EXPERTS" not in __import__("os").environ
