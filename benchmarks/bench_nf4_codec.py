"""NF4 codec speed on this machine: quantize and dequantize Llama-7B-sized weights with
double quantization, lowrank's plain-PyTorch codec side by side with bitsandbytes (CPU)
and torchao's NF4, in one run.

    python benchmarks/bench_nf4_codec.py            # the embedded default (make demo)
    python benchmarks/bench_nf4_codec.py --quick    # small shapes, a smoke run

Prints a markdown table (median and 20/80 quantiles in ms, GB/s, speed-up over
bitsandbytes measured in the same run) and writes JSON rows with the machine and
versions to benchmarks/results/nf4_codec.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import lowrank
from lowrank import nf4

SHAPES = [(4096, 4096), (11008, 4096)]  # Llama-7B: attention projections, MLP up/gate
QUICK_SHAPES = [(256, 512)]
BLOCKSIZE = 64
DTYPE = torch.bfloat16


def measure(fn, reps: int, budget_s: float) -> list[float]:
    """Seconds per call: one warm-up, then up to `reps` calls within about `budget_s`."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile, in ms."""
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=5, method="inclusive") if len(ms) > 1 else [ms[0]] * 4
    return statistics.median(ms), q[0], q[3]


def providers():
    """name -> (quantize(w) -> state, dequantize(state) -> w). Peers only when importable."""
    out = {"lowrank": (lambda w: nf4.quantize(w, BLOCKSIZE, True), nf4.dequantize)}
    try:
        import bitsandbytes.functional as bnb_f

        def bnb_quantize(w):
            return bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")

        out["bitsandbytes"] = (bnb_quantize, lambda s: bnb_f.dequantize_4bit(s[0], s[1], quant_type="nf4"))
    except ImportError:
        pass
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        out["torchao"] = (lambda w: to_nf4(w, BLOCKSIZE, 256), lambda t: t.get_original_weight())
    except ImportError:
        pass
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__, "lowrank": lowrank.__version__}
    for name in ("bitsandbytes", "torchao"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "device": f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "versions": versions,
        "date": datetime.date.today().isoformat(),
    }


def run(shapes, reps: int, budget_s: float) -> list[dict]:
    rows = []
    for shape in shapes:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DTYPE)
        n = w.numel()
        # bytes moved: the bf16 weight one way, 4.127 bits per weight the other way
        moved = n * w.element_size() + nf4.quantize(w, BLOCKSIZE, True).nbytes
        for name, (quantize, dequantize) in providers().items():
            state = quantize(w)
            for op, fn in (("quantize", lambda: quantize(w)), ("dequantize", lambda: dequantize(state))):
                med, p20, p80 = quantiles(measure(fn, reps, budget_s))
                rows.append(dict(op=op, shape=list(shape), provider=name, ms=med, p20_ms=p20, p80_ms=p80,
                                 gbps=moved / (med * 1e-3) / 1e9))  # fmt: skip
    base = {(r["op"], tuple(r["shape"])): r["ms"] for r in rows if r["provider"] == "bitsandbytes"}
    for r in rows:
        b = base.get((r["op"], tuple(r["shape"])))
        r["speedup_vs_bitsandbytes"] = b / r["ms"] if b else None
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"NF4 codec, {DTYPE} weight, blocksize {BLOCKSIZE}, double quantization. "
        f"{info['device']}; {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; {info['date']}.",
        "",
        "| op | shape | provider | median ms | p20-p80 ms | GB/s | vs bitsandbytes |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['speedup_vs_bitsandbytes']:.2f}x" if r["speedup_vs_bitsandbytes"] else "-"
        lines.append(
            f"| {r['op']} | {r['shape'][0]}x{r['shape'][1]} | {r['provider']} | {r['ms']:.2f} | "
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f} | {r['gbps']:.2f} | {speed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "nf4_codec.json"))
    args = parser.parse_args(argv)
    shapes, reps, budget = (QUICK_SHAPES, 3, 0.5) if args.quick else (SHAPES, 15, 8.0)
    info = machine()
    rows = run(shapes, reps, budget)
    print(markdown(rows, info))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps([info | r for r in rows], indent=1))
    tmp.replace(out)  # atomic: a reader never sees half a file
    print(f"\nrows written to {out}")
    return rows


if __name__ == "__main__":
    main()
