"""lowrank's C++ CPU kernels (csrc) against bitsandbytes' CPU path and bf16 on this CPU.

    python benchmarks/bench_nf4_cpu.py            # 4096 x 4096 bf16 weight, double quant, M in {1, 4, 16}
    python benchmarks/bench_nf4_cpu.py --quick    # 512 x 512, few repeats (smoke test)

Rows, all measured in this one run: dequantize (lowrank csrc, bitsandbytes.functional.
dequantize_4bit; and lowrank's kernel alone, into a tensor already written once, which shows
what the page faults of a fresh output cost) and linear (lowrank csrc nf4_linear with the best
instruction set, and with AVX-512 FMA where the best one is avx512bf16; bitsandbytes gemv_4bit
at M = 1; bf16 F.linear on the dense weight, the baseline). Each: median and 20/80% quantiles
of 15 samples (a sample: the mean of as many calls as take about 2 ms), GB/s of the bytes the
op must move, the fraction of this machine's memory bandwidth (measured here with a 256 MiB
tensor copy), and the time ratio to each baseline. Writes --out (default
benchmarks/results/nf4_cpu.json) and a .md table beside it. Skips (exit 0) with a message when
lowrank._C is not built: every row but the baselines times it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402

COLUMNS = ["op", "M", "provider", "ms", "p20", "p80", "gbps", "of_bandwidth", "vs_bnb", "vs_bf16"]


def cpu_model() -> str:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "nf4_cpu.json")
    args = parser.parse_args(argv)
    try:
        from lowrank import _C
    except ImportError as e:  # a traceback said less than this (bench_nf4_cuda.py skips the same way)
        print(f"bench_nf4_cpu: lowrank._C is not built ({e}): nothing to measure; build it with "
              "`python setup.py build_ext --inplace` (docs/csrc.md)")
        return 0
    from lowrank import nf4

    cpu = torch.device("cpu")
    n = k = 512 if args.quick else 4096
    w = torch.randn(n, k, dtype=torch.bfloat16)
    q = nf4.quantize(w, 64, True)
    fields = (q.packed, q.absmax, q.nested_absmax, q.offset, [n, k], 64)
    try:
        import bitsandbytes.functional as bnbf

        bq, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    except ImportError:
        bnbf = None

    def timed(fn):
        """(median, p20, p80) ms. Calls of 0.15 ms are timed in batches, so that the clock and
        one stray interruption (the machine is shared) weigh less."""
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        inner = max(1, min(200, int(2e-3 / max(time.perf_counter() - start, 1e-7))))
        samples = []
        for _ in range(3 if args.quick else 15):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append(1e3 * (time.perf_counter() - start) / inner)
        return _common.summarize(samples)

    # Note: memory bandwidth. A copy of 256 MiB (far beyond the caches) reads and writes every
    # byte once: 2 * 256 MiB / time. The ops' GB/s below count the bytes they must move the same way.
    big = torch.empty(2**26 if not args.quick else 2**22, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(big)
    copy = timed(lambda: dst.copy_(big))
    bandwidth = 2 * big.numel() * 4 / copy[0] / 1e6  # GB/s
    print(f"memory bandwidth (copy of {big.numel() * 4 >> 20} MiB): {bandwidth:.1f} GB/s", flush=True)

    flush = torch.ones(2**24 if not args.quick else 2**20, dtype=torch.float32)  # 64 MiB, twice the L3 here

    def timed_cold(fn):
        """(median, p20, p80) ms of single calls after reading 64 MiB elsewhere: the weight
        (8.9 MB at 4096 x 4096) comes from memory, not from the 32 MiB L3 that keeps it between
        repeated calls. (Reading, not writing: dirty lines would add their write-back.)"""
        fn()
        samples = []
        for _ in range(3 if args.quick else 21):
            flush.sum()
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        return _common.summarize(samples)

    rows = []

    def row(op, m, provider, t, moved, bnb=None, bf16=None):
        rows.append(dict(op=op, M=m, provider=provider, ms=t[0], p20=t[1], p80=t[2], gbps=moved / t[0] / 1e6,
                         of_bandwidth=moved / t[0] / 1e6 / bandwidth,
                         vs_bnb=None if bnb is None else bnb[0] / t[0], vs_bf16=None if bf16 is None else bf16[0] / t[0]))

    moved = q.nbytes + 2 * n * k  # packed weight and scales in, bf16 weight out
    bnb = timed(lambda: bnbf.dequantize_4bit(bq, state)) if bnbf else None
    if bnb:
        row("dequantize", None, "bitsandbytes", bnb, moved, bnb)
    row("dequantize", None, "lowrank csrc", timed(lambda: _C.nf4_dequantize_cpu(*fields, torch.bfloat16)), moved, bnb)
    out = torch.zeros(n, k, dtype=torch.bfloat16)  # written once: no page faults
    row("dequantize", None, "lowrank csrc kernel, written tensor", timed(lambda: _C.nf4_dequantize_cpu_into(out, *fields)),
        moved, bnb)
    best = _C.cpu_isa()
    for m in (1, 4, 16):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        bf16 = timed(lambda: F.linear(x, w))
        row("linear", m, "bf16 F.linear", bf16, 2 * n * k + 2 * m * (n + k), None, bf16)
        moved = q.nbytes + 2 * m * (n + k)
        bnb = None
        if bnbf and m == 1:
            bnb = timed(lambda: bnbf.gemv_4bit(x, bq.t(), state=state))
            row("linear", m, "bitsandbytes gemv_4bit", bnb, moved, bnb, bf16)
        row("linear", m, f"lowrank csrc ({best})", timed(lambda: _C.nf4_linear_cpu(x, *fields, None)), moved, bnb, bf16)
        if m == 1:  # weights from memory (See timed_cold)
            bnb_cold = None
            if bnbf:
                bnb_cold = timed_cold(lambda: bnbf.gemv_4bit(x, bq.t(), state=state))
                row("linear, cold", m, "bitsandbytes gemv_4bit", bnb_cold, moved, bnb_cold)
            row("linear, cold", m, f"lowrank csrc ({best})", timed_cold(lambda: _C.nf4_linear_cpu(x, *fields, None)), moved,
                bnb_cold, timed_cold(lambda: F.linear(x, w)))
        if best == "avx512bf16":  # the AVX-512 FMA kernel, what CPUs without AVX512_BF16 run
            _C.set_cpu_isa("avx512")
            try:
                fma = timed(lambda: _C.nf4_linear_cpu(x, *fields, None))
            finally:
                _C.set_cpu_isa(best)
            row("linear", m, "lowrank csrc (avx512)", fma, moved, bnb, bf16)
    env = {**_common.environment(cpu), "device": cpu_model(), "threads": torch.get_num_threads(),
           "cpu_isa": _C.cpu_isa(), "bandwidth_gbps": bandwidth, "shape": [n, k]}
    table = _common.markdown(rows, COLUMNS)
    print(table)
    _common.write(args.out, rows, env, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
