"""bench_qlora --llama7b, run tiny on the CPU: every line of the GPU run's code path (meta
build, layer-by-layer quantization, both providers in turn, rows) in a few seconds."""

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _qlora_build  # noqa: E402
import bench_qlora  # noqa: E402

# Rows of 128 and 384: whole 64-blocks, see bench_qlora's Note: whole blocks per row.
TINY = dict(layers=2, hidden=128, intermediate=384, vocab=512, seq=64)
ARGS = ["--llama7b"] + [a for k, v in TINY.items() for a in (f"--{k}", str(v))]
U = 2.0**-8  # bf16's unit roundoff (8 significant bits)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models():
    config = _qlora_build.llama_config(TINY["layers"], TINY["hidden"], TINY["intermediate"], TINY["vocab"])
    ours = bench_qlora.build_lowrank(config, CPU, torch.bfloat16)
    theirs = bench_qlora.build_peft(config, CPU, torch.bfloat16)
    return ours, theirs


def test_both_builds_hold_the_same_4bit_model(models):
    ours, theirs = models
    theirs_modules = dict(theirs.base_model.model.named_modules())
    for name in bench_qlora.TARGETS:
        for i in range(TINY["layers"]):
            full = next(n for n in theirs_modules if n.endswith(f"layers.{i}.self_attn.{name}")
                        or n.endswith(f"layers.{i}.mlp.{name}"))
            mine, bnb_layer = ours.get_submodule(full).base, theirs_modules[full].base_layer
            w = bnb_layer.weight
            # the same dense weights went in, so the same codes came out, and the same bf16 weight back
            assert torch.equal(mine.packed.view(torch.uint8).flatten(), w.data.flatten()), full
            assert torch.equal(mine.dequantize(torch.bfloat16), bnb.functional.dequantize_4bit(w.data, w.quant_state))
    dense = dict(theirs.base_model.model.named_parameters())
    for name, p in ours.named_parameters():  # embeddings, norms, head: bf16, equal bit for bit
        if p.is_floating_point() and not p.requires_grad:
            assert p.dtype == torch.bfloat16 and torch.equal(p, dense[name]), name
    # per-name seeds: two layers' weights differ (a seed that ignored the name would pass the above)
    q0, q1 = (ours.get_submodule(f"model.layers.{i}.self_attn.q_proj").base.packed for i in (0, 1))
    assert not torch.equal(q0, q1)
    # the same adapter start: B = 0, A equal up to each side's dtype (bf16 here, float32 in PEFT)
    theirs_params = dict(theirs.named_parameters())
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(bench_qlora.TARGETS) * TINY["layers"]
    for name, p in trainable:
        peer = theirs_params["base_model.model." + name.replace(".base.", ".base_layer.")]
        assert torch.equal(p, peer.to(p.dtype)), name
    assert all(layer.gradient_checkpointing for m in (ours, theirs.base_model.model) for layer in m.model.layers)


def logit_bound(ours) -> tuple[float, "torch.Tensor"]:
    # Note: the bound on the providers' logits. Both multiply the same bf16 weights (test above);
    # what may differ is where results are rounded to bf16 and the fp32 summation order. Each
    # linear's output is rounded once per side (relative error <= U, so <= 2U apart); the errors
    # of the linears a token's path crosses in series add up: 4 a layer (q/k/v -> o, gate/up ->
    # down) plus the head, and the norms rescale them without growing them. So
    # max|dz| <= 2U (4 layers + 1) max|z|, about 0.06 max|z| here. Not quantizing one side moves
    # the logits by about 0.2 max|z| (measured), so the bound tells the two apart.
    ids = torch.randint(0, TINY["vocab"], (1, TINY["seq"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = ours(input_ids=ids).logits.float()
    return 2 * U * (4 * TINY["layers"] + 1) * z.abs().max().item(), ids


def test_logits_agree_within_bf16_rounding(models):
    ours, theirs = models
    bound, ids = logit_bound(ours)
    with torch.no_grad():
        dz = (ours(input_ids=ids).logits.float() - theirs(input_ids=ids).logits.float()).abs().max().item()
    assert dz <= bound


def test_tiny_llama7b_run_writes_rows(tmp_path, models, capsys):
    out = tmp_path / "qlora_7b.json"
    rows = bench_qlora.main(ARGS + ["--reps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["env"]["bitsandbytes"] and saved["env"]["date"]
    assert [r["provider"] for r in rows] == ["lowrank", "peft+bitsandbytes"]
    assert all("error" not in r for r in rows)
    assert all(r["shape"].startswith("llama-2-7b h128 i384 L2 v512 b1x64 bf16") for r in rows)
    for r in rows:
        assert 0 < r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["build_s"] > 0
        assert 0 < r["host_ms"] <= r["p80_ms"]  # queueing is part of the step (all of it on the CPU)
        assert r["tokens_per_s"] == pytest.approx(TINY["seq"] / (r["ms"] / 1e3))  # batch 1
        assert r["model_mib"] is None and r["peak_mib"] is None  # the CPU: no CUDA memory counters
    lowrank, peft_row = rows
    assert peft_row["ratio"] == peft_row["tokens_ratio"] == 1
    assert lowrank["ratio"] == pytest.approx(lowrank["ms"] / peft_row["ms"])
    assert lowrank["tokens_ratio"] == pytest.approx(1 / lowrank["ratio"])
    # The first step runs the base model alone (B = 0): the same model on both sides, so the
    # losses agree within the logits' bound, doubled (cross-entropy = logsumexp(z) - z_target,
    # each term moves at most max|dz|). The random model sits near ln(vocab), so this catches a
    # wrong model only grossly; the two tests above are the sensitive ones.
    bound, _ = logit_bound(models[0])
    assert math.isfinite(lowrank["first_loss"]) and abs(lowrank["first_loss"] - math.log(TINY["vocab"])) < 0.5
    assert lowrank["first_loss"] == pytest.approx(peft_row["first_loss"], abs=2 * bound)
    printed = capsys.readouterr().out
    assert "lowrank: warm-up" in printed and "peft+bitsandbytes: step 2/2" in printed


def test_a_failing_provider_leaves_the_other_measured(tmp_path, monkeypatch):
    def broken(config, device, dtype, **options):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench_qlora, "build_lowrank", broken)
    rows = bench_qlora.main(ARGS + ["--layers", "1", "--reps", "1", "--out", str(tmp_path / "q.json")])
    assert rows[0]["provider"] == "lowrank" and "simulated" in rows[0]["error"] and rows[0]["ratio"] is None
    assert rows[1]["provider"] == "peft+bitsandbytes" and rows[1]["ms"] > 0 and "error" not in rows[1]
    assert "| error |" in (tmp_path / "q.md").read_text()


def test_compiled_run_computes_the_same_model(tmp_path, models):
    """--compile (each decoder layer torch.compiled on both sides, the GPU script's second 7B
    run): both providers compile and run, and their first losses agree as in eager."""
    torch._dynamo.reset()
    rows = bench_qlora.main(ARGS + ["--reps", "1", "--compile", "--out", str(tmp_path / "c.json")])
    assert [r["provider"] for r in rows] == ["lowrank", "peft+bitsandbytes"] and all("error" not in r for r in rows)
    assert all(r["shape"].endswith("bf16 r16 ckpt compiled") for r in rows)
    bound, _ = logit_bound(models[0])  # See test_tiny_llama7b_run_writes_rows
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], abs=2 * bound)
    with pytest.raises(SystemExit):
        bench_qlora.main(ARGS + ["--compile-mode", "reduce-overhead"])  # a mode without --compile


def test_dropout_runs_on_both_sides(tmp_path):
    """--dropout 0.1 (the QLoRA recipes'): both providers' adapters drop out while training (lowrank's
    inside its op: one nf4_lora_linear node a layer), and the rows say so."""
    rows = bench_qlora.main(ARGS + ["--layers", "1", "--reps", "1", "--dropout", "0.1", "--out", str(tmp_path / "d.json")])
    assert [r["provider"] for r in rows] == ["lowrank", "peft+bitsandbytes"] and all("error" not in r for r in rows)
    assert all(r["shape"].endswith("bf16 r16 ckpt dropout 0.1") for r in rows)
    config = _qlora_build.llama_config(1, TINY["hidden"], TINY["intermediate"], TINY["vocab"])
    ours = bench_qlora.build_lowrank(config, CPU, torch.bfloat16, dropout=0.1)
    theirs = bench_qlora.build_peft(config, CPU, torch.bfloat16, dropout=0.1)
    assert {m.lora_dropout["default"].p for m in ours.modules() if hasattr(m, "lora_dropout")} == {0.1}
    assert {m.lora_dropout["default"].p for m in theirs.modules() if hasattr(m, "lora_dropout")} == {0.1}
    with pytest.raises(SystemExit):
        bench_qlora.main(ARGS + ["--dropout", "1.0"])


@pytest.mark.parametrize("mode, ours_dtype, theirs_dtype", [
    ("defaults", torch.bfloat16, torch.float32), ("compute", torch.bfloat16, torch.bfloat16),
    ("float32", torch.float32, torch.float32)])
def test_adapter_dtype_sets_both_sides(tmp_path, mode, ours_dtype, theirs_dtype):
    """--adapter-dtype: each library's default, or like for like (both bf16, both float32); the
    same start values either way (A rounded to each side's dtype), and the rows say which."""
    config = _qlora_build.llama_config(1, TINY["hidden"], TINY["intermediate"], TINY["vocab"])
    ours = bench_qlora.build_lowrank(config, CPU, torch.bfloat16, adapter_dtype=mode)
    theirs = bench_qlora.build_peft(config, CPU, torch.bfloat16, adapter_dtype=mode)
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peer = {n.removeprefix("base_model.model.").replace(".base_layer.", ".base."): p
            for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == peer.keys() and len(mine) == 2 * len(bench_qlora.TARGETS)
    assert {p.dtype for p in mine.values()} == {ours_dtype} and {p.dtype for p in peer.values()} == {theirs_dtype}
    for name, p in mine.items():
        assert torch.equal(p.float(), peer[name].float()) if ours_dtype == theirs_dtype \
            else torch.equal(p, peer[name].to(p.dtype)), name
    if mode == "compute":
        rows = bench_qlora.main(ARGS + ["--layers", "1", "--reps", "1", "--adapter-dtype", mode,
                                        "--out", str(tmp_path / "a.json")])
        assert all("error" not in r and r["shape"].endswith("bf16 r16 ckpt adapters bf16") for r in rows)
        with pytest.raises(SystemExit):
            bench_qlora.main(["--quick", "--adapter-dtype", mode])


def test_size_overrides_need_llama7b():
    with pytest.raises(SystemExit):
        bench_qlora.main(["--quick", "--hidden", "128"])
